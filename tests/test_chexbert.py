"""The CheXbert checkpoint reader, on a tiny random checkpoint of the published key layout:
loading, the 14-column output, the tokenizer lookup, errors, and the CLI paths."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from raydiology.cli import app
from raydiology.evaluation.chexbert import HEAD_ORDER, CheXbertLabeler, make_labeler
from raydiology.evaluation.labeler import OBSERVATIONS

WORDS = ["no", "pleural", "effusion", "or", "pneumothorax", ".", "heart", "size", "is", "normal"]
WORDS += ["mild", "cardiomegaly", "edema"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##al"]


def tiny_checkpoint(folder: Path, *, with_vocab: bool = True, seed: int = 0) -> Path:
    """A CheXbert-layout checkpoint: DataParallel 'module.' keys, 13 four-class heads and a
    two-class No Finding head on a 2-layer, 64-wide BERT."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=1,
        intermediate_size=96,
        max_position_embeddings=512,
    )
    bert = BertModel(config)
    state = {f"module.bert.{k}": v for k, v in bert.state_dict().items()}
    for i in range(14):
        head = torch.nn.Linear(64, 2 if i == 13 else 4)
        state[f"module.linear_heads.{i}.weight"] = head.weight.detach().clone()
        state[f"module.linear_heads.{i}.bias"] = head.bias.detach().clone()
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "chexbert.pth"
    torch.save({"epoch": 1, "model_state_dict": state}, weights)
    if with_vocab:
        (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return weights


REPORTS = [
    "No pleural effusion or pneumothorax. Heart size is normal.",
    "Mild cardiomegaly.\nEdema.",
    "",
    "effusion " * 600,  # past 512 tokens: cut, not an error
]


def test_tiny_checkpoint_labels_in_the_chexpert_layout(tmp_path):
    labeler = CheXbertLabeler(tiny_checkpoint(tmp_path / "ckpt"), batch_size=3)
    labels = labeler.label_many(REPORTS)
    assert len(labels) == len(REPORTS)
    for row in labels:
        assert list(row) == list(OBSERVATIONS)
        assert all(v in (1, 0, -1, None) for v in row.values())
        assert row["No Finding"] in (1, None)
    assert set(HEAD_ORDER) == set(OBSERVATIONS)
    assert len(labeler.encode(REPORTS[3])) == 512
    assert labeler.encode(REPORTS[2]) == [2, 3]  # [CLS] [SEP]
    # Batching does not change a report's labels.
    assert labeler.label(REPORTS[1]) == labels[1]


def test_head_classes_map_to_chexpert_values(tmp_path):
    """Biases alone decide the class: head i favours class i % 4 (No Finding: class 1)."""
    weights = tiny_checkpoint(tmp_path / "ckpt")
    checkpoint = torch.load(weights, weights_only=True)
    state = checkpoint["model_state_dict"]
    for i in range(14):
        state[f"module.linear_heads.{i}.weight"].zero_()
        bias = state[f"module.linear_heads.{i}.bias"]
        bias.zero_()
        bias[1 if i == 13 else i % 4] = 1.0
    torch.save(checkpoint, weights)
    row = CheXbertLabeler(weights).label("heart size is normal")
    expected = {name: (None, 1, 0, -1)[i % 4] for i, name in enumerate(HEAD_ORDER[:13])}
    assert row == {"No Finding": 1, **{o: expected[o] for o in OBSERVATIONS[1:]}}


def test_tokenizer_lookup_and_errors(tmp_path):
    weights = tiny_checkpoint(tmp_path / "bare", with_vocab=False)
    vocab_folder = tiny_checkpoint(tmp_path / "tok").parent
    labeler = CheXbertLabeler(weights, tokenizer=vocab_folder)
    assert labeler.provenance()["tokenizer"] == str(vocab_folder.resolve())
    with pytest.raises(FileNotFoundError, match=r"no vocab\.txt"):
        CheXbertLabeler(weights, tokenizer=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CheXbertLabeler(tmp_path / "missing.pth")
    broken = tmp_path / "broken.pth"
    torch.save({"model_state_dict": {"module.linear_heads.0.weight": torch.zeros(4, 64)}}, broken)
    with pytest.raises(ValueError, match="not a CheXbert checkpoint"):
        CheXbertLabeler(broken, tokenizer=vocab_folder)
    with pytest.raises(ValueError, match="needs --weights"):
        make_labeler("chexbert")
    with pytest.raises(ValueError, match="unknown labeler"):
        make_labeler("bert")


def test_label_cli_with_chexbert_writes_a_sidecar(tmp_path):
    weights = tiny_checkpoint(tmp_path / "ckpt")
    source = tmp_path / "reports.jsonl"
    source.write_text(
        "".join(json.dumps({"id": i, "report": r}) + "\n" for i, r in enumerate(REPORTS[:2]))
    )
    out = tmp_path / "labels.csv"
    result = CliRunner().invoke(
        app,
        [
            "label",
            str(source),
            "--out",
            str(out),
            "--labeler",
            "chexbert",
            "--weights",
            str(weights),
        ],
    )
    assert result.exit_code == 0, result.output
    with out.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["id", *OBSERVATIONS] and len(rows) == 3
    sidecar = json.loads((tmp_path / "labels.labeler.json").read_text())
    assert sidecar["labeler"] == "chexbert" and sidecar["reports"] == 2
    assert sidecar["weights"] == str(weights.resolve())
    # The rule labeler records itself the same way.
    assert CliRunner().invoke(app, ["label", str(source), "--out", str(out)]).exit_code == 0
    assert (
        json.loads((tmp_path / "labels.labeler.json").read_text())["labeler"] == "raydiology-rules"
    )
    # Missing weights: a clear error, exit code 2.
    result = CliRunner().invoke(
        app, ["label", str(source), "--out", str(out), "--labeler", "chexbert"]
    )
    assert result.exit_code == 2 and "--weights" in result.output


def test_eval_cli_with_chexbert_names_the_labeler(tmp_path):
    weights = tiny_checkpoint(tmp_path / "ckpt")
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text(
        "".join(
            json.dumps({"id": i, "reference": r, "prediction": p}) + "\n"
            for i, (r, p) in enumerate([(REPORTS[0], REPORTS[1]), (REPORTS[1], REPORTS[1])])
        )
    )
    result = CliRunner().invoke(
        app, ["eval", str(predictions), "--labeler", "chexbert", "--weights", str(weights)]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "preds.metrics.json").read_text())
    assert metrics["labeler"] == "chexbert"
    assert "ce_f1_micro" in metrics


def test_without_a_local_tokenizer_the_cache_is_tried_offline_only(tmp_path, monkeypatch):
    import transformers

    weights = tiny_checkpoint(tmp_path / "bare", with_vocab=False)
    calls = []

    def offline(name, **kwargs):
        calls.append((name, kwargs))
        raise OSError("not in the cache")

    monkeypatch.setattr(transformers.BertTokenizer, "from_pretrained", offline)
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        CheXbertLabeler(weights)
    assert calls == [("bert-base-uncased", {"local_files_only": True})]

"""Frozen-encoder phrase grounding: MS-CXR's layout into the corpus, the phrase triples, the
metrics by hand, and `raydiology evaluate ground` end to end on phantom lesion phrases with a
CLIP export's text tower, for an HD-MAE, a DINOv2 and a random-initialised export."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from raydiology.cli import app
from raydiology.data.corpus import read_rows
from raydiology.data.ingest import ingest_images
from raydiology.evaluation.ground import (
    BertPhraseEncoder,
    grounding_metrics,
    load_phrase_encoder,
    ms_cxr_file_list,
    phrase_splits,
)

REPO = Path(__file__).resolve().parents[1]


def _clip_export(folder: Path, runs: Path) -> Path:
    """An untrained tiny CLIP export (clip_smoke's text tower, a tiny HD-MAE image tower)."""
    from raydiology.config import load_experiment
    from raydiology.registry import build_model, build_objective
    from raydiology.train.export import export_encoder

    exp = load_experiment(REPO / "experiments" / "mambaxray_vl" / "stage2_clip.yaml",
                          profile="clip_smoke", overrides=[
                              f"output.dir={runs}", "data.resolution=64", "data.phantom.size=64",
                              "model.image.timm=null", "model.image.model={name: hd_mae, flavor: tiny}"])  # fmt: skip
    torch.manual_seed(0)
    objective = build_objective(exp.objective, build_model(exp.model, exp.data)).eval()
    export_encoder(objective, folder, exp=exp, corpus_sha256=None, step=0)
    objective.export_extra(folder, write=True, gather=False)
    return folder


def _bert_folder(folder: Path, words: list[str], *, masked_lm: bool = False) -> Any:
    """A tiny real transformers BERT with random weights and a word-level WordPiece vocabulary
    built here (no download), saved with `save_pretrained`; returns the model."""
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words))]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64)  # fmt: skip
    torch.manual_seed(3)
    model = BertForMaskedLM(config) if masked_lm else BertModel(config, add_pooling_layer=False)
    model.save_pretrained(folder)
    return model.eval()


def _phrase_words(phrases: list[str]) -> list[str]:
    return [w for p in phrases for w in re.findall(r"\w+|[^\w\s]", p.lower())]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_grounding_metrics_by_hand() -> None:
    truth = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 2.0, 2.0]])
    pred = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 2.0], [2.0, 2.0, 4.0, 4.0]])
    got = grounding_metrics(pred, truth)  # IoUs 1, 0.5 (not > 0.5), 0
    assert got["acc50"] == pytest.approx(1 / 3) and got["mean_iou"] == pytest.approx(0.5)
    assert grounding_metrics(pred[:0], truth[:0])["acc50"] is None


def test_ms_cxr_layout_reaches_the_corpus_as_phrases(tmp_path) -> None:
    """MS-CXR's CSV (two phrases on one image, one on another) -> a file list -> ingest
    (padding a non-square image) -> phrase triples at the model's resolution, each box on
    the block it was drawn around."""
    (tmp_path / "files").mkdir()
    blocks = {
        "d1": (80, 120, [(10, 20, 30, 16), (70, 40, 20, 30)]),
        "d2": (100, 100, [(50, 5, 25, 40)]),
    }
    rows = []
    for dicom, (h, w, boxes) in blocks.items():
        film = np.zeros((h, w), np.uint8)
        for k, (x, y, bw, bh) in enumerate(boxes):
            film[y : y + bh, x : x + bw] = 255
            rows.append({"dicom_id": dicom, "category_name": "Opacity", "label_text": f"{dicom} block {k}",
                         "x": x, "y": y, "w": bw, "h": bh, "image_width": w, "image_height": h})  # fmt: skip
        Image.fromarray(film).save(tmp_path / "files" / f"{dicom}.png")
    with (tmp_path / "ms_cxr.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    made = ms_cxr_file_list(tmp_path / "ms_cxr.csv", "files/{}.png", tmp_path / "list.csv")
    assert (made.images, made.phrases, made.rescaled, made.missing) == (2, 3, 0, 0)
    ingest_images([tmp_path / "list.csv"], tmp_path / "c", size=60, parallel=False,
                  progress=False, salt="s")  # fmt: skip
    assert len(read_rows(tmp_path / "c", columns=["boxes"])) == 2
    splits = phrase_splits(tmp_path / "c", 120)
    triples = [(s, i) for s in splits.values() for i in range(len(s))]
    assert sorted(s.phrases[i] for s, i in triples) == ["d1 block 0", "d1 block 1", "d2 block 0"]
    for split, i in triples:
        image = split.images[split.image[i], 0].numpy() >= 128
        x0, y0, x1, y1 = split.boxes[i].round().int().tolist()
        assert image[y0:y1, x0:x1].mean() > 0.9  # the box sits on its block...
        assert image[max(0, y0 - 3) : y1 + 3, max(0, x0 - 3) : x1 + 3].sum() <= image[
            y0:y1, x0:x1
        ].sum() + 2 * (x1 - x0 + y1 - y0 + 12)


def test_bert_folder_embeds_phrases_by_mean_or_cls(tmp_path) -> None:
    """A save_pretrained BERT folder: mean pooling over the phrase's tokens (padding left out)
    and the [CLS] state equal the model's own hidden states; a CXR-BERT-style folder (a
    masked-LM checkpoint under a model_type transformers does not know) loads its BERT."""
    phrases = ["There is a 1.2 cm nodule in the left upper lung zone.", "left lung nodule"]
    bert = _bert_folder(tmp_path / "bert", _phrase_words(phrases))
    mean = load_phrase_encoder(tmp_path / "bert")
    assert isinstance(mean, BertPhraseEncoder) and mean.pool == "mean" and mean.dim == 32
    got = mean(phrases, batch_size=2)  # one padded batch
    for i, phrase in enumerate(phrases):
        ids = mean.tokenizer(phrase, return_tensors="pt")["input_ids"]
        assert ids[0, 0] == mean.tokenizer.cls_token_id and (ids != 1).all()  # no [UNK]
        with torch.no_grad():
            states = bert(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(got[i], states.mean(0))
        if i == 0:
            cls = BertPhraseEncoder(tmp_path / "bert", pool="cls")(phrases)
            torch.testing.assert_close(cls[0], states[0])

    cxr = tmp_path / "cxr"
    mlm = _bert_folder(cxr, _phrase_words(phrases), masked_lm=True)
    config = json.loads((cxr / "config.json").read_text())
    config.update(model_type="cxr-bert", architectures=["CXRBertModel"],
                  auto_map={"AutoModel": "modeling_cxrbert.CXRBertModel"})  # fmt: skip
    (cxr / "config.json").write_text(json.dumps(config))
    loaded = BertPhraseEncoder(cxr, pool="cls")
    for name, weight in mlm.bert.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], weight)
    with pytest.raises(FileNotFoundError, match="neither a CLIP"):
        load_phrase_encoder(tmp_path)
    with pytest.raises(ValueError, match="text pool"):
        load_phrase_encoder(tmp_path / "bert", pool="max")


# MS-CXR v1.1.0's columns, in its order (PhysioNet MS_CXR_Local_Alignment_v1.1.0.csv, as
# mirrored by the Hugging Face dataset viewer of sunday-hao/mimic)
MS_CXR_COLUMNS = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h",
                  "image_width", "image_height", "split"]  # fmt: skip


def test_cli_ms_cxr_to_corpus_end_to_end(ray_cluster, tmp_path) -> None:
    """`raydiology corpus ms-cxr` then `raydiology ingest` on an MS-CXR-layout CSV over phantom
    PNGs in MIMIC-CXR-JPG's folder layout: each phrase arrives with its box on the lesion at
    the corpus's geometry, in MS-CXR's split. Two films are stored at half the size MS-CXR
    gives (a downsized copy): their boxes are scaled to the files."""
    from raydiology.data.phantom import make_phantom

    rng = np.random.default_rng(0)
    jpg, rows, expected = tmp_path / "mimic-cxr-jpg", [], {}
    splits = ["train", "train", "train", "val", "test", "test"]
    for i, split in enumerate(splits):
        case = make_phantom(rng, size=96, findings={"lung_lesion": True}, boxes=True)
        assert case.boxes
        x0, y0, x1, y1, _, phrase = case.boxes[0]
        dicom = f"{i:08x}-0000"
        path = f"files/p10/p1000000{i}/s5000000{i}/{dicom}.png"
        (jpg / path).parent.mkdir(parents=True)
        Image.fromarray(case.image).save(jpg / path)
        scale = 2.0 if i % 3 == 0 else 1.0  # MS-CXR's pixels are twice the file's
        phrases = [str(phrase)] + (["left lung nodule"] if i == 1 else [])
        for text in phrases:
            rows.append(dict(zip(MS_CXR_COLUMNS, [
                dicom, "Lung Lesion", text, path, scale * float(x0), scale * float(y0),
                scale * float(x1 - x0), scale * float(y1 - y0), 96 * scale, 96 * scale, split,
            ], strict=True)))  # fmt: skip
            expected[text] = (split, [float(v) * 64 / 96 for v in (x0, y0, x1, y1)])
    with (tmp_path / "ms_cxr.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, MS_CXR_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    listed = tmp_path / "lists" / "ms_cxr_files.csv"
    made = CliRunner().invoke(app, ["corpus", "ms-cxr", str(tmp_path / "ms_cxr.csv"),
                                    "--images", str(jpg), "--out", str(listed)])  # fmt: skip
    assert made.exit_code == 0, made.output
    assert "7 phrases on 6 images (test 2, train 3, val 1)" in made.output
    assert "2 image(s) of another size" in made.output
    ingest = CliRunner().invoke(app, ["ingest", str(listed), "--out", str(tmp_path / "corpus"),
                                      "--size", "64"])  # fmt: skip
    assert ingest.exit_code == 0, ingest.output
    assert "ingested 6" in ingest.output

    got = phrase_splits(tmp_path / "corpus", 64)
    assert sum(len(s) for s in got.values()) == 7
    for name, split in got.items():
        for i, phrase in enumerate(split.phrases):
            want_split, box = expected[phrase]
            assert name == want_split
            torch.testing.assert_close(split.boxes[i], torch.tensor(box), atol=0.5, rtol=0)
    bad = CliRunner().invoke(app, ["corpus", "ms-cxr", str(tmp_path / "ms_cxr.csv"), "--images",
                                   str(jpg), "--out", str(listed), "--no-keep-split"])  # fmt: skip
    assert bad.exit_code == 0 and "(unsplit 6)" in bad.output


@pytest.fixture(scope="module")
def world(tmp_path_factory, smoke_export) -> dict[str, Path]:
    from raydiology.data.phantom import write_phantom_corpus

    root = tmp_path_factory.mktemp("ground")
    write_phantom_corpus(root / "corpus", n=60, size=64, boxes=True, finding_prob=0.6,
                         progress=False)  # fmt: skip
    return {
        "corpus": root / "corpus",
        "clip": _clip_export(root / "clip", root / "runs"),
        "mae": smoke_export("hd_mae_cam.yaml", root / "mae", 0, "data.resolution=64"),
        "dino": smoke_export("xr0_dinov2.yaml", root / "dino", 0, "data.resolution=64"),
        "random": smoke_export("hd_mae_cam.yaml", root / "random", 1, "data.resolution=64"),
    }


def test_cli_grounds_phrases_for_every_export(world, tmp_path) -> None:
    splits = phrase_splits(world["corpus"], 64)
    assert len(splits["train"]) > 10 and all("nodule" in p for p in splits["train"].phrases)
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, [
        "evaluate", "ground", f"mae={world['mae']}", f"dino={world['dino']}",
        f"random={world['random']}", "--corpus", str(world["corpus"]), "--text",
        str(world["clip"]), "--out", str(out), "--max-steps", "30", "--eval-every", "15",
        "--device", "cpu",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "ground.json").read_text())
    results = payload["results"] if isinstance(payload, dict) else payload
    assert [r["encoder"] for r in results] == ["mae", "dino", "random"]
    for r in results:
        assert 0 <= r["acc50"] <= 1 and 0 <= r["mean_iou"] <= 1 and r["steps"] == 30
        assert r["n"]["test"] == len(splits["test"])
    assert "acc@IoU>0.5" in (out / "ground.md").read_text()
    assert (out / "ground.png").stat().st_size > 1000


def test_cli_grounds_phrases_with_a_local_bert(world, tmp_path) -> None:
    """`--text-encoder` takes a Hugging Face BERT folder as well as a CLIP export."""
    splits = phrase_splits(world["corpus"], 64)
    bert = tmp_path / "bert"
    _bert_folder(bert, _phrase_words([p for s in splits.values() for p in s.phrases]))
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, [
        "evaluate", "ground", f"mae={world['mae']}", "--corpus", str(world["corpus"]),
        "--text-encoder", str(bert), "--text-pool", "cls", "--out", str(out),
        "--max-steps", "20", "--eval-every", "10", "--device", "cpu",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "ground.json").read_text())
    (row,) = payload["results"] if isinstance(payload, dict) else payload
    assert row["text"] == str(bert) and row["text_pool"] == "cls" and row["steps"] == 20
    assert 0 <= row["acc50"] <= 1 and row["n"]["test"] == len(splits["test"])
    bad = CliRunner().invoke(app, ["evaluate", "ground", f"mae={world['mae']}", "--corpus",
                                   str(world["corpus"]), "--text-encoder", str(tmp_path)])  # fmt: skip
    assert bad.exit_code == 2 and "neither a CLIP" in bad.output

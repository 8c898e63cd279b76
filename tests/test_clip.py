"""Image-report CLIP: the loss against a hand computation, the temperature, retrieval metrics
against brute force, text towers from a local folder, the paper shape on the meta device,
the export reloaded without the folders it was built from, and one smoke CLIP run on phantoms
(2 DeepSpeed workers) whose export reloads exactly and whose held-out retrieval, evaluated
by `raydiology evaluate clip`, beats random."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from raydiology.config import load_experiment
from raydiology.config_base import ConfigError, from_dict
from raydiology.evaluation.clip_retrieval import (
    DEFAULT_PROMPTS,
    random_mrr,
    random_recall_at,
    ranks,
    retrieval_metrics,
    same_text,
)
from raydiology.models.clip import ImageReportClipConfig, build_image_report_clip
from raydiology.objectives.clip import ClipObjectiveConfig, build_clip, clip_loss
from raydiology.registry import build_model

EXPERIMENT = (
    Path(__file__).resolve().parents[1] / "experiments" / "mambaxray_vl" / "stage2_clip.yaml"
)
BIO_CLINICAL_BERT_NO_POOLER = 107_719_680  # 108,310,272 with the pooler, which CLIP drops


def tiny(**section):
    cfg = from_dict(ImageReportClipConfig, {"flavor": "tiny", **section}, "model")
    torch.manual_seed(0)
    return build_image_report_clip(cfg, image_size=64, in_chans=1)


def test_symmetric_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    image, text = torch.randn(3, 5), torch.randn(3, 5)
    log_scale = torch.tensor(math.log(10.0))
    loss, logits = clip_loss(image, text, log_scale)
    cos = [[float(torch.dot(image[i], text[j]) / (image[i].norm() * text[j].norm()))
            for j in range(3)] for i in range(3)]  # fmt: skip
    total = 0.0
    for i in range(3):
        row = [10 * cos[i][j] for j in range(3)]  # image i against every report
        col = [10 * cos[j][i] for j in range(3)]  # report i against every image
        total += -row[i] + math.log(sum(math.exp(v) for v in row))
        total += -col[i] + math.log(sum(math.exp(v) for v in col))
    assert loss.item() == pytest.approx(total / 6, rel=1e-5)
    assert logits[1, 2].item() == pytest.approx(10 * cos[1][2], rel=1e-5)


def test_logit_scale_starts_at_one_over_0_07_and_is_clamped_at_100():
    model = tiny()
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    feats = torch.eye(2)
    _, logits = clip_loss(feats, feats, torch.tensor(10.0))  # e^10 > 100
    assert logits[0, 0].item() == pytest.approx(100.0)


def test_objective_trains_both_towers_and_freezing_stops_them():
    model = tiny()
    objective = build_clip(ClipObjectiveConfig(), model=model)
    batch = {"image": torch.randn(3, 1, 64, 64), "report": ["The heart is enlarged.",
             "No pneumothorax.", "There is a small right pleural effusion."]}  # fmt: skip
    out = objective(batch)
    assert set(out) == {"loss", "logit_scale", "i2t_acc"}
    out["loss"].backward()
    for part in (model.encoder, model.text, model.image_proj, model.text_proj):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert model.logit_scale.grad is not None
    frozen = tiny(image={"freeze": True}, text={"freeze": True})
    assert not any(p.requires_grad for p in frozen.encoder.parameters())
    assert not any(p.requires_grad for p in frozen.text.parameters())
    assert all(p.requires_grad for p in frozen.text_proj.parameters())
    with pytest.raises(KeyError, match="report"):
        objective({"image": batch["image"]})


def test_report_features_come_from_the_sep_token():
    model = tiny().eval()
    ids, mask, sep = model.tokenizer(["No pneumothorax.", "The heart is enlarged."], 128)
    assert (ids[torch.arange(2), sep] == model.tokenizer.sep_id).all()
    assert (ids[:, 0] == model.tokenizer.cls_id).all()
    with torch.no_grad():
        hidden = model.text(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = model.text_proj(hidden[torch.arange(2), sep])
        got = model.encode_reports(["No pneumothorax.", "The heart is enlarged."])
    assert torch.allclose(got, expected, atol=1e-6)
    long_ids, _, _ = model.tokenizer(["word " * 500], 16)
    assert long_ids.shape == (1, 16) and long_ids[0, -1] == model.tokenizer.sep_id


def test_image_tower_can_be_a_tiny_vision_mamba():
    model = tiny(image={"model": {"name": "vision_mamba", "flavor": "tiny"}})
    feats = model.encode_images(torch.randn(2, 1, 64, 64))
    assert feats.shape == (2, 64)
    views = model.encode_images(torch.randn(2, 3, 1, 64, 64))  # several views per study
    assert views.shape == (2, 64)


def brute_force_ranks(sim: np.ndarray, pos: np.ndarray) -> list[int]:
    out = []
    for i in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda j: -sim[i, j])
        out.append(next(r + 1 for r, j in enumerate(order) if pos[i, j]))
    return out


def test_retrieval_metrics_match_brute_force():
    rng = np.random.default_rng(0)
    texts = [f"report {rng.integers(12)}" for _ in range(40)]  # duplicates on purpose
    sim = rng.standard_normal((40, 40)).astype(np.float32)  # no ties
    pos = same_text(texts, texts)
    expected = brute_force_ranks(sim, pos)
    assert ranks(torch.from_numpy(sim), pos).tolist() == expected
    metrics = retrieval_metrics(torch.from_numpy(sim), pos)
    for k in (1, 5, 10):
        assert metrics[f"R@{k}"] == pytest.approx(np.mean([r <= k for r in expected]))
    assert metrics["MRR"] == pytest.approx(np.mean([1 / r for r in expected]))
    # random baseline: with one relevant item among n it is k/n; duplicates raise it
    assert random_recall_at(np.eye(20, dtype=bool), 5) == pytest.approx(5 / 20)
    shuffled = [brute_force_ranks(rng.standard_normal((40, 40)), pos) for _ in range(200)]
    simulated = np.mean([[r <= 5 for r in s] for s in shuffled])
    assert random_recall_at(pos, 5) == pytest.approx(simulated, abs=0.03)
    simulated_mrr = np.mean([[1 / r for r in s] for s in shuffled])
    assert random_mrr(pos) == pytest.approx(simulated_mrr, abs=0.01)
    assert random_mrr(np.eye(4, dtype=bool)) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)


def test_text_tower_and_tokenizer_load_from_a_local_save_pretrained_folder(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "heart", "is", "enlarged", "."]
    folder = tmp_path / "bert"
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)
    torch.manual_seed(1)
    bert = BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64),
                     add_pooling_layer=False)  # fmt: skip
    bert.save_pretrained(folder)
    model = tiny(text={"path": str(folder)})
    assert model.text_proj.in_features == 32
    assert torch.equal(
        model.text.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight
    )
    ids, _, _ = model.tokenizer(["The heart is enlarged."], 128)
    assert ids[0].tolist() == [2, 5, 6, 7, 8, 9, 3]  # [CLS] the heart is enlarged . [SEP]
    assert model.encode_reports(["The heart is enlarged."]).shape == (1, 64)
    with pytest.raises(ConfigError) as err:
        tiny(text={"path": str(tmp_path / "missing")})
    assert err.value.key == "model.text.path"


def test_paper_shape_on_the_meta_device():
    from raydiology.models import count_parameters

    exp = load_experiment(EXPERIMENT)
    with torch.device("meta"):
        model = build_model(exp.model, exp.data)
    counts = count_parameters(model)
    assert counts["text"] == BIO_CLINICAL_BERT_NO_POOLER
    assert (model.image_proj.in_features, model.image_proj.out_features) == (768, 2048)
    assert (model.text_proj.in_features, model.text_proj.out_features) == (768, 2048)
    assert model.text.config.vocab_size == 28996 and model.max_length == 128
    assert exp.train.optimizer.lr == 1e-4 and exp.train.schedule.min_lr == 1e-6
    assert exp.train.precision == "bf16"


def tiny_clip_experiment(out: Path, *sets: str):
    """The smoke experiment with a 64-px tiny HD-MAE image tower (no Ray, no training)."""
    overrides = [f"output.dir={out}", "data.resolution=64", "data.phantom.size=64",
                 "model.image.timm=null", "model.image.model={name: hd_mae, flavor: tiny}", *sets]  # fmt: skip
    return load_experiment(EXPERIMENT, profile="clip_smoke", overrides=overrides)


def export_untrained(exp, folder: Path):
    """What the training loop writes at its last checkpoint, for an untrained objective."""
    from raydiology.registry import build_objective
    from raydiology.train.export import export_encoder

    torch.manual_seed(0)
    objective = build_objective(exp.objective, build_model(exp.model, exp.data)).eval()
    export_encoder(objective, folder, exp=exp, corpus_sha256=None, step=0)
    objective.export_extra(folder, write=True, gather=False)
    return objective


def same_embeddings(a, b, channels: int, size: int) -> None:
    images = torch.randn(3, channels, size, size)
    reports = ["The heart is enlarged.", "No pneumothorax.", "Support devices in place."]
    with torch.no_grad():
        assert torch.equal(a.encode_images(images), b.encode_images(images))
        assert torch.equal(a.encode_reports(reports), b.encode_reports(reports))


def test_export_reloads_without_the_folders_it_was_built_from(tmp_path):
    """A text tower from a local BERT folder, and an image tower taken from another export:
    `load_clip` needs neither once the CLIP is exported (no pickle, safetensors only)."""
    import shutil

    from transformers import BertConfig, BertModel, BertTokenizerFast

    from raydiology.models.clip import load_clip

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "heart", "is", "enlarged", "."]
    bert = tmp_path / "bert"
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(bert)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64),
              add_pooling_layer=False).save_pretrained(bert)  # fmt: skip
    first = tmp_path / "first"
    exp = tiny_clip_experiment(tmp_path, f"model.text.path={bert}", "model.text.tokenizer=null")
    a = export_untrained(exp, first)
    # a second CLIP whose image tower starts from the first one's export
    second = tmp_path / "second"
    b = export_untrained(tiny_clip_experiment(tmp_path, f"model.image.path={first}"), second)
    shutil.rmtree(bert)
    loaded = load_clip(first)
    same_embeddings(loaded, a.model, channels=3, size=64)
    assert loaded.tokenizer(["the heart is enlarged ."], 16)[0][0].tolist() == [2, 5, 6, 7, 8, 9, 3]
    assert loaded.text.config.hidden_size == 32 and loaded.text_proj.in_features == 32
    shutil.rmtree(first)
    loaded = load_clip(second)
    same_embeddings(loaded, b.model, channels=3, size=64)
    assert loaded.clip_spec["image"] == {"model": {"name": "hd_mae", "flavor": "tiny"}}
    assert sorted(p.suffix for p in second.glob("*.*")) == [".json", ".json", ".safetensors",
                                                            ".safetensors"]  # fmt: skip
    assert not [f for f in second.rglob("*") if f.suffix in (".bin", ".pt", ".pth", ".pkl")]
    with pytest.raises(FileNotFoundError, match=r"clip\.json"):
        load_clip(tmp_path)


@pytest.fixture(scope="module")
def smoke_run(ray_cluster, tmp_path_factory):
    """One smoke CLIP run on phantoms (2 DeepSpeed workers) shared by the tests below, with
    its trained objective read back from the DeepSpeed checkpoint."""
    from rich.console import Console

    from raydiology.registry import build_objective
    from raydiology.train.launch import run_experiment
    from raydiology.train.loop import CHECKPOINT_TAG
    from raydiology.train.safe_load import weights_only_load

    out = tmp_path_factory.mktemp("clip_smoke")
    exp = load_experiment(EXPERIMENT, profile="clip_smoke", overrides=[f"output.dir={out}"])
    result = run_experiment(exp, console=Console(quiet=True))
    # WordPiece training is not deterministic (token ids differ between two trainings), so
    # the model is rebuilt with the tokenizer the run trained, saved in its export
    tokenizer = result.run_dir / "export" / "tokenizer"
    same = load_experiment(EXPERIMENT, profile="clip_smoke",
                           overrides=[f"output.dir={out}", f"model.text.tokenizer.path={tokenizer}"])  # fmt: skip
    objective = build_objective(same.objective, build_model(same.model, same.data))
    states = weights_only_load(
        str(Path(str(result.checkpoint)) / CHECKPOINT_TAG / "mp_rank_00_model_states.pt")
    )
    objective.load_state_dict(states["module"])
    return exp, result, objective.eval()


@pytest.mark.ray
def test_smoke_clip_learns_and_its_export_reloads_the_whole_model(smoke_run):
    import raydiology
    from raydiology.models.clip import load_clip
    from raydiology.train.launch import read_metrics

    exp, result, objective = smoke_run
    rows = read_metrics(result.run_dir)
    losses = [r["loss"] for r in rows]
    assert rows[-1]["step"] == exp.train.max_steps
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    # the exported encoder is the trained image tower
    encoder = raydiology.load_encoder(result.run_dir / "export")
    images = torch.randn(2, exp.data.channels, 128, 128)
    with torch.no_grad():
        assert torch.allclose(encoder(images), objective.encoder(images), atol=1e-5)
    # and the export holds the whole CLIP: text tower, projections, temperature, tokenizer
    model = load_clip(result.run_dir)
    same_embeddings(model, objective.model, channels=exp.data.channels, size=128)
    assert torch.equal(model.logit_scale, objective.model.logit_scale)
    assert model.tokenizer.report is not None  # the trained WordPiece, read back from disk
    assert model.clip_spec["image"] == {"timm": "resnet10t"}


@pytest.mark.ray
def test_evaluate_clip_command_on_the_smoke_run_beats_random(smoke_run):
    import json

    from typer.testing import CliRunner

    from raydiology.cli import app

    exp, result, _ = smoke_run
    cli = CliRunner().invoke(
        app,
        ["evaluate", "clip", str(result.run_dir), "--split", "val,test"],
        catch_exceptions=False,
    )
    assert cli.exit_code == 0, cli.output
    assert "image -> report" in cli.output and "random ranking" in cli.output
    metrics = json.loads((result.run_dir / "eval" / "clip.json").read_text())
    picture = result.run_dir / "eval" / "clip_retrieval.png"
    assert picture.stat().st_size > 10_000 and metrics["picture"] == picture.name
    assert metrics["corpus"].endswith(f"phantom-n{exp.data.phantom.images}-s128-seed0-p0.5")
    print("held-out CLIP retrieval:", metrics)
    rand = metrics["random"]
    assert metrics["n"] >= 40 and "warning" not in metrics
    # 80 CPU steps from random towers align what is most visible (support devices: tubes and
    # lines) but not yet the subtler findings, and nearly every held-out report is unique
    # (its wording varies beyond what an image shows). With rows shuffled and lr 1e-3 (the
    # profile) held-out retrieval measured R@10 2.3-3.0x and MRR 2.1-2.3x random over three
    # seeds; before, 1.2-2.0x and 1.2-1.8x, and a 1.3x bound was flaky. Zero-shot prompts
    # are not asserted at this budget.
    for metric in ("R@10", "MRR"):
        both = (metrics["image_to_report"][metric] + metrics["report_to_image"][metric]) / 2
        assert both > 1.6 * rand[metric], (metric, metrics)
    auroc = metrics["zero_shot_auroc"]
    assert set(auroc) == set(DEFAULT_PROMPTS) and all(0 <= v <= 1 for v in auroc.values())

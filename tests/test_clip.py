"""Image-report CLIP: the loss against a hand computation, the temperature, retrieval metrics
against brute force, text towers from a local folder, the paper shape on the meta device,
and a smoke CLIP run on phantoms (2 DeepSpeed workers) whose held-out retrieval beats random."""

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


@pytest.mark.ray
def test_smoke_clip_on_phantoms_learns_and_retrieves_held_out_reports(ray_cluster, tmp_path):
    from rich.console import Console

    from raydiology.evaluation.clip_retrieval import evaluate_clip
    from raydiology.registry import build_objective
    from raydiology.train.launch import read_metrics, resolve_corpus, run_experiment
    from raydiology.train.loop import CHECKPOINT_TAG
    from raydiology.train.safe_load import weights_only_load

    exp = load_experiment(EXPERIMENT, profile="clip_smoke", overrides=[f"output.dir={tmp_path}"])
    result = run_experiment(exp, console=Console(quiet=True))
    rows = read_metrics(result.run_dir)
    losses = [r["loss"] for r in rows]
    assert rows[-1]["step"] == exp.train.max_steps
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses

    objective = build_objective(exp.objective, build_model(exp.model, exp.data))
    states = weights_only_load(
        str(Path(str(result.checkpoint)) / CHECKPOINT_TAG / "mp_rank_00_model_states.pt")
    )
    objective.load_state_dict(states["module"])
    corpus = resolve_corpus(exp, console=Console(quiet=True))
    metrics = evaluate_clip(objective.model, corpus, exp.data, split=("val", "test"))
    print("held-out CLIP retrieval:", metrics)
    rand = metrics["random"]
    assert metrics["n"] >= 40
    # 80 CPU steps from random towers align what is most visible (support devices: tubes and
    # lines) but not yet the subtler findings, and nearly every held-out report is unique:
    # retrieval beats random ranking by a modest margin (measured: R@10 1.7-2.0x, MRR
    # 1.5-1.8x random over three runs). Zero-shot prompts are not asserted at this budget.
    for metric in ("R@10", "MRR"):
        both = (metrics["image_to_report"][metric] + metrics["report_to_image"][metric]) / 2
        assert both > 1.3 * rand[metric], (metric, metrics)
    auroc = metrics["zero_shot_auroc"]
    assert set(auroc) == set(DEFAULT_PROMPTS) and all(0 <= v <= 1 for v in auroc.values())
    # and the exported encoder is the trained image tower
    import raydiology

    encoder = raydiology.load_encoder(result.run_dir / "export")
    images = torch.randn(2, exp.data.channels, 128, 128)
    with torch.no_grad():
        assert torch.allclose(encoder(images), objective.encoder.eval()(images), atol=1e-5)

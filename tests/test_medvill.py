"""MedViLL: the five attention masks cell by cell, the joint sequence (positions, token
types, kept visual positions), BERT masking rules, negatives with differing labels, the paper
shape on the meta device, and a smoke pretraining on phantoms (2 DeepSpeed workers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raydiology.config import load_experiment
from raydiology.config_base import ConfigError, from_dict
from raydiology.data.phantom import LABEL_COLUMNS
from raydiology.models.medvill import (
    IMAGE,
    MedViLLConfig,
    attention_mask,
    build_medvill,
)
from raydiology.objectives.medvill import (
    MedViLLObjectiveConfig,
    build_medvill_objective,
    choose_negatives,
    mask_tokens,
)
from raydiology.registry import build_model

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "medvill.yaml"

# [CLS] v [SEP] w1 w2 [SEP] pad: image block 0-2, text 3-5, pad 6
SEGMENTS = torch.tensor([[0, 0, 0, 1, 1, 1, -1]])
ALL = [1, 1, 1, 1, 1, 1, 0]  # every non-pad column (also what pad rows get)
EXPECTED = {
    "bi": [ALL] * 7,
    "s2s": [
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
        ALL,
    ],
    "bar": [
        ALL,
        ALL,
        ALL,
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0],
        ALL,
    ],
    "noncross": [
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1, 0],
        ALL,
    ],
}


@pytest.mark.parametrize("scheme", sorted(EXPECTED))
def test_mask_scheme_cell_by_cell(scheme):
    mask = attention_mask(scheme, SEGMENTS)
    assert mask.dtype == torch.bool and mask.shape == (1, 7, 7)
    assert mask[0].int().tolist() == EXPECTED[scheme]


def test_mixed_mask_is_bi_or_s2s_per_sample_at_the_given_rate():
    segments = SEGMENTS.expand(4000, -1)
    mask = attention_mask(
        "mixed", segments, bi_prob=0.25, generator=torch.Generator().manual_seed(0)
    )
    bi = torch.tensor(EXPECTED["bi"], dtype=torch.bool)
    s2s = torch.tensor(EXPECTED["s2s"], dtype=torch.bool)
    is_bi = (mask == bi).flatten(1).all(dim=1)
    is_s2s = (mask == s2s).flatten(1).all(dim=1)
    assert bool((is_bi | is_s2s).all())
    assert is_bi.float().mean().item() == pytest.approx(0.25, abs=0.03)


def tiny(**section):
    cfg = from_dict(MedViLLConfig, {"flavor": "tiny", "max_text_tokens": 32, **section}, "model")
    torch.manual_seed(0)
    return build_medvill(cfg, image_size=128, in_chans=1)


def test_sequence_positions_token_types_and_kept_visual_positions():
    model = tiny().eval()
    tok = model.tokenizer
    text = tok.encode("The heart is enlarged.")
    feats, pos = model.visual_tokens(torch.randn(2, 1, 128, 128))
    assert feats.shape == (2, 16, 512) and pos[0].tolist() == list(range(16))  # 4x4 grid
    kept_feats, kept = model.visual_tokens(
        torch.randn(2, 1, 128, 128), keep=180 / 256, generator=torch.Generator().manual_seed(0)
    )
    assert kept.shape == (2, 11) and (kept.diff(dim=1) > 0).all()  # a subset, in grid order
    embeds, segments, ids = model.assemble(kept_feats, kept, [text, text[:2]])
    n = 11
    assert ids[0, 0] == tok.cls_id and ids[0, n + 1] == tok.sep_id
    assert ids[0, n + 2 : n + 2 + len(text)].tolist() == text
    assert ids[0, n + 2 + len(text)] == tok.sep_id and ids[1, -1] == tok.pad_id
    assert (segments[:, : n + 2] == IMAGE).all() and segments[1, -1] == -1
    # the embedding is word/visual + position + type, normalised; positions as the official
    # MedViLL_origin.py: [CLS] 0, visuals their grid index, image [SEP] 0, text from 0
    emb = model.bert.embeddings
    positions = torch.cat([torch.tensor([0]), kept[0], torch.tensor([0])])
    visual = torch.cat([emb.word_embeddings.weight[tok.cls_id][None],
                        model.visual_proj(kept_feats[0]),
                        emb.word_embeddings.weight[tok.sep_id][None]])  # fmt: skip
    expected = emb.LayerNorm(
        visual + emb.position_embeddings(positions) + emb.token_type_embeddings.weight[0]
    )
    assert torch.allclose(embeds[0, : n + 2], expected, atol=1e-5)
    text_pos = torch.arange(len(text) + 1)
    words = emb.word_embeddings(ids[0, n + 2 : n + 3 + len(text)])
    expected_text = emb.LayerNorm(
        words + emb.position_embeddings(text_pos) + emb.token_type_embeddings.weight[1]
    )
    assert torch.allclose(embeds[0, n + 2 : n + 3 + len(text)], expected_text, atol=1e-5)


def test_noncross_text_cls_and_words_start_at_position_0_and_pool_by_product():
    """The official non-cross model embeds the text [CLS] alone (position 0) and the words
    from 0 again, and pools by multiplying the image and text [CLS] states."""
    model = tiny(attention="noncross").eval()
    tok = model.tokenizer
    text = tok.encode("No pneumothorax.")
    feats, pos = model.visual_tokens(torch.randn(1, 1, 128, 128))
    embeds, segments, ids = model.assemble(feats, pos, [text])
    start = 16 + 2  # [CLS] + 16 visuals + [SEP]
    assert (
        ids[0, start] == tok.cls_id and ids[0, start + 1 : start + 1 + len(text)].tolist() == text
    )
    emb = model.bert.embeddings
    row = ids[0, start : start + len(text) + 2]  # text [CLS], words, [SEP]
    text_pos = torch.tensor([0, *range(len(text) + 1)])
    expected = emb.LayerNorm(emb.word_embeddings(row) + emb.position_embeddings(text_pos)
                             + emb.token_type_embeddings.weight[1])  # fmt: skip
    assert torch.allclose(embeds[0, start : start + len(text) + 2], expected, atol=1e-5)
    with torch.no_grad():
        hidden, segments, _ = model.joint(feats, pos, [text])
        pooled = model.pooled(hidden, segments)
    assert torch.allclose(pooled, hidden[:, 0] * hidden[:, start])


def test_mask_reaches_the_encoder_text_cannot_see_later_text_under_s2s():
    model = tiny(attention="s2s").eval()
    text = model.tokenizer.encode("The heart is enlarged. No pneumothorax.")
    images = torch.randn(1, 1, 128, 128)
    changed = [*text[:-1], model.tokenizer.encode("effusion")[0]]
    with torch.no_grad():
        a, seg, _ = model(images, [text])
        b, _, _ = model(images, [changed])
    last = int((seg[0] == 1).nonzero()[-2])  # the last word (before [SEP]) differs
    assert torch.allclose(a[0, :last], b[0, :last], atol=1e-5)  # nothing earlier sees it
    assert not torch.allclose(a[0, last], b[0, last])
    bar = tiny(attention="bar").eval()
    with torch.no_grad():
        a, _, _ = bar(images, [text])
        b, _, _ = bar(images, [changed])
    assert not torch.allclose(a[0, 0], b[0, 0])  # BAR: the image rows read the whole text


def test_mlm_masking_rules():
    g = torch.Generator().manual_seed(0)
    special = {0, 1, 2, 3}
    rows = [[2, *range(10, 60), 3] for _ in range(200)]
    inputs, targets = mask_tokens(rows, prob=0.15, mask_id=4, vocab_size=100, special=special,
                                  generator=g)  # fmt: skip
    chosen = mask_kept = mask_random = mask_token = 0
    for row, x, y in zip(rows, inputs, targets, strict=True):
        assert y[0] == -100 and y[-1] == -100 and x[0] == 2 and x[-1] == 3  # specials untouched
        for t, xi, yi in zip(row, x, y, strict=True):
            if yi == -100:
                assert xi == t
                continue
            chosen += 1
            assert yi == t
            mask_token += xi == 4
            mask_kept += xi == t
            mask_random += xi not in (4, t)
    total = sum(len(r) - 2 for r in rows)
    assert chosen / total == pytest.approx(0.15, abs=0.01)
    assert mask_token / chosen == pytest.approx(0.8, abs=0.03)
    assert (mask_kept + mask_random) / chosen == pytest.approx(0.2, abs=0.03)
    assert mask_random / chosen == pytest.approx(0.1 * 99 / 100, abs=0.025)
    # at least one per sequence, even when the draw picks none
    short = [[2, 10, 3]] * 50
    _, targets = mask_tokens(short, prob=0.01, mask_id=4, vocab_size=100, special=special,
                             generator=g)  # fmt: skip
    assert all(sum(t != -100 for t in y) == 1 for y in targets)


def test_negatives_come_from_reports_with_different_labels():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0]] * 250, dtype=torch.float32)
    partner, matched = choose_negatives(labels, prob=0.5, generator=g)
    negatives = ~matched
    assert negatives.float().mean().item() == pytest.approx(0.5, abs=0.04)
    assert (partner[matched] == torch.arange(1000)[matched]).all()
    assert (labels[partner[negatives]] != labels[negatives]).any(dim=1).all()
    same = torch.ones(6, 3)
    partner, matched = choose_negatives(same, prob=1.0, generator=g)
    assert matched.all() and partner.tolist() == list(range(6))  # no partner with other labels


def test_objective_losses_and_gradients():
    model = tiny()
    objective = build_medvill_objective(MedViLLObjectiveConfig(), model=model)
    reports = ["The heart is enlarged.", "No pneumothorax.", "The lungs are clear.",
               "There is a small left pleural effusion."]  # fmt: skip
    batch = {"image": torch.randn(4, 1, 128, 128), "report": reports}
    for i, c in enumerate(LABEL_COLUMNS):
        batch[f"label:{c}"] = torch.tensor([float((i + j) % 2) for j in range(4)])
    out = objective(batch, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "mlm", "itm", "itm_acc", "negatives"}
    assert out["loss"].item() == pytest.approx(out["mlm"].item() + out["itm"].item(), rel=1e-5)
    out["loss"].backward()
    for part in (model.encoder, model.visual_proj, model.bert, model.itm_head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    with pytest.raises(KeyError, match="report"):
        objective({"image": batch["image"]})


def test_every_parameter_gets_a_gradient_even_with_no_matched_pair():
    """Data-parallel ranks must reduce the same gradients: a micro-batch of negatives only
    (no MLM target) still reaches the MLM head, with a zero loss."""
    model = tiny()
    objective = build_medvill_objective(MedViLLObjectiveConfig(negative_prob=1.0), model=model)
    reports = ["The heart is enlarged.", "No pneumothorax.", "The lungs are clear.",
               "There is a small left pleural effusion."]  # fmt: skip
    batch = {"image": torch.randn(4, 1, 128, 128), "report": reports}
    for i, c in enumerate(LABEL_COLUMNS):
        batch[f"label:{c}"] = torch.tensor([float(j == i % 4) for j in range(4)])  # all differ
    out = objective(batch, generator=torch.Generator().manual_seed(0))
    assert out["negatives"].item() == 1.0 and out["mlm"].item() == 0.0
    out["loss"].backward()
    assert [n for n, p in objective.named_parameters() if p.requires_grad and p.grad is None] == []


def test_frozen_trunk_stages_get_no_gradient_and_stay_out_of_the_optimizer():
    """Default: the stem and layer1 frozen (the official intent), layer2-4 trained."""
    from raydiology.train.schedules import param_groups

    model = tiny()  # freeze_trunk_stages 2 by default
    objective = build_medvill_objective(MedViLLObjectiveConfig(), model=model)
    reports = ["The heart is enlarged.", "No pneumothorax.", "The lungs are clear.",
               "There is a small left pleural effusion."]  # fmt: skip
    batch = {"image": torch.randn(4, 1, 128, 128), "report": reports}
    for i, c in enumerate(LABEL_COLUMNS):
        batch[f"label:{c}"] = torch.tensor([float((i + j) % 2) for j in range(4)])
    objective(batch, generator=torch.Generator().manual_seed(0))["loss"].backward()
    frozen = {n for n, p in objective.named_parameters() if not p.requires_grad}
    body = "model.encoder.body."
    assert frozen == {n for n, _ in objective.named_parameters()
                      if n.startswith((body + "conv1", body + "bn1", body + "layer1."))}  # fmt: skip
    assert frozen  # resnet10t's stem and layer1 have weights
    params = dict(objective.named_parameters())
    assert all(params[n].grad is None for n in frozen)
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in params.items() if n.startswith(body + "layer2."))  # fmt: skip
    in_optimizer = {id(p) for g in param_groups(objective, 0.01) for p in g["params"]}
    assert {n for n, p in params.items() if id(p) not in in_optimizer} == frozen
    # 0: the whole trunk trains; 5: all of it frozen; a non-ResNet trunk can only use 0
    assert all(p.requires_grad for p in tiny(freeze_trunk_stages=0).parameters())
    assert not any(p.requires_grad for p in tiny(freeze_trunk_stages=5).encoder.parameters())
    with pytest.raises(ConfigError) as err:
        from_dict(MedViLLConfig, {"freeze_trunk_stages": 6}, "model")
    assert err.value.key == "model.freeze_trunk_stages"
    with pytest.raises(ConfigError) as err:
        tiny(trunk="efficientnet_b0")
    assert err.value.key == "model.freeze_trunk_stages"


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError) as err:
        from_dict(MedViLLConfig, {"attention": "causal"}, "model")
    assert err.value.key == "model.attention"
    with pytest.raises(ConfigError) as err:
        build_medvill(MedViLLConfig(flavor="tiny"), image_size=100, in_chans=1)
    assert err.value.key == "data.resolution"


def test_paper_shape_on_the_meta_device():
    from raydiology.models import count_parameters

    exp = load_experiment(EXPERIMENT)
    with torch.device("meta"):
        model = build_model(exp.model, exp.data)
    counts = count_parameters(model)
    assert counts["encoder"] == 23_508_032  # ResNet-50 without its classifier
    assert counts["bert"] == 108_891_648  # bert-base-uncased without its pooler
    assert model.grid == 256 and model.visual_proj.in_features == 2048
    assert round(exp.model.config.visual_keep * 256) == 180
    assert exp.train.optimizer.lr == 1e-5 and exp.train.schedule.name == "constant"
    # the official effective batch (configs/pretrain.yaml): 32 x 4 accumulation steps = 128
    assert exp.train.micro_batch_size == 32 and exp.train.grad_accum == 4
    assert exp.scaling.num_workers == 1


# The matching head sits at chance until MLM has grounded the report words in the image:
# measured on phantoms, itm_acc leaves 0.5 after 450-900 steps whatever the learning rate
# (3e-4 to 2e-3), batch (16, 32), dropout, mask rate, resolution (64 to 128 px), a
# label-pretrained trunk or corpus size (130 to 1922 training images); with the MLM loss off
# it never does. When it leaves varies from run to run with the data order: on 2026-12-05 it
# left at step ~800 in one run, was still at chance at step 1200 in four others and at step
# 2400 in one CI run (of three). A CI test cannot wait for it, so this one checks what every
# run shows (the loss and MLM fall, the matching loss stays near ln 2 = 0.693 and finite)
# and that held-out retrieval runs on the Ray-trained export; retrieval beating random is
# asserted in tests/test_medvill_eval.py on a model trained with an added ranking signal.
RETRIEVAL_RUN = ["train.schedule.name=constant", "train.log_every=50", "data.resolution=64",
                 "data.phantom.images=1000", "train.max_steps=400", "train.checkpoint_every=400"]  # fmt: skip


@pytest.mark.ray
def test_smoke_pretraining_learns_and_evaluates_held_out_retrieval(ray_cluster, tmp_path):
    import math

    from rich.console import Console

    from raydiology.evaluation.medvill_eval import retrieval_run
    from raydiology.train.launch import read_metrics, resolve_corpus, run_experiment

    exp = load_experiment(EXPERIMENT, profile="medvill_smoke",
                          overrides=[f"output.dir={tmp_path}", *RETRIEVAL_RUN])  # fmt: skip
    result = run_experiment(exp, console=Console(quiet=True))
    rows = read_metrics(result.run_dir)
    assert rows[-1]["step"] == 400
    first, last = rows[:2], rows[-2:]
    for key in ("loss", "mlm"):
        before, after = (sum(r[key] for r in part) / 2 for part in (first, last))
        assert after < 0.9 * before, (key, [r[key] for r in rows])
    assert all(math.isfinite(r["itm"]) and r["itm"] < 1.0 for r in rows), [r["itm"] for r in rows]
    assert all(0.0 <= r["itm_acc"] <= 1.0 for r in rows)

    # Relevance by labels: the matching head only ever learns to tell apart reports whose
    # diagnosis labels differ (its negatives); the phantom wording varies within a label set.
    corpus = resolve_corpus(exp, console=Console(quiet=True))
    metrics = retrieval_run(result.run_dir, corpus, split="test", relevance="labels")
    print("held-out MedViLL retrieval (relevance: same labels):",
          {d: metrics[d] for d in ("n", "candidates", "image_to_report", "report_to_image")},
          "random:", metrics["random"])  # fmt: skip
    assert metrics["candidates"] >= 80 and metrics["relevance"] == "labels"
    for direction in ("image_to_report", "report_to_image"):
        got, chance = metrics[direction], metrics["random"][direction]
        assert 0.0 < got["MRR"] <= 1.0 and 0.0 < chance["MRR"] < 1.0, (direction, got, chance)

"""MedViLL fine-tunes of the pretraining heads: retrieval pairs (positives + label-differing
negatives), the S2S masking of the official generation fine-tune (the closing [SEP] half the
time), both objectives end to end on a tiny model, export + retrieval evaluation, and the
paper-sized experiment files on the meta device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raydiology.config import load_experiment
from raydiology.data.phantom import LABEL_COLUMNS
from raydiology.models.medvill import attention_mask
from raydiology.objectives.medvill_finetune import (
    MedViLLRetrieval,
    MedViLLS2S,
    RetrievalConfig,
    s2s_masking,
)
from raydiology.registry import build_model, build_objective

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
RETRIEVAL = EXPERIMENTS / "medvill_retrieval.yaml"
GENERATION = EXPERIMENTS / "medvill_generation.yaml"
REPORTS = ["The heart is enlarged.", "No pneumothorax.", "The lungs are clear.",
           "There is a small left pleural effusion."]  # fmt: skip


def smoke(path: Path, *sets: str):
    return load_experiment(path, profile="medvill_smoke",
                           overrides=["model.pretrained=null", "data.resolution=64", *sets])  # fmt: skip


def batch_of(n: int, channels: int) -> dict:
    g = torch.Generator().manual_seed(0)
    batch: dict = {"image": torch.randn(n, channels, 64, 64, generator=g), "report": REPORTS[:n]}
    for k, c in enumerate(LABEL_COLUMNS):
        batch[f"label:{c}"] = torch.tensor([float((k + j) % 3 == 0) for j in range(n)])
    return batch


def test_s2s_masking_masks_the_closing_sep_half_the_time():
    g = torch.Generator().manual_seed(0)
    sep, mask = 3, 4
    rows = [[*range(10, 10 + m), sep] for m in (1, 5, 12, 40) for _ in range(500)]
    inputs, targets = s2s_masking(rows, mask_id=mask, mask_prob=0.15, max_pred=3,
                                  sep_mask_prob=0.5, generator=g)  # fmt: skip
    sep_masked = 0
    for row, x, y in zip(rows, inputs, targets, strict=True):
        words = len(row) - 1
        chosen = [i for i, t in enumerate(y) if t != -100]
        # n = min(max_pred, max(1, round(words x mask_prob))): 1, 1, 2, 3 here
        assert len(chosen) == min(3, max(1, round(words * 0.15)))
        assert all(x[i] == mask and y[i] == row[i] for i in chosen)  # always [MASK]
        assert all(x[i] == row[i] for i in range(len(row)) if i not in chosen)
        sep_masked += y[-1] == sep
    # forced half the time, and sometimes drawn among the others as well
    assert 0.5 <= sep_masked / len(rows) <= 0.7
    _, never = s2s_masking(rows[:200], mask_id=mask, mask_prob=0.15, max_pred=3,
                           sep_mask_prob=0.0, generator=g)  # fmt: skip
    _, always = s2s_masking(rows[:200], mask_id=mask, mask_prob=0.15, max_pred=3,
                            sep_mask_prob=1.0, generator=g)  # fmt: skip
    assert all(y[-1] == sep for y in always)
    assert sum(y[-1] == sep for y in never) < 200  # one of 2 positions for the 1-word rows


def test_retrieval_pairs_are_positives_and_label_differing_negatives():
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0]] * 100, dtype=torch.float32)
    objective = MedViLLRetrieval(RetrievalConfig(label_columns=("a", "b")), model=None)  # type: ignore[arg-type]
    image, report, matched = objective.pairs(labels, generator=torch.Generator().manual_seed(0))
    n = len(labels)
    assert matched[:n].all() and not matched[n:].any() and len(matched) == 2 * n
    assert torch.equal(image[:n], torch.arange(n)) and torch.equal(report[:n], torch.arange(n))
    assert (labels[image[n:]] != labels[report[n:]]).any(dim=1).all()
    # the negative swaps the image or the report of its sample, about half and half
    own_image = image[n:] == torch.arange(n)
    assert (own_image | (report[n:] == torch.arange(n))).all()
    assert own_image.float().mean().item() == pytest.approx(0.5, abs=0.08)
    same = torch.ones(3, 2)  # no partner with other labels: positives only
    _, _, alone = objective.pairs(same)
    assert alone.tolist() == [True, True, True]


@pytest.mark.parametrize("path", [RETRIEVAL, GENERATION], ids=lambda p: p.stem)
def test_fine_tunes_train_their_head_and_export(path, tmp_path):
    from raydiology.evaluation.medvill_eval import retrieval_run
    from raydiology.objectives.medvill_downstream import load_medvill_task
    from raydiology.train.export import export_encoder

    exp = smoke(path)
    torch.manual_seed(0)
    objective = build_objective(exp.objective, build_model(exp.model, exp.data))
    batch = batch_of(4, exp.data.channels)
    seen: list[torch.Tensor] = []
    checked: list[bool] = []
    hook = objective.model.bert.encoder.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True
    )
    spy = objective.model.joint

    def joint(*args, **kwargs):
        hidden, segments, ids = spy(*args, **kwargs)
        scheme = "bi" if isinstance(objective, MedViLLRetrieval) else "s2s"
        checked.append(torch.equal(seen.pop()[:, 0] == 0, attention_mask(scheme, segments)))
        return hidden, segments, ids

    objective.model.joint = joint
    try:
        out = objective(batch, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
        del objective.model.joint
    assert checked == [True]  # one joint pass, under the fine-tune's mask
    assert torch.isfinite(out["loss"]) and all(not v.requires_grad for k, v in out.items()
                                               if k != "loss")  # fmt: skip
    out["loss"].backward()
    model = objective.model
    head = model.itm_head if isinstance(objective, MedViLLRetrieval) else model.mlm_transform
    for part in (head, model.bert, model.visual_proj, model.encoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    if isinstance(objective, MedViLLRetrieval):
        assert out["negatives"].item() > 0
    else:
        assert isinstance(objective, MedViLLS2S) and 0 <= out["sep_masked"].item() <= 1
    with pytest.raises(KeyError, match="report"):
        objective({"image": batch["image"], **{k: v for k, v in batch.items() if ":" in k}})

    export_encoder(objective, tmp_path / "run" / "export", exp=exp, corpus_sha256=None, step=0)
    objective.export_extra(tmp_path / "run" / "export", write=True, gather=False)
    task, _ = load_medvill_task(tmp_path / "run")
    assert type(task) is type(objective)
    if isinstance(objective, MedViLLRetrieval):
        from raydiology.data.phantom import write_phantom_corpus

        corpus = tmp_path / "phantoms"
        write_phantom_corpus(corpus, n=8, size=64, finding_prob=0.5, progress=False)
        result = retrieval_run(tmp_path / "run", corpus, split=None)
        # evaluated under the mask it was fine-tuned with, relevance by its label columns
        assert result["attention"] == "bi" and result["relevance"] == "labels"


def test_paper_fine_tunes_on_the_meta_device():
    for path, name in ((RETRIEVAL, "medvill_retrieval"), (GENERATION, "medvill_s2s")):
        exp = load_experiment(path)
        assert exp.objective.name == name and exp.model.config.pretrained == "runs/medvill"
        with torch.device("meta"):
            build_objective(exp.objective, build_model(exp.model, exp.data))
        baseline = load_experiment(path, profile="medvill_finetune_only")
        assert baseline.model.config.pretrained is None
    retrieval, generation = load_experiment(RETRIEVAL), load_experiment(GENERATION)
    assert retrieval.train.optimizer.lr == 1e-5 and retrieval.train.micro_batch_size == 10
    assert retrieval.objective.config.attention == "bi"
    assert generation.train.optimizer.lr == 3e-5 and generation.train.micro_batch_size == 16
    assert generation.objective.config.sep_mask_prob == 0.5

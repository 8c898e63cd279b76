"""MedViLL downstream: templated VQA questions, the diagnosis / VQA heads' losses, the full
model's export -> load_medvill round trip (and `model.pretrained` reading it), the metrics,
the paper-size experiments on the meta device, and a smoke diagnosis fine-tune on 2
DeepSpeed workers from a tiny pretrained export, scored on held-out phantoms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raydiology.config import load_experiment
from raydiology.data.phantom import LABEL_COLUMNS
from raydiology.models.medvill import (
    MEDVILL_SPEC,
    MEDVILL_WEIGHTS,
    build_medvill,
    load_medvill,
)
from raydiology.objectives.medvill_downstream import (
    DiagnosisConfig,
    MedViLLDiagnosis,
    MedViLLVQA,
    VQAConfig,
    answer_vocabulary,
    build_medvill_diagnosis,
    build_medvill_vqa,
    load_medvill_task,
    vqa_questions,
)
from raydiology.registry import build_model, build_objective

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
DIAGNOSIS = EXPERIMENTS / "medvill_diagnosis.yaml"
VQA = EXPERIMENTS / "medvill_vqa.yaml"
PRETRAIN = EXPERIMENTS / "medvill.yaml"


def smoke(path: Path, *sets: str):
    return load_experiment(path, profile="medvill_smoke", overrides=list(sets))


def labelled_batch(n: int, size: int = 128) -> dict:
    g = torch.Generator().manual_seed(0)
    batch: dict = {"image": torch.randn(n, 1, size, size, generator=g),
                   "vqa_seed": [f"phantom-{i:07d}" for i in range(n)],
                   "report": ["The heart is enlarged.", "No pneumothorax.",
                              "There is a small left pleural effusion.", "Lungs are clear."][:n]}  # fmt: skip
    for k, c in enumerate(LABEL_COLUMNS):
        batch[f"label:{c}"] = torch.tensor([float((k + j) % 3 == 0) for j in range(n)])
    return batch


@pytest.fixture(scope="module")
def tiny_model():
    from raydiology.config_base import from_dict
    from raydiology.models.medvill import MedViLLConfig

    cfg = from_dict(MedViLLConfig, {"flavor": "tiny", "max_text_tokens": 32}, "model")
    torch.manual_seed(0)
    return build_medvill(cfg, image_size=128, in_chans=1)


def test_vqa_questions_are_deterministic_per_image_and_cover_closed_and_open():
    rng = np.random.default_rng(0)
    answers = answer_vocabulary(LABEL_COLUMNS)
    assert answers[:2] == ["no", "yes"] and answers[-1] == "none"
    assert "pleural effusion" in answers and "no finding" not in answers
    seen = {"closed": set(), "open": set()}
    for i in range(400):
        labels = (rng.random(len(LABEL_COLUMNS)) < 0.3).astype(float).tolist()
        image_id = f"phantom-{i:07d}"
        items = vqa_questions(image_id, labels, LABEL_COLUMNS)
        assert items == vqa_questions(image_id, labels, LABEL_COLUMNS)  # same image, same Qs
        assert [it.kind for it in items] == ["closed", "open"]
        closed, opened = items
        seen["closed"].add(closed.answer)
        seen["open"].add(opened.answer)
        assert closed.question.endswith("?") and opened.question.endswith("?")
        present = [c.removeprefix("label_").replace("_", " ")
                   for c, v in zip(LABEL_COLUMNS, labels, strict=True)
                   if v and c != "label_no_finding"]  # fmt: skip
        asked = next(a for a in answers[2:-1] if a in closed.question)
        assert closed.answer == ("yes" if asked in present else "no")
        assert opened.answer == (present[0] if present else "none")
        assert {closed.answer, opened.answer} <= set(answers)
    assert seen["closed"] == {"yes", "no"}
    assert "none" in seen["open"] and len(seen["open"]) >= 4
    # the questions depend on the image id, not on the order a batch lists images in
    a = vqa_questions("phantom-0000003", [0, 1, 1, 0, 0, 0], LABEL_COLUMNS)
    b = vqa_questions("phantom-0000004", [0, 1, 1, 0, 0, 0], LABEL_COLUMNS)
    assert a == vqa_questions("phantom-0000003", [0, 1, 1, 0, 0, 0], LABEL_COLUMNS)
    assert a[1].answer == b[1].answer == "cardiomegaly"


def test_heads_train_the_whole_model_and_need_their_columns(tiny_model):
    batch = labelled_batch(4)
    for objective in (build_medvill_diagnosis(DiagnosisConfig(), model=tiny_model),
                      build_medvill_vqa(VQAConfig(), model=tiny_model)):  # fmt: skip
        objective.zero_grad()
        out = objective(batch)
        assert next(iter(out)) == "loss" and torch.isfinite(out["loss"])
        assert all(not v.requires_grad for k, v in out.items() if k != "loss")
        out["loss"].backward()
        for part in (objective.head, tiny_model.bert, tiny_model.visual_proj, tiny_model.encoder):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
        with pytest.raises(KeyError):
            objective({"image": batch["image"]})
    vqa = build_medvill_vqa(VQAConfig(), model=tiny_model)
    assert set(vqa(batch)) == {"loss", "closed_acc", "open_acc"}
    assert vqa.head.out_features == len(answer_vocabulary(LABEL_COLUMNS))
    with pytest.raises(TypeError):
        build_medvill_diagnosis(DiagnosisConfig(), model=torch.nn.Linear(2, 2))


def test_config_errors_name_the_key():
    from raydiology.config_base import ConfigError, from_dict

    with pytest.raises(ConfigError) as e:
        from_dict(DiagnosisConfig, {"attention": "causal"}, "objective")
    assert e.value.key == "objective.attention"
    with pytest.raises(ConfigError) as e:
        from_dict(VQAConfig, {"label_columns": ["label_no_finding"]}, "objective")
    assert e.value.key == "objective.label_columns"


def export_run(objective, exp, folder: Path) -> None:
    from raydiology.train.export import export_encoder

    export_encoder(objective, folder, exp=exp, corpus_sha256=None, step=0)
    objective.export_extra(folder, write=True, gather=False)


def test_export_load_round_trip_and_pretrained_init(tmp_path):
    exp = smoke(DIAGNOSIS, "model.pretrained=null")
    torch.manual_seed(0)
    objective = build_objective(exp.objective, build_model(exp.model, exp.data))
    with torch.no_grad():  # weights unlike a fresh init, BatchNorm statistics included
        objective.head.bias.add_(0.5)
        objective.model.encoder.body.bn1.running_mean.add_(0.1)
    export_run(objective, exp, tmp_path / "run" / "export")
    assert (tmp_path / "run" / "export" / MEDVILL_SPEC).is_file()

    batch = labelled_batch(3)
    batch["image"] = torch.randn(3, exp.data.channels, 128, 128)
    objective.eval()
    model = load_medvill(tmp_path / "run")  # a run folder or its export/
    assert not model.training and model.spec["image_size"] == 128
    assert model.tokenizer.hf.get_vocab() == objective.model.tokenizer.hf.get_vocab()
    texts = [model.tokenizer.encode(r) for r in batch["report"]]
    assert texts == [objective.model.tokenizer.encode(r) for r in batch["report"]]
    with torch.no_grad():
        want, _, _ = objective.model(batch["image"], texts)
        got, _, _ = model(batch["image"], texts)
        assert torch.equal(got, want)
        task, _ = load_medvill_task(tmp_path / "run" / "export")
        assert isinstance(task, MedViLLDiagnosis) and not task.training
        assert torch.equal(task.predict_logits(batch["image"], batch["report"]),
                           objective.predict_logits(batch["image"], batch["report"]))  # fmt: skip

    # model.pretrained: a new run (here VQA) starts from the export's weights and tokenizer
    vqa_exp = smoke(VQA, f"model.pretrained={tmp_path / 'run'}")
    torch.manual_seed(1)
    started = build_model(vqa_exp.model, vqa_exp.data)
    mine = objective.model.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in started.state_dict().items())
    vqa = build_objective(vqa_exp.objective, started)
    assert isinstance(vqa, MedViLLVQA)

    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "run" / "export" / MEDVILL_WEIGHTS)).keys()
    assert {k.split(".")[0] for k in keys} == {"model", "head"}


def test_pretrained_must_fit_the_architecture(tmp_path):
    from raydiology.config_base import ConfigError

    exp = smoke(DIAGNOSIS, "model.pretrained=null")
    objective = build_objective(exp.objective, build_model(exp.model, exp.data))
    export_run(objective, exp, tmp_path / "export")
    wrong = smoke(DIAGNOSIS, f"model.pretrained={tmp_path}", "model.vocab_size=9000")
    with pytest.raises(ConfigError) as e:
        build_model(wrong.model, wrong.data)
    assert e.value.key == "model.pretrained"
    missing = smoke(DIAGNOSIS, f"model.pretrained={tmp_path / 'nothing'}")
    with pytest.raises(FileNotFoundError):
        build_model(missing.model, missing.data)


def test_metrics():
    from raydiology.evaluation.medvill_heads import diagnosis_metrics, vqa_metrics

    targets = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    probs = np.array([[0.9, 0.2], [0.4, 0.7], [0.6, 0.4], [0.1, 0.3]])
    m = diagnosis_metrics(targets, probs, ["a", "b"])
    assert m["micro_auroc"] == pytest.approx(31 / 32)  # one of 16 pos/neg pairs tied (0.4)
    assert m["auroc_per_label"] == {"a": 1.0, "b": 1.0}
    assert m["micro_f1"] == pytest.approx(6 / 7)  # 3 TP, 0 FP, 1 FN
    constant = diagnosis_metrics(np.array([[1, 0], [1, 1]]), np.array([[0.9, 0.1], [0.8, 0.9]]),
                                 ["a", "b"])  # fmt: skip
    assert constant["auroc_per_label"]["a"] is None and constant["macro_auroc"] == 1.0
    v = vqa_metrics(["closed", "open", "closed", "open"], ["yes", "none", "no", "cardiomegaly"],
                    ["yes", "none", "yes", "pneumothorax"])  # fmt: skip
    assert (v["closed_accuracy"], v["open_accuracy"], v["accuracy"]) == (0.5, 0.5, 0.5)
    assert v["closed_questions"] == v["open_questions"] == 2


def test_paper_experiments_on_the_meta_device():
    from raydiology.models import count_parameters

    for path, outputs, lr in ((DIAGNOSIS, 6, 1e-4), (VQA, 8, 3e-5)):
        exp = load_experiment(path)
        assert exp.model.config.pretrained == "runs/medvill"  # not read on the meta device
        with torch.device("meta"):
            model = build_model(exp.model, exp.data)
            objective = build_objective(exp.objective, model)
        counts = count_parameters(model)
        assert counts["encoder"] == 23_508_032 and counts["bert"] == 108_891_648
        assert objective.head.in_features == 768 and objective.head.out_features == outputs
        assert exp.train.optimizer.lr == lr and exp.objective.config.attention == "bi"
        baseline = load_experiment(path, profile="medvill_finetune_only")
        assert baseline.model.config.pretrained is None
        assert baseline.output.dir == "runs/finetune_only" and baseline.name == exp.name


def _pretrain_in_process(exp, corpus: str, steps: int, *, rows: int | None = 8, seed: int = 0):
    """Plain-torch steps of MedViLL pretraining on the training phantoms: the first `rows`
    of them (None: all), in batches of `exp.train.micro_batch_size`, in order, cycling."""
    from raydiology.data.corpus import read_rows
    from raydiology.data.pipeline import preprocess_batch, to_model_input

    table = read_rows(corpus)
    train = np.asarray(table.column("split").to_numpy(zero_copy_only=False)) == "train"
    batch = {n: table.column(n).to_numpy(zero_copy_only=False)[train][:rows]
             for n in table.column_names}  # fmt: skip
    columns = exp.objective.config.corpus_columns()
    out = preprocess_batch(batch, data=exp.data, label_columns=[], extra_columns=columns)
    inputs = {k: (list(v) if v.dtype == object else torch.from_numpy(v)) for k, v in out.items()}
    inputs["image"] = to_model_input(inputs["image"], exp.data, dtype=torch.float32)
    size, total = exp.train.micro_batch_size, len(inputs["image"])
    torch.manual_seed(seed)
    objective = build_objective(exp.objective, build_model(exp.model, exp.data))
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    for step in range(steps):
        start = step % max(1, total // size) * size
        chunk = {k: v[start : start + size] for k, v in inputs.items()}
        loss = objective(chunk, generator=torch.Generator().manual_seed(step))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return objective


@pytest.mark.ray
def test_smoke_diagnosis_fine_tune_from_a_pretrained_export(ray_cluster, tmp_path):
    from rich.console import Console

    from raydiology.evaluation.medvill_heads import evaluate_medvill_heads
    from raydiology.train.launch import read_metrics, resolve_corpus, run_experiment

    pre = smoke(PRETRAIN, f"output.dir={tmp_path}")
    corpus = resolve_corpus(pre, console=Console(quiet=True))
    pretrained = _pretrain_in_process(pre, corpus, steps=2)
    export_run(pretrained, pre, tmp_path / "medvill" / "export")

    # Fine-tuned at 64 px (2x2 grid; the export was made at 128: resolution is not part of
    # the architecture). Measured in-process, constant lr 3e-3, batch 16, on val+test: micro
    # AUROC ~0.86 after 30 steps at 64 px, ~0.77 at 128 px; ~0.69 at lr 1e-3.
    exp = smoke(DIAGNOSIS, f"output.dir={tmp_path}", f"model.pretrained={tmp_path / 'medvill'}",
                "data.resolution=64", "train.max_steps=40", "train.checkpoint_every=40",
                "train.log_every=5", "train.optimizer.lr=3.0e-3", "train.schedule.name=constant")  # fmt: skip
    result = run_experiment(exp, console=Console(quiet=True))
    rows = read_metrics(result.run_dir)
    assert rows[-1]["step"] == 40
    losses = [r["loss"] for r in rows]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    # the fine-tuned run started from the export: its config names it
    assert load_medvill(result.run_dir).spec["model"]["pretrained"] == str(tmp_path / "medvill")

    held_out = evaluate_medvill_heads(result.run_dir, corpus, task="diagnosis",
                                      split=["val", "test"])  # fmt: skip
    print("smoke diagnosis:", {k: held_out[k] for k in ("micro_auroc", "micro_f1", "images")})
    assert Path(held_out["path"]).is_file() and held_out["images"] >= 25
    assert held_out["micro_auroc"] > 0.75, held_out  # measured 0.88
    with pytest.raises(ValueError, match="not a vqa"):
        evaluate_medvill_heads(result.run_dir, corpus, task="vqa")


def test_pretraining_beats_the_fine_tune_only_baseline_on_diagnosis(tmp_path):
    """Issue 18 item 4: diagnosis fine-tuned from a MedViLL pretraining export scores a higher
    micro AUROC on held-out phantoms than the same fine-tune from scratch (`model.pretrained=
    null`), label-scarce: pretraining sees all 1280 training image+report pairs, each
    fine-tune only the first 8 labelled rows; 320 held-out phantoms (val+test). In-process
    (tests/medvill_gain.py); the Ray Train path of such a fine-tune is the test above.

    The gain is paired per fine-tune seed (head init, batch order) and averaged over 4.
    Measured with
        PYTHONPATH=platform python tests/medvill_gain.py --seeds S --finetune-seeds 1 2 3 4 5 6 \\
            --set images=1600 --set finetune_rows=8
    (Dec 2026, 2 busy cores) the gain per fine-tune seed 1..6 and its mean, per pretraining S:
        S=0: +0.129 +0.032 +0.067 +0.077 +0.041 +0.040  mean +0.064 (sd 0.036)
        S=1: +0.082 +0.042 +0.078 +0.067 +0.085 +0.073  mean +0.071 (sd 0.016)
        S=2: +0.040 +0.121 +0.101 +0.135 +0.064 +0.098  mean +0.093 (sd 0.035)
    All 18 > 0. Over 4 seeds, the worst mean less 3 standard errors is still > 0
    (+0.064 - 3 * 0.036 / 2 = +0.010). Runs are not bit-reproducible (the cause is not yet
    found): seeds 1-3 of S=0 gave +0.085 +0.031 +0.050 and +0.157 +0.019 +0.078 in two
    pytest runs, so the lowest single gain seen is +0.019. The bar, +0.015, is our choice:
    below every single gain measured. With 16 or 32 labelled rows, or image-only input, the
    gain was smaller and noisier (table in medvill_gain.py). This test measured means
    +0.082 (+0.116 +0.062 +0.068 +0.081) and +0.079 (+0.098 +0.046 +0.103 +0.067); ~93 s.
    """
    from dataclasses import replace

    from medvill_gain import GAIN, measure

    settings = replace(GAIN, images=1600, finetune_rows=8)
    rows = measure(settings, 0, tmp_path, finetune_seeds=[1, 2, 3, 4])
    gains = [r["gain"] for r in rows]
    print("pretraining gain per fine-tune seed:", [f"{g:+.3f}" for g in gains])
    assert np.mean(gains) > 0.015, rows


def test_evaluate_medvill_vqa_from_the_command_line(tmp_path):
    import json

    from typer.testing import CliRunner

    from raydiology.cli import app
    from raydiology.data.phantom import write_phantom_corpus

    exp = smoke(VQA, "model.pretrained=null")
    torch.manual_seed(0)
    objective = build_objective(exp.objective, build_model(exp.model, exp.data))
    export_run(objective, exp, tmp_path / "run" / "export")
    corpus = tmp_path / "corpus"
    write_phantom_corpus(corpus, n=12, size=128, seed=0, finding_prob=0.5, progress=False)
    args = ["evaluate", "medvill", str(tmp_path / "run"), "--task", "vqa", "--corpus",
            str(corpus), "--split", "all"]  # fmt: skip
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "run" / "eval" / "medvill_vqa.json").read_text())
    assert written["closed_questions"] == written["open_questions"] == 12
    assert 0 <= written["closed_accuracy"] <= 1 and 0 <= written["open_accuracy"] <= 1
    assert written["pretrained"] is None  # the fine-tuning-only baseline's config
    wrong = CliRunner().invoke(app, [*args[:4], "diagnosis", *args[5:]])
    assert wrong.exit_code == 2 and "not a diagnosis" in wrong.output

"""What MedViLL pretraining adds to diagnosis on phantoms, in-process, over seeds: the evidence
any "pretrained export beats the fine-tune-only baseline" test (issue 18, item 4) must rest on.

Run by hand (pytest does not collect it: its name does not start with test_):

    PYTHONPATH=platform python tests/medvill_gain.py --seeds 0 1 2 3 4
    PYTHONPATH=platform python tests/medvill_gain.py --seeds 0 --finetune-seeds 1 2 3 4 \
        --set pretrain_steps=150 --set lr=1e-3

Per seed (phantom corpus, pretraining and fine-tune seeds all set to it) it pretrains the
smoke MedViLL in-process (`_pretrain_in_process`), exports it, then fine-tunes diagnosis twice
with the same overrides, once from the export and once with `model.pretrained=null` (the
fine-tune-only baseline), in a plain-torch copy of the training loop (same optimizer groups,
LR schedule, grad clip, micro-batches; no Ray, no DeepSpeed), and scores both on val+test
with `evaluate_medvill_heads` (what `raydiology evaluate medvill --task diagnosis` runs).
It prints micro AUROC of both and the gain, one row per seed (seed/fine-tune seed with
--finetune-seeds: one pretraining, several fine-tunes), then the minimum, mean and maximum.

Measured (Dec 2026, 2 busy cores): at these sizes the gain is real on average but smaller
than the fine-tune's own seed noise (head init and batch order): no bar > 0 is safe there:
  300 pretrain steps on all training rows, 30 fine-tune steps, cosine 3e-3 (the defaults),
  --seeds 0 --finetune-seeds 1 2 3 4: +0.078 +0.048 +0.129 -0.010 (mean +0.062)
  the same at lr 1e-3: +0.128 -0.016 +0.055 +0.060 (mean +0.057)
  the same, 100 fine-tune steps: 3e-3 -0.043 .. +0.084 (mean +0.024); 1e-3 -0.029 .. +0.077
  300 steps on 8 rows, cosine 3e-3, --seeds 0 1 2: +0.115 +0.167 +0.095, but
  --seeds 0 --finetune-seeds 1 2 3 4: +0.075 +0.017 +0.125 -0.058
Label-scarce (Dec 2026, h18-gain3; 1600 phantoms: 320 held out; 300 pretraining steps on all
1280 training rows; fine-tune on the first `finetune_rows`; --finetune-seeds 1 2 3 4 5 6):
  rows 16, 30 steps, 3e-3, --seeds 0: +0.058 +0.023 +0.105 +0.039 +0.080 -0.034 (mean +0.045)
  the same, --seeds 1: +0.006 -0.009 +0.056 +0.016 +0.012 +0.019 (mean +0.017)
  rows 16, lr 1e-3, --seeds 0: +0.006 -0.005 -0.002 +0.007 -0.009 -0.015 (mean -0.003)
  rows 16, lr 3e-4, --seeds 0: -0.004 -0.006 -0.021 -0.025 +0.005 +0.015 (mean -0.006)
  rows 16, 60 steps, --seeds 0: +0.006 +0.016 +0.046 -0.026 +0.024 +0.021 (mean +0.014)
  rows 32, --seeds 0: +0.030 +0.036 +0.121 +0.040 -0.083 -0.005 (mean +0.023)
  rows 16, image only (report=false), --seeds 0: +0.010 -0.013 +0.002 +0.033 -0.011 +0.009
    (mean +0.005); --seeds 1: +0.034 +0.017 +0.026 +0.029 +0.002 +0.054 (mean +0.027)
  rows 8, --seeds 0: +0.129 +0.032 +0.067 +0.077 +0.041 +0.040 (mean +0.064, sd 0.036)
           --seeds 1: +0.082 +0.042 +0.078 +0.067 +0.085 +0.073 (mean +0.071, sd 0.016)
           --seeds 2: +0.040 +0.121 +0.101 +0.135 +0.064 +0.098 (mean +0.093, sd 0.035)
  8 labelled rows is the setting with a safe bar: all 18 gains > 0, the worst mean less 3
  standard errors over 4 fine-tune seeds still > 0; the test in test_medvill_downstream.py
  (test_pretraining_beats_the_fine_tune_only_baseline_on_diagnosis) asserts on it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_medvill_downstream import (
    DIAGNOSIS,
    PRETRAIN,
    _pretrain_in_process,
    export_run,
    smoke,
)


@dataclass(frozen=True)
class GainSettings:
    """Phantoms and recipes of a pretraining-gain measurement (all our choice)."""

    images: int = 160  # phantoms (train / val / test)
    size: int = 128  # stored phantom side
    resolution: int = 64  # model input, pretraining and fine-tune (a 2x2 grid)
    pretrain_steps: int = 300
    pretrain_rows: int = 0  # training phantoms pretraining cycles through; 0: all
    finetune_steps: int = 30
    finetune_rows: int = 0  # labelled training phantoms the fine-tune sees (the first); 0: all
    batch: int = 8  # fine-tune micro-batch
    report: bool = True  # the diagnosis input: image + report (the paper's) or image only
    lr: float = 3.0e-3  # fine-tune
    schedule: str = "cosine"  # fine-tune: constant | cosine (no warmup)
    workers: int = 1  # Ray Train workers, for a run_experiment fine-tune (this runs in-process)


GAIN = GainSettings()


def gain_overrides(g: GainSettings, out: Path, *, seed: int = 0) -> tuple[list[str], list[str]]:
    """(pretraining, diagnosis fine-tune) overrides of the smoke profile; `seed` sets the
    phantoms' and the fine-tune's seed. The fine-tune's lack `model.pretrained`."""
    data = [f"output.dir={out}", f"data.resolution={g.resolution}",
            f"data.phantom.images={g.images}", f"data.phantom.size={g.size}",
            f"data.phantom.seed={seed}"]  # fmt: skip
    steps = g.finetune_steps
    return data, [*data, f"train.seed={seed}", f"train.max_steps={steps}",
                  f"train.micro_batch_size={g.batch}",
                  f"train.checkpoint_every={steps}", f"train.log_every={steps // 3}",
                  f"train.optimizer.lr={g.lr}", f"train.schedule.name={g.schedule}",
                  "train.schedule.warmup_steps=0",
                  f"objective.report_column={'report' if g.report else 'null'}",
                  f"scaling.num_workers={g.workers}"]  # fmt: skip


def fine_tune_in_process(exp, corpus: str, folder: Path, *, rows: int | None = None) -> Path:
    """The training loop's optimisation without Ray or DeepSpeed, on the first `rows`
    training phantoms (None: all); returns the run folder."""
    from raydiology.data.corpus import read_rows
    from raydiology.data.pipeline import preprocess_batch, to_model_input
    from raydiology.registry import build_model, build_objective
    from raydiology.train.schedules import lr_scheduler, param_groups

    table = read_rows(corpus)
    train = np.isin(table.column("split").to_numpy(zero_copy_only=False), exp.data.splits)
    labelled = {n: table.column(n).to_numpy(zero_copy_only=False)[train][:rows]
                for n in table.column_names}  # fmt: skip
    columns = exp.objective.config.corpus_columns()
    out = preprocess_batch(labelled, data=exp.data, label_columns=[], extra_columns=columns)
    inputs = {k: (list(v) if v.dtype == object else torch.from_numpy(v)) for k, v in out.items()}
    inputs["image"] = to_model_input(inputs["image"], exp.data, dtype=torch.float32)

    train_cfg, opt = exp.train, exp.train.optimizer
    torch.manual_seed(train_cfg.seed)  # as build_for_training
    objective = build_objective(exp.objective, build_model(exp.model, exp.data))
    groups = param_groups(objective, opt.weight_decay, opt)
    optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                  weight_decay=opt.weight_decay)  # fmt: skip
    schedule = lr_scheduler(optimizer, train_cfg)
    size, total = train_cfg.micro_batch_size, len(inputs["image"])
    step, epoch = 0, 0
    while step < train_cfg.max_steps:
        order = np.random.default_rng([train_cfg.seed, epoch]).permutation(total)
        for start in range(0, total - size + 1, size):
            pick = order[start : start + size]
            batch = {k: ([v[i] for i in pick] if isinstance(v, list) else v[torch.from_numpy(pick)])
                     for k, v in inputs.items()}  # fmt: skip
            loss = objective(batch, generator=torch.Generator().manual_seed(step))["loss"]
            optimizer.zero_grad()
            loss.backward()
            if train_cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(objective.parameters(), train_cfg.grad_clip)
            optimizer.step()
            schedule.step()
            step += 1
            if step >= train_cfg.max_steps:
                break
        epoch += 1
    objective.eval()
    export_run(objective, exp, folder / "export")
    return folder


def measure(
    settings: GainSettings, seed: int, work: Path, finetune_seeds: list[int | None]
) -> list[dict[str, float]]:
    """micro AUROC on val+test of the pretrained and fine-tune-only runs for one seed, per
    fine-tune seed (their head init and batch order; None: `seed`), from one pretraining."""
    from rich.console import Console

    from raydiology.evaluation.medvill_heads import evaluate_medvill_heads
    from raydiology.train.launch import resolve_corpus

    pre, overrides = gain_overrides(settings, work, seed=seed)
    pre_exp = smoke(PRETRAIN, *pre)
    corpus = resolve_corpus(pre_exp, console=Console(quiet=True))
    started = time.perf_counter()
    pretrained = _pretrain_in_process(pre_exp, corpus, settings.pretrain_steps,
                                      rows=settings.pretrain_rows or None, seed=seed)  # fmt: skip
    export_run(pretrained, pre_exp, work / "medvill" / "export")
    pretrain_s = time.perf_counter() - started
    rows = []
    for finetune_seed in finetune_seeds:
        scores = {"pretrain_s": pretrain_s}
        order = [] if finetune_seed is None else [f"train.seed={finetune_seed}"]
        for name, init in (("pretrained", str(work / "medvill")), ("finetune_only", "null")):
            exp = smoke(DIAGNOSIS, *overrides, *order, f"model.pretrained={init}")
            run = fine_tune_in_process(exp, corpus, work / f"{name}-{finetune_seed}",
                                       rows=settings.finetune_rows or None)  # fmt: skip
            held_out = evaluate_medvill_heads(run, corpus, task="diagnosis",
                                              split=["val", "test"])  # fmt: skip
            scores[name] = held_out["micro_auroc"]
        scores["gain"] = scores["pretrained"] - scores["finetune_only"]
        rows.append(scores)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"change a setting: {[f.name for f in fields(GAIN)]}")  # fmt: skip
    parser.add_argument("--finetune-seeds", type=int, nargs="+", default=None,
                        help="fine-tune seeds (head init, batch order) per pretraining")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = GAIN
    for item in args.set:
        name, value = item.split("=", 1)
        kind = type(getattr(GAIN, name))
        parsed = value.lower() == "true" if kind is bool else kind(value)
        settings = replace(settings, **{name: None if value == "null" else parsed})
    print(settings)
    print(
        f"{'seed':>4} {'pretrained':>10} {'ft-only':>8} {'gain':>7} {'pretrain s':>10} {'total s':>8}"
    )
    gains = []
    for seed in args.seeds:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            measured = measure(settings, seed, Path(work), args.finetune_seeds or [None])
        for finetune_seed, s in zip(args.finetune_seeds or [None], measured, strict=True):
            gains.append(s["gain"])
            print(f"{seed if finetune_seed is None else f'{seed}/{finetune_seed}':>4} {s['pretrained']:>10.3f} {s['finetune_only']:>8.3f} {s['gain']:>+7.3f} "
              f"{s['pretrain_s']:>10.1f} {time.perf_counter() - started:>8.1f}", flush=True)  # fmt: skip
    print(f"gain: min {min(gains):+.3f}  mean {np.mean(gains):+.3f}  max {max(gains):+.3f}")


if __name__ == "__main__":
    main()

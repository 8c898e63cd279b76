"""What MedViLL pretraining adds to diagnosis on phantoms, in-process, over seeds: the evidence
for the bar of `test_pretraining_beats_the_fine_tune_only_baseline_on_diagnosis`.

Run by hand (pytest does not collect it: its name does not start with test_):

    PYTHONPATH=platform python tests/medvill_gain.py --seeds 0 1 2 3 4
    PYTHONPATH=platform python tests/medvill_gain.py --seeds 0 1 2 --set pretrain_steps=100

Per seed (phantom corpus, pretraining and fine-tune seeds all set to it) it pretrains the
smoke MedViLL in-process (`_pretrain_in_process`), exports it, then fine-tunes diagnosis twice
with the test's overrides, once from the export and once with `model.pretrained=null` (the
fine-tune-only baseline), in a plain-torch copy of the training loop (same optimizer groups,
LR schedule, grad clip, micro-batches; no Ray, no DeepSpeed), and scores both on val+test
with `evaluate_medvill_heads` (what `raydiology evaluate medvill --task diagnosis` runs).
It prints micro AUROC of both and the gain, one row per seed, then the minimum and mean.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_medvill_downstream import (  # noqa: E402
    DIAGNOSIS,
    GAIN,
    PRETRAIN,
    GainSettings,
    _pretrain_in_process,
    export_run,
    gain_overrides,
    smoke,
)


def fine_tune_in_process(exp, corpus: str, folder: Path) -> Path:
    """The training loop's optimisation without Ray or DeepSpeed; returns the run folder."""
    from raydiology.data.corpus import read_rows
    from raydiology.data.pipeline import preprocess_batch, to_model_input
    from raydiology.registry import build_model, build_objective
    from raydiology.train.schedules import lr_scheduler, param_groups

    table = read_rows(corpus)
    train = np.isin(table.column("split").to_numpy(zero_copy_only=False), exp.data.splits)
    rows = {n: table.column(n).to_numpy(zero_copy_only=False)[train] for n in table.column_names}
    columns = exp.objective.config.corpus_columns()
    out = preprocess_batch(rows, data=exp.data, label_columns=[], extra_columns=columns)
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


def measure(settings: GainSettings, seed: int, work: Path) -> dict[str, float]:
    """micro AUROC on val+test of the pretrained and fine-tune-only runs for one seed."""
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
    scores = {"pretrain_s": pretrain_s}
    for name, init in (("pretrained", str(work / "medvill")), ("finetune_only", "null")):
        exp = smoke(DIAGNOSIS, *overrides, f"model.pretrained={init}")
        run = fine_tune_in_process(exp, corpus, work / name)
        held_out = evaluate_medvill_heads(run, corpus, task="diagnosis", split=["val", "test"])
        scores[name] = held_out["micro_auroc"]
    scores["gain"] = scores["pretrained"] - scores["finetune_only"]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help=f"change a setting of the test's: {[f.name for f in fields(GAIN)]}")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = GAIN
    for item in args.set:
        name, value = item.split("=", 1)
        kind = type(getattr(GAIN, name))
        settings = replace(settings, **{name: None if value == "null" else kind(value)})
    print(settings)
    print(f"{'seed':>4} {'pretrained':>10} {'ft-only':>8} {'gain':>7} {'pretrain s':>10} {'total s':>8}")
    gains = []
    for seed in args.seeds:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            s = measure(settings, seed, Path(work))
        gains.append(s["gain"])
        print(f"{seed:>4} {s['pretrained']:>10.3f} {s['finetune_only']:>8.3f} {s['gain']:>+7.3f} "
              f"{s['pretrain_s']:>10.1f} {time.perf_counter() - started:>8.1f}", flush=True)  # fmt: skip
    print(f"gain: min {min(gains):+.3f}  mean {np.mean(gains):+.3f}  max {max(gains):+.3f}")


if __name__ == "__main__":
    main()

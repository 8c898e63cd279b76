"""`raydiology bench step`: a few training steps of an experiment's model, timed.

The GPU check for paper-sized flavors: the same model, objective, DeepSpeed config and
batch preprocessing as a training worker, without Ray, so it runs on any machine with
torch (and DeepSpeed when installed). The batch is real: phantom radiographs (and their
reports) made at the experiment's resolution and preprocessed by the pipeline's own
`preprocess_batch`. Prints median step time, images/s and peak accelerator memory.

    python -m raydiology.bench.step EXPERIMENT.yaml [--profile smoke] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

import torch

from raydiology.config import Experiment


def run_step_benchmark(
    exp: Experiment, *, steps: int = 10, warmup: int = 3, engine: str = "auto"
) -> dict[str, Any]:
    """Time `steps` optimizer steps (after `warmup`) of the experiment on one device.

    `engine`: deepspeed (what `raydiology run` builds), or torch (plain torch: AdamW, autocast,
    the baseline DeepSpeed is held to).
    """
    from raydiology.data.pipeline import to_model_input
    from raydiology.models import count_parameters
    from raydiology.registry import build_model, build_objective
    from raydiology.train.deepspeed_config import optimizer_kernel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if engine == "auto":
        engine = "deepspeed" if _has_deepspeed() else "torch"
    batch = _real_batch(exp)
    torch.manual_seed(exp.train.seed)
    with device:
        model = build_model(exp.model, exp.data)
        objective = build_objective(exp.objective, model)
    counts = count_parameters(model)
    trainable = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    if engine == "deepspeed":
        step, dtype = _deepspeed_step(exp, objective)
    else:
        step, dtype = _torch_step(exp, objective)

    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    # as the loop: an objective may take its images in its own dtype (DINOv2: fp32)
    input_dtype = getattr(objective, "input_dtype", None) or dtype
    moved["image"] = to_model_input(moved["image"], exp.data, dtype=input_dtype)
    generator = torch.Generator(device=device)
    after_step = getattr(objective, "after_step", None)  # e.g. an EMA teacher: part of a step
    times: list[float] = []
    losses: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        generator.manual_seed(i)
        _sync(device)
        started = time.perf_counter()
        loss = step(moved, generator)
        if after_step is not None:
            after_step(i + 1, warmup + steps)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - started)
            losses.append(loss)
    median = statistics.median(times)
    images = int(batch["image"].shape[0]) * exp.train.grad_accum
    return {
        "experiment": exp.name,
        "model": exp.model.name,
        "flavor": getattr(exp.model.config, "flavor", None),
        "objective": exp.objective.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "engine": engine,
        "precision": exp.train.precision,
        "zero_stage": exp.train.zero_stage if engine == "deepspeed" else None,
        "optimizer": optimizer_kernel(exp.train.optimizer, on_gpu=device.type == "cuda")
        if engine == "deepspeed"
        else ("torch_fused" if device.type == "cuda" else "torch"),
        "compile": exp.train.compile,
        "resolution": exp.data.resolution,
        "micro_batch_size": exp.train.micro_batch_size,
        "parameters": {**counts, "trainable": trainable},
        "steps_timed": steps,
        "step_time_s_median": round(median, 4),
        "step_time_s_min": round(min(times), 4),
        "images_per_s": round(images / median, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
    }


@torch.no_grad()
def run_validation_benchmark(exp: Experiment, *, repeats: int = 2) -> dict[str, Any]:
    """Time one validation batch of an objective that validates (report SFT: beam-search
    decoding of `generation.batch_size` images with the run's settings), on one device in
    the run's precision: what sizes `train.eval_every` for a paper-sized decoder."""
    import dataclasses

    from raydiology.data.pipeline import to_model_input
    from raydiology.registry import build_model, build_objective

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(exp.train.precision, torch.float32)
    torch.manual_seed(exp.train.seed)
    with device:
        objective = build_objective(exp.objective, build_model(exp.model, exp.data))
    if not hasattr(objective, "validation_rows"):
        raise ValueError(f"objective {exp.objective.name!r} does not validate during training")
    objective.to(dtype).eval()
    n = objective.validation_batch_size
    batch = _real_batch(
        dataclasses.replace(exp, train=dataclasses.replace(exp.train, micro_batch_size=n))
    )
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch["image"] = to_model_input(batch["image"], exp.data, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, words = [], 0.0
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        rows = objective.validation_rows(batch)
        _sync(device)
        times.append(time.perf_counter() - started)
        words = sum(len(r["prediction"].split()) for r in rows) / len(rows)
    median = statistics.median(times)
    return {
        "experiment": exp.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": exp.train.precision,
        "images": n,
        "generation": dataclasses.asdict(objective.cfg.generation),
        "batch_time_s_median": round(median, 3),
        "images_per_s": round(n / median, 2),
        "words_per_report": round(words, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
    }


def _real_batch(exp: Experiment) -> dict[str, Any]:
    """One micro-batch of phantoms through the pipeline's preprocessing (no Ray)."""
    from raydiology.data.corpus import read_rows
    from raydiology.data.phantom import write_phantom_corpus
    from raydiology.data.pipeline import _PIXEL_COLUMNS, collate, preprocess_batch

    n = exp.train.micro_batch_size
    wanted = getattr(exp.objective.config, "corpus_columns", None)
    extra: dict[str, str] = wanted() if callable(wanted) else {}
    views = 2 if exp.data.study_views > 1 else 1  # multi-view studies: PA + lateral
    study = ["study_id", "view"] if views > 1 else []
    with tempfile.TemporaryDirectory() as folder:
        write_phantom_corpus(
            folder, n=n, size=exp.data.resolution, seed=0, views=views, progress=False
        )
        columns = [*_PIXEL_COLUMNS, *study, *extra.values()]
        table = read_rows(folder, columns=list(dict.fromkeys(columns)))  # each column once
    raw = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    data = exp.data
    if data.splits:  # the bench batch is whatever phantoms were made
        import dataclasses

        data = dataclasses.replace(data, splits=())
    out = preprocess_batch(raw, data=data, label_columns=[], extra_columns=extra, out_dtype="uint8")
    out.pop("row_key")
    return collate(out)


def _deepspeed_step(exp: Experiment, objective: torch.nn.Module):
    """The engine `raydiology run` builds (same config, optimizer kernel, compile), one rank."""
    import deepspeed

    from raydiology.train.deepspeed_config import (
        deepspeed_config,
        prepare_cuda_builds,
        training_engine,
    )

    on_gpu = torch.cuda.is_available()
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}.items():  # fmt: skip
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    prepare_cuda_builds()
    ds_config = deepspeed_config(exp.train, world_size=1, on_gpu=on_gpu)
    engine = training_engine(objective, exp.train, ds_config)
    dtype = next(engine.module.parameters()).dtype

    def step(batch: dict[str, Any], generator: torch.Generator) -> float:
        loss = 0.0
        for _ in range(exp.train.grad_accum):
            out = engine(batch, generator=generator)
            engine.backward(out["loss"])
            engine.step()
            loss = float(out["loss"].detach().float())
        return loss

    return step, dtype


def _torch_step(exp: Experiment, objective: torch.nn.Module):
    """Plain torch, as fast as it goes without DeepSpeed: fp32 weights, autocast for
    bf16/fp16, fused AdamW on GPUs, the same block compile with `train.compile`."""
    from raydiology.train.deepspeed_config import compile_blocks
    from raydiology.train.schedules import param_groups

    opt = exp.train.optimizer
    device = next(objective.parameters()).device
    if exp.train.compile:
        compile_blocks(objective)
    optimizer = torch.optim.AdamW(
        param_groups(objective, opt.weight_decay, opt), lr=opt.lr, betas=opt.betas, eps=opt.eps,
        fused=device.type == "cuda",
    )  # fmt: skip
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(exp.train.precision)

    def step(batch: dict[str, Any], generator: torch.Generator) -> float:
        loss = 0.0
        for _ in range(exp.train.grad_accum):
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = objective(batch, generator=generator)
            (out["loss"] / exp.train.grad_accum).backward()
            loss = float(out["loss"].detach().float())
        if exp.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(objective.parameters(), exp.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, torch.float32


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    """Entry point without typer/rich, for machines that have only torch."""
    from raydiology.config import load_experiment

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("--profile")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--engine", choices=["auto", "deepspeed", "torch"], default="auto")
    parser.add_argument(
        "--validation", action="store_true", help="time one validation batch instead of steps"
    )
    args = parser.parse_args(argv)
    exp = load_experiment(args.experiment, profile=args.profile, overrides=args.sets)
    if args.validation:
        print(json.dumps(run_validation_benchmark(exp), indent=2))
        return
    result = run_step_benchmark(exp, steps=args.steps, warmup=args.warmup, engine=args.engine)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""The one training loop: every objective runs through `train_loop_per_worker`.

It turns the config dict into a typed Experiment, builds model and objective from the
registry, hands them to DeepSpeed, iterates this worker's dataset shard and reports metrics
and checkpoints through `ray.train.report` on every rank, the same number of times.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydiology.cluster.metrics import TrainMetrics
from raydiology.config import Experiment, experiment_from_dict
from raydiology.data.corpus import file_sha256
from raydiology.data.pipeline import collate, to_model_input
from raydiology.registry import build_model, build_objective
from raydiology.train import collectives
from raydiology.train.deepspeed_config import (
    deepspeed_config,
    prepare_cuda_builds,
    training_engine,
)
from raydiology.train.export import master_params
from raydiology.train.schedules import weight_decay_at

CHECKPOINT_TAG = "deepspeed"
EXPORT_DIR = "export"
PICTURE = "reconstruction.png"
PICTURE_ARRAYS = Path(PICTURE).with_suffix(".npz").name  # its arrays, saved beside it
CONSUMED = "consumed"  # per-rank row keys seen in the checkpoint's epoch

# Ray Train routes worker logging to the driver console and its log files; a bare print
# would be teed to both and show up twice.
log = logging.getLogger("raydiology.train")


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint so a restart continues from here."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    from raydiology.train import validation

    exp = experiment_from_dict(loop_config["experiment"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = _device(exp)

    collectives.bind_device(device)
    prepare_cuda_builds()

    train = exp.train
    ds_config = deepspeed_config(train, world_size=world, on_gpu=device.type == "cuda")
    model, objective, zero3 = build_for_training(exp, ds_config)
    if rank == 0 and zero3 is not None:
        log.info("ZeRO-3: Hugging Face models were built partitioned over %d ranks", world)
    engine = training_engine(objective, train, ds_config)
    state, consumed = _restore(engine)
    if rank == 0 and state.step:
        log.info("resumed from step %d (epoch %d, %d images of it already seen)",
                 state.step, state.epoch, len(consumed))  # fmt: skip

    shard = ray.train.get_dataset_shard("train")
    # Validation (report SFT): decode the selection split at checkpoints, report val_* metrics.
    selection = validation.selection_of(exp)
    val_shard = None
    if selection is not None:
        if not hasattr(engine.module, "validation_rows"):
            raise TypeError(f"objective {exp.objective.name!r} cannot validate: set eval_every 0")
        val_shard = ray.train.get_dataset_shard(validation.VAL_DATASET)
    param_dtype = next(engine.module.parameters()).dtype
    # An objective that cuts its own views (DINOv2) takes its images in fp32: bf16 would
    # round a 16-bit source to 8 significant bits before its crops and intensity changes.
    input_dtype = getattr(engine.module, "input_dtype", None) or param_dtype
    generator = torch.Generator(device=device)
    picture_batch: torch.Tensor | None = None
    window = _Window()
    telemetry = TrainMetrics.for_worker(exp, rank=rank, model=model)  # Prometheus, per worker

    while state.step < train.max_steps:
        seen: list[np.ndarray] = []  # row keys this rank trained on in this epoch
        # Ranks stop an epoch together (sampling and resumes can leave them unequal),
        # agreeing once per `sync_every` micro-batches rather than once per micro-batch.
        batches = _Timed(_epoch_batches(shard, train, skip=consumed, epoch=state.epoch), window)
        for batch in collectives.in_step(batches, lookahead=train.sync_every):
            seen.append(batch.pop("row_key").numpy())
            batch = {  # text columns (e.g. reports) stay lists of str
                k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()
            }
            batch["image"] = to_model_input(batch["image"], exp.data, dtype=input_dtype)
            if picture_batch is None:
                picture_batch = batch["image"][: train.reconstruction_images].detach().clone()

            generator.manual_seed(_mask_seed(train.seed, rank, state.step, len(seen)))
            out = engine(batch, generator=generator)
            engine.backward(out["loss"])
            _set_weight_decay(
                engine,
                weight_decay_at(state.step, optimizer=train.optimizer, max_steps=train.max_steps),
            )
            # Asked before step(): afterwards DeepSpeed already answers for the next micro-batch.
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()  # the optimizer steps only on the boundary micro-batch
            window.add(out, images=batch["image"].shape[0])
            if not boundary:
                continue
            state.step += 1
            window.end_step()
            # e.g. an EMA teacher's update or a temperature schedule (DINOv2), reading the
            # student's fp32 master weights, not the bf16/fp16-rounded module's
            after_step = getattr(engine.module, "after_step", None)
            if after_step is not None:
                after_step(state.step, train.max_steps, partial(master_params, engine))
            last = state.step >= train.max_steps
            save = state.step % train.checkpoint_every == 0 or last
            # With validation on, every checkpoint is validated and every validation is
            # checkpointed: the best checkpoint is chosen on its score.
            validating = val_shard is not None and (save or state.step % train.eval_every == 0)
            save = save or validating
            if save or state.step % train.log_every == 0:
                metrics = window.report(engine, state, world)
                if device.type == "cuda":
                    metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                telemetry.record(
                    metrics,
                    images=window.images,
                    seconds=window.elapsed(),
                    step_waits=window.step_waits,
                    device=device,
                )
                if rank == 0:
                    _print_progress(metrics, train.max_steps)
                if validating:
                    scores, rows = validation.validate(
                        engine.module, val_shard, exp=exp, device=device, dtype=param_dtype
                    )
                    metrics.update(scores)
                    if rank == 0:
                        _print_validation(scores, rows)
                if save:
                    _checkpoint(
                        engine,
                        state,
                        metrics,
                        # rank 0 carries what was seen before the resume, once
                        consumed=np.concatenate([consumed if rank == 0 else consumed[:0], *seen]),
                        exp=exp,
                        loop_config=loop_config,
                        picture_batch=picture_batch if last else None,
                        # the best validated checkpoint is exported, so each one carries it
                        export=last or validating,
                        rank=rank,
                    )
                else:
                    ray.train.report(metrics)
                window.reset()  # time spent reporting and saving is not training throughput
            if last:
                break
        if state.step >= train.max_steps:
            break
        if not seen and not len(consumed):
            raise RuntimeError(
                f"worker {rank} got no batch of {train.micro_batch_size} images: the corpus "
                "is smaller than num_workers x micro_batch_size (after `data.splits`)"
            )
        state.epoch += 1
        consumed = np.zeros(0, dtype=np.int64)


def build_for_training(exp: Experiment, ds_config: dict[str, Any]) -> tuple[Any, Any, Any]:
    """Model and objective from the registry, plus the ZeRO-3 marker to keep alive (or None).

    Under ZeRO-3 a `transformers` HfDeepSpeedConfig is made first: while it lives,
    `from_pretrained` / `from_config` build their model inside `deepspeed.zero.Init` with
    this DeepSpeed config, so a 7B LLM is partitioned as it is built (and loaded shard by
    shard) instead of sitting whole on every rank. Other modules (encoders, projectors)
    are built whole and partitioned by `deepspeed.initialize`: their initialisers write
    into sub-modules after construction, which a blanket zero.Init would silently skip.
    """
    zero3 = None
    if exp.train.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        zero3 = HfDeepSpeedConfig(ds_config)  # read by transformers through a weakref
    torch.manual_seed(exp.train.seed)  # identical initial weights on every rank
    model = build_model(exp.model, exp.data)
    objective = build_objective(exp.objective, model)
    return model, objective, zero3


Batch = dict[str, Any]  # column -> tensor [B, ...] or list[str] of B texts


def _epoch_batches(shard, train, *, skip: np.ndarray, epoch: int = 0) -> Iterator[Batch]:
    """One epoch of exact micro-batches from this worker's shard, on the CPU.

    The local shuffle is seeded by (train.seed, epoch): each epoch mixes differently, and a
    resumed epoch takes its own epoch's seed, not the first's.

    Rows whose key is in `skip` (seen before a resume in this epoch) are dropped and the
    batches refilled, so a resumed epoch neither repeats nor skips an image.
    """
    batches = shard.iter_torch_batches(
        batch_size=train.micro_batch_size,
        drop_last=True,
        prefetch_batches=train.prefetch_batches,
        local_shuffle_buffer_size=train.local_shuffle_buffer or None,
        local_shuffle_seed=(
            int(np.random.SeedSequence([train.seed, epoch]).generate_state(1)[0])
            if train.local_shuffle_buffer
            else None
        ),
        collate_fn=collate,
    )
    if not len(skip):
        yield from batches
        return
    pending: list[Batch] = []
    have = 0
    for batch in batches:
        keep = ~np.isin(batch["row_key"].numpy(), skip)
        if not keep.any():
            continue
        pending.append({k: _rows(v, keep) for k, v in batch.items()})
        have += int(keep.sum())
        while have >= train.micro_batch_size:
            merged = {k: _concat([p[k] for p in pending]) for k in pending[0]}
            size = train.micro_batch_size
            yield {k: v[:size] for k, v in merged.items()}
            rest = {k: v[size:] for k, v in merged.items()}
            have -= size
            pending = [rest] if have else []


def _rows(column: torch.Tensor | list[str], keep: np.ndarray) -> torch.Tensor | list[str]:
    if isinstance(column, torch.Tensor):
        return column[torch.from_numpy(keep)]
    return [text for text, kept in zip(column, keep, strict=True) if kept]


def _concat(parts: list[Any]) -> torch.Tensor | list[str]:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return [text for part in parts for text in part]


class _Timed:
    """Adds the time its consumer waits in `next` to the window's data wait."""

    def __init__(self, items: Iterator[Batch], window: _Window) -> None:
        self.items, self.window = items, window

    def __iter__(self) -> _Timed:
        return self

    def __next__(self) -> Batch:
        started = time.perf_counter()
        try:
            return next(self.items)
        finally:
            self.window.data_wait += time.perf_counter() - started


def _device(exp: Experiment) -> torch.device:
    if exp.scaling.use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _mask_seed(seed: int, rank: int, step: int, micro: int) -> int:
    # Distinct masks per rank and step, reproducible after a resume.
    return (seed * 1_000_003 + rank * 7919 + step * 131 + micro) % (2**63 - 1)


def _set_weight_decay(engine, value: float) -> None:
    for group in engine.optimizer.param_groups:
        if group.get("weight_decay", 0.0) > 0.0:
            group["weight_decay"] = value


class _Window:
    """Running sums between two reports, kept on the device: no host sync per micro-batch."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.count = 0
        self.images = 0
        self.data_wait = 0.0
        self.step_waits: list[float] = []  # data wait of each optimizer step, for the histogram
        self._waited_before = 0.0
        self.started = time.perf_counter()

    def end_step(self) -> None:
        self.step_waits.append(self.data_wait - self._waited_before)
        self._waited_before = self.data_wait

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def add(self, out: dict[str, Any], *, images: int) -> None:
        for key, value in out.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1
        self.images += images

    def report(self, engine, state: TrainState, world: int) -> dict[str, Any]:
        # The host waits for the device here, once per report. The loss is averaged over
        # every rank so all ranks report the same number.
        sums = {key: float(value) for key, value in self.sums.items()}
        loss = collectives.all_reduce_(
            torch.tensor([sums.get("loss", 0.0), self.count], dtype=torch.float64)
        )
        elapsed = self.elapsed()
        metrics = {
            "step": state.step,
            "epoch": state.epoch,
            "loss": float(loss[0] / loss[1].clamp(min=1)),
            "lr": float(engine.get_lr()[0]),
            "images_per_s": self.images * world / elapsed,
            "data_wait_s_per_step": self.data_wait / max(1, len(self.step_waits)),
        }
        grad_norm = engine.get_global_grad_norm()  # cached by DeepSpeed at the last step
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        metrics.update({k: v / max(1, self.count) for k, v in sums.items() if k != "loss"})
        return metrics


def _print_progress(metrics: dict[str, Any], max_steps: int) -> None:
    log.info(
        "step %d/%d  loss %.4f  lr %.2e  %.1f img/s  data wait %.0f ms/step",
        metrics["step"],
        max_steps,
        metrics["loss"],
        metrics["lr"],
        metrics["images_per_s"],
        metrics["data_wait_s_per_step"] * 1000,
    )


def _print_validation(scores: dict[str, float], rows: list[dict[str, str]]) -> None:
    log.info(
        "validation: %d reports in %.1f s  BLEU-4 %.4f  CIDEr %.4f  score %.4f",
        scores["val_reports"],
        scores["val_seconds"],
        scores.get("val_BLEU_4", float("nan")),
        scores.get("val_CIDEr", float("nan")),
        scores["val_score"],
    )
    if rows:
        log.info("  e.g. generated: %s\n       reference: %s", rows[0]["prediction"],
                 rows[0]["reference"])  # fmt: skip


def _restore(engine) -> tuple[TrainState, np.ndarray]:
    """Engine state, where the run is, and the row keys every rank saw in the current epoch.

    Ray hands every rank the run's latest checkpoint. One whose files do not match the
    manifests its ranks wrote (a truncated upload, a file lost on shared storage) is
    skipped, with a warning naming it, for the newest intact checkpoint Ray kept. Rank 0
    checks and tells the others, so every rank loads the same one.
    """
    import ray.train

    from raydiology.train.safe_load import weights_only_checkpoint_engine

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState(), np.zeros(0, dtype=np.int64)
    chosen = collectives.broadcast_object(
        _intact_checkpoint(checkpoint) if collectives.rank() == 0 else None
    )
    if chosen is None:
        raise RuntimeError(
            f"no intact checkpoint to resume from (the latest: {checkpoint.path}); delete the "
            "run's folder or pick another output.name to start afresh"
        )
    if chosen != checkpoint.path:
        checkpoint = ray.train.Checkpoint(chosen, filesystem=checkpoint.filesystem)
    with checkpoint.as_directory() as folder, weights_only_checkpoint_engine(engine):
        _, client_state = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
        seen = [
            np.load(p, allow_pickle=False) for p in sorted(Path(folder).glob(f"{CONSUMED}/*.npy"))
        ]
    state = TrainState(**(client_state or {}).get("train_state", {}))
    return state, np.unique(np.concatenate(seen)) if seen else np.zeros(0, dtype=np.int64)


def _checkpoint(
    engine,
    state: TrainState,
    metrics: dict[str, Any],
    *,
    consumed: np.ndarray,
    exp: Experiment,
    loop_config: dict[str, Any],
    picture_batch: torch.Tensor | None,
    export: bool,
    rank: int,
) -> None:
    """Every rank writes its DeepSpeed shard; Ray Train merges them into one checkpoint.

    With `export` the checkpoint also carries the exported encoder (and the objective's
    extra export), with `picture_batch` the reconstruction picture, so they reach the run's
    storage however remote it is. The final checkpoint has both; with validation on, every
    validated one is exported, as the best of them becomes the run's export.
    """
    import ray.train

    from raydiology.train.export import export_encoder, master_weights, save_reconstruction

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / CONSUMED).mkdir()
        np.save(Path(folder) / CONSUMED / f"rank-{rank:05d}.npy", consumed.astype(np.int64))
        engine.save_checkpoint(
            folder, tag=CHECKPOINT_TAG, client_state={"train_state": asdict(state)}
        )
        if picture_batch is not None:
            # Every rank runs the forward (ZeRO-3 needs all ranks); rank 0 writes.
            errors = save_reconstruction(
                engine.module,
                picture_batch,
                exp.data,
                Path(folder) / PICTURE,
                write=rank == 0,
                seed=exp.train.seed,
                caption=loop_config.get("attribution"),
            )
            if rank == 0:
                metrics = {**metrics, "picture": PICTURE if errors else None, **(errors or {})}
        if export:
            # Under ZeRO-3 every rank holds a slice of each weight: gather them (all ranks
            # take part) before rank 0 writes; for stages 0-2 this is a no-op.
            import deepspeed

            encoder_params = list(engine.module.encoder.parameters())
            with deepspeed.zero.GatheredParameters(
                encoder_params, enabled=exp.train.zero_stage == 3
            ):
                # DeepSpeed's fp32 master weights, not the bf16-rounded module's; gathered
                # from the optimizer's partitions, so every rank takes part.
                weights = master_weights(engine, engine.module.encoder, keep=rank == 0)
                if rank == 0:
                    export_encoder(
                        engine.module,
                        Path(folder) / EXPORT_DIR,
                        exp=exp,
                        corpus_sha256=loop_config.get("corpus_sha256"),
                        step=state.step,
                        weights=weights,
                    )
            # An objective's own export beside the encoder (a report generator's projector,
            # adapters and tokenizer); every rank calls it, as ZeRO-3 gathers need them all.
            export_extra = getattr(engine.module, "export_extra", None)
            if export_extra is not None:
                export_extra(
                    Path(folder) / EXPORT_DIR, write=rank == 0, gather=exp.train.zero_stage == 3
                )
        if rank == 0:
            (Path(folder) / "train_state.json").write_text(json.dumps(asdict(state)))
        # Last: the files this rank wrote, so a restore can tell a damaged checkpoint.
        _write_manifest(Path(folder), rank=rank, world=ray.train.get_context().get_world_size())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


MANIFEST = "manifest"  # per-rank {"world", "files": {path: {size, sha256}}} in a checkpoint


def _write_manifest(folder: Path, *, rank: int, world: int) -> None:
    files = {
        path.relative_to(folder).as_posix(): {
            "size": path.stat().st_size,
            "sha256": file_sha256(path),
        }
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    (folder / MANIFEST).mkdir()
    record = {"world": world, "files": files}
    (folder / MANIFEST / f"rank-{rank:05d}.json").write_text(json.dumps(record, indent=1))


def checkpoint_problem(folder: str | Path) -> str | None:
    """What is wrong with a checkpoint folder against its ranks' manifests, or None.

    A file listed by several ranks (each wrote its own copy) must match one of them. A
    checkpoint without manifests (written before they existed) cannot be checked: None.
    """
    folder = Path(folder)
    records = sorted((folder / MANIFEST).glob("rank-*.json"))
    if not records:
        return None
    wanted: dict[str, list[dict[str, Any]]] = {}
    worlds = set()
    for path in records:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return f"{path.relative_to(folder)} is unreadable"
        worlds.add(record["world"])
        for name, entry in record["files"].items():
            wanted.setdefault(name, []).append(entry)
    world = max(worlds)
    if len(records) != world:
        return f"{MANIFEST}/ holds {len(records)} rank manifests of a {world}-rank checkpoint"
    for name, entries in sorted(wanted.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if all(size != e["size"] for e in entries):
            return f"{name} has {size} bytes, {entries[0]['size']} were written"
        digest = file_sha256(path)
        if all(digest != e["sha256"] for e in entries):
            return f"{name} differs from what was written (sha256)"
    return None


def _intact_checkpoint(latest) -> str | None:
    """The latest checkpoint's path if it is intact, else the newest intact one Ray kept."""
    import ray.train

    def problem(checkpoint) -> str | None:
        with checkpoint.as_directory() as folder:
            return checkpoint_problem(folder)

    found = problem(latest)
    if found is None:
        return str(latest.path)
    log.warning("checkpoint %s is damaged: %s; looking for an earlier one", latest.path, found)
    kept = sorted(
        (r for r in ray.train.get_all_reported_checkpoints() if r.checkpoint.path != latest.path),
        key=lambda r: r.metrics.get("step", -1),
        reverse=True,
    )
    for reported in kept:
        found = problem(reported.checkpoint)
        if found is None:
            log.warning("resuming from the checkpoint before it, %s (step %s)",
                        reported.checkpoint.path, reported.metrics.get("step"))  # fmt: skip
            return str(reported.checkpoint.path)
        log.warning("checkpoint %s is damaged too: %s", reported.checkpoint.path, found)
    return None

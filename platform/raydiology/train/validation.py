"""Validation while training: decode the selection split, score it, report it.

An objective validates when its config carries checkpoint-selection settings (`selection`:
metric weights and split, e.g. `objectives.report_sft.SelectionSettings`) and the objective
has `validation_rows(batch, *, synced_gpus) -> [{"reference", "prediction"}]` and
`validation_batch_size`. With `train.eval_every > 0` the launcher gives the trainer a second
dataset, "val" (that split, in corpus order, no augmentation), and the loop validates at
every checkpoint and every `eval_every` steps. Every rank decodes its shard in step with
the others, rank 0 scores all rows and broadcasts, so every rank reports the same `val_*`
numbers; Ray Train keeps the checkpoints with the best `val_score`, and sweeps see the
metrics as trial results.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the driver imports this module; torch loads on the workers only
    import torch

    from raydiology.config import Experiment

VAL_DATASET = "val"
SCORE = "val_score"
PREFIX = "val_"
# What pycocoevalcap computes in-process; METEOR starts a JVM and is scored only when asked.
IN_PROCESS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr")

Row = dict[str, str]  # {"reference", "prediction"}


def selection_of(exp: Experiment) -> Any | None:
    """The objective's selection settings when validation is on (`eval_every > 0`), else None."""
    if exp.train.eval_every <= 0:
        return None
    return getattr(exp.objective.config, "selection", None)


def validation_data(exp: Experiment):
    """The data section for the "val" dataset: the selection split, in corpus order, no
    augmentation and no anatomy resampling, so every validation sees the same images."""
    from dataclasses import replace

    from raydiology.config import AugmentConfig

    selection = selection_of(exp)
    if selection is None:
        raise ValueError(
            "validation is off: train.eval_every is 0 or the objective cannot validate"
        )
    return replace(
        exp.data,
        splits=(selection.split,),
        shuffle_seed=None,
        augment=AugmentConfig(),
        anatomy_weights=None,
    )


def score_reports(
    references: Sequence[str], predictions: Sequence[str], names: Sequence[str] = IN_PROCESS
) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr of predictions against references (one each), scored as
    `evaluation.nlg.nlg_scores` scores them (no PTB tokenizer), without its METEOR JVM; if
    `names` asks for METEOR, all of `nlg_scores`."""
    if set(names) - set(IN_PROCESS):
        from raydiology.evaluation.nlg import nlg_scores

        return nlg_scores(references, predictions)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not references:
        raise ValueError("no reports to score")
    gts = {i: [" ".join(r.split())] for i, r in enumerate(references)}
    res = {i: [" ".join(p.split())] for i, p in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU_{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def score_rows(rows: Sequence[Row], selection: Any) -> dict[str, float]:
    """Rows of every rank -> {"val_BLEU_4", "val_CIDEr", ..., "val_score", "val_reports"}."""
    if not rows:
        raise ValueError(
            f"no validation reports: the corpus has no rows in split {selection.split!r} "
            "(objective.selection.split), or fewer than one per worker"
        )
    scores = score_reports(
        [r["reference"] for r in rows], [r["prediction"] for r in rows], list(selection.weights)
    )
    metrics = {f"{PREFIX}{name}": value for name, value in scores.items()}
    metrics[SCORE] = selection.score(scores)
    metrics[f"{PREFIX}reports"] = len(rows)
    return metrics


def gather_scores(rows: list[Row], selection: Any) -> tuple[dict[str, float], list[Row]]:
    """This rank's rows -> (the same metrics on every rank, all rows on rank 0 / [] elsewhere).

    Rank 0 gathers every rank's rows and scores them; the others receive the numbers (or
    rank 0's error, so that every rank fails together rather than hang in a collective).
    """
    from raydiology.train import collectives

    if not collectives.active():
        return score_rows(rows, selection), rows
    everyone = collectives.gather_objects(rows, dst=0)
    every_row: list[Row] = []
    outcome: Any = None
    if everyone is not None:  # rank 0
        every_row = [row for part in everyone for row in part]
        try:
            outcome = score_rows(every_row, selection)
        except Exception as error:  # sent to every rank, raised there
            outcome = f"{type(error).__name__}: {error}"
    outcome = collectives.broadcast_object(outcome, src=0)
    if isinstance(outcome, str):
        raise RuntimeError(f"validation failed on rank 0: {outcome}")
    return outcome, every_row


def validate(
    objective: Any,
    shard: Any,
    *,
    exp: Experiment,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[dict[str, float], list[Row]]:
    """Decode this rank's "val" shard and score every rank's reports together.

    Ranks take batches in step and stop together (the shards are split equally, so nothing
    is left over); under ZeRO-3 each forward gathers weights from every rank, so generation
    runs with `synced_gpus`. Returns the metrics (the same on every rank but `val_seconds`,
    this rank's wall time) and, on rank 0, the rows scored.
    """
    import torch

    from raydiology.data.pipeline import collate, to_model_input
    from raydiology.train import collectives

    synced = exp.train.zero_stage == 3 and collectives.active()
    batches = shard.iter_torch_batches(
        batch_size=objective.validation_batch_size, drop_last=False, collate_fn=collate
    )
    started = time.perf_counter()
    rows: list[Row] = []
    for batch in collectives.in_step(batches, lookahead=exp.train.sync_every):
        batch.pop("row_key", None)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch["image"] = to_model_input(batch["image"], exp.data, dtype=dtype)
        with torch.no_grad():
            rows += objective.validation_rows(batch, synced_gpus=synced)
    metrics, every_row = gather_scores(rows, selection_of(exp))
    return {**metrics, f"{PREFIX}seconds": time.perf_counter() - started}, every_row

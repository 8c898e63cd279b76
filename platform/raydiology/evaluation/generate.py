"""Reports from a trained report generator: rebuild it from a run's export, read a corpus
split, decode with the run's beam-search settings, and write the run-results files the
leaderboard reads (`evaluation/leaderboard.py`):

    <run>/eval/predictions.jsonl  one {"id", "reference", "prediction"} per image (per study,
                                  id = study_id, for a model trained on multi-view studies),
                                  the input of `raydiology eval`; the first few rows also name
                                  "image", a thumbnail under eval/images/ for the leaderboard
    <run>/eval/run.json           method, encoder, decoder, trainable parameters, the
                                  evaluation protocol, and test time: generation alone (the
                                  model loaded and warmed up on one batch first), in total
                                  and per report
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydiology.config_base import from_dict
from raydiology.evaluation.protocol import Protocol, get_protocol, reference_text


def find_export(path: str | Path) -> Path:
    """A run directory or its export folder -> the export folder holding generator.json."""
    from raydiology.objectives.report_sft import GENERATOR_SPEC
    from raydiology.train.export import find_export_folder

    return find_export_folder(path, GENERATOR_SPEC, "report-generator")


def load_generator(export_or_run_dir: str | Path, *, device: str | torch.device = "cpu"):
    """The trained generator wrapped in its objective (`.generate(images)`), in eval mode,
    plus the export's encoder spec (image size, channels, mean, std)."""
    from safetensors.torch import load_file

    from raydiology.data.tokenizers import ReportTokenizer
    from raydiology.objectives.report_sft import (
        GENERATOR_SPEC,
        ReportSFTConfig,
        build_report_sft,
    )
    from raydiology.registry import MODELS
    from raydiology.train.export import SPEC, WEIGHTS

    folder = find_export(export_or_run_dir)
    spec: dict[str, Any] = json.loads((folder / SPEC).read_text())
    extra: dict[str, Any] = json.loads((folder / GENERATOR_SPEC).read_text())
    section = {k: v for k, v in spec["model"].items() if k != "name"}
    entry = MODELS.get(spec["model"]["name"])  # report_generator or r2gen
    cfg: Any = from_dict(entry.config_cls, section, "model")
    tokenizer = ReportTokenizer.load(folder / extra["tokenizer"])
    model = entry.builder(
        cfg, image_size=spec["image_size"], in_chans=spec["in_chans"], tokenizer=tokenizer
    )
    model.encoder.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    rest = load_file(str(folder / extra["weights"]))
    missing, unexpected = model.load_state_dict(rest, strict=False)
    # Not in the file: the encoder (loaded above) and a frozen LLM read from llm.path.
    stray = [k for k in missing if not k.startswith("encoder.") and not (
        k.startswith("llm.") and getattr(model, "llm_from_path", False))]  # fmt: skip
    if unexpected or stray:
        raise ValueError(f"{folder}: export does not fit the generator: {unexpected or stray}")
    objective_section = {k: v for k, v in extra["objective"].items() if k != "name"}
    objective = build_report_sft(
        from_dict(ReportSFTConfig, objective_section, "objective"), model=model
    )
    return objective.to(device).eval(), spec


@torch.no_grad()
def generate_reports(
    export_or_run_dir: str | Path,
    corpus: str | Path,
    split: str | None = "test",
    *,
    out: str | Path | None = None,
    limit: int | None = None,
    device: str | torch.device = "cpu",
    generation: dict[str, Any] | None = None,
    study_views: int | None = None,
    protocol: str | Protocol | None = None,
) -> list[dict[str, str]]:
    """Generate a report for every image of `corpus` in `split` (None = all rows).

    `study_views` > 1 generates one report per study from up to that many views, as a model
    trained with `data.study_views` saw them; None = the run's own setting (its config.yaml),
    and `limit` then counts studies.
    `generation` overrides the run's beam-search settings (e.g. {"num_beams": 1}). The
    reference is built by the evaluation protocol (`evaluation/protocol.py`; None = the run's
    `evaluation.protocol`): which report section, cleaned how, cut where. Rows without that
    section are left out, as R2Gen leaves them out. Writes `out` (default:
    `<run>/eval/predictions.jsonl`) and `run.json` beside it; returns the rows.
    """
    import pyarrow.compute as pc

    from raydiology.config import DataConfig
    from raydiology.data.corpus import read_rows
    from raydiology.data.pipeline import preprocess_batch, study_chunks, to_model_input
    from raydiology.objectives.report_sft import GenerationSettings

    objective, spec = load_generator(export_or_run_dir, device=device)
    if generation:
        merged = {**_as_dict(objective.cfg.generation), **generation}
        objective.cfg.generation = from_dict(GenerationSettings, merged, "generation")
    export = find_export(export_or_run_dir)
    run_dir = export.parent if export.name == "export" else export
    trained = _trained_config(run_dir)
    views = study_views if study_views is not None else int(trained["data"].get("study_views") or 1)
    if not isinstance(protocol, Protocol):
        protocol = get_protocol(protocol or trained["evaluation"].get("protocol", "raydiology"))
    data = from_dict(
        DataConfig,
        {"resolution": spec["image_size"], "channels": spec["in_chans"],
         "mean": spec["mean"], "std": spec["std"], "study_views": views},
        "data",
    )  # fmt: skip
    column = protocol.column
    table = read_rows(corpus)
    if column not in table.column_names:
        raise ValueError(
            f"{corpus}: no {column!r} column, which evaluation protocol {protocol.name!r} scores "
            f"(its report_field is {protocol.report_field}); ingest reports whose source has "
            "sections (a phantom corpus made before sections were kept: delete it to remake it)"
        )
    if split is not None and "split" in table.column_names:
        table = table.filter(pc.equal(table.column("split"), split))
    # rows without the scored section are left out, as R2Gen leaves such studies out
    text = pc.utf8_trim_whitespace(table.column(column))
    with_section = table.filter(pc.fill_null(pc.greater(pc.utf8_length(text), 0), False))
    skipped, table = table.num_rows - with_section.num_rows, with_section
    step = objective.cfg.generation.batch_size
    if views > 1:
        if "study_id" not in table.column_names:
            raise ValueError(f"{corpus}: no study_id column to group {views} views by")
        studies = list(study_chunks(table, 1, views))[:limit]  # one (start, rows) per study
        chunks = [
            (studies[i][0], sum(rows for _, rows in studies[i : i + step]))
            for i in range(0, len(studies), step)
        ]
    else:
        if limit is not None:
            table = table.slice(0, limit)
        chunks = [(start, step) for start in range(0, table.num_rows, step)]
    tokenizer = objective.model.tokenizer
    path = Path(out) if out is not None else run_dir / "eval" / "predictions.jsonl"
    thumbnails = path.parent / "images"  # what the leaderboard's example picture shows
    thumbnails.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    generating = 0.0
    wanted = {"id": "image_id", "reference": column}
    if views > 1:
        wanted["study"] = "study_id"
    for index, (start, length) in enumerate(chunks):
        chunk = table.slice(start, length)
        batch = {
            name: chunk.column(name).to_numpy(zero_copy_only=False) for name in chunk.column_names
        }
        prepared = preprocess_batch(batch, data=data, label_columns=[], extra_columns=wanted)
        images = prepared["image"]  # [B, 1, R, R], or [B, V, 1, R, R] per study
        x = to_model_input(torch.from_numpy(images).to(device), data, dtype=torch.float32)
        mask = torch.from_numpy(prepared["view_mask"]).to(device) if views > 1 else None
        if index == 0:  # warm-up (allocator, kernels), left out of the test time
            _predict(objective, x[:1], None if mask is None else mask[:1])
        started = time.perf_counter()
        predictions = _predict(objective, x, mask)
        generating += time.perf_counter() - started
        # a study's id is its study_id (the image's own id where it has none)
        own = prepared["id"]
        ids = [s or i for s, i in zip(prepared.get("study", own), own, strict=True)]
        for image_id, report, prediction, image in zip(
            ids, prepared["reference"], predictions, images, strict=True
        ):
            reference = reference_text(str(report), protocol, tokenizer)
            row = {"id": str(image_id), "reference": reference, "prediction": prediction}
            if len(rows) < _THUMBNAILS:  # the first (frontal) view of a study
                first = image[0] if views > 1 else image
                name = str(image_id).replace("/", "_")
                row["image"] = _save_thumbnail(first[0], thumbnails / f"{name}.png")
            rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = describe_run(export, spec)
    info["protocol"] = protocol.describe()
    info["test_time_s"] = round(generating, 3)  # generation alone, warm-up excluded
    info["test_time_per_report_s"] = round(generating / max(len(rows), 1), 4)
    info["reports"], info["images_without_section"] = len(rows), skipped
    (path.parent / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return rows


_THUMBNAILS = 16  # images kept for the leaderboard's examples


def _trained_config(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The `data` and `evaluation` sections of the run's resolved experiment ({} without)."""
    import yaml

    config = run_dir / "config.yaml"
    raw = (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}
    return {section: raw.get(section) or {} for section in ("data", "evaluation")}


def _predict(objective: Any, images: torch.Tensor, view_mask: torch.Tensor | None) -> list[str]:
    """The run's beam search; multi-view studies go to the generator with their view mask."""
    if view_mask is None:
        return list(objective.generate(images))
    settings = {k: v for k, v in _as_dict(objective.cfg.generation).items() if k != "batch_size"}
    return list(objective.model.generate(images, view_mask=view_mask, **settings))


def _save_thumbnail(image: np.ndarray, path: Path) -> str:
    """The model's view of one study as an 8-bit PNG; returns its path relative to eval/."""
    from PIL import Image

    if image.dtype != np.uint8:
        image = (image.astype(np.float32) / 257.0).round().astype(np.uint8)  # 16 -> 8 bit
    Image.fromarray(image).save(path)
    return f"{path.parent.name}/{path.name}"


def describe_run(export: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """The leaderboard's description of a run: method, encoder, decoder, trainable params."""
    from raydiology.objectives.report_sft import GENERATOR_SPEC

    model = spec["model"]
    vision, llm = model.get("vision", {}), model.get("llm", {})
    if vision.get("path"):
        encoder = f"export {Path(vision['path']).parent.name or vision['path']}"
    elif vision.get("timm"):
        encoder = str(vision["timm"])
    else:
        section = vision.get("model", {})
        encoder = f"{section.get('name')}/{section.get('flavor', '-')}"
    if llm.get("path"):
        decoder = Path(llm["path"]).name
    elif model.get("name") == "report_generator":
        decoder = f"{llm.get('family')}/{model['flavor']}"
    else:  # a model that is its own decoder (r2gen)
        decoder = f"{model.get('name')}/{model['flavor']}"
    extra = json.loads((export / GENERATOR_SPEC).read_text())
    method, run = spec.get("experiment"), export.parent.name
    return {
        # the run name tells apart runs of one experiment (e.g. shallow vs deep alignment)
        "method": method if run in (method, "") else f"{method}: {run}",
        "encoder": encoder,
        "decoder": decoder,
        "trainable_params": extra["parameters"]["trainable"],
    }


def _as_dict(obj: Any) -> dict[str, Any]:
    from raydiology.config_base import to_dict

    return dict(to_dict(obj))

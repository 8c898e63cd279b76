"""Reports from a trained report generator: rebuild it from a run's export, read a corpus
split, decode with the run's beam-search settings, and write the run-results files the
leaderboard reads (`evaluation/leaderboard.py`):

    <run>/eval/predictions.jsonl  one {"id", "reference", "prediction"} per image, the input of
                                  `raydiology eval`; the first few rows also name "image",
                                  a thumbnail under eval/images/ for the leaderboard picture
    <run>/eval/run.json           method, encoder, decoder, trainable parameters, test time
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydiology.config_base import from_dict


def find_export(path: str | Path) -> Path:
    """A run directory or its export folder -> the export folder holding generator.json."""
    from raydiology.objectives.report_sft import GENERATOR_SPEC

    path = Path(path).expanduser()
    for folder in (path, path / "export"):
        if (folder / GENERATOR_SPEC).is_file():
            return folder
    raise FileNotFoundError(
        f"{path}: no report-generator export ({GENERATOR_SPEC}) here or in export/"
    )


def load_generator(export_or_run_dir: str | Path, *, device: str | torch.device = "cpu"):
    """The trained generator wrapped in its objective (`.generate(images)`), in eval mode,
    plus the export's encoder spec (image size, channels, mean, std)."""
    from safetensors.torch import load_file

    from raydiology.data.tokenizers import ReportTokenizer
    from raydiology.models.report_generator import ReportGeneratorConfig, build_report_generator
    from raydiology.objectives.report_sft import (
        GENERATOR_SPEC,
        ReportSFTConfig,
        build_report_sft,
    )
    from raydiology.train.export import SPEC, WEIGHTS

    folder = find_export(export_or_run_dir)
    spec: dict[str, Any] = json.loads((folder / SPEC).read_text())
    extra: dict[str, Any] = json.loads((folder / GENERATOR_SPEC).read_text())
    section = {k: v for k, v in spec["model"].items() if k != "name"}
    cfg = from_dict(ReportGeneratorConfig, section, "model")
    tokenizer = ReportTokenizer.load(folder / extra["tokenizer"])
    model = build_report_generator(
        cfg, image_size=spec["image_size"], in_chans=spec["in_chans"], tokenizer=tokenizer
    )
    model.encoder.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    rest = load_file(str(folder / extra["weights"]))
    missing, unexpected = model.load_state_dict(rest, strict=False)
    # Not in the file: the encoder (loaded above) and a frozen LLM read from llm.path.
    stray = [k for k in missing if not k.startswith("encoder.") and not (
        k.startswith("llm.") and model.llm_from_path)]  # fmt: skip
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
) -> list[dict[str, str]]:
    """Generate a report for every image of `corpus` in `split` (None = all rows).

    `generation` overrides the run's beam-search settings (e.g. {"num_beams": 1}). The
    reference is the corpus's report as the tokenizer sees it (R2Gen-cleaned when the
    tokenizer cleans), so metrics compare like with like. Writes `out` (default:
    `<run>/eval/predictions.jsonl`) and `run.json` beside it; returns the rows.
    """
    from raydiology.config import DataConfig
    from raydiology.data.corpus import read_rows
    from raydiology.data.pipeline import preprocess_batch, to_model_input
    from raydiology.objectives.report_sft import GenerationSettings

    started = time.perf_counter()
    objective, spec = load_generator(export_or_run_dir, device=device)
    if generation:
        merged = {**_as_dict(objective.cfg.generation), **generation}
        objective.cfg.generation = from_dict(GenerationSettings, merged, "generation")
    data = from_dict(
        DataConfig,
        {"resolution": spec["image_size"], "channels": spec["in_chans"],
         "mean": spec["mean"], "std": spec["std"]},
        "data",
    )  # fmt: skip
    column = objective.cfg.report_column
    table = read_rows(corpus)
    if split is not None and "split" in table.column_names:
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table.column("split"), split))
    if limit is not None:
        table = table.slice(0, limit)
    tokenizer = objective.model.tokenizer
    export = find_export(export_or_run_dir)
    run_dir = export.parent if export.name == "export" else export
    path = Path(out) if out is not None else run_dir / "eval" / "predictions.jsonl"
    thumbnails = path.parent / "images"  # what the leaderboard's example picture shows
    thumbnails.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    step = objective.cfg.generation.batch_size
    for start in range(0, table.num_rows, step):
        chunk = table.slice(start, step)
        batch = {
            name: chunk.column(name).to_numpy(zero_copy_only=False) for name in chunk.column_names
        }
        images = preprocess_batch(batch, data=data, label_columns=[])["image"]
        x = to_model_input(torch.from_numpy(images).to(device), data, dtype=torch.float32)
        predictions = objective.generate(x)
        for image_id, report, prediction, image in zip(
            batch["image_id"], batch[column], predictions, images, strict=True
        ):
            reference = tokenizer.prepare(str(report or ""))
            row = {"id": str(image_id), "reference": reference, "prediction": prediction}
            if len(rows) < _THUMBNAILS:
                row["image"] = _save_thumbnail(image[0], thumbnails / f"{image_id}.png")
            rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = describe_run(export, spec)
    info["test_time_s"] = round(time.perf_counter() - started, 3)
    (path.parent / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return rows


_THUMBNAILS = 16  # images kept for the leaderboard's examples


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
    decoder = (
        Path(llm["path"]).name if llm.get("path") else f"{llm.get('family')}/{model['flavor']}"
    )
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

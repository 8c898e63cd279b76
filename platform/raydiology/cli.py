"""`raydiology` command line: run experiments, make corpora, size models, benchmark."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from raydiology.config_base import ConfigError

app = typer.Typer(
    help="Experiment platform on Ray for X-ray foundation models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Inspect models.", no_args_is_help=True)
corpus_app = typer.Typer(help="Make and inspect corpora.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (print JSON).", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(corpus_app, name="corpus")
app.add_typer(bench_app, name="bench")

console = Console()
err = Console(stderr=True)

Profile = Annotated[
    str | None, typer.Option("--profile", help="overlay experiments/profiles/NAME.yaml")
]
Sets = Annotated[
    list[str] | None, typer.Option("--set", help="override: section.key=value (repeatable)")
]


def _load(experiment: Path, profile: str | None, sets: list[str] | None):
    from raydiology.config import load_experiment

    try:
        return load_experiment(experiment, profile=profile, overrides=sets or [])
    except ConfigError as e:
        err.print(f"[red]invalid experiment {experiment}[/]: {e}")
        raise typer.Exit(2) from None


@app.command()
def run(
    experiment: Annotated[Path, typer.Argument(help="experiment YAML file")],
    profile: Profile = None,
    set_: Sets = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address; default: start a local Ray")
    ] = None,
    dashboard_host: Annotated[
        str, typer.Option(help="embedded Ray's dashboard bind address")
    ] = "127.0.0.1",
) -> None:
    """Train an experiment on Ray Train + DeepSpeed; rerun with the same name to resume."""
    from raydiology.train.launch import run_experiment

    exp = _load(experiment, profile, set_)
    run_experiment(exp, address=address, dashboard_host=dashboard_host, console=console)


@model_app.command("params")
def model_params(experiment: Path, profile: Profile = None, set_: Sets = None) -> None:
    """Parameter counts per component, on the meta device (nothing allocated)."""
    import torch

    from raydiology.models import count_parameters
    from raydiology.registry import build_model

    exp = _load(experiment, profile, set_)
    with torch.device("meta"):
        model = build_model(exp.model, exp.data)
    counts = count_parameters(model)
    print(
        json.dumps(
            {
                "experiment": exp.name,
                "model": exp.model.name,
                "flavor": getattr(exp.model.config, "flavor", None),
                "image_size": exp.data.resolution,
                "in_chans": exp.data.channels,
                **counts,
            },
            indent=2,
        )
    )


@app.command()
def ingest(
    sources: Annotated[list[Path], typer.Argument(help="folders of PNG/JPEG images")],
    out: Annotated[Path, typer.Option("--out", help="corpus folder to write")],
    size: Annotated[int, typer.Option(help="stored square side, pixels")] = 1024,
    resize: Annotated[str, typer.Option(help="pad (keep aspect, zero-pad) or stretch")] = "pad",
    bit_depth: Annotated[int, typer.Option(help="8 or 16")] = 8,
    attribution: Annotated[
        str | None, typer.Option(help="credit the images' licence requires; shown under pictures")
    ] = None,
) -> None:
    """Turn folders of radiographs into a corpus (Parquet shards + manifest.json)."""
    from raydiology.data.ingest import ingest_images

    if resize not in ("pad", "stretch") or bit_depth not in (8, 16):
        err.print("[red]--resize must be pad or stretch, --bit-depth 8 or 16[/]")
        raise typer.Exit(2)
    summary = ingest_images(
        list(sources),
        out,
        size=size,
        resize=resize,  # type: ignore[arg-type]  # checked just above
        bit_depth=bit_depth,  # type: ignore[arg-type]
        attribution=attribution,
    )
    console.print(
        f"found {summary.found}: ingested {summary.ingested}, quarantined {summary.quarantined}, "
        f"duplicates {summary.duplicates} -> {out}"
    )
    if summary.quarantine_file:
        console.print(f"quarantine list: {summary.quarantine_file}")


@corpus_app.command("phantom")
def corpus_phantom(
    out: Annotated[Path, typer.Option("--out", help="corpus folder to write")],
    n: Annotated[int, typer.Option("--n", help="number of images")] = 512,
    size: Annotated[int, typer.Option(help="image side, pixels")] = 256,
    seed: int = 0,
    finding_prob: Annotated[float, typer.Option(help="probability of each finding")] = 0.3,
) -> None:
    """Generate procedural chest radiograph phantoms with findings and reports."""
    from raydiology.data.phantom import write_phantom_corpus

    manifest = write_phantom_corpus(out, n=n, size=size, seed=seed, finding_prob=finding_prob)
    console.print(f"{manifest.rows} phantom images ({size}px) -> {out}")


@bench_app.command("data")
def bench_data(
    resolution: Annotated[int, typer.Option(help="model input side")] = 1280,
    images: Annotated[int, typer.Option(help="images to time per method")] = 256,
    corpus: Annotated[
        Path | None, typer.Option(help="corpus to read; default: a phantom corpus")
    ] = None,
    batch_size: int = 16,
    cpus: Annotated[int | None, typer.Option(help="cores for each method; default: all")] = None,
) -> None:
    """Images/s into a training worker's batches vs a DataLoader+PIL baseline and the ceiling."""
    from raydiology.bench.data import run_data_benchmark

    result = run_data_benchmark(
        resolution=resolution,
        images=images,
        corpus=corpus,
        batch_size=batch_size,
        cpus=cpus,
        console=err,
    )
    print(json.dumps(result, indent=2))


def main() -> None:  # pragma: no cover
    try:
        app()
    except ConfigError as e:
        err.print(f"[red]{e}[/]")
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()

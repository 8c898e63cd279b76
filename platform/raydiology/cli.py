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


REPORT_KINDS = ("openi", "r2gen-iu", "r2gen-mimic", "chexpert-plus", "mimic")


@app.command()
def ingest(
    sources: Annotated[
        list[Path], typer.Argument(help="folders (DICOM/PNG/JPEG), image files or CSV file lists")
    ],
    out: Annotated[Path, typer.Option("--out", help="corpus folder to write")],
    size: Annotated[
        int, typer.Option(help="stored side (shortest side with --resize shortest)")
    ] = 1024,
    resize: Annotated[str, typer.Option(help="pad | stretch | shortest")] = "pad",
    bit_depth: Annotated[int, typer.Option(help="8 or 16")] = 8,
    near_dup_distance: Annotated[
        int, typer.Option(help="perceptual-hash bits for near duplicates; -1 = exact only")
    ] = 6,
    reports: Annotated[
        list[str] | None,
        typer.Option(
            help=f"report corpus KIND:PATH to join by file name; KIND in {REPORT_KINDS}; "
            "'openi' alone reads the copy inside torchxrayvision"
        ),
    ] = None,
    clean_reports: Annotated[str | None, typer.Option(help="R2Gen cleaning: iu | mimic")] = None,
    salt_env: Annotated[
        str,
        typer.Option(help="environment variable holding the id salt (kept out of shell history)"),
    ] = "RAYDIOLOGY_INGEST_SALT",
    source_map: Annotated[
        bool,
        typer.Option(help="also write source_map.csv (image id -> file; may identify patients)"),
    ] = False,
    attribution: Annotated[
        str | None, typer.Option(help="credit the images' licence requires; shown under pictures")
    ] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster; default: a local Ray")] = None,
) -> None:
    """Turn hospital exports into a clean corpus: decode, de-identify, deduplicate, shard."""
    import os

    from raydiology.data.ingest import ingest_images, report_columns
    from raydiology.train.launch import connect_ray

    if resize not in ("pad", "stretch", "shortest") or bit_depth not in (8, 16):
        err.print("[red]--resize must be pad, stretch or shortest; --bit-depth 8 or 16[/]")
        raise typer.Exit(2)
    if clean_reports not in (None, "iu", "mimic"):
        err.print(f"[red]--clean-reports {clean_reports!r}: expected iu or mimic[/]")
        raise typer.Exit(2)
    joined = report_columns(_read_reports(reports or []), clean=clean_reports) if reports else None  # type: ignore[arg-type]
    connect_ray(address, dashboard_host="127.0.0.1", console=err)
    summary = ingest_images(
        list(sources),
        out,
        size=size,
        resize=resize,  # type: ignore[arg-type]  # checked just above
        bit_depth=bit_depth,  # type: ignore[arg-type]
        salt=os.environ.get(salt_env, ""),
        attribution=attribution,
        near_duplicate_distance=None if near_dup_distance < 0 else near_dup_distance,
        reports=joined,
        write_source_map=source_map,
        parallel=True,
    )
    if summary.skipped_chunks == -1:
        console.print(f"{out} already holds this ingest; nothing to do")
    console.print(
        f"found {summary.found}: ingested {summary.ingested}, quarantined {summary.quarantined}, "
        f"duplicates {summary.duplicates} -> {out}"
    )
    for reason, count in sorted(summary.reasons.items(), key=lambda kv: -kv[1]):
        console.print(f"  quarantined: {count} x {reason}")
    if summary.quarantine_file:
        console.print(f"quarantine list: {summary.quarantine_file}")


def _read_reports(specs: list[str]):
    from raydiology.data import reports as corpora

    records = []
    for spec in specs:
        kind, _, path = spec.partition(":")
        if kind not in REPORT_KINDS or (not path and kind != "openi"):
            err.print(f"[red]--reports {spec!r}: expected KIND:PATH with KIND in {REPORT_KINDS}[/]")
            raise typer.Exit(2)
        if kind == "openi":
            records += corpora.read_openi(path or None)
        elif kind.startswith("r2gen-"):
            records += corpora.read_r2gen_annotation(path, dataset=kind.split("-")[1])  # type: ignore[arg-type]
        elif kind == "chexpert-plus":
            records += corpora.read_chexpert_plus(path)
        else:
            records += corpora.read_mimic_reports(path)
    return records


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


@corpus_app.command("stats")
def corpus_stats(
    corpus: Annotated[Path, typer.Argument(help="corpus folder")],
    sheet: Annotated[
        Path | None, typer.Option(help="contact sheet PNG; default CORPUS/contact_sheet.png")
    ] = None,
    n: Annotated[int, typer.Option(help="images on the contact sheet")] = 64,
    seed: int = 0,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Counts by view / anatomy / sex / split / bit depth, and a contact sheet of a sample."""
    from raydiology.data import stats

    counts = stats.corpus_stats(corpus)
    print(json.dumps(counts, indent=2) if json_out else stats.format_stats(counts))
    path = stats.contact_sheet(corpus, sheet or Path(corpus) / "contact_sheet.png", n=n, seed=seed)
    err.print(f"contact sheet: {path}")


@bench_app.command("data")
def bench_data(
    resolution: Annotated[
        list[int] | None, typer.Option(help="model input side; repeat for several")
    ] = None,
    images: Annotated[int, typer.Option(help="images to time per method")] = 256,
    corpus: Annotated[
        Path | None, typer.Option(help="corpus to read; default: phantoms at the largest side")
    ] = None,
    batch_size: int = 16,
    workers: Annotated[int, typer.Option(help="training workers consuming the split")] = 1,
    cpus: Annotated[int | None, typer.Option(help="cores for each method; default: all")] = None,
) -> None:
    """Images/s into training batches vs a DataLoader+PIL baseline and the bare-decode ceiling."""
    from raydiology.bench.data import run_data_benchmark

    results = run_data_benchmark(resolutions=resolution or [1280], images=images, corpus=corpus,
                                 batch_size=batch_size, cpus=cpus, workers=workers, console=err)  # fmt: skip
    print(json.dumps(results[0] if len(results) == 1 else {"runs": results}, indent=2))


def main() -> None:  # pragma: no cover
    try:
        app()
    except ConfigError as e:
        err.print(f"[red]{e}[/]")
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()

"""`raydiology` command line: run experiments, make corpora, size models, benchmark."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

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
# Messages are not wrapped: they name files, and a path broken over two lines cannot be copied.
err = Console(stderr=True, soft_wrap=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """A bad path, file or value given by the user: its message in red and exit code 2, not a
    traceback (CorpusError and ConfigError are among these)."""
    try:
        yield
    except (OSError, ValueError) as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None


Profile = Annotated[
    str | None, typer.Option("--profile", help="overlay experiments/profiles/NAME.yaml")
]
Sets = Annotated[
    list[str] | None, typer.Option("--set", help="override: section.key=value (repeatable)")
]
AllowChanges = Annotated[
    str | None,
    typer.Option(
        "--allow-changes",
        help="resume a run under these changed settings, e.g. train.max_steps,"
        "train.checkpoint_every (a section allows the keys under it)",
    ),
]
DecodePool = Literal["tasks", "actors"]


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
    cluster: Annotated[
        str | None, typer.Option(help="overlay ray_configs/NAME.yaml's scaling (a800, a100)")
    ] = None,
    allow_changes: AllowChanges = None,
) -> None:
    """Train an experiment on Ray Train + DeepSpeed; rerun with the same name to resume
    (changed settings are refused unless --allow-changes lists them)."""
    from raydiology.train.launch import ChangedSettings, run_experiment

    if cluster:  # the preset's scaling goes first, so an explicit --set still wins
        from raydiology.cluster.presets import load_preset

        try:
            set_ = [*load_preset(cluster).scaling_overrides(), *(set_ or [])]
        except ConfigError as e:
            err.print(f"[red]invalid cluster preset {cluster}[/]: {e}")
            raise typer.Exit(2) from None
    exp = _load(experiment, profile, set_)
    allowed = [k.strip() for k in (allow_changes or "").split(",") if k.strip()]
    try:
        run_experiment(
            exp,
            address=address,
            dashboard_host=dashboard_host,
            console=console,
            allow_changes=allowed,
        )
    except ChangedSettings as e:
        from rich.markup import escape

        err.print(f"[red]refused[/]: {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


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
        int,
        typer.Option(
            help="perceptual-hash bits for near duplicates (0: same hash; larger values drop "
            "distinct films in big corpora, see `bench dedup`); -1 = exact only"
        ),
    ] = 0,  # dedup.DEFAULT_MAX_DISTANCE
    allow_burned_in: Annotated[
        bool,
        typer.Option(
            help="keep DICOMs whose header says BurnedInAnnotation YES (text such as names "
            "may be burned into the pixels); quarantined by default"
        ),
    ] = False,
    clip_percentile: Annotated[
        float | None,
        typer.Option(
            help="clip each image to its P..100-P percentiles and stretch (0 <= P < 50); "
            "default: none, intensities keep the source's bit depth"
        ),
    ] = None,
    reports: Annotated[
        list[str] | None,
        typer.Option(
            help=f"report corpus KIND:PATH to join by file name; KIND in {REPORT_KINDS}; "
            "'openi' alone reads the copy inside torchxrayvision"
        ),
    ] = None,
    clean_reports: Annotated[
        str | None, typer.Option(help="R2Gen cleaning: iu | mimic | r2gengpt-mimic")
    ] = None,
    masks: Annotated[
        Path | None,
        typer.Option(
            help="segmentation masks: a folder of per-class folders of mask images named like "
            "the images (e.g. MASKS/heart/JPCLN001.png -> column mask_heart)"
        ),
    ] = None,
    salt_env: Annotated[
        str,
        typer.Option(help="environment variable holding the id salt (kept out of shell history)"),
    ] = "RAYDIOLOGY_INGEST_SALT",
    source_map: Annotated[
        bool,
        typer.Option(
            help="also write source_map.csv (image id -> file) and source paths in "
            "quarantine.jsonl / duplicates.jsonl (paths may identify patients)"
        ),
    ] = False,
    attribution: Annotated[
        str | None, typer.Option(help="credit the images' licence requires; shown under pictures")
    ] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster; default: a local Ray")] = None,
    chunk_rows: Annotated[int, typer.Option(help="files per decode task")] = 256,
    shard_rows: Annotated[int, typer.Option(help="images per shard (one write task each)")] = 1024,
    shuffle_seed: Annotated[
        int, typer.Option(help="seed of the stored row order (studies kept together)")
    ] = 0,
) -> None:
    """Turn hospital exports into a clean corpus: decode, de-identify, deduplicate, shard."""
    import os

    from raydiology.data.ingest import ingest_images, report_columns
    from raydiology.train.launch import connect_ray

    if resize not in ("pad", "stretch", "shortest") or bit_depth not in (8, 16):
        err.print("[red]--resize must be pad, stretch or shortest; --bit-depth 8 or 16[/]")
        raise typer.Exit(2)
    from raydiology.data.reports import CLEAN_STYLES

    if clean_reports is not None and clean_reports not in CLEAN_STYLES:
        err.print(f"[red]--clean-reports {clean_reports!r}: expected one of {CLEAN_STYLES}[/]")
        raise typer.Exit(2)
    if chunk_rows < 1 or shard_rows < 1:
        err.print("[red]--chunk-rows and --shard-rows must be positive[/]")
        raise typer.Exit(2)
    if clip_percentile is not None and not 0 <= clip_percentile < 50:
        err.print(f"[red]--clip-percentile {clip_percentile}: expected 0 <= P < 50[/]")
        raise typer.Exit(2)
    joined = report_columns(_read_reports(reports or []), clean=clean_reports) if reports else None  # type: ignore[arg-type]
    connect_ray(address, dashboard_host="127.0.0.1", console=err)
    with user_errors():  # e.g. DICOM without a salt, or --out holding another ingest
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
            masks=masks,
            write_source_map=source_map,
            chunk_rows=chunk_rows,
            shard_rows=shard_rows,
            allow_burned_in=allow_burned_in,
            clip_percentile=clip_percentile,
            shuffle_seed=shuffle_seed,
            parallel=True,
        )
    if summary.skipped_chunks == -1:
        console.print(f"{out} already holds this ingest; nothing to do")
    elif summary.skipped_chunks or summary.skipped_shards:
        console.print(f"resumed: {summary.skipped_chunks} decoded chunk(s) and "
                      f"{summary.skipped_shards} written shard(s) reused")  # fmt: skip
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
    n: Annotated[int, typer.Option("--n", help="number of studies")] = 512,
    size: Annotated[int, typer.Option(help="image side, pixels")] = 256,
    seed: int = 0,
    finding_prob: Annotated[float, typer.Option(help="probability of each finding")] = 0.3,
    views: Annotated[int, typer.Option(help="films per study: 1 (PA) or 2 (PA + lateral)")] = 1,
    masks: Annotated[
        bool, typer.Option(help="also write mask_lungs/heart/clavicles/lesion (PA films)")
    ] = False,
    boxes: Annotated[
        bool, typer.Option(help="also write the lesion's box + report phrase (PA films)")
    ] = False,
    pose: Annotated[
        float,
        typer.Option(help="spread of the patient's shift, size and tilt (1 centred, 5 wide)"),
    ] = 1.0,
    lesion_scale: Annotated[float, typer.Option(help="nodule radius factor (1: 1.4-2.6 cm)")] = 1.0,
) -> None:
    """Generate procedural chest radiograph phantoms with findings and reports."""
    from raydiology.data.phantom import write_phantom_corpus

    manifest = write_phantom_corpus(
        out,
        n=n,
        size=size,
        seed=seed,
        finding_prob=finding_prob,
        views=views,
        masks=masks,
        boxes=boxes,
        pose=pose,
        lesion_scale=lesion_scale,
    )
    console.print(f"{manifest.rows} phantom images ({size}px, {views} per study) -> {out}")


@corpus_app.command("ms-cxr")
def corpus_ms_cxr(
    annotations: Annotated[
        Path, typer.Argument(help="MS-CXR's CSV (PhysioNet MS_CXR_Local_Alignment_v1.1.0.csv)")
    ],
    images: Annotated[
        str,
        typer.Option(
            help="the MIMIC-CXR-JPG folder MS-CXR's `path` column is relative to, or a pattern "
            "with {} for the dicom_id (e.g. 'jpg/{}.jpg', relative to the --out file's folder)"
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="ingest file list (CSV) to write")],
    keep_split: Annotated[
        bool, typer.Option(help="carry MS-CXR's train/val/test split into the corpus")
    ] = True,
) -> None:
    """MS-CXR's phrase-grounding boxes -> an ingest file list (path, boxes with phrases,
    split); then `raydiology ingest FILELIST --out CORPUS` and `raydiology evaluate ground`."""
    from raydiology.evaluation.ground import ms_cxr_file_list

    if "{}" not in images:  # a folder given relative to here, not to the file list
        images = str(Path(images).expanduser().resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        made = ms_cxr_file_list(annotations, images, out, keep_split=keep_split)
    except (FileNotFoundError, KeyError, ValueError) as e:
        what = f"missing column {e}" if isinstance(e, KeyError) else str(e)
        err.print(f"{annotations}: {what}", style="red", markup=False, highlight=False)
        raise typer.Exit(2) from None
    splits = ", ".join(f"{k} {v}" for k, v in sorted(made.splits.items()))
    console.print(f"{made.phrases} phrases on {made.images} images ({splits}) -> {out}",
                  soft_wrap=True)  # fmt: skip
    if made.rescaled:
        console.print(f"{made.rescaled} image(s) of another size than MS-CXR's: boxes scaled")
    if made.missing:
        err.print(f"[yellow]{made.missing} image(s) not found under {images}: ingest "
                  "will quarantine them[/]")  # fmt: skip
    console.print(f"next: raydiology ingest {out} --out CORPUS", soft_wrap=True)


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


@corpus_app.command("verify")
def corpus_verify(corpus: Annotated[Path, typer.Argument(help="corpus folder")]) -> None:
    """Check every shard's sha256 against the manifest and that each row group is readable;
    exit 1 naming each bad shard."""
    from raydiology.data.corpus import CorpusError, verify_corpus

    try:
        manifest = verify_corpus(corpus, progress=True)
    except CorpusError as e:  # not markup: the message may hold brackets
        err.print(str(e), style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"{corpus}: {len(manifest.shards)} shard(s), {manifest.rows} rows: sha256 and "
                  "every row group check out", soft_wrap=True)  # fmt: skip


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
    passes: Annotated[int, typer.Option(help="timed passes per method; the median is quoted")] = 3,
    decode_pool: Annotated[
        DecodePool, typer.Option(help="where Ray Data decodes: tasks or an actor pool")
    ] = "tasks",
) -> None:
    """Images/s into training batches vs a DataLoader+PIL baseline and the bare-decode ceiling."""
    from raydiology.bench.data import run_data_benchmark

    results = run_data_benchmark(resolutions=resolution or [1280], images=images, corpus=corpus,
                                 batch_size=batch_size, cpus=cpus, workers=workers, passes=passes,
                                 decode_pool=decode_pool, console=err)  # fmt: skip
    print(json.dumps(results[0] if len(results) == 1 else {"runs": results}, indent=2))


@bench_app.command("memory")
def bench_memory(
    images: Annotated[
        list[int] | None, typer.Option(help="corpus size; repeat for several (default 10k, 100k)")
    ] = None,
    resolution: int = 256,
    epochs: int = 2,
    object_store_mb: Annotated[int, typer.Option(help="Ray object store size")] = 256,
    cpus: Annotated[int | None, typer.Option(help="cores for Ray; default: all")] = None,
) -> None:
    """Peak memory per epoch while streaming corpora of growing size (should stay flat)."""
    import os

    from raydiology.bench.memory import run_memory_benchmark

    results = run_memory_benchmark(sizes=images or [10_000, 100_000], resolution=resolution,
                                   epochs=epochs, object_store_mb=object_store_mb,
                                   cpus=cpus or os.cpu_count() or 1, console=err)  # fmt: skip
    print(json.dumps({"runs": results}, indent=2))


@bench_app.command("step")
def bench_step(
    experiment: Annotated[Path, typer.Argument(help="experiment YAML file")],
    profile: Profile = None,
    set_: Sets = None,
    steps: Annotated[int, typer.Option(help="timed optimizer steps")] = 10,
    warmup: Annotated[int, typer.Option(help="untimed steps first")] = 3,
    engine: Annotated[str, typer.Option(help="auto | deepspeed | torch")] = "auto",
    validation: Annotated[
        bool, typer.Option(help="time one validation batch (report decoding) instead")
    ] = False,
) -> None:
    """A few training steps of the experiment on one device: step time, images/s, memory."""
    from raydiology.bench.step import run_step_benchmark, run_validation_benchmark

    exp = _load(experiment, profile, set_)
    if validation:
        print(json.dumps(run_validation_benchmark(exp), indent=2))
        return
    result = run_step_benchmark(exp, steps=steps, warmup=warmup, engine=engine)
    print(json.dumps(result, indent=2))


@bench_app.command("scan")
def bench_scan(
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    batch: Annotated[int, typer.Option()] = 2,
    length: Annotated[int, typer.Option(help="sequence length L")] = 196,
    dim: Annotated[int, typer.Option(help="inner dim Di")] = 192,
    dtype: Annotated[str, typer.Option(help="fp32 | bf16")] = "fp32",
    repeats: Annotated[int, typer.Option()] = 5,
) -> None:
    """Vision Mamba's selective scan, forward + backward: reference vs chunked (vs mamba-ssm)."""
    from raydiology.bench.scan import format_table, run_scan_benchmark

    report = run_scan_benchmark(
        device=device, batch=batch, length=length, dim=dim, dtype=dtype, repeats=repeats
    )
    err.print(format_table(report))
    print(json.dumps(report, indent=2))


@bench_app.command("dedup")
def bench_dedup(
    phantoms: Annotated[int, typer.Option(help="phantom images among the distinct set")] = 200,
    max_bits: Annotated[int, typer.Option(help="largest threshold in the table")] = 16,
) -> None:
    """Near-duplicate threshold: distinct images dropped and copies caught, per Hamming bits
    (needs ../shared/data/hannover-cxr and pydicom-data). Table on stderr, JSON on stdout."""
    from raydiology.bench.dedup import HANNOVER, format_table, run_dedup_benchmark

    with user_errors():
        report = run_dedup_benchmark(hannover=HANNOVER, phantoms=phantoms, max_bits=max_bits)
    print(format_table(report), file=sys.stderr)  # not rich: it would wrap the table
    print(json.dumps(report, indent=2))


# --- evaluate ---
evaluate_app = typer.Typer(
    help="Frozen-encoder yardstick: probes, retrieval, subgroup bias, segmentation, detection "
    "and grounding (JSON + markdown).",
    no_args_is_help=True,
)
app.add_typer(evaluate_app, name="evaluate")

Encoders = Annotated[
    list[str], typer.Argument(help="exported encoder folders (or NAME=FOLDER), one table row each")
]
EvalCorpus = Annotated[Path, typer.Option("--corpus", help="labelled corpus folder")]
EvalLabels = Annotated[
    list[str], typer.Option("--label", help="label column or glob, e.g. 'label_*' (repeatable)")
]
EvalPool = Annotated[str, typer.Option("--pool", help="cls (first prefix token) or mean (patches)")]
EvalOut = Annotated[Path, typer.Option("--out", help="folder for JSON, markdown, feature cache")]
EvalCache = Annotated[
    Path | None, typer.Option("--cache", help="feature cache folder; default OUT/features")
]
EvalDevice = Annotated[str, typer.Option(help="encoder device: auto, cpu, cuda, cuda:1 ...")]
EvalBatch = Annotated[int, typer.Option("--batch-size", help="images per encoder forward")]


def _eval_features(
    encoders: list[str],
    corpus: Path,
    labels: list[str],
    pool: str,
    cache: Path,
    device: str,
    batch_size: int,
):
    """Feature sets of every encoder (cached) and the resolved label columns."""
    import torch

    from raydiology.data.corpus import CorpusError, read_manifest
    from raydiology.evaluation.features import (
        POOLINGS,
        load_features,
        parse_encoder_arg,
        resolve_labels,
    )

    if pool not in POOLINGS:
        err.print(f"[red]--pool {pool!r}: expected one of {', '.join(POOLINGS)}[/]")
        raise typer.Exit(2)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        columns = resolve_labels(labels, read_manifest(corpus).label_columns)
    except (CorpusError, ValueError) as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
    sets = []
    for arg in encoders:
        name, path = parse_encoder_arg(arg)
        try:
            fs = load_features(
                path, corpus, pooling=pool, cache_dir=cache, name=name, batch_size=batch_size,
                device=device, progress=True, log=lambda m: err.print(m),
            )  # fmt: skip
        except (FileNotFoundError, ValueError) as e:
            err.print(f"[red]{e}[/]")
            raise typer.Exit(2) from None
        sets.append(fs)
    return sets, columns


ProbeProtocol = Annotated[
    str, typer.Option(help="xr0 (XR-0's probe training) or raydiology-v1 (faster, older)")
]
ProbeMaxEpochs = Annotated[
    int | None, typer.Option(help="epoch cap; default the protocol's (xr0 500, v1 200)")
]
ProbeTask = Annotated[str, typer.Option(help="auto, multilabel (BCE) or multiclass (CE)")]


def _probe_config(protocol: str, max_epochs: int | None, **fields):
    """The named probe protocol with the command's options on top; a bad value exits 2."""
    from raydiology.evaluation.probe import ProbeConfig

    try:
        caps = {} if max_epochs is None else {"max_epochs": max_epochs}
        cfg = ProbeConfig.of(protocol, **fields, **caps)
        cfg.validate("probe")
    except ValueError as e:  # ConfigError is a ValueError
        err.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
    return cfg


def _per_encoder(sets, what: str, evaluate) -> list:
    """evaluate(feature set) for every encoder; a ValueError names the encoder and exits 2."""
    results = []
    for fs in sets:
        err.print(f"{what}: {fs.encoder}")
        try:
            results.append(evaluate(fs))
        except ValueError as e:
            err.print(f"[red]{fs.encoder}: {e}[/]")
            raise typer.Exit(2) from None
    return results


@evaluate_app.command("probe")
def evaluate_probe(
    encoders: Encoders,
    corpus: EvalCorpus,
    label: EvalLabels,
    pool: EvalPool = "cls",
    out: EvalOut = Path("runs/evaluate"),
    cache: EvalCache = None,
    fractions: Annotated[
        list[str] | None,
        typer.Option("--fractions", help="train fractions, e.g. 1% or 0.01 (repeatable)"),
    ] = None,
    seeds: Annotated[int, typer.Option(help="probe seeds per fraction")] = 5,
    protocol: ProbeProtocol = "xr0",
    max_epochs: ProbeMaxEpochs = None,
    task: ProbeTask = "auto",
    device: EvalDevice = "auto",
    batch_size: EvalBatch = 64,
) -> None:
    """MLP probe on frozen features: AUROC and MCC per train fraction, mean ± std over seeds."""
    from raydiology.evaluation.probe import probe_features
    from raydiology.evaluation.tables import write_results

    try:
        fracs = tuple(
            float(f[:-1]) / 100 if f.endswith("%") else float(f)
            for f in (fractions or ["0.01", "0.1", "1"])
        )
    except ValueError as e:
        err.print(f"[red]--fractions: {e}[/]")
        raise typer.Exit(2) from None
    cfg = _probe_config(protocol, max_epochs, fractions=fracs, seeds=seeds, task=task)
    sets, columns = _eval_features(
        encoders, corpus, label, pool, cache or out / "features", device, batch_size
    )
    results = _per_encoder(
        sets, f"probe on {len(columns)} label(s)",
        lambda fs: probe_features(fs, columns, cfg, progress=True),
    )  # fmt: skip
    json_path, md_path, table = write_results(results, out, "probe", corpus=str(corpus))
    print(table)
    err.print(f"results: {json_path}, {md_path}")


@evaluate_app.command("bias")
def evaluate_bias(
    encoders: Encoders,
    corpus: EvalCorpus,
    label: EvalLabels,
    by: Annotated[str, typer.Option("--by", help="subgroup column: sex or age_group")] = "sex",
    pool: EvalPool = "cls",
    out: EvalOut = Path("runs/evaluate"),
    cache: EvalCache = None,
    seeds: Annotated[int, typer.Option(help="probe seeds per group trained on")] = 5,
    bootstrap: Annotated[
        int,
        typer.Option(
            help="resamples of each subgroup's test rows per probe (0: seeds only); resamples "
            "are not independent, so p-values shrink as they grow"
        ),
    ] = 0,
    protocol: ProbeProtocol = "xr0",
    max_epochs: ProbeMaxEpochs = None,
    task: ProbeTask = "auto",
    device: EvalDevice = "auto",
    batch_size: EvalBatch = 64,
) -> None:
    """Subgroup bias: probes trained on each subgroup and on all, tested on each subgroup,
    Mann-Whitney U between the AUROC distributions (JSON, markdown and bias.png)."""
    from raydiology.evaluation.bias import bias_features, save_bias_figure
    from raydiology.evaluation.features import GROUP_COLUMNS
    from raydiology.evaluation.tables import write_results

    if by not in GROUP_COLUMNS or bootstrap < 0:
        err.print(f"[red]--by one of {', '.join(GROUP_COLUMNS)}; --bootstrap 0 or more[/]")
        raise typer.Exit(2)
    # The bias probes train on all train rows of their group: one fraction, 100%
    cfg = _probe_config(protocol, max_epochs, fractions=(1.0,), seeds=seeds, task=task)
    sets, columns = _eval_features(
        encoders, corpus, label, pool, cache or out / "features", device, batch_size
    )
    results = _per_encoder(
        sets, f"bias on {len(columns)} label(s) by {by}",
        lambda fs: bias_features(fs, columns, by, cfg, bootstrap=bootstrap, progress=True),
    )  # fmt: skip
    json_path, md_path, table = write_results(results, out, "bias", corpus=str(corpus))
    figure = save_bias_figure(results, out / "bias.png")
    print(table)
    err.print(f"results: {json_path}, {md_path}, {figure}")


@evaluate_app.command("retrieval")
def evaluate_retrieval(
    encoders: Encoders,
    corpus: EvalCorpus,
    label: EvalLabels,
    pool: EvalPool = "cls",
    out: EvalOut = Path("runs/evaluate"),
    cache: EvalCache = None,
    k: Annotated[list[int] | None, typer.Option("--k", help="Precision@k (repeatable)")] = None,
    match: Annotated[
        str,
        typer.Option(help="any (a shared positive label: XR-0's) or exact (same label vector)"),
    ] = "any",
    device: EvalDevice = "auto",
    batch_size: EvalBatch = 64,
) -> None:
    """Cosine retrieval, test queries against the train gallery: Precision@5/10/100."""
    from raydiology.evaluation.retrieval import DEFAULT_KS, MATCHES, retrieve_features
    from raydiology.evaluation.tables import write_results

    ks = tuple(k or DEFAULT_KS)
    if match not in MATCHES or not all(v >= 1 for v in ks):
        err.print(f"[red]--match one of {', '.join(MATCHES)}; --k positive integers[/]")
        raise typer.Exit(2)
    sets, columns = _eval_features(
        encoders, corpus, label, pool, cache or out / "features", device, batch_size
    )
    try:
        results = [retrieve_features(fs, columns, ks=ks, match=match) for fs in sets]
    except ValueError as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
    json_path, md_path, table = write_results(results, out, "retrieval", corpus=str(corpus))
    print(table)
    err.print(f"results: {json_path}, {md_path}")


@evaluate_app.command("segment")
def evaluate_segment(
    encoders: Encoders,
    corpus: EvalCorpus,
    masks: Annotated[
        list[str] | None,
        typer.Option("--masks", help="mask column or glob (repeatable); default all mask_*"),
    ] = None,
    decoder: Annotated[str, typer.Option(help="linear (1x1 conv) or uper (UPerNet)")] = "linear",
    out: EvalOut = Path("runs/evaluate"),
    max_steps: Annotated[int, typer.Option(help="iteration budget")] = 2000,
    eval_every: Annotated[int, typer.Option(help="steps between validations")] = 100,
    lr: Annotated[float, typer.Option(help="Adam lr (XR-0: 1e-4)")] = 1e-4,
    augment: Annotated[
        bool, typer.Option(help="XR-0's joint image+mask augmentations (off: features cached)")
    ] = True,
    seed: int = 0,
    device: EvalDevice = "auto",
) -> None:
    """Frozen-encoder segmentation: a decoder per encoder, test Dice per class (JSON,
    markdown table and segment.png with image / truth / predictions)."""
    import torch

    from raydiology.data.corpus import CorpusError, read_manifest
    from raydiology.evaluation.dense import dense_splits, load_dense_encoder
    from raydiology.evaluation.features import parse_encoder_arg, resolve_labels
    from raydiology.evaluation.segment import SegmentConfig, save_overlays, segment_encoder
    from raydiology.evaluation.tables import write_results

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        cfg = SegmentConfig(decoder=decoder, max_steps=max_steps, eval_every=eval_every,  # type: ignore[arg-type]
                            lr=lr, augment=augment, seed=seed)  # fmt: skip
        cfg.validate("segment")
        manifest = read_manifest(corpus)
        columns = resolve_labels(masks or ["mask_*"], manifest.mask_columns)
    except (CorpusError, ValueError) as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
    classes = [c.removeprefix("mask_") for c in columns]
    results, rows, splits = [], [], None
    for arg in encoders:
        name, path = parse_encoder_arg(arg)
        try:
            encoder = load_dense_encoder(path, device=device)
        except (FileNotFoundError, ValueError) as e:
            err.print(f"[red]{e}[/]")
            raise typer.Exit(2) from None
        res = encoder.data.resolution
        if splits is None or splits["train"].images.shape[-1] != res:
            splits = dense_splits(corpus, columns, res)
        err.print(f"segment: {name} ({cfg.decoder}) on {', '.join(classes)}")
        try:
            result, head = segment_encoder(
                encoder, splits, classes, cfg, name=name, device=device, progress=True
            )
        except ValueError as e:
            err.print(f"[red]{name}: {e}[/]")
            raise typer.Exit(2) from None
        results.append(result)
        rows.append((name, encoder, head))
    json_path, md_path, table = write_results(results, out, "segment", corpus=str(corpus))
    assert splits is not None
    if len({enc.data.resolution for _, enc, _ in rows}) == 1:
        picture = out / "segment.png"
        attribution = manifest.made_by.get("attribution")
        save_overlays(rows, splits["test"], classes, picture, device=device, caption=attribution)
        err.print(f"picture: {picture}")
    print(table)
    err.print(f"results: {json_path}, {md_path}")


@evaluate_app.command("detect")
def evaluate_detect(
    encoders: Encoders,
    corpus: EvalCorpus,
    boxes: Annotated[str, typer.Option(help="the box-list column")] = "boxes",
    out: EvalOut = Path("runs/evaluate"),
    max_steps: Annotated[int, typer.Option(help="iteration budget")] = 2000,
    eval_every: Annotated[int, typer.Option(help="steps between validations")] = 100,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (DETR: 1e-4)")] = 1e-4,
    patience: Annotated[int, typer.Option(help="validations without gain before stopping")] = 5,
    seed: int = 0,
    device: EvalDevice = "auto",
) -> None:
    """Frozen-encoder localisation: a DETR-style decoder per encoder, test mAP@50 and mean
    IoU (JSON, markdown table and detect.png with true and predicted boxes)."""
    import torch

    from raydiology.data.corpus import CorpusError, read_manifest
    from raydiology.evaluation.dense import load_dense_encoder
    from raydiology.evaluation.detect import (
        DetectConfig,
        box_splits,
        detect_encoder,
        save_box_picture,
    )
    from raydiology.evaluation.features import parse_encoder_arg
    from raydiology.evaluation.tables import write_results

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        cfg = DetectConfig(max_steps=max_steps, eval_every=eval_every, lr=lr, seed=seed,
                           patience=patience)  # fmt: skip
        cfg.validate("detect")
        manifest = read_manifest(corpus)
    except (CorpusError, ValueError) as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
    results, rows, splits, resolutions = [], [], None, set()
    for arg in encoders:
        name, path = parse_encoder_arg(arg)
        try:
            encoder = load_dense_encoder(path, device=device)
            res = encoder.data.resolution
            if splits is None or splits[0]["train"].images.shape[-1] != res:
                splits = box_splits(corpus, res, boxes)
            err.print(f"detect: {name} on {', '.join(splits[1])}")
            result, _, preds = detect_encoder(
                encoder, *splits, cfg, name=name, device=device, progress=True
            )
        except (CorpusError, FileNotFoundError, ValueError) as e:
            err.print(f"[red]{name}: {e}[/]")
            raise typer.Exit(2) from None
        results.append(result)
        rows.append((name, preds))
        resolutions.add(res)
    json_path, md_path, table = write_results(results, out, "detect", corpus=str(corpus))
    assert splits is not None
    if len(resolutions) == 1:
        picture = out / "detect.png"
        attribution = manifest.made_by.get("attribution")
        save_box_picture(rows, splits[0]["test"], splits[1], picture, caption=attribution)
        err.print(f"picture: {picture}")
    print(table)
    err.print(f"results: {json_path}, {md_path}")


@evaluate_app.command("ground")
def evaluate_ground(
    encoders: Encoders,
    corpus: EvalCorpus,
    text: Annotated[
        Path,
        typer.Option(
            "--text-encoder",
            "--text",
            help="a CLIP run or export (its text tower) or a local Hugging Face BERT folder "
            "(e.g. CXR-BERT) that embeds the phrases",
        ),
    ],
    text_pool: Annotated[
        str, typer.Option(help="BERT phrase embedding: mean (over tokens) or cls ([CLS] state)")
    ] = "mean",
    boxes: Annotated[
        str, typer.Option(help="the box-list column (entries with a phrase)")
    ] = "boxes",
    out: EvalOut = Path("runs/evaluate"),
    max_steps: Annotated[int, typer.Option(help="iteration budget")] = 2000,
    eval_every: Annotated[int, typer.Option(help="steps between validations")] = 100,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (DETR: 1e-4)")] = 1e-4,
    seed: int = 0,
    device: EvalDevice = "auto",
) -> None:
    """Frozen-encoder phrase grounding (MS-CXR's task): a phrase-conditioned box head per
    encoder, test accuracy at IoU > 0.5 and mean IoU (JSON, markdown, ground.png)."""
    import torch

    from raydiology.data.corpus import CorpusError, read_manifest
    from raydiology.evaluation.dense import load_dense_encoder
    from raydiology.evaluation.features import parse_encoder_arg
    from raydiology.evaluation.ground import (
        GroundConfig,
        ground_encoder,
        load_phrase_encoder,
        phrase_splits,
        save_grounding_picture,
    )
    from raydiology.evaluation.tables import write_results

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        cfg = GroundConfig(max_steps=max_steps, eval_every=eval_every, lr=lr, seed=seed)
        cfg.validate("ground")
        manifest = read_manifest(corpus)
        embed = load_phrase_encoder(text, pool=text_pool, device=device)
    except (CorpusError, FileNotFoundError, ValueError) as e:
        err.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
    results, rows, splits, resolutions = [], [], None, set()
    embedded: dict[str, torch.Tensor] = {}
    for arg in encoders:
        name, path = parse_encoder_arg(arg)
        try:
            encoder = load_dense_encoder(path, device=device)
            res = encoder.data.resolution
            if splits is None or splits["train"].images.shape[-1] != res:
                splits = phrase_splits(corpus, res, boxes)
                embedded = {k: embed(v.phrases) for k, v in splits.items()}
            err.print(f"ground: {name} on {len(splits['train'])} training phrases")
            result, pred = ground_encoder(
                encoder, splits, embedded, cfg, name=name, device=device, progress=True
            )
        except (CorpusError, FileNotFoundError, ValueError) as e:
            err.print(f"[red]{name}: {e}[/]")
            raise typer.Exit(2) from None
        result["text"] = str(text)
        result["text_pool"] = getattr(embed, "pool", None)  # a BERT's; CLIP: its own [SEP]
        results.append(result)
        rows.append((name, pred))
        resolutions.add(res)
    json_path, md_path, table = write_results(results, out, "ground", corpus=str(corpus))
    assert splits is not None
    if len(resolutions) == 1:
        picture = out / "ground.png"
        attribution = manifest.made_by.get("attribution")
        save_grounding_picture(rows, splits["test"], picture, caption=attribution)
        err.print(f"picture: {picture}")
    print(table)
    err.print(f"results: {json_path}, {md_path}")


# --- cluster ---
kube_app = typer.Typer(help="KubeRay manifests for the GPU clusters.", no_args_is_help=True)
app.add_typer(kube_app, name="kube")

Address = Annotated[
    str,
    typer.Option(
        envvar="RAY_API_SERVER_ADDRESS", help="the cluster's dashboard, e.g. http://HEAD:8265"
    ),
]
ClusterName = Annotated[str, typer.Option("--cluster", help="preset in ray_configs/ (a800, a100)")]


def _cluster_call(fn):
    """Run fn(); token and connection problems end the command with one clear line."""
    from raydiology.cluster.jobs import AuthTokenError

    try:
        return fn()
    except AuthTokenError as e:
        err.print(f"[red]auth[/]: {e}")
        raise typer.Exit(3) from None
    except ConnectionError as e:
        err.print(f"[red]connection[/]: {e}")
        raise typer.Exit(3) from None
    except ConfigError as e:
        err.print(f"[red]invalid[/]: {e}")
        raise typer.Exit(2) from None


def _write_or_print(text: str, out: Path | None) -> None:
    if out is None:
        print(text, end="")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    err.print(f"wrote {out}")


@kube_app.command("cluster")
def kube_cluster(
    cluster: ClusterName,
    out: Annotated[Path | None, typer.Option(help="file to write; default: stdout")] = None,
) -> None:
    """Render the RayCluster for a preset (kube/raycluster-NAME.yaml is this, checked in)."""
    from raydiology.cluster import manifests
    from raydiology.cluster.presets import load_preset

    preset = _cluster_call(lambda: load_preset(cluster))
    doc = manifests.raycluster(preset)
    header = manifests.HEADER.format(command="cluster", name=preset.name)
    _write_or_print(manifests.dump(doc, header), out)


@kube_app.command("monitors")
def kube_monitors(
    cluster: ClusterName,
    out: Annotated[Path | None, typer.Option(help="file to write; default: stdout")] = None,
) -> None:
    """Render the PodMonitors that scrape a preset's clusters into the site's Prometheus
    (kube/monitoring/podmonitors-NAME.yaml is this, checked in)."""
    from raydiology.cluster import manifests
    from raydiology.cluster.presets import load_preset

    preset = _cluster_call(lambda: load_preset(cluster))
    header = manifests.HEADER.format(command="monitors", name=preset.name)
    text = "---\n".join(manifests.dump(doc) for doc in manifests.pod_monitors(preset))
    _write_or_print(header + text, out)


@kube_app.command("render")
def kube_render(
    experiment: Annotated[Path, typer.Argument(help="experiment or sweep YAML file")],
    cluster: ClusterName,
    profile: Profile = None,
    set_: Sets = None,
    out: Annotated[Path | None, typer.Option(help="file to write; default: stdout")] = None,
    existing: Annotated[
        bool, typer.Option(help="run on the long-running raydiology-NAME cluster instead")
    ] = False,
    ttl: Annotated[int, typer.Option(help="seconds the finished job stays visible")] = 3600,
    deadline: Annotated[int, typer.Option(help="activeDeadlineSeconds")] = 14 * 24 * 3600,
    backoff: Annotated[int, typer.Option(help="retries; a retry resumes the run")] = 2,
    root: Annotated[
        Path, typer.Option(help="repository root: paths are taken relative to it")
    ] = Path("."),
) -> None:
    """Write a RayJob that runs EXPERIMENT_OR_SWEEP from the image's copy of this repository."""
    from raydiology.cluster import manifests
    from raydiology.cluster.jobs import job_options
    from raydiology.cluster.presets import load_preset, load_versions
    from raydiology.cluster.workload import load_workload

    preset = _cluster_call(lambda: load_preset(cluster))
    versions = load_versions()
    work = _cluster_call(
        lambda: load_workload(
            experiment,
            root=root,
            profile=profile,
            sets=set_,
            cluster=cluster,
            # a sweep is checked against the preset's fully scaled-up size
            extra=job_options(experiment, cluster=cluster),
            output_root=manifests.RUNS_MOUNT,  # runs on the shared volume
        )
    )
    import shlex

    entrypoint = f"cd {shlex.quote(versions.workdir)} && " + manifests.job_entrypoint(work.args)
    doc = manifests.rayjob(
        preset=preset,
        name=f"{work.run}-{preset.name}",
        entrypoint=entrypoint,
        labels={
            "raydiology.io/experiment": manifests.label_value(work.name),
            "raydiology.io/run": manifests.label_value(work.run),
        },
        runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}},
        existing_cluster=existing,
        ttl_s=ttl,
        deadline_s=deadline,
        backoff_limit=backoff,
        versions=versions,
    )
    header = f"# Rendered by `raydiology kube render {experiment} --cluster {cluster}`.\n"
    _write_or_print(manifests.dump(doc, header), out)


@kube_app.command("validate")
def kube_validate(
    files: Annotated[list[Path], typer.Argument(help="RayCluster / RayJob YAML files")],
    crds: Annotated[
        Path | None, typer.Option(help="folder with the KubeRay CRDs (ray.io_rayclusters.yaml...)")
    ] = None,
) -> None:
    """Check manifests against the KubeRay v1 CRD schemas, unknown fields included."""
    from raydiology.cluster import manifests

    crd_dir = crds or manifests.default_crd_dir()
    if not (crd_dir / manifests.CRD_FILES["RayCluster"]).is_file():
        err.print(f"[red]no KubeRay CRDs in {crd_dir}[/]: pass --crds DIR")
        raise typer.Exit(2)
    bad = 0
    for path in files:
        try:
            n = manifests.validate_file(path, crd_dir)
            console.print(f"[green]ok[/] {path} ({n} document{'s' * (n != 1)})")
        except manifests.ManifestError as e:
            bad += 1
            err.print(f"[red]{e}[/]")
    if bad:
        raise typer.Exit(1)


@app.command()
def submit(
    experiment: Annotated[Path, typer.Argument(help="experiment or sweep YAML file")],
    address: Address = "http://127.0.0.1:8265",
    profile: Profile = None,
    set_: Sets = None,
    cluster: Annotated[
        str | None, typer.Option(help="overlay ray_configs/NAME.yaml's scaling")
    ] = None,
    working_dir: Annotated[
        Path, typer.Option(help="folder uploaded as the job's working dir")
    ] = Path("."),
    pip: Annotated[
        list[str] | None, typer.Option(help="extra pip requirement for the job (repeatable)")
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            help="a sweep: its sweeps folder on shared storage, e.g. /mnt/runs/sweeps "
            "(default: the sweep's output.dir)",
        ),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="a sweep: resume this sweep folder, or this sweep name under --out"),
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="a sweep: start anew, refusing if its folder exists")
    ] = False,
    max_cluster: Annotated[
        str | None,
        typer.Option(
            "--max-cluster",
            help="a sweep: the cluster's size fully scaled up, e.g. GPU=16,CPU=128 "
            "(default: the --cluster preset's)",
        ),
    ] = None,
    allow_changes: AllowChanges = None,
) -> None:
    """Submit an experiment (or sweep) as a Ray job over the Jobs API, with Ray's token.

    The job writes to shared storage: a relative output.dir (or sweep --out) is refused."""
    import os

    from raydiology.cluster.jobs import JobsClient, check_shared_dir, job_id_for, job_options
    from raydiology.cluster.manifests import job_entrypoint
    from raydiology.cluster.workload import load_workload

    options = _cluster_call(
        lambda: job_options(
            experiment,
            out=out,
            resume=resume,
            fresh=fresh,
            max_cluster=max_cluster,
            cluster=cluster,
            allow_changes=allow_changes,
        )
    )
    work = _cluster_call(
        lambda: load_workload(
            experiment,
            root=working_dir,
            profile=profile,
            sets=set_,
            cluster=cluster,
            extra=options,
        )
    )
    folder = resume if resume and os.path.isabs(resume) else out or work.output_dir
    _cluster_call(lambda: check_shared_dir(folder, "--out" if out else "output.dir"))
    client = _cluster_call(lambda: JobsClient(address))
    job = _cluster_call(
        lambda: client.submit(
            entrypoint=job_entrypoint(work.args),
            job_id=job_id_for(work.run),
            working_dir=working_dir,
            metadata={"job_name": work.run, "experiment": work.name, "run": work.run},
            pip=pip,
        )
    )
    # plain print: rich would fold the long id and link at the terminal's width
    print(f"job {job.job_id}  ({work.kind} {work.name}, run {work.run})")
    print(f"dashboard {job.job_url}")
    print(f"follow: raydiology logs {job.job_id} --address {client.address} --follow")


@app.command()
def status(job_id: str, address: Address = "http://127.0.0.1:8265") -> None:
    """A job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and message."""
    from raydiology.cluster.jobs import JobsClient

    info = _cluster_call(lambda: JobsClient(address).info(job_id))
    print(f"{info.status.value}  {info.message or ''}".rstrip())


@app.command()
def logs(
    job_id: str,
    address: Address = "http://127.0.0.1:8265",
    follow: Annotated[bool, typer.Option("--follow", "-f", help="stream until it ends")] = False,
) -> None:
    """A job's driver output (what `raydiology run` printed on the cluster)."""
    from raydiology.cluster.jobs import JobsClient

    client = _cluster_call(lambda: JobsClient(address))
    if not follow:
        print(_cluster_call(lambda: client.logs(job_id)), end="")
        return
    for chunk in client.follow(job_id):
        print(chunk, end="", flush=True)


@app.command()
def stop(job_id: str, address: Address = "http://127.0.0.1:8265") -> None:
    """Ask a running job to stop (its workers and its driver)."""
    from raydiology.cluster.jobs import JobsClient

    stopped = _cluster_call(lambda: JobsClient(address).stop(job_id))
    print(f"{job_id}: {'stopping' if stopped else 'was not running'}")


@app.command("list")
def list_jobs(address: Address = "http://127.0.0.1:8265") -> None:
    """Jobs on the cluster, newest first."""
    from raydiology.cluster.jobs import JobsClient

    jobs = _cluster_call(lambda: JobsClient(address).list())
    for job in jobs:
        meta = job.metadata or {}
        print(f"{job.submission_id or job.job_id}\t{job.status.value}\t{meta.get('experiment', '')}"
              f"\t{meta.get('run', '')}\t{job.entrypoint}")  # fmt: skip


# --- sweep ---


@app.command()
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="sweep YAML file (experiments/sweeps/)")],
    profile: Profile = None,
    set_: Sets = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address; default: start a local Ray")
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            help="resume this sweep folder, or the sweep of this name under --out/output.dir "
            "(running a sweep again resumes its own folder without this)"
        ),
    ] = None,
    fresh: Annotated[
        bool,
        typer.Option("--fresh", help="start the sweep anew: refuse if its folder exists"),
    ] = False,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            help="sweeps folder (shared storage on a cluster); default: the sweep's output.dir",
        ),
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(
            help="preset in ray_configs/ (a800, a100): where trials run, and the cluster's "
            "maximum size for the resource check"
        ),
    ] = None,
    max_cluster: Annotated[
        str | None,
        typer.Option(
            "--max-cluster",
            envvar="RAYDIOLOGY_MAX_CLUSTER",
            help="the cluster's size when fully scaled up, e.g. GPU=16,CPU=128 (over the "
            "--cluster preset's); a sweep is refused only when it does not fit this",
        ),
    ] = None,
) -> None:
    """Hyperparameter sweep on Ray Tune: one Ray Train run per trial, ASHA, table + plots.

    Its folder is OUT (or output.dir)/(output.name or the sweep's name): running the same
    sweep again resumes it there (a RayJob's retry too)."""
    import os

    from raydiology.cluster.jobs import check_shared_dir
    from raydiology.tune.capacity import cluster_maximum, preset_sweep_sets
    from raydiology.tune.runner import find_sweep, run_sweep
    from raydiology.tune.spec import Plan, load_sweep, local_folder, make_plan

    try:
        cfg = load_sweep(sweep_file)
        key, folder = ("--out", out) if out else ("output.dir", cfg.output.dir)
        if address or os.environ.get("RAY_ADDRESS"):  # a cluster: the folder must be shared
            check_shared_dir(resume if resume and os.path.isabs(resume) else folder, key)
        maximum = cluster_maximum(cluster, max_cluster)
        if resume:
            plan = Plan.load(find_sweep(resume, local_folder(folder, key)))
        else:
            sets = [*(preset_sweep_sets(cluster) if cluster else []), *(set_ or [])]
            sweep_dir = local_folder(out, key) / (cfg.output.name or cfg.name) if out else None
            plan = make_plan(sweep_file, profile=profile, sets=sets, sweep_dir=sweep_dir)
        run_sweep(
            plan,
            address=address,
            resume=bool(resume),
            fresh=fresh,
            maximum=maximum,
            console=console,
        )
    except ConfigError as e:
        err.print(f"[red]invalid sweep {sweep_file}[/]: {e}")
        raise typer.Exit(2) from None


# --- report evaluation ---


@app.command("eval")
def eval_reports(
    predictions: Annotated[Path, typer.Argument(help="JSONL: one {id, reference, prediction}")],
    protocol: Annotated[
        str | None,
        typer.Option(
            help="evaluation protocol preset; default: the one in run.json beside "
            "PREDICTIONS (raydiology generate records it), else raydiology"
        ),
    ] = None,
    ptb: Annotated[
        bool | None,
        typer.Option(
            "--ptb/--no-ptb",
            help="PTB-tokenize first (COCO) or not (R2Gen); default: the protocol's",
        ),
    ] = None,
    uncertain_as: Annotated[
        str | None,
        typer.Option(
            help="CE: count uncertain labels as negative (R2Gen) or positive; "
            "default: the protocol's"
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="metrics JSON; default PREDICTIONS.metrics.json")
    ] = None,
    labeler: LabelerKind = "rules",
    weights: LabelerWeights = None,
    tokenizer: LabelerTokenizer = None,
    device: LabelerDevice = "cpu",
    labels_ref: Annotated[
        Path | None,
        typer.Option(
            help="CE from this labels CSV of the references (CheXpert labeler layout: "
            "any labeler's); needs --labels-pred"
        ),
    ] = None,
    labels_pred: Annotated[
        Path | None, typer.Option(help="labels CSV of the predictions; needs --labels-ref")
    ] = None,
) -> None:
    """NLG (BLEU, METEOR, ROUGE-L, CIDEr) and clinical-efficacy metrics of generated reports.

    The metrics JSON records the evaluation protocol and names the labeler behind the CE
    numbers in its `labeler` key ("raydiology-rules", "chexbert", or the labeler named by the
    labels CSVs: "chexpert-labeler" for one without a raydiology sidecar)."""
    from raydiology.evaluation.chexbert import make_labeler
    from raydiology.evaluation.clinical import UNCERTAIN_AS
    from raydiology.evaluation.protocol import get_protocol
    from raydiology.evaluation.report_eval import evaluate_predictions, metrics_path

    if uncertain_as is not None and uncertain_as not in UNCERTAIN_AS:
        err.print(f"[red]--uncertain-as {uncertain_as!r}: expected one of {UNCERTAIN_AS}[/]")
        raise typer.Exit(2)
    if (labels_ref is None) != (labels_pred is None):
        err.print("[red]--labels-ref and --labels-pred go together[/]")
        raise typer.Exit(2)
    if labels_ref is not None and (labeler != "rules" or weights is not None):
        err.print("[red]--labels-ref/--labels-pred replace --labeler; give one or the other[/]")
        raise typer.Exit(2)
    with user_errors():
        chosen = None
        if labels_ref is None:
            chosen = make_labeler(labeler, weights=weights, tokenizer=tokenizer, device=device)
        result = evaluate_predictions(
            predictions,
            protocol=None if protocol is None else get_protocol(protocol),
            ptb=ptb,
            uncertain_as=uncertain_as,  # type: ignore[arg-type]
            out=out,
            labeler=chosen,
            labels=None if labels_ref is None else (labels_ref, labels_pred),  # type: ignore[arg-type]
        )
    print(json.dumps(result, indent=2))
    err.print(f"metrics: {out or metrics_path(predictions)}")


LabelerKind = Annotated[
    str,
    typer.Option(
        "--labeler",
        help="rules: the built-in rule labeler; chexbert: a CheXbert checkpoint (--weights)",
    ),
]
LabelerWeights = Annotated[
    Path | None,
    typer.Option("--weights", help="CheXbert checkpoint (chexbert.pth) for --labeler chexbert"),
]
LabelerTokenizer = Annotated[
    Path | None,
    typer.Option(
        "--tokenizer",
        help="local bert-base-uncased folder (vocab.txt); default: beside --weights, else the "
        "Hugging Face cache; nothing is downloaded",
    ),
]
LabelerDevice = Annotated[str, typer.Option("--device", help="torch device for chexbert")]


@app.command("label")
def label_reports_file(
    reports: Annotated[
        Path, typer.Argument(help="CSV/JSONL with id and report columns, or headerless CSV")
    ],
    out: Annotated[Path, typer.Option("--out", help="labels CSV (CheXpert labeler layout)")],
    labeler: LabelerKind = "rules",
    weights: LabelerWeights = None,
    tokenizer: LabelerTokenizer = None,
    device: LabelerDevice = "cpu",
) -> None:
    """Label reports for the 14 CheXpert observations: 1 / 0 / -1 (uncertain) / blank.

    The CSV keeps the CheXpert labeler's layout; which labeler made it (and from which
    weights) is written beside it, OUT with the suffix .labeler.json."""
    from raydiology.evaluation.chexbert import make_labeler
    from raydiology.evaluation.labeler import read_reports_file, write_labels_csv

    with user_errors():
        first_column, ids, texts = read_reports_file(reports)
        chosen = make_labeler(labeler, weights=weights, tokenizer=tokenizer, device=device)
        sidecar = write_labels_csv(
            out, first_column, ids, chosen.label_many(texts), labeler=chosen.provenance()
        )
    console.print(f"{len(texts)} reports labeled by {chosen.name} -> {out} ({sidecar.name})")


@bench_app.command("labeler")
def bench_labeler(
    n: Annotated[
        int, typer.Option("--n", help="reports per pass (Open-I repeated if fewer)")
    ] = 4000,
    repeats: Annotated[int, typer.Option(help="timed passes; the median is quoted")] = 5,
) -> None:
    """Report labeler speed: reports/s on one core (Open-I reports, else phantom reports)."""
    import numpy as np

    from raydiology.evaluation.labeler import benchmark

    try:
        from raydiology.data.reports import read_openi

        texts, source = [r.report for r in read_openi() if r.report], "openi"
    except FileNotFoundError:
        from raydiology.data.phantom import make_phantom

        texts = [make_phantom(np.random.default_rng([0, i]), size=16).report for i in range(500)]
        source = "phantom"
    texts = (texts * (n // len(texts) + 1))[:n]
    print(json.dumps({"source": source, **benchmark(texts, repeats=repeats)}, indent=2))


@app.command("leaderboard")
def leaderboard(
    runs: Annotated[list[Path], typer.Argument(help="run folders (<run>/eval/metrics.json)")],
    out: Annotated[Path, typer.Option("--out", help="folder for the table and picture")] = Path(
        "leaderboard"
    ),
    examples: Annotated[int, typer.Option(help="example studies in the picture; 0: none")] = 4,
) -> None:
    """CXPMRG-Bench-style table (markdown + HTML) and a picture of example reports."""
    from raydiology.evaluation.leaderboard import build_leaderboard

    with user_errors():
        written = build_leaderboard(list(runs), out, examples=examples)
    print(written["markdown"].read_text(), end="")
    for kind, path in written.items():
        err.print(f"{kind}: {path}")


# --- report generation ---


@app.command("generate")
def generate_reports_command(
    run: Annotated[Path, typer.Argument(help="a report-generation run folder (or its export/)")],
    corpus: Annotated[Path, typer.Argument(help="corpus folder with images and reports")],
    split: Annotated[
        str, typer.Option(help="corpus split to report on; 'all' for every row")
    ] = "test",
    limit: Annotated[int | None, typer.Option(help="at most this many images")] = None,
    out: Annotated[
        Path | None, typer.Option(help="JSONL to write; default RUN/eval/predictions.jsonl")
    ] = None,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda")] = "cpu",
    protocol: Annotated[
        str | None,
        typer.Option(
            help="evaluation protocol preset (the references it builds); default: "
            "the run's evaluation.protocol"
        ),
    ] = None,
) -> None:
    """Reports for a corpus split from a trained report generator, with the run's beam search;
    writes the predictions `raydiology eval` scores and the run description for the leaderboard."""
    from raydiology.evaluation.generate import generate_reports

    with user_errors():
        rows = generate_reports(
            run, corpus, None if split == "all" else split, out=out, limit=limit, device=device,
            protocol=protocol,
        )  # fmt: skip
    target = out or run / "eval" / "predictions.jsonl"
    err.print(f"{len(rows)} reports -> {target}  (score them: raydiology eval {target})")


# --- MedViLL downstream heads ---


@evaluate_app.command("medvill")
def evaluate_medvill(
    run: Annotated[Path, typer.Argument(help="a medvill_diagnosis / medvill_vqa run (or export/)")],
    task: Annotated[str, typer.Option(help="diagnosis (micro AUROC/F1) or vqa (closed/open)")],
    corpus: Annotated[Path, typer.Option("--corpus", help="corpus folder with the label columns")],
    split: Annotated[str, typer.Option(help="corpus split; 'all' for every row")] = "test",
    out: Annotated[
        Path | None, typer.Option(help="JSON to write; default RUN/eval/medvill_TASK.json")
    ] = None,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda")] = "cpu",
    batch_size: Annotated[int, typer.Option("--batch-size", help="images per forward")] = 16,
) -> None:
    """A fine-tuned MedViLL head on a corpus split: diagnosis micro AUROC / F1, or VQA closed
    and open accuracy; prints and writes JSON."""
    from raydiology.evaluation.medvill_heads import evaluate_medvill_heads

    with user_errors():
        result = evaluate_medvill_heads(
            run, corpus, task=task, split=None if split == "all" else split, device=device,
            batch_size=batch_size, out=out,
        )  # fmt: skip
    print(json.dumps(result, indent=2))


# --- clip evaluation ---


@evaluate_app.command("clip")
def evaluate_clip_command(
    run: Annotated[Path, typer.Argument(help="an image-report CLIP run folder (or its export/)")],
    corpus: Annotated[
        Path | None, typer.Option("--corpus", help="corpus folder; default: the run's own")
    ] = None,
    split: Annotated[
        str, typer.Option(help="split(s), comma-separated (e.g. val,test); 'all' = every row")
    ] = "test",
    out: Annotated[
        Path | None, typer.Option("--out", help="JSON to write; default RUN/eval/clip.json")
    ] = None,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda")] = "cpu",
) -> None:
    """Image<->report retrieval of a trained CLIP (R@1/5/10, MRR against random ranking),
    reloaded from the run's export; writes JSON and a picture of top-3 retrieved reports."""
    from rich.table import Table

    from raydiology.evaluation.clip_retrieval import evaluate_clip_run

    splits = None if split == "all" else [s.strip() for s in split.split(",") if s.strip()]
    with user_errors():
        result = evaluate_clip_run(run, corpus=corpus, split=splits, out=out, device=device)
    if result.get("warning"):
        err.print(f"[yellow]warning[/]: {result['warning']}")
    table = Table(title=f"CLIP retrieval, split {split} ({result['n']} image-report pairs)")
    table.add_column("direction")
    metrics = ("R@1", "R@5", "R@10", "MRR")
    for name in metrics:
        table.add_column(name, justify="right")
    rows = (("image -> report", "image_to_report"), ("report -> image", "report_to_image"),
            ("random ranking", "random"))  # fmt: skip
    for label, key in rows:
        table.add_row(label, *(f"{result[key][m]:.3f}" for m in metrics))
    console.print(table)
    auroc = result.get("zero_shot_auroc") or {}
    if auroc:
        shown = ", ".join(f"{k.removeprefix('label_')} {'-' if v is None else f'{v:.3f}'}"
                          for k, v in auroc.items())  # fmt: skip
        console.print(f"zero-shot AUROC (prompt pairs): {shown}")
    err.print(f"results: {result['json']}, picture: {result['picture']}")


# --- medvill evaluation ---


@evaluate_app.command("medvill-retrieval")
def evaluate_medvill_retrieval(
    run: Annotated[Path, typer.Argument(help="a MedViLL run folder (or its export/)")],
    corpus: Annotated[Path, typer.Option("--corpus", help="corpus folder with images and reports")],
    split: Annotated[str, typer.Option(help="corpus split; 'all' for every row")] = "test",
    candidates: Annotated[
        int, typer.Option(help="candidates per query (true pair + others)")
    ] = 100,
    seed: Annotated[int, typer.Option(help="seed of the candidate draws")] = 0,
    attention: Annotated[
        str | None, typer.Option(help="attention mask (bi, s2s, bar, ...); default the model's")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="only the first N pairs of the split")] = None,
    out: Annotated[
        Path | None, typer.Option(help="JSON to write; default RUN/eval/medvill_retrieval.json")
    ] = None,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda")] = "cpu",
    batch_size: Annotated[int, typer.Option("--batch-size", help="pairs per forward")] = 64,
    relevance: Annotated[
        str,
        typer.Option(
            help="a candidate is relevant when its diagnosis labels (labels: the paper's "
            "protocol, what the matching head learns) or its report text (text) equal the query's"
        ),
    ] = "labels",
) -> None:
    """Image<->report retrieval with the MedViLL matching head: each query ranks its true
    pair among CANDIDATES; MRR, Hit@5, Recall@5, Precision@5 against random ranking."""
    from raydiology.evaluation.medvill_eval import retrieval_run

    with user_errors():
        result = retrieval_run(
            run, corpus, split=None if split == "all" else split, out=out, device=device,
            candidates=candidates, seed=seed, scheme=attention, limit=limit,
            batch_size=batch_size, relevance=relevance,
        )  # fmt: skip
    print(json.dumps(result, indent=2))


@evaluate_app.command("medvill-generate")
def evaluate_medvill_generate(
    run: Annotated[Path, typer.Argument(help="a MedViLL run folder (or its export/)")],
    corpus: Annotated[Path, typer.Option("--corpus", help="corpus folder with images and reports")],
    split: Annotated[str, typer.Option(help="corpus split; 'all' for every row")] = "test",
    out: Annotated[
        Path | None,
        typer.Option(help="JSONL to write; default RUN/eval/medvill_predictions.jsonl"),
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="words per report; default the model's max_text_tokens")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="at most this many images")] = None,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda")] = "cpu",
    batch_size: Annotated[int, typer.Option("--batch-size", help="images decoded together")] = 16,
) -> None:
    """Reports by iterative [MASK] decoding under the S2S mask (greedy, no teacher forcing);
    writes the predictions `raydiology eval` scores."""
    from raydiology.evaluation.medvill_eval import generate_run

    with user_errors():
        rows, path = generate_run(
            run, corpus, split=None if split == "all" else split, out=out, device=device,
            max_tokens=max_tokens, limit=limit, batch_size=batch_size,
        )  # fmt: skip
    err.print(f"{len(rows)} reports -> {path}  (score them: raydiology eval {path})")


def main() -> None:  # pragma: no cover
    try:
        app()
    except ConfigError as e:
        err.print(f"[red]{e}[/]")
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()

"""The driver side of `raydiology run`: Ray (embedded or a cluster), corpus, dataset,
TorchTrainer, then the run directory's summary."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from raydiology.config import Experiment, save_resolved
from raydiology.train.validation import SCORE, selection_of

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    checkpoint: str | None
    export: Path | None
    picture: Path | None
    metrics: dict[str, Any]


def run_experiment(
    exp: Experiment,
    *,
    address: str | None = None,
    dashboard_host: str = "127.0.0.1",
    console: Console | None = None,
    callbacks: Sequence[Any] = (),
    allow_changes: Sequence[str] = (),
) -> RunResult:
    """`callbacks`: extra Ray Train callbacks, e.g. Tune's report callback in a sweep trial.

    A run name already used resumes that run: its saved config.yaml is compared with `exp`
    first, and changed settings raise ChangedSettings unless `allow_changes` lists them
    (a key or a section above it, e.g. "train.max_steps" or "train.optimizer").

    `output.dir` is Ray Train's storage_path and reaches Ray as written: a local path, a
    file:// URI or a remote URI (s3://, gs://, anything pyarrow opens; shared storage is
    what a multi-node run needs). The run directory (config.yaml, metrics.jsonl,
    summary.json, the export's copy) is <dir>/<name> for a local path or file:// URI. For a
    remote URI it is ./runs/<name> on the driver (with the phantom corpus, which the
    cluster's nodes must then be able to read), and config.yaml, metrics.jsonl and
    summary.json are uploaded beside the run's checkpoints when the run ends; the export
    travels inside the final checkpoint.
    """
    import dataclasses

    console = console or Console()
    storage = exp.output.dir
    scheme, _, rest = storage.partition("://") if "://" in storage else ("", "", storage)
    remote = scheme not in ("", "file")
    local_root = Path("runs" if remote else rest).expanduser().resolve()
    if not scheme:
        storage = str(local_root)
    run_dir = local_root / exp.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    pin_tokenizer(exp, run_dir, console=console)
    saved = saved_config(run_dir, storage if remote else None, exp.run_name)
    if saved is not None:
        allowed = check_changes(exp, saved, allow_changes, run_dir=run_dir)
        for key, (old, new) in allowed.items():
            console.print(f"[yellow]resuming with a changed setting[/] {key}: {old!r} -> {new!r}")
    save_resolved(exp, run_dir / CONFIG_FILE)

    local = dataclasses.replace(exp, output=dataclasses.replace(exp.output, dir=str(local_root)))
    corpus_dir = resolve_corpus(local, console=console)
    connected = connect_ray(address, dashboard_host=dashboard_host, console=console)
    console.print(f"[bold]run[/] {exp.run_name}  ->  {run_dir}")
    if remote:
        console.print(f"[bold]storage[/] {storage.rstrip('/')}/{exp.run_name}  (checkpoints)")
    if connected.dashboard_url:
        console.print(f"[bold]dashboard[/] {connected.dashboard_url}  (token in ~/.ray/auth_token)")

    import ray.data

    # The driver shows one progress bar (below); Ray Data's per-operator bars would bury it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    trainer = _build_trainer(
        exp,
        corpus_dir,
        run_dir,
        embedded=connected.embedded,
        console=console,
        callbacks=callbacks,
        storage_path=storage,
        first_epoch=resume_epoch(storage, exp.run_name) if saved is not None else 0,
    )
    try:
        with _Progress(run_dir / METRICS_FILE, exp.train.max_steps, console):
            result = trainer.fit()
        return _summarise(result, run_dir, console, select=selection_of(exp) is not None)
    finally:
        if remote:  # failed runs too: their config and metrics are what one debugs with
            import pyarrow.fs

            fs, root = pyarrow.fs.FileSystem.from_uri(storage)
            target = f"{root.rstrip('/')}/{exp.run_name}"
            for name in (CONFIG_FILE, METRICS_FILE, "summary.json"):
                if (run_dir / name).is_file():
                    with fs.open_output_stream(f"{target}/{name}") as out:
                        out.write((run_dir / name).read_bytes())
            console.print(f"  run files       uploaded to {storage.rstrip('/')}/{exp.run_name}")


CONFIG_FILE = "config.yaml"

# Settings a resumed run may change without --allow-changes: they do not change what it
# computes. Where its files go (the run folder found is the run; a relative and an absolute
# output.dir name the same one), how often it logs and pictures, and how Ray places and
# feeds its workers. Everything else (steps, schedule, batch, workers, data, model) counts.
FREE_TO_CHANGE = frozenset({
    "description",
    "output.dir",
    "output.name",
    "train.log_every",
    "train.reconstruction_images",
    "train.prefetch_batches",
    "data.decode_concurrency",
    "data.decode_pool",
    "scaling.cpus_per_worker",
    "scaling.accelerator_type",
    "scaling.resources_per_worker",
    "scaling.max_failures",
})  # fmt: skip


class ChangedSettings(ValueError):
    """A run name reused under other settings; `changes` maps each dotted key to
    (old, new), "(absent)" where one side lacks the key."""

    def __init__(self, run_dir: Path, changes: dict[str, tuple[Any, Any]]) -> None:
        self.run_dir, self.changes = run_dir, changes
        lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        super().__init__(
            f"run {run_dir.name} ({run_dir}) was started with other settings and a rerun "
            f"resumes it; changed:\n{lines}\nTo resume under them, allow them: "
            f"--allow-changes {','.join(changes)} (run_experiment(allow_changes=[...])); "
            "to start afresh, pick another output.name or delete the run's folder."
        )


def saved_config(run_dir: Path, storage: str | None, name: str) -> dict[str, Any] | None:
    """The config.yaml a run with this name saved, or None for a new run. `storage`: the
    remote URI of a run whose driver keeps its files in ./runs (uploaded there when a run
    ends), read where this driver's folder has none (a resume from another machine)."""
    import yaml

    local = run_dir / CONFIG_FILE
    if local.is_file():
        text = local.read_text()
    elif storage is not None:
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(storage)
        path = f"{root.rstrip('/')}/{name}/{CONFIG_FILE}"
        if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            text = f.read().decode()
    else:
        return None
    data = yaml.safe_load(text)
    return data if isinstance(data, dict) else None


def resume_epoch(storage: str, name: str) -> int:
    """The epoch of the run's newest finished checkpoint (0 if none): where a rerun resumes.

    Read by the driver before Ray Train restores, because the dataset is built first. A
    damaged newest checkpoint makes the loop fall back to an earlier one, possibly of an
    earlier epoch; that resume still sees every image once, in another order.
    """
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    selector = pyarrow.fs.FileSelector(f"{root.rstrip('/')}/{name}", allow_not_found=True)
    newest: tuple[int, int] = (-1, 0)  # (step, epoch)
    for info in fs.get_file_info(selector):
        if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith(
            "checkpoint_"
        ):
            continue
        state_file = f"{info.path}/train_state.json"
        if fs.get_file_info(state_file).type != pyarrow.fs.FileType.File:
            continue  # a checkpoint its writer did not finish
        with fs.open_input_stream(state_file) as f:
            state = json.loads(f.read())
        newest = max(newest, (int(state.get("step", 0)), int(state.get("epoch", 0))))
    return newest[1]


def check_changes(
    exp: Experiment, saved: dict[str, Any], allow: Sequence[str], *, run_dir: Path
) -> dict[str, tuple[Any, Any]]:
    """The settings `exp` changes against a run's `saved` config that `allow` lists (a key,
    or a section above it); raises ChangedSettings naming the others."""
    from raydiology.config import experiment_from_dict
    from raydiology.config_base import ConfigError

    # Read back through today's code, so a field added since the run started compares at
    # its default rather than as a change; a config that no longer loads compares as written.
    try:
        old = experiment_from_dict(saved).to_dict()
    except ConfigError:
        old = saved
    before, after = _flatten(old), _flatten(exp.to_dict())
    changes = {
        key: (before.get(key, "(absent)"), after.get(key, "(absent)"))
        for key in sorted(set(before) | set(after))
        if before.get(key, "(absent)") != after.get(key, "(absent)")
        and not _listed(key, FREE_TO_CHANGE)
    }
    refused = {k: v for k, v in changes.items() if not _listed(k, allow)}
    if refused:
        raise ChangedSettings(run_dir, refused)
    return changes


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"max_steps": 8}} -> {"train.max_steps": 8}; lists stay whole."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def _listed(key: str, keys: Any) -> bool:
    """`key` or a section above it is in `keys`."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in keys for i in range(1, len(parts) + 1))


TOKENIZER_DIR = "tokenizer"


def pin_tokenizer(exp: Experiment, run_dir: Path, *, console: Console) -> None:
    """Train the model's report tokenizer once, here, into the run directory, and point the
    experiment at that folder (in place).

    A tokenizer trained at build time (`kind: word | wordpiece | bpe | unigram`) is not
    repeatable across processes for every kind: WordPiece and Unigram break ties at the
    vocabulary cut-off in hash order. Trained on every start, a resumed run would read its
    checkpoint's embeddings with other ids. Pinned, every worker, every resume and every
    later load read one vocabulary. Models name theirs through `tokenizer_slot()`.
    """
    import dataclasses

    from raydiology.data.tokenizers import META_FILE, TRAINED_KINDS, build_tokenizer

    slot = getattr(exp.model.config, "tokenizer_slot", None)
    found = slot() if slot is not None else None
    if found is None:
        return
    owner, cfg = found
    if cfg.kind not in TRAINED_KINDS or cfg.path is not None:
        return
    folder = run_dir / TOKENIZER_DIR
    if not (folder / META_FILE).is_file():
        console.print(f"training the {cfg.kind} tokenizer on {cfg.train_reports} -> {folder}")
        build_tokenizer(cfg).save(folder)
    owner.tokenizer = dataclasses.replace(cfg, path=str(folder))


def resolve_corpus(exp: Experiment, *, console: Console) -> str:
    """The experiment's corpus, or the built-in phantom corpus (made once, then reused)."""
    from raydiology.data.corpus import CorpusError, read_manifest

    if exp.data.corpus:
        read_manifest(exp.data.corpus)  # fail early, naming the path, before Ray starts work
        return str(Path(exp.data.corpus).expanduser().resolve())
    from raydiology.data.phantom import write_phantom_corpus

    p = exp.data.phantom
    folder = (
        Path(exp.output.dir).expanduser().resolve()
        / "_corpora"
        / f"phantom-n{p.images}-s{p.size}-seed{p.seed}-p{p.finding_prob:g}"
        f"{f'-v{p.views}' if p.views > 1 else ''}"
        f"{f'-pose{p.pose:g}' if p.pose != 1 else ''}"
        f"{f'-lesion{p.lesion_scale:g}' if p.lesion_scale != 1 else ''}"
    )
    try:
        read_manifest(folder)
    except CorpusError:
        console.print(
            f"making the built-in phantom corpus ({p.images} images, {p.size}px) in {folder}"
        )
        shutil.rmtree(folder, ignore_errors=True)
        write_phantom_corpus(
            folder, n=p.images, size=p.size, seed=p.seed, finding_prob=p.finding_prob,
            views=p.views, pose=p.pose, lesion_scale=p.lesion_scale,
        )  # fmt: skip
    return str(folder)


@dataclass(frozen=True)
class RayConnection:
    """What `connect_ray` joined: the dashboard's URL (None when unknown) and whether this
    process started the Ray it runs on (`embedded`: sized to this machine, so the trainer
    leaves CPUs for Ray Data) rather than joining a cluster someone else sized."""

    dashboard_url: str | None
    embedded: bool


# Where Ray looks for a cluster's address: `ray.init()`, and every Ray API that talks to the
# dashboard (the State API behind Ray Train's placement-group cleaner, the Jobs SDK).
ADDRESS_ENV = "RAY_ADDRESS"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def connect_ray(address: str | None, *, dashboard_host: str, console: Console) -> RayConnection:
    """Join the cluster named by `address` or `RAY_ADDRESS`, or the Ray this process already
    runs on; with none of these, start a local Ray sized to this machine.

    A Ray job's driver (`ray job submit`, `raydiology submit`, a KubeRay RayJob) has
    `RAY_ADDRESS` set by Ray, and joining a cluster takes no local-only options (num_cpus,
    the dashboard's bind address). The embedded Ray binds its dashboard to `dashboard_host`
    (127.0.0.1 unless the user says otherwise) and keeps Ray's token authentication on.

    Either way the job's workers are told which cluster is theirs: Ray processes that find it
    for themselves (Ray Train's placement-group cleaner asks the State API) otherwise fail
    with "Found multiple active Ray instances" when another Ray runs on the machine.
    """
    import ray

    exposed = dashboard_host not in ("127.0.0.1", "localhost", "::1")
    if exposed and os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        raise RuntimeError(
            f"--dashboard-host {dashboard_host} exposes the Jobs API (remote code execution, "
            "CVE-2023-48022): it needs Ray's token authentication; unset RAY_AUTH_MODE="
            f"{os.environ['RAY_AUTH_MODE']} or keep the dashboard on 127.0.0.1"
        )
    # Ray's own precedence: RAY_ADDRESS stands in for a missing or "auto" address.
    env_address = os.environ.get(ADDRESS_ENV, "").strip()
    target = address if address and address != "auto" else (env_address or address)
    if ray.is_initialized():  # a test session's Ray, a Tune trial inside a sweep
        return RayConnection(dashboard_url=None, embedded=not target)
    if target:
        if "://" in target and not target.startswith("ray://"):
            raise RuntimeError(
                f"{target} is a dashboard (Jobs API) address, for `ray job submit` or "
                "`raydiology submit` (Ray's RAY_API_SERVER_ADDRESS); joining a cluster takes "
                "its GCS address (host:6379), or no address at all to start a local Ray"
            )
        # A job's workers do not inherit the driver's RAY_ADDRESS: hand it on.
        known = "://" not in target and target != "auto"
        runtime_env = {"env_vars": {ADDRESS_ENV: target}} if known else None
        context = ray.init(address=target, runtime_env=runtime_env, log_to_driver=True)
        return RayConnection(dashboard_url=_dashboard_url(context), embedded=False)
    if exposed:
        console.print(
            f"[yellow]warning[/]: the dashboard and Jobs API will listen on {dashboard_host}; "
            "anyone who reaches it with the token can run code on this machine"
        )
    # The dashboard's port is picked here, not by Ray, so the workers can be told where
    # their cluster's API is before it starts (the GCS port is only known afterwards).
    port = _dashboard_port(dashboard_host)
    context = ray.init(
        address="local",  # ours, even where `ray start` left a cluster for ray.init() to join
        num_cpus=os.cpu_count(),
        include_dashboard=True,
        dashboard_host=dashboard_host,
        dashboard_port=port,
        runtime_env={"env_vars": {API_SERVER_ENV: _local_url(dashboard_host, port)}},
        log_to_driver=True,
    )
    return RayConnection(dashboard_url=_dashboard_url(context), embedded=True)


def _dashboard_url(context: Any) -> str | None:
    """The dashboard's URL from the context `ray.init` returned, with its scheme."""
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


def _dashboard_port(host: str, preferred: int = 8265) -> int:
    """Ray's usual dashboard port when it is free on `host`, else any free port."""
    import socket

    family = socket.getaddrinfo(host, None)[0][0]
    for port in (preferred, 0):
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError(f"no free port for the dashboard on {host}")


def _local_url(host: str, port: int) -> str:
    """How this machine reaches a dashboard bound to `host` (a wildcard: via loopback)."""
    if host in ("0.0.0.0", "", "localhost"):
        host = "127.0.0.1"
    elif host in ("::", "::1"):
        host = "[::1]"
    return f"http://{host}:{port}"


def _build_trainer(
    exp: Experiment,
    corpus_dir: str,
    run_dir: Path,
    *,
    embedded: bool,
    console: Console,
    callbacks: Sequence[Any] = (),
    storage_path: str | None = None,
    first_epoch: int = 0,
):
    """`storage_path`: Ray Train's, as the user wrote it (a URI stays a URI); by default the
    run directory's parent. `first_epoch`: the epoch a resumed run continues, so its data
    order and augmentation replay that epoch's."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydiology.data.corpus import manifest_hash, read_manifest
    from raydiology.data.pipeline import build_dataset
    from raydiology.train.loop import train_loop_per_worker
    from raydiology.train.validation import VAL_DATASET, validation_data

    scaling = exp.scaling
    cpus = scaling.cpus_per_worker
    if embedded and not scaling.use_gpu:
        # Ray Data's read/decode tasks need CPUs too: with every CPU reserved by the
        # trainers the pipeline never starts (see DESIGN.md). Leave it at least one.
        total = ray.cluster_resources().get("CPU", 1.0)
        if total - cpus * scaling.num_workers < 1:
            cpus = max(0.1, round((total - 1) / scaling.num_workers, 2))
            console.print(f"embedded Ray has {total:g} CPUs: {cpus} per worker, the rest for data")
    resources: dict[str, float] = {"CPU": cpus}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    resources.update(scaling.resources_per_worker or {})
    columns = _corpus_columns(exp)
    datasets = {
        "train": build_dataset(exp.data, corpus_dir, extra_columns=columns, first_epoch=first_epoch)
    }
    # Ray keeps the latest checkpoint besides these (for resumes); with validation on, the
    # best two on val_score, otherwise the last two.
    checkpoints = CheckpointConfig(num_to_keep=2)
    if selection_of(exp) is not None:
        datasets[VAL_DATASET] = build_dataset(
            validation_data(exp), corpus_dir, extra_columns=columns
        )
        checkpoints = CheckpointConfig(
            num_to_keep=2, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
        )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "experiment": exp.to_dict(),
            "corpus_sha256": manifest_hash(corpus_dir),
            "attribution": read_manifest(corpus_dir).made_by.get("attribution"),
        },
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            accelerator_type=scaling.accelerator_type,
        ),
        run_config=RunConfig(
            name=exp.run_name,
            storage_path=storage_path or str(run_dir.parent),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=checkpoints,
            callbacks=[MetricsLog(str(run_dir / METRICS_FILE)), *callbacks],  # type: ignore[list-item]  # V2 UserCallback
            worker_runtime_env={"env_vars": _worker_env()},  # type: ignore[call-arg]  # V2 field
        ),
        datasets=datasets,
    )


def _corpus_columns(exp: Experiment) -> dict[str, str]:
    """Corpus columns the objective asks for (batch key -> column), e.g. masking regions."""
    wanted = getattr(exp.objective.config, "corpus_columns", None)
    return wanted() if callable(wanted) else {}


def _worker_env() -> dict[str, str]:
    env = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    # DeepSpeed JIT-builds a small op on first use; a shared cache makes that a one-off.
    env["TORCH_EXTENSIONS_DIR"] = os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "raydiology" / "torch_extensions")
    )
    return env


try:
    from ray.train import UserCallback as _UserCallback
except ImportError:  # pragma: no cover - Ray Train V1
    _UserCallback = object  # type: ignore[assignment,misc]


class MetricsLog(_UserCallback):  # type: ignore[misc,valid-type]
    """Appends rank 0's metrics to the run's metrics.jsonl (runs in the Train controller)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if not metrics or not metrics[0]:
            return
        row = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float, str)) or v is None}
        if checkpoint is not None:
            row["checkpoint"] = checkpoint.path
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class _Progress:
    """A rich progress bar on the driver, fed by the run's metrics.jsonl."""

    def __init__(self, metrics_path: Path, total: int, console: Console) -> None:
        self.metrics_path, self.total, self.console = metrics_path, total, console
        self._stop = threading.Event()

    def __enter__(self) -> _Progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=self.total, info="starting workers")
        self.progress.start()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            self._update()

    def _update(self) -> None:
        try:
            lines = self.metrics_path.read_text().splitlines()
        except FileNotFoundError:
            return
        if lines:
            last = json.loads(lines[-1])
            info = f"loss {last.get('loss', float('nan')):.4f}  {last.get('images_per_s', 0):.1f} img/s"
            self.progress.update(self.task, completed=last.get("step", 0), info=info)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()
        self._update()
        self.progress.stop()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _summarise(result, run_dir: Path, console: Console, *, select: bool = False) -> RunResult:
    """The run directory's summary.json, export and picture from Ray's result.

    The export comes from the last checkpoint, or with validation on (`select`) from the
    checkpoint with the best val_score (the later one on a tie, as Ray ranks them); the
    picture always from the last.
    """
    from raydiology.train.loop import EXPORT_DIR, PICTURE, PICTURE_ARRAYS

    if result.error:
        raise result.error
    export = picture = None
    checkpoint = result.checkpoint
    selected = _best(result) if select else None
    source = selected[0] if selected else checkpoint
    if source is not None:
        with source.as_directory() as folder:
            if (Path(folder) / EXPORT_DIR).is_dir():
                export = run_dir / EXPORT_DIR
                shutil.rmtree(export, ignore_errors=True)
                shutil.copytree(Path(folder) / EXPORT_DIR, export)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            if (Path(folder) / PICTURE).is_file():
                picture = run_dir / PICTURE
                for name in (PICTURE, PICTURE_ARRAYS):
                    if (Path(folder) / name).is_file():
                        shutil.copy(Path(folder) / name, run_dir / name)
    metrics = dict(result.metrics or {})
    summary: dict[str, Any] = {
        "metrics": metrics,
        "checkpoint": checkpoint.path if checkpoint else None,
        "export": str(export) if export else None,
        "picture": str(picture) if picture else None,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if selected:
        best, scores = selected
        summary["selected"] = {
            "step": scores.get("step"),
            "checkpoint": best.path,
            **{k: v for k, v in scores.items() if k.startswith("val_")},
        }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(
        f"[bold green]done[/] step {metrics.get('step')}  loss {metrics.get('loss', float('nan')):.4f}"
    )
    console.print(f"  checkpoint      {checkpoint.path if checkpoint else '-'}")
    if selected:
        console.print(
            f"  selected        step {selected[1].get('step')}  {SCORE} {selected[1][SCORE]:.4f}"
        )
    console.print(f"  encoder export  {export or '-'}  (raydiology.load_encoder(path))")
    console.print(f"  picture         {picture or '-'}")
    if "picture_masked_mse" in metrics:  # its masked pixels, vs filling them with the mean
        console.print(
            f"  masked MSE      {metrics['picture_masked_mse']:.4f}  "
            f"(each image's mean: {metrics['picture_mean_mse']:.4f})"
        )
    console.print(f"  config          {run_dir / 'config.yaml'}")
    return RunResult(run_dir, checkpoint.path if checkpoint else None, export, picture, metrics)


def _best(result) -> tuple[Any, dict[str, Any]] | None:
    """(checkpoint, metrics) with the highest val_score among those Ray kept, or None."""
    scored = [
        (c, m) for c, m in (result.best_checkpoints or []) if isinstance(m.get(SCORE), (int, float))
    ]
    if not scored:
        return None
    return max(scored, key=lambda cm: (cm[1][SCORE], cm[1].get("step", 0)))

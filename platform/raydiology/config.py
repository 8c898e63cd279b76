"""The experiment file: one YAML with sections data / model / objective / train / scaling /
output, loaded into typed configs. Each component later receives only its own section.

Model and objective sections name a registered component (`name:`); the rest of the section
is that component's own config dataclass, so their keys are checked like everyone else's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from raydiology.config_base import ConfigError, check, from_dict, to_dict
from raydiology.evaluation.protocol import EvaluationConfig
from raydiology.registry import MODELS, OBJECTIVES, Registry, build_model, build_objective

PROFILES_DIR = "profiles"


@dataclass(kw_only=True)
class PhantomConfig:
    """The built-in corpus used when an experiment names none."""

    images: int = 512
    size: int = 256
    seed: int = 0
    finding_prob: float = 0.3
    # films per phantom study: 1 = PA only; 2 = PA + LATERAL sharing one report, labels and
    # split (`images` counts studies, so the corpus holds images x views films)
    views: int = 1
    # spread of the patient's placement on the film and the nodules' size (`make_phantom`)
    pose: float = 1.0
    lesion_scale: float = 1.0

    def validate(self, key: str) -> None:
        check(self.images >= 1, f"{key}.images", self.images, "at least 1")
        check(0 <= self.pose <= 9, f"{key}.pose", self.pose, "0..9")
        check(0 < self.lesion_scale <= 4, f"{key}.lesion_scale", self.lesion_scale, "(0, 4]")
        check(self.views in (1, 2), f"{key}.views", self.views, "1 (PA) or 2 (PA + LATERAL)")
        check(16 <= self.size <= 4096, f"{key}.size", self.size, "16..4096 pixels")
        check(0 <= self.finding_prob <= 1, f"{key}.finding_prob", self.finding_prob, "0..1")


@dataclass(kw_only=True)
class AugmentConfig:
    hflip: bool = False
    # RandomResizedCrop area range, e.g. [0.2, 1.0]; null = no crop (the HD-MAE paper's choice)
    crop_scale: tuple[float, float] | None = None

    def validate(self, key: str) -> None:
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            check(
                0 < lo <= hi <= 1, f"{key}.crop_scale", list(self.crop_scale), "0 < min <= max <= 1"
            )


@dataclass(kw_only=True)
class DataConfig:
    corpus: str | None = None  # a corpus folder; null = the built-in phantom corpus
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    resolution: int = 1280  # model input side, pixels
    channels: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    splits: tuple[str, ...] | None = None  # keep rows whose `split` is one of these; null = all
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # How a non-square stored image becomes the R x R input, per image whatever its batch:
    # "pad" (zero-pad to square, content centred: ingest's default), "stretch" (resize each
    # axis), "crop" (the centred square). Square images come out the same under all three.
    fit: Literal["pad", "stretch", "crop"] = "pad"
    shuffle_seed: int | None = 0  # shard order shuffle per epoch; null = manifest order
    decode_batch_size: int = 16  # rows per Ray Data map_batches call
    decode_concurrency: int | None = None  # decode tasks in flight; null = Ray Data decides
    # Where decoding runs: "tasks" (a task per row group, anywhere on the cluster) or
    # "actors" (a pool of long-lived decoders, `decode_concurrency` of them, default one per
    # CPU: no per-task start-up; CPU-only nodes added to the cluster join the pool).
    decode_pool: Literal["tasks", "actors"] = "tasks"
    # Multi-anatomy mixing (XR-0): relative sampling weight per `anatomy` value, e.g.
    # {chest: 1.0, knee: 0.5}; "default" covers the rest. Null = every image once an epoch.
    anatomy_weights: dict[str, float] | None = None
    # Multi-view studies: >1 groups the rows of one `study_id` into one sample of up to this
    # many views (image [V, 1, R, R] + view_mask [V], padded views masked out); 1 = one image
    # a sample, as single-view models train.
    study_views: int = 1
    # Side of the square image a batch carries for an objective that cuts its own views
    # (DINOv2's multi-crop) from more pixels than the model's input: each image's fitted
    # canvas is resized to this side (down from a larger stored image, up from a smaller one,
    # so a batch has one shape); null = data.resolution. Memory per sample, S = this side:
    # S² x 1 or 2 bytes (uint8 / uint16 corpus) through Ray Data, and on the device at most
    # 30·S² bytes while `to_model_input` normalises in fp32 (16·S² held through the step):
    # at S = 848, 1.4 MB in transit and 21.6 MB / 11.5 MB on the device (docs/corpus_format.md).
    crop_source_size: int | None = None

    @property
    def batch_side(self) -> int:
        """The side of the images a batch carries: the crop source's, else the model input's."""
        return self.crop_source_size or self.resolution

    def validate(self, key: str) -> None:
        check(self.resolution >= 16, f"{key}.resolution", self.resolution, "at least 16 pixels")
        check(
            self.crop_source_size is None or self.resolution <= self.crop_source_size <= 8192,
            f"{key}.crop_source_size",
            self.crop_source_size,
            f"null or data.resolution ({self.resolution}) .. 8192 pixels",
        )
        check(1 <= self.study_views <= 16, f"{key}.study_views", self.study_views, "1..16 views")
        check(self.channels in (1, 3), f"{key}.channels", self.channels, "1 or 3")
        for name in ("mean", "std"):
            value = getattr(self, name)
            check(
                len(value) == self.channels,
                f"{key}.{name}",
                list(value),
                f"{self.channels} value(s), one per channel",
            )
        check(all(s > 0 for s in self.std), f"{key}.std", list(self.std), "positive values")
        check(
            self.fit in ("pad", "stretch", "crop"), f"{key}.fit", self.fit, "pad, stretch or crop"
        )
        check(
            self.decode_pool in ("tasks", "actors"),
            f"{key}.decode_pool",
            self.decode_pool,
            "'tasks' or 'actors'",
        )
        check(
            self.decode_concurrency is None or self.decode_concurrency >= 1,
            f"{key}.decode_concurrency",
            self.decode_concurrency,
            "null or at least 1",
        )
        check(
            self.decode_batch_size >= 1,
            f"{key}.decode_batch_size",
            self.decode_batch_size,
            "at least 1",
        )
        if self.anatomy_weights is not None:
            weights = self.anatomy_weights
            valid = bool(weights) and all(
                isinstance(v, (int, float)) and v >= 0 for v in weights.values()
            )
            check(
                valid and max(weights.values()) > 0,
                f"{key}.anatomy_weights",
                weights,
                "a mapping of anatomy -> non-negative weight, at least one positive",
            )


@dataclass(kw_only=True)
class OptimizerConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 2.5e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.04
    weight_decay_end: float | None = None  # cosine weight-decay schedule to this value
    # The AdamW implementation. auto: DeepSpeed's FusedAdam where DeepSpeed was installed
    # with it prebuilt (the cluster image), else torch's fused AdamW on GPUs (no JIT build at
    # run time) and torch's foreach AdamW on CPUs.
    kernel: Literal["auto", "deepspeed_fused", "torch_fused", "torch"] = "auto"
    # Layer-wise lr decay (BEiT, DINOv2 `optim.layerwise_decay`): a parameter at depth i of
    # an encoder of L blocks takes lr x layer_decay^(L+1-i); depth 0 = patch embedding,
    # positions and tokens, i = block i-1, L+1 = the rest (final norm, heads). 1 = off.
    layer_decay: float = 1.0
    patch_embed_lr_mult: float = 1.0  # lr multiplier of `patch_embed.*` (DINOv2: 0.2)
    # The DINO head's `last_layer` takes lr 0 for this many optimizer steps (DINOv2's
    # `optim.freeze_last_layer_epochs`, counted in steps as the loop counts: DINOv2's epoch
    # is OFFICIAL_EPOCH_LENGTH = 1250 iterations). 0 = off.
    freeze_last_layer_steps: int = 0

    def validate(self, key: str) -> None:
        check(self.lr > 0, f"{key}.lr", self.lr, "a positive learning rate")
        check(0 < self.layer_decay <= 1, f"{key}.layer_decay", self.layer_decay, "in (0, 1]")
        check(
            self.patch_embed_lr_mult > 0,
            f"{key}.patch_embed_lr_mult",
            self.patch_embed_lr_mult,
            "a positive multiplier",
        )
        check(
            self.freeze_last_layer_steps >= 0,
            f"{key}.freeze_last_layer_steps",
            self.freeze_last_layer_steps,
            ">= 0 (0 = off)",
        )
        # eps keeps Adam's update finite where a gradient's second moment is 0
        check(self.eps > 0, f"{key}.eps", self.eps, "a positive number (e.g. 1e-8)")
        check(
            all(0 <= b < 1 for b in self.betas),
            f"{key}.betas",
            list(self.betas),
            "values in [0, 1)",
        )
        check(self.weight_decay >= 0, f"{key}.weight_decay", self.weight_decay, ">= 0")


@dataclass(kw_only=True)
class ScheduleConfig:
    # step: the rate times `gamma` every `step_size` optimizer steps (torch's StepLR, R2Gen's
    # schedule, counted in steps rather than epochs).
    # cosine_restarts: cosine with warm restarts (SGDR; torch's CosineAnnealingWarmRestarts)
    # after the warmup, the first cycle `restart_steps` long (T_0), each next one
    # `restart_mult` times longer (T_mult)
    name: Literal["constant", "cosine", "cosine_restarts", "step"] = "cosine"
    warmup_steps: int = 0
    min_lr: float = 0.0  # the cosines' floor
    step_size: int = 1000
    gamma: float = 0.1
    restart_steps: int | None = None
    restart_mult: int = 1

    def validate(self, key: str) -> None:
        check(self.warmup_steps >= 0, f"{key}.warmup_steps", self.warmup_steps, ">= 0")
        check(self.min_lr >= 0, f"{key}.min_lr", self.min_lr, ">= 0")
        check(self.step_size >= 1, f"{key}.step_size", self.step_size, "at least 1")
        check(0 < self.gamma <= 1, f"{key}.gamma", self.gamma, "0 < gamma <= 1")
        check(
            self.name != "cosine_restarts"
            or (self.restart_steps is not None and self.restart_steps >= 1),
            f"{key}.restart_steps",
            self.restart_steps,
            "the first cycle's length in steps (at least 1) for cosine_restarts",
        )
        check(self.restart_mult >= 1, f"{key}.restart_mult", self.restart_mult, "at least 1")


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 1000  # optimizer steps
    micro_batch_size: int = 8  # per worker, per forward
    grad_accum: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    zero_stage: int = 2
    grad_clip: float | None = 3.0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    log_every: int = 10
    checkpoint_every: int = 500
    # Validation (objectives that can, e.g. report_sft): 0 = off. On, every checkpoint is
    # validated and every multiple of eval_every (and the last step) is validated and
    # checkpointed; the best checkpoint on the objective's selection score is exported.
    eval_every: int = 0
    seed: int = 0
    prefetch_batches: int = 2
    # Rows each worker shuffles before cutting micro-batches (0 = row-group order only). A
    # 1280-px row group holds ~20 images of neighbouring paths (one patient or series), so
    # 512 rows span ~25 row groups and a micro-batch of 8 comes from ~7 different ones;
    # it holds 512 decoded images per worker (0.8 GB at 1280 px uint8).
    local_shuffle_buffer: int = 512
    reconstruction_images: int = 4  # rows in reconstruction.png
    # Ranks agree on how many micro-batches an epoch has once per this many (read ahead),
    # not per micro-batch: each agreement is a collective and a host sync.
    sync_every: int = 8
    compile: bool = False  # torch.compile each repeated block (opt-in: see `bench step`)

    def validate(self, key: str) -> None:
        check(self.max_steps >= 1, f"{key}.max_steps", self.max_steps, "at least 1")
        check(
            self.micro_batch_size >= 1,
            f"{key}.micro_batch_size",
            self.micro_batch_size,
            "at least 1",
        )
        check(self.grad_accum >= 1, f"{key}.grad_accum", self.grad_accum, "at least 1")
        check(self.zero_stage in (0, 1, 2, 3), f"{key}.zero_stage", self.zero_stage, "0, 1, 2 or 3")
        check(
            self.grad_clip is None or self.grad_clip > 0,
            f"{key}.grad_clip",
            self.grad_clip,
            "a positive norm or null",
        )
        check(self.log_every >= 1, f"{key}.log_every", self.log_every, "at least 1")
        check(
            self.checkpoint_every >= 1,
            f"{key}.checkpoint_every",
            self.checkpoint_every,
            "at least 1",
        )
        check(self.eval_every >= 0, f"{key}.eval_every", self.eval_every, ">= 0 (0 = off)")
        check(self.sync_every >= 1, f"{key}.sync_every", self.sync_every, "at least 1")
        check(
            self.schedule.warmup_steps <= self.max_steps,
            f"{key}.schedule.warmup_steps",
            self.schedule.warmup_steps,
            f"at most train.max_steps ({self.max_steps})",
        )
        check(
            self.schedule.min_lr <= self.optimizer.lr,
            f"{key}.schedule.min_lr",
            self.schedule.min_lr,
            f"at most train.optimizer.lr ({self.optimizer.lr:g})",
        )


@dataclass(kw_only=True)
class ScalingSection:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used only with use_gpu
    accelerator_type: str | None = None  # e.g. "A100" / "A800": Ray's accelerator label
    max_failures: int = 0  # worker-group restarts from the latest checkpoint
    # Custom Ray resources each worker reserves besides its CPUs/GPUs, e.g. {trainer_slot: 1}
    # to keep workers on the nodes started with `ray start --resources '{"trainer_slot": 1}'`
    # (and off CPU-only data nodes). null = none.
    resources_per_worker: dict[str, float] | None = None

    def validate(self, key: str) -> None:
        check(self.num_workers >= 1, f"{key}.num_workers", self.num_workers, "at least 1")
        check(self.cpus_per_worker > 0, f"{key}.cpus_per_worker", self.cpus_per_worker, "> 0")
        check(self.gpus_per_worker > 0, f"{key}.gpus_per_worker", self.gpus_per_worker, "> 0")
        for name, amount in (self.resources_per_worker or {}).items():
            check(
                isinstance(name, str) and bool(name) and name not in ("CPU", "GPU"),
                f"{key}.resources_per_worker",
                name,
                "a custom resource name (CPUs and GPUs: cpus_per_worker, gpus_per_worker)",
            )
            check(
                isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount > 0,
                f"{key}.resources_per_worker.{name}",
                amount,
                "a positive amount",
            )
        check(
            self.max_failures >= -1,
            f"{key}.max_failures",
            self.max_failures,
            ">= -1 (-1 = forever)",
        )


@dataclass(kw_only=True)
class OutputConfig:
    # Ray Train's storage: a path, file:///abs/path or s3://, gs://...; on a multi-node
    # cluster, storage every node reaches (NFS, object storage)
    dir: str = "runs"
    name: str | None = None  # run name; null = the experiment name. Same name = resume.

    def validate(self, key: str) -> None:
        if self.name is not None:
            check_run_name(self.name, f"{key}.name")
        scheme, sep, rest = self.dir.partition("://")
        check(
            not sep or scheme != "file" or rest.startswith("/"),
            f"{key}.dir",
            self.dir,
            "a path, an absolute file:// URI (file:///mnt/runs) or a storage URI (s3://...)",
        )


# A run name is one folder under output.dir (and a Ray Train run name): one plain path
# component, never `..`, a separator or a leading dot.
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def check_run_name(name: Any, key: str) -> None:
    check(
        isinstance(name, str) and _RUN_NAME.fullmatch(name) is not None,
        key,
        name,
        "a run name of letters, digits, '.', '_' and '-' (one folder name, starting with a "
        "letter or digit)",
    )


@dataclass
class Component:
    """A registered component (model or objective) and its own typed config."""

    name: str
    config: Any


@dataclass(kw_only=True)
class Experiment:
    name: str
    description: str = ""
    data: DataConfig
    model: Component
    objective: Component
    train: TrainConfig
    scaling: ScalingSection
    output: OutputConfig
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    @property
    def run_name(self) -> str:
        return self.output.name or self.name

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["data"] = to_dict(self.data)
        for section in ("model", "objective"):
            comp: Component = getattr(self, section)
            out[section] = {"name": comp.name, **to_dict(comp.config)}
        for section in ("train", "scaling", "output"):
            out[section] = to_dict(getattr(self, section))
        if self.evaluation != EvaluationConfig():  # absent = default: older runs' configs match
            out["evaluation"] = to_dict(self.evaluation)
        return out

    def config_hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


_SECTIONS = {
    "data": DataConfig,
    "train": TrainConfig,
    "scaling": ScalingSection,
    "output": OutputConfig,
    "evaluation": EvaluationConfig,
}


def experiment_from_dict(raw: dict[str, Any]) -> Experiment:
    """Typed experiment from a plain dict; raises ConfigError naming the bad key."""
    if not isinstance(raw, dict):
        raise ConfigError("(experiment)", raw, "a mapping of sections")
    allowed = {"name", "description", "model", "objective", *_SECTIONS}
    for key in raw:
        check(key in allowed, key, raw[key], f"one of the sections {sorted(allowed)}")
    check(
        isinstance(raw.get("name"), str) and raw["name"] != "",
        "name",
        raw.get("name"),
        "a non-empty experiment name",
    )
    sections: dict[str, Any] = {
        key: from_dict(cls, raw.get(key), key) for key, cls in _SECTIONS.items()
    }
    if sections["output"].name is None:  # the run's folder is named after the experiment
        check_run_name(raw["name"], "name")
    exp = Experiment(
        name=raw["name"],
        description=raw.get("description", ""),
        model=_component(MODELS, raw.get("model"), "model"),
        objective=_component(OBJECTIVES, raw.get("objective"), "objective"),
        **sections,
    )
    _validate_across_sections(exp)
    return exp


def _component(registry: Registry[Any], raw: Any, key: str) -> Component:
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError(
            f"{key}.name",
            None if not isinstance(raw, dict) else raw.get("name"),
            f"one of the registered {registry.kind}s {registry.names()}",
        )
    body = {k: v for k, v in raw.items() if k != "name"}
    try:
        entry = registry.get(raw["name"])
    except KeyError:
        raise ConfigError(
            f"{key}.name", raw["name"], f"one of the registered {registry.kind}s {registry.names()}"
        ) from None
    return Component(raw["name"], from_dict(entry.config_cls, body, key))


# Models whose forward takes a study (images [B, V, ...] + view_mask): report_generator
# averages its views' tokens, r2gen concatenates them.
MULTI_VIEW_MODELS = ("report_generator", "r2gen")
# Objectives that cut their views from the batch's images, so they can take images larger
# than the model's input (`data.crop_source_size`).
CROPPING_OBJECTIVES = ("dinov2",)


def _validate_across_sections(exp: Experiment) -> None:
    """Rules that span sections: building the model on the meta device checks image size
    against patch size, and the objective checks its masking against the patch grid."""
    import torch

    with torch.device("meta"):
        model = build_model(exp.model, exp.data)
        build_objective(exp.objective, model)
    check(
        exp.train.precision != "fp16" or exp.scaling.use_gpu,
        "train.precision",
        "fp16",
        "fp32 or bf16 on CPU workers (fp16 needs GPUs)",
    )
    check(
        exp.data.crop_source_size is None or exp.objective.name in CROPPING_OBJECTIVES,
        "data.crop_source_size",
        exp.data.crop_source_size,
        f"null for objective {exp.objective.name!r} (a larger crop source feeds "
        + " and ".join(CROPPING_OBJECTIVES)
        + ", which cut their own views)",
    )
    for name in ("mean", "std"):  # an objective that un-normalises must match the data
        value = getattr(exp.objective.config, f"input_{name}", None)
        check(
            value is None or tuple(value) == tuple(getattr(exp.data, name)),
            f"objective.input_{name}",
            None if value is None else list(value),
            f"null or data.{name} {list(getattr(exp.data, name))}",
        )
    check(
        exp.data.study_views == 1 or exp.model.name in MULTI_VIEW_MODELS,
        "data.study_views",
        exp.data.study_views,
        f"1 for a {exp.model.name} model (multi-view studies feed "
        + " and ".join(MULTI_VIEW_MODELS)
        + " models)",
    )


# ----------------------------------------------------------------------------- loading


def load_experiment(
    path: str | Path, *, profile: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Experiment:
    """Load an experiment file, overlay `experiments/profiles/PROFILE.yaml`, then `--set`s."""
    return experiment_from_dict(resolve_raw(path, profile=profile, overrides=overrides))


def resolve_raw(
    path: str | Path, *, profile: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    path = Path(path)
    raw = _read_yaml_with_base(path)
    if profile:
        raw = deep_merge(raw, read_profile(path, profile))
    for item in overrides:
        raw = apply_override(raw, item)
    return raw


def find_profile(experiment_path: Path, profile: str) -> Path:
    """Profiles live in `experiments/profiles/`, found by walking up from the experiment."""
    for folder in [experiment_path.resolve().parent, *experiment_path.resolve().parents]:
        candidate = folder / PROFILES_DIR / f"{profile}.yaml"
        if candidate.is_file():
            return candidate
        if folder.name == "experiments":
            break
    raise ConfigError(
        "--profile", profile, f"a file {PROFILES_DIR}/{profile}.yaml beside the experiments"
    )


def read_profile(experiment_path: Path, profile: str) -> dict[str, Any]:
    """A profile's keys; like an experiment, it may start from another (`base: smoke.yaml`)."""
    return _read_yaml_with_base(find_profile(experiment_path, profile))


def apply_override(raw: dict[str, Any], item: str) -> dict[str, Any]:
    """`section.key=value`; the value is parsed as YAML (numbers, lists, null, true)."""
    if "=" not in item:
        raise ConfigError("--set", item, "section.key=value")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    if len(keys) < 2 and keys[0] not in ("name", "description"):
        raise ConfigError("--set", item, "section.key=value (e.g. train.max_steps=100)")
    value = yaml.safe_load(text) if text.strip() else None
    out = copy.deepcopy(raw)
    node = out
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            raise ConfigError(dotted, text, f"a key inside the mapping {k!r}")
        node = node[k]
    node[keys[-1]] = value
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            # A component section that switches `name` replaces the whole section.
            if "name" in value and value["name"] != out[key].get("name"):
                out[key] = copy.deepcopy(value)
            else:
                out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError("(file)", str(path), "an existing YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError("(file)", str(path), f"valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("(file)", str(path), "a YAML mapping of sections")
    return data


def _read_yaml_with_base(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """An experiment (or a profile) may start from another (`base: other.yaml`) and change a
    few keys."""
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ConfigError("base", base, "a file that does not include itself")
    return deep_merge(_read_yaml_with_base(base_path, (*seen, base_path)), raw)


def save_resolved(exp: Experiment, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(exp.to_dict(), sort_keys=False))

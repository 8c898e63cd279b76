"""Image-report CLIP (MambaXray-VL stage 2; XR-0's mXR-0 with PubMedBERT): two towers whose
projections of an image and its report are pulled together by a contrastive loss.

    images [B, C, R, R] (or [B, V, C, R, R]) -> image encoder -> tokens [B, T, d]
        -> mean over tokens (and views) [B, d] -> Linear(d -> P)              image features
    reports (text) -> tokenizer -> [CLS] w1 .. wn [SEP] (max_length) -> BERT -> [B, L, H]
        -> the [SEP] token's state [B, H] -> Linear(H -> P)                   text features

The image tower is an exported raydiology encoder (`image.path`), a timm model (`image.timm`)
or a registry model built from config (`image.model`); the text tower is a BERT built from the
flavor's shape (Bio_ClinicalBERT = bert-base with a 28,996-token vocabulary) with random
weights, or read from a local `save_pretrained` folder (`text.path`; nothing is downloaded).
The model's `encoder` is the image tower, so the run's export is the aligned image encoder;
beside it the objective writes the rest of the CLIP (`save_clip`: text tower, projections,
logit scale, tokenizer), and `load_clip` rebuilds the whole model from that folder alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from raydiology.config_base import ConfigError, check, from_dict
from raydiology.data.tokenizers import TokenizerConfig, build_tokenizer
from raydiology.registry import MODELS

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's temperature 0.07
LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clamps the scale at 100

CLIP_FORMAT = "raydiology-clip/1"
CLIP_WEIGHTS = "clip.safetensors"  # everything but the encoder (encoder.safetensors)
CLIP_SPEC = "clip.json"
CLIP_TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True, kw_only=True)
class ClipArgs:
    """One row of the flavors table: the projection width and the text tower's BERT shape."""

    proj_dim: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int | None  # None = the tokenizer's vocabulary size


CLIP_FLAVORS: dict[str, ClipArgs] = {
    # CPU tests: a 2-layer, 64-wide BERT over a small report vocabulary.
    "tiny": ClipArgs(proj_dim=64, hidden_size=64, num_layers=2, num_heads=4,
                     intermediate_size=128, vocab_size=None),
    # MambaXray-VL: Bio_ClinicalBERT (bert-base-cased shape), 2048-d joint space.
    "paper": ClipArgs(proj_dim=2048, hidden_size=768, num_layers=12, num_heads=12,
                      intermediate_size=3072, vocab_size=28996),
}  # fmt: skip


@dataclass(kw_only=True)
class ImageTowerConfig:
    """Where the image encoder comes from: an export, a timm model, or a registry model."""

    path: str | None = None  # a raydiology export folder (raydiology.load_encoder)
    timm: str | None = None  # a timm model name (random weights unless timm_checkpoint)
    timm_checkpoint: str | None = None
    model: dict[str, Any] = field(default_factory=lambda: {"name": "hd_mae", "flavor": "tiny"})
    freeze: bool = False

    def validate(self, key: str) -> None:
        check(self.path is None or self.timm is None, f"{key}.timm", self.timm,
              "null when image.path names an export (one source of the encoder)")  # fmt: skip
        if self.path is None and self.timm is None:
            name = self.model.get("name") if isinstance(self.model, dict) else None
            check(isinstance(name, str) and name not in ("image_report_clip", "medvill"),
                  f"{key}.model.name", name, "a registered image model (e.g. vision_mamba)")  # fmt: skip
            try:
                entry = MODELS.get(str(name))
            except KeyError:
                raise ConfigError(f"{key}.model.name", name, f"one of {MODELS.names()}") from None
            from_dict(entry.config_cls, {k: v for k, v in self.model.items() if k != "name"},
                      f"{key}.model")  # fmt: skip


# Without a tokenizer section or a text.path folder: WordPiece trained on the phantom reports.
DEFAULT_TOKENIZER = TokenizerConfig(
    kind="wordpiece", train_reports="phantom", vocab_size=8000, min_freq=1, clean=None
)


@dataclass(kw_only=True)
class TextTowerConfig:
    """The BERT text encoder: the flavor's shape (+ overrides) or a local folder."""

    path: str | None = None  # a local save_pretrained folder (model + tokenizer)
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    max_length: int = 128  # tokens including [CLS] and [SEP]
    # null = the folder's tokenizer (path), else WordPiece trained on the phantom reports
    tokenizer: TokenizerConfig | None = None
    freeze: bool = False

    def validate(self, key: str) -> None:
        check(self.max_length >= 3, f"{key}.max_length", self.max_length, "at least 3")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size"):
            value = getattr(self, name)
            check(value is None or value > 0, f"{key}.{name}", value, "a positive number or null")
        if self.tokenizer is not None:
            self.tokenizer.validate(f"{key}.tokenizer")

    def tokenizer_slot(self) -> tuple[Any, TokenizerConfig] | None:
        """(the config whose `tokenizer` is set, the tokenizer it builds), None when the
        tokenizer is the text folder's own: see train.launch.pin_tokenizer."""
        if self.tokenizer is None and self.path is not None:
            return None
        return self, self.tokenizer or DEFAULT_TOKENIZER


@dataclass(kw_only=True)
class ImageReportClipConfig:
    """The `model` section for ``name: image_report_clip``."""

    flavor: str = "tiny"
    proj_dim: int | None = None
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        check(self.flavor in CLIP_FLAVORS, f"{k}flavor", self.flavor,
              "one of " + ", ".join(CLIP_FLAVORS))  # fmt: skip
        check(self.proj_dim is None or self.proj_dim > 0, f"{k}proj_dim", self.proj_dim, "> 0")
        self.image.validate(f"{k}image")
        self.text.validate(f"{k}text")
        a = self.args()
        check(a.hidden_size % a.num_heads == 0, f"{k}text.num_heads", a.num_heads,
              f"a divisor of hidden_size ({a.hidden_size})")  # fmt: skip

    def tokenizer_slot(self) -> tuple[Any, TokenizerConfig] | None:
        return self.text.tokenizer_slot()

    def args(self) -> ClipArgs:
        base = CLIP_FLAVORS[self.flavor]
        t = self.text
        return ClipArgs(
            proj_dim=self.proj_dim or base.proj_dim,
            hidden_size=t.hidden_size or base.hidden_size,
            num_layers=t.num_layers or base.num_layers,
            num_heads=t.num_heads or base.num_heads,
            intermediate_size=t.intermediate_size or base.intermediate_size,
            vocab_size=t.vocab_size or base.vocab_size,
        )


# ----------------------------------------------------------------------------- tokenizer


class TextTokenizer:
    """Reports -> BERT inputs: ``[CLS] tokens [SEP] pad``, truncated to `max_length`.

    Wraps a folder's BERT tokenizer ([CLS]/[SEP]/[PAD]) or a report tokenizer trained by
    `data/tokenizers.py` (whose BOS/EOS play [CLS]/[SEP]).
    """

    def __init__(
        self, hf: Any, *, cls_id: int, sep_id: int, pad_id: int, prepare: Any, report: Any = None
    ) -> None:
        self.hf, self.cls_id, self.sep_id, self.pad_id = hf, cls_id, sep_id, pad_id
        self._prepare = prepare  # text -> text the tokenizer sees (R2Gen cleaning or none)
        self.report = report  # the ReportTokenizer it wraps (keeps its cleaning when saved)

    def save(self, folder: str | Path) -> Path:
        """A folder `load_text_tokenizer` reads back (no trace of where it came from)."""
        if self.report is not None:
            return Path(self.report.save(folder))
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(folder))
        return folder

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(self._prepare(text), add_special_tokens=False))

    def __call__(self, texts: list[str], max_length: int) -> tuple[Tensor, Tensor, Tensor]:
        """-> ids [B, L], attention mask [B, L] (1 on tokens), the [SEP] positions [B]."""
        rows = [[self.cls_id, *self.encode(t)[: max_length - 2], self.sep_id] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask, torch.tensor([len(r) - 1 for r in rows])


def build_text_tokenizer(cfg: TextTowerConfig) -> TextTokenizer:
    if cfg.path is not None and not Path(cfg.path).is_dir():
        raise ConfigError("model.text.path", cfg.path, "a local save_pretrained folder")
    if cfg.tokenizer is None and cfg.path is not None:
        return _folder_tokenizer(cfg.path, "model.text.path")
    return _report_tokenizer(build_tokenizer(cfg.tokenizer or DEFAULT_TOKENIZER))


def _folder_tokenizer(path: str | Path, key: str) -> TextTokenizer:
    """A BERT-style tokenizer folder ([CLS]/[SEP], or BOS/EOS standing in for them)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    cls_id = hf.cls_token_id if hf.cls_token_id is not None else hf.bos_token_id
    sep_id = hf.sep_token_id if hf.sep_token_id is not None else hf.eos_token_id
    pad_id = hf.pad_token_id if hf.pad_token_id is not None else sep_id
    if cls_id is None or sep_id is None:
        raise ConfigError(key, str(path), "a tokenizer with [CLS] and [SEP]")
    return TextTokenizer(hf, cls_id=cls_id, sep_id=sep_id, pad_id=pad_id, prepare=str)


def _report_tokenizer(rt: Any) -> TextTokenizer:
    """A `data/tokenizers.ReportTokenizer`, its BOS/EOS playing [CLS]/[SEP]."""
    return TextTokenizer(rt.hf, cls_id=rt.bos_id, sep_id=rt.eos_id, pad_id=rt.pad_id,
                         prepare=rt.prepare, report=rt)  # fmt: skip


def load_text_tokenizer(folder: str | Path) -> TextTokenizer:
    """What `TextTokenizer.save` wrote: a report tokenizer (with its cleaning) or a BERT one."""
    from raydiology.data.tokenizers import META_FILE, ReportTokenizer

    folder = Path(folder)
    if (folder / META_FILE).is_file():
        return _report_tokenizer(ReportTokenizer.load(folder))
    return _folder_tokenizer(folder, "tokenizer")


# ----------------------------------------------------------------------------- the module


class ImageReportClip(nn.Module):
    """Two towers into one P-dim space; `logit_scale` is CLIP's learnable log temperature."""

    text: Any  # a transformers BertModel
    spec: dict[str, Any]  # set by load_clip: the encoder export's JSON
    clip_spec: dict[str, Any]  # set by load_clip: clip.json

    def __init__(
        self,
        encoder: nn.Module,
        text: Any,
        tokenizer: TextTokenizer,
        *,
        proj_dim: int,
        max_length: int,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.image_proj = nn.Linear(int(encoder.embed_dim), proj_dim)  # type: ignore[arg-type]
        self.text = text
        self.text_proj = nn.Linear(int(text.config.hidden_size), proj_dim)
        # shape [1], not []: DeepSpeed's parameter broadcast cannot take 0-d tensors
        self.logit_scale = nn.Parameter(torch.tensor([LOGIT_SCALE_INIT]))
        self.tokenizer = tokenizer  # not a module
        self.max_length = max_length
        # how to rebuild the image tower's architecture without its source files (save_clip)
        self.image_source: dict[str, Any] = {}

    def encode_images(self, images: Tensor) -> Tensor:
        """images [B, C, R, R] or [B, V, C, R, R] -> unnormalised features [B, P]."""
        views = images.shape[1] if images.ndim == 5 else 1
        flat = images.flatten(0, 1) if images.ndim == 5 else images
        pooled = self.encoder(flat).mean(dim=1)  # [B*V, d]
        return self.image_proj(pooled.unflatten(0, (-1, views)).mean(dim=1))

    def encode_reports(self, reports: list[str]) -> Tensor:
        """B report texts -> unnormalised features [B, P] from each [SEP] token's state."""
        device = self.text_proj.weight.device
        ids, mask, sep = self.tokenizer(reports, self.max_length)
        states = self.text(input_ids=ids.to(device), attention_mask=mask.to(device))
        hidden = states.last_hidden_state  # [B, L, H]
        return self.text_proj(hidden[torch.arange(len(reports), device=device), sep.to(device)])

    def forward(self, images: Tensor, reports: list[str]) -> tuple[Tensor, Tensor]:
        return self.encode_images(images), self.encode_reports(reports)


# ----------------------------------------------------------------------------- building


def _on_meta() -> bool:
    return torch.empty(0).device.type == "meta"


def build_text_tower(cfg: ImageReportClipConfig, tokenizer: TextTokenizer) -> Any:
    """A BertModel: from `text.path` (local only) or the flavor's shape with random weights."""
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel

    t = cfg.text
    if t.path is not None:
        if not Path(t.path).is_dir():
            raise ConfigError("model.text.path", t.path, "a local save_pretrained folder")
        if _on_meta():
            return AutoModel.from_config(
                AutoConfig.from_pretrained(t.path, local_files_only=True), add_pooling_layer=False
            )
        return AutoModel.from_pretrained(t.path, local_files_only=True, add_pooling_layer=False)
    a = cfg.args()
    vocab = a.vocab_size if a.vocab_size is not None else tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ConfigError("model.text.vocab_size", vocab,
                          f"at least the tokenizer's {tokenizer.vocab_size} tokens")  # fmt: skip
    config = BertConfig(
        vocab_size=vocab, hidden_size=a.hidden_size, num_hidden_layers=a.num_layers,
        num_attention_heads=a.num_heads, intermediate_size=a.intermediate_size,
        max_position_embeddings=max(512, t.max_length), pad_token_id=tokenizer.pad_id,
    )  # fmt: skip
    return BertModel(config, add_pooling_layer=False)


@MODELS.register("image_report_clip", ImageReportClipConfig)
def build_image_report_clip(
    cfg: ImageReportClipConfig, *, image_size: int, in_chans: int
) -> ImageReportClip:
    from raydiology.models.report_generator import VisionConfig, build_vision

    cfg.validate("model")
    im = cfg.image
    vision = VisionConfig(path=im.path, timm=im.timm, timm_checkpoint=im.timm_checkpoint,
                          model=dict(im.model), train="full")  # fmt: skip
    encoder = build_vision(vision, image_size=image_size, in_chans=in_chans)
    tokenizer = build_text_tokenizer(cfg.text)
    text = build_text_tower(cfg, tokenizer)
    encoder.requires_grad_(not im.freeze)
    text.requires_grad_(not cfg.text.freeze)
    model = ImageReportClip(
        encoder, text, tokenizer, proj_dim=cfg.args().proj_dim, max_length=cfg.text.max_length
    )
    model.image_source = image_source(im, encoder)
    return model


def image_source(im: ImageTowerConfig, encoder: nn.Module) -> dict[str, Any]:
    """The image tower's architecture with no file behind it: {"timm": name} or {"model":
    registry section}. An export named by `image.path` contributes its own model section;
    weights read at build time (`init_from`, a timm checkpoint) are dropped, since the
    CLIP export carries the trained weights."""
    from raydiology.train.export import SPEC

    if im.timm is not None:
        return {"timm": im.timm}
    if im.path is None:
        section = dict(im.model)
    else:
        folder = Path(im.path).expanduser()
        folder = folder.parent if folder.suffix == ".json" else folder
        if (folder / CLIP_SPEC).is_file():  # an image tower taken from another CLIP
            return dict(json.loads((folder / CLIP_SPEC).read_text())["image"])
        spec = getattr(encoder, "spec", None) or json.loads((folder / SPEC).read_text())
        section = dict(spec["model"])
    if "init_from" in section:
        section["init_from"] = None
    return {"model": section}


# ----------------------------------------------------------------------------- export


def save_clip(model: ImageReportClip, folder: str | Path, *, extra: dict[str, Any]) -> Path:
    """Everything but the image encoder (which the run's `encoder.safetensors` holds): text
    tower, projections, logit scale as safetensors, the tokenizer folder, and `clip.json`
    (text tower config, image tower architecture, projection width, `extra` fields)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith("encoder.")
    }
    save_file(tensors, str(folder / CLIP_WEIGHTS), metadata={"format": CLIP_FORMAT})
    model.tokenizer.save(folder / CLIP_TOKENIZER_DIR)
    spec = {
        "format": CLIP_FORMAT,
        "weights": CLIP_WEIGHTS,
        "tokenizer": CLIP_TOKENIZER_DIR,
        "image": model.image_source,
        "text_config": model.text.config.to_dict(),
        "proj_dim": model.text_proj.out_features,
        "max_length": model.max_length,
        "logit_scale": float(model.logit_scale.detach().float().clamp(max=LOGIT_SCALE_MAX).exp()),
        **extra,
        "usage": "raydiology.models.clip.load_clip(run_or_export_dir) -> ImageReportClip; "
        "encode_images(images [B, C, R, R]) / encode_reports(texts) -> features [B, P]",
    }
    (folder / CLIP_SPEC).write_text(json.dumps(spec, indent=2))
    return folder / CLIP_SPEC


def find_clip_export(path: str | Path) -> Path:
    """A run directory or its export folder -> the export folder holding clip.json."""
    from raydiology.train.export import find_export_folder

    return find_export_folder(path, CLIP_SPEC, "CLIP")


def load_clip(
    run_or_export_dir: str | Path, *, device: str | torch.device = "cpu"
) -> ImageReportClip:
    """Rebuild a trained CLIP from its export alone (safetensors, JSON, tokenizer folder).

    Nothing the training run read is needed: not the image export or timm checkpoint it
    started from, not the local BERT folder (the text tower is rebuilt from its saved config).
    The model comes back in eval mode with the encoder spec (image_size, in_chans, mean,
    std) as `.spec` and `clip.json` as `.clip_spec`.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    from raydiology.models.report_generator import VisionConfig, build_vision
    from raydiology.train.export import FORMAT, SPEC, WEIGHTS

    folder = find_clip_export(run_or_export_dir)
    spec: dict[str, Any] = json.loads((folder / SPEC).read_text())
    clip: dict[str, Any] = json.loads((folder / CLIP_SPEC).read_text())
    for name, found, wanted in ((SPEC, spec, FORMAT), (CLIP_SPEC, clip, CLIP_FORMAT)):
        if found.get("format") != wanted:
            raise ValueError(f"{folder / name}: format {found.get('format')!r} is not {wanted!r}")
    source = clip["image"]
    vision = VisionConfig(timm=source.get("timm"), train="full",
                          **({"model": source["model"]} if "model" in source else {}))  # fmt: skip
    encoder = build_vision(vision, image_size=spec["image_size"], in_chans=spec["in_chans"])
    text_config = dict(clip["text_config"])
    config = AutoConfig.for_model(text_config.pop("model_type"), **text_config)
    text = AutoModel.from_config(config, add_pooling_layer=False)
    tokenizer = load_text_tokenizer(folder / clip["tokenizer"])
    model = ImageReportClip(
        encoder, text, tokenizer, proj_dim=int(clip["proj_dim"]), max_length=int(clip["max_length"])
    )
    model.image_source = dict(source)
    state = {f"encoder.{k}": v for k, v in load_file(str(folder / WEIGHTS)).items()}
    state.update(load_file(str(folder / clip["weights"])))
    model.load_state_dict(state, strict=True)
    model.spec = spec
    model.clip_spec = clip
    return model.to(device).eval()

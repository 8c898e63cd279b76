"""Frozen teachers from the field's checkpoints: open_clip (EVA02-CLIP among its models), timm,
a Hugging Face `CLIPVisionModel` folder, and MGCA's ViT-B/16.

Each reader builds the library's own model with random weights (never `pretrained=True`: no
download at run time), loads the local weights safely (safetensors or
`torch.load(weights_only=True)`, see `raydiology.train.safe_load`), and wraps it as a module
images [B, 3, R, R] -> patch tokens [B, N, T] (no CLS or register tokens). It also reports
the input the weights expect (side R, patch size, mean/std), so `FrozenTeacher` adapts the
student's images and token grid exactly as it does for a raydiology export.

MGCA (Wang et al. 2022, github HKU-MedAI/MGCA, the teacher EVA-X trains against) saves
PyTorch Lightning checkpoints of its whole image-text model. Its image encoder is
`img_encoder_q.model`, a ViT whose parameter names are timm's VisionTransformer's
(`mgca/models/backbones/vits.py`: patch 16, LayerNorm eps 1e-6, qkv bias, GELU MLP x4,
final LayerNorm over all tokens, no head), so the key map is
``img_encoder_q.model.<name>`` -> ``<name>``, e.g. ``img_encoder_q.model.blocks.0.attn.qkv
.weight`` -> ``blocks.0.attn.qkv.weight``; every other key (the BERT text encoder, the
global/local projection heads, the prototypes) is dropped. A state dict already stripped of
the prefix loads too. Sizes come from the tensors (width, depth, patch, grid); heads are
width / 64 (ViT-B: 12). Its images are 224 px, normalised with mean 0.5 / std 0.5 per channel
(`mgca/datasets/transforms.py`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from torch import Tensor, nn

from raydiology.config_base import ConfigError
from raydiology.train.safe_load import read_state_dict

TeacherFormat = Literal["raydiology", "open_clip", "timm", "hf_clip", "mgca"]
EXTERNAL_FORMATS: tuple[str, ...] = ("open_clip", "timm", "hf_clip", "mgca")
NEEDS_MODEL_NAME: tuple[str, ...] = ("open_clip", "timm")

MGCA_PREFIX = "img_encoder_q.model."  # MGCA's image encoder inside its Lightning state dict
MGCA_HEAD_WIDTH = 64  # ViT-B/16: 768 / 12 heads
MGCA_MEAN = (0.5, 0.5, 0.5)  # mgca/datasets/transforms.py
MGCA_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class LoadedTeacher:
    """A checkpoint turned into a token extractor plus the input its weights expect."""

    tokens: nn.Module  # images [B, 3, R, R] -> patch tokens [B, N, T]
    image_size: int  # R
    patch_size: int
    embed_dim: int  # T
    mean: tuple[float, ...]
    std: tuple[float, ...]


class TimmPatchTokens(nn.Module):
    """A timm ViT-like model: `forward_features` (final norm applied), prefix tokens dropped."""

    model: Any  # timm's models are typed as plain modules

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.model.forward_features(images)[:, self.num_prefix_tokens :]


class OpenClipPatchTokens(nn.Module):
    """open_clip's own VisionTransformer: the patch tokens it returns with `output_tokens`
    (after `ln_post`, before the projection)."""

    def __init__(self, visual: Any) -> None:
        super().__init__()
        visual.output_tokens = True
        self.visual = visual

    def forward(self, images: Tensor) -> Tensor:
        _, tokens = self.visual(images)
        return tokens


class HFClipPatchTokens(nn.Module):
    """transformers' CLIPVisionModel: the last hidden state through `post_layernorm`, which
    the library applies to the pooled CLS only. Normalising every token matches open_clip's
    `ln_post`, so one CLIP gives the same targets from either library's files."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        hidden = self.model(pixel_values=images).last_hidden_state  # [B, 1 + N, T]
        return hf_clip_post_layernorm(self.model)(hidden)[:, 1:]


def hf_clip_post_layernorm(model: nn.Module) -> nn.Module:
    """transformers 4.x nests the tower under `vision_model`; 5.x does not."""
    return cast(nn.Module, getattr(model, "vision_model", model).post_layernorm)


def _square(size: object, what: str, key: str) -> int:
    sides = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if len(sides) != 2 or sides[0] != sides[1]:
        raise ConfigError(key, sides, f"a teacher with square {what}")
    return int(sides[0])  # type: ignore[call-overload]


def _load_strict(model: nn.Module, state: dict[str, Tensor], path: str, key: str) -> None:
    """Every parameter of `model` must come from the file; extra entries (a classifier head
    the teacher does not use) are dropped."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ConfigError(
            key, path, f"weights for this model (missing {len(missing)}, e.g. {missing[:3]})"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own})


def _open_clip(name: str, path: str, key: str) -> LoadedTeacher:
    import open_clip

    # Random towers: no CLIP, image-tower or HF text weights fetched at creation.
    model = open_clip.create_model(
        name, pretrained=None, load_weights=False, pretrained_image=False, pretrained_text=False
    )
    state = read_state_dict(path)
    visual = model.visual
    if any(k.startswith("visual.") for k in state):  # a whole CLIP: keep the image tower
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    _load_strict(visual, state, path, f"{key}.path")
    pre = visual.preprocess_cfg
    trunk = getattr(visual, "trunk", None)  # open_clip's timm towers (EVA02-CLIP)
    if trunk is not None:  # the trunk's own input size: open_clip does not pass its size on
        tokens: nn.Module = TimmPatchTokens(trunk)
        size, patch, width = (
            trunk.patch_embed.img_size,
            trunk.patch_embed.patch_size,
            trunk.num_features,
        )
    else:
        tokens = OpenClipPatchTokens(visual)
        size, patch, width = visual.image_size, visual.patch_size, visual.transformer.width
    return LoadedTeacher(
        tokens=tokens,
        image_size=_square(size, "images", f"{key}.model"),
        patch_size=_square(patch, "patches", f"{key}.model"),
        embed_dim=int(width),
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
    )


def _timm(name: str, path: str, key: str) -> LoadedTeacher:
    import timm

    model: Any = timm.create_model(name, pretrained=False, num_classes=0)
    _load_strict(model, read_state_dict(path), path, f"{key}.path")
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not hasattr(model, "forward_features"):
        raise ConfigError(f"{key}.model", name, "a timm ViT-like model (patch tokens)")
    cfg = model.pretrained_cfg
    return LoadedTeacher(
        tokens=TimmPatchTokens(model),
        image_size=_square(patch_embed.img_size, "images", f"{key}.model"),
        patch_size=_square(patch_embed.patch_size, "patches", f"{key}.model"),
        embed_dim=int(model.num_features),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )


def _hf_clip(path: str, key: str) -> LoadedTeacher:
    from transformers import CLIPVisionModel
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key}.path", path, "a Hugging Face CLIPVisionModel folder")
    model = CLIPVisionModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    processor = folder / "preprocessor_config.json"  # the folder's own normalisation, if any
    pre = json.loads(processor.read_text()) if processor.is_file() else {}
    cfg: Any = model.config
    return LoadedTeacher(
        tokens=HFClipPatchTokens(model),
        image_size=int(cfg.image_size),
        patch_size=int(cfg.patch_size),
        embed_dim=int(cfg.hidden_size),
        mean=tuple(pre.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(pre.get("image_std", OPENAI_CLIP_STD)),
    )


def mgca_vit_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """MGCA's checkpoint -> timm VisionTransformer names (the key map in the module doc)."""
    if any(k.startswith(MGCA_PREFIX) for k in state):
        return {k[len(MGCA_PREFIX) :]: v for k, v in state.items() if k.startswith(MGCA_PREFIX)}
    return state


def _mgca(path: str, key: str) -> LoadedTeacher:
    from timm.models.vision_transformer import VisionTransformer

    state = mgca_vit_state(read_state_dict(path))
    if "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        raise ConfigError(f"{key}.path", path, f"an MGCA ViT checkpoint ({MGCA_PREFIX}* keys)")
    width, _, patch, _ = state["patch_embed.proj.weight"].shape
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)  # one CLS position, then the grid
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / width
    model = VisionTransformer(
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=width,
        depth=depth,
        num_heads=max(1, width // MGCA_HEAD_WIDTH),
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        num_classes=0,
        global_pool="",
    )  # timm's defaults are MGCA's: LayerNorm eps 1e-6, GELU, CLS + learned positions
    _load_strict(model, state, path, f"{key}.path")
    return LoadedTeacher(
        tokens=TimmPatchTokens(model),
        image_size=grid * patch,
        patch_size=patch,
        embed_dim=width,
        mean=MGCA_MEAN,
        std=MGCA_STD,
    )


def load_external_teacher(
    fmt: str, *, path: str, model: str | None, key: str = "model.teacher"
) -> LoadedTeacher:
    """Read a teacher of `fmt` (one of EXTERNAL_FORMATS) from local files: `path` is the
    checkpoint file (open_clip, timm, mgca) or the model folder (hf_clip); `model` is the
    library's model name (open_clip, timm)."""
    file = Path(path).expanduser()
    if not file.exists():
        raise ConfigError(f"{key}.path", path, f"an existing {fmt} checkpoint")
    if fmt in NEEDS_MODEL_NAME and model is None:
        raise ConfigError(f"{key}.model", model, f"the {fmt} model name")
    if fmt == "open_clip":
        return _open_clip(str(model), str(file), key)
    if fmt == "timm":
        return _timm(str(model), str(file), key)
    if fmt == "hf_clip":
        return _hf_clip(str(file), key)
    if fmt == "mgca":
        return _mgca(str(file), key)
    raise ConfigError(f"{key}.format", fmt, "one of " + ", ".join(EXTERNAL_FORMATS))

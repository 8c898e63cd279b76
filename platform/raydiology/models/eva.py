"""EVA-X ("A foundation model for general chest X-ray analysis with self-supervised learning"):
an EVA-02-style ViT student trained to predict a frozen teacher's patch features at masked
positions (masked feature modelling; the loss lives in `raydiology.objectives.mfm`).

The student is timm's `Eva` as the EVA-X release builds it: patch 16, learnable absolute
positions plus 2-D RoPE on the patch tokens (theta 10000), SwiGLU FFN with hidden 8d/3, bias
on q and v only, pre-LN (eps 1e-6), no layer-scale; the B flavor has separate q/k/v
projections and a LayerNorm inside the FFN (SubLN). Parameter names therefore match timm's
(and, after EVA-X's own key renaming, the released EVA-X checkpoints). Added here: a learnable
mask token that replaces masked patch embeddings before positions are added (EVA-02/BEiT).

The teacher ("tokenizer", MGCA's ViT-B/16 in the paper) is a raydiology encoder export or
another project's checkpoint (open_clip, timm, a Hugging Face CLIP folder, MGCA; see
`raydiology.models.teachers`), frozen; its input is resized to its own image size, channel
count and normalisation and its patch-feature grid interpolated to the student's, so a
1280-px HD-MAE can teach a 224-px student. Without a path
it is a randomly initialised ViT (tests, smoke runs). A linear head maps student width to
teacher width.

Shapes: B batch, C channels, H×W image, N student patches (gh·gw), D student dim, T teacher
dim.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, trunc_normal_
from timm.models.eva import Eva
from torch import Tensor, nn

from raydiology.config_base import ConfigError, check, with_overrides
from raydiology.models.teachers import NEEDS_MODEL_NAME, TeacherFormat, load_external_teacher
from raydiology.models.vit import LayerIds, ViTEncoder, check_input_geometry
from raydiology.registry import MODELS


@dataclass(frozen=True, kw_only=True)
class EvaXArgs:
    """The numbers that size one EVA-X student (one row of the flavors table)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 16
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = int(embed_dim * 8/3)
    qkv_fused: bool = True  # one qkv matrix (Ti/S) or separate q/k/v projections (B)
    sub_ln: bool = False  # LayerNorm inside the SwiGLU FFN (B)
    # Stochastic depth in pre-training. B: 0.1, EVA-X's appendix B.1 (EVA-02's own B MIM
    # script used 0.0); Ti/S: 0.0, EVA-02's Ti/S MIM scripts (baaivision/EVA,
    # EVA-02/asuka/README.md, `dpr`), which EVA-X's pre-training code reuses.
    drop_path: float = 0.0


EVAX_FLAVORS: dict[str, EvaXArgs] = {
    # CPU smoke tests: two 64-d blocks (SwiGLU hidden 170).
    "tiny": EvaXArgs(embed_dim=64, depth=2, num_heads=2),
    # The three EVA-X sizes (ViT-Ti/S/B with patch 16 at 224 px).
    "ti": EvaXArgs(embed_dim=192, depth=12, num_heads=3),
    "s": EvaXArgs(embed_dim=384, depth=12, num_heads=6),
    "b": EvaXArgs(
        embed_dim=768, depth=12, num_heads=12, qkv_fused=False, sub_ln=True, drop_path=0.1
    ),
}


@dataclass(kw_only=True)
class TeacherConfig:
    """The frozen teacher, `model.teacher`.

    `format` says what `path` is: `raydiology` (default) an encoder export folder (e.g. an
    HD-MAE run's `export/`), whose spec decides the architecture; `open_clip` / `timm` a local
    checkpoint file of the library's model `model` (e.g. open_clip's `EVA02-B-16`);
    `hf_clip` a Hugging Face CLIPVisionModel folder (safetensors); `mgca` MGCA's checkpoint
    (its ViT-B/16; key map in `raydiology.models.teachers`). Nothing is downloaded. The size
    fields below then only describe the random stand-in, and `embed_dim`, if set, must equal
    the teacher's width. Without a path the teacher is a random ViT (linear patch embedding,
    the student's patch size) whose sizes default to the student's.
    """

    path: str | None = None
    format: TeacherFormat = "raydiology"
    model: str | None = None  # the library's model name (open_clip, timm)
    embed_dim: int | None = None  # target width T; null = the teacher's / the student's
    depth: int | None = None  # random teacher only; null = the student's
    num_heads: int | None = None  # random teacher only; null = the student's
    # How the student's images are normalised (copy data.mean / data.std). When set, images
    # are mapped back to pixels and re-normalised with the export's own mean/std before the
    # teacher sees them; null = fed as they come (only channels and size are adapted).
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        check(self.path is None or bool(self.path), f"{k}path", self.path, "a path or null")
        check(
            self.format == "raydiology" or self.path is not None,
            f"{k}path",
            self.path,
            f"the {self.format} checkpoint (a format other than raydiology needs a path)",
        )
        check(
            (self.model is not None) == (self.format in NEEDS_MODEL_NAME),
            f"{k}model",
            self.model,
            f"the {self.format} model name"
            if self.format in NEEDS_MODEL_NAME
            else f"null (only {', '.join(NEEDS_MODEL_NAME)} take a model name)",
        )
        for name in ("embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            check(value is None or value > 0, f"{k}{name}", value, "a positive integer or null")
        check(
            (self.input_mean is None) == (self.input_std is None),
            f"{k}input_std",
            self.input_std,
            "set together with input_mean (both or neither)",
        )
        if self.input_mean is not None and self.input_std is not None:
            check(
                len(self.input_mean) == len(self.input_std) and all(s > 0 for s in self.input_std),
                f"{k}input_std",
                list(self.input_std),
                "positive values, one per input_mean value",
            )


@dataclass(kw_only=True)
class EvaXConfig:
    """The `model` section for ``name: evax``: a flavor, optional overrides, the teacher."""

    flavor: str = "s"
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float | None = None
    qkv_fused: bool | None = None
    sub_ln: bool | None = None
    drop_path: float | None = None  # stochastic depth; null = the flavor's
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    def resolved(self) -> dict[str, Any]:
        """The effective sizes: the flavor's row with the overrides applied."""
        return with_overrides(EVAX_FLAVORS[self.flavor], self)

    def validate(self, key: str) -> None:
        k = f"{key}." if key else ""
        check(
            self.flavor in EVAX_FLAVORS,
            f"{k}flavor",
            self.flavor,
            "one of the flavors " + ", ".join(EVAX_FLAVORS),
        )
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio"):
            value = getattr(self, name)
            check(value is None or value > 0, f"{k}{name}", value, "a positive number")
        check(
            self.drop_path is None or 0.0 <= self.drop_path < 1.0,
            f"{k}drop_path",
            self.drop_path,
            "a rate in [0, 1) or null",
        )
        r = self.resolved()
        check(
            r["embed_dim"] % r["num_heads"] == 0,
            f"{k}num_heads",
            r["num_heads"],
            f"a divisor of embed_dim ({r['embed_dim']})",
        )
        check(
            (r["embed_dim"] // r["num_heads"]) % 4 == 0,
            f"{k}num_heads",
            r["num_heads"],
            "heads whose width (embed_dim / num_heads) is a multiple of 4 (2-D RoPE)",
        )
        self.teacher.validate(f"{k}teacher")


def _building_on_meta() -> bool:
    """True inside ``with torch.device("meta")`` (sizing, `load_encoder`): load no weights."""
    return torch.empty(0).is_meta


class EvaXEncoder(LayerIds, Eva):
    """timm's Eva without a head: images [B, C, H, W] (+ mask [B, N]) -> tokens [B, 1+N, D].

    Follows the encoder protocol (CLS first, `num_prefix_tokens`, `embed_dim`, `patch_size`,
    `in_chans`). Non-persistent buffers (RoPE tables, the zero k-bias) are recomputed after
    every `load_state_dict`, so a model built on the meta device and `to_empty`-ed (as
    `raydiology.load_encoder` does) is correct once its weights are loaded.
    """

    def __init__(self, args: EvaXArgs, *, image_size: int, in_chans: int) -> None:
        grid = image_size // args.patch_size
        super().__init__(
            img_size=image_size,
            patch_size=args.patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool="",  # tokens out: final LayerNorm, no pooling, no head
            embed_dim=args.embed_dim,
            depth=args.depth,
            num_heads=args.num_heads,
            qkv_bias=True,  # q and v biases; k has none (a fixed zero buffer when fused)
            qkv_fused=args.qkv_fused,
            mlp_ratio=args.mlp_ratio,
            swiglu_mlp=True,
            scale_mlp=args.sub_ln,
            drop_path_rate=args.drop_path,
            norm_layer=partial(LayerNorm, eps=1e-6),
            init_values=None,  # no layer-scale
            use_abs_pos_emb=True,
            use_rot_pos_emb=True,
            rope_temperature=10000.0,
            ref_feat_shape=(grid, grid),  # RoPE positions = patch indices at this size
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, args.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.register_load_state_dict_post_hook(_refresh_buffers)

    @property
    def patch_size(self) -> int:
        return int(self.patch_embed.patch_size[0])

    @property
    def grid_size(self) -> tuple[int, int]:
        gh, gw = self.patch_embed.grid_size
        return int(gh), int(gw)

    @property
    def num_patches(self) -> int:
        return int(self.patch_embed.num_patches)

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.patch_embed.img_size
        return int(h), int(w)

    def init_non_persistent_buffers(self) -> None:
        """Recompute RoPE tables and zero k-biases (garbage after `to_empty`)."""
        for module in self.modules():
            init = getattr(module, "init_non_persistent_buffers", None)
            if module is not self and callable(init):
                init()

    def forward(self, images: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """images [B, C, H, W], mask bool [B, N] (True = hidden) or None -> [B, 1+N, D].

        Masked patch embeddings become the mask token before CLS and positions are added,
        so a masked token keeps its position (absolute and rotary) but not its content.
        """
        x = self.patch_embed(images)  # [B, N, D]
        if mask is not None:
            w = mask.to(x.dtype).unsqueeze(-1)  # [B, N, 1]
            x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        x, rope = self._pos_embed(x)  # CLS + absolute positions: [B, 1+N, D]; rope [N, 2·hd]
        x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x, rope=rope)
        return self.norm(x)


def _refresh_buffers(module: nn.Module, incompatible_keys: Any) -> None:
    module.init_non_persistent_buffers()  # type: ignore[operator]


class FrozenTeacher(nn.Module):
    """A frozen encoder whose patch features are the targets: images -> [B, N, T].

    Adapts the student's input to the teacher: channel count (1 -> 3 repeats, 3 -> 1
    averages), optional re-normalisation, image size (bilinear, antialiased) and patch grid
    (the teacher's [gh', gw'] feature map is interpolated bilinearly to the student's).
    Always in eval mode, never trained; `requires_grad` is False for every parameter.
    """

    pixel_mean: Tensor | None  # [1, C, 1, 1]: the student's normalisation ...
    pixel_std: Tensor | None
    teacher_mean: Tensor | None  # ... and the teacher's
    teacher_std: Tensor | None

    def __init__(
        self,
        encoder: nn.Module,
        *,
        image_size: int,
        in_chans: int,
        patch_size: int,
        embed_dim: int,
        num_prefix_tokens: int = 1,
        renormalize: tuple[tuple[float, ...], tuple[float, ...], list[float], list[float]]
        | None = None,
        loaded_from: str | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.image_size = image_size
        self.in_chans = in_chans
        self.grid = image_size // patch_size
        self.embed_dim = embed_dim
        self.num_prefix_tokens = num_prefix_tokens
        self.loaded_from = loaded_from  # the export folder, None for a random teacher
        self.placeholder = False  # True when built on meta without its export (see builder)
        for name in ("pixel_mean", "pixel_std", "teacher_mean", "teacher_std"):
            self.register_buffer(name, None, persistent=False)
        if renormalize is not None:
            src_mean, src_std, dst_mean, dst_std = renormalize
            self.pixel_mean = torch.tensor(src_mean).view(1, -1, 1, 1)
            self.pixel_std = torch.tensor(src_std).view(1, -1, 1, 1)
            self.teacher_mean = torch.tensor(dst_mean).view(1, -1, 1, 1)
            self.teacher_std = torch.tensor(dst_std).view(1, -1, 1, 1)
        self.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        super().train(mode)
        self.encoder.eval()  # dropout / drop-path stay off whatever the trainer asks
        return self

    def _adapt_input(self, images: Tensor) -> Tensor:
        """[B, C, H, W] student input -> [B, C', R', R'] teacher input."""
        x = images
        if self.pixel_mean is not None and self.pixel_std is not None:
            x = x * self.pixel_std.to(x.dtype) + self.pixel_mean.to(x.dtype)  # pixels in [0, 1]
        c = x.shape[1]
        if c != self.in_chans:
            if self.in_chans == 1:
                x = x.mean(dim=1, keepdim=True)
            elif c == 1:
                x = x.expand(-1, self.in_chans, -1, -1)
            else:
                raise ValueError(
                    f"cannot feed {c}-channel images to a {self.in_chans}-channel teacher"
                )
        if self.teacher_mean is not None and self.teacher_std is not None:
            x = (x - self.teacher_mean.to(x.dtype)) / self.teacher_std.to(x.dtype)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(
                x.float(),
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            ).to(images.dtype)
        return x

    @torch.no_grad()
    def forward(self, images: Tensor, grid_size: tuple[int, int]) -> Tensor:
        """images [B, C, H, W], the student's grid (gh, gw) -> targets [B, gh·gw, T]."""
        tokens = self.encoder(self._adapt_input(images))  # [B, P + N', T]
        patches = tokens[:, self.num_prefix_tokens :]  # [B, N', T]
        b, n, t = patches.shape
        if n != self.grid * self.grid:
            raise ValueError(f"teacher gave {n} patch tokens, expected {self.grid}x{self.grid}")
        if (self.grid, self.grid) == tuple(grid_size):
            return patches
        fmap = patches.transpose(1, 2).reshape(b, t, self.grid, self.grid)  # [B, T, gh', gw']
        fmap = F.interpolate(fmap.float(), size=grid_size, mode="bilinear", align_corners=False)
        return fmap.flatten(2).transpose(1, 2).to(patches.dtype)  # [B, gh·gw, T]


class EvaX(nn.Module):
    """EVA-X: `encoder` (the student, what gets exported), `teacher` (frozen), `head` (D -> T).

    The mask is decided outside (by the `mfm` objective) and comes in as bool [B, N].
    """

    encoder: EvaXEncoder
    teacher: FrozenTeacher
    head: nn.Linear

    def __init__(self, encoder: EvaXEncoder, teacher: FrozenTeacher) -> None:
        super().__init__()
        self.encoder = encoder
        self.teacher = teacher
        self.head = nn.Linear(encoder.embed_dim, teacher.embed_dim)
        trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.encoder.grid_size

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    def forward_student(self, images: Tensor, mask: Tensor) -> Tensor:
        """images [B, C, H, W], mask [B, N] -> predicted teacher features [B, N, T]."""
        tokens = self.encoder(images, mask)  # [B, 1+N, D]
        return self.head(tokens[:, self.encoder.num_prefix_tokens :])

    def forward_targets(self, images: Tensor) -> Tensor:
        """images [B, C, H, W] -> teacher features [B, N, T] on the student's grid (no grad)."""
        return self.teacher(images, self.grid_size)

    @staticmethod
    def forward_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """Mean of 1 - cos(pred, target) over masked tokens: [B, N, T] x2, mask [B, N] -> scalar.

        Computed in float32 whatever the model dtype.
        """
        cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)  # [B, N]
        m = mask.float()
        return ((1.0 - cos) * m).sum() / m.sum().clamp_min(1.0)

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images [B, C, H, W], mask bool [B, N] -> (loss, pred [B, N, T], target [B, N, T])."""
        target = self.forward_targets(images)
        pred = self.forward_student(images, mask)
        return self.forward_loss(pred, target, mask), pred, target


# ------------------------------------------------------------------------------- teacher


def _read_spec(path: str) -> dict[str, Any] | None:
    from raydiology.train.export import SPEC

    folder = Path(path).expanduser()
    folder = folder.parent if folder.suffix == ".json" else folder
    try:
        return json.loads((folder / SPEC).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None


def _exported_teacher(cfg: TeacherConfig, key: str) -> FrozenTeacher | None:
    """The teacher from its export; on the meta device only its architecture (no weights).

    None when building on meta and the export is not there (an EVA-X student export loaded
    on another machine): the caller builds a stand-in; the `mfm` objective refuses to train
    with it.
    """
    assert cfg.path is not None
    spec = _read_spec(cfg.path)
    if spec is None:
        if _building_on_meta():
            return None
        raise ConfigError(f"{key}.path", cfg.path, "a raydiology encoder export folder")
    if _building_on_meta():
        from raydiology.config_base import from_dict

        section = dict(spec["model"])
        entry = MODELS.get(section.pop("name"))
        config: Any = from_dict(entry.config_cls, section, "model")
        encoder = entry.builder(config, image_size=spec["image_size"], in_chans=spec["in_chans"])
        encoder = encoder.encoder
    else:
        from raydiology.train.export import load_encoder

        encoder = load_encoder(cfg.path)
    width = int(spec.get("embed_dim") or encoder.embed_dim)
    return FrozenTeacher(
        encoder,
        image_size=int(spec["image_size"]),
        in_chans=int(spec["in_chans"]),
        patch_size=int(spec.get("patch_size") or encoder.patch_size),
        embed_dim=_checked_width(cfg, width, key),
        num_prefix_tokens=int(getattr(encoder, "num_prefix_tokens", 1)),
        renormalize=_renormalize(cfg, spec["mean"], spec["std"]),
        loaded_from=str(cfg.path),
    )


def _checked_width(cfg: TeacherConfig, width: int, key: str) -> int:
    if cfg.embed_dim is not None and cfg.embed_dim != width:
        raise ConfigError(
            f"{key}.embed_dim", cfg.embed_dim, f"null or the teacher's width ({width})"
        )
    return width


def _renormalize(
    cfg: TeacherConfig, mean: Sequence[float], std: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...], list[float], list[float]] | None:
    """Student normalisation -> the teacher's own, when the student's is given."""
    if cfg.input_mean is None or cfg.input_std is None:
        return None
    return (cfg.input_mean, cfg.input_std, list(mean), list(std))


def _external_teacher(cfg: TeacherConfig, key: str) -> FrozenTeacher:
    """A teacher from another project's checkpoint (open_clip, timm, HF CLIP, MGCA)."""
    assert cfg.path is not None
    loaded = load_external_teacher(cfg.format, path=cfg.path, model=cfg.model, key=key)
    return FrozenTeacher(
        loaded.tokens,
        image_size=loaded.image_size,
        in_chans=len(loaded.mean),
        patch_size=loaded.patch_size,
        embed_dim=_checked_width(cfg, loaded.embed_dim, key),
        num_prefix_tokens=0,  # the readers return patch tokens only
        renormalize=_renormalize(cfg, loaded.mean, loaded.std),
        loaded_from=str(cfg.path),
    )


def _random_teacher(
    cfg: TeacherConfig, student: EvaXArgs, *, image_size: int, in_chans: int
) -> FrozenTeacher:
    width = cfg.embed_dim or student.embed_dim
    heads = cfg.num_heads or student.num_heads
    if width % heads or width % 4:
        raise ConfigError(
            "model.teacher.num_heads",
            heads,
            f"a divisor of the teacher width {width} (itself a multiple of 4)",
        )
    encoder = ViTEncoder(
        image_size=image_size,
        patch_size=student.patch_size,
        in_chans=in_chans,
        embed_dim=width,
        depth=cfg.depth or student.depth,
        num_heads=heads,
        patch_embed="linear",
    )
    # Same input as the student: nothing to adapt.
    return FrozenTeacher(
        encoder,
        image_size=image_size,
        in_chans=in_chans,
        patch_size=student.patch_size,
        embed_dim=width,
    )


def build_teacher(
    cfg: TeacherConfig, student: EvaXArgs, *, image_size: int, in_chans: int
) -> FrozenTeacher:
    """The frozen teacher a `model.teacher` section describes (see TeacherConfig)."""
    if cfg.path is None:
        return _random_teacher(cfg, student, image_size=image_size, in_chans=in_chans)
    if cfg.format != "raydiology":
        if not _building_on_meta():
            return _external_teacher(cfg, "model.teacher")
        # On the meta device (a student export being rebuilt) another project's teacher is
        # not read at all: the student never needs it, and its weights would not load there.
    else:
        exported = _exported_teacher(cfg, "model.teacher")
        if exported is not None:
            return exported
        warnings.warn(
            f"model.teacher.path {cfg.path!r} is not here: a random stand-in of the configured "
            "size takes its place (fine for loading the student; the mfm objective refuses it)",
            stacklevel=2,
        )
    teacher = _random_teacher(cfg, student, image_size=image_size, in_chans=in_chans)
    teacher.placeholder = True
    teacher.loaded_from = cfg.path
    return teacher


@MODELS.register("evax", EvaXConfig)
def build_evax(cfg: EvaXConfig, *, image_size: int, in_chans: int) -> EvaX:
    """Build from the model section; image size and channels come from the data section."""
    cfg.validate("model")
    a = EvaXArgs(**cfg.resolved())
    check_input_geometry(image_size, in_chans, a.patch_size)
    encoder = EvaXEncoder(a, image_size=image_size, in_chans=in_chans)
    teacher = build_teacher(cfg.teacher, a, image_size=image_size, in_chans=in_chans)
    return EvaX(encoder, teacher)

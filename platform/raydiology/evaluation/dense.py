"""Frozen encoders as dense feature extractors, and the corpus as dense (image, mask) tensors.

Shared by the dense evaluations (segmentation now; detection and grounding heads later): any
raydiology export loads as a frozen encoder that gives patch-feature maps, the last layer's
and four intermediate layers' (for UPerNet-style decoders), and a corpus's images and masks
are prepared exactly like training batches (`data.pipeline.preprocess_batch`, masks riding
along with the image's geometry).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from raydiology.evaluation.features import encoder_data_config, hash_split

NUM_INTERMEDIATE = 4


def intermediate_layers(depth: int, n: int = NUM_INTERMEDIATE) -> list[int]:
    """Block indices spread evenly and ending at the last block: depth 12 -> [2, 5, 8, 11],
    the layers ViT-Adapter/BEiT feed UPerNet (mmseg configs `out_indices=[3, 5, 7, 11]` for
    BEiT-B are one variant; the even spread is used here, for any depth). An encoder with
    fewer than `n` blocks repeats some (depth 2 -> [0, 0, 0, 1]), so decoders always get `n`."""
    if depth < 1:
        raise ValueError("an encoder without blocks has no intermediate layers")
    return [max(0, depth * (i + 1) // n - 1) for i in range(n)]


class FrozenDenseEncoder(nn.Module):
    """An exported encoder, frozen, returning patch-feature maps.

    forward(x [B, C, R, R]) -> {"last": [B, D, gh, gw] (the encoder's output, normed),
    "layers": [[B, D, gh, gw] x 4] (outputs of the blocks `layer_ids`, before the final
    norm)}. A timm model (EVA-X's encoder is timm's `Eva`) gives them through timm's own
    `forward_intermediates`, as issue 17 asks; the registry's other ViTs (MAE, DINOv2) have
    no such method, and their block outputs are read with forward hooks on the block stack
    (`layer_stack`), put back into raster order by the encoder's `layer_patches` where its
    blocks see another order (the Vision Mamba encoders).

    Hierarchical timm backbones behind the encoder protocol (`TimmEncoder`/`CNNGrid`: the
    ResNets of MedViLL, R2Gen and the CLIP smoke profiles, R2GenGPT's Swin) are a `pyramid`:
    "layers" are their last four stages (strides 4-32 for a ResNet, channels `layer_dims`),
    named by timm's `feature_info` and read by the same hooks, so the backbone runs once;
    "last" is the encoder's output map.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.data = encoder_data_config(encoder)
        self.prefix = int(getattr(encoder, "num_prefix_tokens", 1))
        self.embed_dim = int(getattr(encoder, "embed_dim"))  # noqa: B009
        self._captured: dict[int, Tensor] = {}
        stack = getattr(encoder, getattr(encoder, "layer_stack", "blocks"), None)
        body = getattr(encoder, "body", None)
        info: Any = getattr(body, "feature_info", None)
        self.pyramid = not isinstance(stack, nn.ModuleList) and _is_timm_model(body) and bool(info)
        self.uses_timm_intermediates = not self.pyramid and _has_timm_intermediates(encoder)
        if self.pyramid:
            if len(info) < NUM_INTERMEDIATE:
                raise ValueError(f"{type(body).__name__} has {len(info)} stages, fewer than "
                                 f"the {NUM_INTERMEDIATE} a dense decoder reads")  # fmt: skip
            self.layer_ids = list(range(len(info) - NUM_INTERMEDIATE, len(info)))
            self.layer_dims = [int(info[i]["num_chs"]) for i in self.layer_ids]
            for i in self.layer_ids:
                body.get_submodule(info[i]["module"]).register_forward_hook(self._capture(i))  # type: ignore[union-attr]
            self.grid = self._output_grid()
            return
        if not isinstance(stack, nn.ModuleList):
            raise ValueError(f"{type(encoder).__name__} has no block stack to read layers from")
        self.layer_ids = intermediate_layers(len(stack))
        self.layer_dims = [self.embed_dim] * NUM_INTERMEDIATE
        gh, gw = getattr(encoder, "grid_size")  # noqa: B009  # the encoder protocol's, untyped
        self.grid = (int(gh), int(gw))
        if not self.uses_timm_intermediates:
            for i in sorted(set(self.layer_ids)):
                stack[i].register_forward_hook(self._capture(i))

    @torch.no_grad()
    def _output_grid(self) -> tuple[int, int]:
        """A backbone without a `grid_size`: the token grid of one blank image (square)."""
        side = self.data.resolution
        tokens = self.encoder(torch.zeros(1, self.data.channels, side, side))
        grid = math.isqrt(tokens.shape[1] - self.prefix)
        if grid * grid != tokens.shape[1] - self.prefix:
            raise ValueError(f"{type(self.encoder).__name__}: {tokens.shape[1]} tokens are "
                             "not a square grid")  # fmt: skip
        return grid, grid

    def _capture(self, index: int):
        def hook(_module: nn.Module, _inputs: object, output: Tensor) -> None:
            self._captured[index] = output

        return hook

    def train(self, mode: bool = True) -> FrozenDenseEncoder:
        super().train(mode)
        self.encoder.eval()  # frozen: norms and dropout never leave eval mode
        return self

    def _to_map(self, tokens: Tensor) -> Tensor:
        """tokens [B, P + N, D] -> [B, D, gh, gw]."""
        gh, gw = self.grid
        patches = tokens[:, self.prefix :]
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)

    @torch.no_grad()
    def forward(self, x: Tensor) -> dict[str, Tensor | list[Tensor]]:
        if self.uses_timm_intermediates:
            taken = sorted(set(self.layer_ids))  # timm returns each block once, in order
            timm_model: Any = self.encoder
            last, maps = timm_model.forward_intermediates(
                x, indices=taken, norm=False, output_fmt="NCHW"
            )
            by_block = dict(zip(taken, maps, strict=True))
            return {"last": self._to_map(last), "layers": [by_block[i] for i in self.layer_ids]}
        self._captured.clear()
        last = self.encoder(x)
        layers = [self._block_map(self._captured[i], dim)
                  for i, dim in zip(self.layer_ids, self.layer_dims, strict=True)]  # fmt: skip
        return {"last": self._to_map(last), "layers": layers}

    def _block_map(self, tokens: Tensor, dim: int) -> Tensor:
        """A block's output -> [B, D, gh, gw]. Encoders whose blocks see another sequence
        than their output (Vision Mamba: cluster order, or CLS in the middle) say how to
        read its patches (`layer_patches`); a ViT's blocks see its output's layout; a
        pyramid's stages give maps already (NCHW; Swin's NHWC stages are turned)."""
        if tokens.ndim == 4:
            channels_last = tokens.shape[1] != dim and tokens.shape[-1] == dim
            return tokens.permute(0, 3, 1, 2) if channels_last else tokens
        reader = getattr(self.encoder, "layer_patches", None)
        if reader is None:
            return self._to_map(tokens)
        gh, gw = self.grid
        return reader(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)


def _is_timm_model(module: object) -> bool:
    """Built from a timm model class (possibly subclassed, as EVA-X's encoder is)."""
    return any(c.__module__.startswith("timm.") for c in type(module).__mro__)


def _has_timm_intermediates(module: object) -> bool:
    """A timm model that gives its layers through `forward_intermediates`."""
    return _is_timm_model(module) and callable(getattr(module, "forward_intermediates", None))


class BestSoFar:
    """The dense heads' validation rule: keep a copy of the best-scoring weights, and say
    when `patience` validations in a row brought no better score (early stop)."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.score = -math.inf
        self.state: dict[str, Tensor] | None = None
        self.since = 0

    def update(self, score: float, module: nn.Module) -> bool:
        """Record a validation score; True when training should stop."""
        if score > self.score:
            self.score, self.state, self.since = score, copy.deepcopy(module.state_dict()), 0
            return False
        self.since += 1
        return self.since >= self.patience

    def restore(self, module: nn.Module) -> None:
        """Load the best weights seen (no-op before the first validation)."""
        if self.state is not None:
            module.load_state_dict(self.state)


def load_dense_encoder(
    path: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> FrozenDenseEncoder:
    """Any raydiology export (`RUN/export`, every method) as a frozen dense encoder."""
    from raydiology.train.export import SPEC, load_encoder

    folder = Path(path)
    folder = folder.parent if folder.suffix == ".json" else folder
    if not (folder / SPEC).is_file():
        raise FileNotFoundError(f"{folder}: no {SPEC}; is it an exported encoder?")
    return FrozenDenseEncoder(load_encoder(folder, device=device)).to(device)


@dataclass(kw_only=True)
class DenseSplit:
    """One split of a corpus at an encoder's resolution: images uint8/uint16 [N, 1, R, R],
    masks uint8 [N, K, R, R] (0/1), known bool [N, K] (False: the class is not annotated)."""

    images: Tensor
    masks: Tensor
    known: Tensor
    image_ids: list[str]

    def __len__(self) -> int:
        return len(self.image_ids)


def dense_splits(
    corpus_dir: str | os.PathLike, mask_columns: list[str], resolution: int
) -> dict[str, DenseSplit]:
    """The corpus's rows with at least one of `mask_columns` annotated, per split (rows
    without `split` get `hash_split`), images and masks fitted like training batches without
    augmentation. Held in memory: meant for evaluation corpora of thousands of images."""
    from raydiology.config import DataConfig
    from raydiology.data.corpus import read_manifest, read_rows
    from raydiology.data.pipeline import preprocess_batch

    manifest = read_manifest(corpus_dir)
    columns = ["image_id", "pixels", "height", "width", "dtype", *mask_columns]
    has_split = "split" in manifest.columns
    table = read_rows(corpus_dir, columns=[*columns, *(["split"] if has_split else [])])
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}
    annotated = np.zeros(table.num_rows, dtype=bool)
    for c in mask_columns:
        annotated |= np.asarray(table.column(c).is_valid())
    ids = [str(i) for i in batch["image_id"]]
    raw = table.column("split").to_pylist() if has_split else [None] * len(ids)
    split = np.array([s or hash_split(i) for s, i in zip(raw, ids, strict=True)], dtype=object)
    out = {}
    for name in ("train", "val", "test"):
        rows = np.flatnonzero(annotated & (split == name))
        part = preprocess_batch(
            {c: np.asarray(v)[rows] for c, v in batch.items()},
            data=DataConfig(resolution=resolution),
            label_columns=[],
            out_dtype=manifest.dtype or "uint16",
            mask_columns=mask_columns,
        )
        out[name] = DenseSplit(
            images=torch.from_numpy(part["image"]),
            masks=torch.from_numpy(part["mask"]),
            known=torch.from_numpy(part["mask_known"]),
            image_ids=[ids[i] for i in rows],
        )
    return out

"""Exported encoders (safetensors + a JSON that says how to feed them) and the
reconstruction picture (original / masked / reconstruction, the HD-MAE paper's Fig. 8)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raydiology.config import DataConfig, Experiment

FORMAT = "raydiology-encoder/1"
WEIGHTS = "encoder.safetensors"
SPEC = "encoder.json"


def master_params(engine: Any, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, weight) for each parameter of `module` (a part of `engine.module`): DeepSpeed's
    fp32 master copy where the optimizer keeps one, else the parameter as held; on the
    parameter's device.

    In bf16/fp16 the module holds rounded weights (bf16 keeps 8 bits of mantissa); the
    optimizer updates fp32 copies, which are the weights training actually reached:
    ZeRO-1/2/3 (and DeepSpeed's BF16 optimizer) through `safe_get_full_fp32_param`, which
    gathers the partitions (as zero_to_fp32 does for ZeRO-3); ZeRO-0 from the FP16
    optimizers' fp32 groups. fp32 parameters are their own master (DeepSpeed copies the
    updated partitions back into them), so they are read with no collective. A collective
    under ZeRO for low-precision weights: every rank iterates it, in the same order. Under
    ZeRO-3 iterate inside `GatheredParameters` so frozen weights are whole too.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    masters = _zero0_masters(engine.optimizer)
    for name, param in module.named_parameters():
        master = masters.get(id(param))
        zero3_frozen = hasattr(param, "ds_id") and not hasattr(param, "_z3_optimizer")
        low_precision = param.dtype in (torch.bfloat16, torch.float16) or hasattr(param, "ds_id")
        if master is None and param.requires_grad and low_precision and not zero3_frozen:
            master = safe_get_full_fp32_param(param)  # a collective under ZeRO
        yield name, param if master is None else master.reshape(param.shape)


def master_weights(engine: Any, module: nn.Module, *, keep: bool = True) -> dict[str, torch.Tensor]:
    """`module`'s state dict (a part of `engine.module`) with each trained parameter taken
    from DeepSpeed's fp32 master copy (see `master_params`), on the CPU in float32.

    Call it on every rank (a collective under ZeRO); under ZeRO-3 inside
    `GatheredParameters` so buffers and frozen weights are whole too. Parameters without a
    master copy (fp32 training, frozen weights) are exported as held. `keep=False` (ranks
    that don't write) takes part in the gathers and returns {}.
    """
    tensors: dict[str, torch.Tensor] = {}
    if keep:
        tensors = {k: v.detach().to("cpu", torch.float32) for k, v in module.state_dict().items()}
    for name, weight in master_params(engine, module):
        if keep:
            tensors[name] = weight.detach().to("cpu", torch.float32)
    return {k: v.contiguous() for k, v in tensors.items()}


def _zero0_masters(optimizer: Any) -> dict[int, torch.Tensor]:
    """id(low-precision param) -> its fp32 copy in DeepSpeed's ZeRO-0 FP16_Optimizer (flat
    fp32 groups, with FusedAdam) or FP16_UnfusedOptimizer (one fp32 tensor per parameter);
    empty for any other optimizer."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from torch._utils import _unflatten_dense_tensors

    if isinstance(optimizer, FP16_Optimizer):
        lp_groups = optimizer.fp16_groups
        hp_groups = [
            _unflatten_dense_tensors(flat, group)
            for flat, group in zip(optimizer.fp32_groups_flat, lp_groups, strict=True)
        ]
    elif isinstance(optimizer, FP16_UnfusedOptimizer):
        lp_groups, hp_groups = optimizer.fp16_groups, optimizer.fp32_groups
    else:
        return {}
    return {
        id(lp): hp
        for group, hp_group in zip(lp_groups, hp_groups, strict=True)
        for lp, hp in zip(group, hp_group, strict=True)
    }


def export_encoder(
    objective: nn.Module,
    folder: Path,
    *,
    exp: Experiment,
    corpus_sha256: str | None,
    step: int,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the objective's encoder and how to use it; returns the JSON path.

    `weights`: the encoder's state dict to write (training passes DeepSpeed's fp32 master
    copy, see `master_weights`); by default the module's own, as float32.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    encoder = objective.encoder
    assert isinstance(encoder, nn.Module), "an objective exposes its encoder as a module"
    if weights is None:
        weights = encoder.state_dict()
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": FORMAT})
    experiment = exp.to_dict()
    spec = {
        "format": FORMAT,
        "model": experiment["model"],
        "image_size": exp.data.resolution,
        "in_chans": exp.data.channels,
        "patch_size": getattr(encoder, "patch_size", None),
        "embed_dim": getattr(encoder, "embed_dim", None),
        "mean": list(exp.data.mean),
        "std": list(exp.data.std),
        "objective": experiment["objective"],
        "experiment": exp.name,
        "step": step,
        "corpus_manifest_sha256": corpus_sha256,
        "config_sha256": exp.config_hash(),
        "usage": "raydiology.load_encoder(path)(images) -> tokens [B, 1+N, D] (CLS first); "
        "images: float [B, in_chans, image_size, image_size], (pixel/max - mean) / std",
    }
    (folder / SPEC).write_text(json.dumps(spec, indent=2))
    return folder / SPEC


def find_export_folder(path: str | Path, spec: str, what: str) -> Path:
    """A run folder or its export/ -> the folder holding `spec` (e.g. clip.json); `what`
    names the kind of export in the error."""
    path = Path(path).expanduser()
    for folder in (path, path / "export"):
        if (folder / spec).is_file():
            return folder
    raise FileNotFoundError(f"{path}: no {what} export ({spec}) here or in export/")


def load_encoder(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported encoder from its folder (or its JSON) with safetensors weights.

    The returned module is in eval mode and carries the export's JSON as `.spec`.
    """
    from safetensors.torch import load_file

    from raydiology.config_base import from_dict
    from raydiology.registry import MODELS

    path = Path(path)
    folder = path.parent if path.suffix == ".json" else path
    spec: dict[str, Any] = json.loads((folder / SPEC).read_text())
    if spec.get("format") != FORMAT:
        raise ValueError(f"{folder / SPEC}: format {spec.get('format')!r} is not {FORMAT!r}")
    model_section = dict(spec["model"])
    entry = MODELS.get(model_section.pop("name"))
    config: Any = from_dict(entry.config_cls, model_section, "model")
    with torch.device("meta"):  # decoder and heads are never allocated
        model = entry.builder(config, image_size=spec["image_size"], in_chans=spec["in_chans"])
    encoder = model.encoder.to_empty(device=device)
    encoder.load_state_dict(load_file(str(folder / WEIGHTS), device=str(device)), strict=True)
    encoder.spec = spec
    return encoder.eval()


@torch.no_grad()
def save_reconstruction(
    objective: nn.Module,
    images: torch.Tensor,
    data: DataConfig,
    path: Path,
    *,
    write: bool,
    seed: int,
    caption: str | None = None,
) -> dict[str, float] | None:
    """Rows of original / masked / reconstruction for a few training images, and how well
    the masked patches were predicted: {"picture_masked_mse", "picture_mean_mse"} (None for
    an objective that cannot reconstruct).

    Beside the PNG, the same name with .npz holds the pictured arrays in the model's
    normalised units (`image`, `prediction`, `mask` [B, 1, H, W], 1 = predicted), so the
    errors can be checked from the files. `caption` carries the corpus's required
    attribution (e.g. CC BY) under the picture.
    """
    reconstruct = getattr(objective, "reconstruct", None)
    if reconstruct is None:
        return None
    was_training = objective.training
    objective.eval()
    generator = torch.Generator(device=images.device).manual_seed(seed)
    out = reconstruct(images, generator=generator)
    objective.train(was_training)
    errors = masked_errors(images, out["prediction"], out["mask"])
    if not write:
        return errors
    title = (  # short enough for one column
        f"reconstruction\nmasked MSE {errors['picture_masked_mse']:.3f} "
        f"(mean {errors['picture_mean_mse']:.3f})"
    )
    columns = {"original": images, "masked": out["masked"], title: out["reconstruction"]}
    _save_grid(columns, data, path, caption=caption)
    arrays = {"image": images, "prediction": out["prediction"], "mask": out["mask"]}
    np.savez_compressed(
        path.with_suffix(".npz"), **{k: v.detach().float().cpu().numpy() for k, v in arrays.items()}
    )
    return errors


def masked_errors(
    images: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """Mean squared error over the predicted pixels (images, prediction [B, C, H, W], mask
    [B, 1, H, W]), and the same for predicting each image's mean there: the best a model
    that saw nothing of the image's layout could do. Far below 1 x the second = learned.

    With `norm_pix_loss` the prediction borrows each patch's true mean and variance (MAE's
    un-normalisation), so the first flatters such runs.
    """
    x, pred = images.detach().float(), prediction.detach().float()
    m = mask.detach().float().expand_as(x)
    count = m.sum(dim=(1, 2, 3)).clamp_min(1.0)  # [B]
    image_mean = (x * m).sum(dim=(1, 2, 3)) / count  # [B], over the predicted pixels only
    total = count.sum()
    return {
        "picture_masked_mse": float((((pred - x) ** 2) * m).sum() / total),
        "picture_mean_mse": float((((x - image_mean.view(-1, 1, 1, 1)) ** 2) * m).sum() / total),
    }


def _save_grid(
    columns: dict[str, torch.Tensor], data: DataConfig, path: Path, *, caption: str | None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    shown = {
        k: (v.detach().float().cpu() * std + mean).clamp(0, 1)[:, 0] for k, v in columns.items()
    }
    rows = next(iter(shown.values())).shape[0]
    fig, axes = plt.subplots(rows, len(shown), figsize=(3 * len(shown), 3 * rows), squeeze=False)
    for col, (title, batch) in enumerate(shown.items()):
        for row in range(rows):
            ax = axes[row][col]
            ax.imshow(batch[row].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title)
    fig.tight_layout(rect=(0, 0.04 if caption else 0, 1, 1))
    if caption:
        fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=7, wrap=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)

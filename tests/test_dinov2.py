"""DINOv2 / XR-0: the ViT backbone and head, multi-crop, iBOT masks, the EMA teacher and its
schedules, the losses, paper-sized counts on the meta device, and a 2-worker DeepSpeed run."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import raydiology
from raydiology.config import load_experiment
from raydiology.config_base import ConfigError, from_dict
from raydiology.models import count_parameters
from raydiology.models.dinov2 import DINOv2Config, DINOv2Model, build_dinov2_vit
from raydiology.objectives.dino import (
    DINOv2Objective,
    DINOv2ObjectiveConfig,
    block_mask,
    build_dinov2,
    crop_sizes,
    ibot_masks,
    koleo_loss,
    momentum_at,
    multi_crop,
    sample_crop_boxes,
    sinkhorn_knopp,
    teacher_temp_at,
)
from raydiology.train.schedules import param_groups

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "xr0_dinov2.yaml"


def tiny(image_size: int = 64, in_chans: int = 1, **objective) -> DINOv2Objective:
    torch.manual_seed(0)
    model = build_dinov2_vit(DINOv2Config(flavor="tiny"), image_size=image_size, in_chans=in_chans)
    return build_dinov2(DINOv2ObjectiveConfig(**objective), model=model)


# ---------------------------------------------------------------------------- multi-crop


def test_crop_sizes_follow_the_recipe_and_shrink_with_small_inputs() -> None:
    xr0, dinov2 = (
        DINOv2ObjectiveConfig(),
        DINOv2ObjectiveConfig(global_crop_size=224, local_crop_size=98),
    )
    assert crop_sizes(xr0, image_size=518, patch_size=14) == (518, 196)
    assert crop_sizes(xr0, image_size=1036, patch_size=14) == (518, 196)  # never upscaled
    assert crop_sizes(xr0, image_size=128, patch_size=16) == (128, 48)  # the smoke run
    assert crop_sizes(dinov2, image_size=518, patch_size=14) == (224, 98)
    assert crop_sizes(dinov2, image_size=518, patch_size=16) == (224, 96)  # whole patches
    assert crop_sizes(xr0, image_size=16, patch_size=16) == (16, 16)  # at least one patch


@pytest.mark.parametrize(
    ("scale", "size"), [((0.5, 1.0), 518), ((0.2, 0.5), 518), ((0.05, 0.32), 224)]
)
def test_crop_boxes_cover_the_asked_area_and_stay_inside(scale, size) -> None:
    g = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(4000, size=size, scale=scale, ratio=(3 / 4, 4 / 3), generator=g)
    x0, y0, x1, y1 = boxes.unbind(1)
    w, h = x1 - x0, y1 - y0
    area = w * h / size**2
    whole = (w == size) & (h == size)  # torchvision's fallback after 10 misses
    assert whole.float().mean() < 0.01
    a = area[~whole]
    assert a.min() >= scale[0] - 1e-5 and a.max() <= scale[1] + 1e-5
    assert a.min() < scale[0] + 0.05 * (scale[1] - scale[0])  # the whole range is used
    assert a.max() > scale[1] - 0.05 * (scale[1] - scale[0])
    aspect = (w / h)[~whole]
    assert aspect.min() >= 3 / 4 - 1e-4 and aspect.max() <= 4 / 3 + 1e-4
    assert x0.min() >= 0 and y0.min() >= 0 and x1.max() <= size + 1e-3 and y1.max() <= size + 1e-3


def test_multi_crop_is_crop_major_resized_and_flipped() -> None:
    b, r = 3, 32
    images = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 1, r, r).clone()
    crops = multi_crop(images, 4, out_size=16, scale=(0.2, 0.5), ratio=(0.75, 1.33), hflip_prob=0.5)
    assert crops.shape == (4 * b, 1, 16, 16) and crops.dtype == images.dtype
    owner = crops.mean(dim=(1, 2, 3))  # constant images: each crop shows its image's value
    assert torch.allclose(owner, torch.arange(b, dtype=torch.float32).repeat(4), atol=1e-5)

    ramp = torch.arange(r, dtype=torch.float32).expand(r, r)[None, None].repeat(2, 1, 1, 1)
    same = multi_crop(ramp, 1, out_size=r, scale=(1, 1), ratio=(1, 1), hflip_prob=0.0)
    flipped = multi_crop(ramp, 1, out_size=r, scale=(1, 1), ratio=(1, 1), hflip_prob=1.0)
    assert torch.allclose(same, ramp, atol=1e-4)  # the whole image, resampled 1:1
    assert torch.allclose(flipped, ramp.flip(-1), atol=1e-4)


# ---------------------------------------------------------------------------- iBOT masks


@pytest.mark.parametrize("count", [1, 4, 19, 40, 98])
def test_block_mask_has_the_exact_count_in_blocks(count: int) -> None:
    rng = random.Random(count)
    mask = block_mask((14, 14), count, rng)
    assert mask.shape == (14, 14) and int(mask.sum()) == count
    if count >= 19:
        # Blocks, not scattered cells: almost every masked cell touches another one.
        padded = np.pad(mask, 1)
        neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        assert (neighbours & mask).sum() / count > 0.9


class AreaRecordingRandom(random.Random):
    """A seeded Random that notes the range of every block-area draw (the positive ones;
    aspect-ratio draws are of log ratios and start below 0)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.area_ranges: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        if a > 0:
            self.area_ranges.append((a, b))
        return super().uniform(a, b)


def test_ibot_blocks_are_capped_at_half_the_patches() -> None:
    """DINOv2's MaskingGenerator caps each block at 0.5 N patches (dinov2/train/train.py):
    masks above half the crop are made of several blocks, each at most N/2, and still hit
    their exact count."""
    grid, n_patches = (14, 14), 196
    rng = AreaRecordingRandom(0)
    masks = ibot_masks(8, grid, probability=1.0, ratio=(0.7, 0.95), min_block=4, rng=rng)
    counts = masks.sum(dim=1)
    assert counts.min() >= int(0.7 * n_patches) and counts.max() <= int(0.95 * n_patches)
    assert rng.area_ranges and max(b for _, b in rng.area_ranges) <= n_patches // 2
    assert sum(1 for _, b in rng.area_ranges if b == n_patches // 2) >= 8  # the cap binds
    # uncapped, a single block may ask for the whole count
    free = AreaRecordingRandom(0)
    assert int(block_mask(grid, 150, free).sum()) == 150
    assert free.area_ranges[0] == (4, 150)
    capped = AreaRecordingRandom(0)
    assert int(block_mask(grid, 150, capped, max_block=98).sum()) == 150
    assert capped.area_ranges[0] == (4, 98)


def test_ibot_masks_half_the_crops_with_ratios_across_the_range() -> None:
    n, grid = 64, (37, 37)
    masks = ibot_masks(
        n, grid, probability=0.5, ratio=(0.1, 0.5), min_block=4, rng=random.Random(0)
    )
    assert masks.shape == (n, 37 * 37) and masks.dtype == torch.bool
    ratios = masks.float().mean(dim=1)
    masked = ratios[ratios > 0]
    assert len(masked) == 32
    assert masked.min() >= 0.09 and masked.max() <= 0.5
    # one ratio from each of 32 equal slices of [0.1, 0.5]: spread evenly
    assert masked.min() < 0.115 and masked.max() > 0.485
    assert np.allclose(np.sort(masked.numpy()), np.linspace(0.1, 0.5, 33)[:-1] + 0.00625, atol=0.01)
    # the masked crops are shuffled through the batch, not all at the front
    first_half = int((ratios[: n // 2] > 0).sum())
    assert 0 < first_half < n // 2


# ---------------------------------------------------------------------------- schedules


def test_momentum_cosine_from_0992_to_1() -> None:
    m = [momentum_at(s, 100, start=0.992, end=1.0) for s in range(101)]
    assert m[0] == pytest.approx(0.992) and m[100] == pytest.approx(1.0)
    assert m[50] == pytest.approx(0.996)
    assert all(a <= b for a, b in itertools.pairwise(m))


def test_teacher_temperature_warms_up_then_stays() -> None:
    cfg = DINOv2ObjectiveConfig()  # 0.04 -> 0.07 over 30% of the run
    assert teacher_temp_at(0, 0, cfg) == pytest.approx(0.04)  # before max_steps is known
    assert teacher_temp_at(0, 100, cfg) == pytest.approx(0.04)
    assert teacher_temp_at(15, 100, cfg) == pytest.approx(0.055)
    assert teacher_temp_at(30, 100, cfg) == pytest.approx(0.07)
    assert teacher_temp_at(99, 100, cfg) == pytest.approx(0.07)
    assert teacher_temp_at(0, 100, DINOv2ObjectiveConfig(teacher_temp_warmup=0)) == 0.07

    objective = tiny()
    batch = {"image": torch.randn(2, 1, 64, 64)}
    assert float(objective(batch)["teacher_temp"]) == pytest.approx(0.04)
    objective.after_step(15, 100)
    assert float(objective(batch)["teacher_temp"]) == pytest.approx(0.055)
    assert objective.state_dict()["progress"].tolist() == [15, 100]  # survives a resume


# ---------------------------------------------------------------------------- EMA teacher


def test_ema_update_math() -> None:
    objective = tiny()
    student, teacher = objective.model, objective.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    objective.after_step(1, 10)  # iteration 0: momentum 0.992
    m = momentum_at(0, 10, start=0.992, end=1.0)
    assert m == pytest.approx(0.992)
    params = {f"encoder.{k}": v for k, v in student.encoder.named_parameters()}
    params |= {f"head.{k}": v for k, v in student.head.named_parameters()}
    after = teacher.state_dict()
    assert set(after) == set(params)
    for name, s in params.items():
        expected = m * before[name] + (1 - m) * s.detach()
        assert torch.allclose(after[name], expected, atol=1e-6), name
    # momentum 1 (end of a run that ends at 1.0) leaves the teacher where it is
    frozen = {k: v.clone() for k, v in after.items()}
    objective.after_step(11, 10)
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())


def test_teacher_is_frozen_and_never_reaches_the_optimizer() -> None:
    objective = tiny()
    teacher = objective.teacher
    assert list(teacher.parameters()) == []  # its weights are buffers
    assert all(not b.requires_grad for b in teacher.buffers())
    grouped = {id(p) for g in param_groups(objective, 0.04) for p in g["params"]}
    assert grouped == {id(p) for p in objective.model.parameters()}
    objective.train()
    assert not teacher.training and not teacher.encoder.blocks[0].training
    out = objective({"image": torch.randn(2, 1, 64, 64)})
    out["loss"].backward()
    assert all(b.grad is None for b in teacher.buffers())
    # the exported encoder (the teacher's) has the model encoder's keys and shapes
    exported = objective.encoder.state_dict()
    own = objective.model.encoder.state_dict()
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in own.items()}


def test_teacher_stays_fp32_when_deepspeed_casts_the_parameters() -> None:
    objective = tiny()
    for p in objective.parameters():  # what DeepSpeed's bf16 engine does: parameters only
        p.data = p.data.to(torch.bfloat16)
    assert objective.model.encoder.cls_token.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for b in objective.teacher.buffers())
    assert objective.dino_center.dtype == torch.float32
    out = objective({"image": torch.randn(2, 1, 64, 64, dtype=torch.bfloat16)})
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    before = objective.teacher.head.last_layer.weight_v.clone()
    objective.after_step(1, 100)
    # a 0.8% step that bf16 weights would round away is kept in fp32
    assert not torch.equal(before, objective.teacher.head.last_layer.weight_v)


# ---------------------------------------------------------------------------- losses


def test_koleo_rewards_spread_and_pushes_neighbours_apart() -> None:
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(64, 16, generator=g)
    clustered = torch.randn(1, 16, generator=g) + 0.05 * torch.randn(64, 16, generator=g)
    assert koleo_loss(spread) < koleo_loss(clustered)
    assert float(koleo_loss(torch.randn(1, 16))) == 0.0

    x = clustered.clone().requires_grad_(True)

    def nearest(points: torch.Tensor) -> torch.Tensor:
        u = torch.nn.functional.normalize(points.detach(), dim=-1)
        d = torch.cdist(u, u) + torch.eye(len(u)) * 10
        return d.min(dim=1).values

    start = nearest(x).mean()
    for _ in range(20):
        loss = koleo_loss(x)
        (grad,) = torch.autograd.grad(loss, x)
        x = (x - 0.01 * grad).detach().requires_grad_(True)
    assert nearest(x).mean() > start


def test_dino_loss_is_the_mean_over_cross_view_pairs() -> None:
    g, loc, b, k = 2, 3, 4, 10
    gen = torch.Generator().manual_seed(0)
    student = torch.log_softmax(torch.randn(g + loc, b, k, generator=gen), -1)
    teacher = torch.softmax(torch.randn(g, b, k, generator=gen), -1)
    terms = [
        -(teacher[t] * student[s]).sum(-1).mean()
        for t in range(g)
        for s in range(g + loc)
        if s != t
    ]
    expected = torch.stack(terms).mean()
    assert torch.allclose(DINOv2Objective.dino_loss(student, teacher), expected)


def test_ibot_loss_averages_per_crop_over_all_crops() -> None:
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    k = 5
    gen = torch.Generator().manual_seed(0)
    student = torch.log_softmax(torch.randn(3, k, generator=gen), -1)
    teacher = torch.softmax(torch.randn(3, k, generator=gen), -1)
    ce = -(teacher * student).sum(-1)
    expected = ((ce[0] + ce[1]) / 2 + ce[2]) / 3
    assert torch.allclose(DINOv2Objective.ibot_loss(student, teacher, masks), expected)


def test_centering_and_sinkhorn_targets() -> None:
    objective = tiny()
    logits = torch.randn(6, objective.model.head.prototypes)
    center = torch.zeros(1, logits.shape[1])
    probs = objective.teacher_targets(logits, center, 0.04)
    assert torch.allclose(probs.sum(-1), torch.ones(6))
    assert torch.allclose(center, 0.1 * logits.mean(0, keepdim=True), atol=1e-6)
    objective.eval()
    objective.teacher_targets(logits, center, 0.04)
    assert torch.allclose(center, 0.1 * logits.mean(0, keepdim=True), atol=1e-6)  # eval: kept

    cosines = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)  # the head's range
    q = sinkhorn_knopp(cosines, 0.07)
    assert torch.allclose(q.sum(-1), torch.ones(8), atol=1e-4)
    plain = torch.softmax(cosines / 0.07, dim=-1)
    assert q.sum(0).std() < 0.5 * plain.sum(0).std()  # prototypes used more equally
    converged = sinkhorn_knopp(cosines, 0.07, iterations=100)
    assert torch.allclose(converged.sum(0), torch.full((16,), 8 / 16), atol=1e-3)
    objective = tiny(centering="sinkhorn_knopp")
    assert torch.isfinite(objective({"image": torch.randn(2, 1, 64, 64)})["loss"])


def test_centre_statistics_are_all_reduced_across_ranks(tmp_path: Path) -> None:
    """Two gloo ranks with different teacher outputs end with the same centre."""
    script = tmp_path / "ranks.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import torch, torch.distributed as dist
            from raydiology.models.dinov2 import DINOv2Config, build_dinov2_vit
            from raydiology.objectives.dino import DINOv2ObjectiveConfig, build_dinov2
            dist.init_process_group("gloo")
            rank = dist.get_rank()
            model = build_dinov2_vit(DINOv2Config(flavor="tiny"), image_size=64, in_chans=1)
            objective = build_dinov2(DINOv2ObjectiveConfig(), model=model)
            logits = torch.arange(3 * 256.0).view(3, 256) * (rank + 1)
            objective.teacher_targets(logits, objective.dino_center, 0.04)
            torch.save(objective.dino_center, {str(tmp_path)!r} + f"/center{{rank}}.pt")
            dist.destroy_process_group()
            """
        )
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
        ],
        check=True,
        timeout=300,
    )
    c0, c1 = (torch.load(tmp_path / f"center{r}.pt") for r in (0, 1))
    both = torch.cat([torch.arange(3 * 256.0).view(3, 256) * r for r in (1, 2)])
    assert torch.equal(c0, c1)
    assert torch.allclose(c0, 0.1 * both.mean(0, keepdim=True))


# ---------------------------------------------------------------------------- model


def test_backbone_takes_global_and_local_crops_and_masks() -> None:
    torch.manual_seed(0)
    model = build_dinov2_vit(DINOv2Config(flavor="tiny"), image_size=128, in_chans=3)
    enc = model.encoder
    assert (enc.embed_dim, enc.patch_size, enc.in_chans, enc.num_prefix_tokens) == (64, 16, 3, 1)
    for side in (128, 48, 224):
        tokens = enc(torch.randn(2, 3, side, side))
        assert tokens.shape == (2, 1 + (side // 16) ** 2, 64)
    assert torch.equal(enc.positions((8, 8), torch.float32), enc.pos_embed)  # native grid
    with pytest.raises(ValueError, match="multiple of the patch"):
        enc(torch.randn(1, 3, 50, 50))
    # a masked patch contributes only the mask token: changing its pixels changes nothing
    enc.eval()
    images = torch.randn(1, 3, 128, 128)
    masks = torch.zeros(1, 64, dtype=torch.bool)
    masks[0, 0] = True
    other = images.clone()
    other[..., :16, :16] = 5.0
    with torch.no_grad():
        assert torch.allclose(enc(images, masks), enc(other, masks), atol=1e-5)
        assert not torch.allclose(enc(images), enc(other), atol=1e-3)
    logits = model.head(torch.randn(5, 64))
    assert logits.shape == (5, 256) and logits.abs().max() <= 1.0 + 1e-5  # cosines


@pytest.mark.parametrize("norm_last_layer", [False, True])
def test_head_gain_trains_unless_norm_last_layer(norm_last_layer: bool) -> None:
    """DINOv2 trains the weight-norm gain (dinov2/layers/dino_head.py); DINO v1's
    norm_last_layer keeps it at 1. Either way the logits are gain x cosine."""
    torch.manual_seed(0)
    cfg = DINOv2Config(flavor="tiny", norm_last_layer=norm_last_layer)
    model = build_dinov2_vit(cfg, image_size=64, in_chans=1)
    objective = build_dinov2(DINOv2ObjectiveConfig(), model=model)
    last = model.head.last_layer
    assert last.weight_g.shape == (256, 1) and torch.equal(last.weight_g, torch.ones(256, 1))
    assert last.weight_g.requires_grad is not norm_last_layer
    with torch.no_grad():
        last.weight_g[:3] = 2.0
        x = F.normalize(torch.randn(4, 256), dim=-1)
        cosines = x @ F.normalize(last.weight_v, dim=-1).T
        assert torch.allclose(last(x)[:, :3], 2 * cosines[:, :3], atol=1e-6)
        assert torch.allclose(last(x)[:, 3:], cosines[:, 3:], atol=1e-6)
        last.weight_g.fill_(1.0)
    objective({"image": torch.randn(2, 1, 64, 64)})["loss"].backward()
    assert last.weight_v.grad is not None and last.weight_v.grad.abs().sum() > 0
    if norm_last_layer:
        assert last.weight_g.grad is None
        grouped = {id(p) for g in param_groups(objective, 0.04) for p in g["params"]}
        assert id(last.weight_g) not in grouped  # the optimizer never sees it
    else:
        assert last.weight_g.grad is not None and last.weight_g.grad.abs().sum() > 0
    # the teacher's copy is a buffer either way, updated by the EMA
    assert "head.last_layer.weight_g" in dict(objective.teacher.named_buffers())


def test_b14_counts_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = build_dinov2_vit(DINOv2Config(flavor="b14"), image_size=518, in_chans=3)
        objective = build_dinov2(DINOv2ObjectiveConfig(), model=model)
        tokens_global = model.encoder(torch.empty(2, 3, 518, 518))
        tokens_local = model.encoder(torch.empty(2, 3, 196, 196))
    counts = count_parameters(model)
    # ViT-B/14 at 518 px (37x37 positions): DINOv2's ViT-B/14 backbone, 86.6M
    assert counts["encoder"] == 86_580_480
    # head: 768->2048->2048->256 MLP + 65,536 x 256 weight-normalised prototypes and their
    # 65,536 gains (DINOv2's weight_v, weight_g)
    assert counts["head"] == 23_138_560
    assert counts["total"] == 109_719_040
    assert tokens_global.shape == (2, 1 + 37 * 37, 768)
    assert tokens_local.shape == (2, 1 + 14 * 14, 768)
    assert (objective.global_size, objective.local_size) == (518, 196)
    assert sum(b.numel() for b in objective.teacher.buffers()) == counts["total"]


def test_experiment_file_and_profiles_load() -> None:
    exp = load_experiment(EXPERIMENT)
    assert (exp.model.name, exp.model.config.flavor, exp.data.resolution) == (
        "dinov2_vit",
        "b14",
        518,
    )
    assert exp.data.channels == 3 and exp.train.optimizer.weight_decay_end == 0.2
    assert exp.train.grad_clip == 3.0 and exp.train.optimizer.lr == 1e-3
    assert exp.train.micro_batch_size == 10  # XR-0's per-GPU batch
    opt, schedule = exp.train.optimizer, exp.train.schedule
    assert (opt.layer_decay, opt.patch_embed_lr_mult, opt.freeze_last_layer_steps) == (
        0.9,
        0.2,
        1250,
    )
    assert schedule.name == "cosine_restarts"
    assert schedule.warmup_steps + schedule.restart_steps * (1 + schedule.restart_mult) == (
        exp.train.max_steps
    )  # the last cycle ends with the run
    defaults = load_experiment(EXPERIMENT, profile="dinov2_defaults")
    cfg = defaults.objective.config
    assert (cfg.global_crop_size, cfg.local_crop_size) == (224, 98)
    assert cfg.global_crop_scale == (0.32, 1.0) and cfg.local_crop_scale == (0.05, 0.32)
    assert defaults.train.schedule.name == "cosine"
    assert defaults.train.optimizer.freeze_last_layer_steps == 1250
    smoke = load_experiment(EXPERIMENT, profile="smoke")
    assert smoke.model.config.flavor == "tiny" and smoke.data.resolution == 128
    with pytest.raises(ConfigError) as err:
        from_dict(DINOv2ObjectiveConfig, {"mask_ratio": [0.5, 0.1]}, "objective")
    assert err.value.key == "objective.mask_ratio"
    with pytest.raises(ConfigError) as err:
        load_experiment(EXPERIMENT, overrides=["model.flavor=b14", "data.resolution=512"])
    assert err.value.key == "data.resolution"


def test_objective_refuses_other_models() -> None:
    from raydiology.models.hd_mae import HDMAEConfig, build_hd_mae

    with torch.device("meta"):
        model = build_hd_mae(HDMAEConfig(flavor="tiny"), image_size=128, in_chans=1)
    with pytest.raises(TypeError, match="dinov2"):
        build_dinov2(DINOv2ObjectiveConfig(), model=model)
    assert isinstance(tiny().model, DINOv2Model)


# ---------------------------------------------------------------------------- end to end


@pytest.mark.ray
def test_smoke_run_on_two_deepspeed_workers(ray_cluster, tmp_path) -> None:
    """XR-0's recipe at the smoke profile (tiny flavor, 128 px: global 128 / local 48 crops)
    with its default centring (softmax with the teacher centre, not Sinkhorn-Knopp).

    What a 16-step run learns: the CLS features of a fresh backbone (layer-scale 1e-5) are
    nearly the same for every image (KoLeo starts high) and spread apart; the DINO term sits
    near ln K (the tiny head's 256-d bottleneck, DINOv2's, keeps the random teacher's targets
    near-uniform from the start, so centring has little to flatten).
    """
    from raydiology.config import experiment_from_dict
    from raydiology.registry import build_model, build_objective
    from raydiology.train.launch import read_metrics, run_experiment
    from raydiology.train.loop import CHECKPOINT_TAG
    from raydiology.train.safe_load import weights_only_load

    sets = [
        f"output.dir={tmp_path}",
        "train.max_steps=16",
        "train.checkpoint_every=16",
    ]
    exp = load_experiment(EXPERIMENT, profile="smoke", overrides=sets)
    assert exp.objective.config.centering == "centering"
    result = run_experiment(exp)
    rows = read_metrics(result.run_dir)
    losses = [r["loss"] for r in rows]
    assert rows[-1]["step"] == exp.train.max_steps and len(losses) >= 4
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, f"loss did not go down: {losses}"
    assert {"dino", "ibot", "koleo", "teacher_temp"} <= set(rows[-1])
    assert rows[-1]["teacher_temp"] == pytest.approx(0.07)

    encoder = raydiology.load_encoder(result.export)
    spec = encoder.spec
    assert (spec["image_size"], spec["in_chans"], spec["patch_size"]) == (128, 3, 16)
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = encoder(images)
    assert features.shape == (2, 1 + 64, 64)

    # The export is the EMA teacher of the final checkpoint, which moved away from its start.
    saved = experiment_from_dict(exp.to_dict())
    torch.manual_seed(saved.train.seed)
    objective = build_objective(saved.objective, build_model(saved.model, saved.data))
    start = {k: v.clone() for k, v in objective.teacher.state_dict().items()}
    head = {k: v.clone() for k, v in objective.model.head.state_dict().items()}
    states = weights_only_load(
        str(Path(result.checkpoint) / CHECKPOINT_TAG / "mp_rank_00_model_states.pt")
    )
    objective.load_state_dict(states["module"])
    with torch.no_grad():
        assert torch.allclose(objective.encoder(images), features, atol=1e-5)
        moved = max((v - start[k]).abs().max() for k, v in objective.teacher.state_dict().items())
        assert moved > 0
        student = objective.model.encoder.eval()(images)
        assert not torch.allclose(student, features, atol=1e-4)
    assert objective.progress.tolist() == [exp.train.max_steps, exp.train.max_steps]
    # XR-0's file freezes the head's last layer for 1250 steps (all of these 16) through
    # DeepSpeed's optimizer; the rest of the head trained
    assert exp.train.optimizer.freeze_last_layer_steps > exp.train.max_steps
    trained = objective.model.head.state_dict()
    for name in ("last_layer.weight_g", "last_layer.weight_v"):
        assert torch.equal(trained[name], head[name])
    assert not torch.equal(trained["mlp.0.weight"], head["mlp.0.weight"])

"""EVA-X: the EVA-02-style student (timm Eva), the frozen teacher loaded from a raydiology
export, the masked-feature-modelling objective, and a smoke run on 2 DeepSpeed workers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import raydiology
from raydiology.config import load_experiment
from raydiology.config_base import ConfigError, from_dict
from raydiology.models import count_parameters
from raydiology.models.eva import EVAX_FLAVORS, EvaX, EvaXConfig, build_evax
from raydiology.objectives.mfm import MFMObjective, MFMObjectiveConfig, build_mfm
from raydiology.registry import build_model, build_objective
from raydiology.train.export import export_encoder
from raydiology.train.schedules import param_groups

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
EVAX = EXPERIMENTS / "evax.yaml"
HD_MAE = EXPERIMENTS / "hd_mae_cam.yaml"

# Encoder parameters at 224 px with 3 channels, counted on the meta device. The EVA-X release
# lists ViT-Ti/S/B at 6M / 22M / 86M.
ENCODER_PARAMS = {"ti": 5_525_376, "s": 21_667_584, "b": 85_851_648}
PUBLISHED_M = {"ti": 6, "s": 22, "b": 86}
SWIGLU_HIDDEN = {"ti": 512, "s": 1024, "b": 2048}


def _model(flavor: str = "tiny", *, image_size: int = 64, in_chans: int = 1, **cfg) -> EvaX:
    config = from_dict(EvaXConfig, {"flavor": flavor, **cfg}, "model")
    return build_evax(config, image_size=image_size, in_chans=in_chans)


def _objective(model: EvaX, **cfg) -> MFMObjective:
    return build_mfm(from_dict(MFMObjectiveConfig, cfg, "objective"), model=model)


def _images(b: int = 2, c: int = 1, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hd_mae_export(tmp_path_factory) -> Path:
    """A tiny HD-MAE (128 px, 1 channel, 64-d) exported the way a training run exports it."""
    exp = load_experiment(HD_MAE, profile="smoke")
    torch.manual_seed(0)
    objective = build_objective(exp.objective, build_model(exp.model, exp.data))
    folder = tmp_path_factory.mktemp("hd_mae") / "export"
    export_encoder(objective, folder, exp=exp, corpus_sha256=None, step=0)
    return folder


# ------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("flavor", ["ti", "s", "b"])
def test_paper_flavors_on_meta(flavor: str) -> None:
    with torch.device("meta"):
        model = _model(flavor, image_size=224, in_chans=3)
    enc = model.encoder
    a = EVAX_FLAVORS[flavor]
    assert (enc.embed_dim, len(enc.blocks), enc.patch_size, enc.grid_size) == (
        a.embed_dim,
        a.depth,
        16,
        (14, 14),
    )
    assert enc.num_prefix_tokens == 1 and enc.in_chans == 3
    # learnable absolute positions (CLS included) plus 2-D RoPE with theta 10000
    assert isinstance(enc.pos_embed, torch.nn.Parameter)
    assert enc.pos_embed.shape == (1, 1 + 196, a.embed_dim)
    assert enc.rope is not None and enc.rope.temperature == 10000.0
    assert enc.cls_token is not None and enc.mask_token.shape == (1, 1, a.embed_dim)
    hidden = SWIGLU_HIDDEN[flavor]
    params = dict(enc.named_parameters())
    for i, block in enumerate(enc.blocks):
        attn, mlp = block.attn, block.mlp
        assert block.gamma_1 is None and block.gamma_2 is None  # no layer-scale
        assert block.norm1.eps == block.norm2.eps == 1e-6  # pre-LN
        if flavor == "b":  # separate q/k/v, bias on q and v only; SubLN inside the SwiGLU
            assert attn.qkv is None
            assert attn.q_proj.bias is not None and attn.v_proj.bias is not None
            assert attn.k_proj.bias is None
            assert mlp.fc1_g.out_features == mlp.fc1_x.out_features == hidden
            assert isinstance(mlp.norm, torch.nn.LayerNorm) and mlp.norm.normalized_shape == (
                hidden,
            )
        else:  # fused qkv; k's bias is a fixed zero buffer, not a parameter
            assert f"blocks.{i}.attn.q_bias" in params and f"blocks.{i}.attn.v_bias" in params
            assert f"blocks.{i}.attn.k_bias" not in params
            assert attn.qkv.bias is None
            assert mlp.fc1.out_features == 2 * hidden  # gate and value packed
            assert isinstance(mlp.norm, torch.nn.Identity)
        assert mlp.fc2.in_features == hidden and isinstance(mlp.act, torch.nn.SiLU)
    counts = count_parameters(model)
    assert counts["encoder"] == ENCODER_PARAMS[flavor]
    assert abs(counts["encoder"] / 1e6 - PUBLISHED_M[flavor]) / PUBLISHED_M[flavor] < 0.1
    assert counts["head"] == a.embed_dim * model.teacher.embed_dim + model.teacher.embed_dim


def test_model_params_cli_reports_encoder_and_total() -> None:
    import json

    from typer.testing import CliRunner

    from raydiology.cli import app

    for flavor in ("ti", "s", "b"):
        result = CliRunner().invoke(
            app, ["model", "params", str(EVAX), "--set", f"model.flavor={flavor}"]
        )
        assert result.exit_code == 0, result.output
        counts = json.loads(result.output)
        assert counts["encoder"] == ENCODER_PARAMS[flavor] and counts["total"] > counts["encoder"]


@pytest.mark.parametrize("in_chans", [1, 3])
def test_encoder_protocol_and_mask_token(in_chans: int) -> None:
    torch.manual_seed(0)
    enc = _model(in_chans=in_chans).encoder.eval()
    x = _images(c=in_chans)
    with torch.no_grad():
        tokens = enc(x)
        assert tokens.shape == (2, 1 + 16, enc.embed_dim)
        none_masked = torch.zeros(2, 16, dtype=torch.bool)
        assert torch.allclose(enc(x, none_masked), tokens)
        # A masked patch's pixels no longer matter: only its position does.
        mask = none_masked.clone()
        mask[:, 5] = True  # patch (1, 1): rows 16-31, columns 16-31
        y = x.clone()
        y[:, :, 16:32, 16:32] += 3.0
        assert torch.allclose(enc(x, mask), enc(y, mask), atol=1e-6)
        assert not torch.allclose(enc(x), enc(y), atol=1e-3)
    with pytest.raises(AssertionError):  # timm's strict image size
        enc(_images(c=in_chans, size=96))


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(EvaXConfig, {"flavor": "huge"}, "model")
    assert err.value.key == "model.flavor"
    with pytest.raises(ConfigError) as err:
        from_dict(EvaXConfig, {"flavor": "tiny", "num_heads": 3}, "model")
    assert err.value.key == "model.num_heads"
    with pytest.raises(ConfigError) as err:
        from_dict(EvaXConfig, {"teacher": {"input_mean": [0.5]}}, "model")
    assert err.value.key == "model.teacher.input_std"
    with pytest.raises(ConfigError) as err:
        _model(image_size=72)
    assert err.value.key == "data.resolution"
    with pytest.raises(ConfigError) as err:
        from_dict(MFMObjectiveConfig, {"mask_ratio": 1.0}, "objective")
    assert err.value.key == "objective.mask_ratio"


def test_recipe_is_eva_x_appendix_and_official_code() -> None:
    """lr 3e-4 on 8 GPUs (appendix B.1), EVA-X's dataset statistics (its datasets.py), the
    teacher told the same normalisation, drop path 0.1 only for the B flavor."""
    exp = load_experiment(EVAX)
    assert exp.train.optimizer.lr == pytest.approx(3e-4)
    assert exp.scaling.num_workers == 8
    # 600 epochs (EVA-X README, S) of ~520k images at a global batch of 2048
    batch = exp.train.micro_batch_size * exp.train.grad_accum * exp.scaling.num_workers
    assert batch == 2048 and exp.train.max_steps == math.ceil(600 * 520_000 / batch)
    assert exp.data.mean == pytest.approx((0.49185243,) * 3)
    assert exp.data.std == pytest.approx((0.28509309,) * 3)
    teacher = exp.model.config.teacher
    assert tuple(teacher.input_mean) == tuple(exp.data.mean)
    assert tuple(teacher.input_std) == tuple(exp.data.std)
    for flavor, last_rate in (("s", 0.0), ("ti", 0.0), ("b", 0.1), ("tiny", 0.0)):
        with torch.device("meta"):
            enc = _model(flavor, image_size=224, in_chans=3).encoder
        rate = getattr(enc.blocks[-1].drop_path1, "drop_prob", 0.0)  # Identity when 0
        assert rate == pytest.approx(last_rate), flavor
    with torch.device("meta"):
        enc = _model("b", image_size=224, in_chans=3, drop_path=0.0).encoder
    assert isinstance(enc.blocks[-1].drop_path1, torch.nn.Identity)  # an override wins


# ----------------------------------------------------------------------------- teacher


def test_random_teacher_is_frozen_and_outside_the_optimizer() -> None:
    torch.manual_seed(0)
    objective = _objective(_model())
    teacher = objective.model.teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    optimised = {id(p) for g in param_groups(objective, 0.05) for p in g["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert optimised == {id(p) for p in objective.parameters() if p.requires_grad}
    objective.train()
    assert objective.training and not teacher.encoder.training
    assert all(not m.training for m in teacher.encoder.modules())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    out = objective({"image": _images()})
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert objective.model.head.weight.grad is not None
    assert objective.model.encoder.mask_token.grad is not None
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_teacher_from_hd_mae_export(hd_mae_export: Path) -> None:
    """A 128-px 1-channel HD-MAE teaches a 64-px 3-channel student: its input is resized and
    re-normalised, and its 8x8 feature grid is interpolated to the student's 4x4."""
    exported = raydiology.load_encoder(hd_mae_export)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    torch.manual_seed(0)
    model = _model(
        in_chans=3,
        teacher={"path": str(hd_mae_export), "input_mean": mean, "input_std": std},
    )
    teacher = model.teacher
    assert teacher.loaded_from == str(hd_mae_export)
    assert (teacher.image_size, teacher.in_chans, teacher.grid, teacher.embed_dim) == (
        128,
        1,
        8,
        64,
    )
    exported_state = exported.state_dict()
    for name, value in teacher.encoder.state_dict().items():
        assert torch.equal(value, exported_state[name]), name
    assert all(not p.requires_grad for p in teacher.parameters())
    assert model.head.out_features == 64

    x = _images(c=3)
    with torch.no_grad():
        targets = model.forward_targets(x)
        pixels = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
        gray = (pixels.mean(dim=1, keepdim=True) - 0.5) / 0.5  # the HD-MAE export's mean/std
        big = F.interpolate(gray, size=(128, 128), mode="bilinear", antialias=True)
        fmap = exported(big)[:, 1:].transpose(1, 2).reshape(2, 64, 8, 8)
        expected = F.interpolate(fmap, size=(4, 4), mode="bilinear").flatten(2).transpose(1, 2)
    assert targets.shape == (2, 16, 64)
    assert torch.allclose(targets, expected, atol=1e-5)

    objective = _objective(model)
    out = objective({"image": x})
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())

    with pytest.raises(ConfigError) as err:
        _model(teacher={"path": str(hd_mae_export), "embed_dim": 32})
    assert err.value.key == "model.teacher.embed_dim"


def test_missing_teacher_export_fails_before_training(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as err, pytest.warns(UserWarning, match="stand-in"):
        load_experiment(EVAX, profile="smoke", overrides=[f"model.teacher.path={missing}"])
    assert err.value.key == "model.teacher.path"
    with pytest.raises(ConfigError) as err:
        _model(teacher={"path": str(missing)})
    assert err.value.key == "model.teacher.path"


def test_student_export_loads_even_without_its_teacher(tmp_path, hd_mae_export) -> None:
    """load_encoder builds on the meta device: RoPE tables and k-biases are recomputed after
    the weights load, and the teacher's export is not needed to rebuild the student."""
    import shutil

    teacher_copy = tmp_path / "teacher"
    shutil.copytree(hd_mae_export, teacher_copy)
    exp = load_experiment(
        EVAX,
        profile="smoke",
        overrides=[f"model.teacher.path={teacher_copy}", "data.channels=1", "data.mean=[0.5]",
                   "data.std=[0.5]", "model.teacher.input_mean=[0.5]",
                   "model.teacher.input_std=[0.5]"],
    )  # fmt: skip
    torch.manual_seed(0)
    objective = build_objective(exp.objective, build_model(exp.model, exp.data))
    export_encoder(objective, tmp_path / "export", exp=exp, corpus_sha256=None, step=3)
    shutil.rmtree(teacher_copy)

    with pytest.warns(UserWarning, match="model.teacher.path"):
        encoder = raydiology.load_encoder(tmp_path / "export")
    assert encoder.spec["model"]["name"] == "evax"
    x = _images(c=1, size=128)
    with torch.no_grad():
        expected = objective.encoder.eval()(x)
        assert torch.allclose(encoder(x), expected, atol=1e-6)
    assert torch.equal(encoder.rope.pos_embed, objective.encoder.rope.pos_embed)


# ----------------------------------------------------------------------------- objective


def test_loss_is_one_minus_cosine_on_masked_tokens_only() -> None:
    torch.manual_seed(0)
    model = _model()
    pred = torch.randn(2, 16, 64, requires_grad=True)
    target = torch.randn(2, 16, 64)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, 7:12] = True
    loss = model.forward_loss(pred, target, mask)
    cos = F.cosine_similarity(pred, target, dim=-1)
    assert torch.allclose(loss, (1 - cos[mask]).mean())
    loss.backward()
    assert pred.grad is not None
    assert torch.count_nonzero(pred.grad[~mask]) == 0  # visible tokens get no gradient
    assert (pred.grad[mask].abs().sum(-1) > 0).all()
    # Perfect predictions on the masked tokens: zero loss whatever the visible ones are.
    perfect = torch.where(mask[..., None], 2.0 * target, torch.randn(2, 16, 64))
    assert model.forward_loss(perfect, target, mask).abs() < 1e-6


@pytest.mark.parametrize("masking", ["random", "block"])
def test_masks_have_the_ratio_and_are_reproducible(masking: str) -> None:
    torch.manual_seed(0)
    objective = _objective(_model(image_size=224), masking=masking)
    assert objective.num_masked == 196 - int(196 * 0.7 + 1e-6) == 59
    m1 = objective.draw_mask(8, generator=torch.Generator().manual_seed(3))
    m2 = objective.draw_mask(8, generator=torch.Generator().manual_seed(3))
    m3 = objective.draw_mask(8, generator=torch.Generator().manual_seed(4))
    assert m1.dtype == torch.bool and m1.shape == (8, 196)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert (m1.sum(dim=1) == 59).all()
    if masking == "block":
        # Block-wise masks are clumped: most masked patches have a masked 4-neighbour.
        grid = m1.view(8, 14, 14).float()
        padded = F.pad(grid, (1, 1, 1, 1))
        neighbours = (
            padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
        )
        clumped = ((neighbours > 0) & (grid > 0)).sum() / grid.sum()
        assert clumped > 0.9


def test_objective_forward_logs_and_rejects_other_models() -> None:
    torch.manual_seed(0)
    objective = _objective(_model())
    out = objective({"image": _images()}, generator=torch.Generator().manual_seed(0))
    assert next(iter(out)) == "loss" and torch.isfinite(out["loss"])
    assert abs(float(out["mask_ratio"]) - 5 / 16) < 1e-6
    assert torch.allclose(out["masked_cosine"], 1 - out["loss"].detach())
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    assert objective.encoder is objective.model.encoder

    from raydiology.models.hd_mae import HDMAEConfig, build_hd_mae

    with pytest.raises(TypeError, match="mfm"):
        build_mfm(
            MFMObjectiveConfig(),
            model=build_hd_mae(HDMAEConfig(flavor="tiny"), image_size=64, in_chans=1),
        )


def test_a_few_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    objective = _objective(_model())
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-3)
    x = _images(b=4)
    losses = []
    for step in range(12):
        out = objective({"image": x}, generator=torch.Generator().manual_seed(step % 3))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3]), losses


def test_bf16_forward() -> None:
    torch.manual_seed(0)
    objective = _objective(_model()).to(torch.bfloat16)
    out = objective({"image": _images().to(torch.bfloat16)})
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


# ------------------------------------------------------------------------------ smoke run


@pytest.mark.ray
def test_smoke_run_on_two_deepspeed_workers(ray_cluster, tmp_path, hd_mae_export) -> None:
    """`evax.yaml --profile smoke`: tiny student, the HD-MAE export as teacher, 2 ZeRO-2
    workers on CPU; the loss goes down and the student's export loads."""
    from raydiology.train.launch import read_metrics, run_experiment

    exp = load_experiment(
        EVAX,
        profile="smoke",
        overrides=[
            f"output.dir={tmp_path}",
            f"model.teacher.path={hd_mae_export}",
            "train.max_steps=16",
            "train.checkpoint_every=16",
        ],
    )
    result = run_experiment(exp)
    losses = [r["loss"] for r in read_metrics(result.run_dir)]
    assert len(losses) >= 4, losses
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, f"loss did not go down: {losses}"
    assert result.export is not None
    encoder = raydiology.load_encoder(result.export)
    spec = encoder.spec
    assert spec["model"]["name"] == "evax" and spec["objective"]["name"] == "mfm"
    x = torch.randn(2, spec["in_chans"], spec["image_size"], spec["image_size"])
    with torch.no_grad():
        tokens = encoder(x)
    assert tokens.shape == (2, 1 + (128 // 16) ** 2, spec["embed_dim"])
    assert torch.isfinite(tokens).all()

"""Vision Mamba (MambaXray-VL): the selective scan, the Mamba mixer, the stage-1
autoregressive model and its objective, the 4-direction encoder and its stage-1 init, paper
sizes on the meta device, and a smoke training run on 2 DeepSpeed workers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raydiology.config_base import ConfigError, from_dict
from raydiology.models import count_parameters
from raydiology.models.mamba import Mamba, Mamba4D, cuda_selective_scan, selective_scan
from raydiology.models.vision_mamba import (
    VisionMambaARG,
    VisionMambaARGConfig,
    VisionMambaConfig,
    build_vision_mamba,
    build_vision_mamba_arg,
    cluster_causal_mask,
    cluster_order,
    column_order_with_middle_cls,
    init_from_arg,
)
from raydiology.objectives.arg import ARGObjectiveConfig, build_arg

EXPERIMENT = (
    Path(__file__).resolve().parents[1] / "experiments" / "mambaxray_vl" / "stage1_arg.yaml"
)
EXPERIMENT_LARGE = EXPERIMENT.with_name("stage1_arg_large.yaml")


@pytest.fixture(autouse=True)
def one_thread():
    """The scan is a loop of small ops: on a busy machine, intra-op threads mostly wait for
    each other (one test: 130 s with 2 threads under load, 3 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def arg_model(size: int = 192, in_chans: int = 1, **cfg) -> VisionMambaARG:
    torch.manual_seed(0)
    config = from_dict(VisionMambaARGConfig, {"flavor": "tiny", **cfg}, "model")
    return build_vision_mamba_arg(config, image_size=size, in_chans=in_chans)


def scan_inputs(*, batch=2, channels=3, length=7, state=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {
        "u": randn(batch, channels, length),
        "delta": randn(batch, channels, length) * 0.5,
        "A": -torch.rand(channels, state, generator=g, dtype=torch.float64) * 2 - 0.1,
        "B": randn(batch, state, length),
        "C": randn(batch, state, length),
        "D": randn(channels),
        "z": randn(batch, channels, length),
        "delta_bias": randn(channels) * 0.1,
    }


def naive_recurrence(u, delta, A, B, C, D, z, delta_bias):
    """The SSM one step, one channel, one sample at a time: the definition, nothing fused."""
    batch, channels, length = u.shape
    y = torch.zeros_like(u)
    for b in range(batch):
        for d in range(channels):
            h = torch.zeros(A.shape[1], dtype=u.dtype)
            for t in range(length):
                dt = math.log1p(math.exp(float(delta[b, d, t] + delta_bias[d])))  # softplus
                h = torch.exp(dt * A[d]) * h + dt * B[b, :, t] * u[b, d, t]
                out = float(C[b, :, t] @ h) + float(D[d] * u[b, d, t])
                gate = float(z[b, d, t])
                y[b, d, t] = out * gate / (1 + math.exp(-gate))  # silu
    return y


# ----------------------------------------------------------------------------- scan


def test_selective_scan_equals_naive_recurrence() -> None:
    x = scan_inputs()
    y = selective_scan(**x, delta_softplus=True)
    assert y.shape == x["u"].shape and y.dtype == torch.float64
    torch.testing.assert_close(y, naive_recurrence(**x), rtol=1e-6, atol=1e-6)


def test_selective_scan_equals_mamba_ssm_reference() -> None:
    ops = pytest.importorskip(
        "mamba_ssm.ops.selective_scan_interface",
        reason="mamba-ssm (the `cuda` extra) is not installed here; its selective_scan_ref "
        "is the reference when it is",
    )
    x = {k: v.float() for k, v in scan_inputs(length=33, state=16).items()}
    expected = ops.selective_scan_ref(**x, delta_softplus=True)
    torch.testing.assert_close(selective_scan(**x, delta_softplus=True), expected)


@pytest.mark.skipif(
    not torch.cuda.is_available() or cuda_selective_scan() is None,
    reason="needs a GPU and mamba-ssm's CUDA kernels to compare both paths",
)
def test_cuda_kernels_match_pytorch_path() -> None:
    torch.manual_seed(0)
    mixer = Mamba(64).cuda()
    x = torch.randn(2, 40, 64, device="cuda")
    fused = mixer(x)
    mixer.use_cuda_kernels = False
    torch.testing.assert_close(fused, mixer(x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- mixer


def test_mamba_parameters_are_named_and_sized_like_mamba_ssm() -> None:
    with torch.device("meta"):
        mixer = Mamba(768)  # expand 1, d_state 16, d_conv 4, dt_rank ceil(768/16) = 48
    shapes = {name: tuple(p.shape) for name, p in mixer.named_parameters()}
    assert shapes == {
        "in_proj.weight": (1536, 768),
        "conv1d.weight": (768, 1, 4),
        "conv1d.bias": (768,),
        "x_proj.weight": (48 + 2 * 16, 768),
        "dt_proj.weight": (768, 48),
        "dt_proj.bias": (768,),
        "A_log": (768, 16),
        "D": (768,),
        "out_proj.weight": (768, 768),
    }


def test_mamba_is_causal_and_initialised_like_mamba_ssm() -> None:
    torch.manual_seed(0)
    mixer = Mamba(32)
    assert torch.allclose(mixer.A_log.exp(), torch.arange(1.0, 17).expand(32, -1))
    dt = F.softplus(mixer.dt_proj.bias)
    assert (dt >= 1e-3 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    x = torch.randn(2, 20, 32)
    y = mixer(x)
    x2 = x.clone()
    x2[:, 12:] = torch.randn(2, 8, 32)
    y2 = mixer(x2)
    torch.testing.assert_close(y2[:, :12], y[:, :12])
    assert not torch.allclose(y2[:, 12:], y[:, 12:])


# ----------------------------------------------------------------------------- geometry


def test_cluster_order_groups_4x4_patches_in_raster_order() -> None:
    order = cluster_order((12, 12), 4)
    assert sorted(order.tolist()) == list(range(144))
    # cluster 0: rows 0-3 x cols 0-3, raster inside
    assert order[:16].tolist() == [r * 12 + c for r in range(4) for c in range(4)]
    assert order[16].item() == 4  # cluster 1 starts at row 0, col 4
    assert order[3 * 16].item() == 4 * 12  # cluster 3 starts at row 4, col 0
    assert order[-1].item() == 143


def test_cluster_mask_is_causal_over_clusters() -> None:
    mask = cluster_causal_mask(8, 16)  # queries for clusters 1..8 x encoder clusters 0..7
    assert mask.shape == (128, 128) and mask.dtype == torch.bool
    assert mask[0, :16].all() and not mask[0, 16:].any()  # cluster 1 sees cluster 0 only
    assert mask[3 * 16 + 5, 3 * 16 + 15] and not mask[3 * 16 + 5, 4 * 16]  # 4 sees 0..3
    assert mask[16 * 2 - 1, 16] and not mask[16 * 2 - 1, 32]
    assert mask[-1].all()  # cluster 8 sees 0..7
    assert mask.sum() == 16 * 16 * sum(range(1, 9))


def test_prediction_of_a_cluster_ignores_that_cluster_and_later_ones() -> None:
    """End to end: changing cluster j of the image changes no prediction of clusters <= j."""
    model = arg_model(192).eval()
    images = torch.randn(1, 1, 192, 192)
    changed = images.clone()
    changed[..., 64:128, 0:64] += 1.0  # cluster 3 (row 1, col 0 of the 3x3 clusters)
    with torch.no_grad():
        _, pred = model(images)
        _, pred2 = model(changed)
    t = 16
    # targets are clusters 1..8: rows 0..2*t-1 predict clusters 1-2, 2*t..3*t-1 cluster 3
    torch.testing.assert_close(pred2[:, : 3 * t], pred[:, : 3 * t])
    assert not torch.allclose(pred2[:, 3 * t :], pred[:, 3 * t :])


# ----------------------------------------------------------------------------- stage 1


def test_arg_shapes_and_encoder_protocol() -> None:
    model = arg_model(192, in_chans=3)
    images = torch.randn(2, 3, 192, 192)
    features = model.forward_encoder(images)
    assert len(features) == 4 and all(f.shape == (2, 8 * 16, 64) for f in features)
    pred = model.forward_decoder(features)
    assert pred.shape == (2, 8 * 16, 16 * 16 * 3)
    assert model.targets(images).shape == pred.shape
    enc = model.encoder
    assert (enc.num_prefix_tokens, enc.embed_dim, enc.patch_size, enc.in_chans) == (0, 64, 16, 3)
    tokens = enc(images)
    assert tokens.shape == (2, 144, 64)
    # raster output = the cluster-ordered features put back in place
    order = cluster_order((12, 12), 4)
    torch.testing.assert_close(tokens[:, order[:128]], features[-1], rtol=1e-5, atol=1e-5)
    assert model.decoder.pred.out_features == 16 * 16 * 3  # from in_chans, not hard-coded


def test_arg_objective_trains_and_draws() -> None:
    model = arg_model(128)  # the smoke size: 2x2 clusters, predicts 3 of them
    objective = build_arg(ARGObjectiveConfig(), model=model)
    batch = {"image": torch.randn(4, 1, 128, 128)}
    opt = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = objective(batch)
        assert list(out) == ["loss"]
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0], losses
    picture = objective.reconstruct(batch["image"])
    assert picture["reconstruction"].shape == (4, 1, 128, 128)
    assert picture["mask"][:, :, :64, :64].sum() == 0  # cluster 0 is given, not predicted
    assert picture["mask"][:, :, 64:, 64:].min() == 1


def test_image_size_must_fit_clusters() -> None:
    for bad in (160, 64, 100):
        with pytest.raises(ConfigError) as err:
            arg_model(bad)
        assert err.value.key == "data.resolution"
    with pytest.raises(ConfigError) as err:
        from_dict(VisionMambaARGConfig, {"flavor": "tiny", "depth": 3}, "model")
    assert err.value.key == "model.feature_layers"
    with pytest.raises(TypeError):
        build_arg(ARGObjectiveConfig(), model=torch.nn.Linear(2, 2))


def mamba_params(d: int, *, directions: int, expand: int = 1, n: int = 16, k: int = 4) -> int:
    """A Mamba mixer of width d (inner di = expand * d, dt rank r = ceil(d/16), state n,
    conv k): in_proj d x 2di and out_proj di x d (no biases) shared by every direction;
    per direction conv1d (depthwise di x k + bias di), x_proj di x (r + 2n), dt_proj
    r x di + bias di, A_log di x n and D di."""
    di, r = expand * d, math.ceil(d / 16)
    direction = (di * k + di) + di * (r + 2 * n) + (r * di + di) + di * n + di
    return d * 2 * di + di * d + directions * direction


def swiglu_params(d: int) -> int:
    """w1, w2: d -> h and w3: h -> d, with biases; h = floor(8d/3)."""
    h = d * 8 // 3
    return 2 * (d * h + h) + (h * d + d)


def block_params(d: int, directions: int) -> int:
    """norm1 + mixer + norm2 + SwiGLU; each LayerNorm is weight + bias (2d)."""
    return 2 * d + mamba_params(d, directions=directions) + 2 * d + swiglu_params(d)


def expected_encoder_params(d: int, depth: int, in_chans: int = 3, p: int = 16) -> int:
    """Stage 1: blocks, the patch embedding (C·p·p x d + bias) and 4 feature LayerNorms."""
    return depth * block_params(d, 1) + (in_chans * p * p * d + d) + 4 * 2 * d


@pytest.mark.parametrize(
    ("flavor", "dim", "depth", "layers"),
    [("base", 768, 12, (6, 8, 10, 12)), ("large", 1024, 24, (12, 16, 20, 24))],
)
def test_paper_flavors_on_meta_device(flavor, dim, depth, layers) -> None:
    cfg = from_dict(VisionMambaARGConfig, {"flavor": flavor}, "model")
    with torch.device("meta"):
        model = build_vision_mamba_arg(cfg, image_size=192, in_chans=3)
    assert all(p.is_meta for p in model.parameters())
    counts = count_parameters(model)
    assert counts["encoder"] == expected_encoder_params(dim, depth)
    e = 512
    block = 3 * 2 * e + (e * e + e) + (e * 2 * e + 2 * e) + (e * e + e) + 2 * e * 4 * e + 4 * e + e
    decoder = (4 * dim * 4 * e + 4 * e) + 4 * block + e + 2 * e + (e * 768 + 768)
    assert counts["decoder"] == decoder
    assert counts["total"] == counts["encoder"] + counts["decoder"]
    assert model.encoder.feature_layers == layers
    assert model.encoder.layers[0].mlp.w1.out_features == dim * 8 // 3
    assert model.encoder.layers[0].mixer.dt_rank == math.ceil(dim / 16)
    assert len(model.decoder.blocks) == 4 and model.decoder.blocks[0].num_heads == 8
    print(f"\n{flavor}: {counts}")  # for the record: pytest -s


@pytest.mark.parametrize(
    ("path", "flavor", "batch"), [(EXPERIMENT, "base", 2048), (EXPERIMENT_LARGE, "large", 1024)]
)
def test_stage1_files_give_the_papers_schedule(path, flavor, batch) -> None:
    """Per flavor, ARM README's global batch and lr = 1.5e-4 x batch / 256; steps for 101
    epochs (5 of warmup, the official pretrain.sh) of CXPMRG-Bench's 1.27M images."""
    from raydiology.config import load_experiment

    exp = load_experiment(path)
    train, images = exp.train, 1_270_000
    assert exp.model.config.flavor == flavor and exp.scaling.num_workers == 8
    assert train.micro_batch_size * train.grad_accum * exp.scaling.num_workers == batch
    assert train.max_steps == math.ceil(101 * images / batch)
    assert train.schedule.warmup_steps == round(5 * images / batch)
    assert train.optimizer.lr == pytest.approx(1.5e-4 * batch / 256)
    assert (exp.data.resolution, train.grad_clip, train.schedule.min_lr) == (192, 3.0, 0.0)
    assert train.optimizer.betas == (0.9, 0.95) and train.optimizer.weight_decay == 0.05
    with torch.device("meta"):
        model = build_vision_mamba_arg(exp.model.config, image_size=192, in_chans=3)
    assert len(model.encoder.layers) == {"base": 12, "large": 24}[flavor]


# ----------------------------------------------------------------------------- stages 2-3


def test_column_order_with_cls_in_the_middle() -> None:
    perm = column_order_with_middle_cls((2, 3))  # patches 0..5, CLS at sequence index 3
    # row-major sequence: p0 p1 p2 CLS p3 p4 p5; columns: p0 p3 p1 | CLS | p4 p2 p5
    assert perm.tolist() == [0, 4, 1, 3, 5, 2, 6]


def test_4_direction_mixer_is_the_mean_of_four_scans() -> None:
    torch.manual_seed(0)
    uni = Mamba(16)
    four = Mamba4D(16)
    four.load_unidirectional(uni.state_dict())
    for suffix in four.BRANCHES:
        assert torch.equal(getattr(four, f"A{suffix}_log"), uni.A_log)
        assert torch.equal(getattr(four, f"x_proj{suffix}").weight, uni.x_proj.weight)
    x = torch.randn(2, 7, 16)
    perm = column_order_with_middle_cls((2, 3))
    inv = torch.argsort(perm)
    expected = (
        uni(x)
        + uni(x.flip(1)).flip(1)
        + uni(x[:, perm])[:, inv]
        + uni(x[:, perm].flip(1)).flip(1)[:, inv]
    ) / 4
    torch.testing.assert_close(four(x, column_order=perm), expected, rtol=1e-5, atol=1e-5)


def test_bidirectional_encoder_from_stage1() -> None:
    stage1 = arg_model(192).encoder  # 12x12 patches
    state = {k: v.clone() for k, v in stage1.state_dict().items()}
    state["pos_embed"] = torch.full_like(state["pos_embed"], 0.5)  # a constant survives resizing
    for k in [k for k in state if k.startswith("feature_norms.")]:
        state[k] = torch.full_like(state[k], 3.0)  # stage 1's feature norms are not carried over
    cfg = from_dict(VisionMambaConfig, {"flavor": "tiny"}, "model")
    encoder = build_vision_mamba(cfg, image_size=224, in_chans=1).encoder  # 14x14
    with torch.no_grad():  # whatever CLS and the final norm held, they start afresh
        encoder.cls_token.fill_(7.0)
        encoder.norm.weight.fill_(5.0)
        encoder.norm.bias.fill_(5.0)
    init_from_arg(encoder, state)

    assert encoder.pos_embed.shape == (1, 197, 64) and encoder.cls_index == 98
    assert torch.all(encoder.pos_embed[0, 98] == 0)
    # ARM's fine-tune init: CLS ~ N(0, 0.02), a new LayerNorm (weight 1, bias 0)
    cls = encoder.cls_token.detach()
    assert 0.01 < float(cls.std()) < 0.03 and float(cls.abs().max()) < 0.1
    assert torch.equal(encoder.norm.weight, torch.ones(64))
    assert torch.equal(encoder.norm.bias, torch.zeros(64))
    others = torch.cat([encoder.pos_embed[0, :98], encoder.pos_embed[0, 99:]])
    torch.testing.assert_close(others, torch.full_like(others, 0.5))
    for i, block in enumerate(encoder.layers):
        src = stage1.layers[i]
        for suffix in Mamba4D.BRANCHES:
            assert torch.equal(
                getattr(block.mixer, f"conv1d{suffix}").weight, src.mixer.conv1d.weight
            )
            assert torch.equal(
                getattr(block.mixer, f"dt_proj{suffix}").bias, src.mixer.dt_proj.bias
            )
            assert torch.equal(getattr(block.mixer, f"D{suffix}"), src.mixer.D)
        assert torch.equal(block.mixer.in_proj.weight, src.mixer.in_proj.weight)
        assert torch.equal(block.mlp.w3.weight, src.mlp.w3.weight)
    assert torch.equal(encoder.patch_embed.proj.weight, stage1.patch_embed.proj.weight)

    # the real sin-cos table is resized bicubically to 14x14
    init_from_arg(encoder, stage1.state_dict())
    src = stage1.pos_embed[0].t().reshape(1, 64, 12, 12)
    resized = F.interpolate(src, size=(14, 14), mode="bicubic", align_corners=False)
    torch.testing.assert_close(encoder.pos_embed[0, :98], resized.reshape(64, -1).t()[:98])

    tokens = encoder(torch.randn(2, 1, 224, 224))
    assert tokens.shape == (2, 197, 64) and encoder.num_prefix_tokens == 1


def test_bidirectional_cls_sees_the_whole_image() -> None:
    torch.manual_seed(0)
    cfg = from_dict(VisionMambaConfig, {"flavor": "tiny"}, "model")
    encoder = build_vision_mamba(cfg, image_size=64, in_chans=1).encoder.eval()
    images = torch.randn(1, 1, 64, 64)
    changed = images.clone()
    changed[..., :16, :16] += 1.0  # the first patch, far before CLS in every scan order
    with torch.no_grad():
        assert not torch.allclose(encoder(images)[:, 0], encoder(changed)[:, 0])
        changed = images.clone()
        changed[..., -16:, -16:] += 1.0  # and the last
        assert not torch.allclose(encoder(images)[:, 0], encoder(changed)[:, 0])


@pytest.mark.parametrize(("flavor", "d", "depth"), [("base", 768, 12), ("large", 1024, 24)])
def test_bidirectional_paper_flavors_on_meta_device(flavor, d, depth) -> None:
    """The 4-direction encoder at 224 px, 3 channels, 16-px patches (N = 196 patches):
    depth x (2 LayerNorms + a 4-direction Mamba mixer + SwiGLU) + patch embedding
    (3·16·16 x d + d) + CLS (d) + learned positions ((N+1) x d) + final LayerNorm (2d);
    no head (VisionMamba holds the encoder alone)."""
    cfg = from_dict(VisionMambaConfig, {"flavor": flavor}, "model")
    with torch.device("meta"):
        model = build_vision_mamba(cfg, image_size=224, in_chans=3)
    counts = count_parameters(model)
    n = (224 // 16) ** 2
    want = depth * block_params(d, 4) + (3 * 16 * 16 * d + d) + d + (n + 1) * d + 2 * d
    assert counts["total"] == counts["encoder"] == want
    mixer = model.encoder.layers[0].mixer
    assert sum(p.numel() for p in mixer.parameters()) == mamba_params(d, directions=4)
    print(f"\nvision_mamba {flavor}: {counts}")


# ----------------------------------------------------------------------------- training


@pytest.mark.ray
def test_smoke_run_trains_exports_and_seeds_stage2(ray_cluster, tmp_path) -> None:
    from rich.console import Console

    import raydiology
    from raydiology.config import load_experiment
    from raydiology.train.launch import read_metrics, run_experiment

    exp = load_experiment(
        EXPERIMENT,
        profile="smoke",
        # one micro-batch a step and 16 steps: the smoke profile's path, in less time
        overrides=[
            f"output.dir={tmp_path}",
            "train.grad_accum=1",
            "train.max_steps=16",
            "train.checkpoint_every=16",
        ],
    )
    assert exp.data.resolution == 128 and exp.model.config.flavor == "tiny"
    result = run_experiment(exp, console=Console(quiet=True))

    losses = [r["loss"] for r in read_metrics(result.run_dir)]
    print(f"\nsmoke losses: {losses}")
    assert len(losses) >= 4, losses
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, f"loss did not go down: {losses}"
    assert result.export is not None and (result.run_dir / "reconstruction.png").is_file()

    encoder = raydiology.load_encoder(result.export)
    spec = json.loads((Path(result.export) / "encoder.json").read_text())
    assert spec["model"]["name"] == "vision_mamba_arg" and spec["in_chans"] == 3
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        tokens = encoder(images)
    assert tokens.shape == (2, 64, 64) and encoder.num_prefix_tokens == 0

    # the export seeds the stages 2-3 encoder (tiny, 3 channels, 192 px -> 12x12 from 8x8)
    cfg = from_dict(VisionMambaConfig, {"flavor": "tiny", "init_from": str(result.export)}, "model")
    stage2 = build_vision_mamba(cfg, image_size=192, in_chans=3).encoder
    assert torch.equal(
        stage2.layers[0].mixer.x_proj_c_b.weight, encoder.layers[0].mixer.x_proj.weight
    )
    assert stage2(torch.randn(1, 3, 192, 192)).shape == (1, 145, 64)

"""HD-MAE model and the MAE objective: shapes, loss semantics, sizes of the paper model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raydiology.config_base import ConfigError, from_dict
from raydiology.models import count_parameters
from raydiology.models.hd_mae import (
    HD_MAE_FLAVORS,
    HDMAEConfig,
    MaskedAutoencoder,
    build_hd_mae,
    hd_mae_patch_size,
)
from raydiology.models.vit import patchify, sincos_pos_embed_2d, unpatchify
from raydiology.objectives.mae import MAEObjective, MAEObjectiveConfig, build_mae
from raydiology.objectives.masking import MaskingConfig

SIZE = 128  # tiny flavor: 16-px patches -> 8x8 grid; default region -> 1 + 6 = 7 visible


def _tiny(in_chans: int = 1, **overrides) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return build_hd_mae(HDMAEConfig(flavor="tiny", **overrides), image_size=SIZE, in_chans=in_chans)


def _objective(model: MaskedAutoencoder, **cfg) -> MAEObjective:
    return build_mae(MAEObjectiveConfig(**cfg), model=model)


def _images(b: int = 4, c: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- building blocks ---------------------------------------------------------------------


def test_patchify_round_trip_and_layout() -> None:
    x = torch.randn(2, 3, 32, 48)
    patches = patchify(x, 16)
    assert patches.shape == (2, 6, 16 * 16 * 3)
    # patch 4 is grid row 1, column 1; its first entries are pixel (16, 16), channels last
    assert torch.equal(patches[:, 4, :3], x[:, :, 16, 16])
    assert torch.equal(unpatchify(patches, 16, (2, 3), 3), x)


def test_sincos_table() -> None:
    table = sincos_pos_embed_2d(64, 3, 5)
    assert table.shape == (1 + 15, 64) and table.dtype == torch.float32
    assert torch.count_nonzero(table[0]) == 0  # CLS slot
    assert torch.equal(table[1:, 32:][[0, 5]], table[1:, 32:][[0, 0]])  # same column, same half
    assert sincos_pos_embed_2d(64, 3, 5, cls=False).shape == (15, 64)
    assert len({tuple(r.tolist()) for r in table[1:]}) == 15  # every patch distinct


# --- the model ---------------------------------------------------------------------------


@pytest.mark.parametrize("in_chans", [1, 3])
def test_output_shapes(in_chans: int) -> None:
    model = _tiny(in_chans)
    obj = _objective(model)
    images = _images(c=in_chans)
    m = obj.masking(4, generator=_gen())
    latent = model.forward_encoder(images, m.ids_keep)
    assert latent.shape == (4, 1 + 7, 64)
    pred = model.forward_decoder(latent, m.ids_restore)
    assert pred.shape == (4, 64, 16 * 16 * in_chans)
    out = obj({"image": images}, generator=_gen())
    assert next(iter(out)) == "loss" and out["loss"].ndim == 0 and out["loss"].requires_grad
    assert out["visible_tokens"].item() == 7
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    # the encoder alone (as exported) embeds all patches
    assert model.encoder(images).shape == (4, 1 + 64, 64)


def test_loss_counts_only_masked_patches() -> None:
    model = _tiny()
    images = _images()
    m = _objective(model).masking(4, generator=_gen())
    pred = torch.randn(4, 64, 256)
    visible = int(torch.nonzero(m.mask[0] == 0)[0])
    masked = int(torch.nonzero(m.mask[0] == 1)[0])
    for norm in (False, True):
        base = model.forward_loss(images, pred, m.mask, norm_pix_loss=norm)
        for patch, should_change in ((visible, False), (masked, True)):
            changed = patchify(images, 16)
            changed[0, patch] = torch.linspace(-5, 5, 256)
            changed = unpatchify(changed, 16, (8, 8), 1)
            loss = model.forward_loss(changed, pred, m.mask, norm_pix_loss=norm)
            assert (loss != base) == should_change, (norm, patch)


def test_norm_pix_loss_targets_standardised_patches() -> None:
    model = _tiny()
    images = _images() * 3 + 1
    m = _objective(model).masking(4, generator=_gen())
    target = patchify(images, 16)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert model.forward_loss(images, normed, m.mask, norm_pix_loss=True) < 1e-8
    assert model.forward_loss(images, normed, m.mask, norm_pix_loss=False) > 1.0
    # and the objective runs with it, reconstructing in pixel units
    obj = _objective(model, norm_pix_loss=True)
    assert torch.isfinite(obj({"image": images})["loss"])
    rec = obj.reconstruct(images, generator=_gen())
    assert rec["reconstruction"].shape == images.shape


def test_encoder_sees_only_visible_tokens() -> None:
    model = _tiny()
    lengths: list[int] = []
    model.encoder.blocks[0].register_forward_hook(
        lambda mod, args, out: lengths.append(args[0].shape[1])
    )
    _objective(model)({"image": _images()})
    assert lengths == [1 + 7]


def _embed_all_then_keep(encoder, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """The encoder as it ran before: every patch embedded, then the visible ones kept."""
    x = encoder.patch_embed(images) + encoder.pos_embed[:, 1:]  # [B, N, D]
    x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))  # [B, K, D]
    cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for block in encoder.blocks:
        x = block(x)
    return encoder.norm(x)


@pytest.mark.parametrize("patch_embed", ["conv_stack", "linear"])
def test_visible_only_embedding_equals_embedding_everything(patch_embed: str) -> None:
    model = _tiny(in_chans=2, patch_embed=patch_embed)
    # random masking: kept ids in shuffled order, not sorted, and different per image
    m = _objective(model, masking=MaskingConfig(strategy="random", ratio=0.75)).masking(
        4, generator=_gen()
    )
    images = _images(c=2).requires_grad_()
    got = model.encoder(images, m.ids_keep)
    weights = torch.randn(got.shape, generator=_gen(1))
    (got * weights).sum().backward()
    got_grads = [p.grad.clone() for p in model.encoder.parameters()]
    got_image_grad = images.grad.clone()
    model.encoder.zero_grad()
    images.grad = None
    want = _embed_all_then_keep(model.encoder, images, m.ids_keep)
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.encoder.parameters(), got_grads, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_image_grad, images.grad, rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(images.grad) < images.numel()  # masked pixels get no gradient


def test_masked_patches_are_never_embedded() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    model = _tiny()
    m = _objective(model).masking(4, generator=_gen())  # 7 of 64 patches visible

    def embed_flops(ids_keep):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model.encoder(_images(), ids_keep)
        return sum(counter.get_flop_counts()["ViTEncoder.patch_embed"].values())

    full = embed_flops(None)
    assert embed_flops(m.ids_keep) == full * 7 // 64


def test_a_few_steps_reduce_the_loss() -> None:
    model = _tiny()
    obj = _objective(model)
    batch = {"image": _images()}
    opt = torch.optim.AdamW(obj.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = obj(batch, generator=_gen(3))["loss"]  # same masks every step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.95, losses


def test_bf16_model_and_images() -> None:
    obj = _objective(_tiny()).to(torch.bfloat16)
    out = obj({"image": _images().to(torch.bfloat16)})
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()


def test_reconstruct() -> None:
    model = _tiny()
    obj = _objective(model)
    images = _images()
    rec = obj.reconstruct(images, generator=_gen())
    for name in ("masked", "reconstruction", "prediction"):
        assert rec[name].shape == images.shape
    mask = rec["mask"].expand_as(images).bool()
    assert rec["mask"].shape == (4, 1, SIZE, SIZE)
    assert torch.equal(rec["reconstruction"][~mask], images[~mask])  # visible pasted back
    assert torch.equal(rec["reconstruction"][mask], rec["prediction"][mask])
    assert rec["masked"][mask].abs().sum() == 0
    assert mask.float().mean().item() == pytest.approx(57 / 64)


def test_masked_errors_against_the_image_mean() -> None:
    from raydiology.train.export import masked_errors

    images = _images()
    mask = _objective(_tiny()).reconstruct(images, generator=_gen())["mask"]
    assert masked_errors(images, images, mask)["picture_masked_mse"] == 0.0
    # filling the masked pixels with each image's mean there scores exactly the baseline
    m = mask.expand_as(images)
    means = (images * m).sum(dim=(1, 2, 3), keepdim=True) / m.sum(dim=(1, 2, 3), keepdim=True)
    errors = masked_errors(images, means.expand_as(images), mask)
    assert errors["picture_masked_mse"] == pytest.approx(errors["picture_mean_mse"], rel=1e-5)
    assert errors["picture_mean_mse"] > 0


def test_per_image_region_from_batch() -> None:
    obj = _objective(_tiny(), masking=MaskingConfig(region_column="chest_box"))
    region = torch.zeros(4, 8, 8, dtype=torch.bool)
    region[:, 1:7, 1:7] = True
    assert torch.isfinite(obj({"image": _images(), "region": region})["loss"])
    with pytest.raises(KeyError, match="region"):
        obj({"image": _images()})


def test_build_mae_rejects_other_models() -> None:
    with pytest.raises(TypeError, match="MaskedAutoencoder-like"):
        build_mae(MAEObjectiveConfig(), model=nn.Linear(2, 2))


# --- config ------------------------------------------------------------------------------


def test_config_resolution_and_validation() -> None:
    cfg = from_dict(HDMAEConfig, {"flavor": "base", "depth": 6}, "model")
    r = cfg.resolved()
    assert (r["patch_size"], r["embed_dim"], r["depth"], r["decoder_depth"]) == (64, 768, 6, 8)
    assert hd_mae_patch_size(cfg) == 64
    assert hd_mae_patch_size(HDMAEConfig(flavor="tiny", patch_size=32)) == 32

    with pytest.raises(ConfigError) as err:
        from_dict(HDMAEConfig, {"flavor": "huge"}, "model")
    assert err.value.key == "model.flavor"
    assert all(name in str(err.value) for name in HD_MAE_FLAVORS)
    for bad, key in (
        ({"depth": 0}, "model.depth"),
        ({"flavor": "tiny", "num_heads": 3}, "model.num_heads"),
        ({"flavor": "tiny", "patch_size": 10}, "model.patch_size"),
        ({"patch_embed": "mlp"}, "model.patch_embed"),
    ):
        with pytest.raises(ConfigError) as err:
            from_dict(HDMAEConfig, bad, "model")
        assert err.value.key == key
    # a linear embedding takes any patch size
    assert from_dict(HDMAEConfig, {"patch_embed": "linear", "patch_size": 10}, "model")

    with pytest.raises(ConfigError) as err:
        build_hd_mae(HDMAEConfig(flavor="tiny"), image_size=100, in_chans=1)
    assert err.value.key == "data.resolution" and "16" in err.value.allowed


# --- the paper-sized model on the meta device --------------------------------------------


def _block_params(d: int, mlp_ratio: int = 4) -> int:
    h = mlp_ratio * d
    qkv = d * 3 * d + 3 * d
    proj = d * d + d
    mlp = d * h + h + h * d + d
    norms = 2 * (2 * d)
    return qkv + proj + mlp + norms  # = 12·d² + 13·d at ratio 4


def test_large_flavor_parameter_counts_on_meta() -> None:
    c, p, d, depth = 1, 64, 1024, 24
    e, dec_depth = 512, 8
    n = (1280 // p) ** 2

    conv_stack = (c * d * (p // 4) ** 2 + d) + (d * d * 4 * 4 + d) + (d * d + d)
    encoder = conv_stack + d + depth * _block_params(d) + 2 * d  # + CLS token + final norm
    decoder = (
        (d * e + e)  # decoder_embed
        + e  # mask token
        + dec_depth * _block_params(e)
        + 2 * e  # norm
        + (e * p * p * c + p * p * c)  # prediction head
    )
    assert _block_params(d) == 12 * d * d + 13 * d
    assert (encoder, decoder) == (320_403_456, 27_846_656)

    with torch.device("meta"):
        model = build_hd_mae(HDMAEConfig(flavor="large"), image_size=1280, in_chans=c)
    counts = count_parameters(model)
    assert counts == {"encoder": encoder, "decoder": decoder, "total": encoder + decoder}
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    # fixed positions are persistent buffers: saved, not trained, not counted
    state = model.state_dict()
    assert state["encoder.pos_embed"].shape == (1, 1 + n, d)
    assert state["decoder.decoder_pos_embed"].shape == (1, 1 + n, e)
    assert "encoder.pos_embed" not in dict(model.named_parameters())


def test_linear_patch_embed_count() -> None:
    with torch.device("meta"):
        conv = build_hd_mae(HDMAEConfig(), image_size=1280, in_chans=1)
        lin = build_hd_mae(HDMAEConfig(patch_embed="linear"), image_size=1280, in_chans=1)
    d, p = 1024, 64
    stack = (d * 16 * 16 + d) + (d * d * 16 + d) + (d * d + d)
    assert count_parameters(conv)["encoder"] - count_parameters(lin)["encoder"] == stack - (
        d * p * p + d
    )


def test_meta_build_then_materialise() -> None:
    with torch.device("meta"):
        model = build_hd_mae(HDMAEConfig(flavor="tiny"), image_size=SIZE, in_chans=1)
    model.to_empty(device="cpu")
    model.init_weights()
    reference = _tiny()
    assert torch.equal(model.encoder.pos_embed, reference.encoder.pos_embed)
    assert torch.equal(model.decoder.decoder_pos_embed, reference.decoder.decoder_pos_embed)
    assert torch.isfinite(_objective(model)({"image": _images()})["loss"])


# --- the paper's recipe ------------------------------------------------------------------


def test_paper_experiment_runs_the_papers_recipe() -> None:
    import math
    from pathlib import Path

    from raydiology.cluster.presets import load_preset
    from raydiology.config import load_experiment

    experiments = Path(__file__).resolve().parents[1] / "experiments"
    cam = load_experiment(experiments / "hd_mae_cam.yaml")
    train = cam.train
    for preset in ("a800", "a100"):  # 8 GPUs: accumulation makes up the paper's batch
        workers = load_preset(preset).scaling["num_workers"]
        assert train.micro_batch_size * workers * train.grad_accum == 1024
    assert cam.scaling.num_workers * train.micro_batch_size * train.grad_accum == 1024
    assert train.max_steps == math.ceil(83 * 1_050_000 / 1024)  # 83 epochs of ~1.05 M images
    assert train.optimizer.lr == pytest.approx(2.5e-4 * 1024 / 256)  # linear scaling rule
    assert train.schedule.warmup_steps == math.ceil(10 * 1_050_000 / 1024)  # 10 epochs
    # the random-masking ablation trains with the same recipe; smoke runs stay one pass a step
    assert load_experiment(experiments / "hd_mae_random.yaml").train == train
    assert load_experiment(experiments / "hd_mae_cam.yaml", profile="smoke").train.grad_accum == 1

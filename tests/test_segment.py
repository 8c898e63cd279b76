"""Frozen-encoder segmentation: dense features of any export, the decoders, Dice, the joint
augmentation and `raydiology evaluate segment` end to end on phantom masks.

No test claims that a trained export beats random initialisation: none does on phantoms,
and the phantoms cannot show it. Measured by tests/margin_figures.py (160 phantoms at 128 px;
linear decoder, BatchNorm + 1x1 conv on the last layer, lr 1e-3, no augmentation; 3 decoder
seeds, each against a differently seeded random export of the same experiment and profile),
mean test Dice per seed:
- HD-MAE after the README's quickstart run (800 steps, masked MSE 0.039): 0.440 0.434 0.436;
  random: 0.486 0.501 0.484 (random wins on lungs, heart and clavicles; 5-7 px lesions near 0);
- DINOv2, quickstart profile with 400 steps: 0.287 0.293 0.289; random: 0.312 0.307 0.295;
- `--baselines`' "position", a one-hot of the patch's grid place, the same for every image:
  0.541 0.541 0.538, above every encoder. The phantoms' anatomy sits in nearly the same place
  in every film, so a patch-level decoder scores by location, and features that carry their
  position (a random ViT: 92 % of its patch features' variance is positional) score higher
  than features that carry content (trained HD-MAE: 22 %).
UPerNet (one seed, 400 steps) 0.644 trained, 0.641 random; with XR-0's augmentations (linear,
1500 steps) trained 0.430, random 0.478, position 0.535. A margin test would fail.

Phantoms without the location shortcut do not change this (`corpus phantom --pose 5
--lesion-scale 3`: anatomy shifted, scaled 0.5-1 and tilted up to 15 degrees; `margin_figures.py
... --pose 5 --lesion-scale 3`, 2 seeds). Position-only falls to 0.326 0.329, below random;
the trained encoders stay at or below random:
- HD-MAE random 0.399 0.410; quickstart on the default phantoms 0.394 0.395; quickstart on
  pose-5 phantoms (`--set data.phantom.pose=5 --set data.phantom.lesion_scale=3`) 0.363 0.389;
- XR-0 DINOv2, quickstart on pose-5 phantoms (800 steps, loss flat at 8.29 from step 500):
  0.195 0.195, its random 0.201 0.198; EVA-X quickstart on pose-5 phantoms 0.174, its
  random 0.166 (one seed, 600 steps);
- label-scarce, 8 training images (`--seg-train 8`): default-trained 0.338 0.330, pose-trained
  0.209 0.210, random 0.363 0.361;
- longer pretraining moves away from random: HD-MAE 6000 steps on 1024 pose-5 phantoms with
  `objective.norm_pix_loss=true` (loss 0.71 at the end) 0.304 0.263;
- UPerNet on four layers (one seed, 600 steps): EVA-X trained 0.716, its random 0.726.
Our reading, not measured further: the phantoms' structures are told apart by brightness, which
a random encoder passes on (a random patch embedding keeps each patch's pixels), so it reads
them as well as a 16-px grid allows; pretraining of CPU size adds nothing a patch-wise
readout can use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from raydiology.cli import app
from raydiology.evaluation.dense import dense_splits, intermediate_layers, load_dense_encoder
from raydiology.evaluation.segment import (
    JointAugment,
    LinearDecoder,
    SegmentConfig,
    UPerDecoder,
    class_dice,
    dice_loss,
    dice_scores,
    evaluate_dice,
    train_decoder,
)

REPO = Path(__file__).resolve().parents[1]
MASKS = ["mask_lungs", "mask_heart", "mask_clavicles", "mask_lesion"]


def _export(experiment: str, folder: Path, seed: int, *sets: str) -> Path:
    """A smoke-flavour export with random weights (what `raydiology run` exports at step 0)."""
    from raydiology.config import load_experiment
    from raydiology.registry import build_model, build_objective
    from raydiology.train.export import export_encoder

    exp = load_experiment(REPO / "experiments" / experiment, profile="smoke", overrides=list(sets))
    torch.manual_seed(seed)
    objective = build_objective(exp.objective, build_model(exp.model, exp.data))
    export_encoder(objective, folder, exp=exp, corpus_sha256=None, step=0)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small convs run much slower with two intra-op threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    from raydiology.data.phantom import write_phantom_corpus

    root = tmp_path_factory.mktemp("segment")
    write_phantom_corpus(root / "corpus", n=60, size=64, masks=True, progress=False)
    return {
        "corpus": root / "corpus",
        "mae": _export("hd_mae_cam.yaml", root / "mae", 0, "data.resolution=64"),
        "dino": _export("xr0_dinov2.yaml", root / "dino", 0, "data.resolution=64"),
    }


def test_dice_by_hand() -> None:
    truth = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    pred = torch.zeros_like(truth)
    truth[0, 0, :2] = True  # 8 pixels
    pred[0, 0, 1:3] = True  # 8 pixels, 4 shared: Dice 2*4/16
    truth[0, 1] = pred[0, 1] = True  # perfect
    # class 2: empty truth -> no Dice, whatever the prediction
    pred[0, 2, 0, 0] = True
    scores = dice_scores(pred, truth)
    assert scores[0, 0] == pytest.approx(0.5) and scores[0, 1] == 1 and scores[0, 2].isnan()

    logits = torch.where(truth, 20.0, -20.0).float()
    known = torch.tensor([[True, True, False]])
    assert dice_loss(logits, truth, known) < 1e-4  # class 2 is not annotated: left out
    assert dice_loss(-logits, truth, known) > 0.99
    assert dice_loss(-logits, truth, torch.zeros_like(known)) == 0


def test_dice_metric_equals_counting_pixels() -> None:
    """torchmetrics' Dice under our convention equals 2|P & T| / (|P| + |T|) counted pixel by
    pixel on known masks, NaN where the truth is empty, means over annotated images only."""
    gen = torch.Generator().manual_seed(0)
    truth = torch.rand(5, 3, 12, 12, generator=gen) < 0.3
    pred = torch.rand(5, 3, 12, 12, generator=gen) < 0.4
    truth[0, 0] = pred[0, 0] = False  # both empty: no Dice
    truth[1, 1], pred[1, 1] = False, True  # empty truth, a prediction: still no Dice
    pred[2, 2] = False  # a missed structure: Dice 0
    pred[3, 0] = truth[3, 0]  # perfect: Dice 1
    known = torch.ones(5, 3, dtype=torch.bool)
    known[4, 1] = False  # not annotated: left out of the class mean

    counted = np.full((5, 3), np.nan)
    for i in range(5):
        for k in range(3):
            t, p = truth[i, k].numpy(), pred[i, k].numpy()
            if t.sum():
                counted[i, k] = 2 * np.logical_and(t, p).sum() / (t.sum() + p.sum())
    scores = dice_scores(pred, truth).numpy()
    np.testing.assert_allclose(scores, counted, rtol=1e-6)
    assert np.isnan(scores[0, 0]) and np.isnan(scores[1, 1])
    assert scores[2, 2] == 0 and scores[3, 0] == 1
    counted[4, 1] = np.nan
    np.testing.assert_allclose(class_dice(pred, truth, known), np.nanmean(counted, axis=0),
                               rtol=1e-6)  # fmt: skip
    empty = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    assert np.isnan(class_dice(empty, empty, torch.ones(2, 2, dtype=torch.bool))).all()


def test_intermediate_layers_spread_to_the_last_block() -> None:
    assert intermediate_layers(12) == [2, 5, 8, 11]
    assert intermediate_layers(24) == [5, 11, 17, 23]
    assert intermediate_layers(2) == [0, 0, 0, 1]


@pytest.mark.parametrize("name", ["mae", "dino"])
def test_dense_encoder_gives_patch_maps_of_the_export(world, name) -> None:
    import raydiology

    dense = load_dense_encoder(world[name])
    raw = raydiology.load_encoder(world[name])
    x = torch.randn(2, dense.data.channels, 64, 64)
    feats = dense(x)
    gh, gw = dense.grid
    d = dense.embed_dim
    assert feats["last"].shape == (2, d, gh, gw) and len(feats["layers"]) == 4
    assert all(f.shape == (2, d, gh, gw) for f in feats["layers"])
    tokens = raw(x)  # [B, 1 + N, D]: patch (r, c) is token 1 + r * gw + c
    torch.testing.assert_close(feats["last"][:, :, 1, 2], tokens[:, 1 + 1 * gw + 2])
    # the last intermediate map is the last block's output, before the final norm
    torch.testing.assert_close(raw.norm(feats["layers"][-1].flatten(2).transpose(1, 2)),
                               tokens[:, 1:])  # fmt: skip
    assert not any(p.requires_grad for p in dense.parameters())


@pytest.mark.parametrize("tower", ["arg", "bi"])
def test_vision_mamba_layers_are_read_as_raster_maps(tmp_path, tower) -> None:
    """The Vision Mamba blocks see another sequence than the encoder returns (stage 1:
    cluster order; stages 2-3: CLS in the middle): each layer map, put through the
    encoder's final norm, must equal the encoder's output patch for patch."""
    import raydiology

    if tower == "arg":
        folder = _export("mambaxray_vl/stage1_arg.yaml", tmp_path / tower, 0)
    else:  # the 4-direction encoder, as the CLIP image tower of stage 2
        from raydiology.config import load_experiment
        from raydiology.registry import build_model, build_objective
        from raydiology.train.export import export_encoder

        exp = load_experiment(REPO / "experiments/mambaxray_vl/stage2_clip.yaml",
                              profile="clip_smoke", overrides=[
                                  "data.resolution=64", "model.image.timm=null",
                                  "model.image.model.flavor=tiny",
                                  "model.image.model.use_cuda_kernels=false"])  # fmt: skip
        torch.manual_seed(0)
        objective = build_objective(exp.objective, build_model(exp.model, exp.data))
        folder = tmp_path / tower
        export_encoder(objective, folder, exp=exp, corpus_sha256=None, step=0)
    dense = load_dense_encoder(folder)
    raw = raydiology.load_encoder(folder)
    x = torch.randn(2, dense.data.channels, *raw.image_size)
    feats = dense(x)
    with torch.no_grad():
        patches = raw(x)[:, dense.prefix :]
    final_norm = raw.feature_norms[-1] if tower == "arg" else raw.norm
    last_layer = feats["layers"][-1].flatten(2).transpose(1, 2)
    torch.testing.assert_close(final_norm(last_layer), patches)
    torch.testing.assert_close(feats["last"].flatten(2).transpose(1, 2), patches)


def test_timm_encoder_gives_its_layers_through_forward_intermediates(world, tmp_path) -> None:
    """EVA-X's encoder is timm's Eva: its maps come from timm's `forward_intermediates` and
    equal the block outputs read by hooks and the encoder's own output; the registry's
    other ViTs (no such method) keep the hooks."""
    import raydiology

    folder = _export("evax.yaml", tmp_path / "evax", 0, "data.resolution=64",
                     "model.teacher.path=null")  # fmt: skip
    dense = load_dense_encoder(folder)
    assert dense.uses_timm_intermediates and dense.layer_ids == [0, 0, 0, 1]  # depth 2
    assert not load_dense_encoder(world["mae"]).uses_timm_intermediates
    raw = raydiology.load_encoder(folder)
    seen: dict[int, torch.Tensor] = {}
    for i, block in enumerate(raw.blocks):
        block.register_forward_hook(lambda _m, _i, out, i=i: seen.__setitem__(i, out))
    x = torch.randn(2, dense.data.channels, 64, 64, generator=torch.Generator().manual_seed(0))
    feats = dense(x)
    with torch.no_grad():
        tokens = raw(x)
    gh, gw = dense.grid

    def as_map(tokens: torch.Tensor) -> torch.Tensor:  # CLS first, then the patches row-major
        return tokens[:, 1:].transpose(1, 2).reshape(2, -1, gh, gw)

    torch.testing.assert_close(feats["last"], as_map(tokens))
    for got, block in zip(feats["layers"], dense.layer_ids, strict=True):
        torch.testing.assert_close(got, as_map(seen[block]))
    logits = UPerDecoder(dense.embed_dim, 2, channels=8)(feats)
    assert logits.shape == (2, 2, 4 * gh, 4 * gw)


def test_cnn_tower_gives_its_stages_as_a_pyramid(world, tmp_path) -> None:
    """A ResNet image tower (the CLIP smoke profile's resnet10t; MedViLL and R2Gen export the
    same kind) is read as a pyramid: its four stages at strides 4-32 (named by timm's
    `feature_info`), its output map as "last"; UPerNet takes the stages as they are,
    and `evaluate segment` runs on the export."""
    import raydiology
    from raydiology.config import load_experiment
    from raydiology.registry import build_model, build_objective
    from raydiology.train.export import export_encoder

    exp = load_experiment(REPO / "experiments/mambaxray_vl/stage2_clip.yaml",
                          profile="clip_smoke", overrides=["data.resolution=64"])  # fmt: skip
    torch.manual_seed(0)
    objective = build_objective(exp.objective, build_model(exp.model, exp.data))
    folder = tmp_path / "resnet"
    export_encoder(objective, folder, exp=exp, corpus_sha256=None, step=0)
    dense = load_dense_encoder(folder)
    assert dense.pyramid and dense.grid == (2, 2) and dense.layer_dims == [64, 128, 256, 512]
    raw = raydiology.load_encoder(folder)
    stages = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(raw.body, name).register_forward_hook(
            lambda _m, _i, out, name=name: stages.__setitem__(name, out)
        )
    x = torch.randn(2, dense.data.channels, 64, 64, generator=torch.Generator().manual_seed(0))
    feats = dense(x)
    with torch.no_grad():
        tokens = raw(x)
    for got, name in zip(feats["layers"], stages, strict=True):
        torch.testing.assert_close(got, stages[name])
    assert [m.shape[-1] for m in feats["layers"]] == [16, 8, 4, 2]  # strides 4, 8, 16, 32
    torch.testing.assert_close(feats["last"].flatten(2).transpose(1, 2), tokens)
    logits = UPerDecoder(dense.layer_dims, 3, channels=8, pyramid=True)(feats)
    assert logits.shape == (2, 3, 16, 16)

    result = CliRunner().invoke(
        app,
        ["evaluate", "segment", f"resnet={folder}", "--corpus", str(world["corpus"]),
         "--masks", "mask_lungs", "--decoder", "uper", "--no-augment", "--max-steps", "4",
         "--eval-every", "2", "--out", str(tmp_path / "out"), "--device", "cpu"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "out" / "segment.json").read_text())["results"][0]
    assert row["encoder"] == "resnet" and 0 <= row["dice"]["lungs"] <= 1


def test_decoders_map_features_to_class_logits() -> None:
    feats = {"last": torch.randn(2, 16, 4, 4), "layers": [torch.randn(2, 16, 4, 4)] * 4}
    assert LinearDecoder(16, 3)(feats).shape == (2, 3, 4, 4)
    assert UPerDecoder(16, 3, channels=8)(feats).shape == (2, 3, 16, 16)  # stride 4


def test_joint_augment_moves_image_and_mask_together() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    image = torch.zeros(1, 64, 64)
    image[0, 10:30, 5:50] = 1.0
    image[0, 40:60, 40:44] = 1.0
    mask = (image > 0.5).to(torch.uint8).repeat(2, 1, 1)
    augment = JointAugment(64)
    moved = 0
    for _ in range(20):
        out_image, out_mask = augment(image, mask, gen)
        assert out_mask.dtype == torch.uint8 and set(out_mask.unique().tolist()) <= {0, 1}
        agree = ((out_image[0] > 0.5) == out_mask[0].bool()).float().mean()
        assert agree > 0.97 and torch.equal(out_mask[0], out_mask[1])
        moved += int(not torch.equal(out_mask, mask))
    assert moved >= 5  # p 0.5 affine: about half of them moved


def test_decoder_learns_phantom_anatomy_and_keeps_its_best(world) -> None:
    dense = load_dense_encoder(world["mae"])
    splits = dense_splits(world["corpus"], MASKS, 64)
    assert {k: len(v) for k, v in splits.items()} == {"train": 48, "val": 4, "test": 8}
    assert splits["train"].masks.shape[1:] == (4, 64, 64) and splits["train"].known.all()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    cfg = SegmentConfig(augment=False, lr=3e-3, max_steps=600, eval_every=50, patience=100)
    decoder, log = train_decoder(dense, splits, cfg)
    scores = [h["val_dice"] for h in log["history"]]
    assert log["best_val_dice"] == max(scores) and scores[-1] > scores[0]
    assert max(scores) > 0.3  # lungs and heart are learnt from frozen random features
    # the decoder returned is the best one seen, not the last
    best = evaluate_dice(dense, decoder, splits["val"])
    assert float(np.nanmean(best)) == pytest.approx(log["best_val_dice"])
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())  # frozen


def test_cli_segment_writes_json_table_and_picture(world, tmp_path) -> None:
    out = tmp_path / "out"
    for decoder, extra in (("linear", []), ("uper", ["--no-augment"])):
        result = CliRunner().invoke(
            app,
            ["evaluate", "segment", f"mae={world['mae']}", f"dino={world['dino']}",
             "--corpus", str(world["corpus"]), "--masks", "mask_lungs", "--masks", "mask_heart",
             "--decoder", decoder, "--max-steps", "6", "--eval-every", "3", "--lr", "1e-3",
             "--out", str(out / decoder), "--device", "cpu", *extra],
            catch_exceptions=False,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        payload = json.loads((out / decoder / "segment.json").read_text())
        rows = payload["results"]
        assert [r["encoder"] for r in rows] == ["mae", "dino"]
        for r in rows:
            assert r["decoder"] == decoder and r["classes"] == ["lungs", "heart"]
            assert all(0 <= v <= 1 for v in r["dice"].values())
            assert r["steps"] == 6 and r["n"] == {"train": 48, "val": 4, "test": 8}
        table = (out / decoder / "segment.md").read_text()
        assert "| mae | " + decoder in table and "lungs" in table
        assert (out / decoder / "segment.png").stat().st_size > 5000
    refused = CliRunner().invoke(
        app, ["evaluate", "segment", str(world["mae"]), "--corpus", str(world["corpus"]),
              "--masks", "mask_kidney", "--out", str(out)],
    )  # fmt: skip
    assert refused.exit_code == 2 and "mask_kidney" in refused.output

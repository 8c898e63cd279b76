"""Random and context-aware masking: counts, region geometry, determinism, validation."""

from __future__ import annotations

import pytest
import torch

from raydiology.config_base import ConfigError, from_dict, to_dict
from raydiology.objectives.masking import MaskGenerator, MaskingConfig, region_to_grid


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _expected_region(grid: int, rows: range, cols: range) -> torch.Tensor:
    out = torch.zeros(grid, grid, dtype=torch.bool)
    out[rows.start : rows.stop, cols.start : cols.stop] = True
    return out


# Expected rows/columns worked out by hand from the centre rule, (i + 0.5) / g in [lo, hi):
#   20x20: rows 0.3*20=6 .. 0.8*20=16 -> 6..15; cols 0.15*20=3 .. 16 -> 3..15 (the paper's)
#   16x16: rows 4.8 .. 12.8 -> 5..12 (centres 5.5..12.5); cols 2.4 .. 12.8 -> 2..12
#   14x14: rows 4.2 .. 11.2 -> 4..10; cols 2.1 .. 11.2 -> 2..10
@pytest.mark.parametrize(
    ("grid", "rows", "cols"),
    [
        (20, range(6, 16), range(3, 16)),  # 1280 / 64
        (16, range(5, 13), range(2, 13)),  # 512 / 32
        (14, range(4, 11), range(2, 11)),  # 224 / 16
    ],
)
def test_default_region_on_grid(grid: int, rows: range, cols: range) -> None:
    got = region_to_grid(MaskingConfig().region, grid, grid)
    assert got.dtype == torch.bool and got.shape == (grid, grid)
    assert torch.equal(got, _expected_region(grid, rows, cols))


def test_paper_counts_at_1280_over_64() -> None:
    cfg = MaskingConfig()
    gen = MaskGenerator(cfg, (20, 20))
    assert gen.inside is not None and int(gen.inside.sum()) == 130
    assert (gen.num_visible, gen.num_masked) == (46, 354)
    assert gen.overall_ratio == pytest.approx(354 / 400)

    m = gen(8, generator=_gen())
    inside = region_to_grid(cfg.region, 20, 20).reshape(-1)
    assert m.ids_keep.shape == (8, 46) and m.ids_restore.shape == (8, 400)
    assert m.mask.shape == (8, 400) and m.mask.dtype == torch.float32
    for b in range(8):
        masked = m.mask[b].bool()
        assert int(masked.sum()) == 354
        assert int(masked[inside].sum()) == 130 - 6  # 6 visible inside
        assert int(masked[~inside].sum()) == 270 - 40  # 40 visible outside
        # ids_keep names exactly the unmasked patches
        assert set(m.ids_keep[b].tolist()) == set(torch.nonzero(~masked).flatten().tolist())


def test_ids_restore_inverts_the_shuffle() -> None:
    for strategy in ("random", "context_aware"):
        m = MaskGenerator(MaskingConfig(strategy=strategy), (20, 20))(4, generator=_gen(1))
        ids_shuffle = torch.argsort(m.ids_restore, dim=1)
        assert torch.equal(ids_shuffle[:, : m.num_visible], m.ids_keep)
        grid = torch.arange(400).expand(4, -1)
        shuffled = torch.gather(grid, 1, ids_shuffle)
        assert torch.equal(torch.gather(shuffled, 1, m.ids_restore), grid)
        # mask in shuffled order: kept first, then masked
        in_shuffled = torch.gather(m.mask, 1, ids_shuffle)
        assert in_shuffled[:, : m.num_visible].sum() == 0
        assert in_shuffled[:, m.num_visible :].min() == 1


def test_deterministic_under_seed_and_different_across_samples() -> None:
    gen = MaskGenerator(MaskingConfig(), (20, 20))
    a, b = gen(4, generator=_gen(7)), gen(4, generator=_gen(7))
    assert torch.equal(a.ids_keep, b.ids_keep) and torch.equal(a.mask, b.mask)
    c = gen(4, generator=_gen(8))
    assert not torch.equal(a.mask, c.mask)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(a.mask[i], a.mask[j])


def test_random_strategy_keep_count() -> None:
    gen = MaskGenerator(MaskingConfig(strategy="random", ratio=0.75), (14, 14))
    assert gen.num_visible == 49  # int(196 * 0.25)
    m = gen(3, generator=_gen())
    assert m.ids_keep.shape == (3, 49)
    assert torch.equal(m.mask.sum(1), torch.full((3,), 147.0))
    # float error must not drop a patch: 20 * (1 - 0.95) is 0.9999999999999998
    assert MaskGenerator(MaskingConfig(strategy="random", ratio=0.95), (4, 5)).num_visible == 1


def test_per_image_regions_keep_total_fixed() -> None:
    cfg = MaskingConfig()
    gen = MaskGenerator(cfg, (20, 20))
    region = torch.zeros(3, 20, 20, dtype=torch.bool)
    region[0, 6:16, 3:16] = True  # the config region: 6 inside + 40 outside
    region[1, 0:10, 0:10] = True  # 100 inside: int(100 * 0.05) = 5 inside, 41 outside
    region[2] = True  # everything inside: no outside patches, so all 46 come from inside
    m = gen(3, generator=_gen(), region=region)
    flat = region.reshape(3, -1)
    visible_inside = [int(((1 - m.mask[b]).bool() & flat[b]).sum()) for b in range(3)]
    assert visible_inside == [6, 5, 46]
    assert torch.equal(m.mask.sum(1), torch.full((3,), 354.0))
    # [B, N] layout is accepted too
    m2 = gen(3, generator=_gen(), region=flat)
    assert torch.equal(m.mask, m2.mask)


def test_masks_follow_the_requested_device_and_generator() -> None:
    gen = MaskGenerator(MaskingConfig(), (8, 8))
    m = gen(2, device="cpu")
    assert m.mask.device.type == "cpu" and m.ids_keep.dtype == torch.int64


@pytest.mark.parametrize(
    ("data", "bad_key"),
    [
        ({"inside_ratio": 1.0}, "objective.masking.inside_ratio"),
        ({"outside_ratio": -0.1}, "objective.masking.outside_ratio"),
        ({"ratio": 1.5}, "objective.masking.ratio"),
        ({"region": [0.8, 0.1, 0.3, 0.9]}, "objective.masking.region"),
        ({"region": [0.1, 0.1, 0.9, 1.2]}, "objective.masking.region"),
        ({"strategy": "blocky"}, "objective.masking.strategy"),
        ({"inside_ratios": 0.9}, "objective.masking.inside_ratios"),
    ],
)
def test_validation_names_the_key(data: dict, bad_key: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(MaskingConfig, data, "objective.masking")
    assert err.value.key == bad_key
    assert bad_key in str(err.value)


def test_no_visible_patch_is_an_error() -> None:
    cfg = from_dict(MaskingConfig, {"strategy": "random", "ratio": 0.99}, "objective.masking")
    with pytest.raises(ConfigError) as err:
        MaskGenerator(cfg, (4, 4))
    assert err.value.key == "objective.masking.ratio"


def test_config_round_trip() -> None:
    data = {"strategy": "context_aware", "inside_ratio": 0.9, "region": [0.2, 0.1, 0.9, 0.9]}
    cfg = from_dict(MaskingConfig, data, "objective.masking")
    assert cfg.region == (0.2, 0.1, 0.9, 0.9)
    assert from_dict(MaskingConfig, to_dict(cfg), "objective.masking") == cfg


def test_per_image_boxes_from_the_corpus_reach_the_masking():
    """A corpus column of boxes -> pipeline -> objective: same masks as the equivalent grids."""
    import numpy as np

    from raydiology.config import DataConfig
    from raydiology.config_base import to_dict
    from raydiology.data.pipeline import preprocess_batch, to_model_input
    from raydiology.models.hd_mae import HDMAEConfig, build_hd_mae
    from raydiology.objectives.mae import MAEObjective, MAEObjectiveConfig
    from raydiology.objectives.masking import boxes_to_grid, region_to_grid

    boxes = [(0.3, 0.15, 0.8, 0.8), (0.0, 0.5, 0.5, 1.0)]
    pixels = np.zeros((2, 64, 64), dtype=np.uint8)
    batch = {
        "image_id": np.array(["a", "b"], dtype=object),
        "pixels": np.array([p.tobytes() for p in pixels], dtype=object),
        "height": np.array([64, 64]),
        "width": np.array([64, 64]),
        "dtype": np.array(["uint8", "uint8"], dtype=object),
    }
    batch["chest_box"] = np.empty(2, dtype=object)  # how Ray hands over a list<float> column
    batch["chest_box"][:] = [np.array(b) for b in boxes]
    out = preprocess_batch(
        batch,
        data=to_dict(DataConfig(resolution=64)),
        label_columns=[],
        extra_columns={"region": "chest_box"},
    )
    assert out["region"].shape == (2, 4) and out["region"].dtype == np.float32

    grids = boxes_to_grid(torch.from_numpy(out["region"]), 4, 4)
    for box, grid in zip(boxes, grids, strict=True):
        assert torch.equal(grid, region_to_grid(box, 4, 4))

    cfg = MAEObjectiveConfig(masking=MaskingConfig(region_column="chest_box"))
    assert cfg.corpus_columns() == {"region": "chest_box"}
    objective = MAEObjective(
        cfg, build_hd_mae(HDMAEConfig(flavor="tiny"), image_size=64, in_chans=1)
    )
    images = to_model_input(
        torch.from_numpy(out["image"]), DataConfig(resolution=64), dtype=torch.float32
    )
    from_boxes = objective(
        {"image": images, "region": torch.from_numpy(out["region"])},
        generator=torch.Generator().manual_seed(0),
    )
    from_grids = objective(
        {"image": images, "region": grids}, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(from_boxes["loss"], from_grids["loss"])


def _box_batch(images, boxes) -> dict:
    """A decode chunk with a list<float> region column, as Ray hands it over (None = null)."""
    import numpy as np

    pixels = np.empty(len(images), dtype=object)
    pixels[:] = [a.tobytes() for a in images]
    column = np.empty(len(boxes), dtype=object)
    column[:] = [None if b is None else np.array(b) for b in boxes]
    return {
        "image_id": np.array([f"img{i}" for i in range(len(images))], dtype=object),
        "pixels": pixels,
        "height": np.array([a.shape[0] for a in images]),
        "width": np.array([a.shape[1] for a in images]),
        "dtype": np.array([str(a.dtype) for a in images], dtype=object),
        "chest_box": column,
    }


@pytest.mark.parametrize("boxes", [[(0.0, 0.5, 0.5, 1.0), None], [None, None]])
def test_a_row_without_a_region_gets_the_configured_one(boxes):
    """A null region used to crash `np.stack`; now it arrives as NaN and the objective puts
    `masking.region` in its place."""
    import numpy as np

    from raydiology.config import DataConfig
    from raydiology.data.pipeline import preprocess_batch
    from raydiology.models.hd_mae import HDMAEConfig, build_hd_mae
    from raydiology.objectives.mae import MAEObjective, MAEObjectiveConfig
    from raydiology.objectives.masking import boxes_to_grid

    images = [np.full((64, 64), 100, np.uint8)] * 2
    out = preprocess_batch(
        _box_batch(images, boxes),
        data=to_dict(DataConfig(resolution=64)),
        label_columns=[],
        extra_columns={"region": "chest_box"},
    )
    assert out["region"].shape == (2, 4) and np.isnan(out["region"][1]).all()

    cfg = MAEObjectiveConfig(masking=MaskingConfig(region_column="chest_box"))
    model = build_hd_mae(HDMAEConfig(flavor="tiny"), image_size=64, in_chans=1)
    objective = MAEObjective(cfg, model)
    grids = objective._region({"region": torch.from_numpy(out["region"])})
    assert grids is not None
    expected = [region_to_grid(cfg.masking.region, 4, 4) if b is None else b for b in boxes]
    for want, got in zip(expected, grids, strict=True):
        if not isinstance(want, torch.Tensor):
            want = boxes_to_grid(torch.tensor([want]), 4, 4)[0]
        assert torch.equal(got, want)


@pytest.mark.parametrize("crop_scale", [None, (0.5, 1.0)])
@pytest.mark.parametrize("fit", ["pad", "stretch", "crop"])
def test_region_moves_with_the_fit_crop_and_flip(fit, crop_scale):
    """The box must still frame the same pixels after fitting, cropping and flipping: a bright
    rectangle drawn exactly at the box is bright inside the moved box and dark outside it."""
    import numpy as np

    from raydiology.config import AugmentConfig, DataConfig
    from raydiology.data.pipeline import preprocess_batch

    box = (0.25, 0.25, 0.75, 0.625)  # rows 12..36, columns 24..60 of a 48x96 image
    image = np.zeros((48, 96), np.uint8)
    image[12:36, 24:60] = 250
    n, r = 24, 64
    data = DataConfig(
        resolution=r, fit=fit, augment=AugmentConfig(hflip=True, crop_scale=crop_scale)
    )
    out = preprocess_batch(
        _box_batch([image] * n, [box] * n),
        data=to_dict(data),
        label_columns=[],
        extra_columns={"region": "chest_box"},
    )
    for picture, (top, left, bottom, right) in zip(out["image"][:, 0], out["region"], strict=True):
        rows = slice(int(np.ceil(top * r)) + 1, int(bottom * r) - 1)
        cols = slice(int(np.ceil(left * r)) + 1, int(right * r) - 1)
        if rows.start < rows.stop and cols.start < cols.stop:
            assert picture[rows, cols].min() > 200
        outside = np.ones((r, r), bool)
        outside[max(int(top * r) - 2, 0) : int(np.ceil(bottom * r)) + 2,
                max(int(left * r) - 2, 0) : int(np.ceil(right * r)) + 2] = False  # fmt: skip
        assert picture[outside].max() < 20
    if crop_scale is None:  # both flips were drawn: the box's centre on either side
        centres = set(np.round(out["region"][:, [1, 3]].sum(axis=1), 3).tolist())
        assert len(centres) == 2 and sum(centres) == pytest.approx(2.0)

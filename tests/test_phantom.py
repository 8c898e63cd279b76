"""Phantom films: determinism, sizes, each finding visible where expected, reports exact."""

from __future__ import annotations

import re

import numpy as np
import pytest

from raydiology.data.corpus import read_rows, verify_corpus
from raydiology.data.phantom import FINDINGS, make_phantom, write_phantom_corpus

# Independent of phantom.py's tables on purpose: these are what a labeler will look for.
POSITIVE = {
    "cardiomegaly": r"heart is enlarged|There is cardiomegaly|cardiac silhouette is enlarged",
    "pleural_effusion": r"(small|moderate) (?P<side>left|right) pleural effusion",
    "pneumothorax": r"(small|moderate) (?P<side>left|right) apical pneumothorax",
    "lung_lesion": r"nodule (in|projects over) the (?P<side>left|right)",
    "support_devices": r"endotracheal tube is in place|central venous catheter ends|nasogastric tube courses",
}
NEGATIVE = {
    "cardiomegaly": r"heart size is normal|Normal heart size|silhouette is within normal limits",
    "pleural_effusion": r"[Nn]o pleural effusion",
    "pneumothorax": r"[Nn]o (pleural effusion or )?pneumothorax",
    "lung_lesion": r"No focal consolidation or nodule|lungs are (well expanded and )?clear",
    "support_devices": r"No lines or tubes|No support devices",
}


def _findings_text(report: str) -> str:
    assert report.startswith("FINDINGS: ") and " IMPRESSION: " in report
    return report.split(" IMPRESSION: ")[0]


def _only(name: str | None, seed: int, size: int = 256):
    forced = {f: f == name for f in FINDINGS}
    return make_phantom(np.random.default_rng(seed), size=size, findings=forced)


def test_deterministic_under_seed():
    a = make_phantom(np.random.default_rng(7), size=128, finding_prob=0.5)
    b = make_phantom(np.random.default_rng(7), size=128, finding_prob=0.5)
    c = make_phantom(np.random.default_rng(8), size=128, finding_prob=0.5)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.report == b.report and a.findings == b.findings and a.side == b.side
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("size", [64, 256, 1280])
def test_shapes_and_dtype(size):
    case = make_phantom(np.random.default_rng(1), size=size, finding_prob=1.0)
    assert case.image.shape == (size, size) and case.image.dtype == np.uint8
    assert case.view == "PA" and all(case.findings.values())
    # a film, not a flat field: dark background, dark lungs, bright mediastinum
    assert case.image.std() > 30


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cardiomegaly_widens_heart(seed):
    normal, big = _only(None, seed).image, _only("cardiomegaly", seed).image
    s = normal.shape[0]
    # rows just above the diaphragm, across the chest: count pixels brighter than the
    # midpoint between lung and mediastinum in the normal film
    band = (slice(int(0.56 * s), int(0.64 * s)), slice(int(0.15 * s), int(0.85 * s)))
    lo, hi = np.percentile(normal[band], [10, 90])
    threshold = (lo + hi) / 2
    width_normal = (normal[band] > threshold).sum(1).mean()
    width_big = (big[band] > threshold).sum(1).mean()
    assert width_big > 1.2 * width_normal


def _halves(diff: np.ndarray, rows: slice, side: str) -> tuple[float, float]:
    """Mean diff in `rows` on the film half of `side` (PA: patient right = film left)."""
    s = diff.shape[1]
    near = slice(0, s // 2) if side == "right" else slice(s // 2, s)
    far = slice(s // 2, s) if side == "right" else slice(0, s // 2)
    return float(diff[rows, near].mean()), float(diff[rows, far].mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_effusion_fills_costophrenic_angle(seed):
    normal, case = _only(None, seed), _only("pleural_effusion", seed)
    diff = case.image.astype(np.float32) - normal.image
    s = diff.shape[0]
    near, far = _halves(diff, slice(int(0.55 * s), int(0.75 * s)), case.side["pleural_effusion"])
    assert near > 8 and abs(far) < 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pneumothorax_darkens_apex(seed):
    normal, case = _only(None, seed), _only("pneumothorax", seed)
    diff = case.image.astype(np.float32) - normal.image
    s = diff.shape[0]
    near, far = _halves(diff, slice(int(0.12 * s), int(0.4 * s)), case.side["pneumothorax"])
    assert near < -2 and abs(far) < 0.5
    # the apical region loses its markings: its texture flattens
    assert (diff < -10).sum() > 0.005 * s * s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lesion_is_a_bright_spot_in_its_lung(seed):
    normal, case = _only(None, seed), _only("lung_lesion", seed)
    diff = case.image.astype(np.float32) - normal.image
    bright = diff > 20
    area = bright.sum()
    assert 20 < area < 0.02 * diff.size  # a nodule: visible, but small
    cols = np.nonzero(bright)[1]
    on_film_left = cols.mean() < diff.shape[1] / 2
    assert on_film_left == (case.side["lung_lesion"] == "right")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_devices_are_thin_bright_lines(seed):
    normal, case = _only(None, seed), _only("support_devices", seed)
    diff = case.image.astype(np.float32) - normal.image
    line = diff > 40
    assert line.sum() > 100 and line.sum() < 0.03 * diff.size
    assert line.any(axis=1).sum() > 0.3 * diff.shape[0]  # long: spans many rows


def test_reports_match_findings():
    rng = np.random.default_rng(3)
    seen = dict.fromkeys(FINDINGS, 0)
    for _ in range(80):
        case = make_phantom(rng, size=32, finding_prob=0.4)
        text = _findings_text(case.report)
        for name in FINDINGS:
            positive = re.search(POSITIVE[name], text)
            negative = re.search(NEGATIVE[name], text)
            assert bool(positive) == case.findings[name], (name, case.report)
            assert bool(negative) != case.findings[name], (name, case.report)
            if positive and "side" in positive.groupdict():
                assert positive["side"] == case.side[name], (name, case.report)
            seen[name] += case.findings[name]
        impression = case.report.split(" IMPRESSION: ")[1]
        normal = "No acute cardiopulmonary abnormality." in impression
        assert normal == (not any(case.findings[f] for f in FINDINGS[:4]))
    assert all(seen.values()), seen  # every finding was exercised


def test_corpus_labels_match_reports(tmp_path):
    manifest = write_phantom_corpus(
        tmp_path / "p", n=30, size=64, seed=4, finding_prob=0.4, shard_rows=8, progress=False
    )
    assert manifest.rows == 30 and len(manifest.shards) == 4 and manifest.image_size == 64
    assert manifest.label_columns == ("label_no_finding", *(f"label_{f}" for f in FINDINGS))
    verify_corpus(tmp_path / "p")
    rows = read_rows(tmp_path / "p", columns=None).to_pylist()
    assert [r["image_id"] for r in rows] == [f"phantom-{i:07d}" for i in range(30)]
    for row in rows:
        text = _findings_text(row["report"])
        for name in FINDINGS:
            assert row[f"label_{name}"] == int(bool(re.search(POSITIVE[name], text)))
        pathology = any(row[f"label_{f}"] for f in FINDINGS[:4])
        assert row["label_no_finding"] == int(not pathology)
        assert row["view"] == "PA" and row["anatomy"] == "chest"
        assert row["split"] in ("train", "val", "test") and row["sex"] in ("F", "M")
    splits = [r["split"] for r in rows]
    assert splits.count("train") > splits.count("val")


def test_corpus_deterministic(tmp_path):
    kwargs = dict(n=10, size=64, seed=5, shard_rows=4, progress=False)
    a = write_phantom_corpus(tmp_path / "a", **kwargs)
    b = write_phantom_corpus(tmp_path / "b", **kwargs)
    c = write_phantom_corpus(tmp_path / "c", **{**kwargs, "seed": 6})
    assert a.shards == b.shards  # same paths, rows and sha256
    assert [s.sha256 for s in a.shards] != [s.sha256 for s in c.shards]
    # split depends only on the index, so it does not move between seeds
    splits = [read_rows(tmp_path / d, ["split"]).column("split").to_pylist() for d in "ac"]
    assert splits[0] == splits[1]


def test_pose_spreads_the_anatomy_and_lesion_scale_grows_the_nodule():
    """What tests/margin_figures.py's `--pose` phantoms rely on: with `pose` the heart is no
    longer where it usually is, and `lesion_scale` nodules span more than a 16-px patch at 128.
    The findings are those of the default film (the draws keep their number and order)."""

    def films(**look):
        lesion = {"lung_lesion": True}
        return [
            make_phantom(
                np.random.default_rng([9, i]),
                size=128,
                findings=lesion,
                masks=True,
                boxes=True,
                **look,
            )
            for i in range(24)
        ]

    def heart_centres(cases):
        return np.array([np.argwhere(c.masks["heart"]).mean(0) for c in cases])

    def lesion_sides(cases):
        boxes = [c.boxes[0][:4] for c in cases]
        return np.array([max(x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes])

    centred, wide = films(), films(pose=5, lesion_scale=3)
    assert [c.findings for c in centred] == [c.findings for c in wide]
    spread = heart_centres(wide).std(0) / heart_centres(centred).std(0)
    assert (spread > 3).all(), spread  # rows and columns
    assert np.median(lesion_sides(centred)) < 8 and np.median(lesion_sides(wide)) > 12
    assert (heart_centres(films(pose=1.0)) == heart_centres(centred)).all()
    with pytest.raises(ValueError, match="pose 10"):
        make_phantom(np.random.default_rng(0), pose=10)

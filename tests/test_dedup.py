"""Near-duplicate detection: real radiographs and their altered copies, and the banded index
against a brute-force scan."""

from __future__ import annotations

import io
import itertools
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydiology.bench.dedup import (
    MAX_DROPPED_AT_1M,
    VARIANTS,
    choose_threshold,
    dropped_share,
    hannover_images,
    normal_tail,
    pair_distances,
    pydicom_images,
)
from raydiology.data.dedup import (
    DEFAULT_MAX_DISTANCE,
    NearDuplicateIndex,
    hamming,
    perceptual_hash,
)

HANNOVER = Path(__file__).resolve().parents[1].parent / "shared/data/hannover-cxr/png"
N_REAL = 40


@pytest.fixture(scope="module")
def radiographs() -> dict[str, np.ndarray]:
    if not HANNOVER.is_dir():
        pytest.skip(f"real radiographs not found at {HANNOVER} (shared test data absent)")
    files = sorted(HANNOVER.glob("*.png"))[:N_REAL]
    assert len(files) == N_REAL
    return {f.stem: np.asarray(Image.open(f).convert("L")) for f in files}


def _resized(a: np.ndarray) -> np.ndarray:
    img = Image.fromarray(a)
    small = img.resize((round(img.width * 0.9), round(img.height * 0.9)), Image.Resampling.BILINEAR)
    return np.asarray(small.resize(img.size, Image.Resampling.BILINEAR))


def _jpeg(a: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=85)
    return np.asarray(Image.open(buf))


def _brighter(a: np.ndarray) -> np.ndarray:
    return np.clip(a.astype(np.int16) + 5, 0, 255).astype(np.uint8)


def _sixteen_bit(a: np.ndarray) -> np.ndarray:
    return a.astype(np.uint16) * np.uint16(257)


def test_hash_is_a_64_bit_int_and_hamming_counts_bits(radiographs):
    a = next(iter(radiographs.values()))
    h = perceptual_hash(a)
    assert type(h) is int and 0 <= h < 1 << 64
    assert perceptual_hash(a.copy()) == h
    assert hamming(h, h) == 0
    assert hamming(0, (1 << 64) - 1) == 64
    assert hamming(0b1011, 0b0001) == 2


@pytest.mark.parametrize("alter", [_resized, _jpeg, _brighter, _sixteen_bit])
def test_altered_copy_is_found(radiographs, alter):
    # 4 bits: every such copy of these 40 is within 4 (the default, 0, catches most: see below)
    index = NearDuplicateIndex(max_distance=4)
    for image_id, pixels in radiographs.items():
        assert index.add(image_id, perceptual_hash(pixels)) is None
    for image_id, pixels in radiographs.items():
        copy = alter(pixels)
        assert copy.shape == pixels.shape
        assert index.add(f"{image_id}-copy", perceptual_hash(copy)) == image_id
    assert len(index) == N_REAL  # duplicates are not recorded


def test_distinct_radiographs_do_not_match(radiographs):
    hashes = {k: perceptual_hash(v) for k, v in radiographs.items()}
    # Measured: the closest of these 40 are 12 bits apart, the closest different-patient
    # pair of all 243 is 8 bits apart (see test_default_threshold_is_the_measured_choice).
    closest = min(hamming(a, b) for a, b in itertools.combinations(hashes.values(), 2))
    assert closest > 6
    index = NearDuplicateIndex()
    assert [index.add(k, h) for k, h in hashes.items()] == [None] * N_REAL
    assert len(index) == N_REAL


def test_hash_ignores_a_linear_rescale(radiographs):
    """8- and 16-bit copies, and a linear re-window without clipping, hash identically: the
    DCT runs on a float thumbnail (imagehash's 8-bit one put some copies 2 bits away)."""
    for pixels in radiographs.values():
        h = perceptual_hash(pixels)
        assert perceptual_hash(pixels.astype(np.uint16) * np.uint16(257)) == h
        assert perceptual_hash(pixels.astype(np.uint16) * np.uint16(200) + np.uint16(1000)) == h


@pytest.fixture(scope="module")
def hannover_pairs() -> tuple[list[int], list[int]]:
    """Hamming distances of all 243 Hannover films' hashes: different-patient pairs and
    same-patient (other study) pairs."""
    if not HANNOVER.is_dir():
        pytest.skip(f"real radiographs not found at {HANNOVER} (shared test data absent)")
    images, patients = hannover_images(HANNOVER.parent)
    hashes = {k: perceptual_hash(v) for k, v in images.items()}
    pairs = pair_distances(hashes)
    other = [d for a, b, d in pairs if patients[a] != patients[b]]
    same = [d for a, b, d in pairs if patients[a] == patients[b]]
    assert len(other) + len(same) == 243 * 242 // 2
    return other, same


def test_default_threshold_is_the_measured_choice(hannover_pairs):
    """The default is the largest threshold no distinct Hannover pair reaches whose expected
    loss of distinct images in a 10^6-image corpus stays <= 1 % (`raydiology bench dedup`).
    The old default, 6 bits, was expected to drop 86 % of them."""
    other, same = hannover_pairs
    assert min(other + same) > DEFAULT_MAX_DISTANCE
    tail = normal_tail(other, lower_half=True)
    # the fit meets the observed tail where there are pairs to count (8-10 bits), within 2x
    for t in (8, 10):
        observed = sum(d <= t for d in other) / len(other)
        assert 0.5 < tail(t) / observed < 2
    assert dropped_share(tail(DEFAULT_MAX_DISTANCE), 1_000_000) <= MAX_DROPPED_AT_1M
    # distances are even (32 of 64 bits set), so the next threshold that matters is +2
    assert {d % 2 for d in other} == {0}
    assert dropped_share(tail(DEFAULT_MAX_DISTANCE + 2), 1_000_000) > MAX_DROPPED_AT_1M


def test_default_threshold_catches_reencoded_copies(radiographs):
    """At the default, JPEG re-encodings, resized and 8/16-bit copies are caught (measured on
    all 243: 92-100 % each); re-windowed ones about half, cropped or shifted ones not at all."""
    kinds = ["jpeg q75", "resize 95%", "resize 105%", "resize 50% + jpeg q75", "8<->16 bit"]
    index = NearDuplicateIndex()
    for image_id, pixels in radiographs.items():
        assert index.add(image_id, perceptual_hash(pixels)) is None
    caught = {
        kind: sum(
            index.add(f"{k}-copy", perceptual_hash(VARIANTS[kind](v))) == k
            for k, v in radiographs.items()
        )
        / N_REAL
        for kind in kinds
    }
    assert min(caught.values()) >= 0.85, caught
    assert sum(caught.values()) / len(kinds) >= 0.9, caught


def test_pydicom_copies_are_caught_at_the_default():
    """pydicom-data's lossy JPEG 2000 copies of its chest CRs, as ingest decodes them."""
    pairs = {"RG1_J2KI.dcm": "RG1_UNCR.dcm", "RG3_J2KI.dcm": "RG3_UNCR.dcm"}
    images = pydicom_images([*pairs, *pairs.values()])
    index = NearDuplicateIndex()
    for original in pairs.values():
        assert index.add(original, perceptual_hash(images[original])) is None
    for copy, original in pairs.items():
        assert index.add(copy, perceptual_hash(images[copy])) == original


def test_dropped_share_and_threshold_rule():
    assert dropped_share(0.0, 10**6) == 0.0
    assert dropped_share(1e-12, 10**6) == pytest.approx(5e-7)  # n p / 2 when small
    assert dropped_share(1e-5, 10**6) == pytest.approx(1 - (1 - np.exp(-10)) / 10)
    # the largest threshold meeting both conditions, 0 when none does
    rows = [
        {"bits": 0, "all_distinct_pairs": 0, "dropped_at_1000000": 0.001},
        {"bits": 1, "all_distinct_pairs": 0, "dropped_at_1000000": 0.005},
        {"bits": 2, "all_distinct_pairs": 0, "dropped_at_1000000": 0.05},
        {"bits": 3, "all_distinct_pairs": 1, "dropped_at_1000000": 0.001},
    ]
    assert choose_threshold({"rows": rows}) == 1
    assert choose_threshold({"rows": rows[2:]}) == 0
    assert choose_threshold({"rows": rows, "step": 2}) == 0  # odd bits act as the even below


def test_defaults_agree():
    """Ingest, its options and the CLI take the measured default, not a copy of an old one."""
    import inspect

    from raydiology import cli
    from raydiology.data.ingest import IngestOptions, ingest_images

    assert inspect.signature(ingest_images).parameters["near_duplicate_distance"].default == (
        DEFAULT_MAX_DISTANCE
    )
    assert IngestOptions.__dataclass_fields__["near_duplicate_distance"].default == (
        DEFAULT_MAX_DISTANCE
    )
    cli_default = inspect.signature(cli.ingest).parameters["near_dup_distance"].default
    assert cli_default == DEFAULT_MAX_DISTANCE


def _brute_force(hashes: list[int], max_distance: int) -> list[int | None]:
    """Expected answers of `add`: the earliest kept hash within reach, else keep it."""
    kept: list[int] = []
    answers: list[int | None] = []
    for i, h in enumerate(hashes):
        match = next((j for j in kept if hamming(h, hashes[j]) <= max_distance), None)
        answers.append(match)
        if match is None:
            kept.append(i)
    return answers


def _planted(n: int, max_distance: int, seed: int) -> list[int]:
    """Random hashes, a third of them copies of an earlier one with 0..max_distance+2 bits
    flipped, so that matches just inside and just outside the threshold both occur."""
    rng = random.Random(seed)
    hashes: list[int] = []
    for _ in range(n):
        if hashes and rng.random() < 1 / 3:
            h = rng.choice(hashes)
            for bit in rng.sample(range(64), rng.randint(0, max_distance + 2)):
                h ^= 1 << bit
        else:
            h = rng.getrandbits(64)
        hashes.append(h)
    return hashes


@pytest.mark.parametrize(
    ("max_distance", "bands"),
    [(6, None), (6, 7), (6, 3), (3, None), (10, None), (1, None), (0, None)],
)
def test_banded_index_equals_brute_force(max_distance, bands):
    hashes = _planted(1000, max_distance, seed=max_distance)
    expected = _brute_force(hashes, max_distance)
    index = NearDuplicateIndex(max_distance=max_distance, bands=bands)
    got = [index.add(str(i), h) for i, h in enumerate(hashes)]
    assert got == [None if j is None else str(j) for j in expected]
    assert len(index) == expected.count(None)
    # the planted copies produce both outcomes, or the comparison would prove little
    assert 100 < expected.count(None) < 1000


def test_max_distance_zero_matches_only_equal_hashes():
    index = NearDuplicateIndex(max_distance=0)
    h = 0x0123_4567_89AB_CDEF
    assert index.add("a", h) is None
    for bit in (0, 31, 63):
        assert index.add(f"flip{bit}", h ^ (1 << bit)) is None
    assert index.add("again", h) == "a"
    assert len(index) == 4


@pytest.mark.parametrize("max_distance", [0, 6, 20, 40, 63])
def test_default_bands_keep_lookups_bounded(max_distance):
    index = NearDuplicateIndex(max_distance=max_distance)
    assert 1 <= index.bands <= max_distance + 1
    assert index.radius == max_distance // index.bands
    h = (1 << 64) - 1
    assert index.add("a", h) is None
    assert index.add("b", h ^ ((1 << max_distance) - 1)) == "a"  # exactly max_distance bits


def test_invalid_arguments():
    with pytest.raises(ValueError, match="max_distance"):
        NearDuplicateIndex(max_distance=64)
    with pytest.raises(ValueError, match="bands"):
        NearDuplicateIndex(max_distance=2, bands=4)
    with pytest.raises(ValueError, match="more bands"):
        NearDuplicateIndex(max_distance=6, bands=1)
    with pytest.raises(ValueError, match="64-bit"):
        NearDuplicateIndex().add("x", 1 << 64)
    with pytest.raises(ValueError, match="2-D"):
        perceptual_hash(np.zeros((4, 4, 3), np.uint8))

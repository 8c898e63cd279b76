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

from raydiology.data.dedup import NearDuplicateIndex, hamming, perceptual_hash

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
    index = NearDuplicateIndex()
    for image_id, pixels in radiographs.items():
        assert index.add(image_id, perceptual_hash(pixels)) is None
    for image_id, pixels in radiographs.items():
        copy = alter(pixels)
        assert copy.shape == pixels.shape
        assert index.add(f"{image_id}-copy", perceptual_hash(copy)) == image_id
    assert len(index) == N_REAL  # duplicates are not recorded


def test_distinct_radiographs_do_not_match(radiographs):
    hashes = {k: perceptual_hash(v) for k, v in radiographs.items()}
    # Measured: the closest of these 40 are 12 bits apart; the altered copies above stay
    # within 2 bits, so the default threshold of 6 sits between the two.
    closest = min(hamming(a, b) for a, b in itertools.combinations(hashes.values(), 2))
    assert closest > 6
    index = NearDuplicateIndex()
    assert [index.add(k, h) for k, h in hashes.items()] == [None] * N_REAL
    assert len(index) == N_REAL


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

"""Near-duplicate detection with 64-bit perceptual hashes and a multi-index hash table.

Large X-ray collections hold the same radiograph more than once: re-exports, copies at another
resolution or JPEG quality, a second windowing. The XR-0 authors removed about 2% of 1.17 M
images this way. Ingest hashes every image once (`perceptual_hash`) and asks a
`NearDuplicateIndex` whether an earlier image lies within `max_distance` bits; it does so for
millions of images in one process, so a lookup must not scan everything seen so far.

The default, 0 bits (the same 64-bit hash), is measured (`raydiology bench dedup`): 64-bit
pHashes of unrelated chest films are not far apart (Hannover, 28,360 different-patient pairs:
mean 26.7 bits, closest 8), so at 6 bits a 10^6-image corpus would be expected to lose about
86 % of its distinct images, at 2 bits 3.6 %, at 0 bits 0.3 % (lower-tail normal fit; the
benchmark's docstring says how it extrapolates). At 0 bits the check still catches 91-100 % of
JPEG re-encodings, resized copies and 8/16-bit copies, about half of re-windowed ones, and no
cropped or shifted ones.

Multi-index hashing: cut the 64 bits into `bands` contiguous bands. If two hashes differ in at
most `max_distance` bits, those bits fall into the bands so that at least one band differs in at
most `max_distance // bands` bits (pigeonhole). Each band keeps a dict from band value to the
images holding it; a lookup probes every band value within that radius of the query's, and
only the images found there are checked with the full Hamming distance.

`bands = max_distance + 1` (radius 0) probes one key per band, but its bands are only 64 /
(max_distance + 1) bits wide: at distance 6 that is 9-10 bits, 512-1024 keys, so
each probe returns about N / 1000 images and a lookup is still linear in N, only with a small
constant. The default therefore never cuts bands narrower than 16 bits (`_MIN_BAND_BITS`): at
distance 6 that is 4 bands probed at radius 1 (17 keys each), where a probe returns about
N / 65536 images, 64 times fewer candidates for 10 times the dict look-ups. Measured here on
200,000 random hashes at distance 6: 4 bands take 72 us per `add` against 454 us for 7 bands,
and 290 against 1,600 us when the bits are as unevenly set as real radiographs' pHashes are.
Large distances take more bands again, so that a lookup probes at most `_MAX_PROBES` keys.
"""

from __future__ import annotations

import itertools
import math
from array import array

import numpy as np
from PIL import Image

HASH_BITS = 64
_MIN_BAND_BITS = 16
_MAX_PROBES = 100_000  # dict look-ups per `add`; beyond that a scan is as fast
# The largest threshold that no distinct pair of the benchmark's images reaches and that is
# expected to drop <= 1 % of a 10^6-image corpus (`raydiology bench dedup`, module docstring).
DEFAULT_MAX_DISTANCE = 0
# Bumped whenever `perceptual_hash` changes what it returns: staged ingest chunks carry hashes,
# and a resumed ingest must not compare hashes of two versions (part of the chunk fingerprint).
HASH_VERSION = 2  # 2: DCT of a float thumbnail (1: of an 8-bit one)


def perceptual_hash(pixels: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a 2-D uint8/uint16 image: the pHash of imagehash's
    `phash` (32x32 Lanczos thumbnail, 2-D DCT-II, the 8x8 lowest frequencies compared with
    their median), computed in floating point instead of on an 8-bit thumbnail.

    Floating point makes the hash blind to any increasing linear rescale of the pixels, so an
    8-bit and a 16-bit copy of one radiograph hash alike, and it removes the rounding that put
    one re-encoded copy in ten 2 bits away from its original (`raydiology bench dedup`: JPEG
    q75 copies of the Hannover films matched at 0 bits 91 % of the time with imagehash's 8-bit
    thumbnail, 97 % in float). Bit i of the result is row-major cell i of the 8x8 DCT block,
    counted from the most significant bit; 32 of the 64 bits are set (the median split), so
    distances between hashes are even.
    """
    if pixels.ndim != 2:
        raise ValueError(f"perceptual_hash: expected a 2-D image, got shape {pixels.shape}")
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"perceptual_hash: pixels dtype {pixels.dtype} is not uint8/uint16")
    image = Image.fromarray(pixels.astype(np.float32), mode="F")
    thumb = np.asarray(image.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = _DCT8 @ thumb @ _DCT8.T  # the 8x8 lowest DCT-II frequencies (scale does not matter)
    bits = low > np.median(low)
    return int.from_bytes(np.packbits(bits.ravel()).tobytes(), "big")


# Rows 0..7 of the (unnormalised) 32-point DCT-II matrix: cos(pi * (2n + 1) * k / 64).
_DCT8 = np.cos(np.pi * np.outer(np.arange(8), 2 * np.arange(32) + 1) / 64)


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


class NearDuplicateIndex:
    """Remembers kept images' hashes and finds an earlier one within `max_distance` bits.

    Memory per kept image, for the default 4 bands at a few million images: the id string
    (about 65 bytes for a 16-character id, plus an 8-byte list slot), its hash (8 bytes in an
    unsigned 64-bit array) and one 4-byte row number per band in that band's bucket arrays
    (about 18 bytes with growth slack), about 100 bytes in all, so 100 MB per million images.
    Narrow bands have at most 2**bits buckets, so their per-bucket overhead is fixed; bands wider
    than about 20 bits (few bands, e.g. `max_distance=0`) add up to about 150 bytes per image
    and band for their dict entry and bucket.
    """

    def __init__(
        self, *, max_distance: int = DEFAULT_MAX_DISTANCE, bands: int | None = None
    ) -> None:
        if not 0 <= max_distance < HASH_BITS:
            raise ValueError(f"max_distance must be in 0..{HASH_BITS - 1}, got {max_distance}")
        if bands is None:
            # 16-bit bands where the probe count allows, else more (radius 0 always does)
            wide = min(max_distance + 1, HASH_BITS // _MIN_BAND_BITS)
            bands = next(
                b for b in range(wide, max_distance + 2) if _probes(b, max_distance) <= _MAX_PROBES
            )
        if not 1 <= bands <= min(max_distance + 1, HASH_BITS):
            raise ValueError(
                f"bands must be in 1..{min(max_distance + 1, HASH_BITS)} for "
                f"max_distance={max_distance}, got {bands}"
            )
        self.max_distance = max_distance
        self.bands = bands
        self.radius = max_distance // bands  # per-band distance that pigeonhole guarantees
        probes = _probes(bands, max_distance)
        if probes > _MAX_PROBES:
            raise ValueError(
                f"{bands} bands at max_distance={max_distance} probe {probes} keys per lookup; "
                "use more bands"
            )
        # Band b covers bits [start, start + width) counted from the least significant bit;
        # the first `HASH_BITS % bands` bands are one bit wider.
        self._layout: list[tuple[int, int]] = []  # (shift, mask)
        self._flips: list[list[int]] = []  # XOR masks of weight <= radius inside the band
        start = 0
        for width in _widths(bands):
            self._layout.append((start, (1 << width) - 1))
            self._flips.append(_flip_masks(width, self.radius))
            start += width
        self._tables: list[dict[int, array]] = [{} for _ in range(bands)]
        self._hashes = array("Q")
        self._ids: list[str] = []

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, image_id: str, phash: int) -> str | None:
        """The id of the earliest kept image within `max_distance` bits of `phash`, or None
        after recording `image_id` as a new kept image.

        A near-duplicate is not recorded, so chains cannot grow: an image is compared with kept
        images only, the ones ingest writes.
        """
        if not 0 <= phash < 1 << HASH_BITS:
            raise ValueError(f"{image_id}: hash {phash!r} is not an unsigned 64-bit integer")
        match = self._earliest_match(phash)
        if match is not None:
            return self._ids[match]
        row = len(self._ids)
        self._ids.append(image_id)
        self._hashes.append(phash)
        for table, (shift, mask) in zip(self._tables, self._layout, strict=True):
            key = (phash >> shift) & mask
            bucket = table.get(key)
            if bucket is None:
                table[key] = array("I", (row,))
            else:
                bucket.append(row)
        return None

    def _earliest_match(self, phash: int) -> int | None:
        best: int | None = None
        hashes, limit = self._hashes, self.max_distance
        for table, (shift, mask), flips in zip(
            self._tables, self._layout, self._flips, strict=True
        ):
            key = (phash >> shift) & mask
            for flip in flips:
                bucket = table.get(key ^ flip)
                if bucket is None:
                    continue
                for row in bucket:  # rows ascend: stop at the first match or at `best`
                    if best is not None and row >= best:
                        break
                    if (phash ^ hashes[row]).bit_count() <= limit:
                        best = row
                        break
        return best


def _flip_masks(width: int, radius: int) -> list[int]:
    """Every `width`-bit mask with at most `radius` bits set, the exact key (0) first."""
    masks = []
    for weight in range(min(radius, width) + 1):
        for bits in itertools.combinations(range(width), weight):
            masks.append(sum(1 << bit for bit in bits))
    return masks


def _widths(bands: int) -> list[int]:
    return [HASH_BITS // bands + (b < HASH_BITS % bands) for b in range(bands)]


def _probes(bands: int, max_distance: int) -> int:
    """Dict look-ups per `add` with `bands` bands, each probed within its radius."""
    radius = max_distance // bands
    return sum(math.comb(w, k) for w in _widths(bands) for k in range(radius + 1))

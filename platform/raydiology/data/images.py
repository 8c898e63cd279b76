"""Decoding and geometry for ingest: any file -> a 2-D uint8/uint16 array -> the stored size.

Loaders raise `BadImage(reason)`; the reason goes to the quarantine list, never a traceback.

One intensity rule holds for every source (PNG, JPEG, DICOM), so that the same pixels stored
as a 12-bit PNG or as a 12-bit DICOM become the same training image:

1. values are read against the range the source can hold, never the image's own min..max:
   8-bit files 0..255; 16-bit PNGs 0..2**bits-1, where bits is the PNG's sBIT chunk
   (significant bits, the PNG analogue of DICOM's BitsStored) or, without one, the smallest
   of 10/12/14/16 bits that holds the image's maximum (detectors write 10-16 bits; a raw
   12-bit image in a 16-bit file would otherwise fill ~6 % of the range); DICOM the output
   range of its display chain applied to BitsStored's range (see `raydiology.data.dicom`);
2. MONOCHROME1 is inverted (dense = bright everywhere); DICOM padding pixels
   (PixelPaddingValue) are left out of every statistic below and stored black (0);
3. optionally, `clip_percentile=p` clips to the image's p-th..(100-p)-th percentiles (of the
   non-padding pixels) and stretches that span to the full range; off by default, because it
   makes intensity per image again;
4. the result is scaled to 0..65535 (uint16); an 8-bit source without a clip stays uint8,
   which is the same rule at 8 bits. Corpus bit depths convert by a fixed factor of 257.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from raydiology.data.errors import BadImage

ResizeMode = Literal["pad", "stretch", "shortest"]
MIN_SIDE, MAX_SIDE = 32, 16384  # outside this a "radiograph" is a thumbnail or a broken header
FULL = 65535  # uint16 full scale: every source ends on 0..FULL
_DETECTOR_BITS = (10, 12, 14, 16)  # bit depths assumed for 16-bit PNGs without an sBIT chunk
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_image(path: str | Path, *, clip_percentile: float | None = None) -> np.ndarray:
    """Decode one file to a 2-D array under the intensity rule; raises BadImage with the reason.

    Colour images become grayscale (ITU-R 601 luma). 8-bit sources stay uint8 (0..255 is
    already their full range) unless `clip_percentile` stretches them, which needs uint16;
    16-bit sources are scaled by their significant bits to uint16 0..65535.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now, so truncation surfaces here
            img = ImageOps.exif_transpose(opened)
            mode = img.mode
            if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
                array = np.asarray(img).astype(np.uint16)
            elif mode == "I":
                array = np.asarray(img)
                if array.min() < 0 or array.max() > 65535:
                    raise BadImage(f"32-bit values outside 0..65535 (mode {mode})")
                array = array.astype(np.uint16)
            elif mode in ("L", "1", "P", "LA", "RGB", "RGBA", "CMYK", "YCbCr"):
                array = np.asarray(img.convert("L"))
            else:
                raise BadImage(f"unsupported image mode {mode}")
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL reports unreadable/corrupt/truncated data through these.
        raise BadImage(f"unreadable image: {type(e).__name__}: {e}") from None
    if array.ndim != 2 or array.size == 0:
        raise BadImage(f"not a 2-D image (shape {array.shape})")
    check_size(array)
    if array.min() == array.max():
        raise BadImage(f"zero variance (every pixel is {int(array.min())})")
    if array.dtype == np.uint8:
        if clip_percentile is None:
            return array
        return to_presentation(array, 0.0, 255.0, clip_percentile=clip_percentile)
    bits = significant_bits(int(array.max()), _png_sbit(path))
    return to_presentation(array, 0.0, float(2**bits - 1), clip_percentile=clip_percentile)


def significant_bits(maximum: int, declared: int | None) -> int:
    """The bits a 16-bit image uses: the declared count when the pixels fit in it, else the
    smallest common detector depth that holds `maximum`."""
    if declared is not None and 1 <= declared <= 16 and maximum < 2**declared:
        return declared
    return next(b for b in _DETECTOR_BITS if maximum < 2**b)


def to_presentation(
    values: np.ndarray,
    lo: float,
    hi: float,
    *,
    invert: bool = False,
    padding: np.ndarray | None = None,
    clip_percentile: float | None = None,
) -> np.ndarray:
    """Steps 2-4 of the intensity rule: `values` on the source range lo..hi -> uint16 0..65535.

    `padding` (a boolean mask) marks pixels that are not image: they take no part in the
    variance check or the percentile clip and come out 0. A clip whose percentiles coincide
    (a nearly constant image) falls back to lo..hi rather than losing the image.
    """
    if hi <= lo:
        raise BadImage(f"empty intensity range {lo}..{hi}")
    scaled = np.clip((np.asarray(values, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
    if invert:
        scaled = 1.0 - scaled
    kept = scaled if padding is None else scaled[~padding]
    if kept.size == 0:
        raise BadImage("every pixel is padding (PixelPaddingValue)")
    if kept.min() == kept.max():
        raise BadImage("zero variance after rescale and windowing")
    if clip_percentile is not None:
        check_clip_percentile(clip_percentile)
        low, high = np.percentile(kept, [clip_percentile, 100.0 - clip_percentile])
        if high > low:
            scaled = np.clip((scaled - low) / (high - low), 0.0, 1.0)
    out = np.round(scaled * FULL).astype(np.uint16)
    if padding is not None:
        out[padding] = 0
    return out


def check_clip_percentile(value: float) -> None:
    if not 0.0 <= value < 50.0:
        raise ValueError(f"clip_percentile must be in [0, 50), not {value!r}")


def to_bit_depth(array: np.ndarray, bit_depth: Literal[8, 16]) -> np.ndarray:
    """Convert to the corpus's bit depth by the fixed factor 257 (= 65535 / 255) both ways.

    Loaders already put every source on its full range (see the module docstring), so a
    fixed factor keeps one intensity scale across images; 8 -> 16 -> 8 is exact.
    """
    if bit_depth == 8:
        if array.dtype == np.uint8:
            return array
        return np.round(array.astype(np.float32) / 257.0).astype(np.uint8)
    if array.dtype == np.uint16:
        return array
    return array.astype(np.uint16) * np.uint16(257)


def _png_sbit(path: Path) -> int | None:
    """The gray sample's significant bits from a PNG's sBIT chunk; None if not a PNG or absent.

    PIL does not expose sBIT, and the chunk must precede the image data, so this reads only
    the chunk headers before the first IDAT.
    """
    with open(path, "rb") as f:
        if f.read(8) != _PNG_MAGIC:
            return None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind == b"sBIT":
                data = f.read(length)
                return data[0] if data else None
            if kind in (b"IDAT", b"IEND"):
                return None
            f.seek(length + 4, 1)  # the chunk's data and CRC


def check_size(array: np.ndarray) -> None:
    height, width = array.shape
    if not (MIN_SIDE <= height <= MAX_SIDE and MIN_SIDE <= width <= MAX_SIDE):
        raise BadImage(f"absurd size {height}x{width} (each side must be {MIN_SIDE}..{MAX_SIDE})")


def fit_square(array: np.ndarray, size: int, resize: ResizeMode) -> np.ndarray:
    """Resize for storage: `pad` keeps the aspect ratio (longest side = size) and centres
    the image on zeros; `stretch` resizes each axis straight to `size`; `shortest` keeps the
    aspect ratio with the shortest side = size and no padding (XR-0's stored recipe; the
    training pipeline pads to square later)."""
    height, width = array.shape
    if resize == "stretch":
        new_h = new_w = size
    elif resize == "shortest":
        scale = size / min(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    else:
        scale = size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_h, new_w) != (height, width):
        # Float mode keeps 16-bit precision through the filter; LANCZOS for up and down.
        img = Image.fromarray(array.astype(np.float32), mode="F")
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
        info = np.iinfo(array.dtype)
        array = np.clip(np.round(np.asarray(img)), info.min, info.max).astype(array.dtype)
    if (new_h, new_w) == (size, size) or resize == "shortest":
        return array
    out = np.zeros((size, size), dtype=array.dtype)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = array
    return out

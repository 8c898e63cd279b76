"""Decoding and geometry for ingest: any file -> a 2-D uint8/uint16 array -> the stored size.

Loaders raise `BadImage(reason)`; the reason goes to the quarantine list, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from raydiology.data.errors import BadImage

ResizeMode = Literal["pad", "stretch", "shortest"]
MIN_SIDE, MAX_SIDE = 32, 16384  # outside this a "radiograph" is a thumbnail or a broken header


def load_image(path: str | Path) -> np.ndarray:
    """Decode one file to a 2-D uint8 or uint16 array; raises BadImage with the reason.

    Colour images become grayscale (ITU-R 601 luma); 16-bit grayscale PNGs stay 16-bit.
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
    return array


def to_bit_depth(array: np.ndarray, bit_depth: Literal[8, 16]) -> np.ndarray:
    """Convert to the corpus's bit depth.

    8 -> 16 scales by 257 (full range). 16 -> 8 stretches the image's own min..max to 0..255,
    because 16-bit radiographs often use only 10-12 bits and a fixed shift would leave them
    nearly black.
    """
    if bit_depth == 8:
        if array.dtype == np.uint8:
            return array
        lo, hi = float(array.min()), float(array.max())
        return np.round((array.astype(np.float32) - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if array.dtype == np.uint16:
        return array
    return array.astype(np.uint16) * np.uint16(257)


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

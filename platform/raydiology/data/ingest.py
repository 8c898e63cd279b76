"""Ingest folders of PNG/JPEG radiographs into a corpus (format v1).

Each file goes through `load_image` (decode to a 2-D array) and `fit_square` (resize and pad),
so new sources (DICOM, say) only need another loader. A bad file never stops an ingest: it is
written to `quarantine.jsonl` with the reason, because a single truncated file in a folder of
a million should cost one line in a log, not the night's run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from raydiology.data.corpus import CorpusWriter, Manifest, progress_iter
from raydiology.data.errors import BadImage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
QUARANTINE_NAME = "quarantine.jsonl"
DUPLICATES_NAME = "duplicates.jsonl"


@dataclass(frozen=True, kw_only=True)
class IngestSummary:
    found: int
    ingested: int
    quarantined: int
    duplicates: int
    manifest: Manifest
    quarantine_file: str | None  # None when nothing was quarantined


def find_images(sources: list[str | Path]) -> list[tuple[Path, str]]:
    """(file, path relative to its source root) for every image, sorted for determinism.

    A source may also be a single file; its relative path is then its name.
    """
    found = []
    for source in sources:
        root = Path(source)
        if root.is_file():
            found.append((root, root.name))
        elif root.is_dir():
            files = (
                p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
            found += sorted((p, p.relative_to(root).as_posix()) for p in files)
        else:
            raise FileNotFoundError(f"ingest source {source} does not exist")
    return found


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


def fit_square(array: np.ndarray, size: int, resize: Literal["pad", "stretch"]) -> np.ndarray:
    """Resize to size x size: `pad` keeps the aspect ratio (longest side = size) and centres
    the image on zeros; `stretch` resizes each axis straight to `size`."""
    height, width = array.shape
    if resize == "stretch":
        new_h = new_w = size
    else:
        scale = size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_h, new_w) != (height, width):
        # Float mode keeps 16-bit precision through the filter; LANCZOS for up and down.
        img = Image.fromarray(array.astype(np.float32), mode="F")
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
        info = np.iinfo(array.dtype)
        array = np.clip(np.round(np.asarray(img)), info.min, info.max).astype(array.dtype)
    if (new_h, new_w) == (size, size):
        return array
    out = np.zeros((size, size), dtype=array.dtype)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = array
    return out


def image_id_for(relative_path: str, salt: str) -> str:
    """Stable id that does not reveal the path (paths can carry patient names)."""
    return hashlib.sha256((salt + relative_path).encode()).hexdigest()[:16]


def ingest_images(
    sources: list[str | Path],
    out_dir: str | os.PathLike,
    *,
    size: int = 1024,
    resize: Literal["pad", "stretch"] = "pad",
    bit_depth: Literal[8, 16] = 8,
    salt: str = "",
    attribution: str | None = None,
    shard_rows: int = 1024,
    progress: bool = True,
) -> IngestSummary:
    """Decode, resize and shard every PNG/JPEG under `sources` into a corpus at `out_dir`.

    Unreadable, truncated, empty and constant images go to `quarantine.jsonl`; exact
    duplicates (same decoded pixels) are skipped and listed in `duplicates.jsonl`, so that
    found == ingested + quarantined + duplicates. Metadata columns stay null: nothing is
    guessed from file names. `attribution` (a licence's required credit) is kept in the
    manifest and printed under every picture drawn from the corpus.
    """
    if resize not in ("pad", "stretch"):
        raise ValueError(f"resize must be 'pad' or 'stretch', not {resize!r}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, not {bit_depth!r}")
    if size < 1:
        raise ValueError(f"size must be positive, not {size}")
    files = find_images(sources)
    out = Path(out_dir)
    options = {
        "sources": [str(s) for s in sources],
        "size": size,
        "resize": resize,
        "bit_depth": bit_depth,
        "salted": bool(salt),  # the salt itself stays secret
        "shard_rows": shard_rows,
    }
    quarantined: list[dict] = []
    duplicates: list[dict] = []
    seen_pixels: dict[str, tuple[str, str]] = {}  # content sha256 -> (image_id, path)
    seen_ids: dict[str, str] = {}
    with CorpusWriter(
        out,
        made_by={"command": "ingest", "options": options, "attribution": attribution},
        shard_rows=shard_rows,
    ) as writer:
        for path, relative in progress_iter(files, enabled=progress, description="ingesting"):
            image_id = image_id_for(relative, salt)
            if image_id in seen_ids:
                reason = (
                    f"same relative path {relative!r} as {seen_ids[image_id]} in another source"
                )
                quarantined.append({"path": str(path), "reason": reason})
                continue
            try:
                array = load_image(path)
            except BadImage as e:
                quarantined.append({"path": str(path), "reason": str(e)})
                continue
            digest = hashlib.sha256(
                f"{array.dtype}{array.shape}".encode() + array.tobytes()
            ).hexdigest()
            if digest in seen_pixels:
                first_id, first_path = seen_pixels[digest]
                duplicates.append(
                    {"path": str(path), "duplicate_of": first_id, "duplicate_of_path": first_path}
                )
                continue
            seen_pixels[digest] = (image_id, str(path))
            seen_ids[image_id] = str(path)
            pixels = fit_square(to_bit_depth(array, bit_depth), size, resize)
            writer.add({"image_id": image_id, "pixels": pixels})

    quarantine_file = _write_jsonl(out / QUARANTINE_NAME, quarantined)
    _write_jsonl(out / DUPLICATES_NAME, duplicates)
    assert writer.manifest is not None
    return IngestSummary(
        found=len(files),
        ingested=writer.manifest.rows,
        quarantined=len(quarantined),
        duplicates=len(duplicates),
        manifest=writer.manifest,
        quarantine_file=quarantine_file,
    )


def _write_jsonl(path: Path, records: list[dict]) -> str | None:
    if not records:
        return None
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)

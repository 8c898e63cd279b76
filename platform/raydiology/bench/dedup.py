"""`raydiology bench dedup`: per Hamming threshold, how many distinct images the near-duplicate
check would drop, and how many real near-duplicates it catches.

Distinct images (none of them should ever be dropped):
- the 243 Hannover chest radiographs in ../shared/data (CC BY 3.0: "COVID-19 Image Repository",
  Institute for Diagnostic and Interventional Radiology, Hannover Medical School,
  DOI 10.25835/0090041; any table derived from them must carry this credit). Their data.csv
  names each image's patient, so pairs of different patients and pairs of one patient's
  different studies are counted apart; the false-positive rate is the different-patient one;
- the single-frame grayscale DICOMs of pydicom-data (two chest CRs, a CT, an NM, an OT);
- procedural phantoms (`data.phantom`), which share one template and so sit closer together
  than real films: they show how the check treats a homogeneous synthetic set.

Near-duplicates (each should be caught): every Hannover image and pydicom-data radiograph altered
the ways the same film reaches a collection twice (`VARIANTS`: JPEG re-encoding, another
resolution, a trimmed border, a shift, another bit depth, another window), and pydicom-data's
own copies: lossy JPEG 2000 (`*_J2KI`, `*_UNCI`) of its lossless originals, and an 8-bit twin.

Extrapolation to a corpus of n images. Let p(t) be the share of distinct-patient pairs within t
bits. Image i of n is dropped when one of the i-1 images before it lies within t; if pairs do so
independently, that happens with probability 1 - (1-p)^(i-1) ~ 1 - exp(-(i-1) p), and the
expected dropped share of the corpus is 1 - (1 - exp(-n p)) / (n p). A 243-image sample shows
p(t) only down to about 1 / 28,000 pairs, while n = 10^6 needs p near 10^-8, so p(t) is taken from
a normal fitted to the lower half of the different-patient distances (`normal_tail`), which the
table sets beside the observed share where there are pairs to count, and beside a whole-
distribution fit that overstates the observed tail (a pessimistic bound). Images are not alike in
how many neighbours they have; since 1 - exp(-x) is concave, that lowers the dropped share below
the formula's for the same p, so the formula errs high too. The Hannover films come from one hospital,
one ward population and one kind of device; a many-site corpus is likely more varied, so this
is a pessimistic (high) estimate for it, and an honest one for a single-site export.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from raydiology.bench import publish
from raydiology.data.dedup import DEFAULT_MAX_DISTANCE, hamming, perceptual_hash

HANNOVER = Path(__file__).resolve().parents[3].parent / "shared/data/hannover-cxr"
CREDIT = (
    "Hannover images: COVID-19 Image Repository, Institute for Diagnostic and Interventional "
    "Radiology, Hannover Medical School (DOI 10.25835/0090041), CC BY 3.0"
)
CORPUS_SIZES = (100_000, 1_000_000)
# pydicom-data files that are single-frame grayscale images, and which of them are copies of
# which: lossy JPEG 2000 round trips of the lossless originals, and vlut_04, the 8-bit twin of
# the 12-bit test picture mlut_18 (pixel correlation 0.99999).
PYDICOM_DISTINCT = (
    "RG1_UNCR.dcm",
    "RG3_UNCR.dcm",
    "693_UNCR.dcm",
    "JPEG2000_UNC.dcm",
    "mlut_18.dcm",
)
PYDICOM_COPIES = {
    "RG1_J2KI.dcm": "RG1_UNCR.dcm",
    "RG1_UNCI.dcm": "RG1_UNCR.dcm",
    "RG3_J2KI.dcm": "RG3_UNCR.dcm",
    "RG3_UNCI.dcm": "RG3_UNCR.dcm",
    "693_UNCI.dcm": "693_UNCR.dcm",
    "vlut_04.dcm": "mlut_18.dcm",
}
PYDICOM_RADIOGRAPHS = ("RG1_UNCR.dcm", "RG3_UNCR.dcm")


def _to8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    return np.round(a.astype(np.float32) / 257.0).astype(np.uint8)


def _jpeg(a: np.ndarray, quality: int = 75) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(_to8(a)).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf))


def _scaled(a: np.ndarray, factor: float) -> np.ndarray:
    img = Image.fromarray(_to8(a))
    size = (round(img.width * factor), round(img.height * factor))
    return np.asarray(img.resize(size, Image.Resampling.LANCZOS))


def _crop(a: np.ndarray, share: float = 0.03) -> np.ndarray:
    """Border trimmed by `share` of each side (a re-export without the film's margin)."""
    dy, dx = round(a.shape[0] * share), round(a.shape[1] * share)
    return a[dy : a.shape[0] - dy, dx : a.shape[1] - dx]


def _shift(a: np.ndarray, share: float = 0.02) -> np.ndarray:
    """Content moved right and down by `share` of the side, the gap filled black."""
    dy, dx = round(a.shape[0] * share), round(a.shape[1] * share)
    out = np.zeros_like(a)
    out[dy:, dx:] = a[: a.shape[0] - dy, : a.shape[1] - dx]
    return out


def _other_depth(a: np.ndarray) -> np.ndarray:
    return a.astype(np.uint16) * np.uint16(257) if a.dtype == np.uint8 else _to8(a)


def _gamma(a: np.ndarray, gamma: float) -> np.ndarray:
    top = 255.0 if a.dtype == np.uint8 else 65535.0
    return np.round(top * (a / top) ** gamma).astype(a.dtype)


def _window(a: np.ndarray) -> np.ndarray:
    """A second windowing: the 2nd..98th percentiles stretched to the full range, ends clipped."""
    lo, hi = np.percentile(a, [2, 98])
    top = 255.0 if a.dtype == np.uint8 else 65535.0
    return np.round(np.clip((a - lo) / max(hi - lo, 1.0), 0, 1) * top).astype(a.dtype)


VARIANTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "jpeg q75": _jpeg,
    "jpeg q50": lambda a: _jpeg(a, 50),
    "resize 95%": lambda a: _scaled(a, 0.95),
    "resize 105%": lambda a: _scaled(a, 1.05),
    "resize 50% + jpeg q75": lambda a: _jpeg(_scaled(a, 0.5)),
    "8<->16 bit": _other_depth,
    "gamma 0.8": lambda a: _gamma(a, 0.8),
    "gamma 1.25": lambda a: _gamma(a, 1.25),
    "window 2-98%": _window,
    "crop 3% border": _crop,
    "shift 2%": _shift,
}


def hannover_images(root: Path = HANNOVER) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """{image id: 8-bit pixels} and {image id: patient id} of the Hannover set."""
    png = root / "png"
    if not png.is_dir():
        raise FileNotFoundError(f"{png}: Hannover radiographs not found (../shared/data absent)")
    with open(root / "data.csv", newline="") as f:
        patients = {row["image_id"]: row["patient_id"] for row in csv.DictReader(f)}
    images = {}
    for path in sorted(png.glob("*.png")):
        if path.stem not in patients:
            raise ValueError(f"{path}: no row for image {path.stem!r} in {root / 'data.csv'}")
        images[path.stem] = np.asarray(Image.open(path).convert("L"))
    return images, patients


def pydicom_images(names: tuple[str, ...] | list[str]) -> dict[str, np.ndarray]:
    """Presentation pixels of pydicom-data files, as ingest decodes them."""
    from pydicom.data import get_testdata_file

    from raydiology.data.dicom import load_dicom

    images = {}
    for name in names:
        path = get_testdata_file(name)
        if path is None:
            raise FileNotFoundError(f"{name}: not in pydicom-data (pip install pydicom-data)")
        images[name] = load_dicom(str(path)).pixels
    return images


def phantom_images(n: int, size: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    from raydiology.data.phantom import make_phantom

    rng = np.random.default_rng(seed)
    return {f"phantom-{i}": make_phantom(rng, size=size).image for i in range(n)}


def pair_distances(hashes: dict[str, int]) -> list[tuple[str, str, int]]:
    return [
        (a, b, hamming(ha, hb)) for (a, ha), (b, hb) in itertools.combinations(hashes.items(), 2)
    ]


def normal_tail(distances: list[int], *, lower_half: bool = False) -> Callable[[int], float]:
    """P(distance <= t) under a normal fitted to `distances`, with a continuity correction of
    half the lattice step (32 of the 64 pHash bits are set, so distances are even: step 2).

    The whole-distribution fit (mean, spread) overstates the observed lower tail about 3-fold
    at 8-10 bits on the Hannover pairs; `lower_half` centres the normal on the median and takes
    its spread from the distances at or below it, the side that decides false positives, and
    meets the observed pair counts at 8-10 bits within about 30 %.
    """
    step = math.gcd(*distances) or 1
    if lower_half:
        centre = statistics.median(distances)
        low = [d for d in distances if d <= centre]
        sd = math.sqrt(sum((d - centre) ** 2 for d in low) / len(low))
    else:
        centre, sd = statistics.fmean(distances), statistics.pstdev(distances)

    def tail(t: int) -> float:
        z = ((t // step) * step + step / 2 - centre) / sd
        return 0.5 * math.erfc(-z / math.sqrt(2))

    return tail


def dropped_share(p: float, n: int) -> float:
    """Expected share of n distinct images dropped when each pair is within range with
    probability p, independently (see the module docstring)."""
    m = n * p
    if m < 1e-3:  # the closed form cancels; its series is exact to ~m^4 / 120 here
        return m / 2 - m**2 / 6 + m**3 / 24
    return 1 - (1 - math.exp(-m)) / m


def run_dedup_benchmark(
    *, hannover: Path = HANNOVER, phantoms: int = 200, max_bits: int = 16
) -> dict[str, Any]:
    """Every measured figure per threshold 0..max_bits, and the threshold `choose_threshold`
    picks from them."""
    images, patients = hannover_images(hannover)
    dicoms = pydicom_images([*PYDICOM_DISTINCT, *PYDICOM_COPIES])
    hashes = {k: perceptual_hash(v) for k, v in images.items()}
    dicom_hashes = {k: perceptual_hash(v) for k, v in dicoms.items()}
    phantom_hashes = {k: perceptual_hash(v) for k, v in phantom_images(phantoms).items()}

    pairs = pair_distances(hashes)
    other = [d for a, b, d in pairs if patients[a] != patients[b]]
    same = [d for a, b, d in pairs if patients[a] == patients[b]]
    # Everything distinct together: Hannover, pydicom-data originals, phantoms, across sources.
    distinct = {**hashes, **{k: dicom_hashes[k] for k in PYDICOM_DISTINCT}, **phantom_hashes}
    all_pairs = [d for _, _, d in pair_distances(distinct)]
    phantom_pairs = [d for _, _, d in pair_distances(phantom_hashes)]
    nearest = {
        k: min(hamming(h, g) for j, g in distinct.items() if j != k) for k, h in distinct.items()
    }

    # Near-duplicates: distance from each altered copy to its original.
    sources = {**images, **{k: dicoms[k] for k in PYDICOM_RADIOGRAPHS}}
    variants: dict[str, list[int]] = {name: [] for name in VARIANTS}
    for key, pixels in sources.items():
        original = hashes.get(key, dicom_hashes.get(key))
        for name, alter in VARIANTS.items():
            variants[name].append(hamming(perceptual_hash(alter(pixels)), original))  # type: ignore[arg-type]
    variants["pydicom-data copies"] = [
        hamming(dicom_hashes[copy], dicom_hashes[orig]) for copy, orig in PYDICOM_COPIES.items()
    ]
    near = [d for ds in variants.values() for d in ds]

    tail, whole = normal_tail(other, lower_half=True), normal_tail(other)
    rows = []
    for t in range(max_bits + 1):
        p_model = tail(t)
        rows.append(
            {
                "bits": t,
                "other_patient_pairs": sum(d <= t for d in other),
                "same_patient_pairs": sum(d <= t for d in same),
                "all_distinct_pairs": sum(d <= t for d in all_pairs),
                "phantom_pairs": sum(d <= t for d in phantom_pairs),
                "dropped_in_sample": sum(d <= t for d in nearest.values()) / len(nearest),
                "p_observed": sum(d <= t for d in other) / len(other),
                "p_model": p_model,
                **{f"dropped_at_{n}": dropped_share(p_model, n) for n in CORPUS_SIZES},
                "p_whole_fit": whole(t),
                "dropped_at_1000000_whole_fit": dropped_share(whole(t), 1_000_000),
                "caught": sum(d <= t for d in near) / len(near),
                "caught_by_variant": {
                    k: sum(d <= t for d in ds) / len(ds) for k, ds in variants.items()
                },
            }
        )
    report = {
        "credit": CREDIT,
        "images": {
            "hannover": len(hashes),
            "hannover_patients": len(set(patients[k] for k in hashes)),
            "pydicom": len(PYDICOM_DISTINCT),
            "phantoms": len(phantom_hashes),
        },
        "pairs": {
            "other_patient": len(other),
            "same_patient": len(same),
            "all_distinct": len(all_pairs),
            "phantom": len(phantom_pairs),
        },
        "other_patient_fit": {
            "mean": statistics.fmean(other),
            "sd": statistics.pstdev(other),
            "median": statistics.median(other),
            "lower_sd": math.sqrt(
                statistics.fmean(
                    (d - statistics.median(other)) ** 2
                    for d in other
                    if d <= statistics.median(other)
                )
            ),
        },
        "near_duplicates": len(near),
        "variant_distance": {
            k: {"median": statistics.median(ds), "max": max(ds), "n": len(ds)}
            for k, ds in variants.items()
        },
        "rows": rows,
        # 32 of 64 bits are set in every pHash, so distances are even and an odd threshold acts
        # as the even one below it
        "step": math.gcd(*other, *near),
        "default": DEFAULT_MAX_DISTANCE,
    }
    report["chosen"] = choose_threshold(report)
    return report


MAX_DROPPED_AT_1M = 0.01  # the share of distinct images a 10^6-image ingest may lose


def choose_threshold(report: dict[str, Any]) -> int:
    """The largest threshold with no distinct pair of the measured sets (Hannover of either kind,
    pydicom-data, phantoms, across sources) within range and at most `MAX_DROPPED_AT_1M` of a
    10^6-image corpus expected to be dropped; 0 (identical hashes) when none qualifies."""
    step = report.get("step", 1)
    ok = [
        r["bits"]
        for r in report["rows"]
        if r["bits"] % step == 0
        and r["all_distinct_pairs"] == 0
        and r["dropped_at_1000000"] <= MAX_DROPPED_AT_1M
    ]
    return max(ok, default=0)


def format_table(report: dict[str, Any]) -> str:
    pairs, images, fit = report["pairs"], report["images"], report["other_patient_fit"]
    lines = [
        f"distinct: {images['hannover']} Hannover CXRs of {images['hannover_patients']} patients "
        f"({pairs['other_patient']} different-patient / {pairs['same_patient']} same-patient "
        f"pairs), {images['pydicom']} pydicom-data images, {images['phantoms']} phantoms "
        f"({pairs['all_distinct']} pairs in all); near-duplicates: {report['near_duplicates']}",
        f"different-patient distances: mean {fit['mean']:.1f}, sd {fit['sd']:.2f}, median "
        f"{fit['median']:g}, lower-half sd {fit['lower_sd']:.2f} bits",
        f"bits: threshold, in steps of {report['step']} (distances between these hashes are "
        "multiples of it); "
        "p: share of different-patient pairs within range (observed; lower-tail normal fit); "
        "dropped @n: expected share of n distinct images dropped, from the fit "
        "(last column: from a whole-distribution normal, pessimistic)",
        "",
        "| bits | diff-patient pairs | same-patient pairs | all distinct pairs | phantom pairs "
        "| dropped in sample | p observed | p fit | dropped @1e5 | dropped @1e6 | caught "
        "| dropped @1e6 (whole fit) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"][:: report["step"]]:
        lines.append(
            f"| {r['bits']} | {r['other_patient_pairs']} | {r['same_patient_pairs']} "
            f"| {r['all_distinct_pairs']} | {r['phantom_pairs']} | {r['dropped_in_sample']:.1%} "
            f"| {r['p_observed']:.1e} | {r['p_model']:.1e} | {r['dropped_at_100000']:.2%} "
            f"| {r['dropped_at_1000000']:.2%} | {r['caught']:.1%} "
            f"| {r['dropped_at_1000000_whole_fit']:.1%} |"
        )
    lines += [
        "",
        "| near-duplicate | n | median bits | max bits | caught at 0 | at 2 | at 4 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = report["rows"]
    for name, v in report["variant_distance"].items():
        caught = [rows[t]["caught_by_variant"][name] for t in (0, 2, 4) if t < len(rows)]
        lines.append(
            f"| {name} | {v['n']} | {v['median']:g} | {v['max']} | "
            + " | ".join(f"{c:.1%}" for c in caught)
            + " |"
        )
    lines += [
        "",
        f"chosen threshold: {report['chosen']} bits (largest with no distinct pair in range and "
        f"<= {MAX_DROPPED_AT_1M:.0%} expected dropped at 10^6); default in dedup.py: "
        f"{report['default']}",
        report["credit"],
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raydiology.bench.dedup", description=__doc__)
    parser.add_argument("--hannover", type=Path, default=HANNOVER, help="hannover-cxr folder")
    parser.add_argument("--phantoms", type=int, default=200, help="phantom images")
    parser.add_argument("--max-bits", type=int, default=16)
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)
    report = run_dedup_benchmark(
        hannover=args.hannover, phantoms=args.phantoms, max_bits=args.max_bits
    )
    publish(report, format_table(report), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Procedural chest PA radiograph phantoms with findings and matching templated reports.

Built-in data, so that every experiment (and its smoke test) runs with nothing downloaded, and
so that report generators and labelers have image-report pairs whose ground truth is exact.

The renderer builds an attenuation map in patient coordinates and maps it to film brightness:
air (lungs, background) is dark, soft tissue grey, bone and heart bright. Coordinates: `u`
runs left to right across the film and `v` top to bottom, both about -1..1. The film is PA, so
the patient's right is on the viewer's left (`u < 0`); "right"/"left" in `side` and in the
reports are the patient's. Everything is whole-array numpy (no per-pixel Python loops).

Every random draw happens up front in a fixed order, whatever findings are chosen, so two
phantoms from the same generator state differ only by the findings forced on or off: that is
what lets tests check that each finding changes the image where it should.

A phantom can also be filmed LATERAL (`view="LATERAL"`): the same patient and findings from
the side, anterior on the viewer's left, so a two-view study (PA + LATERAL) shares one report.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from raydiology.data.corpus import CorpusWriter, Manifest, progress_iter

FINDINGS = ("cardiomegaly", "pleural_effusion", "pneumothorax", "lung_lesion", "support_devices")
LABEL_COLUMNS = ("label_no_finding", *(f"label_{f}" for f in FINDINGS))
# CheXpert's convention: "no finding" ignores support devices, which are not a pathology.
PATHOLOGIES = FINDINGS[:4]
VIEWS = ("PA", "LATERAL")
SEXES = ("F", "M")
AGE_GROUPS = ("18-39", "40-59", "60-79", "80+")
# Structures whose masks the generator can write (PA films): the anatomy JSRT-style
# segmentation datasets annotate, plus the lesion when one is drawn (empty mask otherwise).
MASK_CLASSES = ("lungs", "heart", "clavicles", "lesion")


@dataclass(frozen=True, kw_only=True)
class PhantomCase:
    image: np.ndarray  # [size, size] uint8
    findings: dict[str, bool]
    side: dict[str, str]  # finding -> "left"/"right" (patient's side) for lateral findings
    report: str
    view: str = "PA"
    # MASK_CLASSES -> [size, size] uint8 0/1, when asked for (PA only); None otherwise
    masks: dict[str, np.ndarray] | None = None
    # [[x0, y0, x1, y1, "lung_lesion", phrase]] (pixels, the lesion's extent and the report
    # sentence naming it; [] without a lesion), when asked for (PA only); None otherwise
    boxes: list[list[float | str]] | None = None


@dataclass(frozen=True, kw_only=True)
class _Anatomy:
    """Per-image geometry and densities, all drawn before any finding is decided."""

    scale: float
    shift: tuple[float, float]
    angle: float
    body_half_width: float
    lung_width: float
    apex: float
    dome: dict[str, float]  # diaphragm dome height per side ("right" sits higher)
    heart_center: tuple[float, float]
    heart_axes: tuple[float, float]
    heart_tilt: float
    soft: float
    air: float
    bone: float
    rib_phase: float
    gamma: float
    low: float
    high: float
    noise: float
    seeds: dict[str, int] = field(default_factory=dict)


# The lung outline helpers take a full grid or, when placing a lesion, one float32 point.
_ArrayOrScalar = np.ndarray | np.floating[Any]


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """Soft step 0 -> 1 across `width` centred at x = 0 (a cheap anti-aliased edge)."""
    return np.clip(x * (1.0 / width) + 0.5, 0.0, 1.0)


def _bump(x: np.ndarray, half: float | np.ndarray, edge: float) -> np.ndarray:
    """1 where |x| < half, falling to 0 over `edge`: a band of given thickness."""
    return np.clip((half - np.abs(x)) * (1.0 / edge) + 0.5, 0.0, 1.0)


def _sharpen(x: np.ndarray) -> np.ndarray:
    """x**8 by squaring (np.power with a float exponent is several times slower)."""
    x = x * x
    x *= x
    x *= x
    return x


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise: `cells`² random values upsampled bicubically to size²."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _box_blur(img: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur via cumulative sums (edges clamp); cost independent of radius."""
    if radius < 1:
        return img
    k = 2 * radius + 1
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius + 1, radius)
        c = np.cumsum(np.pad(img, pad, mode="edge"), axis=axis, dtype=np.float32)
        hi = [slice(None)] * 2
        lo = [slice(None)] * 2
        hi[axis] = slice(k, None)
        lo[axis] = slice(0, -k)
        img = (c[tuple(hi)] - c[tuple(lo)]) * (1.0 / k)
    return img


_RENDER_MAX = 512  # anatomy is smooth: render it at most this size, then upsample


def _to_pixels(a: _Anatomy, size: int, points: np.ndarray) -> list[tuple[float, float]]:
    """Patient (u, v) points -> film pixel coordinates (inverse of `_Frame`'s mapping)."""
    c, s = math.cos(a.angle) * a.scale, math.sin(a.angle) * a.scale
    x = a.shift[0] + c * points[:, 0] - s * points[:, 1]
    y = a.shift[1] + s * points[:, 0] + c * points[:, 1]
    px, py = (x + 1.0) * size / 2.0 - 0.5, (y + 1.0) * size / 2.0 - 0.5
    return list(zip(px.tolist(), py.tolist(), strict=True))


class _Frame:
    """Film pixel grid expressed in patient coordinates (after the image's pose jitter)."""

    def __init__(self, size: int, anatomy: _Anatomy) -> None:
        self.size = size
        self.a = anatomy
        x = ((np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0).astype(np.float32)
        dx, dy = anatomy.shift
        c = math.cos(anatomy.angle) / anatomy.scale
        s = math.sin(anatomy.angle) / anatomy.scale
        col, row = (x - dx)[None, :], (x - dy)[:, None]
        self.u = (c * col + s * row).astype(np.float32)
        self.v = (-s * col + c * row).astype(np.float32)
        # Edges ~1.5 px wide at low sizes so small films are anti-aliased, finer at large.
        self.edge = max(0.01, 3.0 / size)

    def lateral(self, side: str) -> np.ndarray:
        """Distance from the midline toward `side` (patient's right is the film's left)."""
        return -self.u if side == "right" else self.u


# -- geometry of one hemithorax, in lateral coordinate t (>= 0) and height v -----------------


def _lung_lateral_edge(a: _Anatomy, v: _ArrayOrScalar) -> _ArrayOrScalar:
    return a.lung_width - 0.47 * (v - 0.3) ** 2


def _lung_top(a: _Anatomy, t: _ArrayOrScalar) -> _ArrayOrScalar:
    return a.apex + 2.4 * (t - 0.24) ** 2


def _lung_bottom(a: _Anatomy, side: str, t: _ArrayOrScalar) -> _ArrayOrScalar:
    # The dome peaks near mid-lung and falls to a deep, sharp costophrenic angle laterally.
    return a.dome[side] + 0.22 * ((t - 0.3) / 0.42) ** 2


def _lung_mask(a: _Anatomy, side: str, t: np.ndarray, v: np.ndarray, edge: float) -> np.ndarray:
    m = _ramp(v - _lung_top(a, t), edge)
    m *= _ramp(_lung_bottom(a, side, t) - v, edge)
    m *= _ramp(_lung_lateral_edge(a, v) - t, edge)
    m *= _ramp(t - 0.06, edge)
    return m


def _heart_ellipse(a: _Anatomy, enlarged: bool) -> tuple[float, float, float, float]:
    """Centre and semi-axes; cardiomegaly widens the heart mostly toward the patient's left."""
    (hu, hv), (ha, hb) = a.heart_center, a.heart_axes
    if enlarged:
        return hu + 0.07, hv + 0.02, ha * 1.45, hb * 1.12
    return hu, hv, ha, hb


def _lesion_centre(a: _Anatomy, draw: _FindingDraw) -> tuple[float, float]:
    """A nodule position well inside its lung and clear of the hilum and heart."""
    rng = np.random.default_rng(a.seeds["lesion"])
    side, rad = draw.lesion_side, draw.lesion_radius
    hu, hv, ha, hb = _heart_ellipse(a, enlarged=True)
    for _ in range(500):
        t, v = float(rng.uniform(0.2, 0.62)), float(rng.uniform(-0.5, 0.25))
        ta, va = np.float32(t), np.float32(v)
        inside = (
            va - _lung_top(a, ta) > rad + 0.04
            and _lung_bottom(a, side, ta) - va > rad + 0.04
            and _lung_lateral_edge(a, va) - ta > rad + 0.04
        )
        u = -t if side == "right" else t
        clear = (
            math.hypot(t - 0.16, v + 0.06) > 0.16
            and math.hypot((u - hu) / ha, (v - hv) / hb) > 1.15
        )
        if inside and clear:
            return t, v
    return 0.42, -0.3  # upper zone: inside every drawn lung shape


# -- drawing ------------------------------------------------------------------------------


def _chest(
    f: _Frame,
    present: dict[str, bool],
    draw: _FindingDraw,
    lesion: tuple[float, float],
    masks: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Attenuation map of the chest with its findings (devices excepted), at `f.size`.

    `masks`, when given, receives each of MASK_CLASSES as a soft 0..1 map drawn from the
    very shapes that make the image (threshold at 0.5 for a binary mask)."""
    a, u, v, e = f.a, f.u, f.v, f.edge
    tex = np.random.default_rng(a.seeds["texture"])

    # Body: an elliptic cylinder (thicker in the middle), shoulders sloping from the neck.
    au = np.abs(u)
    shoulder = np.clip((au - 0.13) * (1.0 / 0.75), 0.0, 1.0)
    top = -1.15 + 0.37 * shoulder * shoulder * (3.0 - 2.0 * shoulder)
    chord = np.clip(1.0 - (u * (1.0 / a.body_half_width)) ** 2, 0.0, 1.0)
    outline = _ramp(chord, 3 * e) * _ramp(v - top, 3 * e)
    thickness = np.sqrt(chord)
    density = a.soft * (0.3 + 0.7 * thickness) * outline
    density *= 1.0 + 0.05 * _smooth_noise(tex, f.size, 10)

    # Mediastinum: a midline column that widens into the heart, plus the aortic knob.
    hu, hv, ha, hb = _heart_ellipse(a, present["cardiomegaly"])
    cu, su = math.cos(a.heart_tilt), math.sin(a.heart_tilt)
    du, dv = u - hu, v - hv
    r = np.sqrt(((cu * du + su * dv) * (1.0 / ha)) ** 2 + ((-su * du + cu * dv) * (1.0 / hb)) ** 2)
    heart = _ramp(1.0 - r, e / min(ha, hb))
    column = _ramp(0.105 + 0.03 * np.clip(v + 0.3, 0.0, 1.0) - np.abs(u - 0.01), e)
    knob = _ramp(1.0 - np.hypot((u - 0.11) * (1.0 / 0.06), (v + 0.34) * (1.0 / 0.06)), 0.3)
    mediastinum = np.maximum(np.maximum(heart, column), knob)
    density += 0.06 * a.soft * heart * thickness * _ramp(a.dome["left"] - v, 0.1)

    # Lungs: air, minus whatever the mediastinum and findings displace.
    lungs, shapes = {}, {}
    for side in ("right", "left"):
        shapes[side] = _lung_mask(a, side, f.lateral(side), v, 2.5 * e)
        # Less air at the bases and medially, where more tissue overlaps the lung.
        depth = (
            0.8 + 0.2 * np.clip(0.4 - v, 0.0, 1.0) + 0.1 * np.clip(f.lateral(side) - 0.3, 0.0, 0.4)
        )
        lungs[side] = shapes[side] * (1.0 - mediastinum) * depth
    markings = _markings(f, lungs, tex)
    if masks is not None:  # lung fields as JSRT draws them: without the heart's shadow
        masks["lungs"] = np.maximum(shapes["right"], shapes["left"]) * (1.0 - mediastinum)
        masks["heart"] = heart
        masks["lesion"] = np.zeros_like(v)

    extra = np.zeros_like(v)
    if present["pleural_effusion"]:
        s = draw.effusion_side
        t = f.lateral(s)
        # Fluid settles at the base and climbs the lateral wall (meniscus).
        surface = (
            a.dome[s]
            - draw.effusion_level
            - 0.2 * np.clip((t - 0.08) * (1.0 / 0.62), 0.0, 1.0) ** 2.5
        )
        fluid = _ramp(v - surface, 3 * e) * shapes[s]
        lungs[s] *= 1.0 - fluid
        markings[s] *= 1.0 - fluid
        extra += 0.06 * a.soft * fluid
    if present["pneumothorax"]:
        s = draw.pneumothorax_side
        t = f.lateral(s)
        gap = draw.pneumothorax_gap
        # The collapsed lung's edge: an ellipse inside the apex; beyond it only air.
        ru, rv = 0.31 - 0.8 * gap, 0.7 - 1.2 * gap
        r = np.hypot((t - 0.36) * (1.0 / ru), (v + 0.02) * (1.0 / rv))
        upper = _ramp(0.05 - v, 0.3)
        region = _ramp(r - 1.0, e / ru) * upper * shapes[s]
        markings[s] *= 1.0 - region
        lungs[s] *= 1.0 + 0.5 * region
        line = _bump((r - 1.0) * ru, max(0.0035, 0.8 / f.size), max(0.003, 1.5 / f.size))
        extra += 0.35 * a.soft * line * upper * shapes[s] * (1.0 - mediastinum)
    if present["lung_lesion"]:
        t = f.lateral(draw.lesion_side)
        lt, lv = lesion
        d2 = ((t - lt) ** 2 + (v - lv) ** 2) * (1.0 / draw.lesion_radius**2)
        wobble = 1.0 + 0.08 * _smooth_noise(tex, f.size, 24)  # lobulated, not a perfect disc
        extra += 0.5 * a.air * np.sqrt(np.clip(1.0 - d2 * wobble, 0.0, 1.0)) ** 0.7
        if masks is not None:
            masks["lesion"] = _ramp(1.0 - d2 * wobble, 0.1)

    for side in ("right", "left"):
        density -= a.air * lungs[side]
        density += 0.45 * a.air * markings[side]

    # Gastric air bubble under the left hemidiaphragm; trachea and main bronchi.
    bubble = _ramp(
        1.0 - np.hypot((u - 0.34) * (1.0 / 0.1), (v - a.dome["left"] - 0.14) * (1.0 / 0.055)), 0.4
    )
    airway = _bump(u - 0.01, 0.03, e) * _ramp(-0.33 - v, e)
    for side, slope in (("right", 1.3), ("left", 0.75)):
        t = f.lateral(side) + (0.01 if side == "right" else -0.01)
        bronchus = _bump(v - (-0.33 + slope * t), 0.02, e) * _ramp(t, e) * _ramp(0.15 - t, e)
        airway = np.maximum(airway, bronchus)
    density -= a.air * (0.3 * bubble + 0.22 * airway)

    density += _bones(f, masks) + extra
    return density


def _lateral_chest(
    f: _Frame, present: dict[str, bool], draw: _FindingDraw, lesion: tuple[float, float]
) -> np.ndarray:
    """Attenuation map of the same chest seen from the side: `u` runs anterior (left) to
    posterior (right). Both lungs overlap, the heart sits anteriorly on the diaphragm, the
    spine at the back; fluid settles in the posterior costophrenic sulcus."""
    a, u, v, e = f.a, f.u, f.v, f.edge
    tex = np.random.default_rng(a.seeds["texture"])
    chord = np.clip(1.0 - ((u - 0.02) * (1.0 / 0.8)) ** 2, 0.0, 1.0)
    outline = _ramp(chord, 3 * e) * _ramp(v + 1.1 - 0.25 * np.clip(u, 0.0, 1.0), 3 * e)
    density = a.soft * (0.45 + 0.55 * np.sqrt(chord)) * outline
    density *= 1.0 + 0.05 * _smooth_noise(tex, f.size, 10)

    dome = 0.5 * (a.dome["left"] + a.dome["right"])
    bottom = dome + 0.3 * np.clip((u + 0.05) * (1.0 / 0.55), 0.0, None) ** 2  # posterior sulcus
    lung = _ramp(v - (a.apex + 0.9 * (u - 0.05) ** 2), 2.5 * e) * _ramp(bottom - v, 2.5 * e)
    lung *= _ramp(u + 0.62, 2.5 * e) * _ramp(0.42 - u, 2.5 * e)
    hu, hv, ha, hb = -0.22, dome - 0.12, 0.3, 0.27
    if present["cardiomegaly"]:  # fills the retrosternal and retrocardiac clear spaces
        hu, ha, hb = hu + 0.06, ha * 1.35, hb * 1.12
    heart = _ramp(1.0 - np.hypot((u - hu) / ha, (v - hv) / hb), e / min(ha, hb))
    # both lungs reach round the heart, so its shadow is grey rather than solid
    air = lung * (1.0 - 0.7 * heart) * (0.85 + 0.15 * np.clip(0.3 - v, 0.0, 1.0))

    extra = np.zeros_like(v)
    if present["pleural_effusion"]:
        surface = dome - 0.6 * draw.effusion_level + 0.25 - 0.35 * np.clip(u, 0.0, 0.42)
        fluid = _ramp(v - surface, 3 * e) * lung * _ramp(u + 0.1, 0.1)
        air *= 1.0 - fluid
        extra += 0.06 * a.soft * fluid
    if present["pneumothorax"]:  # apical lucency under a thin pleural line
        r = np.hypot((u - 0.0) * (1.0 / 0.5), (v - a.apex - 0.45) * (1.0 / 0.5))
        gap = _ramp(r - (1.0 - draw.pneumothorax_gap), e / 0.5) * _ramp(-0.1 - v, 0.2) * lung
        air *= 1.0 + 0.4 * gap
        line = _bump(r - (1.0 - draw.pneumothorax_gap), max(0.007, 1.6 / f.size), 2 * e)
        extra += 0.3 * a.soft * line * _ramp(-0.1 - v, 0.2) * lung
    if present["lung_lesion"]:
        lt, lv = lesion
        lu = -0.45 + 0.8 * (lt - 0.2) / 0.42  # depth from the PA position, inside the lung
        d2 = ((u - lu) ** 2 + (v - lv) ** 2) * (1.0 / draw.lesion_radius**2)
        extra += 0.5 * a.air * np.sqrt(np.clip(1.0 - d2, 0.0, 1.0)) ** 0.7

    density -= a.air * air
    trachea = _bump(u - (0.04 + 0.05 * np.clip(v + 1.0, 0.0, 1.0)), 0.035, e) * _ramp(-0.3 - v, e)
    density -= 0.25 * a.air * trachea
    # Spine: vertebral bodies with brighter endplates, disc spaces between them.
    phase = (v - a.rib_phase) * (1.0 / 0.12)
    frac = phase - np.floor(phase)
    body = _bump(u - (0.55 - 0.05 * v), 0.1, 2 * e) * _ramp(v + 1.0, 0.05)
    spine = body * (
        0.55 + 0.45 * _bump(frac - 0.5, 0.38, 0.06) + 0.3 * _bump(frac - 0.1, 0.04, 0.03)
    )
    sternum = (
        _bump(u + 0.72 - 0.08 * (v + 0.5), 0.025, 1.5 * e) * _ramp(v + 0.6, e) * _ramp(0.4 - v, e)
    )
    density += a.bone * (0.6 * spine + 0.5 * sternum) + extra
    return density


def _markings(
    f: _Frame, lungs: dict[str, np.ndarray], tex: np.random.Generator
) -> dict[str, np.ndarray]:
    """Vessels fanning out from each hilum, broken up and fading toward the periphery."""
    v = f.v
    bend = _smooth_noise(tex, f.size, 40)
    breaks = np.clip(0.6 + 0.8 * _smooth_noise(tex, f.size, 56), 0.0, 1.0)
    markings = {}
    for side in ("right", "left"):
        dt, dv = f.lateral(side) - 0.12, v + 0.08
        radius = np.hypot(dt, dv)
        angle = np.arctan2(dv, dt)
        wiggle = 1.2 * np.sin(radius * 11.0) + 0.9 * bend
        vessels = _sharpen(0.5 + 0.5 * np.cos(angle * 17.0 + wiggle))
        vessels += 0.6 * _sharpen(0.5 + 0.5 * np.cos(angle * 29.0 - 1.3 * wiggle)) ** 2
        vessels *= breaks * np.exp(-radius * (1.0 / 0.3))
        vessels *= _ramp(radius - 0.09, 0.08)  # no starburst at the convergence point
        hilum = np.exp(-((radius * (1.0 / 0.09)) ** 2)) * (1.0 + 0.5 * bend)
        markings[side] = (vessels + 0.9 * hilum) * lungs[side]
    return markings


def _bones(f: _Frame, masks: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Ribs (posterior and fainter anterior), clavicles (into `masks` when given) and spine."""
    a, u, v, e = f.a, f.u, f.v, f.edge
    bones = np.zeros_like(v)
    if masks is not None:
        masks["clavicles"] = np.zeros_like(v)
    for side in ("right", "left"):
        t = f.lateral(side)
        cage = _ramp(t - 0.09, e) * _ramp(_lung_lateral_edge(a, v) + 0.06 - t, 4 * e)
        # Posterior ribs arch up from the spine and fall away laterally; the spacing widens
        # toward the base. Each period holds one rib with a brighter lower cortex.
        z = (v + 0.42 * t - 0.85 * t * t - a.apex - a.rib_phase + 0.02) * (1.0 / 1.2)
        phase = 10.0 * np.clip(z, 0.0, 1.0) ** 0.8
        frac = phase - np.floor(phase)
        rib = _bump(frac - 0.35, 0.14, 0.1) * (0.75 + 0.5 * _bump(frac - 0.47, 0.03, 0.05))
        rib *= _ramp(z, 0.01) * _ramp(1.0 - z, 0.02) * cage
        # Anterior ribs slope down toward the sternum; fainter, further from the film.
        za = (v + 0.6 * t - a.apex - 0.2 - a.rib_phase) * (1.0 / 1.1)
        frac_a = 7.0 * np.clip(za, 0.0, 1.0)
        frac_a -= np.floor(frac_a)
        rib_a = _bump(frac_a - 0.5, 0.2, 0.12) * _ramp(za, 0.01) * _ramp(1.0 - za, 0.01)
        rib_a *= cage * _ramp(t - 0.22, 0.08)
        # Clavicle: from the sternal end out and up to the shoulder.
        tc = np.clip(t, 0.0, 0.8)
        centre = a.apex + 0.14 - 0.5 * tc + 0.42 * tc * tc
        half = 0.022 + 0.012 * _ramp(0.2 - t, 0.15)  # the sternal end is thicker
        clavicle = _bump(v - centre, half, 1.5 * e) * _ramp(t - 0.06, e) * _ramp(0.72 - t, 2 * e)
        bones += 0.5 * rib + 0.25 * rib_a + 0.8 * clavicle
        if masks is not None:
            masks["clavicles"] = np.maximum(masks["clavicles"], clavicle)
    spine = (
        _bump(u - 0.01, 0.07, 3 * e)
        * (1.0 - 0.5 * _ramp(v - 0.5, 0.3))
        * (0.85 + 0.15 * np.cos((v - a.rib_phase) * (2 * math.pi / 0.11)))
    )
    bones += 0.3 * spine
    return a.bone * bones


_DEVICE_PATHS = {  # (u, v) polylines per view
    "PA": {
        "ett": [(0.01, -1.2), (0.015, -0.8), (0.01, -0.45)],
        "cvc": [(-0.2, -1.15), (-0.16, -0.85), (-0.1, -0.6), (-0.075, -0.4), (-0.07, -0.2)],
        "ngt": [(0.0, -1.2), (-0.015, -0.5), (0.0, 0.1), (0.12, 0.5), (0.32, 0.56)],
    },
    "LATERAL": {  # trachea in front of the spine; the oesophagus just behind it
        "ett": [(0.02, -1.2), (0.06, -0.8), (0.08, -0.45)],
        "cvc": [(-0.2, -1.15), (-0.1, -0.85), (-0.02, -0.6), (0.0, -0.35), (0.0, -0.2)],
        "ngt": [(0.1, -1.2), (0.16, -0.5), (0.2, 0.1), (0.0, 0.55), (-0.2, 0.6)],
    },
}


def _draw_devices(a: _Anatomy, size: int, kind: str, view: str = "PA") -> np.ndarray:
    """Radio-opaque tubes and lines as a 0..1 mask at the film's full size (drawn by PIL)."""
    mask = Image.new("L", (size, size), 0)
    pen = ImageDraw.Draw(mask)
    width = max(2, round(size / 220))
    paths = _DEVICE_PATHS[view]
    for name in kind.split("+"):
        pts = np.asarray(paths[name], dtype=np.float64)
        # Resample the path densely, then smooth it so the joints curve.
        s = np.linspace(0, len(pts) - 1, 16 * len(pts))
        dense = np.stack([np.interp(s, np.arange(len(pts)), pts[:, i]) for i in (0, 1)], 1)
        kernel = np.ones(11) / 11
        dense = np.stack(
            [np.convolve(np.pad(c, 5, mode="edge"), kernel, "valid") for c in dense.T], 1
        )
        pen.line(_to_pixels(a, size, dense), fill=255, width=width, joint="curve")
    return _box_blur(np.asarray(mask, dtype=np.float32) * (1.0 / 255.0), max(0, width // 3))


def _anatomy(rng: np.random.Generator, pose: float = 1.0) -> _Anatomy:
    """`pose` widens the patient's placement on the film (shift, size, tilt) by that factor;
    1 is a well-centred PA film. The draws stay the same in number and order."""
    u = rng.uniform
    dome_left = u(0.34, 0.42)
    return _Anatomy(
        scale=u(1.0 - 0.1 * pose, 1.0),
        shift=(u(-0.04 * pose, 0.04 * pose), u(0.04 - 0.04 * pose, 0.04 + 0.04 * pose)),
        angle=math.radians(u(-3.0 * pose, 3.0 * pose)),
        body_half_width=u(0.88, 0.98),
        lung_width=u(0.68, 0.75),
        apex=u(-0.72, -0.64),
        dome={"left": dome_left, "right": dome_left - u(0.02, 0.07)},
        heart_center=(u(0.06, 0.1), u(0.3, 0.36)),
        heart_axes=(0.28 * u(0.93, 1.05), 0.26 * u(0.93, 1.07)),
        heart_tilt=math.radians(u(-25, -12)),
        soft=u(0.42, 0.48),
        air=u(0.3, 0.34),
        bone=u(0.15, 0.2),
        rib_phase=u(-0.02, 0.02),
        gamma=u(0.85, 1.15),
        low=u(0.0, 0.04),
        high=u(0.9, 1.0),
        noise=u(0.008, 0.018),
        seeds={k: int(rng.integers(2**63)) for k in ("texture", "noise", "lesion")},
    )


@dataclass(frozen=True, kw_only=True)
class _FindingDraw:
    """Details of every finding, drawn whether or not the finding is present."""

    effusion_side: str
    effusion_level: float  # how far the fluid's medial surface rises above the dome
    pneumothorax_side: str
    pneumothorax_gap: float  # pleural line to chest wall at the apex, normalized units
    lesion_side: str
    lesion_radius: float
    device: str  # "ett", "cvc", "ngt", joined by "+"
    phrasing: int  # seed for the report's wording


def _finding_draw(rng: np.random.Generator, lesion_scale: float = 1.0) -> _FindingDraw:
    sides = ("left", "right")
    return _FindingDraw(
        effusion_side=sides[int(rng.integers(2))],
        effusion_level=float(rng.uniform(0.04, 0.3)),
        pneumothorax_side=sides[int(rng.integers(2))],
        pneumothorax_gap=float(rng.uniform(0.08, 0.16)),
        lesion_side=sides[int(rng.integers(2))],
        lesion_radius=float(rng.uniform(0.035, 0.065)) * lesion_scale,
        device=("ett", "cvc", "ngt", "ett+ngt", "ett+cvc")[int(rng.integers(5))],
        phrasing=int(rng.integers(2**31)),
    )


def make_phantom(
    rng: np.random.Generator,
    *,
    size: int = 256,
    finding_prob: float = 0.3,
    findings: Mapping[str, bool] | None = None,
    view: Literal["PA", "LATERAL"] = "PA",
    masks: bool = False,
    boxes: bool = False,
    pose: float = 1.0,
    lesion_scale: float = 1.0,
) -> PhantomCase:
    """One phantom film; each finding present with probability `finding_prob`.

    `masks`: also return binary masks of MASK_CLASSES at the film's size (PA films only;
    a LATERAL film gets none). They never change the film or the random stream.
    `boxes`: also return the lesion's box (the bounding box of its mask) with the report's
    sentence about it as a grounding phrase (PA films only, like the masks).
    `findings` forces chosen findings on or off (the rest stay random); the random stream is
    consumed identically either way, so forcing changes only the forced findings, and the
    same generator state filmed PA and LATERAL is one patient seen twice (same report).
    `pose` spreads the patient's shift, size and tilt on the film by that factor (1: a
    well-centred film; 5: anatomy anywhere within a fifth of the film and half to full size, so
    a dense evaluation cannot score by where structures usually are); `lesion_scale` scales
    the nodule's radius (1: 1.4-2.6 cm; 3: lesions a 16-px patch grid can localise at 128 px).
    """
    if not 16 <= size <= 4096:
        raise ValueError(f"size {size} outside 16..4096")
    if not 0 <= pose <= 9:  # 10 would shrink the patient to nothing (scale 1 - 0.1 x pose)
        raise ValueError(f"pose {pose} outside 0..9")
    if not 0 < lesion_scale <= 4:  # larger no longer fits inside a lung
        raise ValueError(f"lesion_scale {lesion_scale} outside (0, 4]")
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; known: {', '.join(VIEWS)}")
    unknown = set(findings or {}) - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown finding {sorted(unknown)[0]!r}; known: {', '.join(FINDINGS)}")
    present = {name: bool(rng.uniform() < finding_prob) for name in FINDINGS}
    present.update({k: bool(v) for k, v in (findings or {}).items()})
    anatomy = _anatomy(rng, pose)
    draw = _finding_draw(rng, lesion_scale)
    lesion = _lesion_centre(anatomy, draw)

    frame = _Frame(min(size, _RENDER_MAX), anatomy)
    soft: dict[str, np.ndarray] | None = {} if (masks or boxes) and view == "PA" else None
    if view == "PA":
        density = _chest(frame, present, draw, lesion, soft)
    else:
        density = _lateral_chest(frame, present, draw, lesion)
    film = _develop(density, anatomy, frame.size)
    if frame.size < size:
        film = _upsample(film, size)
    if present["support_devices"]:
        film = film + 0.45 * _draw_devices(anatomy, size, draw.device, view)
    noise = np.random.default_rng(anatomy.seeds["noise"]).standard_normal(
        (size, size), dtype=np.float32
    )
    film = film + anatomy.noise * noise
    image = np.clip(film * 255.0 + 0.5, 0, 255).astype(np.uint8)

    sides = {
        "pleural_effusion": draw.effusion_side,
        "pneumothorax": draw.pneumothorax_side,
        "lung_lesion": draw.lesion_side,
    }
    side = {name: s for name, s in sides.items() if present[name]}
    zone = "upper" if lesion[1] < -0.22 else "mid" if lesion[1] < 0.05 else "lower"
    report = _report(present, side, draw, zone)
    binary = None
    if soft is not None:  # resized like the film, then cut at half: the edge stays put
        binary = {
            k: (_upsample(soft[k], size) if frame.size < size else soft[k]) >= 0.5
            for k in MASK_CLASSES
        }
        binary = {k: m.astype(np.uint8) for k, m in binary.items()}
    box_list = None
    if binary is not None and boxes:
        box_list = _lesion_boxes(binary["lesion"], report) if present["lung_lesion"] else []
    return PhantomCase(
        image=image,
        findings=present,
        side=side,
        report=report,
        view=view,
        masks=binary if masks else None,
        boxes=box_list,
    )


def _lesion_boxes(mask: np.ndarray, report: str) -> list[list[float | str]]:
    """The lesion mask's bounding box [x0, y0, x1, y1] (exclusive ends, pixels), labelled and
    paired with the report's sentence about the nodule (`_report` writes exactly one)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):  # a lesion too small to survive the cut at half: no box to find
        return []
    found = re.search(r"(There is a|A rounded) \d+\.\d cm nodule[^.]*\.", report)
    assert found is not None, "the report names the lesion whenever one is drawn"
    phrase = found.group(0)
    box = [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]
    return [[*box, "lung_lesion", phrase]]


def _upsample(img: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(
        Image.fromarray(img.astype(np.float32), mode="F").resize(
            (size, size), Image.Resampling.BICUBIC
        )
    )


def _develop(density: np.ndarray, a: _Anatomy, size: int) -> np.ndarray:
    """Density -> film brightness 0..1: slight detector blur, then a contrast curve."""
    img = _box_blur(density, max(0, round(size / 400)))
    # Film-like shoulder: contrast compresses in dense regions (ribs fade behind the heart).
    img = (1.0 - np.exp(np.maximum(img, 0.0) * -2.2)) * (1.0 / (1.0 - math.exp(-2.2 * 0.85)))
    np.clip(img, 0.0, 1.0, out=img)
    img **= a.gamma
    return (a.low + (a.high - a.low) * img).astype(np.float32)


# -- reports ---------------------------------------------------------------------------------
# One positive and one negative wording family per finding; a later labeler relies on each
# finding being named by exactly these phrases, so keep positives free of negation cues and
# negatives free of positive phrases.

_HEART = (
    ("The heart is enlarged.", "There is cardiomegaly.", "The cardiac silhouette is enlarged."),
    (
        "The heart size is normal.",
        "Normal heart size.",
        "The cardiac silhouette is within normal limits.",
    ),
)
_DEVICES = {
    "ett": "An endotracheal tube is in place with its tip above the carina.",
    "cvc": "A right internal jugular central venous catheter ends in the superior vena cava.",
    "ngt": "A nasogastric tube courses below the diaphragm into the stomach.",
}
_NO_DEVICES = ("No lines or tubes.", "No support devices are seen.")


def _report(present: dict[str, bool], side: dict[str, str], draw: _FindingDraw, zone: str) -> str:
    pick = np.random.default_rng(draw.phrasing)

    def one(options: tuple[str, ...]) -> str:
        return options[int(pick.integers(len(options)))]

    findings, impression = [], []
    if present["support_devices"]:
        findings += [_DEVICES[k] for k in draw.device.split("+")]
    else:
        findings.append(one(_NO_DEVICES))

    findings.append(one(_HEART[0] if present["cardiomegaly"] else _HEART[1]))
    if present["cardiomegaly"]:
        impression.append("cardiomegaly")

    if present["lung_lesion"]:
        s = side["lung_lesion"]
        cm = f"{2 * draw.lesion_radius * 20:.1f}"  # the film spans about 40 cm
        findings.append(
            one(
                (
                    f"There is a {cm} cm nodule in the {s} {zone} lung zone.",
                    f"A rounded {cm} cm nodule projects over the {s} {zone} lung.",
                )
            )
        )
        impression.append(f"{s} {zone} lung nodule")
    effusion, pneumo = present["pleural_effusion"], present["pneumothorax"]
    if not (effusion or pneumo or present["lung_lesion"]):
        findings.append(one(("The lungs are clear.", "The lungs are well expanded and clear.")))
    elif not present["lung_lesion"]:
        findings.append("No focal consolidation or nodule.")

    if effusion:
        s = side["pleural_effusion"]
        amount = "moderate" if draw.effusion_level > 0.15 else "small"
        findings.append(
            one(
                (
                    f"There is a {amount} {s} pleural effusion.",
                    f"A {amount} {s} pleural effusion is present.",
                )
            )
        )
        impression.append(f"{amount} {s} pleural effusion")
    if pneumo:
        s = side["pneumothorax"]
        amount = "moderate" if draw.pneumothorax_gap > 0.11 else "small"
        findings.append(
            one(
                (
                    f"There is a {amount} {s} apical pneumothorax.",
                    f"A {amount} {s} apical pneumothorax is seen with a visible pleural line.",
                )
            )
        )
        impression.append(f"{s} apical pneumothorax")
    if not effusion and not pneumo:
        findings.append(
            one(
                (
                    "No pleural effusion or pneumothorax.",
                    "There is no pleural effusion or pneumothorax.",
                )
            )
        )
    elif not effusion:
        findings.append("No pleural effusion.")
    elif not pneumo:
        findings.append("No pneumothorax.")

    if impression:
        first, *rest = impression
        text = first[0].upper() + first[1:]
        if rest:
            text += " with " + (", ".join(rest[:-1]) + " and " if len(rest) > 1 else "") + rest[-1]
        text += "."
    else:
        text = "No acute cardiopulmonary abnormality."
    if present["support_devices"]:
        text += " Support devices in place."
    return f"{_FINDINGS}{' '.join(findings)}{_IMPRESSION}{text}"


_FINDINGS, _IMPRESSION = "FINDINGS: ", " IMPRESSION: "


def report_sections(report: str) -> dict[str, str]:
    """A phantom report's `findings` and `impression` columns (the text of each section)."""
    findings, _, impression = report.removeprefix(_FINDINGS).partition(_IMPRESSION)
    return {"findings": findings, "impression": impression}


# -- corpus -----------------------------------------------------------------------------------


def _split(index: int) -> str:
    bucket = int.from_bytes(hashlib.sha256(f"phantom-{index}".encode()).digest()[:4], "big") % 10
    return "train" if bucket < 8 else "val" if bucket == 8 else "test"


def write_phantom_corpus(
    out_dir: str | os.PathLike,
    *,
    n: int,
    size: int = 256,
    seed: int = 0,
    finding_prob: float = 0.3,
    views: int = 1,
    shard_rows: int = 256,
    progress: bool = True,
    masks: bool = False,
    boxes: bool = False,
    pose: float = 1.0,
    lesion_scale: float = 1.0,
) -> Manifest:
    """Write `n` phantom studies of `views` films each (1: PA; 2: PA then LATERAL) as a
    corpus; identical shards for identical arguments.

    Study i draws from its own generator seeded by (seed, i), so any row can be regenerated
    alone and a future parallel writer produces the same bytes. The films of a study share
    `study_id`, report, labels and split, and are written one after the other, which keeps
    them in one row group (`CorpusWriter`).

    `masks` adds a `mask_<class>` column per MASK_CLASSES (binary, the film's size; null on
    LATERAL films), for segmentation evaluation; `boxes` a `boxes` column (the lesion's box
    and report phrase, `make_phantom`; null on LATERAL films), for detection and grounding.
    `pose` and `lesion_scale` are `make_phantom`'s.
    """
    if views not in (1, 2):
        raise ValueError(f"views must be 1 (PA) or 2 (PA + LATERAL), not {views!r}")
    options: dict[str, Any] = {"n": n, "size": size, "seed": seed, "finding_prob": finding_prob}
    if views > 1:  # single-view corpora keep the options (and manifest) they always had
        options["views"] = views
    if masks:
        options["masks"] = True
    if boxes:
        options["boxes"] = True
    if pose != 1.0:
        options["pose"] = pose
    if lesion_scale != 1.0:
        options["lesion_scale"] = lesion_scale
    with CorpusWriter(
        out_dir,
        made_by={"command": "phantom", "options": options},
        shard_rows=shard_rows,
        row_group_rows=min(128, shard_rows),
    ) as writer:
        for index in progress_iter(range(n), enabled=progress, description="phantoms"):
            study = f"phantom-{index:07d}"
            meta = np.random.default_rng([seed, index, 1])
            shared = {
                "study_id": study,
                "sex": SEXES[int(meta.integers(len(SEXES)))],
                "age_group": AGE_GROUPS[int(meta.integers(len(AGE_GROUPS)))],
                "anatomy": "chest",
                "split": _split(index),
            }
            for view in VIEWS[:views]:
                case = make_phantom(
                    np.random.default_rng([seed, index]),
                    size=size,
                    finding_prob=finding_prob,
                    view=view,  # type: ignore[arg-type]  # one of VIEWS
                    masks=masks,
                    boxes=boxes,
                    pose=pose,
                    lesion_scale=lesion_scale,
                )
                mask_columns = {
                    f"mask_{k}": None if case.masks is None else case.masks[k]
                    for k in (MASK_CLASSES if masks else ())
                }
                labels = {f"label_{k}": int(case.findings[k]) for k in FINDINGS}
                writer.add(
                    {
                        "image_id": study if views == 1 else f"{study}-{view.lower()}",
                        "pixels": case.image,
                        "report": case.report,
                        **report_sections(case.report),
                        "view": case.view,
                        **shared,
                        "label_no_finding": int(not any(case.findings[k] for k in PATHOLOGIES)),
                        **labels,
                        **mask_columns,
                        **({"boxes": case.boxes} if boxes else {}),
                    }
                )
    assert writer.manifest is not None  # set by a clean close()
    return writer.manifest

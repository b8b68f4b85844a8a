"""Synthetic scroll CT volumes in the Kaggle layout: the embedded default dataset.

Each volume is a piece of a rolled scroll: a few papyrus sheets wound as an Archimedean spiral around an axis
near the volume, wavy along the axis and the winding, a few voxels thick, in CT-like intensity (papyrus brighter
than air, fibre texture, blur, noise). Labels follow the competition: 0 background, 1 papyrus surface, 2 unlabeled
(a 3-voxel border on every face and some unannotated blocks). Several scroll ids differ in contrast and noise, as
real scrolls do, and shapes are odd and non-cubic in the mix. Everything is a pure function of the seed.

``difficulty="hard"`` (:func:`make_volume`, :class:`SynthConfig`, ``python -m pipeline synth --difficulty hard``)
adds what makes real scrolls hard, on the same spiral: compressed regions where consecutive wraps come 1-3 voxels
apart and touch (merged wraps are one component in the label), a flap of papyrus that crosses the wraps, thickness
varying along the sheet, dark air slits inside a sheet that stay one labelled layer, a slow intensity drift across
the volume, and unlabeled blocks placed preferentially where wraps are closest. ``"easy"`` (the default) is the
generator as it was: the same bytes for the same seed. ``return_info=True`` also returns a :class:`SynthInfo`
describing what was generated, so that tests can check each claim on the label itself.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.utils.errors import SettingsError
from transforms.io import write_volume

__all__ = [
    "DIFFICULTIES",
    "SynthConfig",
    "SynthInfo",
    "check_difficulty",
    "ensure_synthetic_dataset",
    "generate_dataset",
    "make_volume",
]

BORDER = 3
DIFFICULTIES = ("easy", "hard")
CLOSE_GAP = 3  # wraps with fewer background voxels than this between them count as close (touching included)


def check_difficulty(difficulty: str) -> str:
    """``difficulty`` itself when it is one of :data:`DIFFICULTIES`.

    Raises:
        SettingsError: any other value (one line naming the value and the choices).
    """
    if difficulty not in DIFFICULTIES:
        msg = f"--difficulty {difficulty!r}: not a difficulty of the synthetic scrolls; use {' or '.join(DIFFICULTIES)}"
        raise SettingsError(msg)
    return difficulty


@dataclass(frozen=True)
class SynthConfig:
    """Sizes of the synthetic dataset (kept small so the demo trains on a laptop CPU).

    Args:
        n_train: training volumes (with labels).
        n_test: test volumes (no labels).
        shapes: volume shapes (Z, Y, X) cycled over the volumes; odd and non-cubic on purpose.
        n_scrolls: distinct scroll ids; each has its own contrast and noise.
        seed: the seed everything is derived from.
        difficulty: ``"easy"`` (evenly spaced spiral wraps: the demo and the tests) or ``"hard"`` (close, touching
            and crossing sheets, varying thickness, air slits, intensity drift; see :func:`make_volume`).

    Raises:
        SettingsError: an unknown ``difficulty``.

    Example:
        >>> generate_dataset("data/hard_synth", SynthConfig(n_train=4, n_test=1, difficulty="hard"))  # doctest: +SKIP
    """

    n_train: int = 12
    n_test: int = 3
    shapes: tuple[tuple[int, int, int], ...] = ((64, 64, 64), (72, 64, 80), (64, 77, 69), (80, 72, 64))
    n_scrolls: int = 3
    seed: int = 0
    difficulty: str = "easy"

    def __post_init__(self) -> None:
        check_difficulty(self.difficulty)


@dataclass
class SynthInfo:
    """What :func:`make_volume` generated, voxel by voxel where a claim needs it (arrays have the volume's shape).

    Attributes:
        difficulty: ``"easy"`` or ``"hard"``.
        pitch: radial distance between consecutive wraps where the spiral is not compressed (voxels).
        wrap: int16, the spiral wrap (1, 2, ...) of each voxel of a spiral sheet, 0 elsewhere (flap voxels
            included); two sheet voxels with different numbers belong to different wraps.
        flap: bool, voxels of the papyrus flap that crosses the wraps (all False when easy).
        thickness: float32, the sheet's local thickness (voxels), constant when easy.
        spacing: float32, the local distance between the centres of consecutive wraps (voxels); wraps touch where
            it is at most ``thickness``.
        air_gap: bool, the dark slits inside a sheet (labelled papyrus, 1, like the rest of the sheet).
        close: bool, spiral sheet voxels whose neighbouring wrap is fewer than ``CLOSE_GAP`` background voxels away
            (touching included).
        blocks: the unannotated blocks (label 2), as slices.
        drift: (Z, Y, X) unit vector along which the intensity drifts (zeros when easy).
        drift_amplitude: the drift's relative gain at either end of the volume (``1 +- drift_amplitude``).
    """

    difficulty: str
    pitch: float
    wrap: np.ndarray
    flap: np.ndarray
    thickness: np.ndarray
    spacing: np.ndarray
    air_gap: np.ndarray
    close: np.ndarray
    blocks: list[tuple[slice, slice, slice]] = field(default_factory=list)
    drift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    drift_amplitude: float = 0.0

    def summary(self, label: np.ndarray) -> dict[str, Any]:
        """Each difficulty measured on ``label`` (the volume's own), where it is labelled (not 2).

        Returns:
            ``gaps``: {n: how many pairs of sheet voxels of two different wraps have exactly n background voxels
            between them along a grid axis} for n up to 8; ``min_gap``: its smallest n (None when empty);
            ``touching``: 6-neighbour pairs of sheet voxels of
            different wraps (merged wraps); ``crossing``: sheet voxels of both a wrap and the flap;
            ``thickness``: (min, max) thickness on sheet voxels; ``air_gap``: labelled voxels of air slits;
            ``drift_amplitude``; ``close_unlabeled``, ``all_unlabeled``: the fraction of close voxels, and of all
            voxels, inside the unannotated blocks (the border excluded).
        """
        sheet = label == 1
        wrap = np.where(sheet, self.wrap, 0)
        gaps = {}
        for d in range(2, 10):  # sheet voxel, d - 1 background voxels, sheet voxel of another wrap
            for axis in range(3):
                w = np.moveaxis(wrap, axis, 0)
                background = np.moveaxis(label, axis, 0) == 0
                n = len(w)
                pair = (w[: n - d] > 0) & (w[d:] > 0) & (w[: n - d] != w[d:])
                for k in range(1, d):
                    pair &= background[k : n - d + k]
                if pair.any():
                    gaps[d - 1] = gaps.get(d - 1, 0) + int(pair.sum())
        touching = 0
        for axis in range(3):
            a, b = np.swapaxes(wrap, 0, axis)[:-1], np.swapaxes(wrap, 0, axis)[1:]
            touching += int(((a > 0) & (b > 0) & (a != b)).sum())
        interior = np.zeros(label.shape, dtype=bool)
        interior[BORDER:-BORDER, BORDER:-BORDER, BORDER:-BORDER] = True
        blocked = np.zeros(label.shape, dtype=bool)
        for block in self.blocks:
            blocked[block] = True
        close = self.close & interior
        thick = self.thickness[sheet] if sheet.any() else np.zeros(1, np.float32)
        return {
            "min_gap": min(gaps, default=None),
            "gaps": gaps,
            "touching": touching,
            "crossing": int((sheet & self.flap & (self.wrap > 0)).sum()),
            "thickness": (float(thick.min()), float(thick.max())),
            "air_gap": int((sheet & self.air_gap).sum()),
            "drift_amplitude": self.drift_amplitude,
            "close_unlabeled": float(blocked[close].mean()) if close.any() else 0.0,
            "all_unlabeled": float(blocked[interior].mean()) if interior.any() else 0.0,
        }


def _spiral(
    shape: tuple[int, int, int], rng: np.random.Generator, axis_outside: bool = False
) -> tuple[np.ndarray, float, np.ndarray]:
    """The unwound radial coordinate of a wavy spiral, axis along Z: wraps lie where it is a multiple of the pitch.

    Args:
        axis_outside: move the axis out of the volume's footprint when it falls inside (every turn is then
            numbered continuously inside the volume).

    Returns:
        the coordinate (float32, voxels), the pitch (radial distance between consecutive wraps), and the integer
        (Y, X) correction that numbers turns from a cut on the far side of the axis from the volume's centre:
        ``round(coordinate / pitch) + correction`` is the turn of the nearest wrap (arctan2's own cut, at -X from
        the axis, would renumber one turn as the next where it crosses the volume).
    """
    z, y, x = (np.arange(s, dtype=np.float32) for s in shape)
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    # the scroll's axis lies outside the volume most of the time, so sheets look like curved layers
    cy = rng.uniform(-0.6, 1.6) * shape[1]
    cx = rng.uniform(-0.6, 1.6) * shape[2]
    if axis_outside and -0.1 * shape[1] < cy < 1.1 * shape[1] and -0.1 * shape[2] < cx < 1.1 * shape[2]:
        oy, ox = (cy - shape[1] / 2) / shape[1], (cx - shape[2] / 2) / shape[2]
        push = 0.6 / max(abs(oy), abs(ox), 1e-3)  # out along the same direction from the centre, 0.1 past the edge
        cy, cx = shape[1] / 2 + oy * push * shape[1], shape[2] / 2 + ox * push * shape[2]
    pitch = rng.uniform(11.0, 15.0)  # radial distance between consecutive wraps
    dy, dx = y - cy, x - cx
    r = np.sqrt(dy * dy + dx * dx)
    theta = np.arctan2(dy, dx)
    wave = (
        rng.uniform(1.0, 2.5) * np.sin(z * rng.uniform(0.05, 0.12) + theta * rng.integers(2, 5) + rng.uniform(0, 6.3))
        + rng.uniform(0.5, 1.5) * np.sin(z * rng.uniform(0.1, 0.2) + rng.uniform(0, 6.3))
    )
    far = np.arctan2(shape[1] / 2 - cy, shape[2] / 2 - cx)  # the volume's direction from the axis
    turned = np.angle(np.exp(1j * (theta - far))) + far  # the same angle, cut on the far side of the axis
    correction = np.round((theta - turned) / (2 * np.pi)).astype(np.int64)
    return r + wave - pitch * theta / (2 * np.pi), pitch, correction


def _smooth_field(shape: tuple[int, int, int], rng: np.random.Generator, scale: float) -> np.ndarray:
    """Smooth random field (float32, about zero mean and unit spread) varying over about ``scale`` voxels.

    Blurred noise on a coarse grid, interpolated linearly one axis at a time: a few passes over the volume, where a
    Gaussian filter of the full volume at that scale would cost hundreds.
    """
    coarse = ndimage.gaussian_filter(rng.standard_normal([int(np.ceil(s / scale)) + 2 for s in shape]), 1.0)
    out = ((coarse - coarse.mean()) / (coarse.std() + 1e-12)).astype(np.float32)
    for axis, n in enumerate(shape):
        pos = (np.arange(n, dtype=np.float32) + 0.5) / np.float32(scale) + np.float32(0.5)
        i0 = pos.astype(np.int64)
        f = (pos - i0).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(out, i0, axis) * (1 - f) + np.take(out, i0 + 1, axis) * f
    return out


def _interior_point(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    return np.array([rng.uniform(0.25, 0.75) * s for s in shape], dtype=np.float32)


def _bump(shape: tuple[int, int, int], centre: np.ndarray, radius: float) -> np.ndarray:
    """exp(-|p - centre|^2 / (2 radius^2)), as a product of three 1-D factors (one pass over the volume)."""
    z, y, x = (np.exp(-((np.arange(s, dtype=np.float32) - c) ** 2) / np.float32(2 * radius**2))
               for s, c in zip(shape, centre))
    return z[:, None, None] * y[None, :, None] * x[None, None, :]


def _blocks(shape: tuple[int, int, int], rng: np.random.Generator, close: np.ndarray | None) -> list[tuple[slice, ...]]:
    """The unannotated blocks: one to three, each of a sixth to a third of every side; with ``close`` given, three
    in four are centred on a voxel of it (where sheets are hardest to separate)."""
    blocks = []
    inner = (slice(BORDER, -BORDER, 2),) * 3  # every other voxel: the same choice, a fraction of the cost
    candidates = None if close is None else np.argwhere(close[inner]) * 2 + BORDER
    for _ in range(int(rng.integers(1, 4))):
        size = [int(rng.integers(s // 6, s // 3)) for s in shape]
        if candidates is not None and len(candidates) and rng.uniform() < 0.75:
            centre = candidates[int(rng.integers(0, len(candidates)))]
            start = [int(np.clip(c - b // 2, 0, s - b)) for c, s, b in zip(centre, shape, size)]
        else:
            start = [int(rng.integers(0, s - b)) for s, b in zip(shape, size)]
        blocks.append(tuple(slice(a, a + b) for a, b in zip(start, size)))
    return blocks


def _finish_label(sheet: np.ndarray, blocks: list[tuple[slice, ...]]) -> np.ndarray:
    label = sheet.astype(np.uint8)
    ignore = np.zeros(sheet.shape, dtype=bool)
    ignore[:BORDER], ignore[-BORDER:] = True, True
    ignore[:, :BORDER], ignore[:, -BORDER:] = True, True
    ignore[:, :, :BORDER], ignore[:, :, -BORDER:] = True, True
    for block in blocks:
        ignore[block] = True
    label[ignore] = 2
    return label


def _scroll_appearance(scroll: int) -> tuple[float, float, float]:
    scroll_rng = np.random.default_rng(1000 + scroll)
    air, papyrus = scroll_rng.uniform(35, 60), scroll_rng.uniform(130, 170)
    return air, papyrus, scroll_rng.uniform(12, 22)


def _easy(shape: tuple[int, int, int], seed: int, scroll: int, info: bool):
    rng = np.random.default_rng(seed)
    thickness = rng.uniform(3.0, 4.0)
    s, pitch, correction = _spiral(shape, rng)
    phase = s / pitch
    nearest = np.round(phase)
    dist = np.abs(phase - nearest) * pitch
    sheet = dist < thickness / 2

    # sheets fray: a few gaps where the papyrus is missing (labels follow the image)
    gaps = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 4.0)
    sheet &= gaps < 2.2 * gaps.std()

    air, papyrus, noise_sd = _scroll_appearance(scroll)
    fibres = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0.7, 2.5, 0.7))
    density = np.clip(1.0 - dist / (thickness / 2 + 1.0), 0.0, 1.0) ** 0.7
    img = air + (papyrus - air) * density * (1.0 + 0.6 * fibres / (fibres.std() + 1e-6))
    img = ndimage.gaussian_filter(img, 0.8)
    img += rng.normal(0.0, noise_sd, shape)
    image = np.clip(img, 0, 255).astype(np.uint8)

    blocks = _blocks(shape, rng, None)
    label = _finish_label(sheet, blocks)
    if not info:
        return image, label
    turn = nearest + correction
    wrap = np.where(sheet, turn - turn.min() + 1, 0).astype(np.int16)
    none = np.zeros(shape, dtype=bool)
    return image, label, SynthInfo(
        "easy", float(pitch), wrap, none, np.full(shape, thickness, np.float32), np.full(shape, pitch, np.float32),
        none, sheet & (pitch - thickness < CLOSE_GAP), blocks,
    )


def _hard(shape: tuple[int, int, int], seed: int, scroll: int, info: bool):
    rng = np.random.default_rng(seed)
    s, pitch, correction = _spiral(shape, rng, axis_outside=True)
    t0 = rng.uniform(2.6, 3.6)

    # compressed regions: a monotone warp of the radial coordinate squeezes the wraps around two points: at the
    # first down to 0.6-0.9 of the sheet's thickness between centres (two or three wraps touch and merge), at the
    # second to a third to a half of the pitch; the gaps between wraps take every width in between on the way
    warp = np.zeros(shape, np.float32)
    slope = np.ones(shape, np.float32)
    spread = _smooth_field(shape, rng, 24.0)
    for strength in (pitch / (t0 * rng.uniform(0.6, 0.9)) - 1, rng.uniform(1.0, 2.0)):
        p = _interior_point(shape, rng)
        s0 = s[tuple(int(c) for c in p)]
        width = np.float32(pitch * rng.uniform(0.25, 0.4))
        reach = rng.uniform(0.2, 0.3) * float(np.mean(shape))
        m = np.clip(np.float32(1.6) * _bump(shape, p, reach) - np.float32(0.3) + np.float32(0.3) * spread, 0, 1)
        th = np.tanh((s - s0) / width)
        warp += np.float32(strength) * width * m * th
        slope += np.float32(strength) * m * (1 - th * th)
    del spread, m, th
    u = (s + warp) / np.float32(pitch)
    del warp
    nearest = np.round(u)
    spacing = np.float32(pitch) / slope
    sd = (u - nearest) * spacing  # signed distance to the nearest wrap's centre
    del u, slope

    # thickness varies along the sheet, 1.5 to 7 voxels around the volume's own
    thickness = np.clip(np.float32(t0) * np.exp(np.float32(0.45) * _smooth_field(shape, rng, 16.0)), 1.5, 7.0)
    half = thickness / 2
    frayed = _smooth_field(shape, rng, 6.0) > 2.0  # holes where the papyrus is missing (image and label)
    spiral = (np.abs(sd) < half) & ~frayed

    # a flap of papyrus crossing the wraps (a fold or a torn-off piece): a wavy disc in a plane through a radial line
    p1 = _interior_point(shape, rng)
    z, y, x = (np.arange(n, dtype=np.float32) - c for n, c in zip(shape, p1))
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    unwound = s[int(p1[0])] + np.float32(pitch) * correction[0]  # continuous across arctan2's cut
    grad = np.array([0.0, *(np.gradient(unwound, axis=a)[int(p1[1]), int(p1[2])] for a in (0, 1))])
    radial = grad / (np.linalg.norm(grad) + 1e-9)
    tangent = np.array([0.0, -radial[2], radial[1]])
    alpha = rng.uniform(-0.7, 0.7)
    normal = np.cos(alpha) * tangent + np.sin(alpha) * np.array([1.0, 0.0, 0.0])
    along = np.cross(normal, radial)
    a_r = y * np.float32(radial[1]) + x * np.float32(radial[2])
    a_v = z * np.float32(along[0]) + y * np.float32(along[1]) + x * np.float32(along[2])
    d_flap = (z * np.float32(normal[0]) + y * np.float32(normal[1]) + x * np.float32(normal[2])
              + np.float32(rng.uniform(1.0, 3.0)) * np.sin(a_r * np.float32(rng.uniform(0.06, 0.12))
                                                           + np.float32(rng.uniform(0, 6.3))))
    reach = rng.uniform(0.3, 0.45) * float(np.mean(shape))
    disc = a_r * a_r + a_v * a_v < np.float32(reach**2)
    del a_r, a_v
    flap = disc & (np.abs(d_flap) < half)
    sheet = spiral | flap

    # air slits inside thick sheets: dark in the image, still one labelled layer
    slits = (_smooth_field(shape, rng, 12.0) > 0.3) & (thickness >= 3.5) & (spacing > thickness + 1)
    air_gap = slits & (np.abs(sd) < 0.6) & spiral

    air, papyrus, noise_sd = _scroll_appearance(scroll)
    density = np.clip(1.0 - np.abs(sd) / (half + 1.0), 0.0, 1.0) ** 0.7
    density *= 1.0 - slits * np.exp(-((sd / np.float32(0.7)) ** 2))
    density *= ~frayed
    flap_density = np.clip(1.0 - np.abs(d_flap) / (half + 1.0), 0.0, 1.0) ** 0.7 * disc
    np.maximum(density, flap_density, out=density)
    del d_flap, flap_density, disc, slits, half

    # scroll-wide drift: a gain ramp along one direction, plus a slow wobble
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    amplitude = rng.uniform(0.2, 0.35)
    z, y, x = ((np.arange(n, dtype=np.float32) - (n - 1) / 2) for n in shape)
    ramp = (z[:, None, None] * np.float32(direction[0]) + y[None, :, None] * np.float32(direction[1])
            + x[None, None, :] * np.float32(direction[2]))
    ramp /= np.float32(sum(abs(d) * (n - 1) / 2 for d, n in zip(direction, shape)))
    gain = 1 + np.float32(amplitude) * (ramp + np.float32(0.25) * _smooth_field(shape, rng, 48.0))
    del ramp

    fibres = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), (0.7, 2.5, 0.7))
    img = np.float32(air) + np.float32(papyrus - air) * density * (1 + np.float32(0.6) * fibres / (fibres.std() + 1e-6))
    del fibres, density
    img *= gain
    del gain
    img = ndimage.gaussian_filter(img, 0.8)
    img += rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_sd)
    image = np.clip(img, 0, 255).astype(np.uint8)
    del img

    close = spiral & (spacing - thickness < CLOSE_GAP)
    blocks = _blocks(shape, rng, close)
    label = _finish_label(sheet, blocks)
    if not info:
        return image, label
    turn = nearest + correction
    wrap = np.where(spiral, turn - turn.min() + 1, 0).astype(np.int16)
    return image, label, SynthInfo(
        "hard", float(pitch), wrap, flap, thickness, spacing, air_gap, close, blocks,
        tuple(float(d) for d in direction), float(amplitude),
    )


def make_volume(
    shape: tuple[int, int, int], seed: int, scroll: int = 0, difficulty: str = "easy", return_info: bool = False
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, SynthInfo]:
    """One synthetic CT volume and its label.

    Args:
        shape: (Z, Y, X).
        seed: per-volume seed.
        scroll: scroll id; sets contrast and noise level.
        difficulty: ``"easy"``: evenly spaced wraps 11-15 voxels apart, 3-4 voxels thick (the generator's
            original output, byte for byte). ``"hard"``: besides, wraps squeezed 1-3 voxels apart and touching in
            compressed regions, a flap crossing the wraps, thickness 1.5-7 voxels along the sheet, dark air
            slits inside sheets (labelled 1), a scroll-wide intensity drift (gain 1 +- 0.2-0.35), unlabeled blocks
            mostly where wraps are closest.
        return_info: also return a :class:`SynthInfo` of what was generated.

    Returns:
        image (uint8) and label (uint8 in {0, 1, 2}), both of ``shape``; then the :class:`SynthInfo` when asked.

    Raises:
        SettingsError: an unknown ``difficulty``.
    """
    check_difficulty(difficulty)
    return (_hard if difficulty == "hard" else _easy)(tuple(shape), seed, scroll, return_info)


def _write_csv(path: Path, rows: list[tuple[str, int]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "scroll_id"])
        w.writerows(rows)


def generate_dataset(out_dir: str | os.PathLike, config: SynthConfig = SynthConfig()) -> Path:
    """Write a synthetic dataset in the Kaggle layout (``train.csv``, ``test.csv``, ``train_images/``,
    ``train_labels/``, ``test_images/``), atomically: built in a temporary sibling folder, then renamed.

    Args:
        out_dir: destination folder; must not exist yet.
        config: sizes and seed.

    Returns:
        ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` already exists.
    """
    out = Path(out_dir)
    if out.exists():
        msg = f"{out}: already exists; remove it or choose another --out"
        raise FileExistsError(msg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        seeds = np.random.default_rng(config.seed).integers(0, 2**31 - 1, size=config.n_train + config.n_test)
        train_rows, test_rows = [], []
        for i in range(config.n_train + config.n_test):
            is_test = i >= config.n_train
            case_id = str(100000 + int(seeds[i]) % 900000)
            scroll = 1 + (i % config.n_scrolls)
            image, label = make_volume(config.shapes[i % len(config.shapes)], int(seeds[i]), scroll, config.difficulty)
            if is_test:
                write_volume(tmp / "test_images" / f"{case_id}.tif", image)
                test_rows.append((case_id, scroll))
            else:
                write_volume(tmp / "train_images" / f"{case_id}.tif", image)
                write_volume(tmp / "train_labels" / f"{case_id}.tif", label)
                train_rows.append((case_id, scroll))
        _write_csv(tmp / "train.csv", train_rows)
        _write_csv(tmp / "test.csv", test_rows)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_synthetic_dataset(out_dir: str | os.PathLike, config: SynthConfig = SynthConfig()) -> Path:
    """Return ``out_dir``, generating the synthetic dataset there first if it is not there yet.

    Safe when several processes (DDP ranks) call it at once: each builds in its own temporary folder and the
    first rename wins; the content is identical for the same seed.
    """
    out = Path(out_dir)
    if (out / "train.csv").is_file():
        return out
    try:
        return generate_dataset(out, config)
    except (FileExistsError, OSError):
        if (out / "train.csv").is_file():
            return out
        raise

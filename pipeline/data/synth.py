"""Synthetic scroll CT volumes in the Kaggle layout: the embedded default dataset.

Each volume is a piece of a rolled scroll: a few papyrus sheets wound as an Archimedean spiral around an axis
near the volume, wavy along the axis and the winding, a few voxels thick, in CT-like intensity (papyrus brighter
than air, fibre texture, blur, noise). Labels follow the competition: 0 background, 1 papyrus surface, 2 unlabeled
(a 3-voxel border on every face and some unannotated blocks). Several scroll ids differ in contrast and noise, as
real scrolls do, and shapes are odd and non-cubic in the mix. Everything is a pure function of the seed.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from transforms.io import write_volume

__all__ = ["SynthConfig", "make_volume", "generate_dataset", "ensure_synthetic_dataset"]

BORDER = 3


@dataclass(frozen=True)
class SynthConfig:
    """Sizes of the synthetic dataset (kept small so the demo trains on a laptop CPU).

    Args:
        n_train: training volumes (with labels).
        n_test: test volumes (no labels).
        shapes: volume shapes (Z, Y, X) cycled over the volumes; odd and non-cubic on purpose.
        n_scrolls: distinct scroll ids; each has its own contrast and noise.
        seed: the seed everything is derived from.
    """

    n_train: int = 12
    n_test: int = 3
    shapes: tuple[tuple[int, int, int], ...] = ((64, 64, 64), (72, 64, 80), (64, 77, 69), (80, 72, 64))
    n_scrolls: int = 3
    seed: int = 0


def _sheet_distance(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Distance (voxels) from each voxel to the nearest wrap of a wavy spiral sheet, axis along Z."""
    z, y, x = (np.arange(s, dtype=np.float32) for s in shape)
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    # the scroll's axis lies outside the volume most of the time, so sheets look like curved layers
    cy = rng.uniform(-0.6, 1.6) * shape[1]
    cx = rng.uniform(-0.6, 1.6) * shape[2]
    pitch = rng.uniform(11.0, 15.0)  # radial distance between consecutive wraps
    dy, dx = y - cy, x - cx
    r = np.sqrt(dy * dy + dx * dx)
    theta = np.arctan2(dy, dx)
    wave = (
        rng.uniform(1.0, 2.5) * np.sin(z * rng.uniform(0.05, 0.12) + theta * rng.integers(2, 5) + rng.uniform(0, 6.3))
        + rng.uniform(0.5, 1.5) * np.sin(z * rng.uniform(0.1, 0.2) + rng.uniform(0, 6.3))
    )
    phase = (r + wave - pitch * theta / (2 * np.pi)) / pitch
    return np.abs(phase - np.round(phase)) * pitch


def make_volume(shape: tuple[int, int, int], seed: int, scroll: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic CT volume and its label.

    Args:
        shape: (Z, Y, X).
        seed: per-volume seed.
        scroll: scroll id; sets contrast and noise level.

    Returns:
        image (uint8) and label (uint8 in {0, 1, 2}), both of ``shape``.
    """
    rng = np.random.default_rng(seed)
    thickness = rng.uniform(3.0, 4.0)
    dist = _sheet_distance(shape, rng)
    sheet = dist < thickness / 2

    # sheets fray: a few gaps where the papyrus is missing (labels follow the image)
    gaps = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 4.0)
    sheet &= gaps < 2.2 * gaps.std()

    scroll_rng = np.random.default_rng(1000 + scroll)
    air, papyrus = scroll_rng.uniform(35, 60), scroll_rng.uniform(130, 170)
    noise_sd = scroll_rng.uniform(12, 22)
    fibres = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0.7, 2.5, 0.7))
    density = np.clip(1.0 - dist / (thickness / 2 + 1.0), 0.0, 1.0) ** 0.7
    img = air + (papyrus - air) * density * (1.0 + 0.6 * fibres / (fibres.std() + 1e-6))
    img = ndimage.gaussian_filter(img, 0.8)
    img += rng.normal(0.0, noise_sd, shape)
    image = np.clip(img, 0, 255).astype(np.uint8)

    label = sheet.astype(np.uint8)
    ignore = np.zeros(shape, dtype=bool)
    ignore[:BORDER], ignore[-BORDER:] = True, True
    ignore[:, :BORDER], ignore[:, -BORDER:] = True, True
    ignore[:, :, :BORDER], ignore[:, :, -BORDER:] = True, True
    for _ in range(int(rng.integers(1, 4))):  # unannotated blocks, as the real labels have
        size = [int(rng.integers(s // 6, s // 3)) for s in shape]
        start = [int(rng.integers(0, s - b)) for s, b in zip(shape, size)]
        ignore[tuple(slice(a, a + b) for a, b in zip(start, size))] = True
    label[ignore] = 2
    return image, label


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
            image, label = make_volume(config.shapes[i % len(config.shapes)], int(seeds[i]), scroll)
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

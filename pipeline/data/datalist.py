"""Datalists from the Kaggle layout, the train/validation split, and the up-front checks of a dataset.

Layout (``../shared/docs/domain.md``)::

    <dataset_dir>/train.csv  test.csv  train_images/<id>.tif  train_labels/<id>.tif  test_images/<id>.tif

``train.csv``/``test.csv`` (columns ``id``, ``scroll_id``) are used when present, else the files found in the
folders. NIfTI (``.nii``, ``.nii.gz``) volumes are accepted beside TIFF.
"""

from __future__ import annotations

import csv
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.utils.errors import MissingFileError, PipelineError
from transforms.io import VolumeError, case_id, read_volume, read_volume_shape

__all__ = [
    "check_volume_pair",
    "check_volume_shape",
    "DatasetError",
    "MIN_VOLUME_SIZE",
    "VOLUME_SUFFIXES",
    "find_volume",
    "list_cases",
    "train_datalist",
    "test_datalist",
    "split_datalist",
    "check_train_datalist",
    "check_test_datalist",
    "prepare_datalists",
    "resolve_dataset_dir",
    "require_file",
    "validation_subset",
]

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".tif", ".tiff", ".nii.gz", ".nii")
LABEL_VALUES = (0, 1, 2)
MIN_VOLUME_SIZE = 16  # voxels along every axis: below this a file is a slice or a crop artefact, not a volume


class DatasetError(PipelineError, ValueError):
    """A dataset that cannot be trained or predicted on; the message names the file and the problem."""


def find_volume(folder: Path, case_id: str) -> Path | None:
    """The volume file for ``case_id`` in ``folder`` with any supported suffix, or None."""
    for suffix in VOLUME_SUFFIXES:
        p = folder / f"{case_id}{suffix}"
        if p.is_file():
            return p
    return None


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "id" not in rows[0]:
        msg = f"{path}: no 'id' column (columns: {list(rows[0])})"
        raise DatasetError(msg)
    return rows


def list_cases(dataset_dir: str | os.PathLike, split: str) -> list[dict[str, str | None]]:
    """Cases of ``split`` ("train" or "test") as dicts with ``id``, the image path and, when the csv gives one,
    ``scroll_id`` (absent otherwise: a None would not collate in a DataLoader).

    Raises:
        DatasetError: the dataset folder or the split's image folder is missing, or a case has no image.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        msg = f"{root}: dataset folder not found"
        raise DatasetError(msg)
    images = root / f"{split}_images"
    csv_path = root / f"{split}.csv"
    if csv_path.is_file():
        rows = []
        for r in _read_csv(csv_path):
            scroll = (r.get("scroll_id") or "").strip()
            rows.append({"id": r["id"].strip(), **({"scroll_id": scroll} if scroll else {})})
    elif images.is_dir():
        files = sorted(p for p in images.iterdir() if p.name.lower().endswith(VOLUME_SUFFIXES))
        rows = [{"id": case_id(p)} for p in files]
    else:
        msg = f"{root}: neither {csv_path.name} nor {images.name}/ found"
        raise DatasetError(msg)
    cases = []
    for r in rows:
        img = find_volume(images, r["id"])
        if img is None:
            where = f"{csv_path}: case {r['id']} is listed but" if csv_path.is_file() else f"case {r['id']}:"
            msg = f"{where} its image {images / (r['id'] + '.tif')} is not there"
            raise DatasetError(msg)
        cases.append({**r, "image": str(img)})
    return cases


def train_datalist(dataset_dir: str | os.PathLike) -> list[dict[str, str | None]]:
    """Training cases with ``image`` and ``label`` paths.

    Raises:
        DatasetError: no training case, or an image without its label.
    """
    cases = list_cases(dataset_dir, "train")
    if not cases:
        msg = f"{dataset_dir}: no training volumes"
        raise DatasetError(msg)
    labels = Path(dataset_dir) / "train_labels"
    for c in cases:
        lab = find_volume(labels, str(c["id"]))
        if lab is None:
            msg = f"{c['image']}: image has no label (expected {labels / (str(c['id']) + '.tif')})"
            raise DatasetError(msg)
        c["label"] = str(lab)
    return cases


def test_datalist(dataset_dir: str | os.PathLike) -> list[dict[str, str | None]]:
    """Test cases with ``image`` paths.

    Raises:
        DatasetError: the test folder is missing or empty.
    """
    cases = list_cases(dataset_dir, "test")
    if not cases:
        msg = f"{Path(dataset_dir) / 'test_images'}: no test volumes"
        raise DatasetError(msg)
    return cases


def split_datalist(
    cases: list[dict], val_fraction: float = 0.2, fold: int | None = None, num_folds: int = 5, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Split into training and validation cases, by scroll when there are several scrolls, else by case.

    Groups (scroll ids, or case ids) are shuffled with ``seed``. With ``fold`` set, the groups are dealt into
    ``num_folds`` folds and fold ``fold`` is the validation set (cross-validation); otherwise groups are taken
    for validation until they hold at least ``val_fraction`` of the cases.

    Raises:
        DatasetError: fewer than two cases, or a setting that leaves one side empty.
    """
    if len(cases) < 2:
        msg = f"need at least 2 training cases for a train/validation split, got {len(cases)}"
        raise DatasetError(msg)
    scrolls = {c.get("scroll_id") for c in cases}
    by_scroll = len(scrolls) > 1 and None not in scrolls
    key = "scroll_id" if by_scroll else "id"
    groups = sorted({str(c[key]) for c in cases})
    order = [groups[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    if fold is not None:
        if not 0 <= fold < num_folds or num_folds > len(groups):
            msg = f"fold={fold} with num_folds={num_folds} is impossible for {len(groups)} groups ({key})"
            raise DatasetError(msg)
        val_groups = set(order[fold::num_folds])
    else:
        val_groups, n_val = set(), 0
        for g in order[:-1]:  # always leave one group for training
            if n_val >= val_fraction * len(cases):
                break
            val_groups.add(g)
            n_val += sum(str(c[key]) == g for c in cases)
    val = [c for c in cases if str(c[key]) in val_groups]
    train = [c for c in cases if str(c[key]) not in val_groups]
    if not val or not train:
        msg = f"split by {key} left an empty side (train={len(train)}, val={len(val)})"
        raise DatasetError(msg)
    logger.info("split by %s: %d training, %d validation cases", key, len(train), len(val))
    return train, val


def check_volume_shape(path: str, shape: tuple[int, ...]) -> None:
    """Refuse a shape that is not a 3D volume of at least ``MIN_VOLUME_SIZE`` voxels along every axis.

    Raises:
        DatasetError: naming ``path`` and the shape.
    """
    if len(shape) != 3:
        msg = f"{path}: expected a 3D volume (Z, Y, X), got an array of shape {shape}"  # transforms.io's words
        raise DatasetError(msg)
    if min(shape) < MIN_VOLUME_SIZE:
        msg = f"{path}: volume of shape {shape} is too small: at least {MIN_VOLUME_SIZE} voxels along every axis needed"
        raise DatasetError(msg)


def _check_pair(case: dict) -> None:
    img_shape = read_volume_shape(case["image"])  # header only; a truncated image fails here (transforms.io)
    check_volume_pair(case, img_shape, read_volume(case["label"]))


def check_volume_pair(case: dict, img_shape: tuple[int, ...], label: np.ndarray) -> None:
    """Check one decoded training pair: 3D, at least ``MIN_VOLUME_SIZE`` along every axis, label shape equal to
    the image's, label values in {0, 1, 2} (float labels named as such).

    Raises:
        DatasetError: the first problem found, naming the file.
    """
    check_volume_shape(case["image"], img_shape)
    if label.shape != img_shape:
        msg = f"{case['label']}: label shape {label.shape} differs from image shape {img_shape} ({case['image']})"
        raise DatasetError(msg)
    values = np.unique(label)
    bad = [v.item() for v in values if v not in LABEL_VALUES]
    if bad:
        shown = bad if len(bad) <= 8 else [*bad[:8], "..."]
        kind = " (float labels: values must be the integers 0, 1, 2)" if label.dtype.kind == "f" else ""
        msg = f"{case['label']}: label values {shown} outside {{0, 1, 2}}{kind}"
        raise DatasetError(msg)


def _run_checks(fn, cases: list[dict], workers: int) -> None:
    # decoding is in C and releases the GIL: threads overlap the reads
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in pool.map(fn, cases):
            pass


def check_train_datalist(cases: list[dict], workers: int = 4) -> None:
    """Check every training pair before training starts: readable, not truncated, 3D, at least
    ``MIN_VOLUME_SIZE`` along every axis, same shapes, labels in {0, 1, 2}.

    Raises:
        DatasetError: the first problem found, naming the file.
    """
    try:
        _run_checks(_check_pair, cases, workers)
    except VolumeError as e:
        raise DatasetError(str(e)) from e


def check_test_datalist(cases: list[dict], workers: int = 4) -> None:
    """Check every test image before inference: fully decoded (a truncated file fails here, not after training),
    3D, and its header agrees with its data (the submission is checked against the header's shape).

    Raises:
        DatasetError: the first problem found, naming the file.
    """

    def _check(case: dict) -> None:
        shape = read_volume_shape(case["image"])
        check_volume_shape(case["image"], shape)
        decoded = read_volume(case["image"]).shape
        if decoded != shape:
            msg = f"{case['image']}: header says shape {shape} but {decoded} decodes (truncated file?)"
            raise DatasetError(msg)

    try:
        _run_checks(_check, cases, workers)
    except VolumeError as e:
        raise DatasetError(str(e)) from e


def resolve_dataset_dir(dataset_dir: str | os.PathLike | None, synthetic_dir: str | os.PathLike) -> Path:
    """The dataset to use: ``dataset_dir`` when given, else the synthetic default, generated on first use.

    Raises:
        DatasetError: ``dataset_dir`` is given but does not exist.
    """
    if dataset_dir not in (None, "", "None", "null"):
        path = Path(dataset_dir)
        if not path.is_dir():
            msg = f"{path}: dataset folder not found (leave dataset_dir empty for the synthetic default)"
            raise DatasetError(msg)
        return path
    from pipeline.data.synth import ensure_synthetic_dataset

    return ensure_synthetic_dataset(synthetic_dir)


def prepare_datalists(
    dataset_dir: str | os.PathLike,
    val_fraction: float = 0.2,
    fold: int | None = None,
    num_folds: int = 5,
    seed: int = 0,
    check: bool = True,
) -> dict[str, list[dict]]:
    """Training and validation datalists for a dataset, checked up front.

    Returns:
        ``{"train": [...], "val": [...]}``, each item a dict with ``image``, ``label``, ``id`` (and ``scroll_id`` when known).

    Raises:
        DatasetError: any problem with the dataset, naming the file.
    """
    cases = train_datalist(dataset_dir)
    if check:
        check_train_datalist(cases)
    train, val = split_datalist(cases, val_fraction=val_fraction, fold=fold, num_folds=num_folds, seed=seed)
    return {"train": train, "val": val}


def require_file(path: str | os.PathLike, hint: str) -> Path:
    """``path`` if it is a file, else a clear error that says what to do (``hint``).

    Raises:
        MissingFileError: the file does not exist (a ``FileNotFoundError``).
    """
    p = Path(path)
    if not p.is_file():
        msg = f"{p}: not found; {hint}"
        raise MissingFileError(msg)
    return p


def validation_subset(cases: list[dict], max_cases: int | None) -> list[dict]:
    """At most ``max_cases`` validation cases, evenly spaced over the list (the same ones every run), logged.

    Full sliding-window validation of every case every few epochs dominates training time at real scale (160
    volumes of 320^3); a fixed subset keeps the validation curve comparable between epochs. The evaluation
    command (``evaluate.yaml``) scores every case.

    Args:
        cases: the validation datalist.
        max_cases: the largest subset; None (or at least ``len(cases)``) keeps every case.
    """
    if max_cases in (None, "None", "null") or int(max_cases) >= len(cases):
        return list(cases)
    if int(max_cases) < 1:
        msg = f"val_max_cases={max_cases}: use at least 1, or null for every validation case"
        raise DatasetError(msg)
    picks = np.linspace(0, len(cases) - 1, int(max_cases)).round().astype(int)
    subset = [cases[i] for i in sorted(set(picks.tolist()))]
    logger.info("validating on %d of %d validation cases during training: %s", len(subset), len(cases), [c.get("id") for c in subset])
    return subset

"""A preprocessed volume store: every training volume decoded once into files that every run, resume, DDP rank
and loader worker memory-maps (nnU-Net's preprocessed data, in MONAI's idiom): the image uncompressed, the label
and skeleton packed into one byte and compressed in chunks (about 1.1 bytes per voxel on disk with skeletons, for a
uint8 image).

Decoding an LZW TIFF of 320^3 takes seconds; ``CacheDataset`` repeats it at every start and holds the decoded set
in each process's memory. The store does it once per machine and keeps, per case, in ``cache_dir``::

    <id>-<key>.image.npy        uint8 or uint16 (Z, Y, X): the source's dtype (1 or 2 bytes per voxel)
    <id>-<key>.label.chunks     uint8 (Z, Y, X), LZ4 in 64^3 chunks: bits 0-1 the label (0 background, 1 surface,
                                2 unlabeled), bit 2 the tubed skeleton of the surface (only for the cases of the
                                lists named in ``skeletons``; the .json says whether it is there)
    <id>-<key>.centres.npy      int32 flat voxel indices: a bounded random sample of each class's voxels (crop centres)
    <id>-<key>.json             shape, image dtype, intensity mean/std, centres per class, skeleton or not, the
                                sources it was built from

On disk, per voxel (320^3 synthetic scrolls, uint8 images): image 1.0, label with skeleton ~0.06, centres ~0.05
(200,000 per class): ~1.1 bytes, against 3.0 for the uncompressed ``.npy`` files of format 1. The image stays
uncompressed: a crop of it is a memory-mapped slice, and CT noise compresses little (the synthetic images: 0.89 with
zstd). The label and skeleton share one file so that a crop decodes the chunks it touches once for both
(:class:`PackedVolume` over :class:`pipeline.data.chunked.ChunkedVolume`).

Images keep their dtype: a uint8 image stays uint8, a uint16 one (full-resolution scroll CT) stays uint16, since
the network input is z-scored with the whole volume's statistics (``transforms.intensity.NormalizeWithStatsd``),
which a conversion to uint8 would coarsen. Another integer dtype (a NIfTI int16, say) is stored as the smaller of
uint8/uint16 that holds its values; float images and values outside 0..65535 are refused, naming the file. Labels
are always uint8 (values 0, 1, 2; a uint16 label file holding them is cast).

``key`` hashes the image's and the label's absolute path, size and mtime with :data:`PREPROCESS_VERSION`, so a
changed source (or a new preprocessing) gets a new entry and an unchanged one is never rebuilt; the entries of
an older format are rebuilt once (one log line says so) and their files removed. Every file is
written to a temporary name and renamed; the ``.json`` is written last, so an entry without it was never finished.
An entry whose files are missing, truncated or unreadable is rebuilt with a warning naming the file. Concurrent
builders of one entry (two runs, or ranks sharing a folder) serialise on a ``fcntl`` lock per entry.

The skeleton (skeleton recall loss, ``pipeline.training.losses``) costs seconds per volume (:func:`tubed_skeleton`), so it
is built only when asked for, once: a finished entry that lacks it gets it from its stored label (the label file is
rewritten with the skeleton bit, then the .json says so; image and centres untouched).

Under DDP the ranks of a machine split the entries to build, then wait at a barrier; every rank then maps the same
files (``np.load(mmap_mode="r")``, :class:`pipeline.data.chunked.ChunkedVolume`), so the OS page cache holds the hot
part once for all of them.

Example::

    store = build_store(prepare_datalists("data/vesuvius"), "outputs/store")
    dataset = StoreDataset(store["train"], transform=crop_and_augment, mode="auto")
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.data import Dataset
from monai.transforms import apply_transform

from pipeline.data.chunked import ChunkedVolume, ChunkedVolumeError, chunked_problem, write_chunked
from pipeline.data.datalist import DatasetError, check_volume_pair
from pipeline.utils.files import atomic_write
from pipeline.utils.memory import available_memory
from transforms.io import VolumeError, read_volume

__all__ = [
    "LABEL_BITS",
    "PREPROCESS_VERSION",
    "SKELETON_SHIFT",
    "PackedField",
    "PackedVolume",
    "STORE_MODES",
    "StoreError",
    "entry_key",
    "tubed_skeleton",
    "build_store",
    "choose_mode",
    "stored_bytes",
    "StoreDataset",
]

logger = logging.getLogger(__name__)

PREPROCESS_VERSION = 2
"""Bump when what an entry holds changes: every entry is then rebuilt. 1: uncompressed ``.npy`` label and skeleton;
2: label and skeleton packed in one chunked LZ4 file (:mod:`pipeline.data.chunked`)."""
STORE_MODES = ("auto", "ram", "mmap")
LABEL_CLASSES = (0, 1)  # crop-centre classes; 2 (unlabeled) is never a centre
_ARRAYS = ("image", "label", "centres")
_CHUNKED = ("label",)  # compressed chunked volumes; the others are .npy files
_LABEL_BYTES = 0.375  # bound of the packed label's bytes per voxel for the disk check (measured ~0.06 with the
# skeleton on synthetic scrolls; its 3 bits of entropy per voxel at worst)
LABEL_BITS = 0b011  # the packed label file: the label in bits 0-1,
SKELETON_SHIFT = 2  # the skeleton in bit 2
IMAGE_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))  # what the store keeps an image as
SKELETON = "skeleton"
SKELETON_TUBE = 2  # dilations of the skeleton, as the paper's "tubed skeleton" (nnU-Net: dilation(dilation(skel)))
_RAM_SHARE = 0.5  # in RAM only when the set takes at most this share of the memory available


class StoreError(DatasetError):
    """The store cannot be built or read: unwritable folder, full disk, a source that changed while building."""


def _stat_key(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError as e:
        msg = f"{p}: cannot read ({e.strerror})"
        raise DatasetError(msg) from e
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def entry_key(case: dict) -> tuple[str, dict[str, Any]]:
    """The store key of a case (hex digest) and the source facts it hashes (path, size, mtime of image and label,
    and :data:`PREPROCESS_VERSION`)."""
    sources = {"version": PREPROCESS_VERSION, "image": _stat_key(case["image"]), "label": _stat_key(case["label"])}
    digest = hashlib.sha256(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:16]
    return digest, sources


def _safe_id(case_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(case_id))


def _npy_ok(path: Path, shape: tuple[int, ...] | None, dtype: np.dtype) -> str | None:
    """None when ``path`` is a complete ``.npy`` of ``shape``/``dtype`` (header and size), else what is wrong."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            header = read(f)  # (shape, fortran_order, dtype)
            offset = f.tell()
        file_size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except Exception as e:  # a damaged header raises many types
        return f"unreadable header ({type(e).__name__}: {e})"
    got_shape, _, got_dtype = header
    if got_dtype != dtype or (shape is not None and tuple(got_shape) != tuple(shape)):
        return f"holds {got_dtype} {tuple(got_shape)}, expected {dtype} {shape}"
    expected = offset + int(np.prod(got_shape)) * got_dtype.itemsize
    if file_size != expected:
        return f"truncated ({file_size} of {expected} bytes)"
    return None


class _Entry:
    """File names and validity of one case's store entry."""

    def __init__(self, cache_dir: Path, case: dict) -> None:
        self.case = case
        self.key, self.sources = entry_key(case)
        self.stem = cache_dir / f"{_safe_id(case.get('id', Path(case['image']).name))}-{self.key}"
        self.meta_path = self.stem.with_name(self.stem.name + ".json")
        self.lock_path = self.stem.with_name(self.stem.name + ".lock")

    def path(self, name: str) -> Path:
        return self.stem.with_name(f"{self.stem.name}.{name}.{'chunks' if name in _CHUNKED else 'npy'}")

    def problem(self) -> str | None:
        """None when the entry is complete and matches the sources, else what is wrong with which file."""
        if not self.meta_path.is_file():
            return "not built"
        try:
            meta = json.loads(self.meta_path.read_text())
            shape = tuple(meta["shape"])
            image_dtype = np.dtype(meta.get("image_dtype", "uint8"))  # entries written before uint16 were all uint8
            n_centres = int(sum(meta["centres_per_class"]))
            if meta["sources"] != self.sources:
                return f"{self.meta_path}: built from other sources"
        except Exception as e:
            return f"{self.meta_path}: unreadable ({type(e).__name__}: {e})"
        for name, want_shape, dtype in (("image", shape, image_dtype), ("label", shape, np.uint8), ("centres", (n_centres,), np.int32)):
            why = (chunked_problem if name in _CHUNKED else _npy_ok)(self.path(name), want_shape, np.dtype(dtype))
            if why is not None:
                return f"{self.path(name)}: {why}"
        return None

    def skeleton_problem(self) -> str | None:
        """None when a complete entry's label file holds the skeleton, else ``"missing"``."""
        return None if json.loads(self.meta_path.read_text()).get(SKELETON) else "missing"

    def todo(self, skeleton: bool) -> tuple[str | None, str | None]:
        """(what is wrong with the entry, what is wrong with its skeleton when ``skeleton``); (None, None): ready."""
        problem = self.problem()
        if problem is not None:
            return problem, "missing" if skeleton else None
        return None, self.skeleton_problem() if skeleton else None

    def item(self, skeleton: bool = False) -> dict:
        """The datalist item of the built entry: the case's own keys, the store files, statistics and centres (and
        ``skeleton``, the same packed label file, when ``skeleton``)."""
        meta = json.loads(self.meta_path.read_text())
        return {
            **({SKELETON: str(self.path("label"))} if skeleton else {}),
            **{k: v for k, v in self.case.items() if k not in ("image", "label")},
            "source_image": self.case["image"],
            "image": str(self.path("image")),
            "label": str(self.path("label")),
            "centres": str(self.path("centres")),
            "centres_per_class": list(meta["centres_per_class"]),
            "shape": list(meta["shape"]),
            "image_dtype": meta.get("image_dtype", "uint8"),
            "image_stats": list(meta["image_stats"]),
        }


def _centres(label: np.ndarray, max_per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    out, counts = [], []
    flat = label.reshape(-1)
    for cls in LABEL_CLASSES:
        idx = np.flatnonzero(flat == cls)
        if idx.size > max_per_class:
            idx = np.sort(rng.choice(idx, size=max_per_class, replace=False))
        out.append(idx.astype(np.int32))
        counts.append(int(idx.size))
    return np.concatenate(out), counts


def _as_label(path: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind in "ui" and (arr.size == 0 or (arr.min() >= 0 and arr.max() <= 255)):
        return np.ascontiguousarray(arr, dtype=np.uint8)
    msg = f"{path}: {arr.dtype} values outside uint8 [{arr.min()}, {arr.max()}]; the store holds uint8 labels (0, 1, 2)"
    raise DatasetError(msg)


def _as_image(path: str, arr: np.ndarray) -> np.ndarray:
    """The image as the store keeps it: uint8 and uint16 unchanged, other integers as the smaller of the two that
    holds their values."""
    if arr.dtype.kind == "u" and arr.dtype.itemsize <= 2:  # native byte order: the .npy check compares dtypes
        return np.ascontiguousarray(arr, dtype=IMAGE_DTYPES[arr.dtype.itemsize - 1])
    if arr.dtype.kind not in "ui":
        msg = f"{path}: {arr.dtype} image; the store holds uint8 or uint16 images (integer CT), convert it to one of those"
        raise DatasetError(msg)
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    for dtype in IMAGE_DTYPES:
        if lo >= 0 and hi <= np.iinfo(dtype).max:
            return np.ascontiguousarray(arr, dtype=dtype)
    msg = f"{path}: {arr.dtype} values outside uint16 [{lo}, {hi}]; the store holds uint8 or uint16 images"
    raise DatasetError(msg)


def _write(path: Path, write: Callable[[Any], Any]) -> None:
    try:
        atomic_write(path, write)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            msg = f"{path}: disk full while writing the volume store; free space or set cache_dir to another disk"
        else:
            msg = f"{path}: cannot write the volume store ({e.strerror or e}); set cache_dir to a writable folder"
        raise StoreError(msg) from e


def tubed_skeleton(label: np.ndarray, tube: int = SKELETON_TUBE) -> np.ndarray:
    """The "tubed skeleton" of the surface (label 1) of a (Z, Y, X) label, as the skeleton recall loss uses it.

    Lee's thinning of ``label == 1`` (2, unlabeled, counts as background), exactly scikit-image's 3D
    ``skeletonize`` (:func:`pipeline.data.thinning.thin`, ~2.5 s for a 320^3 volume on one core where scikit-image
    takes ~15 s), dilated ``tube`` times with the 6-connected cross and restricted to the surface (Kirchhoff et al.
    2024; their nnU-Net code: ``dilation(dilation(skeletonize(seg))) * seg``). The dilation writes the L1 ball of
    radius ``tube`` around each skeleton voxel (the same voxels as ``tube`` binary dilations with the cross, a
    tenth of their time: the skeleton is a few percent of the volume).

    Args:
        label: 0 background, 1 surface, 2 unlabeled.
        tube: dilations of the one-voxel skeleton.

    Returns:
        uint8 array of ``label``'s shape, 1 on the tubed skeleton.
    """
    from pipeline.data.thinning import thin  # numba compiles it at the first call in a fresh checkout

    surface = np.asarray(label) == 1
    if not surface.any():
        return np.zeros(surface.shape, dtype=np.uint8)
    skeleton = thin(surface)
    if tube:
        padded = np.pad(skeleton, tube)
        strides = np.array(padded.strides) // padded.itemsize
        voxels = np.flatnonzero(padded)
        tubed = np.zeros(padded.size, dtype=bool)
        for step in itertools.product(range(-tube, tube + 1), repeat=3):
            if sum(map(abs, step)) <= tube:
                tubed[voxels + int(np.dot(step, strides))] = True
        skeleton = tubed.reshape(padded.shape)[(slice(tube, -tube),) * 3]
    return (skeleton & surface).view(np.uint8)


def _pack(label: np.ndarray) -> np.ndarray:
    """The label with its tubed skeleton in bit 2 (:data:`SKELETON_SHIFT`)."""
    return label | (tubed_skeleton(label) << SKELETON_SHIFT)


def _build_entry(entry: _Entry, check: bool, max_per_class: int, seed: int, skeleton: bool = False) -> bool:
    """Build one entry (or only its missing skeleton) under its lock; False when another builder finished it
    meanwhile."""
    with open(entry.lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            problem, skeleton_problem = entry.todo(skeleton)
            if problem is None and skeleton_problem is None:
                return False
            if problem is None:  # a finished entry without the skeleton: the label file gets it, then the .json says so
                packed = _pack(np.asarray(ChunkedVolume(entry.path("label"))) & LABEL_BITS)
                _write(entry.path("label"), lambda f: write_chunked(f, packed))
                meta = {**json.loads(entry.meta_path.read_text()), SKELETON: True}
                _write(entry.meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
                return True
            if problem != "not built":
                logger.warning("volume store: rebuilding %s", problem)
                # the old .json must not vouch for files half rewritten (a skeleton bit it says is there, say)
                entry.meta_path.unlink(missing_ok=True)
            case = entry.case
            try:
                image = read_volume(case["image"])
                label = read_volume(case["label"])
            except VolumeError as e:
                raise DatasetError(str(e)) from e
            if check:  # the same checks and messages as pipeline.data.datalist's up-front check, on the decoded arrays
                check_volume_pair(case, image.shape, label)
            image, label = _as_image(case["image"], image), _as_label(case["label"], label)
            for side in ("image", "label"):
                if _stat_key(case[side]) != entry.sources[side]:
                    msg = f"{case[side]}: changed while the volume store was being built; rerun once it is complete"
                    raise StoreError(msg)
            top = int(label.max()) if label.size else 0
            if top > 2:  # bit 2 of the stored byte holds the skeleton: a 3..255 label would corrupt it
                msg = f"{case['label']}: label value {top}; labels are 0 (background), 1 (surface), 2 (unlabeled)"
                raise DatasetError(msg)
            if label.shape != image.shape:
                msg = f"{case['label']}: label shape {label.shape} differs from image shape {image.shape} ({case['image']})"
                raise DatasetError(msg)
            rng = np.random.default_rng([seed, int(entry.key, 16) % 2**32])
            centres, counts = _centres(label, max_per_class, rng)
            stored_label = _pack(label) if skeleton else label
            _write(entry.path("image"), lambda f: np.save(f, image, allow_pickle=False))
            _write(entry.path("label"), lambda f: write_chunked(f, stored_label))
            _write(entry.path("centres"), lambda f: np.save(f, centres, allow_pickle=False))
            meta = {
                "shape": list(image.shape),
                "image_dtype": image.dtype.name,
                "image_stats": [float(image.mean(dtype=np.float64)), float(image.std(dtype=np.float64))],
                "centres_per_class": counts,
                SKELETON: bool(skeleton),
                "sources": entry.sources,
            }
            _write(entry.meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
            _remove_stale(entry)
            return True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _stale_files(entry: _Entry) -> list[Path]:
    """The files of this case's older entries built from the same source image (a changed file, or an older store
    format, leaves one behind), each entry's ``.json`` last."""
    prefix = entry.stem.name.rsplit("-", 1)[0]
    files = []
    for meta_path in entry.stem.parent.glob(f"{prefix}-*.json"):
        if meta_path == entry.meta_path:
            continue
        try:
            same_source = json.loads(meta_path.read_text())["sources"]["image"]["path"] == entry.sources["image"]["path"]
        except Exception:
            continue
        if same_source:
            stem = meta_path.with_suffix("")
            for name in (*_ARRAYS, SKELETON):
                for suffix in ("npy", "chunks"):  # this format's files and format 1's (.npy label and skeleton)
                    path = stem.with_name(f"{stem.name}.{name}.{suffix}")
                    if path.exists():
                        files.append(path)
            files.append(meta_path)  # its .lock stays: another process may hold it
    return files


def _remove_stale(entry: _Entry) -> None:
    """Delete this case's older entries built from the same source image."""
    for path in _stale_files(entry):
        path.unlink(missing_ok=True)


def _old_format(cache_dir: Path, entries: Sequence[_Entry], log: bool) -> set[str]:
    """The source images of ``entries`` that have entries of an older format in ``cache_dir``; one log line (when
    ``log``) says how many there are and that they are rebuilt."""
    sources = {e.sources["image"]["path"] for e in entries}
    old: dict[int, int] = {}
    paths = set()
    for meta_path in cache_dir.glob("*.json"):
        try:
            meta_sources = json.loads(meta_path.read_text())["sources"]
        except Exception:
            continue
        version = meta_sources.get("version")
        if version != PREPROCESS_VERSION and meta_sources.get("image", {}).get("path") in sources:
            old[version] = old.get(version, 0) + 1
            paths.add(meta_sources["image"]["path"])
    if old and log:
        found = ", ".join(f"{n} of format {v}" for v, n in sorted(old.items(), key=lambda kv: str(kv[0])))
        logger.info(
            "volume store %s: rebuilding the entries of an older format (%s) in format %d (label and skeleton "
            "packed and compressed); their old files are removed as each is rebuilt", cache_dir, found, PREPROCESS_VERSION,
        )
    return paths


def _check_writable(cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        msg = f"{cache_dir}: volume store folder is not writable ({e.strerror or e}); set cache_dir to a writable folder"
        raise StoreError(msg) from e


def _check_space(
    cache_dir: Path, todo: list[tuple[_Entry, str | None, str | None]], max_centres_per_class: int, workers: int
) -> None:
    """Refuse a build the disk cannot hold. Each entry's older versions (a changed source, an older store format)
    are deleted once it is built, so the peak is the new bytes less the old ones, plus the entries in flight."""
    from transforms.io import read_volume_header

    sizes, freed = [], 0
    for e, problem, skeleton_problem in todo:
        try:
            shape, dtype = read_volume_header(e.case["image"])
        except VolumeError as err:
            raise DatasetError(str(err)) from err
        # bytes per voxel: image (1 or 2: a wider integer image is stored as at most uint16), centres (4 bytes each),
        # and the compressed label (with the skeleton) at its bound; an entry getting its skeleton rewrites its label
        n = int(np.prod(shape))
        if problem is not None:
            sizes.append((min(dtype.itemsize, 2) + _LABEL_BYTES) * n + 4 * len(LABEL_CLASSES) * max_centres_per_class)
            freed += sum(p.stat().st_size for p in _stale_files(e) if p.exists())
        elif skeleton_problem is not None:
            sizes.append(_LABEL_BYTES * n)
    if not sizes:
        return
    in_flight = sum(sorted(sizes)[-workers:])
    need = int(max(sum(sizes) - freed, 0) + in_flight)
    free = shutil.disk_usage(cache_dir).free
    if need > free:
        old = f" (after the {freed / 2**30:.1f} GiB of older entries it replaces are removed)" if freed else ""
        msg = (
            f"{cache_dir}: the volume store needs {need / 2**30:.1f} GiB more{old}, {free / 2**30:.1f} GiB free; "
            "free space or set cache_dir to another disk"
        )
        raise StoreError(msg)


def _local_share(entries: list[_Entry]) -> list[_Entry]:
    """This rank's share of the entries: the ranks of one machine split them (torchrun's LOCAL_*)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return entries[local_rank::local_world]


def _progress(done: int, total: int, built: int, start: float) -> None:
    elapsed = time.monotonic() - start
    eta = elapsed / done * (total - done) if done else float("nan")
    logger.info("volume store: %d/%d volumes (%d built), %.0f s elapsed, ETA %.0f s", done, total, built, elapsed, eta)


def build_store(
    datalists: dict[str, list[dict]],
    cache_dir: str | os.PathLike,
    check: bool = True,
    max_centres_per_class: int = 200_000,
    workers: int | None = None,
    seed: int = 0,
    skeletons: Sequence[str] = (),
) -> dict[str, list[dict]]:
    """Build (or reuse) the store entries of every case in ``datalists`` and return the lists of store items.

    Args:
        datalists: ``{"train": [...], "val": [...]}`` of cases with ``image``/``label`` paths (``pipeline.data.datalist``).
        cache_dir: a writable folder for the store (never beside read-only inputs).
        check: verify label values are in {0, 1, 2} as each volume is decoded (entries are checked when built).
        max_centres_per_class: crop centres kept per class (a bounded random sample of its voxels).
        workers: decoding threads (default: up to 4, the CPUs this process may use).
        seed: seed of the centre sampling (with each entry's key).
        skeletons: names of the lists (e.g. ``["train"]``) whose cases get a tubed skeleton (:func:`tubed_skeleton`),
            for the skeleton recall loss; built once, for an existing entry too.

    Returns:
        the same lists whose items have ``image``/``label``/``centres`` pointing to the store's files,
        ``image_stats`` ``[mean, std]``, ``centres_per_class``, ``shape``, ``image_dtype`` and ``source_image``;
        the items of the lists in ``skeletons`` also have ``skeleton``.

    Raises:
        StoreError: ``cache_dir`` not writable, not enough disk, a source changed while building.
        DatasetError: a source volume is unreadable, a float image or one with values outside 0..65535, or a label
            that does not match its image.
    """
    cache_dir = Path(cache_dir)
    _check_writable(cache_dir)
    entries = {name: [_Entry(cache_dir, c) for c in cases] for name, cases in datalists.items()}
    unique = list({e.stem: e for es in entries.values() for e in es}.values())
    with_skeleton = {e.stem for name in skeletons for e in entries.get(name, [])}
    old_sources = _old_format(cache_dir, unique, log=int(os.environ.get("LOCAL_RANK", 0)) == 0)
    # split the full list, not the missing entries: a rank that starts late must not see a shifted share
    todo = [(e, *e.todo(e.stem in with_skeleton)) for e in _local_share(unique)]
    for e, *problems in todo:  # a finished entry whose older files outlived its build (interrupted in between)
        if problems == [None, None] and e.sources["image"]["path"] in old_sources:
            _remove_stale(e)
    todo = [t for t in todo if t[1:] != (None, None)]
    mine = [t[0] for t in todo]
    built = 0
    if mine:
        n_workers = workers or max(1, min(4, len(os.sched_getaffinity(0))))
        _check_space(cache_dir, todo, max_centres_per_class, n_workers)
        logger.info("volume store %s: building %d of %d volumes with %d threads", cache_dir, len(mine), len(unique), n_workers)
        start, done, last_log = time.monotonic(), 0, 0.0
        bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=len(mine), desc="volume store", unit="vol")
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            futures = [pool.submit(_build_entry, e, check, max_centres_per_class, seed, e.stem in with_skeleton) for e in mine]
            try:
                for fut in as_completed(futures):
                    built += bool(fut.result())
                    done += 1
                    if bar is not None:
                        bar.update(1)
                    elif time.monotonic() - last_log > 10 or done == len(mine):
                        _progress(done, len(mine), built, start)
                        last_log = time.monotonic()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            finally:
                if bar is not None:
                    bar.close()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    items = {}
    for name, es in entries.items():
        for e in es:
            problem, skeleton_problem = e.todo(name in skeletons)
            if problem == "not built":
                msg = f"{e.meta_path}: missing after the build (another rank failed, or something removed it)"
                raise StoreError(msg)
            if problem is not None:
                msg = f"{problem} after the build (another process writing to {cache_dir}?)"
                raise StoreError(msg)
            if skeleton_problem is not None:
                msg = f"{e.meta_path}: skeleton {skeleton_problem} after the build (another rank failed, or another process writing to {cache_dir}?)"
                raise StoreError(msg)
        items[name] = [e.item(skeleton=name in skeletons) for e in es]
    logger.info("volume store %s: %d volumes ready (%d built by this process)", cache_dir, len(unique), built)
    return items


def stored_bytes(item: dict) -> int:
    """Bytes of a store item's volumes decoded in memory (``store_mode`` ram): the image (uint8 or uint16), the
    uint8 label and skeleton (if any). On disk the label and skeleton take a few percent of that."""
    image_bytes = np.dtype(item.get("image_dtype", "uint8")).itemsize
    return (image_bytes + 1 + (SKELETON in item)) * int(np.prod(item["shape"]))


def choose_mode(items: Sequence[dict], mode: str = "auto", copies: int | None = None) -> str:
    """``"ram"`` or ``"mmap"`` for ``items``, logged with the reason.

    ``auto`` holds the volumes in RAM only when ``copies`` of them (one per process of this machine under DDP)
    take at most half of the memory available (:func:`available_memory`, cgroup limits included); otherwise they
    stay memory-mapped and the OS page cache holds the hot part once for all processes.

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in STORE_MODES:
        msg = f"store_mode {mode!r} unknown; use one of {STORE_MODES}"
        raise ValueError(msg)
    size = sum(stored_bytes(it) for it in items)
    kinds = "/".join(sorted({it.get("image_dtype", "uint8") for it in items}, key=lambda d: np.dtype(d).itemsize)) or "uint8"
    copies = copies or int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    avail = available_memory()
    if mode == "auto":
        mode = "ram" if size * copies <= _RAM_SHARE * avail else "mmap"
        why = f"{copies} x {size / 2**30:.2f} GiB of {kinds} volumes {'<=' if mode == 'ram' else '>'} {_RAM_SHARE:.0%} of {avail / 2**30:.2f} GiB available"
    else:
        why = f"store_mode={mode}; {copies} x {size / 2**30:.2f} GiB of {kinds} volumes, {avail / 2**30:.2f} GiB available"
    logger.info("volume store: %s (%s)", "in RAM" if mode == "ram" else "memory-mapped", why)
    return mode


class PackedVolume:
    """The packed label file of an entry, read window by window. The last window decoded in this process is kept
    (one, for all entries: memory stays one crop's), so cutting the label and then the skeleton of a crop decodes
    its chunks once."""

    _last: tuple[Any, np.ndarray] | None = None  # ((path, window), decoded array), shared by every entry

    def __init__(self, volume: ChunkedVolume) -> None:
        self.volume = volume
        self.shape, self.dtype, self.ndim = volume.shape, volume.dtype, volume.ndim

    def __getitem__(self, key: Any) -> np.ndarray:
        window = key if isinstance(key, tuple) else (key,)
        self.volume._data()  # (re)maps the file: its identity is the one decoded below
        tag = (self.volume.path, self.volume.identity, tuple((k.start, k.stop, k.step) if isinstance(k, slice) else k for k in window))
        last = PackedVolume._last  # one read: another thread may replace it meanwhile
        if last is not None and last[0] == tag:
            return last[1]
        decoded = self.volume[key]
        PackedVolume._last = (tag, decoded)
        return decoded


class PackedField:
    """One field of a packed label array (``(packed >> shift) & bits``), sliced like an array: a crop's window
    (``field[z0:z1, y0:y1, x0:x1]``, a new array) or the whole volume (``np.asarray(field)``)."""

    def __init__(self, packed: PackedVolume | np.ndarray, bits: int, shift: int) -> None:
        self.packed, self.bits, self.shift = packed, bits, shift
        self.shape, self.dtype, self.ndim = packed.shape, np.dtype(np.uint8), 3

    def __getitem__(self, key: Any) -> np.ndarray:
        return _unpack(self.packed[key], self.bits, self.shift)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        # the whole volume (validation) bypasses the window cache: it would hold a volume instead of a crop
        packed = np.asarray(self.packed.volume) if isinstance(self.packed, PackedVolume) else self.packed
        out = _unpack(packed, self.bits, self.shift)
        return out if dtype is None else out.astype(dtype, copy=False)


def _unpack(packed: np.ndarray, bits: int, shift: int) -> np.ndarray:
    """``(packed >> shift) & bits`` in one pass where one suffices (the top field needs no mask, the bottom no
    shift): a 128^3 crop is cut twice per sample."""
    if shift == 0:
        return np.bitwise_and(packed, bits)
    out = np.right_shift(packed, shift)
    if (0xFF >> shift) & ~bits:  # bits above the field: mask them
        np.bitwise_and(out, bits, out=out)
    return out


def _field(packed: PackedVolume | np.ndarray, bits: int, shift: int) -> PackedField | np.ndarray:
    """A field of the packed label: computed now from an array in RAM, lazily from a mapped :class:`PackedVolume`."""
    if isinstance(packed, np.ndarray):
        return _unpack(packed, bits, shift)
    return PackedField(packed, bits, shift)


class StoreDataset(Dataset):
    """A MONAI ``Dataset`` over store items (:func:`build_store`) whose arrays are either read into RAM at
    construction (the label and skeleton decoded) or memory-mapped (``np.load(mmap_mode="r")`` and
    :class:`pipeline.data.chunked.ChunkedVolume`, opened lazily in each process, so forked and spawned loader
    workers share the OS page cache instead of copying the volumes).

    Each item given to ``transform`` holds the item's keys with ``image`` (uint8 or uint16, as stored) and ``label``
    (uint8) as (Z, Y, X) arrays, ``centres`` as a list of int32 flat-index arrays (one per class of
    :data:`LABEL_CLASSES`), ``skeleton`` as a uint8 (Z, Y, X) array when the item has one, and ``image_stats`` as a
    float32 tensor; the transform cuts what it needs (``transforms.crop.RandCropByStoredCentresd``) without copying
    the volume. Memory-mapped, the label and skeleton are array-likes that decode the windows sliced from them
    (``np.asarray`` gives the whole volume) and offer nothing else of numpy's interface (no comparisons or
    reductions): a transform that replaces the crop takes ``np.asarray`` of them first.

    Args:
        data: store items.
        transform: applied to each item.
        mode: ``"ram"``, ``"mmap"`` or ``"auto"`` (:func:`choose_mode`).

    Example::

        ds = StoreDataset(store["train"], transform=Compose([RandCropByStoredCentresd(...), ...]), mode="mmap")
    """

    def __init__(self, data: Sequence[dict], transform: Callable | None = None, mode: str = "auto") -> None:
        super().__init__(data=list(data), transform=transform)
        self.mode = choose_mode(self.data, mode)
        self._arrays: dict[int, dict[str, Any]] = {}
        if self.mode == "ram":
            for i in range(len(self.data)):
                self._arrays[i] = self._open(i, mmap_mode=None)

    def _open(self, index: int, mmap_mode: str | None) -> dict[str, Any]:
        item = self.data[index]
        arrays = {}
        for name in _ARRAYS:
            try:
                if name == "label":  # label and skeleton from the packed file: windows when mapped, at once in RAM
                    packed = PackedVolume(ChunkedVolume(item[name]))
                    if not mmap_mode:
                        packed = np.asarray(packed.volume)
                    arrays["label"] = _field(packed, LABEL_BITS, 0)
                    if SKELETON in item:
                        arrays[SKELETON] = _field(packed, 1, SKELETON_SHIFT)
                else:
                    arrays[name] = np.load(item[name], mmap_mode=mmap_mode, allow_pickle=False)
            except ChunkedVolumeError as e:  # names the file and what to do already
                raise StoreError(str(e)) from e
            except (OSError, ValueError) as e:
                msg = f"{item[name]}: cannot read the store file ({e}); delete it and restart to rebuild it"
                raise StoreError(msg) from e
        bounds = np.cumsum([0, *item["centres_per_class"]])
        arrays["centres"] = [arrays["centres"][bounds[i] : bounds[i + 1]] for i in range(len(LABEL_CLASSES))]
        return arrays

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.mode == "mmap":
            state["_arrays"] = {}  # maps are reopened in the receiving process
        return state

    def _transform(self, index: int) -> Any:
        arrays = self._arrays.get(index)
        if arrays is None:
            arrays = self._arrays[index] = self._open(index, mmap_mode="r")
        item = {**self.data[index], **arrays, "image_stats": torch.tensor(self.data[index]["image_stats"], dtype=torch.float32)}
        for k in ("centres_per_class", "shape", "image_dtype"):
            item.pop(k)
        return apply_transform(self.transform, item) if self.transform is not None else item

"""3D TIFF input/output: a MONAI ``ImageReader`` for multi-page TIFF volumes and an atomic uint8 mask writer.

MONAI's ``LoadImage`` has no 3D TIFF reader (its PIL reader reads one 2D page) and no TIFF writer. The Kaggle
volumes are multi-page, LZW-compressed, uint8 TIFFs in (Z, Y, X) order; this module keeps that axis order end to
end: the array a reader returns, the patches the network sees and the masks written back all index (Z, Y, X).
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from monai.data import ImageReader
from monai.data.utils import is_supported_format
from monai.utils import ensure_tuple

from pipeline.utils.files import atomic_write

__all__ = [
    "TIFF_SUFFIXES",
    "VolumeError",
    "TiffReader",
    "case_id",
    "decode_volume",
    "read_volume",
    "read_volume_header",
    "read_volume_shape",
    "write_volume",
]

TIFF_SUFFIXES = ("tif", "tiff")
def case_id(path: str | os.PathLike) -> str:
    """A volume's case id: its file name up to the first dot, as the competition's scorer takes it
    (``a/b/1234.tif`` and ``1234.nii.gz`` are case ``1234``)."""
    return Path(path).name.split(".", 1)[0]


class VolumeError(ValueError):
    """A volume file that cannot be used: unreadable, not 3D, wrong dtype or values. The message names the file."""


class _TiffWarnings(logging.Handler):
    """Collects tifffile's warnings per thread: a truncated file is only *logged* as broken (invalid IFD offsets,
    a series that fails to reshape) while tifffile reads the pages it still finds."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        records = getattr(self.local, "records", None)
        if records is not None:
            records.append(record.getMessage())


_TIFF_WARNINGS = _TiffWarnings()
logging.getLogger("tifffile").addHandler(_TIFF_WARNINGS)


class _OpenTiff:
    """``tifffile.TiffFile`` that raises :class:`VolumeError` for a truncated or damaged file (``path``, or ``data``
    read from elsewhere, e.g. a zip member; errors name ``path``)."""

    def __init__(self, path: str | Path, data: bytes | None = None) -> None:
        self.path = path
        self.data = data

    def __enter__(self) -> tifffile.TiffFile:
        try:
            self.tif = tifffile.TiffFile(self.path if self.data is None else io.BytesIO(self.data))
        except Exception as e:  # tifffile raises many types; the caller needs the file name, not the library's type
            msg = f"{self.path}: cannot read TIFF ({type(e).__name__}: {e})"
            raise VolumeError(msg) from e
        _TIFF_WARNINGS.local.records = []
        problem = None
        try:
            pages = list(self.tif.pages)
            _ = self.tif.series
            size = Path(self.path).stat().st_size if self.data is None else len(self.data)
            ends = [o + c for p in pages for o, c in zip(p.dataoffsets, p.databytecounts, strict=False)]
            if ends and max(ends) > size:
                problem = f"pixel data run to byte {max(ends)}, the file has {size}"
        except Exception as e:  # a valid header whose pages cannot be walked: the file was cut short or damaged
            problem = f"{type(e).__name__}: {e}"
        finally:
            warnings, _TIFF_WARNINGS.local.records = _TIFF_WARNINGS.local.records, None
        if problem or warnings:
            self.tif.close()
            msg = f"{self.path}: truncated or damaged TIFF ({problem or warnings[0]}); copy the file again"
            raise VolumeError(msg)
        return self.tif

    def __exit__(self, *exc: object) -> None:
        self.tif.close()


def _read_tiff(path: str | Path, data: bytes | None = None) -> np.ndarray:
    with _OpenTiff(path, data) as tif:
        try:
            series = tif.series[0] if tif.series else None
            # One 3D series, or many 2D pages stored without series metadata: both are volumes.
            if series is not None and len(series.shape) >= 3:
                return series.asarray()
            return tif.asarray(key=range(len(tif.pages))) if len(tif.pages) > 1 else tif.asarray()
        except Exception as e:  # tifffile raises many types; the caller needs the file name, not the library's type
            msg = f"{path}: cannot read TIFF ({type(e).__name__}: {e})"
            raise VolumeError(msg) from e


def _check_3d(path: str | Path, arr: np.ndarray) -> np.ndarray:
    arr = np.squeeze(arr) if arr.ndim > 3 else arr
    if arr.ndim != 3:
        msg = f"{path}: expected a 3D volume (Z, Y, X), got an array of shape {arr.shape}"
        raise VolumeError(msg)
    if arr.dtype.kind not in "uif" or arr.dtype.itemsize > 4:
        msg = f"{path}: unsupported dtype {arr.dtype}; expected uint8 or uint16"
        raise VolumeError(msg)
    return arr


def read_volume(path: str | os.PathLike) -> np.ndarray:
    """Read a 3D volume as a numpy array in (Z, Y, X) order.

    TIFF (multi-page or one 3D series; LZW, zlib or uncompressed) is read with tifffile, NIfTI with nibabel.

    Args:
        path: a ``.tif``/``.tiff``/``.nii``/``.nii.gz`` file.

    Returns:
        the volume, with its stored dtype.

    Raises:
        VolumeError: the file is missing, unreadable or not 3D.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: file not found"
        raise VolumeError(msg)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            arr = np.asanyarray(nib.load(path).dataobj)
        except Exception as e:
            msg = f"{path}: cannot read NIfTI ({type(e).__name__}: {e})"
            raise VolumeError(msg) from e
    else:
        arr = _read_tiff(path)
    return _check_3d(path, arr)


def decode_volume(data: bytes, name: str) -> np.ndarray:
    """Decode a 3D TIFF held in memory (a zip member, say) as :func:`read_volume` reads a file.

    Args:
        data: the TIFF file's bytes.
        name: what errors call it, e.g. ``submission.zip:1234.tif``.

    Returns:
        the volume (Z, Y, X), with its stored dtype.

    Raises:
        VolumeError: unreadable, truncated or not 3D.
    """
    return _check_3d(name, _read_tiff(name, data))


def read_volume_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The shape of a volume from its header only (no pixel decoding), for cheap up-front checks.

    Raises:
        VolumeError: the file is missing or unreadable.
    """
    return read_volume_header(path)[0]


def read_volume_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and stored dtype of a volume from its header only (no pixel decoding).

    Raises:
        VolumeError: the file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: file not found"
        raise VolumeError(msg)
    try:
        if path.name.lower().endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(path)
            return tuple(int(s) for s in img.shape), np.dtype(img.get_data_dtype())
        with _OpenTiff(path) as tif:
            series = tif.series[0]
            if len(series.shape) >= 3 or len(tif.pages) == 1:
                shape = tuple(int(s) for s in series.shape)
            else:
                shape = (len(tif.pages), *(int(s) for s in tif.pages[0].shape))
            return shape, np.dtype(series.dtype)
    except VolumeError:
        raise
    except Exception as e:
        msg = f"{path}: cannot read header ({type(e).__name__}: {e})"
        raise VolumeError(msg) from e


def write_volume(path: str | os.PathLike, array: np.ndarray, compression: str = "lzw") -> Path:
    """Write a 3D uint8 volume as a compressed multi-page TIFF, atomically.

    The data go to a temporary file in the destination folder, are flushed to disk, then renamed over ``path``,
    so a reader never sees a half-written file.

    Args:
        path: destination ``.tif``.
        array: 3D array (Z, Y, X); boolean or integer masks are stored as uint8.
        compression: tifffile compression name (``"lzw"``, ``"zlib"``, ``None``).

    Returns:
        the path written.

    Raises:
        ValueError: the array is not 3D, or holds values outside uint8.
    """
    path = Path(path)
    arr = np.asarray(array)
    if arr.ndim != 3:
        msg = f"{path}: can only write 3D volumes, got shape {arr.shape}"
        raise ValueError(msg)
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            msg = f"{path}: values outside uint8 range [{arr.min()}, {arr.max()}]"
            raise ValueError(msg)
        arr = arr.astype(np.uint8)
    return atomic_write(path, lambda f: tifffile.imwrite(f, arr, compression=compression, photometric="minisblack"))


class TiffReader(ImageReader):
    """MONAI image reader for 3D TIFF volumes, usable as ``LoadImaged(keys, reader=TiffReader())``.

    The array keeps the file's (Z, Y, X) order and has no channel dimension (add one with
    ``EnsureChannelFirstd``). The affine is the identity: the Kaggle volumes are isotropic with spacing 1.

    Example::

        from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
        load = Compose([LoadImaged("image", reader=TiffReader()), EnsureChannelFirstd("image")])
        vol = load({"image": "train_images/1234.tif"})["image"]  # MetaTensor (1, Z, Y, X)
    """

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        return is_supported_format(filename, TIFF_SUFFIXES)

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> list[tuple[Path, Any]]:
        # A file error is returned, not raised: LoadImage catches what read() raises and silently tries its other
        # readers (PIL reads one 2D page of a broken TIFF, and the failure surfaces later naming no file).
        # get_data() runs outside that fallback and raises it, naming the file.
        out: list[tuple[Path, Any]] = []
        for name in ensure_tuple(data):
            try:
                out.append((Path(name), read_volume(name)))
            except VolumeError as e:
                out.append((Path(name), e))
        return out

    def get_data(self, img: list[tuple[Path, Any]]) -> tuple[np.ndarray, dict]:
        for _, arr in img:
            if isinstance(arr, VolumeError):
                raise arr
        arrays = [arr for _, arr in img]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            msg = f"volumes to stack have different shapes: {[(str(p), a.shape) for p, a in img]}"
            raise VolumeError(msg)
        data = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=0)
        meta = {
            "affine": np.eye(4),
            "original_affine": np.eye(4),
            "spatial_shape": np.asarray(arrays[0].shape),
            # no channel in the file; several files are stacked on a new first (channel) axis
            "original_channel_dim": float("nan") if len(arrays) == 1 else 0,
            "space": "RAS",
        }
        return data, meta

"""Streaming prediction: volumes larger than memory through the model, block by block, resumably (its command
line: :mod:`pipeline.cli.predict`).

    python -m pipeline predict --input PATH --output OUT.zarr [--model_path M [M ...]] [--num_parts N --part_id I]
        [--block_size 256] [--chunk_size 128] [--probabilities none|uint8|float16] [--<inference.yaml key> VALUE ...]

``PATH`` is a zarr array (v2 or v3), an OME-Zarr image (its full-resolution level), a 3D TIFF (read lazily through
tifffile's zarr interface) or a folder of them (then ``OUT`` is a folder of ``<name>.zarr``). The network, the
window (the training patch) and the tuned post-processing come from the model file's plans (:mod:`pipeline.model.plans`);
overlap, TTA and post-processing overrides are inference.yaml's keys, as in the bundle. Several model files or an
ensemble file (``--model_path A.pt B.pt [--model_weights "[0.25, 0.75]"]``, :mod:`pipeline.model.ensemble`): each
block is predicted by every model at its own window and their probabilities are fused (weighted mean) into one
block-sized buffer before post-processing (:class:`pipeline.inference.ensemble.EnsembleWindow`); the window cache is
shared out between the models.

How it stays exact and bounded:

- intensities are z-scored with the whole volume's mean and std (as inference.yaml's ``NormalizeIntensityd``),
  counted exactly in a first pass over chunk-sized blocks (integer histograms);
- the output is cut into blocks aligned to its chunks; each block is predicted by
  :class:`pipeline.inference.blockwise.BlockwiseSlidingWindow` from the windows of the global grid that touch it, so its
  probabilities equal whole-volume sliding-window inference's; memory depends on the block and the window (and the
  bounded window cache), not the volume;
- each finished block writes its chunks, then a completion record ``OUT/.blocks/<z>_<y>_<x>.json`` (atomically);
  a rerun skips recorded blocks. ``OUT/predict_manifest.json`` names the input (path, shape, dtype), the model
  (a hash of its weights) and every setting that changes the output; a rerun with another input or model is refused
  with one line, so an output never mixes blocks of two runs;
- ``--num_parts N --part_id I`` gives part ``I`` the blocks ``I, I + N, ...`` (raster order); the parts may run on
  different machines writing to one shared output (each block owns whole chunks); under torchrun the ranks of a
  machine split its part again (``torchrun --nproc_per_node=G -m pipeline predict ...``: one GPU per rank);
- post-processing (threshold, closing, hole plugging, small-component removal) is **block-local**: it runs on each
  block alone, so a component that crosses a block border is measured per block. Use a block larger than the
  structures ``min_size`` targets, or post-process the mask afterwards.

Output (a zarr v3 group): ``mask`` uint8 0/1 and, with ``--probabilities``, ``probability`` (uint8 = round(255 p),
or float16), both shaped as the input and chunked by ``--chunk_size``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.inference.blockwise import BlockwiseSlidingWindow
from pipeline.inference.ensemble import EnsembleWindow
from pipeline.inference.parts import check_part
from pipeline.utils.files import atomic_write_bytes
from pipeline.utils.timing import format_eta
from transforms.io import TIFF_SUFFIXES

__all__ = [
    "PredictError",
    "VolumeSource",
    "open_volume",
    "list_inputs",
    "volume_stats",
    "plan_blocks",
    "model_identity",
    "StreamingPredictor",
    "build_from_config",
]

logger = logging.getLogger(__name__)

MANIFEST = "predict_manifest.json"
RECORDS = ".blocks"
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
_PROB_DTYPES = ("none", "uint8", "float16")


class PredictError(ValueError):
    """Bad input or output for streaming prediction; the message is one line naming the path and the problem."""


@dataclass
class VolumeSource:
    """A 3D volume read lazily, region by region.

    Attributes:
        path: where it was opened from.
        array: the zarr array (or any array with ``shape``, ``dtype`` and numpy slicing).
        lead: indices of leading length-1 axes dropped (OME-Zarr's t, c).
        closer: releases the underlying store (tifffile's zarr store), or None.
    """

    path: Path
    array: Any
    lead: tuple[int, ...] = ()
    closer: Callable[[], None] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[len(self.lead) :])  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        """The voxels of ``region`` (three slices) as a numpy array of the stored dtype.

        Raises:
            PredictError: a chunk that cannot be read or decoded (truncated or corrupt store).
        """
        try:
            return np.asarray(self.array[(*self.lead, *region)])
        except Exception as e:  # codecs and stores raise many types; the line must name the volume and region
            where = ", ".join(f"{r.start}:{r.stop}" for r in region)
            msg = f"{self.path}: cannot read region [{where}] ({type(e).__name__}: {e})"
            raise PredictError(msg) from e

    def close(self) -> None:
        if self.closer is not None:
            self.closer()


def _is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _ZARR_MARKERS)


def _ome_level0(group: Any, path: Path) -> tuple[str, int]:
    """The full-resolution dataset path of an OME-Zarr image (v0.4 ``multiscales``, v0.5 ``ome.multiscales``) and
    its number of leading non-spatial axes."""
    attrs = dict(group.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not multiscales:
        arrays = sorted(group.array_keys())
        hint = f"; give one of its arrays, e.g. {path / arrays[0]}" if arrays else " and holds no array"
        msg = f"{path}: a zarr group, not an array (no OME-Zarr multiscales){hint}"
        raise PredictError(msg)
    first = multiscales[0]
    axes = first.get("axes") or []
    spatial = sum(1 for a in axes if (a.get("type") if isinstance(a, dict) else None) == "space") if axes else 3
    return str(first["datasets"][0]["path"]), max(len(axes) - spatial, 0) if axes else 0


def _check_array(path: Path, array: Any, lead_count: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in array.shape)
    if lead_count and any(s != 1 for s in shape[:lead_count]):
        msg = f"{path}: OME-Zarr non-spatial axes {shape[:lead_count]} must have length 1 (one channel, one time point)"
        raise PredictError(msg)
    spatial = shape[lead_count:]
    if len(spatial) != 3:
        msg = f"{path}: expected a 3D (Z, Y, X) array, got {len(shape)}D shape {shape}"
        raise PredictError(msg)
    if min(spatial) < 1:
        msg = f"{path}: empty array, shape {shape}"
        raise PredictError(msg)
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "ui" or dtype.itemsize > 2:
        msg = f"{path}: dtype {dtype} not supported; the model was trained on 8- or 16-bit integer CT (uint8, uint16)"
        raise PredictError(msg)
    return (0,) * lead_count


def open_volume(path: str | os.PathLike) -> VolumeSource:
    """Open a zarr array, OME-Zarr image (full resolution) or 3D TIFF for lazy reading.

    Raises:
        PredictError: missing, unreadable, a group that is not OME-Zarr, not 3D, or an unsupported dtype.
    """
    import zarr

    path = Path(path)
    closer = None
    if path.is_file() and path.name.lower().endswith(TIFF_SUFFIXES):
        import tifffile

        try:
            store = tifffile.imread(path, aszarr=True)
            node = zarr.open(store, mode="r")
        except Exception as e:  # tifffile and zarr raise many types; the line must name the file
            msg = f"{path}: cannot read TIFF ({type(e).__name__}: {e})"
            raise PredictError(msg) from e
        closer = store.close
    elif _is_zarr_dir(path):
        try:
            node = zarr.open(str(path), mode="r")
        except Exception as e:
            msg = f"{path}: cannot open zarr ({type(e).__name__}: {e})"
            raise PredictError(msg) from e
    elif path.exists():
        msg = f"{path}: not a zarr array/group or a .tif/.tiff volume"
        raise PredictError(msg)
    else:
        msg = f"{path}: not found"
        raise PredictError(msg)
    lead_count = 0
    if isinstance(node, zarr.Group):
        level, lead_count = _ome_level0(node, path)
        node = node[level]
    lead = _check_array(path, node, lead_count)
    return VolumeSource(path=path, array=node, lead=lead, closer=closer)


def list_inputs(path: str | os.PathLike) -> list[Path]:
    """The volumes at ``path``: itself when it is a volume, else the zarr stores and TIFFs in the folder.

    Raises:
        PredictError: ``path`` does not exist, or holds nothing to predict.
    """
    path = Path(path)
    if not path.exists():
        msg = f"{path}: input not found"
        raise PredictError(msg)
    if not path.is_dir() or _is_zarr_dir(path):
        return [path]
    found = sorted(p for p in path.iterdir() if _is_zarr_dir(p) or (p.is_file() and p.name.lower().endswith(TIFF_SUFFIXES)))
    if not found:
        msg = f"{path}: folder holds no zarr store and no .tif/.tiff volume"
        raise PredictError(msg)
    return found


def plan_blocks(shape: Sequence[int], block_size: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """The blocks covering ``shape`` in raster order: ``(index, slices)``, the last ones clipped to the volume."""
    ranges = [range(0, int(s), int(b)) for s, b in zip(shape, block_size)]
    out = []
    for starts in np.ndindex(*(len(r) for r in ranges)):
        lo = [r[i] for r, i in zip(ranges, starts)]
        out.append((tuple(starts), tuple(slice(a, min(a + b, int(s))) for a, b, s in zip(lo, block_size, shape))))
    return out


def volume_stats(source: VolumeSource, block_size: Sequence[int] = (128, 128, 128)) -> tuple[float, float]:
    """Exact mean and (population) std of the volume, read block by block (integer histograms, no float sums).

    Returns:
        ``(mean, std)``; std 1.0 for a constant volume, as ``NormalizeIntensity`` divides by 1 then.
    """
    offset = -int(np.iinfo(source.dtype).min)
    counts = np.zeros(1 << (8 * source.dtype.itemsize), dtype=np.int64)
    for _, region in plan_blocks(source.shape, block_size):
        counts += np.bincount((source.read(region).astype(np.int64) + offset).ravel(), minlength=counts.size)
    values = np.arange(counts.size, dtype=np.float64) - offset
    n = counts.sum()
    mean = float((counts * values).sum() / n)
    var = float((counts * (values - mean) ** 2).sum() / n)
    std = var**0.5
    return mean, std if std > 0 else 1.0


def model_identity(network: torch.nn.Module) -> str:
    """sha256 of the network's state dict (names, shapes, dtypes, values): the same weights give the same id."""
    h = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _input_identity(source: VolumeSource) -> dict[str, Any]:
    ident: dict[str, Any] = {"path": str(source.path.resolve()), "shape": list(source.shape), "dtype": str(source.dtype)}
    if source.path.is_file():
        st = source.path.stat()
        ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    return ident


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _differences(now: Any, old: Any, prefix: str = "") -> list[str]:
    """The leaves where two manifests differ, as ``key: <old> there, <new> now`` (paths last: a moved input is the
    least telling difference)."""
    if isinstance(now, dict) and isinstance(old, dict):
        keys = sorted(set(now) | set(old), key=lambda k: (k == "path", k))
        return [d for k in keys if now.get(k) != old.get(k) for d in _differences(now.get(k), old.get(k), f"{prefix}{k}.")]
    return [f"{prefix.rstrip('.')}: {old!r} there, {now!r} now"]


@dataclass
class StreamingPredictor:
    """Predict volumes block by block into chunked zarr masks, resumably.

    The network is given built (the command line builds it from the model file's plans); ``model_id`` identifies its
    weights in the output's manifest. An ensemble: a list of networks, one window each and their ``weights``.

    Args:
        network: the model, weights loaded; or a list of models (an ensemble).
        roi_size: sliding-window size (Z, Y, X); for an ensemble one per model.
        overlap: window overlap fraction.
        sw_batch_size: windows per forward pass.
        tta_axes: mirror TTA axes, or None.
        device: where the network runs.
        amp_dtype: autocast dtype, or None.
        postprocess: maps ``(C, Z, Y, X)`` float32 probabilities of one block to a uint8 mask (block-local).
        post_settings: the settings of ``postprocess``, recorded in the manifest.
        block_size: block shape; a multiple of ``chunk_size``.
        chunk_size: the output's chunk shape.
        probabilities: also write probabilities: ``"uint8"``, ``"float16"`` or None.
        cache_bytes: bound on window outputs kept for neighbouring blocks.
        model_id: identity of the weights (default :func:`model_identity`; an ensemble's: of every model's and the
            weights).
        weights: an ensemble's weights, one per model, summing to 1 (default: equal).

    Example::

        predictor = StreamingPredictor(net, (64, 64, 64), postprocess=lambda p: (p >= 0.5).astype("uint8"))
        predictor.predict("scroll.zarr", "scroll_mask.zarr", num_parts=2, part_id=0)
    """

    network: torch.nn.Module | Sequence[torch.nn.Module]
    roi_size: Sequence[int] | Sequence[Sequence[int]]
    overlap: float = 0.5
    sw_batch_size: int = 1
    tta_axes: Sequence[int] | None = None
    device: torch.device | str = "cpu"
    amp_dtype: torch.dtype | None = None
    postprocess: Callable[[np.ndarray], np.ndarray] = lambda p: (p >= 0.5).astype(np.uint8)
    post_settings: dict[str, Any] = field(default_factory=lambda: {"threshold": 0.5})
    block_size: Sequence[int] = (256, 256, 256)
    chunk_size: Sequence[int] = (128, 128, 128)
    probabilities: str | None = None
    cache_bytes: int = 1 << 30
    model_id: str | None = None
    weights: Sequence[float] | None = None

    def __post_init__(self) -> None:
        self.block_size = tuple(int(b) for b in self.block_size)
        self.chunk_size = tuple(int(c) for c in self.chunk_size)
        if len(self.block_size) != 3 or len(self.chunk_size) != 3 or min(self.chunk_size) < 1:
            msg = f"block_size {self.block_size} and chunk_size {self.chunk_size} need 3 positive entries (Z, Y, X)"
            raise PredictError(msg)
        if any(b % c for b, c in zip(self.block_size, self.chunk_size)) or min(self.block_size) < 1:
            msg = f"block_size {self.block_size} must be a multiple of chunk_size {self.chunk_size}: blocks own whole chunks"
            raise PredictError(msg)
        if self.probabilities in ("none", ""):
            self.probabilities = None
        if self.probabilities not in (None, "uint8", "float16"):
            msg = f"probabilities {self.probabilities!r} unknown; use none, uint8 or float16"
            raise PredictError(msg)
        if isinstance(self.network, torch.nn.Module):
            self.model_id = self.model_id or model_identity(self.network)
            self.window = self._window(self.network, self.roi_size, self.cache_bytes)
            return
        nets, rois = list(self.network), [tuple(r) for r in self.roi_size]
        weights = [1.0 / len(nets)] * len(nets) if self.weights is None else [float(w) for w in self.weights]
        if not len(nets) == len(rois) == len(weights) or not nets:
            msg = f"{len(nets)} networks, {len(rois)} windows and {len(weights)} weights: one of each per model"
            raise PredictError(msg)
        self.weights = weights
        self.model_id = self.model_id or _digest([[model_identity(n) for n in nets], weights])
        # the models share the cache budget: an ensemble's windows cost the memory of one model's
        windows = [self._window(n, r, self.cache_bytes // len(nets)) for n, r in zip(nets, rois)]
        self.window = EnsembleWindow(windows, weights)

    def _window(self, network: torch.nn.Module, roi: Sequence[int], cache_bytes: int) -> BlockwiseSlidingWindow:
        return BlockwiseSlidingWindow(
            network, roi, self.overlap, self.sw_batch_size, tta_axes=self.tta_axes, device=self.device,
            amp_dtype=self.amp_dtype, cache_bytes=cache_bytes,
        )

    def _settings(self) -> dict[str, Any]:
        if isinstance(self.window, EnsembleWindow):
            roi: list = [list(w.roi) for w in self.window.windows]
            ensemble = {"weights": list(self.window.weights)}
        else:
            roi, ensemble = list(self.window.roi), {}
        return {
            **ensemble, "roi_size": roi, "overlap": self.overlap, "mode": self.window.mode,
            "sigma_scale": self.window.sigma_scale, "tta_flips": [list(f) for f in self.window.flips],
            "amp_dtype": str(self.amp_dtype), "postprocessing": self.post_settings,
            "block_size": list(self.block_size), "chunk_size": list(self.chunk_size), "probabilities": self.probabilities,
        }

    def _manifest(self, out: Path, source: VolumeSource) -> dict[str, Any]:
        """This run's manifest; the one in ``out`` when it exists and matches, else written there (exclusively)."""
        key = {"format": 1, "input": _input_identity(source), "model": self.model_id, "settings": self._settings()}
        path = out / MANIFEST
        if path.is_file():
            return self._check_manifest(out, key)
        # another part's manifest being written (its temporary file) is not a foreign output
        if out.exists() and any(not p.name.startswith(f".{MANIFEST}.") for p in out.iterdir()):
            msg = f"{out}: exists and is not an output of predict (no {MANIFEST}); choose another --output"
            raise PredictError(msg)
        mean, std = volume_stats(source, self.chunk_size)
        manifest = {**key, "stats": {"mean": mean, "std": std}}
        try:
            atomic_write_bytes(path, json.dumps(manifest, indent=1, sort_keys=True).encode(), exclusive=True)
        except FileExistsError:  # another part wrote it first: then that one is checked
            return self._check_manifest(out, key)
        return manifest

    def _check_manifest(self, out: Path, key: dict[str, Any]) -> dict[str, Any]:
        path = out / MANIFEST
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            msg = f"{path}: unreadable manifest ({e}); delete {out} to start over"
            raise PredictError(msg) from e
        old = {k: stored.get(k) for k in key}
        if old != key:
            what = "another volume" if old.get("input") != key["input"] else "another model or other settings"
            msg = (
                f"{out}: holds blocks of {what} ({'; '.join(_differences(key, old))}); "
                "use another --output, or delete it to start over"
            )
            raise PredictError(msg)
        return stored

    def _arrays(self, out: Path, shape: tuple[int, ...]) -> dict[str, Any]:
        import zarr

        group = zarr.open_group(str(out), mode="a", zarr_format=3)
        chunks = tuple(min(c, s) for c, s in zip(self.chunk_size, shape))
        wanted = {"mask": np.uint8}
        if self.probabilities:
            wanted["probability"] = np.dtype(self.probabilities)
        arrays = {}
        for name, dtype in wanted.items():
            arrays[name] = group.require_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
        return arrays

    def predict(self, input_path: str | os.PathLike, output: str | os.PathLike, num_parts: int = 1, part_id: int = 0) -> Path:
        """Predict part ``part_id`` of ``num_parts`` of one volume into ``output``; blocks already recorded are skipped.

        Returns:
            ``output``.

        Raises:
            PredictError: bad input, an output holding another run, a bad part, or a failed write (disk full).
        """
        check_part(num_parts, part_id, PredictError, options=True)
        out = Path(output)
        source = open_volume(input_path)
        try:
            return self._predict(source, out, num_parts, part_id)
        finally:
            source.close()

    def _predict(self, source: VolumeSource, out: Path, num_parts: int, part_id: int) -> Path:
        if out.exists() and not out.is_dir():
            msg = f"{out}: exists and is a file; the output is a zarr folder"
            raise PredictError(msg)
        try:
            manifest = self._manifest(out, source)
            arrays = self._arrays(out, source.shape)
        except OSError as e:
            msg = f"{out}: cannot write the output ({e.strerror or e})"
            raise PredictError(msg) from e
        digest = _digest({k: manifest[k] for k in ("format", "input", "model", "settings")})
        mean, std = manifest["stats"]["mean"], manifest["stats"]["std"]
        records = out / RECORDS
        blocks = plan_blocks(source.shape, self.block_size)[part_id::num_parts]
        todo = [(i, b) for i, b in blocks if not self._done(records, i, digest)]
        logger.info(
            "%s -> %s: shape %s, %d blocks in part %d/%d, %d done already", source.path, out, source.shape,
            len(blocks), part_id, num_parts, len(blocks) - len(todo),
        )

        start, voxels = time.monotonic(), 0
        for n, (index, block) in enumerate(todo, 1):
            probs = self.window.predict(source.read, source.shape, block, mean, std)
            mask = np.asarray(self.postprocess(probs))
            try:
                arrays["mask"][block] = mask.reshape(mask.shape[-3:]).astype(np.uint8)
                if self.probabilities == "uint8":
                    arrays["probability"][block] = np.rint(probs[0] * 255).astype(np.uint8)
                elif self.probabilities == "float16":
                    arrays["probability"][block] = probs[0].astype(np.float16)
                self._record(records, index, digest)
            except OSError as e:
                full = " (disk full)" if e.errno == errno.ENOSPC else ""
                msg = (
                    f"{out}: writing block {index} failed{full}: {e.strerror or e}; free space and rerun, "
                    "finished blocks are kept"
                )
                raise PredictError(msg) from e
            voxels += int(np.prod([s.stop - s.start for s in block]))
            elapsed = time.monotonic() - start
            rate = voxels / elapsed if elapsed > 0 else float("inf")
            left = sum(int(np.prod([s.stop - s.start for s in b])) for _, b in todo[n:])
            logger.info(
                "%s: block %s (%d/%d): %.3g voxels/s, ETA %s", out.name, index, n, len(todo), rate,
                format_eta(left / rate if rate > 0 else 0),
            )
        return out

    @staticmethod
    def _record_path(records: Path, index: tuple[int, ...]) -> Path:
        return records / f"{'_'.join(str(i) for i in index)}.json"

    def _done(self, records: Path, index: tuple[int, ...], digest: str) -> bool:
        path = self._record_path(records, index)
        try:
            return json.loads(path.read_text()).get("run") == digest
        except (OSError, ValueError):
            return False

    def _record(self, records: Path, index: tuple[int, ...], digest: str) -> None:
        atomic_write_bytes(self._record_path(records, index), json.dumps({"block": list(index), "run": digest}).encode())


def build_from_config(
    overrides: dict[str, Any], model_path: str | Sequence[str] | None
) -> tuple[torch.nn.Module | list[torch.nn.Module], dict[str, Any]]:
    """The network (built from the model file's plans, weights loaded) and the settings of inference.yaml with
    ``overrides`` (the patch and post-processing from the plans unless given).

    For several model files or an ensemble file (:mod:`pipeline.model.ensemble`) the networks are a list, and the
    settings' ``patch_size`` holds one window per model and ``model_weights`` their weights (None for one model).
    """
    from pipeline.model.plans import load_network
    from pipeline.utils.amp import resolve_amp
    from pipeline.utils.config import load_config
    from pipeline.utils.errors import PipelineError, SettingsError, find_user_error

    try:
        parser = load_config("inference.yaml", overrides=overrides)
    except SettingsError as e:
        raise PredictError(str(e)) from e
    if model_path:  # --model_path A.pt [B.pt ...]: one file as the config takes it, several as a list
        paths = [model_path] if isinstance(model_path, str) else list(model_path)
        parser["model_path"] = paths if len(paths) > 1 else paths[0]
    given = parser.get_parsed_content("model_path")
    if isinstance(given, (str, os.PathLike)) and not str(given).lower().endswith(".json"):
        path = Path(given)
        if not path.is_file():
            msg = f"{path}: model not found; train a model first, or give --model_path"
            raise PredictError(msg)
    device = torch.device(parser.get_parsed_content("device"))
    try:
        plans = parser.get_parsed_content("model_plans")
    except RuntimeError as e:  # MONAI wraps what the expression raised: a bad file or a mismatching setting
        user = find_user_error(e)
        if user is None:
            raise
        raise PredictError(str(user)) from e
    members = plans.get("members") or [{"path": given, "weight": None, "plans": plans}]
    try:
        networks = [load_network(m["path"], m["plans"]).to(device) for m in members]
    except PipelineError as e:
        raise PredictError(str(e)) from e
    keys = ("overlap", "sw_batch_size", "tta", "tta_axes", "amp", "amp_dtype")
    settings = {k: parser.get_parsed_content(k) for k in keys}
    ensemble = "members" in plans
    settings["patch_size"] = [m["plans"]["roi_size"] for m in members] if ensemble else plans["roi_size"]
    settings["model_weights"] = [m["weight"] for m in members] if ensemble else None
    settings.update(plans["postprocessing"])
    settings["device"] = device
    settings["amp_dtype"] = resolve_amp(device, settings["amp"], settings["amp_dtype"])
    return (networks if ensemble else networks[0]), settings

"""Writing predicted masks and the competition's ``submission.zip``, checking it before it counts as done, and
reading masks back (:class:`MaskFiles`: a submission zip or a folder of ``<id>.tif``, for the check, the merge of
parts and the score).

The zip holds one ``<id>.tif`` per test volume, uint8, exactly the source volume's shape (the scorer globs
``**/*.tif`` and takes the id up to the first dot). It is written under a temporary name, verified, then renamed.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import torch
from monai.utils import CommonKeys as Keys

from pipeline.utils.errors import PipelineError
from pipeline.utils.files import atomic_write
from transforms.io import (
    VolumeError,
    case_id,
    decode_volume,
    read_volume,
    read_volume_shape,
    write_volume,
)

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["SubmissionError", "MaskFiles", "check_submission", "remove_stale_outputs", "write_submission_zip", "SubmissionWriter"]

logger = logging.getLogger(__name__)


class SubmissionError(PipelineError, ValueError):
    """A submission that would not score: missing or extra ids, wrong shape or dtype, unreadable member."""


class MaskFiles:
    """The masks of a submission zip or a folder of ``<id>.tif``, listed by case id and read one at a time.

    A mask is a ``.tif`` file (a zip member at any depth; in a folder, at any depth with ``recursive``), its case
    id the name up to the first dot: what the competition's scorer finds in an unzipped submission. Label folders
    (``train_labels``) are read the same way.

    Args:
        path: a ``.zip`` or a folder.
        recursive: also search a folder's subfolders.

    Raises:
        SubmissionError: ``path`` is missing, or neither a folder nor a readable zip.

    Example::

        with MaskFiles("outputs/submission.zip") as masks:
            for case, name in masks.entries:
                mask = masks.read(name)  # (Z, Y, X); a VolumeError names "outputs/submission.zip:<name>"
    """

    def __init__(self, path: str | os.PathLike, recursive: bool = True) -> None:
        self.path = Path(path)
        self.zip: zipfile.ZipFile | None = None
        if self.path.is_dir():
            found = self.path.rglob("*.tif") if recursive else self.path.glob("*.tif")
            names = [str(f) for f in found if f.is_file()]
        elif not self.path.exists():
            msg = f"{self.path}: not found; give a submission .zip or a folder of <id>.tif files"
            raise SubmissionError(msg)
        else:
            try:
                self.zip = zipfile.ZipFile(self.path)
            except (OSError, zipfile.BadZipFile) as e:
                msg = f"{self.path}: not a readable zip ({e}); give a submission .zip or a folder of <id>.tif files"
                raise SubmissionError(msg) from e
            names = [n for n in self.zip.namelist() if n.endswith(".tif")]
        self.entries: list[tuple[str, str]] = [(case_id(n), n) for n in sorted(names)]
        """``(case id, name)`` of every mask, by name: the path of a file, the name of a zip member."""

    def by_id(self) -> dict[str, str]:
        """Case id -> name.

        Raises:
            SubmissionError: two masks with one case id.
        """
        index: dict[str, str] = {}
        for case, name in self.entries:
            if case in index:
                msg = f"{self.path}: two files for volume id {case!r}"
                raise SubmissionError(msg)
            index[case] = name
        return index

    def where(self, name: str) -> str:
        """How errors name a mask: its path, or ``<zip>:<member>``."""
        return f"{self.path}:{name}" if self.zip is not None else name

    def read(self, name: str) -> np.ndarray:
        """The mask ``name`` (from :attr:`entries`) as a 3D array of its stored dtype.

        Raises:
            VolumeError: unreadable, truncated or not 3D; the message names the file (or the zip and member).
        """
        if self.zip is None:
            return read_volume(name)
        try:
            data = self.zip.read(name)
        except Exception as e:  # zipfile raises many types for a damaged member (CRC, zlib, EOF)
            msg = f"{self.where(name)}: cannot read from the zip ({type(e).__name__}: {e})"
            raise VolumeError(msg) from e
        return decode_volume(data, self.where(name))

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()

    def __enter__(self) -> MaskFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_submission(zip_path: str | os.PathLike, expected: Mapping[str, Sequence[int]]) -> None:
    """Verify a submission zip: one ``<id>.tif`` per expected id and no other ``.tif``, each uint8 of the expected
    shape. Members that are not ``.tif`` are ignored, as the scorer ignores them (it globs ``*.tif``).

    Args:
        zip_path: the zip to check.
        expected: case id -> volume shape (Z, Y, X).

    Raises:
        SubmissionError: the first problem found, naming the zip and the member.
    """
    with MaskFiles(zip_path) as masks:
        ids = [case for case, _ in masks.entries]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        missing = sorted(set(expected) - set(ids))
        extra = sorted(set(ids) - set(expected))
        if dupes or missing or extra:
            msg = f"{zip_path}: ids wrong (missing={missing}, extra={extra}, duplicated={dupes})"
            raise SubmissionError(msg)
        for case, name in masks.entries:
            try:
                arr = masks.read(name)
            except VolumeError as e:
                raise SubmissionError(str(e)) from e
            want = tuple(int(s) for s in expected[case])
            if arr.shape != want or arr.dtype != np.uint8:
                msg = f"{masks.where(name)}: got {arr.dtype} {arr.shape}, expected uint8 {want}"
                raise SubmissionError(msg)


def write_submission_zip(
    pred_dir: str | os.PathLike, zip_path: str | os.PathLike, expected: Mapping[str, Sequence[int]]
) -> Path:
    """Zip ``<id>.tif`` masks from ``pred_dir`` into ``zip_path``: written to a temporary name, checked, renamed
    (:func:`pipeline.utils.files.atomic_write`).

    Raises:
        SubmissionError: the check failed; no zip is left at ``zip_path`` from this call.
    """
    pred_dir, zip_path = Path(pred_dir), Path(zip_path)

    def write(f: BinaryIO) -> None:
        # masks are LZW-compressed already: store them, deflating again only costs time
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
            for case in sorted(expected):
                src = pred_dir / f"{case}.tif"
                if not src.is_file():
                    msg = f"{src}: prediction for test case {case} not written"
                    raise SubmissionError(msg)
                zf.write(src, arcname=src.name)
        f.flush()
        check_submission(f.name, expected)  # the temporary file: a zip that fails the check never takes the name

    atomic_write(zip_path, write)
    logger.info("submission written and checked: %s (%d volumes)", zip_path, len(expected))
    return zip_path


def remove_stale_outputs(pred_dir: str | os.PathLike, zip_path: str | os.PathLike | None) -> None:
    """Remove an earlier run's ``submission.zip`` (a failed run must not leave an older zip that looks current)
    and the temporary files a killed run left in ``pred_dir`` and beside the zip.

    Under several ranks call it on one rank before any rank writes (``pipeline.inference.parts.run_inference`` does), or
    it could remove another rank's write in flight.
    """
    pred_dir = Path(pred_dir)
    stale = list(pred_dir.glob(".*.tmp")) if pred_dir.is_dir() else []
    if zip_path is not None:
        zip_path = Path(zip_path)
        stale += [zip_path, *zip_path.parent.glob(f".{zip_path.name}*.tmp")]
    for path in stale:
        if path.is_file():
            logger.info("removing %s, left by an earlier run", path)
            path.unlink(missing_ok=True)


class SubmissionWriter:
    """Ignite handler for the inference evaluator: writes each prediction as ``<pred_dir>/<id>.tif`` (uint8,
    the input's shape) as it is made, and ``submission.zip`` when the run completes.

    When the run starts (``clean_on_start``), the ``submission.zip`` of an earlier run is removed with the temporary
    files a killed run left in ``pred_dir`` and beside the zip (``remove_stale_outputs``).

    Args:
        pred_dir: folder for the per-volume masks.
        zip_path: the submission zip; None writes the masks only.
        datalist: the test cases (dicts with ``image``); gives the ids and shapes the zip is checked against.
        output_key: key of the (post-processed) mask in each decollated output item.
        clean_on_start: remove stale outputs when the run starts; False where the caller cleans before several
            ranks start (``pipeline.inference.parts.run_inference``).

    Example::

        writer = SubmissionWriter("out/predictions", "out/submission.zip", test_cases)
        writer.attach(inference_evaluator)
    """

    def __init__(
        self,
        pred_dir: str | os.PathLike,
        zip_path: str | os.PathLike | None,
        datalist: Sequence[Mapping[str, str]],
        output_key: str = Keys.PRED,
        clean_on_start: bool = True,
    ) -> None:
        self.clean_on_start = clean_on_start
        self.pred_dir = Path(pred_dir)
        self.zip_path = Path(zip_path) if zip_path else None
        self.expected = {case_id(c["image"]): read_volume_shape(c["image"]) for c in datalist}
        self.output_key = output_key

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        if self.clean_on_start:
            engine.add_event_handler(Events.STARTED, self.remove_stale)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write_batch)
        engine.add_event_handler(Events.COMPLETED, self.write_zip)

    def remove_stale(self, engine: Engine | None = None) -> None:
        """Remove an earlier run's zip and the temporary files of interrupted writes."""
        remove_stale_outputs(self.pred_dir, self.zip_path)

    def write_batch(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in outputs:
            mask = item[self.output_key]
            source = mask.meta["filename_or_obj"] if hasattr(mask, "meta") else item["image"].meta["filename_or_obj"]
            case = case_id(source)
            arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
            arr = arr.reshape(arr.shape[-3:]) if arr.ndim == 4 else arr
            if tuple(arr.shape) != tuple(self.expected[case]):
                msg = f"{source}: prediction shape {arr.shape} differs from the input's {self.expected[case]}"
                raise SubmissionError(msg)
            write_volume(self.pred_dir / f"{case}.tif", (arr > 0).astype(np.uint8))

    def write_zip(self, engine: Engine) -> None:
        if self.zip_path is not None:
            write_submission_zip(self.pred_dir, self.zip_path, self.expected)

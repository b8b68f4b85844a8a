"""Continue a training run from a read-only copy of its checkpoints (``resume_from``).

A Kaggle session ends after 12 hours, and the next one sees the previous session's output only as a read-only
input (``/kaggle/input/...``), while resuming needs the checkpoints in a writable ``ckpt_dir``. With ``resume_from``
(a checkpoint folder, i.e. an earlier run's ``ckpt_dir``, or one checkpoint file) the newest readable checkpoint
there is copied into ``ckpt_dir`` before the run's folder is chosen (:func:`pipeline.training.runs.run_dir`), and
the run then resumes from it through the ordinary automatic resume: exactly as if it had never moved.

Copied, each atomically, from the checkpoint's folder (the source is only read):

- the run folder named in its ``run_name.txt`` (curves, history, TensorBoard events), into
  ``output_dir/runs/<name>`` unless that folder exists already. It is looked for as ``runs/<name>`` and
  ``outputs/runs/<name>`` in the checkpoint's folder, its parent and its grandparent: an ``output_dir`` beside
  ``ckpt_dir`` (``/kaggle/working/{models,outputs}``) or a checkout's ``outputs/`` (``bundle/models``). Not found:
  one log line, and the run continues under the same name in a fresh folder. No ``run_name.txt``: a new run folder;
- ``model.pt`` (the best model so far, with its plans), so that best-model tracking continues;
- ``run_name.txt``;
- last, the checkpoint itself, which completes the copy (a run killed half-way copies again): it keeps the name
  ``checkpoint_final.pt``, any other file becomes ``checkpoint_epoch=E_iter=I.pt``.

A checkpoint in ``ckpt_dir`` at least as far as the source's (epoch, iteration) wins and nothing is copied: running
session 2's command again never goes back in time. A source that does not exist or holds no readable checkpoint is
refused in one line (exit code 2) before anything is copied, and so is a run of another network: the plans saved
in the checkpoint against this run's network settings (the settings, not the built network: building it earlier
would change the order of random draws). The resume checks again what it loads, as for any ``ckpt_dir``.

``init_from`` (a new run from a model file's weights) is
:meth:`pipeline.training.checkpoint.TrainingCheckpointer.initialise`; :func:`check_sources` checks both settings,
their networks included, before the volume store is built.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.model.networks import normalize_settings
from pipeline.model.plans import network_difference, read_plans
from pipeline.training.checkpoint import (
    FINAL_NAME,
    check_init_network,
    checkpoint_name,
    checkpoint_progress,
    find_latest_checkpoint,
)
from pipeline.training.runs import RUN_RECORD
from pipeline.utils.errors import CheckpointDirError, MissingFileError, SettingsError
from pipeline.utils.files import atomic_copy, atomic_copytree, atomic_write_bytes

__all__ = ["check_sources", "find_resume_source", "import_run"]

logger = logging.getLogger(__name__)

MODEL_NAME = "model.pt"


def find_resume_source(resume_from: str | os.PathLike) -> tuple[Path, tuple[int, int]]:
    """The checkpoint ``resume_from`` names: the newest readable one of a folder, or the file itself.

    Returns:
        The checkpoint and its (epoch, iteration).

    Raises:
        MissingFileError: nothing at ``resume_from``.
        CheckpointDirError: a folder with no readable checkpoint, or a file that is not one.
    """
    path = Path(resume_from)
    if not path.exists():
        msg = (f"{path}: resume_from: no such folder or file; give the ckpt_dir of an earlier run or one of its "
               "checkpoints")
        raise MissingFileError(msg)
    found = find_latest_checkpoint(path) if path.is_dir() else path
    progress = checkpoint_progress(found) if found is not None else None
    if found is None or progress is None:
        what = (
            f"no readable checkpoint in this folder ({FINAL_NAME} or checkpoint_epoch=*_iter=*.pt)"
            if path.is_dir() else "not a readable training checkpoint (a model.pt goes to init_from)"
        )
        msg = f"{path}: resume_from: {what}; give the ckpt_dir of an earlier run or one of its checkpoints"
        raise CheckpointDirError(msg)
    return found, progress


def check_sources(resume_from: str | os.PathLike | None, init_from: str | os.PathLike | None,
                  auto_resume: bool = True, network: Mapping[str, Any] | None = None) -> None:
    """Refuse a ``resume_from`` or ``init_from`` that cannot work, in one line, before anything slow runs.

    Args:
        resume_from, init_from, auto_resume: the bundle keys.
        network: this run's network settings (:func:`pipeline.model.networks.build_network`'s arguments); given,
            a source whose plans name another network is refused. None: not checked here.

    Raises:
        SettingsError: ``resume_from`` with ``auto_resume`` off.
        MissingFileError, CheckpointDirError: see :func:`find_resume_source`; a ``resume_from`` of another network.
        MissingFileError, ModelFileError: an ``init_from`` that is not a readable model file, or of another network.
    """
    current = {"network": normalize_settings(**network)} if network is not None else None
    if resume_from is not None:
        if not auto_resume:
            msg = f"resume_from {resume_from}: needs auto_resume true (it resumes from the copy in ckpt_dir)"
            raise SettingsError(msg)
        source, _ = find_resume_source(resume_from)
        differ = network_difference(read_plans(source, setting="resume_from"), current)
        if differ:
            msg = (f"{source}: resume_from holds a run of another network ({differ}); use the same network settings "
                   "to continue it")
            raise CheckpointDirError(msg)
    if init_from is not None:
        check_init_network(init_from, read_plans(init_from, setting="init_from"), current)


def _run_folder(ckpt_folder: Path, name: str) -> Path | None:
    """``runs/<name>`` or ``outputs/runs/<name>`` in ``ckpt_folder``, its parent or its grandparent, if any."""
    for folder in (ckpt_folder, *list(ckpt_folder.parents)[:2]):
        for runs in (folder / "runs", folder / "outputs" / "runs"):
            if (runs / name).is_dir():
                return runs / name
    return None


def _run_name(record: Path) -> str | None:
    name = record.read_text().strip() if record.is_file() else ""
    return name if name and Path(name).name == name and not name.startswith(".") else None


def import_run(resume_from: str | os.PathLike, ckpt_dir: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Copy the newest checkpoint of ``resume_from`` into ``ckpt_dir`` with what resuming needs (module docstring).

    Call it on one process, holding ``ckpt_dir``'s lock, before anything reads the run record
    (:func:`pipeline.training.runs.run_dir` does both).

    Args:
        resume_from: an earlier run's checkpoint folder or one checkpoint; only read.
        ckpt_dir: this run's checkpoint folder.
        output_dir: this run's output folder (the run folder goes to ``output_dir/runs/<name>``).

    Returns:
        The checkpoint in ``ckpt_dir`` the run will resume from.

    Raises:
        MissingFileError, CheckpointDirError: see :func:`find_resume_source`.
    """
    source, progress = find_resume_source(resume_from)
    ckpt_dir, output_dir = Path(ckpt_dir), Path(output_dir)
    local = find_latest_checkpoint(ckpt_dir)
    local_progress = checkpoint_progress(local) if local is not None else None
    if local is not None and local_progress is not None and local_progress >= progress:
        logger.info(
            f"Resuming from {local} in ckpt_dir (epoch {local_progress[0]}, iteration {local_progress[1]}), as far as "
            f"{source} (epoch {progress[0]}, iteration {progress[1]}) or further: nothing copied from resume_from"
        )
        return local

    folder = source.resolve().parent
    name = _run_name(folder / RUN_RECORD)
    if name is None:
        logger.info(f"No run record ({RUN_RECORD}) beside {source}: the run continues in a new run folder")
    else:
        found, target = _run_folder(folder, name), output_dir / "runs" / name
        if target.exists():
            logger.info(f"Run folder {target} exists: continuing it")
        elif found is None:
            logger.info(f"Run folder {name} of {source} not found (runs/ or outputs/runs/ beside it, up to two "
                        f"folders up): continuing run {name} in a fresh folder {target}")
        else:
            atomic_copytree(found, target)
            logger.info(f"Copied run folder {found} to {target}")
    if (folder / MODEL_NAME).is_file():
        atomic_copy(folder / MODEL_NAME, ckpt_dir / MODEL_NAME)
    if name is None:
        (ckpt_dir / RUN_RECORD).unlink(missing_ok=True)  # an older run's record must not name this one
    else:
        atomic_write_bytes(ckpt_dir / RUN_RECORD, f"{name}\n".encode())
    target = ckpt_dir / (FINAL_NAME if source.name == FINAL_NAME else checkpoint_name(*progress))
    atomic_copy(source, target)
    logger.info(f"Resuming from {target} copied from {source}")
    return target

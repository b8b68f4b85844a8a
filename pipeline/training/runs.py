"""One folder per training run under ``output_dir/runs``, continued by a resumed run.

A run's curves, history and TensorBoard events go to ``<output_dir>/runs/<start time>/``, so two runs never
overwrite each other's files and ``tensorboard --logdir <output_dir>/runs`` shows them apart. The run's name is
recorded in ``<ckpt_dir>/run_name.txt`` when it starts from scratch; a run that will resume from a checkpoint of
that folder (``auto_resume`` and a readable checkpoint there) takes the recorded name and continues its folder;
so does a run continued from a read-only copy of an earlier run's checkpoints (``resume_from``, which is copied
into ``ckpt_dir`` first: :mod:`pipeline.training.continuation`).
``<output_dir>/latest_run`` is a symbolic link to the newest run's folder.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.utils.files import atomic_symlink, atomic_write_bytes

__all__ = ["RUN_RECORD", "LATEST_LINK", "latest_run", "new_run_name", "run_dir"]

RUN_RECORD = "run_name.txt"
"""File in ``ckpt_dir`` naming the run folder its checkpoints belong to."""
LATEST_LINK = "latest_run"
"""Symbolic link in ``output_dir`` to the newest run's folder."""


def new_run_name(runs: str | os.PathLike) -> str:
    """A name for a new run: its start time (``20260101-120000``), suffixed when ``runs`` has it already."""
    base = time.strftime("%Y%m%d-%H%M%S")
    name, n = base, 1
    while (Path(runs) / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def _point_latest(output_dir: Path, name: str) -> None:
    link = output_dir / LATEST_LINK
    if link.is_symlink() and os.readlink(link) == f"runs/{name}":
        return
    atomic_symlink(f"runs/{name}", link)  # relative: the output folder can be moved


def run_dir(
    output_dir: str | os.PathLike,
    ckpt_dir: str | os.PathLike,
    auto_resume: bool = True,
    resume_from: str | os.PathLike | None = None,
) -> str:
    """The folder of this training run: the resumed run's own, or a new one.

    With ``resume_from`` its newest checkpoint (with its run record, ``model.pt`` and run folder) is first copied
    into ``ckpt_dir`` on rank 0 (:func:`pipeline.training.continuation.import_run`), unless ``ckpt_dir`` holds one
    as far already. Then a checkpoint the run will resume from (``auto_resume`` and a readable checkpoint in
    ``ckpt_dir``) means the run continues the one named in ``ckpt_dir/run_name.txt``; otherwise the run is new and
    gets a folder named for its start time, which is recorded there. On rank 0 the folder is created and
    ``output_dir/latest_run`` pointed at it; other ranks (which write nothing there) only compute the path.

    Args:
        output_dir: the bundle's output folder; runs go to ``output_dir/runs``.
        ckpt_dir: the training's checkpoint folder.
        auto_resume: whether the trainer resumes from ``ckpt_dir`` (``train.yaml``'s ``auto_resume``).
        resume_from: an earlier run's checkpoint folder or checkpoint file (read only), or None.

    Returns:
        ``<output_dir>/runs/<name>``.

    Example::

        run_dir: "$pipeline.training.runs.run_dir(@output_dir, @ckpt_dir, @auto_resume, @resume_from)"
    """
    from pipeline.training.checkpoint import find_latest_checkpoint
    from pipeline.training.lock import lock_ckpt_dir
    from pipeline.utils.distributed import is_main_process

    lock_ckpt_dir(ckpt_dir)  # a second run on this folder stops here, before it touches the run record
    if auto_resume and resume_from is not None and is_main_process():
        from pipeline.training.continuation import import_run

        import_run(resume_from, ckpt_dir, output_dir)

    output, record = Path(output_dir), Path(ckpt_dir) / RUN_RECORD
    name = None
    if auto_resume and record.is_file() and find_latest_checkpoint(ckpt_dir) is not None:
        name = record.read_text().strip() or None
    new = name is None
    if new:
        name = new_run_name(output / "runs")
    path = output / "runs" / name
    if is_main_process():
        path.mkdir(parents=True, exist_ok=True)
        if new:
            atomic_write_bytes(record, f"{name}\n".encode())
        _point_latest(output, name)
    return str(path)


def latest_run(output_dir: str | os.PathLike) -> Path | None:
    """The newest run's folder in ``output_dir`` (where ``latest_run`` points), or None before any run."""
    link = Path(output_dir) / LATEST_LINK
    return link.resolve() if link.is_dir() else None

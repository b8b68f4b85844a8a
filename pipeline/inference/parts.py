"""Test-set inference split over processes and machines, and the merge of the parts into ``submission.zip``.

Under torchrun every rank predicts its own share of the test volumes; with ``num_parts``/``part_id`` (no process
group) each machine predicts one part, and ``python -m pipeline merge`` zips and checks the parts::

    python -m monai.bundle run inference --config_file bundle/configs/inference.yaml --num_parts 2 --part_id 0
    python -m monai.bundle run inference --config_file bundle/configs/inference.yaml --num_parts 2 --part_id 1
    python -m pipeline merge --pred_dir outputs/predictions [--dataset_dir D] [--output outputs/submission.zip]

Both split together: part ``part_id`` of ``num_parts`` is shared again by the ranks of its torchrun job, so the
whole test set is cut into ``num_parts * world_size`` shares, balanced by volume size (largest first).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from pipeline.utils.distributed import destroy_distributed, get_rank, get_world_size
from transforms.io import case_id, read_volume_shape

__all__ = ["balanced_shares", "check_part", "inference_share", "run_inference", "merge_parts"]


def balanced_shares(sizes: Sequence[int], num_shares: int) -> list[list[int]]:
    """Deal items to ``num_shares`` shares, largest first, each to the share with the least total so far (LPT).

    Ties go to the lower share index and items of equal size keep their order, so every process computes the same
    split.

    Returns:
        For each share, the indices of its items in their original order.
    """
    if num_shares < 1:
        msg = f"need at least one share, got {num_shares}"
        raise ValueError(msg)
    loads = [0] * num_shares
    shares: list[list[int]] = [[] for _ in range(num_shares)]
    for i in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i)):
        j = min(range(num_shares), key=lambda k: (loads[k], k))
        shares[j].append(i)
        loads[j] += int(sizes[i])
    return [sorted(s) for s in shares]


def check_part(num_parts: int, part_id: int, error: type[Exception] = ValueError, options: bool = False) -> None:
    """Refuse a ``part_id`` outside ``0 .. num_parts - 1`` (or fewer than one part).

    Args:
        num_parts: how many parts the work is split into.
        part_id: this process's part.
        error: the exception type to raise (a command's own).
        options: name them as command-line options (``--part_id 2 ... (--num_parts 2)``), not as config keys.

    Raises:
        error: the part is outside the range, in one line.
    """
    if num_parts < 1 or not 0 <= part_id < num_parts:
        part, parts = ("--part_id ", "--num_parts ") if options else ("part_id=", "num_parts=")
        msg = f"{part}{part_id} outside 0..{num_parts - 1} ({parts}{num_parts})"
        raise error(msg)


def inference_share(datalist: Sequence[Mapping[str, str]], num_parts: int = 1, part_id: int = 0) -> list:
    """This process's test cases: part ``part_id`` of ``num_parts``, shared again over the torchrun ranks.

    Sizes come from the volume headers (no decoding). A share may be empty when there are fewer volumes than
    processes; that process then writes nothing.

    Raises:
        ValueError: ``part_id`` outside ``0 .. num_parts - 1``.
    """
    num_parts, part_id = int(num_parts), int(part_id)
    check_part(num_parts, part_id)
    world = get_world_size()
    sizes = [int(np.prod(read_volume_shape(c["image"]))) for c in datalist]
    shares = balanced_shares(sizes, num_parts * world)
    return [datalist[i] for i in shares[part_id * world + get_rank()]]


def run_inference(
    evaluator: Any,
    pred_dir: str | os.PathLike,
    zip_path: str | os.PathLike | None,
    datalist: Sequence[Mapping[str, str]],
    stale_zip: str | os.PathLike | None = None,
) -> None:
    """Run the inference evaluator on this process's share, wait for every rank, then zip and check on rank 0.

    The zip is built here rather than on the evaluator's COMPLETED event: a rank whose share is empty never
    completes a run, and every rank must reach the barrier. The process group is destroyed even when a step raises.

    Args:
        evaluator: the inference workflow (its SubmissionWriter writes ``<pred_dir>/<id>.tif``).
        pred_dir: the masks' folder, shared by the ranks.
        zip_path: ``submission.zip``, or None (a part of a multi-machine run: ``python -m pipeline merge`` zips).
        datalist: the whole test set, which the zip is checked against.
        stale_zip: an earlier run's zip to remove before any rank starts (default: ``zip_path``); a part of a
            multi-machine run passes the submission path, so an older zip never looks current.
    """
    from pipeline.inference.submission import remove_stale_outputs, write_submission_zip

    try:
        if get_rank() == 0:  # before any rank writes: a rank's cleaning must never meet another's write in flight
            remove_stale_outputs(pred_dir, stale_zip if stale_zip is not None else zip_path)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        evaluator.run()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if zip_path is not None and get_rank() == 0:
            write_submission_zip(pred_dir, zip_path, {case_id(c["image"]): read_volume_shape(c["image"]) for c in datalist})
    finally:
        destroy_distributed()


def merge_parts(
    pred_dirs: Sequence[str | os.PathLike], zip_path: str | os.PathLike, expected: Mapping[str, Sequence[int]]
) -> Path:
    """Zip the masks written by the parts (``<id>.tif`` in any of ``pred_dirs``) and check the zip.

    Raises:
        SubmissionError: a case missing from every folder, found in two, or a zip that fails the check.
    """
    from pipeline.inference.submission import (
        MaskFiles,
        SubmissionError,
        write_submission_zip,
    )

    found: dict[str, str] = {}
    for d in pred_dirs:
        if not Path(d).is_dir():  # a part that has not run: named below with the cases it owes
            continue
        with MaskFiles(d, recursive=False) as masks:
            for case, f in masks.entries:
                if case in expected:
                    if case in found:
                        msg = f"{f}: case {case} also predicted in {found[case]}; keep one"
                        raise SubmissionError(msg)
                    found[case] = f
    missing = sorted(set(expected) - set(found))
    if missing:
        msg = f"{', '.join(map(str, pred_dirs))}: no mask for test case(s) {missing}; run every part before merging"
        raise SubmissionError(msg)
    if len(pred_dirs) == 1:
        return write_submission_zip(pred_dirs[0], zip_path, expected)
    with tempfile.TemporaryDirectory(dir=Path(zip_path).parent) as tmp:
        for f in found.values():
            shutil.copy(f, tmp)
        return write_submission_zip(tmp, zip_path, expected)

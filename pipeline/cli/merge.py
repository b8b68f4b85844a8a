"""``python -m pipeline merge``: zip and check the masks of every part of a ``--num_parts`` run
(:func:`pipeline.inference.parts.merge_parts`)."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.cli.parsers import merge_parser
from pipeline.data.datalist import DatasetError, resolve_dataset_dir, test_datalist
from pipeline.inference.parts import merge_parts
from pipeline.inference.submission import SubmissionError
from transforms.io import VolumeError, case_id, read_volume_shape


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline merge``: zip and check the masks of every part; exit 2 with one line on a problem."""
    parser = merge_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cases = test_datalist(resolve_dataset_dir(args.dataset_dir, args.synthetic_dir))
        expected = {case_id(c["image"]): read_volume_shape(c["image"]) for c in cases}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        out = merge_parts(args.pred_dir, args.output, expected)
    except (DatasetError, SubmissionError, VolumeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: {len(expected)} volumes, checked")
    return 0

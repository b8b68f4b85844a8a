"""``python -m pipeline score``: the competition score of predicted masks (a submission zip or a folder of
``<id>.tif``) against labels, per volume and on average (:mod:`pipeline.evaluation.score`)."""

from __future__ import annotations

import json
import sys

from pipeline.cli.parsers import score_parser
from pipeline.evaluation.score import COMPONENT_KEYS, prediction_pairs, score_volumes


def _table(result: dict[str, dict]) -> str:
    header = f"{'id':<24}" + "".join(f"{key:>14}" for key in COMPONENT_KEYS)
    rows = [header]
    for volume_id, values in list(result["volumes"].items()) + [("mean", result["mean"])]:
        rows.append(f"{volume_id:<24}" + "".join(f"{values[key]:>14.6f}" for key in COMPONENT_KEYS))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline score --pred P --labels L [--json]``: score predictions against labels.

    Args:
        argv: command-line arguments after ``score``; ``sys.argv[1:]`` when None.

    Returns:
        0 on success, 2 when an input is missing, unreadable or of the wrong shape (the message names the file).
    """
    args = score_parser().parse_args(argv)
    try:
        result = score_volumes(prediction_pairs(args.pred, args.labels), topo_mode=args.topo_mode)
    except ValueError as e:  # bad input; an OSError (permission, disk) is the environment's: pipeline.utils.errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else _table(result))
    return 0

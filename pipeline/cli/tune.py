"""``python -m pipeline tune``: sweep threshold and post-processing on the validation split, print the best settings
and write them into the model file's plans (:mod:`pipeline.evaluation.tune`)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.cli.main import parse_overrides
from pipeline.cli.parsers import tune_parser
from pipeline.evaluation.score import COMPONENT_KEYS
from pipeline.evaluation.tune import (
    EVALUATE_CONFIGS,
    Deadline,
    SweepGrid,
    TimeUp,
    format_overrides,
    sweep,
)
from pipeline.model.plans import POSTPROCESSING_KEYS
from pipeline.utils.config import load_config
from pipeline.utils.files import atomic_write_bytes


def _table(rows: Iterable[Mapping[str, Any]]) -> str:
    head = ["threshold", "hyst_low", "hyst_high", "closing", "plug", "min_size", *COMPONENT_KEYS]
    lines = ["".join(f"{h:>13}" for h in head)]
    for row in rows:
        setting = [row[k] for k in POSTPROCESSING_KEYS]
        lines.append(
            "".join(f"{str(v):>13}" for v in setting) + "".join(f"{row[k]:>13.4f}" for k in COMPONENT_KEYS)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: sweep, print the best settings and the overrides to use, write ``tuning.json``.

    Returns:
        0 on success, 2 on a bad grid or data.
    """
    args, rest = tune_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    overrides = parse_overrides(rest)
    for key in ("dataset_dir", "ckpt_dir", "output_dir"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.tta:
        overrides["tta"] = True
    given = {name: getattr(args, f"grid_{name}") for name in SweepGrid.__dataclass_fields__}
    grid = SweepGrid(**{name: values for name, values in given.items() if values is not None})
    try:
        tune(overrides, grid, workers=args.workers, max_settings=args.max_settings, save=not args.no_save,
             top=args.top)
    except (ValueError, FileNotFoundError, TimeUp) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # MONAI wraps what a config expression raises (a missing model.pt, a bad dataset)
        from pipeline.utils.errors import find_user_error

        user = find_user_error(e) or (e.__cause__ if isinstance(e.__cause__, FileNotFoundError) else None)
        if user is None:
            raise
        print(f"error: {user}", file=sys.stderr)
        return 2
    return 0


def tune(
    overrides: dict[str, Any],
    grid: SweepGrid,
    workers: int = 1,
    max_settings: int = 400,
    save: bool = True,
    deadline: Deadline | None = None,
    top: int = 10,
) -> dict[str, Any]:
    """Sweep ``grid`` on the validation split, print the table, write ``tuning.json`` and (``save``) the best setting
    into the model file's plans; ``python -m pipeline tune`` and the main job after training.

    Args:
        overrides: bundle keys of train.yaml + evaluate.yaml (dataset_dir, ckpt_dir, output_dir, model_path, ...).
        grid: the settings to try (the model file's current setting is tried first).
        workers: processes scoring settings in parallel.
        max_settings: refuse larger grids.
        save: write the best setting into the model file.
        deadline: stop scoring volumes when the prediction after the sweep would no longer fit.
        top: rows of the printed table.

    Returns:
        The report written to ``tuning.json`` (``best``, ``default``, ``volumes``, ``stopped``, ...) and ``saved``.

    Raises:
        ValueError: a grid larger than ``max_settings`` or empty.
        TimeUp: ``deadline`` passed before one volume was scored in full (nothing written).
        RuntimeError: from the evaluator (a missing model, bad data: see :func:`pipeline.utils.errors.find_user_error`).
    """
    parser = load_config(*EVALUATE_CONFIGS, overrides=overrides)
    plans = parser.get_parsed_content("model_plans")  # the model file's, explicit settings checked or applied
    default = {key: plans["postprocessing"][key] for key in POSTPROCESSING_KEYS}
    settings = grid.settings(default)
    if len(settings) > max_settings:
        msg = f"the grid has {len(settings)} settings, more than --max_settings {max_settings}; shrink it"
        raise ValueError(msg)
    stopped: list[str] = []
    rows = sweep(parser, settings, workers=workers, deadline=deadline, stopped=stopped)
    default_row = next(row for row in rows if all(row[k] == default[k] for k in POSTPROCESSING_KEYS))
    best = rows[0]
    overrides_text = format_overrides(best)
    output_dir = Path(parser.get_parsed_content("output_dir"))
    model_path = Path(parser.get_parsed_content("model_path"))
    tta = bool(parser.get_parsed_content("tta"))
    report = {
        "model_path": str(model_path),
        "tta": tta,
        "volumes": sorted(best["volumes"]),
        "stopped": stopped[0] if stopped else None,
        "grid": asdict(grid),
        "best": best,
        "default": default_row,
        "overrides": overrides_text,
        "rows": rows,
    }
    atomic_write_bytes(output_dir / "tuning.json", (json.dumps(report, indent=2) + "\n").encode())
    print(f"{len(settings)} settings x {len(best['volumes'])} validation volumes; best first:")
    print(_table(rows[:top]))
    if stopped:
        print(f"stopped early: {stopped[0]}")
    print(f"default setting: score {default_row['score']:.4f}")
    print(f"best setting:    score {best['score']:.4f} ({best['score'] - default_row['score']:+.4f})")
    print(f"inference overrides: {overrides_text}")
    print(f"all rows: {output_dir / 'tuning.json'}")
    report["saved"] = save
    if not save:
        print(f"{model_path} left as it is (--no_save): give the overrides above to use the best setting")
        return report
    from pipeline.model.plans import save_postprocessing

    tuning = {
        "score": best["score"],
        "default_score": default_row["score"],
        "volumes": sorted(best["volumes"]),
        "tta": tta,
        "overlap": parser.get_parsed_content("overlap"),
        "settings_tried": len(settings),
        "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    save_postprocessing(model_path, best, tuning, plans=plans)
    print(f"wrote the best setting into {model_path} (its plans): inference, evaluate and predict use it from now on")
    return report

"""``python -m pipeline tune``: sweep threshold and post-processing on the validation split, print the best settings
and write them where inference reads them (:mod:`pipeline.evaluation.tune`): a model file's plans, or an ensemble
file for several models, or for a cross-validation's folds (``--folds``: chosen on their out-of-fold predictions)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.cli.main import fold_list, parse_overrides
from pipeline.cli.parsers import tune_parser
from pipeline.evaluation.score import COMPONENT_KEYS
from pipeline.evaluation.tune import (
    EVALUATE_CONFIGS,
    Deadline,
    SweepGrid,
    TimeUp,
    format_overrides,
    join_rows,
    sweep,
)
from pipeline.model.ensemble import read_ensemble, save_ensemble
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
        folds = fold_list(args.folds, overrides) if args.folds is not None else None
        tune(overrides, grid, workers=args.workers, max_settings=args.max_settings, save=not args.no_save,
             top=args.top, folds=folds)
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
    folds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Sweep ``grid`` on the validation split, print the table, write ``tuning.json`` and (``save``) the best setting
    where inference reads it; ``python -m pipeline tune`` and the main job after training.

    Where it is written: one model file: into its plans. An ensemble (a list of model files, or an ensemble file):
    the sweep scores the fused probabilities, and the setting goes into the ensemble file (the one given, else
    ``output_dir/ensemble.json``). ``folds``: each fold's model is run on that fold's validation cases (every
    training case once, by the model that did not train on it: nnU-Net's out-of-fold choice), the rows are joined
    over all of them, and the folds' ensemble goes to ``ckpt_dir/ensemble.json``, the folds' models in it.

    Args:
        overrides: bundle keys of train.yaml + evaluate.yaml (dataset_dir, ckpt_dir, output_dir, model_path, ...).
        grid: the settings to try (the model file's current setting is tried first).
        workers: processes scoring settings in parallel.
        max_settings: refuse larger grids.
        save: write the best setting (model file or ensemble file).
        deadline: stop scoring volumes when the prediction after the sweep would no longer fit.
        top: rows of the printed table.
        folds: the folds of ``ckpt_dir/fold_<k>`` to sweep out of fold; None: ``model_path`` on the validation split.

    Returns:
        The report written to ``tuning.json`` (``best``, ``default``, ``volumes``, ``stopped``, ...) and ``saved``
        (the file written, or None).

    Raises:
        ValueError: a grid larger than ``max_settings`` or empty.
        MissingFileError, SettingsError: a fold without its model, or unfinished.
        TimeUp: ``deadline`` passed before one volume was scored in full (nothing written).
        RuntimeError: from the evaluator (a missing model, bad data: see :func:`pipeline.utils.errors.find_user_error`).
    """
    runs = [overrides] if folds is None else [_fold_overrides(overrides, k) for k in folds]
    parsers = [load_config(*EVALUATE_CONFIGS, overrides=run) for run in runs]
    plans = parsers[0].get_parsed_content("model_plans")  # the model's, explicit settings checked or applied
    default = {key: plans["postprocessing"][key] for key in POSTPROCESSING_KEYS}
    settings = grid.settings(default)
    if len(settings) > max_settings:
        msg = f"the grid has {len(settings)} settings, more than --max_settings {max_settings}; shrink it"
        raise ValueError(msg)
    stopped: list[str] = []
    parts = []
    for k, parser in enumerate(parsers):
        if stopped:  # the time is up: the folds so far are what is ranked
            stopped[0] += f"; fold(s) {list(folds)[k:]} not swept"
            break
        try:
            parts.append(sweep(parser, settings, workers=workers, deadline=deadline, stopped=stopped))
        except TimeUp as e:
            if not parts:
                raise
            stopped.append(f"{e}; fold(s) {list(folds)[k:]} not swept")
            break
    rows = parts[0] if len(parts) == 1 else join_rows(parts)
    default_row = next(row for row in rows if all(row[k] == default[k] for k in POSTPROCESSING_KEYS))
    best = rows[0]
    overrides_text = format_overrides(best)
    output_dir = Path(parsers[0].get_parsed_content("output_dir"))
    models = [parser.get_parsed_content("model_path") for parser in parsers]
    tta = bool(parsers[0].get_parsed_content("tta"))
    report = {
        "model_path": [str(m) for m in models] if folds is not None else _jsonable(models[0]),
        "folds": list(folds)[: len(parts)] if folds is not None else None,
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
    what = f"{len(parts)} folds' out-of-fold" if folds is not None else "validation"
    print(f"{len(settings)} settings x {len(best['volumes'])} {what} volumes; best first:")
    print(_table(rows[:top]))
    if stopped:
        print(f"stopped early: {stopped[0]}")
    print(f"default setting: score {default_row['score']:.4f}")
    print(f"best setting:    score {best['score']:.4f} ({best['score'] - default_row['score']:+.4f})")
    print(f"inference overrides: {overrides_text}")
    print(f"all rows: {output_dir / 'tuning.json'}")
    report["saved"] = None
    if not save:
        print(f"{_jsonable(models[0]) if folds is None else 'the folds'} left as they are (--no_save): give the "
              "overrides above to use the best setting")
        return report
    tuning = {
        "score": best["score"],
        "default_score": default_row["score"],
        "volumes": sorted(best["volumes"]),
        "tta": tta,
        "overlap": parsers[0].get_parsed_content("overlap"),
        "settings_tried": len(settings),
        "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    ens = read_ensemble(models[0], parsers[0].get_parsed_content("model_weights")) if folds is None else None
    if ens is not None and len(ens.models) == 1 and ens.file is None:
        from pipeline.model.plans import save_postprocessing

        report["saved"] = str(save_postprocessing(ens.models[0], best, tuning, plans=plans))
        print(f"wrote the best setting into {ens.models[0]} (its plans): inference, evaluate and predict use it from "
              "now on")
        return report
    if ens is None:  # the folds' ensemble, equal weights
        target = Path(parsers[0].get_parsed_content("ckpt_dir")) / "ensemble.json"
        members, weights = [Path(m) for m in models[: len(parts)]], [1.0 / len(parts)] * len(parts)
        tuning["folds"] = report["folds"]
    else:
        target = ens.file or output_dir / "ensemble.json"
        members, weights = list(ens.models), list(ens.weights)
    report["saved"] = str(save_ensemble(target, members, weights, best, tuning))
    print(f"wrote the ensemble and its best setting into {target}: predict with --model_path {target}")
    return report


def _jsonable(model_path: Any) -> Any:
    return [str(m) for m in model_path] if isinstance(model_path, (list, tuple)) else str(model_path)


def _fold_overrides(overrides: dict[str, Any], k: int) -> dict[str, Any]:
    """The evaluate keys that run fold ``k``'s model on fold ``k``'s validation cases (every one of them), its model
    ``ckpt_dir/fold_<k>/model.pt`` checked to exist and to be finished.

    Raises:
        MissingFileError: the fold has no model file.
        SettingsError: the fold's training is unfinished (a checkpoint without the configured epochs done).
    """
    from pipeline.training.checkpoint import completed_epochs, find_latest_checkpoint
    from pipeline.utils.errors import MissingFileError, SettingsError

    parser = load_config(*EVALUATE_CONFIGS, overrides=overrides)
    root = Path(parser.get_parsed_content("ckpt_dir"))
    folder = root / f"fold_{k}"
    model = folder / "model.pt"
    if not model.is_file():
        msg = (f"{model}: fold {k} has no model; train it (python -m pipeline --folds {k} --ckpt_dir {root}) or "
               "leave it out of --folds")
        raise MissingFileError(msg)
    epochs = parser.get_parsed_content("epochs")
    done = completed_epochs(folder)
    if find_latest_checkpoint(folder) is not None and (done == 0 or (epochs != "auto" and done < int(epochs))):
        msg = (f"{folder}: fold {k} is unfinished ({done} of {epochs} epochs); finish it (python -m pipeline --folds "
               f"{k} --ckpt_dir {root}, the same settings) or leave it out of --folds")
        raise SettingsError(msg)
    return {**overrides, "fold": k, "model_path": str(model), "val_max_cases": None}

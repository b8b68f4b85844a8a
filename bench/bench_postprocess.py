"""Competition score on the validation split without post-processing, with it, and with it plus mirror TTA.

One run: train a model on the synthetic default dataset (or take ``--ckpt``), then, through the evaluation bundle
(``train.yaml`` + ``evaluate.yaml``):

1. without TTA, score the raw mask (``probs >= 0.5``, nothing else), the inference defaults and every setting of
   the tuning grid (:class:`pipeline.evaluation.tune.SweepGrid`), on probabilities computed once per volume;
2. with 8x mirror TTA, score the raw mask, the inference defaults and the best setting of step 1.

The "tuned" rows are chosen on the volumes they are scored on, so they are optimistic by the selection. Run from
the repo root::

    PYTHONPATH=. python bench/bench_postprocess.py [--ckpt models/model.pt] [--dataset_dir DIR] [--epochs 20]
        [--workers N] [--out bench_out] [--<bundle key> VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.cli.main import parse_overrides
from pipeline.evaluation.score import COMPONENT_KEYS
from pipeline.evaluation.tune import (
    EVALUATE_CONFIGS,
    SweepGrid,
    format_overrides,
    sweep,
)
from pipeline.model.plans import POSTPROCESSING_KEYS
from pipeline.utils.config import load_config

REPO = Path(__file__).resolve().parent.parent
RAW = {"threshold": 0.5, "hysteresis_low": None, "hysteresis_high": None, "closing_radius": 0, "plug_holes": False,
       "min_size": 0}
SHOWN = ("score", "topo", "surface_dice", "voi_score")


def _train(out: Path, epochs: int, overrides: dict[str, Any]) -> tuple[Path, float]:
    ckpt_dir = out / "models"
    args = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "bundle/configs/train.yaml",
            "--output_dir", str(out / "train"), "--ckpt_dir", str(ckpt_dir), "--epochs", str(epochs),
            "--val_interval", str(max(1, epochs // 4))]
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    start = time.perf_counter()
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    subprocess.run(args, cwd=REPO, env={**os.environ, "PYTHONPATH": path}, check=True)
    return ckpt_dir, time.perf_counter() - start


def _pass(overrides: dict[str, Any], settings: list[dict], workers: int) -> tuple[list[dict], float]:
    start = time.perf_counter()
    rows = sweep(load_config(*EVALUATE_CONFIGS, overrides=overrides), settings, workers=workers)
    return rows, time.perf_counter() - start


def _find(rows: list[dict], setting: dict) -> dict:
    return next(r for r in rows if all(r[k] == setting[k] for k in POSTPROCESSING_KEYS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="model.pt to evaluate; default: train one first")
    parser.add_argument("--dataset_dir", default=None, help="default: the synthetic dataset of train.yaml")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs when no --ckpt is given")
    parser.add_argument("--workers", type=int, default=1, help="processes scoring settings in parallel")
    parser.add_argument("--out", default="outputs/bench_postprocess")
    args, rest = parser.parse_known_args()
    overrides = parse_overrides(rest)
    if args.dataset_dir is not None:
        overrides["dataset_dir"] = args.dataset_dir
    out = Path(args.out).resolve()
    train_s = None
    if args.ckpt is None:
        ckpt_dir, train_s = _train(out, args.epochs, overrides)
        model_path = ckpt_dir / "model.pt"
    else:
        model_path = Path(args.ckpt).resolve()
    common = {**overrides, "model_path": str(model_path), "output_dir": str(out / "eval")}

    config = load_config(*EVALUATE_CONFIGS, overrides=common)
    default = {key: config.get_parsed_content("model_plans")["postprocessing"][key] for key in POSTPROCESSING_KEYS}
    settings = SweepGrid().settings(default)
    if RAW not in settings:
        settings.append(RAW)
    rows, plain_s = _pass(common, settings, args.workers)
    tuned = rows[0]
    tta_settings = [RAW] + [s for s in (default, {k: tuned[k] for k in POSTPROCESSING_KEYS}) if s != RAW]
    tta_rows, tta_s = _pass({**common, "tta": True}, tta_settings, args.workers)

    lines = [
        ("no post-processing (probs >= 0.5)", _find(rows, RAW)),
        ("post-processing: inference defaults", _find(rows, default)),
        ("post-processing: tuned (best of grid)", tuned),
        ("TTA + no post-processing", _find(tta_rows, RAW)),
        ("TTA + inference defaults", _find(tta_rows, default)),
        ("TTA + tuned post-processing", _find(tta_rows, tuned)),
    ]
    print(f"model: {model_path}" + (f" (trained {args.epochs} epochs in {train_s:.0f} s)" if train_s else ""))
    print(f"validation volumes: {len(tuned['volumes'])}; grid: {len(settings)} settings")
    print(f"wall: no-TTA pass {plain_s:.1f} s (inference + {len(settings)} settings scored), "
          f"TTA pass {tta_s:.1f} s (8x inference + {len(tta_settings)} settings)")
    print(f"inference defaults: {format_overrides(default)}")
    print(f"tuned:              {format_overrides(tuned)}")
    print(f"{'':40}" + "".join(f"{k:>14}" for k in SHOWN))
    for name, row in lines:
        print(f"{name:40}" + "".join(f"{row[k]:>14.4f}" for k in SHOWN))
    (out / "eval").mkdir(parents=True, exist_ok=True)
    summary = {name: {k: row[k] for k in (*POSTPROCESSING_KEYS, *COMPONENT_KEYS)} for name, row in lines}
    (out / "eval" / "bench_postprocess.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

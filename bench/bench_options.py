"""Choose the demo's defaults by measurement: the main job's training budget, one option changed at a time.

Each variant is a set of train.yaml overrides (network, skeleton recall, EMA, ...). For every variant and seed it
trains with train.yaml's schedule on the synthetic dataset (``python -m pipeline synth``, seed 0), then runs
``python -m pipeline tune`` on the model: the validation split's competition score and its components with
inference.yaml's post-processing ("default") and with the best setting of tune's grid ("tuned"). The split is
fixed (``split_seed``), so seeds change only the training's randomness. Printed: one row per run, then the mean
(and spread) per variant. Runs go ``--parallel`` at a time, each with ``cores / parallel`` threads.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/bench_options.py --work /tmp/options \\
        [--variants unet,dynunet,skeleton,ema] [--seeds 0,1] [--parallel 2] [--epochs N] [--difficulty hard]

A run already measured in ``--work`` (its ``row.json``) is reused, so a table can be extended a run at a time;
``--epochs`` runs get folders of their own. Only the validation split is used, never the test volumes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE = {"architecture": "unet", "skeleton_recall_weight": 0.0, "ema": False}  # explicit: defaults change by this table
VARIANTS = {
    "unet": BASE,
    "dynunet": {**BASE, "architecture": "dynunet"},
    "segresnet": {**BASE, "architecture": "segresnet"},
    "skeleton": {**BASE, "skeleton_recall_weight": 1.0},
    "ema": {**BASE, "ema": True},
    "dynunet+skeleton": {**BASE, "architecture": "dynunet", "skeleton_recall_weight": 1.0},
    "dynunet+ema": {**BASE, "architecture": "dynunet", "ema": True},
    "skeleton+ema": {**BASE, "skeleton_recall_weight": 1.0, "ema": True},
    "all": {"architecture": "dynunet", "skeleton_recall_weight": 1.0, "ema": True},
}
COMPONENTS = ("score", "topo", "surface_dice", "voi_score")
QUIET = {"progress_enabled": False, "tensorboard_preview": False, "training_curves": False}


def _args(overrides: dict) -> list[str]:
    # Python literals: the monai.bundle command line (fire) reads "False" as a bool but "false" as a (truthy) string
    return [a for k, v in overrides.items() for a in (f"--{k}", repr(v) if not isinstance(v, str) else v)]


def _run(cmd: list[str], log: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        msg = f"{' '.join(cmd[:6])} ... failed (exit {rc}); see {log}"
        raise RuntimeError(msg)
    return time.perf_counter() - start


def train_and_tune(work: Path, data: Path, name: str, seed: int, threads: int, extra: dict) -> dict:
    """One variant and seed: train with its overrides, then tune; returns the row of the table."""
    run = work / f"{name}-s{seed}" if not extra else work / f"{name}-s{seed}-e{extra['epochs']}"
    done = run / "row.json"
    if done.is_file():  # measured by an earlier call: reused, so that a table can be extended run by run
        return json.loads(done.read_text())
    run.mkdir(parents=True, exist_ok=True)
    common = {"dataset_dir": str(data), "output_dir": str(run / "out"), "ckpt_dir": str(run / "models")}
    train = {**common, **QUIET, **extra, **VARIANTS[name], "seed": seed}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           str(REPO / "bundle/configs/train.yaml"), *_args(train)]
    t_train = _run(cmd, run / "train.log", threads)
    cmd = [sys.executable, "-m", "pipeline", "tune", *_args(common)]
    _run(cmd, run / "tune.log", threads)
    report = json.loads((run / "out" / "tuning.json").read_text())
    row = {"variant": name if not extra else f"{name} e{extra['epochs']}", "seed": seed, "train_s": t_train}
    for which in ("default", "best"):
        for key in COMPONENTS:
            row[f"{which}_{key}"] = report[which][key]
    row["best_overrides"] = report["overrides"]
    done.write_text(json.dumps(row) + "\n")
    print(f"done {name} seed {seed}: train {t_train:.0f} s, score {row['default_score']:.4f} "
          f"(tuned {row['best_score']:.4f})", flush=True)
    return row


def _table(rows: list[dict]) -> str:
    head = f"{'variant':<18} {'seed':>4} {'train s':>8} " + " ".join(f"{k:>9}" for k in COMPONENTS)
    head += f" {'tuned':>9}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['variant']:<18} {r['seed']:>4} {r['train_s']:>8.0f} "
                     + " ".join(f"{r['default_' + k]:>9.4f}" for k in COMPONENTS) + f" {r['best_score']:>9.4f}")
    lines.append("mean (spread = max - min over seeds)")
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        cells = []
        for key in [f"default_{k}" for k in COMPONENTS] + ["best_score"]:
            values = [r[key] for r in mine]
            cells.append(f"{statistics.mean(values):.4f}" + (f"±{(max(values) - min(values)) / 2:.3f}" if len(values) > 1 else ""))
        t = statistics.mean(r["train_s"] for r in mine)
        lines.append(f"{name:<18} {'n=' + str(len(mine)):>4} {t:>8.0f} " + " ".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the dataset, models and logs")
    parser.add_argument("--variants", default="unet,dynunet,skeleton,ema", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once")
    parser.add_argument("--epochs", type=int, default=None, help="default: train.yaml's (the main job's budget)")
    parser.add_argument("--difficulty", default="easy", choices=("easy", "hard"),
                        help="the synthetic scrolls (python -m pipeline synth --difficulty): hard = touching, crossing, "
                        "closely packed sheets")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    data = args.work / ("synth" if args.difficulty == "easy" else f"synth_{args.difficulty}")
    if not (data / "train.csv").is_file():
        subprocess.run([sys.executable, "-m", "pipeline", "synth", "--out", str(data), "--difficulty", args.difficulty],
                       cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    extra = {} if args.epochs is None else {"epochs": args.epochs}
    threads = max(1, len(os.sched_getaffinity(0)) // args.parallel)
    jobs = [(n, s) for s in seeds for n in names]
    def one(job: tuple[str, int]) -> dict | None:
        try:
            return train_and_tune(args.work, data, *job, threads, extra)
        except RuntimeError as e:  # one failed run does not lose the others
            print(f"failed {job}: {e}", flush=True)
            return None

    with ThreadPoolExecutor(args.parallel) as pool:
        rows = [row for row in pool.map(one, jobs) if row is not None]
    (args.work / "options.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(_table(sorted(rows, key=lambda r: (names.index(r["variant"].split(" ")[0]), r["seed"]))))
    print(f"rows: {args.work / 'options.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

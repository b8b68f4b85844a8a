"""One model against an ensemble: each model file alone and their fusion, scored on the same validation cases.

Every prediction goes through inference.yaml (sliding window, and for every run the same post-processing: the first
model file's) on the validation images of ``--dataset`` (the split train.yaml makes with ``--fold``/``--num_folds``
or its default ``val_fraction``, never the test volumes), and each is scored with the exact competition score. It
prints one row per model and one for the fusion (score and components, the prediction's wall time and peak RSS of
its process), so the fusion's gain and cost are measured in one run.

    PYTHONPATH=. python bench/bench_ensemble.py --dataset /tmp/options_hard/synth_hard \\
        --models /tmp/options_hard/skeleton-s0/models/model.pt /tmp/options_hard/skeleton-s1/models/model.pt \\
        /tmp/options_hard/skeleton-s2/models/model.pt [--weights 1 1 1] [--work /tmp/bench_ensemble]

Models trained on other folds of the same data have seen these validation cases: compare models trained on the same
split (seeds, options); folds are scored out of fold by ``python -m pipeline --folds``. To compare models trained on
different splits (a fold ensemble against seeds), score them all on synthetic scrolls none of them saw: another seed
of the generator, every case (``--all_cases``), and pin one post-processing for every run (``--postprocessing_from``)::

    python -m pipeline synth --out /tmp/heldout_hard --seed 7 --difficulty hard
    PYTHONPATH=. python bench/bench_ensemble.py --dataset /tmp/heldout_hard --all_cases \
        --postprocessing_from /tmp/options_hard/skeleton-s0/models/model.pt --models /tmp/folds3/models/fold_*/model.pt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMPONENTS = ("score", "topo", "surface_dice", "voi_score")


def _validation_set(dataset: Path, work: Path, split: dict, all_cases: bool) -> Path:
    """A dataset folder whose test_images are the validation images (``all_cases``: every training case) as links, so
    inference.yaml predicts them."""
    from pipeline.data.datalist import prepare_datalists

    lists = prepare_datalists(dataset, check=False, **split)
    val = lists["val"] + (lists["train"] if all_cases else [])
    out = work / "val_as_test"
    (out / "test_images").mkdir(parents=True, exist_ok=True)
    for case in val:
        link = out / "test_images" / Path(case["image"]).name
        if not link.exists():
            link.symlink_to(Path(case["image"]).resolve())
    (out / "test.csv").write_text("id\n" + "".join(f"{c['id']}\n" for c in val))
    return out


def _predict(models: list[str], weights: list[float] | None, post: dict, data: Path, out: Path) -> tuple[float, float]:
    """inference.yaml on ``data`` with the post-processing ``post``: wall seconds and the process's peak RSS (GiB)."""
    cmd = ["/usr/bin/time", "-f", "MAXRSS_KB %M", sys.executable, "-m", "monai.bundle", "run", "inference",
           "--config_file", str(REPO / "bundle/configs/inference.yaml"), "--dataset_dir", str(data), "--output_dir",
           str(out), "--model_path", repr(models if len(models) > 1 else models[0])]
    cmd += [a for k, v in post.items() for a in (f"--{k}", repr(v))]
    if weights:
        cmd += ["--model_weights", repr(weights)]
    log_path = out.parent / f"{out.name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, check=False, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        msg = f"inference failed (exit {rc}); see {log_path}"
        raise RuntimeError(msg)
    kib = [int(line.split()[1]) for line in log_path.read_text().splitlines() if line.startswith("MAXRSS_KB ")]
    return seconds, kib[-1] / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, required=True, help="Kaggle-layout folder (synthetic)")
    parser.add_argument("--models", nargs="+", required=True, help="model files (two or more)")
    parser.add_argument("--weights", type=float, nargs="+", default=None, help="the fusion's weights (default equal)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_ensemble"))
    parser.add_argument("--fold", type=int, default=None, help="the validation fold (default: train.yaml's split)")
    parser.add_argument("--num_folds", type=int, default=5)
    parser.add_argument("--all_cases", action="store_true",
                        help="score every training case of --dataset (held-out scrolls none of the models saw)")
    parser.add_argument("--postprocessing_from", default=None,
                        help="a model file or ensemble.json whose post-processing every run uses (default: the "
                        "first model's)")
    args = parser.parse_args()
    from pipeline.evaluation.score import prediction_pairs, score_volumes

    args.work.mkdir(parents=True, exist_ok=True)
    split = {"fold": args.fold, "num_folds": args.num_folds} if args.fold is not None else {}
    data = _validation_set(args.dataset, args.work, split, args.all_cases)
    from pipeline.model.ensemble import resolve_ensemble
    from pipeline.model.plans import POSTPROCESSING_KEYS

    source = args.postprocessing_from or args.models[0]
    post = resolve_ensemble(source, defaults=dict.fromkeys(POSTPROCESSING_KEYS))["postprocessing"]
    post = {k: v for k, v in post.items() if v is not None}
    print(f"post-processing of every run ({source}): {post or 'inference.yaml defaults'}")
    runs = [(f"model {i}: {'/'.join(Path(m).parts[-3:-1])}", [m], None) for i, m in enumerate(args.models)]
    runs.append((f"fusion of {len(args.models)}", args.models, args.weights))
    rows = []
    for i, (name, models, weights) in enumerate(runs):
        out = args.work / f"run{i}"
        seconds, peak = _predict(models, weights, post, data, out)
        result = score_volumes(prediction_pairs(out / "predictions", args.dataset / "train_labels"))
        rows.append({"name": name, "seconds": seconds, "peak_rss_gib": peak, **result["mean"],
                     "volumes": len(result["volumes"])})
        print(f"{name:<28} " + " ".join(f"{k} {rows[-1][k]:.4f}" for k in COMPONENTS)
              + f"  predict {seconds:.1f} s, peak RSS {peak:.2f} GiB", flush=True)
    singles = [r["score"] for r in rows[:-1]]
    print(f"fusion - mean single: {rows[-1]['score'] - sum(singles) / len(singles):+.4f}; fusion - best single: "
          f"{rows[-1]['score'] - max(singles):+.4f}; time fusion / mean single: "
          f"{rows[-1]['seconds'] / (sum(r['seconds'] for r in rows[:-1]) / len(singles)):.2f}x")
    (args.work / "ensemble.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

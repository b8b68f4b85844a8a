"""``python -m pipeline``: the whole job (train or resume, then predict), and the project's other commands.

    python -m pipeline [--dataset_dir DIR] [--output_dir DIR] [--nproc N] [--<bundle key> VALUE ...]
    python -m pipeline synth --out DIR [--seed S]
    python -m pipeline score --pred submission.zip --labels DIR [--json]
    python -m pipeline tune [--dataset_dir DIR] [--<bundle key> VALUE ...]
    python -m pipeline predict --input PATH --output OUT.zarr [--model_path M] [--num_parts N --part_id I]
    python -m pipeline merge --pred_dir DIR [DIR ...] [--dataset_dir DIR] [--output submission.zip]

With no dataset the main job generates the synthetic scrolls into ``data/synthetic`` and trains on them with
train.yaml's settings (about 5 minutes on a 2-core CPU). Any other ``--key value`` overrides the bundle key of that name in the configs that have it.
"""

from __future__ import annotations

import argparse
import ast
import logging
import sys
import time
from pathlib import Path
from typing import Any

import yaml

__all__ = ["main", "parse_overrides", "route_overrides"]

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "bundle" / "configs"
TRAIN_CONFIG = CONFIGS / "train.yaml"
INFER_CONFIG = CONFIGS / "inference.yaml"
MULTI_GPU_CONFIG = CONFIGS / "multi_gpu_train.yaml"
LOGGING_CONF = CONFIGS / "logging.conf"

logger = logging.getLogger("pipeline")


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return yaml.safe_load(text)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--epochs", "4", "--patch_size", "[48,48,48]"]`` -> ``{"epochs": 4, "patch_size": [48, 48, 48]}``.

    Raises:
        SystemExit: an argument that is not a ``--key value`` pair.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            sys.exit(f"error: unexpected argument {arg!r}; bundle overrides are --key value pairs")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                sys.exit(f"error: --{key} needs a value")
            val, i = args[i + 1], i + 1
        out[key] = _value(val)
        i += 1
    return out


def _top_keys(config: Path) -> set[str]:
    with open(config) as f:
        return set(yaml.safe_load(f))


def route_overrides(overrides: dict[str, Any], *configs: Path) -> dict[str, Any]:
    """The overrides whose (top-level part of the) key exists in one of ``configs``."""
    keys = set().union(*(_top_keys(c) for c in configs))
    return {k: v for k, v in overrides.items() if k.split("#", 1)[0] in keys}


def _bundle_run(run_id: str, config: Path, overrides: dict[str, Any]) -> None:
    from monai.bundle import run

    run(run_id, config_file=str(config), logging_file=str(LOGGING_CONF), meta_file=str(CONFIGS / "metadata.json"), **overrides)


def _check_dataset(dataset_dir: str | None, synthetic_dir: str) -> Path:
    from pipeline.data import check_test_datalist, prepare_datalists, resolve_dataset_dir, test_datalist

    root = resolve_dataset_dir(dataset_dir, synthetic_dir)
    prepare_datalists(root, check=True)
    check_test_datalist(test_datalist(root))
    return root


def run_main_job(argv: list[str]) -> int:
    """Train (or resume) and predict; print where everything is."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Train (or resume), then predict.")
    parser.add_argument("--dataset_dir", default=None, help="Kaggle layout folder; default: synthetic scrolls")
    parser.add_argument("--output_dir", default=str(REPO / "outputs"))
    parser.add_argument("--ckpt_dir", default=str(REPO / "bundle" / "models"))
    parser.add_argument("--synthetic_dir", default=str(REPO / "data" / "synthetic"))
    parser.add_argument("--skip_training", action="store_true", help="predict with the existing model.pt")
    parser.add_argument("--nproc", type=int, default=None, help="processes for DDP training and inference (default: all GPUs)")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node_rank", type=int, default=0)
    parser.add_argument("--rdzv_endpoint", default=None, help="host:port of node 0, for several machines")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest)
    known = set().union(*(_top_keys(c) for c in (TRAIN_CONFIG, MULTI_GPU_CONFIG, INFER_CONFIG)))
    unknown = sorted(k for k in overrides if k.split("#", 1)[0] not in known)
    if unknown:
        print(f"error: unknown setting(s) {unknown}: not a key of train.yaml, multi_gpu_train.yaml or inference.yaml", file=sys.stderr)
        return 2
    from pipeline.data import DatasetError

    start = time.monotonic()
    try:
        root = _check_dataset(args.dataset_dir, args.synthetic_dir)
    except (DatasetError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    common = {
        "bundle_root": str(REPO / "bundle"),
        "dataset_dir": str(root),
        "output_dir": args.output_dir,
        "ckpt_dir": args.ckpt_dir,
    }
    train_overrides = {**common, "check_data": False, **overrides}  # checked above already: read every label once
    if not args.skip_training and not _training_complete(train_overrides):
        rc = _train(train_overrides, args)
        if rc != 0:
            return rc
    rc = _infer(route_overrides({**common, "check_data": False, **overrides}, INFER_CONFIG), args)
    if rc != 0:
        return rc
    out = Path(args.output_dir)
    print(
        "\n".join(
            [
                f"done in {time.monotonic() - start:.0f} s",
                f"  dataset:     {root}",
                f"  model:       {Path(args.ckpt_dir) / 'model.pt'}",
                f"  checkpoints: {args.ckpt_dir}",
                f"  submission:  {out / 'submission.zip'}",
                f"  predictions: {out / 'predictions'}",
                f"  logs:        {out}  (TensorBoard: tensorboard --logdir {out / 'tensorboard'})",
            ]
        )
    )
    return 0


def _training_complete(overrides: dict[str, Any]) -> bool:
    """Whether ``checkpoint_final.pt`` already holds the configured number of epochs (then training is skipped;
    otherwise the bundle resumes from the newest checkpoint by itself)."""
    from pipeline.checkpoint import completed_epochs

    with open(TRAIN_CONFIG) as f:
        epochs = int(overrides.get("epochs", yaml.safe_load(f)["epochs"]))
    done = completed_epochs(overrides["ckpt_dir"])
    if done >= epochs and (Path(overrides["ckpt_dir"]) / "model.pt").is_file():
        print(f"training already complete ({done}/{epochs} epochs): skipping to inference")
        return True
    return False


def _train(overrides: dict[str, Any], args: argparse.Namespace) -> int:
    from pipeline import launch

    return launch.launch(
        [str(TRAIN_CONFIG)],
        "training",
        route_overrides(overrides, TRAIN_CONFIG, MULTI_GPU_CONFIG),  # the mixin's keys too (dist_timeout_minutes, ...)
        nproc=args.nproc,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint,
    )


def _infer(overrides: dict[str, Any], args: argparse.Namespace) -> int:
    """Inference in this process, or under torchrun on ``--nproc`` processes (default: every GPU) and nodes."""
    from pipeline import launch

    if (args.nproc or launch.default_nproc()) == 1 and args.nnodes == 1:
        _bundle_run("inference", INFER_CONFIG, overrides)
        return 0
    return launch.launch(
        [str(INFER_CONFIG)], "inference", overrides, nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint, mixin=None,
    )


def run_synth(argv: list[str]) -> int:
    """``python -m pipeline synth --out DIR``: write a synthetic dataset in the Kaggle layout."""
    from pipeline.synth import SynthConfig, generate_dataset

    parser = argparse.ArgumentParser(prog="python -m pipeline synth", description="Write synthetic scroll volumes.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n_train", type=int, default=SynthConfig.n_train)
    parser.add_argument("--n_test", type=int, default=SynthConfig.n_test)
    args = parser.parse_args(argv)
    try:
        out = generate_dataset(args.out, SynthConfig(n_train=args.n_train, n_test=args.n_test, seed=args.seed))
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv and not argv[0].startswith("-") else ("run", argv)
    if command == "synth":
        return run_synth(rest)
    if command == "score":
        from pipeline.score import main as score_main

        return score_main(rest)
    if command == "tune":
        from pipeline.tune import main as tune_main

        return tune_main(rest)
    if command == "predict":
        from pipeline.predict import main as predict_main

        return predict_main(rest)
    if command == "merge":
        from pipeline.parts import main as merge_main

        return merge_main(rest)
    if command == "run":
        return run_main_job(rest)
    print(f"error: unknown command {command!r}; use run, synth, score, tune, predict or merge", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

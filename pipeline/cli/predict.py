"""``python -m pipeline predict``: stream a volume (zarr, OME-Zarr or TIFF) larger than RAM through the model, block
by block, resumably (:mod:`pipeline.inference.predict`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cli.main import parse_overrides
from pipeline.cli.parsers import predict_parser
from pipeline.inference.parts import check_part
from pipeline.inference.predict import (
    PredictError,
    StreamingPredictor,
    build_from_config,
    list_inputs,
)
from pipeline.model.plans import POSTPROCESSING_KEYS


def _parse(argv: list[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    parser = predict_parser()
    args, rest = parser.parse_known_args(argv)
    return args, parse_overrides(rest)


def _triple(values: list[int]) -> tuple[int, int, int]:
    return tuple(values * 3) if len(values) == 1 else tuple(values)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m pipeline predict``; returns the exit status (2 with one ``error:`` line on bad input)."""
    args, overrides = _parse(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from pipeline.utils.distributed import get_rank, get_world_size
    from transforms.postprocess import build_postprocessing

    try:
        inputs = list_inputs(args.input)
        network, s = build_from_config(overrides, args.model_path)
        post_settings = {k: s[k] for k in POSTPROCESSING_KEYS}
        post = build_postprocessing(**post_settings)
        predictor = StreamingPredictor(
            network, s["patch_size"], weights=s["model_weights"], overlap=s["overlap"], sw_batch_size=s["sw_batch_size"],
            tta_axes=s["tta_axes"] if s["tta"] else None, device=s["device"], amp_dtype=s["amp_dtype"],
            postprocess=lambda p: np.asarray(post(p)), post_settings=post_settings,
            block_size=_triple(args.block_size), chunk_size=_triple(args.chunk_size),
            probabilities=args.probabilities, cache_bytes=args.cache_mb << 20,
        )
        check_part(args.num_parts, args.part_id, PredictError, options=True)  # before the ranks multiply them
        # under torchrun each rank takes its own blocks of this machine's part (blocks are independent: no group)
        world, rank = get_world_size(), get_rank()
        folder = len(inputs) > 1 or inputs[0] != Path(args.input)
        for path in inputs:
            out = Path(args.output) / f"{path.name.split('.', 1)[0]}.zarr" if folder else Path(args.output)
            predictor.predict(path, out, num_parts=args.num_parts * world, part_id=args.part_id * world + rank)
            print(out)
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

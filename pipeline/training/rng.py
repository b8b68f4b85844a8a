"""Every random state a training step depends on, captured and restored: torch (CPU and CUDA), numpy, ``random``,
each ``Randomizable`` transform of the dataset and of ``extra`` (the augmentation a ``prepare_batch`` runs on the
device: ``pipeline.data.augment.DeviceAugment``) and the data loader's generators. The checkpoints store them
(``weights_only``-loadable: numpy states become lists and tensors) for exact resume.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable, Transform

__all__ = ["RngState", "capture_rng_state", "restore_rng_state"]

logger = logging.getLogger(__name__)

RngState = dict[str, Any]


def _numpy_state_to_dict(state: tuple) -> dict[str, Any]:
    _, keys, pos, has_gauss, cached_gaussian = state
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_state_from_dict(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return "MT19937", keys, state["pos"], state["has_gauss"], state["cached_gaussian"]


def _transform_random_states(dataset: Any) -> list[np.random.RandomState]:
    """Every distinct ``Randomizable.R`` reachable from ``dataset``, in a stable depth-first order.

    Follows datasets (``transform``, ``dataset``, ``datasets``...), ``Compose`` chains, nested transforms and lists
    of them; a ``RandomState`` shared by several transforms (MONAI's class-level default) is listed once.
    """
    states: dict[int, np.random.RandomState] = {}
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item)
            return
        if not isinstance(obj, (Transform, torch.utils.data.Dataset)):
            return
        if isinstance(obj, Randomizable):
            states.setdefault(id(obj.R), obj.R)
        for value in vars(obj).values():
            visit(value)

    visit(dataset)
    return list(states.values())


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The data loader's own torch generators (shuffle and worker seeds), the global one excluded."""
    candidates = [
        getattr(loader, "generator", None),
        getattr(getattr(loader, "sampler", None), "generator", None),
        getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None),
    ]
    unique: dict[int, torch.Generator] = {}
    for gen in candidates:
        if isinstance(gen, torch.Generator) and gen is not torch.default_generator:
            unique.setdefault(id(gen), gen)
    return list(unique.values())


def capture_rng_state(loader: Any = None, extra: Any = None) -> RngState:
    """Random state of this process, of ``loader``'s dataset transforms and of the transforms in ``extra`` (e.g.
    the trainer's ``prepare_batch.transform``), as ``weights_only``-safe values."""
    version, internal, gauss = random.getstate()
    state: RngState = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_dict(np.random.get_state()),
        "random": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "transforms": [],
        "generators": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if loader is not None or extra is not None:
        randoms = _transform_random_states([getattr(loader, "dataset", None), extra])
        state["transforms"] = [_numpy_state_to_dict(r.get_state()) for r in randoms]
        state["generators"] = [g.get_state() for g in _loader_generators(loader)] if loader is not None else []
    return state


def restore_rng_state(state: RngState, loader: Any = None, extra: Any = None) -> None:
    """Inverse of :func:`capture_rng_state`; a mismatch in the loader's random objects is logged and skipped."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_dict(state["numpy"]))
    rnd = state["random"]
    random.setstate((rnd["version"], tuple(rnd["state"].tolist()), rnd["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if loader is None and extra is None:
        return
    randoms = _transform_random_states([getattr(loader, "dataset", None), extra])
    generators = _loader_generators(loader) if loader is not None else []
    if len(randoms) != len(state["transforms"]) or len(generators) != len(state["generators"]):
        logger.warning(
            f"Data pipeline changed since the checkpoint ({len(randoms)} random transforms and {len(generators)} "
            f"loader generators now, {len(state['transforms'])} and {len(state['generators'])} saved): "
            "augmentation random states not restored"
        )
        return
    for rs, saved in zip(randoms, state["transforms"], strict=True):
        rs.set_state(_numpy_state_from_dict(saved))
    for gen, saved in zip(generators, state["generators"], strict=True):
        gen.set_state(saved)

"""Ensembles at inference: the weighted mean of several models' sigmoid probabilities, before one threshold and
post-processing (which models, their weights and the ensemble's post-processing: :mod:`pipeline.model.ensemble`).

Each model runs with its own network and window and the run's overlap and TTA; only one output the size of the
input (in-memory inference) or of a block (streaming prediction) is summed into, so an ensemble of N models costs N
times the compute and about one more output buffer, not N.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from monai.inferers import Inferer

from pipeline.inference.blockwise import BlockwiseSlidingWindow, Reader
from pipeline.inference.inferers import make_inferer
from pipeline.model.plans import load_network

__all__ = ["EnsembleInferer", "EnsembleWindow", "fuse", "load_members", "make_ensemble_inferer"]

T = TypeVar("T", torch.Tensor, np.ndarray)


def fuse(outputs: Iterable[T], weights: Sequence[float]) -> T:
    """``sum(w * p)`` over the models' probabilities ``outputs`` (weights summing to 1: their weighted mean).

    ``outputs`` is consumed one at a time (a generator runs one model after the other); each is scaled in place and
    added into the first, so no more than two outputs are held at once.
    """
    total = None
    n = 0
    for out, weight in zip(outputs, weights):
        out *= weight
        if total is None:
            total = out
        else:
            total += out
        n += 1
    if total is None or n != len(weights):
        msg = f"{n} model output(s) for {len(weights)} weight(s)"
        raise ValueError(msg)
    return total


def load_members(plans: Mapping[str, Any], device: torch.device | str = "cpu", skip_first: bool = False) -> list[Any]:
    """The networks of an ensemble's ``members`` (:func:`pipeline.model.ensemble.resolve_ensemble`), weights loaded,
    in eval mode on ``device``; with ``skip_first`` None in the first place (the config's own network, loaded by
    its ``CheckpointLoader``)."""
    nets: list[Any] = []
    for i, member in enumerate(plans["members"]):
        nets.append(None if skip_first and i == 0 else load_network(member["path"], member["plans"]).to(device).eval())
    return nets


class EnsembleInferer(Inferer):
    """The weighted mean of the probabilities of several inferer + network pairs (an ensemble of models, each with its
    own sliding window and mirror TTA).

    Args:
        inferers: one per model, each returning probabilities (:func:`pipeline.inference.inferers.make_inferer`).
        networks: one per model; None runs the network passed to the call (the evaluator's: the first model's).
        weights: one per model, summing to 1.

    Example::

        inferer = EnsembleInferer([make_inferer((64,) * 3), make_inferer((96,) * 3)], [None, other], [0.5, 0.5])
        probs = inferer(image, first)   # 0.5 * first's probabilities + 0.5 * other's
    """

    def __init__(
        self, inferers: Sequence[Inferer], networks: Sequence[torch.nn.Module | None], weights: Sequence[float]
    ) -> None:
        super().__init__()
        if not len(inferers) == len(networks) == len(weights) or not inferers:
            msg = f"{len(inferers)} inferers, {len(networks)} networks and {len(weights)} weights: one of each per model"
            raise ValueError(msg)
        self.inferers = list(inferers)
        self.networks = list(networks)
        self.weights = [float(w) for w in weights]

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The fused probabilities of ``inputs``, shaped and placed as each inferer returns them."""
        runs = zip(self.inferers, self.networks)
        return fuse((inf(inputs, network if net is None else net, *args, **kwargs) for inf, net in runs), self.weights)


def make_ensemble_inferer(plans: Mapping[str, Any], **kwargs: Any) -> Inferer:
    """inference.yaml's inferer: :func:`make_inferer` at ``plans['roi_size']`` for one model; for an ensemble
    (``plans['members']``) an :class:`EnsembleInferer` of one such inferer per model at its own window, the first
    model running the network the evaluator passes (its weights loaded by the config's ``CheckpointLoader``), the
    others loaded here onto ``sw_device``.

    Args:
        plans: ``model_plans`` (:func:`pipeline.model.ensemble.resolve_ensemble`).
        kwargs: :func:`make_inferer`'s other arguments (``sw_batch_size``, ``overlap``, ``tta``, ``tta_axes``,
            ``sw_device``, ``device``, ...).
    """
    if "members" not in plans:
        return make_inferer(roi_size=plans["roi_size"], **kwargs)
    members = plans["members"]
    inferers = [make_inferer(roi_size=m["plans"]["roi_size"], **kwargs) for m in members]
    networks = load_members(plans, kwargs.get("sw_device") or "cpu", skip_first=True)
    return EnsembleInferer(inferers, networks, [m["weight"] for m in members])


class EnsembleWindow:
    """Block-wise probabilities of an ensemble: each model's :class:`BlockwiseSlidingWindow` over the block, fused
    into one float32 buffer of the block (:func:`fuse`); equal, block by block, to :class:`EnsembleInferer` on the
    whole volume.

    Args:
        windows: one per model (its network and window; give each a share of the window-cache budget).
        weights: one per model, summing to 1.
    """

    def __init__(self, windows: Sequence[BlockwiseSlidingWindow], weights: Sequence[float]) -> None:
        if len(windows) != len(weights) or not windows:
            msg = f"{len(windows)} windows and {len(weights)} weights: one of each per model"
            raise ValueError(msg)
        self.windows = list(windows)
        self.weights = [float(w) for w in weights]
        first = self.windows[0]
        self.mode, self.sigma_scale, self.flips = first.mode, first.sigma_scale, first.flips

    @property
    def windows_run(self) -> int:
        return sum(w.windows_run for w in self.windows)

    def predict(
        self, read: Reader, shape: Sequence[int], block: Sequence[slice], mean: float = 0.0, std: float = 1.0
    ) -> np.ndarray:
        """The fused probabilities of ``block``, ``(C, *block)`` float32 (see :meth:`BlockwiseSlidingWindow.predict`)."""
        return fuse((w.predict(read, shape, block, mean, std) for w in self.windows), self.weights)

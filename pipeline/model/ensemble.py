"""Ensembles: several model files whose sigmoid probabilities inference averages, weighted, before one threshold and
one post-processing.

``model_path`` (inference.yaml, evaluate's keys aside; ``python -m pipeline predict``) names one model file, a list of
them, or an ensemble file ``ensemble.json``::

    {
      "models": ["fold0/model.pt", "fold1/model.pt"],   # relative to the ensemble file's folder, or absolute
      "weights": [0.6, 0.4],                            # optional; default: equal weights
      "postprocessing": {"threshold": 0.5, "closing_radius": 1},  # optional; the keys of the plans' post-processing
      "tuning": {...}                                   # optional, informative: how tune chose the post-processing
    }

``python -m pipeline tune`` on an ensemble (or ``--folds``: on the folds' out-of-fold predictions) writes one
(:func:`save_ensemble`).

``model_weights`` (one non-negative weight per model) wins over the file's ``weights``; either is normalised to sum 1.
Each model runs with its own plans (network, window: its training patch unless ``patch_size`` is given, which then
sets every model's window) and the run's overlap and TTA; the fused probability is the weighted mean of the models'.
The ensemble's post-processing: an explicit setting wins, then the ensemble file's ``postprocessing`` (a key it holds,
``null`` included), then the *first* model's plans (what ``tune`` wrote into it), then the configs' defaults.

The models must agree on what their input is and what they predict (:data:`AGREE`: input normalisation, labels):
two that disagree are refused in one line naming both files. A missing model, weights of the wrong count, a negative
weight, or an ensemble file that is not one are refused in one line each (``error: <file or key>: <problem>``, exit 2)
before anything is predicted.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.checks import check_patch_size
from pipeline.model.plans import (
    IGNORE_LABEL,
    LABELS,
    MISSING_HINT,
    NORMALIZATION,
    POSTPROCESSING_KEYS,
    read_plans,
    resolve_plans,
)
from pipeline.utils.errors import MissingFileError, SettingsError

__all__ = ["AGREE", "ENSEMBLE_KEYS", "Ensemble", "first_model", "read_ensemble", "resolve_ensemble", "save_ensemble"]

ENSEMBLE_KEYS = ("models", "weights", "postprocessing", "tuning")
"""The keys of an ensemble file."""
AGREE = {
    "normalization": lambda plans: (plans.get("normalization") or {}).get("method"),
    "labels": lambda plans: plans.get("labels"),
    "ignore_label": lambda plans: plans.get("ignore_label"),
}
"""What the models of an ensemble must share (plans key -> the value compared)."""
_UNPLANNED = {"normalization": dict(NORMALIZATION), "labels": dict(LABELS), "ignore_label": IGNORE_LABEL}


@dataclass(frozen=True)
class Ensemble:
    """The models ``model_path`` names, with their weights.

    Attributes:
        models: the model files, in order (a file may appear twice).
        weights: one per model, non-negative, summing to 1.
        postprocessing: the ensemble file's post-processing keys, or None.
        file: the ensemble file, or None (a model file or a list).
    """

    models: tuple[Path, ...]
    weights: tuple[float, ...]
    postprocessing: dict[str, Any] | None = None
    file: Path | None = None


def _is_ensemble_file(model_path: Any) -> bool:
    return isinstance(model_path, (str, os.PathLike)) and str(model_path).lower().endswith(".json")


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        msg = f"{path}: ensemble file not found; give model files or an existing ensemble.json as model_path"
        raise MissingFileError(msg)
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        msg = f"{path}: not a readable ensemble file ({type(e).__name__}: {str(e).splitlines()[0]})"
        raise SettingsError(msg) from e
    if not isinstance(spec, Mapping):
        msg = f'{path}: an ensemble file is a JSON object {{"models": [...], "weights": [...]}}'
        raise SettingsError(msg)
    unknown = sorted(set(spec) - set(ENSEMBLE_KEYS))
    if unknown:
        msg = f"{path}: unknown key(s) {unknown}; an ensemble file has {list(ENSEMBLE_KEYS)}"
        raise SettingsError(msg)
    models = spec.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        msg = f"{path}: models must be a non-empty list of model file paths (relative to the file, or absolute)"
        raise SettingsError(msg)
    post = spec.get("postprocessing")
    if post is not None:
        bad = sorted(set(post) - set(POSTPROCESSING_KEYS)) if isinstance(post, Mapping) else None
        if bad is None or bad:
            msg = f"{path}: postprocessing must map keys of {list(POSTPROCESSING_KEYS)} to values (unknown: {bad})"
            raise SettingsError(msg)
    return dict(spec)


def _weights(given: Any, models: Sequence[Path], where: str) -> tuple[float, ...]:
    """``given`` normalised to sum 1 (equal weights for None), one per model, each >= 0."""
    if given is None:
        return tuple(1.0 / len(models) for _ in models)
    if isinstance(given, (int, float)):
        given = [given]
    try:
        values = [float(w) for w in given]
    except (TypeError, ValueError):
        msg = f"{where}: {given!r} is not a list of numbers; give one weight per model, e.g. [0.5, 0.5]"
        raise SettingsError(msg) from None
    if len(values) != len(models):
        names = ", ".join(m.name for m in models)
        msg = f"{where}: {len(values)} weight(s) for {len(models)} model(s) ({names}); give one weight per model"
        raise SettingsError(msg)
    for w, m in zip(values, models):
        if not w >= 0:
            what = "negative" if w < 0 else "not a number"
            msg = f"{where}: weight {w} of {m} is {what}; weights are >= 0 (normalised to sum 1)"
            raise SettingsError(msg)
    total = sum(values)
    if not total > 0 or total == float("inf"):
        msg = f"{where}: the weights {values} sum to {total}; give at least one positive, finite weight"
        raise SettingsError(msg)
    return tuple(w / total for w in values)


def read_ensemble(model_path: Any, weights: Sequence[float] | None = None) -> Ensemble:
    """The models that ``model_path`` names and their weights, every model file checked to exist.

    Args:
        model_path: a model file, a list of them, or an ensemble file (``*.json``).
        weights: ``model_weights``: one per model; None takes the ensemble file's, else equal weights.

    Raises:
        MissingFileError: a model file (or the ensemble file) that does not exist; an ensemble file's missing model
            is named with the file.
        SettingsError: an unreadable ensemble file, weights of the wrong count, a negative weight, no positive one.

    Example::

        ens = read_ensemble(["fold0/model.pt", "fold1/model.pt"], [0.25, 0.75])
    """
    file, post, file_weights = None, None, None
    if isinstance(model_path, (list, tuple)):
        if not model_path:
            msg = "model_path: an empty list; give a model file, several, or an ensemble file"
            raise SettingsError(msg)
        models = [Path(m) for m in model_path]
    elif _is_ensemble_file(model_path):
        file = Path(model_path)
        spec = _read_file(file)
        models = [m if m.is_absolute() else file.parent / m for m in map(Path, spec["models"])]
        file_weights, post = spec.get("weights"), spec.get("postprocessing")
        for i, m in enumerate(models):
            if not m.is_file():
                msg = f"{file}: models[{i}] {m} not found; train it, or remove it from the ensemble file"
                raise MissingFileError(msg)
    else:
        models = [Path(model_path)]
    for m in models:
        if not m.is_file():
            msg = f"{m}: not found; {MISSING_HINT}"
            raise MissingFileError(msg)
    if weights is not None:
        w = _weights(weights, models, "model_weights")
    else:
        w = _weights(file_weights, models, f"{file}: weights")
    return Ensemble(tuple(models), w, dict(post) if post is not None else None, file)


def first_model(model_path: Any) -> Path:
    """The first model file ``model_path`` names (inference loads its weights into the config's ``network``)."""
    return read_ensemble(model_path).models[0]


def _check_agreement(models: Sequence[Path]) -> None:
    """Refuse models whose plans disagree on :data:`AGREE`, naming both files (a weights-only file has this
    bundle's normalisation and labels)."""
    seen: dict[str, tuple[Path, Any]] = {}
    for m in models:
        plans = read_plans(m) or _UNPLANNED
        for key, value_of in AGREE.items():
            value = value_of(plans)
            if key not in seen:
                seen[key] = (m, value)
            elif seen[key][1] != value:
                first, there = seen[key]
                msg = (
                    f"{first}, {m}: the models disagree on {key} ({there!r} in the first, {value!r} in the second); "
                    "an ensemble fuses models fed the same input and predicting the same labels"
                )
                raise SettingsError(msg)


def resolve_ensemble(
    model_path: Any,
    weights: Sequence[float] | None = None,
    network: Mapping[str, Any] | None = None,
    patch_size: Sequence[int] | None = None,
    postprocessing: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The plans to run ``model_path`` with: :func:`pipeline.model.plans.resolve_plans`'s for one model file; for an
    ensemble, the first model's plans with the ensemble's post-processing and ``members``.

    Args:
        model_path: a model file, a list of them, or an ensemble file.
        weights: ``model_weights`` (see :func:`read_ensemble`).
        network: explicit network keys; each must equal every model's (see ``resolve_plans``).
        patch_size: the sliding window of every model; None: each model's training patch.
        postprocessing: explicit post-processing keys (they win).
        defaults: the post-processing when neither an explicit value, the ensemble file nor the first model give one.

    Returns:
        For one model file (no ensemble file), exactly ``resolve_plans``'s result. Otherwise the first model's resolved
        plans, ``postprocessing`` the ensemble's, and ``members``: for each model ``{"path", "weight", "plans"}``
        (its own resolved plans: network, ``roi_size``).

    Raises:
        MissingFileError, SettingsError, ModelFileError: as :func:`read_ensemble` and ``resolve_plans``; models whose
            plans disagree on :data:`AGREE` (one line naming both files).
    """
    ens = read_ensemble(model_path, weights)
    if len(ens.models) == 1 and ens.file is None:
        return resolve_plans(ens.models[0], network, patch_size, postprocessing, defaults)
    _check_agreement(ens.models)
    members = [resolve_plans(m, network, patch_size, postprocessing, defaults) for m in ens.models]
    for plans in members:
        check_patch_size(plans["roi_size"], plans["network"]["strides"])
    post = dict(members[0]["postprocessing"])
    for key, value in (ens.postprocessing or {}).items():
        if (postprocessing or {}).get(key) is None:
            post[key] = value
    fused = copy.deepcopy(members[0])
    fused["postprocessing"] = post
    fused["members"] = [{"path": str(m), "weight": w, "plans": p} for m, w, p in zip(ens.models, ens.weights, members)]
    return fused


def save_ensemble(
    path: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    weights: Sequence[float],
    postprocessing: Mapping[str, Any],
    tuning: Mapping[str, Any] | None = None,
) -> Path:
    """Write an ensemble file atomically: the models (relative to its folder when they lie under it, so that the
    folder can be moved or attached elsewhere as a whole; else absolute), their weights, the post-processing (keys
    :data:`POSTPROCESSING_KEYS`) and how it was chosen.

    Returns:
        ``path``.
    """
    from pipeline.utils.files import atomic_write_bytes

    path = Path(path)
    folder = path.parent.resolve()
    names = []
    for m in map(Path, models):
        full = m.resolve()
        names.append(str(full.relative_to(folder)) if full.is_relative_to(folder) else str(full))
    spec: dict[str, Any] = {
        "models": names,
        "weights": [float(w) for w in weights],
        "postprocessing": {k: postprocessing[k] for k in POSTPROCESSING_KEYS},
    }
    if tuning is not None:
        spec["tuning"] = dict(tuning)
    return atomic_write_bytes(path, (json.dumps(spec, indent=2) + "\n").encode())

"""Plans saved with the weights: a model file says how to rebuild, feed and post-process its network.

``model.pt`` (written by :class:`pipeline.training.checkpoint.BestModelSaver`) is a plain state dict, as every model-zoo
bundle's is, that carries its plans in the state dict's own metadata (:func:`pack_model`:
``state_dict._metadata[""]["plans"]``, beside the ``version`` entry ``torch.save``/``torch.load(weights_only=True)``
already round-trip and ``load_state_dict`` reads); every training checkpoint holds
``{"model": state_dict, "plans": plans, ...}``. ``plans`` (nnU-Net's plans, Lightning's hparams) is

- ``network``: :func:`pipeline.model.networks.build_network`'s arguments (``architecture``, ``channels``, ``strides``,
  ``num_res_units``, ``deep_supervision``, ``in_channels``, ``out_channels``);
- ``patch_size``: the training patch, which inference uses as its sliding-window roi;
- ``normalization``: what the network's input must be (``zscore_volume``: each volume minus its mean, divided by
  its standard deviation, both over the whole volume: ``NormalizeWithStatsd`` with the stored statistics in
  training, ``NormalizeIntensityd`` in inference, exact streaming statistics in ``pipeline.inference.predict``);
- ``labels`` and ``ignore_label``: 0 background, 1 papyrus surface, 2 unlabeled (ignored by loss and metrics);
- ``postprocessing``: threshold, hysteresis, closing, hole plugging and minimum component size, ``None`` until
  ``python -m pipeline tune`` writes the setting it chose (``tuning`` then records how it was chosen).

Every value is a plain number, string, list or dict, so the file still loads with ``torch.load(weights_only=True)``.
``model.pt`` loads as it is into the network (``net.load_state_dict(torch.load(...))``), through MONAI's
``CheckpointLoader(load_dict={"model": net})`` (a one-key load_dict absent from the file loads the whole file) and
through ``ckpt_export`` with or without ``--key_in_ckpt model`` (the model zoo's ``ci/verify_bundle.py`` gives none).
Files of bundle 0.2.0-0.3.0 (``{"model": weights, "plans": plans}``) still load everywhere here; ``tune`` rewrites
such a file in the plain layout.

Inference, evaluation, tuning, streaming prediction and export build the network from the file
(:func:`resolve_plans`): a network key left ``null`` takes the file's value, an explicit value must equal it (else
one line naming the file, the key and both values); ``patch_size`` left ``null`` is the training patch, an explicit
one is the sliding window to use (any multiple of the strides' product: the network is fully convolutional); an
explicit post-processing value wins over the plans, which win over the configs' defaults.

Files written before plans existed (bundle 0.1.0: weights only, always a UNet) still load: the network is built
from the settings given, the 0.1.0 defaults where none is given, with a warning; ``tune`` upgrades such a file by
writing plans into it.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.model.networks import (
    CONFIG_KEYS,
    build_network,
    network_settings,
    normalize_settings,
)
from pipeline.utils.errors import MissingFileError, PipelineError, SettingsError

__all__ = [
    "FORMAT",
    "LEGACY_NETWORK",
    "LEGACY_PATCH_SIZE",
    "ModelFileError",
    "POSTPROCESSING_KEYS",
    "build_from_plans",
    "load_model_file",
    "load_network",
    "make_plans",
    "network_difference",
    "pack_model",
    "read_plans",
    "resolve_plans",
    "save_postprocessing",
]

logger = logging.getLogger(__name__)

FORMAT = 1
"""Version of the plans layout; a file with a newer one is refused."""
POSTPROCESSING_KEYS = ("threshold", "hysteresis_low", "hysteresis_high", "closing_radius", "plug_holes", "min_size")
"""The post-processing settings, as :func:`transforms.postprocess.build_postprocessing` takes them."""
NORMALIZATION = {
    "method": "zscore_volume",
    "description": "each volume minus its mean, divided by its standard deviation, both over the whole volume",
}
LABELS = {"0": "background", "1": "papyrus surface", "2": "unlabeled (ignored by loss and metrics)"}
IGNORE_LABEL = 2
OUTPUT = "one channel of logits: sigmoid(logit) is the probability of papyrus surface"
LEGACY_NETWORK = normalize_settings("unet", [16, 32, 64, 128], [2, 2, 2], 2, False)
"""The network every weights-only file (bundle 0.1.0) was trained with, unless its user changed the settings."""
LEGACY_PATCH_SIZE = [64, 64, 64]
MISSING_HINT = "train a model first (run training), or set --model_path"
PLANS_KEY = "plans"
"""Key of the plans in a packed state dict's root metadata, ``state_dict._metadata[""]`` (:func:`pack_model`)."""

_CACHE: dict[tuple[str, int, int], dict[str, Any] | None] = {}
_WARNED: set[str] = set()


class ModelFileError(PipelineError, ValueError):
    """A model file that cannot be read, or whose plans this bundle cannot use."""


def make_plans(
    network: nn.Module | Mapping[str, Any],
    patch_size: Sequence[int],
    postprocessing: Mapping[str, Any] | None = None,
    tuning: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The plans of a model trained with ``network`` on patches of ``patch_size``.

    Args:
        network: a network built by :func:`pipeline.model.networks.build_network`, or its settings.
        patch_size: the training patch (Z, Y, X).
        postprocessing: the chosen post-processing (keys :data:`POSTPROCESSING_KEYS`), or None (not tuned).
        tuning: how ``postprocessing`` was chosen (score, volumes, ...), or None.

    Returns:
        A dict of plain values (``torch.load(weights_only=True)``-safe).

    Example::

        torch.save(pack_model(net.state_dict(), make_plans(net, [64, 64, 64])), "model.pt")
    """
    settings = network if isinstance(network, Mapping) else network_settings(network)
    return {
        "format": FORMAT,
        "network": normalize_settings(**settings),
        "patch_size": _patch(patch_size, "patch_size"),
        "normalization": dict(NORMALIZATION),
        "labels": dict(LABELS),
        "ignore_label": IGNORE_LABEL,
        "output": OUTPUT,
        "postprocessing": {k: postprocessing[k] for k in POSTPROCESSING_KEYS} if postprocessing else None,
        "tuning": dict(tuning) if tuning else None,
    }


def pack_model(state: Mapping[str, torch.Tensor], plans: Mapping[str, Any] | None) -> OrderedDict:
    """A plain state dict (CPU tensors) of ``state`` that carries ``plans``: what ``model.pt`` holds.

    The plans ride in the state dict's metadata (``_metadata[""]["plans"]``), which ``torch.save`` and
    ``torch.load(weights_only=True)`` keep and ``load_state_dict`` ignores beyond ``version``: the file loads as it is
    into the network (``ckpt_export`` without ``key_in_ckpt``, ``CheckpointLoader``) and :func:`load_model_file` reads
    both. A copy that drops the metadata (``dict(state)``) drops the plans.

    Args:
        state: the network's ``state_dict()`` (its per-module metadata, if any, is kept).
        plans: :func:`make_plans`'s result, or None (weights only).

    Example::

        torch.save(pack_model(net.state_dict(), make_plans(net, [64, 64, 64])), "model.pt")
    """
    packed = OrderedDict((k, v.detach().cpu()) for k, v in state.items())
    metadata = OrderedDict(getattr(state, "_metadata", None) or {})
    root = {k: v for k, v in dict(metadata.get("", {})).items() if k != PLANS_KEY}
    if plans is not None:
        root[PLANS_KEY] = copy.deepcopy(dict(plans))
    metadata[""] = root
    packed._metadata = metadata  # type: ignore[attr-defined]
    return packed


def _patch(value: Any, key: str) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        msg = f"{key} {value!r}: expected three sizes (Z, Y, X), e.g. --{key} \"[64, 64, 64]\""
        raise SettingsError(msg)
    return [int(v) for v in value]


def _load(path: Path, mmap: bool, setting: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated archive, not a torch file, a pickle weights_only refuses: name the file
        first = (str(e).strip().splitlines() or [""])[0]
        msg = f"{path}: not a readable model file ({type(e).__name__}: {first}); retrain it or give another --{setting}"
        raise ModelFileError(msg) from e


def _split(obj: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):  # a checkpoint, or model.pt of 0.2.0-0.3.0
        plans = obj.get("plans")
        return obj["model"], (dict(plans) if isinstance(plans, Mapping) else None)
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        plans = (getattr(obj, "_metadata", None) or {}).get("", {}).get(PLANS_KEY)  # pack_model's; none: bundle 0.1.0
        return obj, (dict(plans) if isinstance(plans, Mapping) else None)
    msg = f"{path}: holds neither weights nor {{'model': weights, 'plans': ...}}; give the model.pt training wrote"
    raise ModelFileError(msg)


def _require(path: str | os.PathLike, setting: str = "model_path") -> Path:
    p = Path(path)
    if not p.is_file():
        hint = MISSING_HINT if setting == "model_path" else f"give --{setting} a model.pt or a training checkpoint"
        msg = f"{p}: not found; {hint}"
        raise MissingFileError(msg)
    return p


def load_model_file(
    path: str | os.PathLike, setting: str = "model_path"
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The weights and the plans of a model file (``model.pt`` or a training checkpoint).

    Args:
        path: the file.
        setting: the bundle key that named it, which the error messages tell the user to change.

    Returns:
        ``(state_dict, plans)``; ``plans`` is None for a weights-only file (bundle 0.1.0).

    Raises:
        MissingFileError: no such file (the message says to train a model first).
        ModelFileError: the file cannot be read, or holds something else.
    """
    p = _require(path, setting)
    return _split(_load(p, mmap=False, setting=setting), p)


def read_plans(path: str | os.PathLike, setting: str = "model_path") -> dict[str, Any] | None:
    """The plans of a model file without reading its tensors (memory-mapped); None for a weights-only file.

    Args:
        path: the file (``model.pt`` or a training checkpoint).
        setting: the bundle key that named it (see :func:`load_model_file`).

    Raises:
        MissingFileError: no such file.
        ModelFileError: the file cannot be read, or holds something else.
    """
    p = _require(path, setting)
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _CACHE:
        _CACHE[key] = _split(_load(p, mmap=True, setting=setting), p)[1]
    return copy.deepcopy(_CACHE[key])


def network_difference(saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> str:
    """How the network of the plans ``saved`` (a file's) differs from ``current`` (this run's), for an error message:
    ``"network_channels [4, 8, 16] there, [8, 16, 32] now"``; empty when they agree or either is unknown."""
    there = (saved or {}).get("network")
    now = (current or {}).get("network")
    if there is None or now is None or there == now:
        return ""
    return ", ".join(f"{CONFIG_KEYS.get(k, k)} {there.get(k)!r} there, {now.get(k)!r} now"
                     for k in sorted(set(there) | set(now)) if there.get(k) != now.get(k))


def _check_usable(plans: Mapping[str, Any], path: Path) -> None:
    if int(plans.get("format", 0)) > FORMAT:
        msg = f"{path}: plans format {plans.get('format')} is newer than this bundle's ({FORMAT}); update the bundle"
        raise ModelFileError(msg)
    method = (plans.get("normalization") or {}).get("method")
    if method != NORMALIZATION["method"]:
        msg = f"{path}: the model expects input normalised by {method!r}; this bundle feeds {NORMALIZATION['method']!r}"
        raise ModelFileError(msg)


def resolve_plans(
    model_path: str | os.PathLike,
    network: Mapping[str, Any] | None = None,
    patch_size: Sequence[int] | None = None,
    postprocessing: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The plans to run ``model_path`` with: the file's, with the explicit settings checked or applied.

    Args:
        model_path: the model file.
        network: bundle network keys (``architecture``, ``network_channels``, ``network_strides``,
            ``num_res_units``, ``deep_supervision``) -> value; None means "the file's". An explicit value must
            equal the file's.
        patch_size: the sliding-window roi (``roi_size`` in the result); None means the file's training patch.
        postprocessing: post-processing keys -> value; an explicit value wins, None takes the plans' value (the
            one ``tune`` wrote), else ``defaults``.
        defaults: the post-processing used when neither an explicit value nor the plans give one.

    Returns:
        Complete plans (as :func:`make_plans`), ``postprocessing`` filled in, and ``roi_size``: the sliding window.

    Raises:
        MissingFileError: no model file (the message says to train a model first).
        SettingsError: an explicit network key that differs from the file's, naming the file, the key and both
            values; or a value no network can be built with.
        ModelFileError: an unreadable file, or plans this bundle cannot use.

    Example::

        plans = resolve_plans("bundle/models/model.pt", {"architecture": None}, None, {"threshold": 0.4})
    """
    path = _require(model_path)
    stored = read_plans(path)
    given = {k: v for k, v in (network or {}).items() if v is not None}
    keys = {config_key: arg for arg, config_key in CONFIG_KEYS.items()}
    unknown = sorted(set(given) - set(keys))
    if unknown:
        msg = f"unknown network setting(s) {unknown}; the network keys are {sorted(keys)}"
        raise ValueError(msg)
    if stored is None:
        settings = dict(LEGACY_NETWORK)
        settings.update({keys[k]: v for k, v in given.items()})
        plans = make_plans(settings, LEGACY_PATCH_SIZE if patch_size is None else patch_size)
        if str(path) not in _WARNED:
            _WARNED.add(str(path))
            logger.warning(
                "%s: weights only, no plans (a file from before bundle 0.2.0): building %s from the settings given "
                "(bundle 0.1.0's defaults where none is); `python -m pipeline tune` writes plans into it",
                path, plans["network"],
            )
    else:
        _check_usable(stored, path)
        plans = make_plans(stored["network"], stored["patch_size"], stored.get("postprocessing"), stored.get("tuning"))
        for config_key, value in given.items():
            arg = keys[config_key]
            wanted = normalize_settings(**{**plans["network"], arg: value})[arg]
            if wanted != plans["network"][arg]:
                msg = (
                    f"{path}: {config_key} {wanted!r} given, but the model in this file was trained with {config_key} "
                    f"{plans['network'][arg]!r}; leave --{config_key} out (the file's value is used)"
                )
                raise SettingsError(msg)
    chosen = plans.get("postprocessing") or {}
    post = {}
    for key in POSTPROCESSING_KEYS:
        value = (postprocessing or {}).get(key)
        if value is None:
            source = chosen if chosen else (defaults or {})
            if key not in source:
                msg = f"no value for post-processing key {key!r}: the model file has none and no default is given"
                raise ValueError(msg)
            value = source[key]
        post[key] = value
    plans["postprocessing"] = post
    # the network is fully convolutional: a window other than the training patch (larger ones help, as the winners
    # found) is a choice, not a mismatch; pipeline.data.checks.check_patch_size checks it against the strides
    plans["roi_size"] = plans["patch_size"] if patch_size is None else _patch(patch_size, "patch_size")
    return plans


def build_from_plans(plans: Mapping[str, Any]) -> nn.Module:
    """The (untrained) network of ``plans``; load the file's weights into it."""
    return build_network(**plans["network"])


def load_network(path: str | os.PathLike, plans: Mapping[str, Any]) -> nn.Module:
    """The network of ``plans`` with the weights of the model file ``path`` loaded (on the CPU).

    Raises:
        MissingFileError, ModelFileError: as :func:`load_model_file`; weights that do not fit the network (a
            weights-only file and other settings), naming the file.
    """
    network = build_from_plans(plans)
    state, _ = load_model_file(path)
    try:
        network.load_state_dict(state)
    except Exception as e:  # weights that do not fit the network: shapes or keys, whatever torch raises
        msg = (
            f"{path}: cannot load into the network {plans['network']} ({type(e).__name__}: "
            f"{str(e).splitlines()[0]}); check the network settings"
        )
        raise ModelFileError(msg) from e
    return network


def save_postprocessing(
    model_path: str | os.PathLike,
    setting: Mapping[str, Any],
    tuning: Mapping[str, Any] | None = None,
    plans: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``setting`` into the model file's plans as its post-processing, atomically (weights unchanged).

    Args:
        model_path: the model file.
        setting: the post-processing (keys :data:`POSTPROCESSING_KEYS`).
        tuning: how it was chosen, recorded beside it.
        plans: the plans the model was run with (:func:`resolve_plans`); they become the file's plans when it has
            none (a weights-only file), so that it carries its network from now on.

    Returns:
        The model file.
    """
    from pipeline.utils.files import atomic_save

    state, stored = load_model_file(model_path)
    base = stored if stored is not None else plans
    if base is None:
        msg = f"{model_path}: weights only, and no plans given to write into it"
        raise ValueError(msg)
    new = make_plans(base["network"], base["patch_size"], setting, tuning)
    return atomic_save(pack_model(state, new), model_path)

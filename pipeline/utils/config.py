"""The bundle's configs read from Python, with the command lines' check of the keys a user gives.

MONAI's ``ConfigParser`` adds a key it does not know without a word (``--epoch 3`` would train all the default
epochs), so every reader of the configs refuses such a key with one line naming it, the closest known key and the
config files. ``python -m pipeline``'s argument parsing uses :func:`config_keys` and :func:`unknown_keys_message`
before MONAI is imported; :func:`load_config` is the one loader of the configs from Python (``predict``, ``tune``).

This module imports nothing heavy until :func:`load_config` is called.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.utils.errors import SettingsError, suggest
from pipeline.utils.paths import BUNDLE

if TYPE_CHECKING:
    from monai.bundle import ConfigParser

__all__ = ["CONFIGS", "YAML_LOADER", "config_keys", "load_config", "unknown_keys_message"]

CONFIGS = BUNDLE / "configs"
"""The bundle's configs: ``train.yaml``, ``inference.yaml``, the mixins and ``recipes/``."""
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml, where installed: parses the configs ~10x faster


def config_keys(*configs: str | Path) -> set[str]:
    """Top-level keys of the configs (a mixin's ``+imports`` counts as ``imports``; ``a#b`` as ``a``)."""
    keys: set[str] = set()
    for config in configs:
        with open(config) as f:
            content = yaml.load(f, Loader=YAML_LOADER) or {}
        keys.update(str(k).lstrip("+").split("#", 1)[0] for k in content)
    return keys


def unknown_keys_message(keys: Iterable[str], known: Iterable[str], where: str) -> str | None:
    """One line naming every key whose top-level part is not in ``known``, each with a suggestion; None if none."""
    known = set(known)
    unknown = sorted({k for k in keys if k.split("#", 1)[0] not in known})
    if not unknown:
        return None
    named = ", ".join(f"{k!r}{suggest(k.split('#', 1)[0], known)}" for k in unknown)
    return f"unknown setting(s) {named}: not a key of {where}"


def load_config(*configs: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> ConfigParser:
    """The configs merged in order (as ``--config_file "[a, b]"`` merges them), ``overrides`` applied on top.

    Args:
        configs: names relative to the bundle's ``configs/`` folder (``"train.yaml"``, ``"recipes/kaggle_2xT4.yaml"``),
            or absolute paths.
        overrides: bundle keys and values (``{"dataset_dir": ..., "tta": True}``; ``a#b`` sets a nested key).

    Returns:
        The (unparsed) config.

    Raises:
        SettingsError: an override whose top-level key none of the configs has (one line naming the key, the
            closest known one and the files).

    Example::

        parser = load_config("train.yaml", "evaluate.yaml", overrides={"tta": True})
        evaluator = parser.get_parsed_content("validate#evaluator")
    """
    from monai.bundle import ConfigParser

    paths = [CONFIGS / c for c in configs]  # an absolute path stays as it is
    parser = ConfigParser()
    parser.read_config([str(p) for p in paths])
    overrides = dict(overrides or {})
    message = unknown_keys_message(overrides, parser.get(), " or ".join(p.name for p in paths))
    if message is not None:
        raise SettingsError(message)
    parser.update(overrides)
    return parser

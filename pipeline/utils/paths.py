"""Where the bundle is, found from the packages' own location, so every command works from any directory.

The configs name their files from ``bundle_root`` (``$pipeline.utils.paths.bundle_root()``), never from the working
directory: ``python -m monai.bundle run training --config_file /abs/path/bundle/configs/train.yaml`` reads and
writes the same files from ``/tmp`` as from the repository root. The packages sit next to ``bundle/`` in the
checkout (installed editable by ``pip install -r requirements.txt``), so the bundle folder is found from here;
a bundle folder copied elsewhere is used with ``--bundle_root DIR``.

Also here: reading another config's values by expression (what a ``%file#key`` macro would do, except that a
macro's path is relative to the working directory).

This module imports nothing heavy: ``python -m pipeline --help`` uses it before torch is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["REPO", "BUNDLE", "bundle_root", "repo_root", "config_values"]

REPO = Path(__file__).resolve().parents[2]
"""The checkout holding ``pipeline/``, ``transforms/`` and ``bundle/``."""
BUNDLE = REPO / "bundle"
"""The bundle folder: ``configs/``, ``models/``, ``docs/``."""


def bundle_root() -> str:
    """The bundle folder as an absolute path (``configs/`` inside it holds this project's configs)."""
    return str(BUNDLE)


def repo_root(bundle_root: str | os.PathLike) -> str:
    """The folder above ``bundle_root``: the default home of ``outputs/`` and ``data/`` (git-ignored)."""
    return str(Path(bundle_root).resolve().parent)


def config_values(bundle_root: str | os.PathLike, config: str, keys: Sequence[str]) -> dict[str, Any]:
    """The parsed values of ``keys`` in ``<bundle_root>/configs/<config>`` (expressions evaluated).

    Args:
        bundle_root: the bundle folder.
        config: a config file name in ``configs/``, e.g. ``"inference.yaml"``.
        keys: top-level keys whose values are wanted; each may refer to other keys of the same file.

    Returns:
        ``{key: value}`` in the order of ``keys``.

    Example::

        overlap: "$pipeline.utils.paths.config_values(@bundle_root, 'inference.yaml', ['overlap'])['overlap']"
    """
    from pipeline.utils.config import load_config

    parser = load_config(Path(bundle_root).absolute() / "configs" / config, overrides={"bundle_root": str(bundle_root)})
    return {key: parser.get_parsed_content(key) for key in keys}

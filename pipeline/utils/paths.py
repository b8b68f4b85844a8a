"""Where the bundle is, found from the packages' own location, so every command works from any directory.

The configs name their files from ``bundle_root`` (``$pipeline.utils.paths.bundle_root()``), never from the working
directory: ``python -m monai.bundle run training --config_file /abs/path/bundle/configs/train.yaml`` reads and
writes the same files from ``/tmp`` as from the repository root. Two layouts carry the bundle:

- a checkout (also installed editable, as ``pip install -r requirements.txt`` does): ``bundle/`` next to
  ``pipeline/``;
- an installed wheel (``pip install vesuvius-bundle``): the same files inside the package, ``pipeline/bundle/``
  (``python -m pipeline configs`` prints its ``configs/`` folder).

Outputs (``outputs/``, ``data/synthetic``, the checkpoints) go beside a bundle that is a writable folder of its own
(the checkout: ``outputs/``, ``data/``, ``bundle/models``), else under the working directory (the installed copy,
or a read-only checkout such as one under ``/kaggle/input``: ``./outputs``, ``./data``, ``./models``); inference
still finds a read-only checkout's own ``bundle/models/model.pt`` (``model_file``). A bundle
folder copied elsewhere is used with ``--bundle_root DIR``.

Also here: reading another config's values by expression (what a ``%file#key`` macro would do, except that a
macro's path is relative to the working directory).

This module imports nothing heavy: ``python -m pipeline --help`` uses it before torch is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BUNDLE",
    "INSTALLED_BUNDLE",
    "PACKAGES_DIR",
    "bundle_root",
    "config_values",
    "model_file",
    "models_dir",
    "output_root",
]

PACKAGES_DIR = Path(__file__).resolve().parents[2]
"""The folder holding the ``pipeline`` and ``transforms`` packages: the checkout, or ``site-packages``."""
INSTALLED_BUNDLE = PACKAGES_DIR / "pipeline" / "bundle"
"""Where a wheel installs the bundle (the package data ``pipeline/bundle``; absent in a checkout)."""
BUNDLE = INSTALLED_BUNDLE if (INSTALLED_BUNDLE / "configs").is_dir() else PACKAGES_DIR / "bundle"
"""The bundle folder: ``configs/`` (with ``recipes/``), ``docs/``, ``eval/``; ``models/`` in a checkout."""


def bundle_root() -> str:
    """The bundle folder as an absolute path (``configs/`` inside it holds this project's configs)."""
    return str(BUNDLE)


def _writable_checkout(bundle: Path) -> bool:
    """Whether outputs may go beside ``bundle``: a folder of its own (not the installed copy), it and its parent
    writable."""
    return bundle != INSTALLED_BUNDLE and os.access(bundle, os.W_OK) and os.access(bundle.parent, os.W_OK)


def output_root(bundle_root: str | os.PathLike) -> str:
    """The default home of ``outputs/`` and ``data/``: the folder above ``bundle_root`` when the bundle is a writable
    checkout, else the working directory."""
    bundle = Path(bundle_root).resolve()
    return str(bundle.parent if _writable_checkout(bundle) else Path.cwd())


def models_dir(bundle_root: str | os.PathLike) -> str:
    """The default ``ckpt_dir``: ``<bundle_root>/models`` when the bundle is a writable checkout, else
    ``./models`` under the working directory."""
    bundle = Path(bundle_root).resolve()
    return str((bundle if _writable_checkout(bundle) else Path.cwd()) / "models")


def model_file(ckpt_dir: str | os.PathLike, bundle_root: str | os.PathLike) -> str:
    """The default ``model_path`` of inference and evaluation: ``<ckpt_dir>/model.pt``, except that a read-only
    checkout's own trained model (``<bundle_root>/models/model.pt``, e.g. a repository uploaded to ``/kaggle/input``
    with its model) is used while ``ckpt_dir`` is the default (``./models``) and holds none."""
    path = Path(ckpt_dir) / "model.pt"
    shipped = Path(bundle_root).resolve() / "models" / "model.pt"
    if not path.is_file() and Path(ckpt_dir).resolve() == Path(models_dir(bundle_root)) and shipped.is_file():
        return str(shipped)
    return str(path)


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

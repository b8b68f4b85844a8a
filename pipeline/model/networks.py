"""The network, chosen by one key: ``architecture: unet | dynunet | segresnet``, built from the bundle's network keys.

- ``unet``: MONAI's ``UNet`` (``channels``, ``strides``, ``num_res_units`` residual units per block).
- ``dynunet``: MONAI's ``DynUNet``, nnU-Net's architecture: one level per entry of ``channels`` (its filters), the
  first level at stride 1 and each further one at the matching entry of ``strides`` (also the transposed-convolution
  kernels), 3x3x3 kernels, instance norm, leaky ReLU; residual blocks (nnU-Net ResEnc-style) when
  ``num_res_units > 0``. With ``deep_supervision`` the training forward also returns the decoder's lower-resolution
  outputs, one per level down to the second lowest (what nnU-Net supervises), upsampled to full size and stacked on
  dim 1: ``(B, 1 + len(channels) - 2, C, Z, Y, X)``; :class:`pipeline.training.losses.DeepSupervisionLoss` weights them. In
  eval mode (validation, inference, export) it returns the main output only.
- ``segresnet``: MONAI's ``SegResNet`` (``init_filters = channels[0]``, doubling at each of the ``len(channels)``
  levels, blocks per level 1, 2, 2, 4, 4, ...; group norm), which down-samples by 2 only.

:func:`build_network` records the settings it was called with (:func:`network_settings`), which
:func:`pipeline.model.plans.make_plans` saves with the weights, so that a model file rebuilds its own network.

Settings that cannot build a network raise :class:`pipeline.utils.errors.SettingsError` naming the bundle key.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets import DynUNet, SegResNet, UNet
from monai.networks.nets.dynunet import DynUNetSkipLayer
from torch import nn

from pipeline.utils.errors import SettingsError, suggest

__all__ = ["ARCHITECTURES", "CONFIG_KEYS", "build_network", "network_settings", "normalize_settings"]

ARCHITECTURES = ("unet", "dynunet", "segresnet")
CONFIG_KEYS = {
    "architecture": "architecture",
    "channels": "network_channels",
    "strides": "network_strides",
    "num_res_units": "num_res_units",
    "deep_supervision": "deep_supervision",
}
""":func:`build_network` argument -> the bundle key users set it with (named in error messages)."""

_SETTINGS: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


def _int_list(value: Any, key: str) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        msg = f"{key} {value!r}: expected a non-empty list of positive integers, e.g. --{key} \"[16, 32, 64, 128]\""
        raise SettingsError(msg)
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            msg = f"{key} {list(value)!r}: every entry must be a positive integer"
            raise SettingsError(msg)
        out.append(int(v))
    return out


def normalize_settings(
    architecture: str = "unet",
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    num_res_units: int = 2,
    deep_supervision: bool = True,
    in_channels: int = 1,
    out_channels: int = 1,
) -> dict[str, Any]:
    """The settings as plain, checked values (the form saved in a model file's plans).

    Raises:
        SettingsError: an unknown architecture or settings it cannot be built with; the message names the key.
    """
    arch = str(architecture).lower() if isinstance(architecture, str) else architecture
    if arch not in ARCHITECTURES:
        msg = f"architecture {architecture!r} unknown{suggest(str(architecture), ARCHITECTURES)}; use one of {', '.join(ARCHITECTURES)}"
        raise SettingsError(msg)
    channels = _int_list(channels, "network_channels")
    strides = _int_list(strides, "network_strides")
    if isinstance(num_res_units, bool) or not isinstance(num_res_units, int) or num_res_units < 0:
        msg = f"num_res_units {num_res_units!r}: expected an integer >= 0"
        raise SettingsError(msg)
    if not isinstance(deep_supervision, bool):
        msg = f"deep_supervision {deep_supervision!r}: expected true or false"
        raise SettingsError(msg)
    levels = 3 if arch == "dynunet" else 2
    if len(channels) < levels:
        msg = f"network_channels {channels}: {arch} needs at least {levels} levels, e.g. --network_channels \"[16, 32, 64, 128]\""
        raise SettingsError(msg)
    if len(strides) != len(channels) - 1:
        example = [2] * (len(channels) - 1)
        msg = (
            f"network_strides {strides}: {arch} takes one stride per level below the first, {len(channels) - 1} for "
            f"network_channels {channels}; use e.g. --network_strides \"{example}\""
        )
        raise SettingsError(msg)
    if arch == "segresnet":
        doubling = [channels[0] * 2**i for i in range(len(channels))]
        if channels != doubling:
            msg = f"network_channels {channels}: segresnet doubles its filters at every level; use e.g. --network_channels \"{doubling}\""
            raise SettingsError(msg)
        if any(s != 2 for s in strides):
            msg = f"network_strides {strides}: segresnet down-samples by 2 at every level; use --network_strides \"{[2] * len(strides)}\""
            raise SettingsError(msg)
    return {
        "architecture": arch,
        "channels": channels,
        "strides": strides,
        "num_res_units": int(num_res_units),
        "deep_supervision": bool(deep_supervision) and arch == "dynunet",  # the others have no heads
        "in_channels": int(in_channels),
        "out_channels": int(out_channels),
    }


def build_network(
    architecture: str = "unet",
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[int] = (2, 2, 2),
    num_res_units: int = 2,
    deep_supervision: bool = True,
    in_channels: int = 1,
    out_channels: int = 1,
) -> nn.Module:
    """The 3D network named by ``architecture``, from the bundle's network keys.

    Args:
        architecture: ``unet``, ``dynunet`` or ``segresnet`` (bundle key ``architecture``).
        channels: filters per level, full resolution first (``network_channels``).
        strides: down-sampling of each level below the first (``network_strides``); their product is the total
            stride that patch sizes must be a multiple of.
        num_res_units: ``unet``: residual units per block; ``dynunet``: 0 = plain blocks, otherwise residual
            blocks; ``segresnet``: unused.
        deep_supervision: ``dynunet`` only: also return the decoder's lower-resolution heads in training mode.
        in_channels: input channels (1: CT intensity).
        out_channels: output channels (1: surface logits).

    Returns:
        The network (train mode, on the CPU); :func:`network_settings` gives back its settings.

    Raises:
        SettingsError: an unknown architecture or inconsistent settings, naming the key.

    Example::

        net = build_network("dynunet", channels=[32, 64, 128, 256], strides=[2, 2, 2])
    """
    s = normalize_settings(architecture, channels, strides, num_res_units, deep_supervision, in_channels, out_channels)
    arch, ch, st = s["architecture"], s["channels"], s["strides"]
    if arch == "unet":
        net: nn.Module = UNet(3, s["in_channels"], s["out_channels"], channels=ch, strides=st,
                              num_res_units=s["num_res_units"])
    elif arch == "dynunet":
        levels = len(ch)  # >= 3, checked
        net = _dynunet(
            3, s["in_channels"], s["out_channels"], kernel_size=[3] * levels, strides=[1, *st], upsample_kernel_size=st,
            filters=ch, res_block=s["num_res_units"] > 0, deep_supervision=s["deep_supervision"],
            deep_supr_num=levels - 2,  # heads down to the second-lowest level, as nnU-Net's decoder outputs
        )
    else:
        levels = len(ch)
        blocks_down = tuple(min(4, 2 ** ((i + 1) // 2)) for i in range(levels))  # 1, 2, 2, 4, 4, ... as MONAI's
        net = SegResNet(
            spatial_dims=3, init_filters=ch[0], in_channels=s["in_channels"], out_channels=s["out_channels"],
            blocks_down=blocks_down, blocks_up=(1,) * (levels - 1),
            norm=("GROUP", {"num_groups": math.gcd(8, ch[0])}),  # every level's filters are multiples of ch[0]
        )
    _SETTINGS[net] = s
    return net


def network_settings(network: nn.Module) -> dict[str, Any]:
    """The settings :func:`build_network` built ``network`` with (a DDP/DataParallel wrapper is unwrapped).

    Raises:
        ValueError: ``network`` was not built by :func:`build_network`.
    """
    while isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        network = network.module
    settings = _SETTINGS.get(network)
    if settings is None:
        msg = f"{type(network).__name__} was not built by pipeline.model.networks.build_network: its settings are unknown"
        raise ValueError(msg)
    return {k: list(v) if isinstance(v, list) else v for k, v in settings.items()}


class _ScriptableSkipLayer(DynUNetSkipLayer):
    """MONAI 1.6.1's ``DynUNetSkipLayer`` with a forward TorchScript compiles.

    Its forward assigns into ``self.heads`` after checking ``self.heads is not None``; TorchScript does not refine
    an Optional attribute, so ``torch.jit.script`` (the zoo's ``ckpt_export``) fails on a DynUNet with deep
    supervision. This forward reads the attributes into locals first: the same computation and the same state dict.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        downout = self.downsample(x)
        nextout = self.next_layer(downout)
        upout = self.upsample(nextout, downout)
        heads = self.heads
        super_head = self.super_head
        if super_head is not None and heads is not None and self.index > 0:
            heads[self.index - 1] = super_head(upout)
        return upout


def _dynunet(*args: Any, **kwargs: Any) -> DynUNet:
    """``DynUNet(*args, **kwargs)`` whose skip layers script (see :class:`_ScriptableSkipLayer`)."""
    net = DynUNet(*args, **kwargs)
    for module in net.modules():
        if type(module) is DynUNetSkipLayer:
            module.__class__ = _ScriptableSkipLayer
    return net

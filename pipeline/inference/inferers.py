"""Mirror test-time augmentation around any MONAI inferer, and the factory the inference config calls."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SlidingWindowInferer

__all__ = ["MirrorTTAInferer", "make_inferer"]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "softmax": lambda logits: torch.softmax(logits, dim=1),
}


class MirrorTTAInferer(Inferer):
    """Average an inferer's probabilities over mirrored copies of the input (nnU-Net style mirror TTA).

    For every subset of ``flip_axes`` (the empty subset included, so ``2 ** len(flip_axes)`` runs), the input is
    flipped along those spatial axes, passed to ``inferer``, the output flipped back and turned into
    probabilities by ``activation``; the result is the mean of these probabilities. Averaging probabilities
    rather than logits keeps one confident run from outvoting the others. With ``flip_axes`` ``None`` or empty
    the wrapped inferer runs once and only ``activation`` is applied, so the output means the same with TTA on
    or off.

    Args:
        inferer: the inferer to wrap, e.g. :class:`monai.inferers.SlidingWindowInferer`.
        flip_axes: spatial axes to mirror (0 is the first spatial axis, i.e. tensor dim 2).
        activation: ``"sigmoid"``, ``"softmax"`` (over the channel dim), a callable on the output tensor, or
            ``None`` to average the raw outputs.

    Raises:
        ValueError: when ``flip_axes`` holds a repeated or negative axis, or ``activation`` is an unknown name.

    Example::

        from monai.inferers import SlidingWindowInferer
        from pipeline.inference.inferers import MirrorTTAInferer

        inferer = MirrorTTAInferer(SlidingWindowInferer(roi_size=(128, 128, 128), overlap=0.5, mode="gaussian"))
        with torch.no_grad():
            probs = inferer(image, network)  # (B, 1, Z, Y, X), mean sigmoid over 8 mirrored runs
    """

    def __init__(
        self,
        inferer: Inferer,
        flip_axes: Sequence[int] | None = (0, 1, 2),
        activation: str | Callable[[torch.Tensor], torch.Tensor] | None = "sigmoid",
    ) -> None:
        super().__init__()
        axes = tuple(flip_axes or ())
        if len(set(axes)) != len(axes) or any(axis < 0 for axis in axes):
            msg = f"flip_axes must be distinct non-negative spatial axes, got {flip_axes}."
            raise ValueError(msg)
        if isinstance(activation, str) and activation not in _ACTIVATIONS:
            msg = f"unknown activation {activation!r}; use one of {sorted(_ACTIVATIONS)}, a callable or None."
            raise ValueError(msg)
        self.inferer = inferer
        self.flip_axes = axes
        self.activation = _ACTIVATIONS[activation] if isinstance(activation, str) else activation
        self.flips = [combo for size in range(len(axes) + 1) for combo in itertools.combinations(axes, size)]

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Run the wrapped inferer on every mirrored copy of ``inputs`` and average.

        Args:
            inputs: batch shaped ``(B, C, *spatial)``.
            network: the model, passed on to the wrapped inferer.
            args: passed on to the wrapped inferer.
            kwargs: passed on to the wrapped inferer.

        Returns:
            The mean (activated) output, shaped and placed as the wrapped inferer returns it.

        Raises:
            ValueError: when a flip axis does not exist in ``inputs``.
            TypeError: when the wrapped inferer returns something other than a tensor.
        """
        n_spatial = inputs.ndim - 2
        if any(axis >= n_spatial for axis in self.flip_axes):
            msg = f"flip_axes {self.flip_axes} out of range for {n_spatial} spatial dims (input {tuple(inputs.shape)})."
            raise ValueError(msg)
        total: torch.Tensor | None = None
        for combo in self.flips:
            dims = [axis + 2 for axis in combo]
            output = self.inferer(torch.flip(inputs, dims) if dims else inputs, network, *args, **kwargs)
            if not isinstance(output, torch.Tensor):
                msg = f"MirrorTTAInferer needs the wrapped inferer to return a tensor, got {type(output).__name__}."
                raise TypeError(msg)
            if self.activation is not None:
                output = self.activation(output)
            if dims:
                output = torch.flip(output, dims)
            # Sum in at least float32: eight fp16 probabilities would lose precision.
            if total is None:
                total = output.to(torch.promote_types(output.dtype, torch.float32), copy=True)
            else:
                total += output
        return total.div_(len(self.flips))


def make_inferer(
    roi_size: Sequence[int] | int,
    sw_batch_size: int = 1,
    overlap: float = 0.5,
    mode: str = "gaussian",
    tta: bool = False,
    tta_axes: Sequence[int] = (0, 1, 2),
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    activation: str | Callable[[torch.Tensor], torch.Tensor] | None = "sigmoid",
) -> MirrorTTAInferer:
    """Build the sliding-window inferer, with or without mirror TTA, that outputs probabilities.

    The result is always a :class:`MirrorTTAInferer` (with no flips when ``tta`` is off) so that its output is
    activated the same way either way and the post-processing can take it as probabilities.

    Args:
        roi_size: sliding-window patch size (Z, Y, X); may exceed the network's training patch.
        sw_batch_size: patches per forward pass.
        overlap: fraction of overlap between neighbouring windows.
        mode: window blending, ``"gaussian"`` or ``"constant"``.
        tta: mirror the input along ``tta_axes`` (``2 ** len(tta_axes)`` runs).
        tta_axes: spatial axes mirrored when ``tta`` is on.
        sw_device: device the windows run on (e.g. ``"cuda"``); defaults to the input's.
        device: device the stitched full-volume output lives on (``"cpu"`` saves GPU memory); defaults to the
            input's.
        progress: show a tqdm bar per sliding-window run.
        activation: see :class:`MirrorTTAInferer`; ``None`` returns averaged logits.

    Returns:
        The inferer.

    Example::

        inferer = make_inferer(roi_size=(160, 160, 160), sw_batch_size=2, overlap=0.5, tta=True)
        probs = inferer(image, network)
    """
    window = SlidingWindowInferer(
        roi_size=roi_size,
        sw_batch_size=sw_batch_size,
        overlap=overlap,
        mode=mode,
        sw_device=sw_device,
        device=device,
        progress=progress,
    )
    return MirrorTTAInferer(window, flip_axes=tta_axes if tta else None, activation=activation)

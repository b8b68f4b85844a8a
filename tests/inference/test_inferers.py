"""Tests for pipeline.inference.inferers: mirror TTA around sliding-window inference."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer

from pipeline.inference.inferers import MirrorTTAInferer, make_inferer


class _CountingInferer(SimpleInferer):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return super().__call__(inputs, network, *args, **kwargs)


def _symmetric_conv() -> torch.nn.Conv3d:
    """3x3x3 conv whose kernel is invariant under every axis flip."""
    conv = torch.nn.Conv3d(1, 1, 3, padding=1)
    grid = torch.stack(torch.meshgrid(*[torch.arange(-1.0, 2.0)] * 3, indexing="ij"))
    with torch.no_grad():
        conv.weight.copy_(torch.exp(-(grid**2).sum(0))[None, None])
        conv.bias.fill_(-1.0)
    return conv.eval()


def _random_conv() -> torch.nn.Conv3d:
    torch.manual_seed(0)
    return torch.nn.Conv3d(1, 1, 3, padding=1).eval()


def _pointwise() -> torch.nn.Conv3d:
    torch.manual_seed(1)
    return torch.nn.Conv3d(1, 1, 1).eval()


def _image(shape: tuple[int, ...] = (1, 1, 21, 30, 17)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def test_flip_invariant_model_gives_same_output_with_and_without_tta() -> None:
    image = _image((1, 1, 12, 14, 10))
    window = SlidingWindowInferer(roi_size=(12, 14, 10), sw_batch_size=1, overlap=0.5, mode="gaussian")
    plain = MirrorTTAInferer(window, flip_axes=None)(image, _symmetric_conv())
    tta = MirrorTTAInferer(window, flip_axes=(0, 1, 2))(image, _symmetric_conv())
    torch.testing.assert_close(tta, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, torch.sigmoid(_symmetric_conv()(image)), atol=1e-5, rtol=0)


@torch.no_grad()
def test_pointwise_model_invariant_under_sliding_window_tta_on_odd_shape() -> None:
    image = _image()
    plain = make_inferer(roi_size=(16, 16, 16), sw_batch_size=2, overlap=0.5)(image, _pointwise())
    tta = make_inferer(roi_size=(16, 16, 16), sw_batch_size=2, overlap=0.5, tta=True)(image, _pointwise())
    assert plain.shape == tta.shape == image.shape
    torch.testing.assert_close(tta, plain, atol=1e-5, rtol=0)
    assert 0.0 <= float(tta.min()) and float(tta.max()) <= 1.0


@torch.no_grad()
def test_non_invariant_model_output_changes_and_is_mean_of_flipped_runs() -> None:
    image = _image((1, 1, 8, 9, 10))
    network = _random_conv()
    plain = MirrorTTAInferer(SimpleInferer(), flip_axes=None)(image, network)
    tta = MirrorTTAInferer(SimpleInferer(), flip_axes=(2,))(image, network)
    assert (tta - plain).abs().max() > 1e-3
    flipped = torch.flip(torch.sigmoid(network(torch.flip(image, [4]))), [4])
    torch.testing.assert_close(tta, (plain + flipped) / 2, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("flip_axes", "expected"), [((0, 1, 2), 8), ((0, 2), 4), ((1,), 2), ([], 1), (None, 1)])
@torch.no_grad()
def test_wrapped_inferer_runs_once_per_flip_combination(flip_axes: Any, expected: int) -> None:
    counting = _CountingInferer()
    MirrorTTAInferer(counting, flip_axes=flip_axes)(_image((1, 1, 5, 6, 7)), _pointwise())
    assert counting.calls == expected


@torch.no_grad()
def test_sliding_window_tta_keeps_odd_non_cubic_shape() -> None:
    image = _image()
    inferer = make_inferer(roi_size=16, sw_batch_size=4, overlap=0.25, tta=True, tta_axes=(0, 1, 2))
    output = inferer(image, _random_conv())
    assert isinstance(inferer, MirrorTTAInferer)
    assert isinstance(inferer.inferer, SlidingWindowInferer)
    assert len(inferer.flips) == 8
    assert output.shape == (1, 1, 21, 30, 17)
    assert output.dtype == torch.float32


@torch.no_grad()
def test_activation_options() -> None:
    image = _image((1, 1, 6, 6, 6))
    network = _pointwise()
    raw = MirrorTTAInferer(SimpleInferer(), flip_axes=(0,), activation=None)(image, network)
    torch.testing.assert_close(raw, network(image), atol=1e-6, rtol=0)
    two_channel = torch.nn.Conv3d(1, 2, 1).eval()
    probs = MirrorTTAInferer(SimpleInferer(), flip_axes=(1,), activation="softmax")(image, two_channel)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 6, 6, 6))
    doubled = MirrorTTAInferer(SimpleInferer(), flip_axes=None, activation=lambda x: 2 * x)(image, network)
    torch.testing.assert_close(doubled, 2 * network(image))


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match=r"\(0, 0\)"):
        MirrorTTAInferer(SimpleInferer(), flip_axes=(0, 0))
    with pytest.raises(ValueError, match="relu"):
        MirrorTTAInferer(SimpleInferer(), activation="relu")
    with pytest.raises(ValueError, match="out of range"):
        MirrorTTAInferer(SimpleInferer(), flip_axes=(2,))(torch.zeros(1, 1, 4, 4), torch.nn.Identity())


class _TupleInferer(Inferer):
    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return (network(inputs),)


def test_non_tensor_output_raises() -> None:
    with pytest.raises(TypeError, match="tuple"):
        MirrorTTAInferer(_TupleInferer(), flip_axes=None)(torch.zeros(1, 1, 4, 4, 4), torch.nn.Identity())

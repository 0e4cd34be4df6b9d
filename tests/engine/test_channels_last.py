"""NHWC memory format (train.channels_last): the same loss and gradients as NCHW, for every method."""

import pytest
import torch

from soco.registry import method_names
from tests.engine import assert_same_gradients, configs_with_and_without, loss_and_gradients


@pytest.mark.slow
@pytest.mark.parametrize("name", method_names())
def test_channels_last_gives_the_same_loss_and_gradients(name, tiny_data):
    nchw, nhwc, batch = configs_with_and_without(name, "train.channels_last", tiny_data)

    # float64: the layouts compute the same mathematics, so they agree to rounding of 1e-16
    _, loss_a, grads_a = loss_and_gradients(nchw, batch, torch.float64)
    method_b, loss_b, grads_b = loss_and_gradients(nhwc, batch, torch.float64)
    convolutions = [p for p in method_b.parameters() if p.ndim == 4]
    assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=1e-12)
    assert_same_gradients(grads_b, grads_a, atol=1e-9)

    # float32, as trained: the loss agrees to float32 rounding (NHWC kernels sum in another order)
    _, loss_a32, _ = loss_and_gradients(nchw, batch, torch.float32)
    _, loss_b32, _ = loss_and_gradients(nhwc, batch, torch.float32)
    torch.testing.assert_close(loss_b32, loss_a32, rtol=1e-5, atol=1e-6)

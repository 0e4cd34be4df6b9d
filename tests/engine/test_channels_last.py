"""NHWC memory format (train.channels_last): the same loss and gradients as NCHW, for every method."""

import pytest
import torch

from soco.config.loading import load_config
from soco.data.collate import map_tensors, to_channels_last
from soco.engine.bench import bench_dataset, first_batch
from soco.engine.distributed import DistributedContext
from soco.engine.trainer import build_model
from soco.registry import method_class, method_names


def to_dtype(batch, dtype):
    """The batch with its floating tensors in `dtype`."""
    return map_tensors(batch, lambda tensor: tensor.to(dtype) if tensor.is_floating_point() else tensor)


def loss_and_gradients(config, batch, dtype):
    """One training step's loss and every parameter's gradient, from the seed's initial weights."""
    torch.manual_seed(config.train.seed)
    method = build_model(config, DistributedContext()).to(dtype)
    method.train()
    batch = to_dtype(batch, dtype)
    if config.train.channels_last:
        batch = to_channels_last(batch)
    loss = method.training_step(batch)["loss"]
    loss.backward()
    return method, loss.detach(), {name: p.grad for name, p in method.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", method_names())
def test_channels_last_gives_the_same_loss_and_gradients(name, tiny_data):
    images, store = tiny_data
    preset = method_class(name).tiny_preset
    common = ["train.device=cpu", "train.precision=fp32", "train.batch_size=4"]
    nchw = load_config(preset, [*common, "train.channels_last=false"])
    nhwc = load_config(preset, [*common, "train.channels_last=true"])
    uses = method_class(name).uses_proposals(nchw.method)
    batch = first_batch(bench_dataset(nchw, images, store if uses else None), 4)

    # float64: the layouts compute the same mathematics, so they agree to rounding of 1e-16
    _, loss_a, grads_a = loss_and_gradients(nchw, batch, torch.float64)
    method_b, loss_b, grads_b = loss_and_gradients(nhwc, batch, torch.float64)
    convolutions = [p for p in method_b.parameters() if p.ndim == 4]
    assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=1e-12)
    assert grads_a.keys() == grads_b.keys()
    # a gradient that is zero in exact arithmetic (a bias before BN) is rounding noise: compare it on the
    # scale of the largest gradient instead of its own
    largest = max(float(g.abs().max()) for g in grads_a.values())
    for key in grads_a:
        scale = grads_a[key].abs().max().clamp(min=1e-6 * largest)
        torch.testing.assert_close(grads_b[key] / scale, grads_a[key] / scale, rtol=0, atol=1e-9, msg=key)

    # float32, as trained: the loss agrees to float32 rounding (NHWC kernels sum in another order)
    _, loss_a32, _ = loss_and_gradients(nchw, batch, torch.float32)
    _, loss_b32, _ = loss_and_gradients(nhwc, batch, torch.float32)
    torch.testing.assert_close(loss_b32, loss_a32, rtol=1e-5, atol=1e-6)

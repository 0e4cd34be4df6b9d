"""Helpers shared by the engine tests: one training step's loss and gradients, and comparing gradients."""

import torch

from soco.config.loading import load_config
from soco.data.collate import map_tensors, to_channels_last
from soco.engine.bench import bench_dataset, first_batch
from soco.engine.distributed import DistributedContext
from soco.engine.trainer import build_model
from soco.registry import method_class


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


def assert_same_gradients(actual: dict, expected: dict, atol: float) -> None:
    """Every gradient equal to `atol` on its own scale; a gradient that is zero in exact arithmetic (a bias before
    BN) is rounding noise, so it is compared on the scale of the largest gradient instead of its own."""
    assert actual.keys() == expected.keys()
    largest = max(float(g.abs().max()) for g in expected.values())
    for key in expected:
        scale = expected[key].abs().max().clamp(min=1e-6 * largest)
        torch.testing.assert_close(actual[key] / scale, expected[key] / scale, rtol=0, atol=atol, msg=key)


def configs_with_and_without(name, switch, tiny_data):
    """(config with `switch`=false, config with it true, a first batch of 4) of a method's tiny preset in fp32 on the
    CPU: the two sides of a speed change that must leave the loss and gradients unchanged."""
    images, store = tiny_data
    preset = method_class(name).tiny_preset
    common = ["train.device=cpu", "train.precision=fp32", "train.batch_size=4"]
    off = load_config(preset, [*common, f"{switch}=false"])
    on = load_config(preset, [*common, f"{switch}=true"])
    uses = method_class(name).uses_proposals(off.method)
    return off, on, first_batch(bench_dataset(off, images, store if uses else None), 4)

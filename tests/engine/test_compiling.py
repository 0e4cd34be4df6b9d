"""train.compile: torch.compile of the backbones leaves the loss, the gradients and the weights' names unchanged."""

import pytest
import torch

from soco.config.loading import load_config
from soco.data.collate import map_tensors
from soco.engine.bench import bench_dataset, first_batch
from soco.engine.distributed import DistributedContext
from soco.engine.trainer import build_model
from soco.registry import method_class

pytestmark = pytest.mark.usefixtures("one_thread")


def loss_and_gradients(config, batch):
    """One training step's loss and every parameter's gradient in float64, from the seed's initial weights."""
    torch.manual_seed(config.train.seed)
    method = build_model(config, DistributedContext()).to(torch.float64)
    method.train()
    batch = map_tensors(batch, lambda tensor: tensor.double() if tensor.is_floating_point() else tensor)
    loss = method.training_step(batch)["loss"]
    loss.backward()
    return method, loss.detach(), {name: p.grad for name, p in method.named_parameters() if p.grad is not None}


# one method per backbone class: ResNet + FPN (SoCo), a truncated ResNet (SCRL), the four stages (DetCo)
@pytest.mark.parametrize("name, compiled_modules", [
    ("soco", ["online.backbone", "target.backbone"]),
    ("scrl", ["online.backbone", "target.backbone"]),
    ("detco", ["online.backbone", "target.backbone"]),
])
def test_compiled_backbones_give_the_same_loss_and_gradients(name, compiled_modules, tiny_data):
    images, store = tiny_data
    preset = method_class(name).tiny_preset
    common = ["train.device=cpu", "train.precision=fp32", "train.batch_size=4"]
    eager = load_config(preset, [*common, "train.compile=false"])
    compiled = load_config(preset, [*common, "train.compile=true"])
    uses = method_class(name).uses_proposals(eager.method)
    batch = first_batch(bench_dataset(eager, images, store if uses else None), 4)

    method_a, loss_a, grads_a = loss_and_gradients(eager, batch)
    method_b, loss_b, grads_b = loss_and_gradients(compiled, batch)
    assert sorted(name for name, module in method_b.named_modules() if module._compiled_call_impl is not None) \
        == sorted(compiled_modules)
    assert list(method_b.state_dict()) == list(method_a.state_dict())  # checkpoints and exports unchanged
    # float64: inductor's fused kernels sum in another order, so values agree to float64 rounding
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-10, atol=1e-10)
    assert grads_a.keys() == grads_b.keys()
    largest = max(float(g.abs().max()) for g in grads_a.values())
    for key in grads_a:
        scale = grads_a[key].abs().max().clamp(min=1e-6 * largest)
        torch.testing.assert_close(grads_b[key] / scale, grads_a[key] / scale, rtol=0, atol=1e-8, msg=key)

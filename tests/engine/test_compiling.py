"""train.compile: torch.compile of the backbones leaves the loss, the gradients and the weights' names unchanged."""

import pytest
import torch

from tests.engine import assert_same_gradients, configs_with_and_without, loss_and_gradients

pytestmark = pytest.mark.usefixtures("one_thread")


# one method per backbone class: ResNet + FPN (SoCo), a truncated ResNet (SCRL), the four stages (DetCo)
@pytest.mark.slow
@pytest.mark.parametrize("name, compiled_modules", [
    ("soco", ["online.backbone", "target.backbone"]),
    ("scrl", ["online.backbone", "target.backbone"]),
    ("detco", ["online.backbone", "target.backbone"]),
])
def test_compiled_backbones_give_the_same_loss_and_gradients(name, compiled_modules, tiny_data):
    eager, compiled, batch = configs_with_and_without(name, "train.compile", tiny_data)

    method_a, loss_a, grads_a = loss_and_gradients(eager, batch, torch.float64)
    method_b, loss_b, grads_b = loss_and_gradients(compiled, batch, torch.float64)
    assert sorted(name for name, module in method_b.named_modules() if module._compiled_call_impl is not None) \
        == sorted(compiled_modules)
    assert list(method_b.state_dict()) == list(method_a.state_dict())  # checkpoints and exports unchanged
    # float64: inductor's fused kernels sum in another order, so values agree to float64 rounding
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-10, atol=1e-10)
    assert_same_gradients(grads_b, grads_a, atol=1e-8)

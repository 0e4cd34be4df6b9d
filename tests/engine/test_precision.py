"""Precision: what `auto` picks, and losses that stay fp32 under autocast."""

import pytest
import torch
import torch.nn.functional as F

from soco.engine import step
from soco.errors import ConfigError
from soco.methods.losses import byol_regression, info_nce


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_is_bf16_only_on_cpus_with_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(step, "cpu_has_native_bf16", lambda: native)
    assert step.resolve_precision("auto", torch.device("cpu"), 224) == expected
    assert step.resolve_precision("auto", torch.device("cpu"), 64) == expected
    assert step.resolve_precision("auto", torch.device("cpu"), 63) == "fp32"  # below AUTO_BF16_MIN_SIDE
    assert step.resolve_precision("auto", torch.device("cuda"), 32) == "bf16"
    assert step.resolve_precision("fp32", torch.device("cpu"), 224) == "fp32"
    assert step.resolve_precision("bf16", torch.device("cpu"), 32) == "bf16"  # asked for: given


def test_the_step_runner_resolves_each_micro_batch_through_the_one_resolver(monkeypatch):
    from soco.engine.distributed import DistributedContext

    monkeypatch.setattr(step, "cpu_has_native_bf16", lambda: True)
    network = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    runner = step.StepRunner(network, network, optimizer, DistributedContext(), "auto")
    assert runner.scaler is None  # only fp16 scales its loss
    assert runner.precision_for({"views": {"v1": torch.zeros(2, 3, 64, 64)}}) == "bf16"
    small = {"views": {"v1": torch.zeros(2, 3, 64, 64), "v3": torch.zeros(2, 3, 32, 32)}}
    assert runner.precision_for(small) == "fp32"  # below AUTO_BF16_MIN_SIDE
    fixed = step.StepRunner(network, network, optimizer, DistributedContext(), "fp32")
    assert fixed.precision_for({"views": {"v1": torch.zeros(2, 3, 224, 224)}}) == "fp32"


def test_smallest_view_side_looks_at_every_image_stack():
    batch = {"views": {"v1": torch.zeros(2, 3, 224, 224), "v3": torch.zeros(2, 3, 112, 96)},
             "boxes": torch.zeros(2, 4, 4), "patches": [torch.zeros(2, 9, 3, 64, 70)], "ids": torch.zeros(2, 3, 5, 5,
                                                                                                       dtype=torch.long)}
    assert step.smallest_view_side(batch) == 64
    assert step.smallest_view_side({"boxes": torch.zeros(2, 4)}) is None


@pytest.mark.skipif(not step.cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_bf16_gradients_of_a_resnet_at_the_auto_threshold_side_match_fp32():
    """From AUTO_BF16_MIN_SIDE up, no stride-2 conv meets a 1x1 map (benchmarks/bf16_conv_defect.py shows
    oneDNN's garbage gradients there): bf16 gradients stay within bf16 rounding of fp32's."""
    torch.manual_seed(0)
    from torchvision.models import resnet18

    network = resnet18(num_classes=8)
    side = step.AUTO_BF16_MIN_SIDE
    images = torch.randn(8, 3, side, side)
    network(images).square().mean().backward()
    exact = {name: p.grad.clone() for name, p in network.named_parameters()}
    network.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = network(images).float().square().mean()
    loss.backward()
    for name, p in network.named_parameters():
        # bf16 activations carry 0.4% errors that a random network's small gradients amplify: each
        # layer's gradient points the same way (cosine 0.85-0.95 measured) with the same size (<= 1.32x);
        # the defect's gradients are 1e20 times too large
        assert torch.isfinite(p.grad).all(), name
        cosine = F.cosine_similarity(p.grad.flatten(), exact[name].flatten(), dim=0)
        assert cosine > 0.8, (name, float(cosine))
        assert p.grad.abs().max() <= 2.0 * exact[name].abs().max(), name


def test_fp16_on_the_cpu_and_unknown_precisions_are_refused():
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        step.resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="fp8"):
        step.resolve_precision("fp8", torch.device("cpu"))


def test_info_nce_under_bf16_autocast_equals_the_fp32_loss():
    generator = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(16, 32, generator=generator), dim=1)
    key = F.normalize(torch.randn(16, 32, generator=generator), dim=1)
    negatives = F.normalize(torch.randn(256, 32, generator=generator), dim=1)
    expected = info_nce(query, key, negatives, temperature=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = info_nce(query, key, negatives, temperature=0.2)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == expected.item()


def test_byol_regression_of_bf16_inputs_is_computed_in_fp32():
    prediction = torch.tensor([[1.0, 2.0, 2.0]], dtype=torch.bfloat16)
    target = torch.tensor([[2.0, 1.0, 2.0]], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = byol_regression(prediction, target)
    assert loss.dtype == torch.float32
    # cos = (2 + 2 + 4) / (3 * 3) = 8 / 9
    torch.testing.assert_close(loss, torch.tensor([2.0 - 2.0 * 8.0 / 9.0]))

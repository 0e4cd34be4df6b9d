"""The step runner on its own: an update needs at least one sample."""

import pytest
import torch
from torch import nn

from soco.engine.distributed import DistributedContext
from soco.engine.step import EmptyStep, StepRunner


class CountingMethod(nn.Module):
    """A one-layer 'method' that counts the after-step work (where a MomentumMethod runs its EMA)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.after_steps = 0

    def forward(self, batch):
        return {"loss": self.linear(batch["x"]).pow(2).mean()}

    def after_optimizer_step(self, step, total_steps):
        self.after_steps += 1
        return {}


def test_a_step_without_a_sample_is_refused_before_the_optimiser_or_the_ema_moves():
    method = CountingMethod()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    optimizer_steps = []
    optimizer.register_step_pre_hook(lambda *_: optimizer_steps.append(1))
    runner = StepRunner(method, method, optimizer, DistributedContext())
    before = {name: value.clone() for name, value in method.state_dict().items()}
    # what the data set's collate gives when every image of a micro-batch was unreadable
    empty = {"indices": torch.zeros(0, dtype=torch.int64), "paths": [], "skipped": 4,
             "skipped_paths": {"a.jpg": "truncated image"}}
    for micro_batches in ([], [empty], [empty, empty]):
        with pytest.raises(EmptyStep, match=r"^no sample to train on \(every image .* unreadable\) at step 3$"):
            runner.run(micro_batches, 3, 10, lr=0.1)
    assert optimizer_steps == [] and method.after_steps == 0
    assert all(torch.equal(before[name], value) for name, value in method.state_dict().items())
    # an empty micro-batch beside one with samples is left out, and the step is taken
    runner.run([{"x": torch.ones(2, 2), "paths": ["b.jpg", "c.jpg"]}, empty], 3, 10, lr=0.1)
    assert optimizer_steps == [1] and method.after_steps == 1


def test_a_left_out_micro_batch_does_not_shrink_the_steps_gradient():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    empty = {"indices": torch.zeros(0, dtype=torch.int64), "paths": [], "skipped": 2, "skipped_paths": {}}
    updated = []
    for micro_batches in ([{"x": x, "paths": ["a", "b"]}], [{"x": x, "paths": ["a", "b"]}, empty],
                          [{"x": x, "paths": ["a", "b"]}, {"x": x, "paths": ["a", "b"]}]):
        torch.manual_seed(0)
        method = CountingMethod()
        start = method.linear.weight.detach().clone()
        optimizer = torch.optim.SGD(method.parameters(), lr=1.0)
        StepRunner(method, method, optimizer, DistributedContext()).run(micro_batches, 1, 1, 1.0)
        updated.append(start - method.linear.weight.detach())
    # d/dw mean((w x + b)^2) = 2 mean((w x + b) x): the same with one micro-batch, one of two left out, or twice x
    with torch.no_grad():
        torch.manual_seed(0)
        reference = CountingMethod()
        residual = reference.linear(x)
        expected = 2 * (residual * x).mean(dim=0, keepdim=True)
    for update in updated:
        torch.testing.assert_close(update, expected)

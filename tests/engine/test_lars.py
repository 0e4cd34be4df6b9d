"""LARS: the trust ratio on weights, plain momentum SGD on biases and norm parameters."""

import torch
from torch import nn

from soco.engine.lars import LARS
from soco.methods.parameter_groups import lars_param_groups


def test_param_groups_exclude_biases_and_norm_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    adapted, excluded = lars_param_groups(model, weight_decay=1e-5)
    assert [p.shape for p in adapted["params"]] == [torch.Size([4, 3, 3, 3]), torch.Size([2, 4])]
    assert len(excluded["params"]) == 4  # conv bias, bn weight, bn bias, linear bias
    assert excluded["weight_decay"] == 0.0 and not excluded["lars"]


def test_lars_step_by_hand():
    weight = nn.Parameter(torch.tensor([3.0, 4.0]))  # norm 5
    bias = nn.Parameter(torch.tensor([1.0]))
    optimizer = LARS(
        [{"params": [weight], "weight_decay": 0.1, "lars": True}, {"params": [bias], "weight_decay": 0.0, "lars": False}],
        lr=0.5, momentum=0.9, trust_coefficient=0.001,
    )
    weight.grad = torch.tensor([0.0, 1.0])
    bias.grad = torch.tensor([2.0])
    optimizer.step()
    update = torch.tensor([0.0, 1.0]) + 0.1 * torch.tensor([3.0, 4.0])  # [0.3, 1.4]
    trust = 0.001 * 5.0 / torch.linalg.vector_norm(update)
    torch.testing.assert_close(weight.detach(), torch.tensor([3.0, 4.0]) - 0.5 * trust * update)
    torch.testing.assert_close(bias.detach(), torch.tensor([1.0 - 0.5 * 2.0]))
    # second step: momentum buffer = 0.9 * old + new
    bias.grad = torch.tensor([1.0])
    optimizer.step()
    torch.testing.assert_close(bias.detach(), torch.tensor([0.0 - 0.5 * (0.9 * 2.0 + 1.0)]))


def test_torchlars_denominator_and_eps_by_hand():
    """SCRL's torchlars: trust = c |p| / (|g| + wd |p| + eps), applied to g + wd p; SoCo's lars.py adds eps 1e-8."""
    weight = nn.Parameter(torch.tensor([3.0, 4.0]))  # norm 5
    optimizer = LARS([{"params": [weight], "weight_decay": 0.1, "lars": True}], lr=0.5, momentum=0.9,
                     trust_coefficient=0.001, denominator="sum", eps=0.25)
    weight.grad = torch.tensor([0.0, 2.0])  # norm 2
    optimizer.step()
    update = torch.tensor([0.3, 2.4])
    trust = 0.001 * 5.0 / (2.0 + 0.1 * 5.0 + 0.25)  # not |update| = 2.4187
    torch.testing.assert_close(weight.detach(), torch.tensor([3.0, 4.0]) - 0.5 * trust * update)
    other = nn.Parameter(torch.tensor([3.0, 4.0]))
    update_rule = LARS([{"params": [other], "weight_decay": 0.1, "lars": True}], lr=0.5, momentum=0.9,
                       trust_coefficient=0.001, denominator="update", eps=0.25)
    other.grad = torch.tensor([0.0, 2.0])
    update_rule.step()
    trust = 0.001 * 5.0 / (torch.linalg.vector_norm(update) + 0.25)
    torch.testing.assert_close(other.detach(), torch.tensor([3.0, 4.0]) - 0.5 * trust * update)


def test_zero_weight_uses_trust_one():
    weight = nn.Parameter(torch.zeros(3))
    optimizer = LARS([{"params": [weight], "weight_decay": 0.0, "lars": True}], lr=1.0, momentum=0.0)
    weight.grad = torch.ones(3)
    optimizer.step()
    torch.testing.assert_close(weight.detach(), -torch.ones(3))


def reference_lars_step(params_by_group, buffers, lr, momentum, trust_coefficient):
    """LARS written out one parameter at a time, as the paper states it (the independent reference)."""
    for group, params in params_by_group:
        for param in params:
            if param.grad is None:
                continue
            update = param.grad.clone()
            if group["lars"]:
                update = update + group["weight_decay"] * param.detach()
                param_norm, update_norm = param.detach().norm(), update.norm()
                if param_norm > 0 and update_norm > 0:
                    update = update * (trust_coefficient * param_norm / update_norm)
            buffer = buffers.get(param)
            buffers[param] = update if buffer is None else momentum * buffer + update
            with torch.no_grad():
                param -= lr * buffers[param]


def test_grouped_update_equals_the_per_parameter_reference_over_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    unused = nn.Parameter(torch.randn(4))  # never gets a gradient: must stay untouched
    reference = [nn.Parameter(p.detach().clone()) for p in [*model.parameters(), unused]]
    adapted, excluded = lars_param_groups(model, weight_decay=1e-4)
    adapted["params"].append(unused)
    optimizer = LARS([adapted, excluded], lr=0.3, momentum=0.9, trust_coefficient=0.001)
    index = {id(p): i for i, p in enumerate([*model.parameters(), unused])}
    reference_groups = [(group, [reference[index[id(p)]] for p in group["params"]]) for group in (adapted, excluded)]
    buffers = {}
    for step in range(4):
        inputs = torch.randn(2, 3, 8, 8)
        model.zero_grad()
        model(inputs).square().mean().backward()
        for p in model.parameters():
            reference[index[id(p)]].grad = p.grad.clone()
        optimizer.step()
        reference_lars_step(reference_groups, buffers, lr=0.3, momentum=0.9, trust_coefficient=0.001)
        for p in [*model.parameters(), unused]:
            torch.testing.assert_close(p.detach(), reference[index[id(p)]].detach(), rtol=1e-6, atol=1e-7)
    assert unused.grad is None and unused not in optimizer.state

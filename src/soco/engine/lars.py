"""LARS over SGD with momentum, with biases and normalisation parameters excluded as in BYOL and SoCo."""

from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) on top of SGD momentum.

    For a group with `lars=True`: update = grad + weight_decay * p, scaled by the trust ratio
    trust_coefficient * |p| / (|update| + eps) (denominator "update": BYOL's optax LARS, SoCo's `contrast/lars.py`
    126-140 with eps 1e-8) or trust_coefficient * |p| / (|grad| + weight_decay * |p| + eps) ("sum": torchlars,
    which SCRL's release uses); 1 where |p| or |grad| is zero. Groups with `lars=False` (biases, norm layers) get
    plain SGD momentum with no decay and no trust ratio.

    Each group is updated with a handful of `torch._foreach_*` calls over all its tensors instead of a
    Python loop of small kernels per parameter (an R50-FPN pair has about 300 tensors).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, trust_coefficient: float = 0.001,
                 denominator: str = "update", eps: float = 0.0):
        if denominator not in ("update", "sum"):
            raise ValueError(f"LARS denominator must be 'update' or 'sum', not {denominator!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, lars=True)
        super().__init__(params, defaults)
        self.denominator = denominator
        self.eps = float(eps)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimisation step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["lars"]:
                updates = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                param_norms = torch.stack(torch._foreach_norm(params))
                if self.denominator == "update":
                    denominators = torch.stack(torch._foreach_norm(updates))
                    usable = (param_norms > 0) & (denominators > 0)
                else:
                    grad_norms = torch.stack(torch._foreach_norm(grads))
                    denominators = grad_norms + group["weight_decay"] * param_norms
                    usable = (param_norms > 0) & (grad_norms > 0)
                trust = torch.where(usable, group["trust_coefficient"] * param_norms / (denominators + self.eps),
                                    torch.ones_like(param_norms))
                torch._foreach_mul_(updates, list(trust.unbind()))
            else:
                updates = grads
            for param in params:
                # a zero buffer makes the first step's buffer the update itself (SGD's convention)
                if "momentum_buffer" not in self.state[param]:
                    self.state[param]["momentum_buffer"] = torch.zeros_like(param)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss

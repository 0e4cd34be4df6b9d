"""One training step through the Method contract: forward and backward of each micro-batch, checks, update.

The trainer and `soco bench` both run this very step, so that the benchmark times what training does.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from soco.data.collate import move_to_device
from soco.engine.distributed import DistributedContext, all_reduce_mean
from soco.errors import ConfigError, SocoError


class TrainingDiverged(SocoError):
    """The loss or a gradient became NaN or infinite."""


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bf16 on GPUs and fp32 on CPUs; anything else is checked."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return precision


def autocast_context(precision: str, device: torch.device):
    """(autocast context, fp16 grad scaler or None) for a precision on a device."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext(), None
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def gradients_finite(model: nn.Module) -> bool:
    """Whether every gradient is finite (after DDP's all-reduce the answer is the same on every rank)."""
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    if not gradients:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(gradients))).all())


@dataclass
class StepResult:
    """What one optimiser step did."""

    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StepRunner:
    """Everything one training step needs; `run` does the step."""

    method: nn.Module  # the Method itself
    trained: nn.Module  # the Method, or DDP around it
    optimizer: torch.optim.Optimizer
    context: DistributedContext
    precision: str = "fp32"
    accumulate: int = 1

    def __post_init__(self):
        self.autocast, self.scaler = autocast_context(self.precision, self.context.device)

    def run(self, micro_batches: list[dict], step: int, total_steps: int, lr: float) -> StepResult:
        """Forward and backward every micro-batch, stop on a non-finite loss or gradient, then update.

        Raises TrainingDiverged naming the step; the weights are then left as they were before the step.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.context.device)
        extra_sums: dict[str, torch.Tensor] = {}
        for number, batch in enumerate(micro_batches):
            batch = move_to_device(batch, self.context.device)
            sync = contextlib.nullcontext()
            if self.context.is_distributed and number < len(micro_batches) - 1:
                sync = self.trained.no_sync()
            with sync:
                with self.autocast:
                    outputs = self.trained(batch)
                    loss = outputs["loss"] / self.accumulate
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += loss.detach()
            for key, value in outputs.items():
                if key != "loss":
                    value = torch.as_tensor(value, device=self.context.device).detach().float() / len(micro_batches)
                    extra_sums[key] = extra_sums.get(key, 0.0) + value
        # The loss and the method's metrics, averaged over the processes in one collective and one sync.
        averaged = all_reduce_mean(torch.stack([loss_sum.float(), *extra_sums.values()]), self.context).tolist()
        mean_loss, extras = averaged[0], dict(zip(extra_sums, averaged[1:]))
        problem = None
        if not math.isfinite(mean_loss):
            problem = f"loss became {mean_loss}"
        elif self.scaler is None and not gradients_finite(self.method):
            problem = f"a gradient became non-finite (loss {mean_loss:.4f})"
        if problem:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"{problem} at step {step} (lr {lr:.4g})")
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        extras.update(self.method.after_optimizer_step(step, total_steps))
        return StepResult(mean_loss, extras)

"""One training step through the Method contract: forward and backward of each micro-batch, checks, update.

The trainer and `soco bench` both run this very step, so that the benchmark times what training does.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from soco.data.collate import move_to_device, to_channels_last
from soco.engine.allocator import keep_freed_memory
from soco.engine.distributed import DistributedContext, all_reduce_mean
from soco.errors import ConfigError, SocoError


class TrainingDiverged(SocoError):
    """The loss or a gradient became NaN or infinite."""


class EmptyStep(SocoError):
    """A step's micro-batches hold no sample: every image of them was unreadable."""


def holds_samples(batch: dict) -> bool:
    """Whether a micro-batch has a sample to train on (the data set's batches list their images in "paths")."""
    return bool(batch["paths"]) if "paths" in batch else True


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), where bf16 autocast pays."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


# oneDNN's bf16 convolution computes garbage weight gradients (1e20-1e37) when a stride-2 3x3 conv meets a
# 1x1 map (tests/engine/test_precision.py keeps the reproduction): with views of at least this side every
# ResNet map that a stride-2 conv reads is at least 2x2, so `auto` picks bf16 on the CPU only for them.
AUTO_BF16_MIN_SIDE = 64


def resolve_precision(precision: str, device: torch.device, smallest_view_side: int | None = None) -> str:
    """The precision a run computes in: the one place where pretraining, fine-tuning, bench and probe decide it.

    'auto' is bf16 on GPUs, and on CPUs with native bf16 (AVX512-BF16, AMX) for views of at least
    AUTO_BF16_MIN_SIDE pixels; fp32 otherwise. Other values are checked and returned.

    bf16 keeps fp32's exponent range, so it needs no loss scaling; the losses compute in fp32 and BN
    keeps fp32 statistics (its running buffers and parameters stay fp32 under autocast).
    """
    if precision == "auto":
        if device.type == "cuda":
            return "bf16"
        large_views = smallest_view_side is None or smallest_view_side >= AUTO_BF16_MIN_SIDE
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() and large_views else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return precision


def smallest_view_side(batch) -> int | None:
    """The smallest height or width among a batch's image stacks (floating tensors of 4 or more axes), or None."""
    if isinstance(batch, torch.Tensor):
        return min(batch.shape[-2:]) if batch.ndim >= 4 and batch.is_floating_point() else None
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    sides = [side for side in (smallest_view_side(value) for value in values) if side is not None]
    return min(sides) if sides else None


def autocast_context(resolved: str, device: torch.device):
    """The autocast context of a precision `resolve_precision` gave (fp32: none)."""
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if resolved == "bf16" else torch.float16)


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
    channels_last: bool = False  # views go NHWC, as the networks' weights do (trainer.build_model)

    def __post_init__(self):
        # Only fp16 scales its loss, and `auto` never resolves to fp16, so the views' size cannot change this answer.
        fp16 = resolve_precision(self.precision, self.context.device) == "fp16"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        keep_freed_memory()  # each step reuses the last one's memory instead of faulting it in anew

    def precision_for(self, batch) -> str:
        """The precision this runner computes a micro-batch in (on the CPU, `auto` depends on the views' size)."""
        return resolve_precision(self.precision, self.context.device, smallest_view_side(batch))

    def run(self, micro_batches: list[dict], step: int, total_steps: int, lr: float) -> StepResult:
        """Forward and backward every micro-batch, stop on a non-finite loss or gradient, then update.

        Raises TrainingDiverged naming the step; the weights are then left as they were before the step.
        Raises EmptyStep, before anything is touched, when no micro-batch holds a sample.
        """
        micro_batches = [batch for batch in micro_batches if holds_samples(batch)]
        if not micro_batches:
            # An update from nothing would still pull the targets' EMA and be logged and checkpointed as trained.
            raise EmptyStep(f"no sample to train on (every image of the step's micro-batches was unreadable) "
                            f"at step {step}")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.context.device)
        extra_sums: dict[str, torch.Tensor] = {}
        for number, batch in enumerate(micro_batches):
            batch = move_to_device(batch, self.context.device)
            if self.channels_last:
                batch = to_channels_last(batch)
            autocast = autocast_context(self.precision_for(batch), self.context.device)
            sync = contextlib.nullcontext()
            if self.context.is_distributed and number < len(micro_batches) - 1:
                sync = self.trained.no_sync()
            with sync:
                with autocast:
                    outputs = self.trained(batch)
                    # the mean over the micro-batches that hold samples: an unreadable one left out of a step
                    # does not shrink its gradient (only a single process leaves one out: trainer)
                    loss = outputs["loss"] / len(micro_batches)
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

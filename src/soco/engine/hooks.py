"""Step hooks: work a caller adds to the pretraining loop (a probe, an evaluation) without the engine knowing it.

The trainer calls a hook only on the main process: `start` once per session, before the first step it
trains, and `after_step` after the optimiser step of every `every`-th step and of the last one, after
that step's metrics are logged and before its checkpoint is written (so that a resume repeats the call
of any step whose checkpoint it lacks, and its records, cut back with the metrics, stay one per step).
A hook must not change training: no global random draws, no network left in another mode, no update
of weights or BatchNorm statistics. The other processes go on meanwhile and wait for the main one at
the next collective.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from soco.engine.run_log import RunLog
    from soco.methods.base import Method


@runtime_checkable
class StepHook(Protocol):
    """What the trainer calls every `every` steps (0: never) with the method being trained and the run's log."""

    every: int

    def start(self, step: int, method: Method, log: RunLog) -> None:
        """Once per session, before the first step it trains (`step`: the steps already done)."""

    def after_step(self, step: int, method: Method, log: RunLog) -> None:
        """After the `step`-th update (counted from 1), when `hook_due` says so."""


def hook_due(hook: StepHook, step: int, total_steps: int) -> bool:
    """Whether the hook runs after `step`: every `every` steps and after the last one, never when `every` is 0."""
    return hook.every > 0 and (step % hook.every == 0 or step == total_steps)

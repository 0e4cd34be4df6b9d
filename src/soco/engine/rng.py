"""Saving and restoring the global random states, so that a resumed run continues the same streams."""

from __future__ import annotations

import random

import torch


def rng_state() -> dict:
    """Global random states of torch (CPU and CUDA) and Python; data pipelines seed their own generators."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Undo rng_state(); a state without a Python or CUDA entry leaves that generator as it is."""
    torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

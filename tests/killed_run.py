"""A pretraining run killed with SIGKILL right after its step-2 checkpoint, as a crash would leave it (shared by the
contract tests on the CPU and the resume test on CUDA)."""

import subprocess
import sys
from pathlib import Path

KILLED_AFTER_STEP_2 = """
import os, signal, sys
import soco.engine.trainer as trainer
from soco.config.loading import load_config
real_save = trainer.save_checkpoint
def save_then_die(state, path):
    real_save(state, path)
    if state["step"] == 2 and path.name == "last.pt":
        os.kill(os.getpid(), signal.SIGKILL)
trainer.save_checkpoint = save_then_die
config = load_config(sys.argv[4], ["train.steps=4", "train.checkpoint_every=1", *sys.argv[5:]])
trainer.pretrain(config, sys.argv[3], sys.argv[1], sys.argv[2] or None, progress=False)
"""


def run_killed_after_step_2(images: Path, store: Path | None, run_dir: Path, preset: str, overrides: list[str],
                            timeout: float) -> subprocess.CompletedProcess:
    """Pretrain `preset` (4 steps, a checkpoint each) into run_dir in a subprocess that SIGKILLs itself after step 2."""
    script = run_dir.parent / f"{run_dir.name}-killed.py"
    script.write_text(KILLED_AFTER_STEP_2)
    return subprocess.run([sys.executable, str(script), str(images), str(store or ""), str(run_dir), preset,
                           *overrides], check=False, timeout=timeout)

"""What a training run writes for people: metrics.jsonl, TensorBoard events, train.log and a loss curve."""

from __future__ import annotations

import json
import time
from pathlib import Path

from soco.data.batch_drawing import save_figure
from soco.files import atomic_write_text


class RunLog:
    """Metrics of every logged step (and other scalars, such as probe scores) to JSON lines and TensorBoard;
    readable text to train.log.

    `start_step` is the step the run continues from (0 for a new or restarted run): the metrics of
    later steps, written by a run that stopped after its last checkpoint, are dropped first, so that
    every step has one line of metrics, from the run whose weights the checkpoints hold. Other scalars
    (probe scores) get lines of their own, cut back the same way; a metrics line is the one with "loss".
    train.log keeps every session's lines.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, start_step: int = 0):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._tensorboard = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            metrics_path = self.run_dir / "metrics.jsonl"
            if metrics_path.exists():
                trim_metrics(metrics_path, start_step)
            self._metrics = open(metrics_path, "a")
            self._text = open(self.run_dir / "train.log", "a")
            tensorboard_dir = self.run_dir / "tensorboard"
            # TensorBoard hides the earlier session's events from `purge_step` on, as metrics.jsonl drops them.
            purge_step = start_step + 1 if tensorboard_dir.exists() else None
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(tensorboard_dir), purge_step=purge_step)
            except ImportError:  # TensorBoard is optional at run time; metrics.jsonl has everything
                self._tensorboard = None

    def text(self, message: str) -> None:
        """A timestamped line in train.log."""
        if self.enabled:
            self._text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            self._text.flush()

    def _record(self, step: int, values: dict) -> None:
        """One line of metrics.jsonl, flushed at once (a killed run keeps every finished step's line)."""
        self._metrics.write(json.dumps({"step": step, **values}) + "\n")
        self._metrics.flush()

    def metrics(self, step: int, values: dict) -> None:
        """One step's numbers (loss, lr, momentum, images/s ...)."""
        if not self.enabled:
            return
        self._record(step, values)
        if self._tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"train/{key}", value, step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Named numbers of one step that are not training metrics ('probe/knn': 0.61): a record of their own
        in metrics.jsonl (so that a resume cuts them back with the rest) and TensorBoard scalars under their names."""
        if not self.enabled:
            return
        self._record(step, values)
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()  # a probe comes rarely: show it now, not at the writer's next periodic flush

    def close(self) -> None:
        """Flush and close every file."""
        if self.enabled:
            self._metrics.close()
            self._text.close()
            if self._tensorboard is not None:
                self._tensorboard.close()


def trim_metrics(path: Path, last_step: int) -> int:
    """Keep the records of steps up to and including `last_step` (atomically); returns how many were dropped.

    A torn line (a kill in the middle of a write) is dropped too.
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return len(lines) - len(kept)


def read_metrics(path: Path) -> list[dict]:
    """All records of a metrics.jsonl file (a torn last line from a kill is ignored)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss_curve(metrics_path: Path, output: Path, title: str = "pretraining loss") -> Path:
    """PNG of loss and learning rate against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    latest = {r["step"]: r for r in records if "loss" in r}  # a resumed run may re-log steps
    steps = sorted(latest)
    figure, loss_axes = plt.subplots(figsize=(7, 4), dpi=120)
    loss_axes.plot(steps, [latest[s]["loss"] for s in steps], color="tab:blue", linewidth=1.2)
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("loss", color="tab:blue")
    lr_axes = loss_axes.twinx()
    lr_axes.plot(steps, [latest[s]["lr"] for s in steps], color="tab:orange", linewidth=1.0, alpha=0.7)
    lr_axes.set_ylabel("learning rate", color="tab:orange")
    loss_axes.set_title(title)
    figure.tight_layout()
    return save_figure(figure, output)

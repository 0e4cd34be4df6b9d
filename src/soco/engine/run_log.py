"""What a training run writes for people: metrics.jsonl, TensorBoard events, train.log and a loss curve."""

from __future__ import annotations

import json
import time
from pathlib import Path

from soco.data.pictures import save_figure


class RunLog:
    """Metrics of every logged step to JSON lines and TensorBoard; readable text to train.log."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._tensorboard = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._metrics = open(self.run_dir / "metrics.jsonl", "a")
            self._text = open(self.run_dir / "train.log", "a")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # TensorBoard is optional at run time; metrics.jsonl has everything
                self._tensorboard = None

    def text(self, message: str) -> None:
        """A timestamped line in train.log."""
        if self.enabled:
            self._text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            self._text.flush()

    def metrics(self, step: int, values: dict) -> None:
        """One step's numbers (loss, lr, momentum, images/s ...)."""
        if not self.enabled:
            return
        self._metrics.write(json.dumps({"step": step, **values}) + "\n")
        self._metrics.flush()
        if self._tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        """Flush and close every file."""
        if self.enabled:
            self._metrics.close()
            self._text.close()
            if self._tensorboard is not None:
                self._tensorboard.close()


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

"""Pictures of training batches: a grid of views with their boxes, so a person can check what a method sees."""

from __future__ import annotations

from pathlib import Path

import torch

from soco.data.views import denormalize
from soco.files import atomic_write


def save_figure(figure, path: str | Path) -> Path:
    """Write a matplotlib figure to `path` atomically (the format follows the suffix) and close it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: figure.savefig(tmp), sync=False)
    finally:
        plt.close(figure)


def draw_views(
    views: dict[str, torch.Tensor],
    boxes: dict[str, torch.Tensor] | None,
    path: str | Path,
    image_names: list[str] | None = None,
    max_images: int = 4,
) -> Path:
    """Save a PNG grid: a row per image, a column per view (B, 3, H, W), box k of every view in colour k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    names = list(views)
    if not names or len(views[names[0]]) == 0:
        raise ValueError("the batch holds no image to draw (every sample was skipped)")
    rows = min(len(views[names[0]]), max_images)
    columns = len(names)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows), dpi=100, squeeze=False)
    colours = plt.get_cmap("tab10")
    for row in range(rows):
        for column, name in enumerate(names):
            view = views[name][row].detach().float().cpu()
            side_h, side_w = view.shape[-2:]
            ax = axes[row][column]
            # extent puts pixel i on [i, i+1], the convention of the boxes' coordinates
            ax.imshow(denormalize(view).permute(1, 2, 0).numpy(), extent=(0, side_w, side_h, 0))
            view_boxes = (boxes or {}).get(name, torch.zeros(len(views[name]), 0, 4))
            for number, (x1, y1, x2, y2) in enumerate(view_boxes[row].tolist()):
                ax.add_patch(
                    Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linewidth=1.8, edgecolor=colours(number % 10))
                )
            ax.set_xlim(0, side_w)
            ax.set_ylim(side_h, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{name} ({side_w}x{side_h})", fontsize=9)
            if column == 0 and image_names:
                ax.set_ylabel(Path(image_names[row]).name, fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)

"""Pictures of proposals: an image with its boxes drawn, for a person to check what was found."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from soco.data.batch_drawing import save_figure


def draw_proposals(rgb: np.ndarray, boxes: np.ndarray, output: str | Path, title: str = "") -> Path:
    """Save a PNG of `rgb` with every x1 y1 x2 y2 box outlined in its own colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    height, width = rgb.shape[:2]
    scale = 8.0 / max(width, height)
    figure, axes = plt.subplots(figsize=(max(3.0, width * scale), max(3.0, height * scale) + 0.4), dpi=120)
    axes.imshow(rgb)
    colours = plt.get_cmap("tab20")
    for number, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, dtype=float)):
        axes.add_patch(
            Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linewidth=1.6, edgecolor=colours(number % 20))
        )
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.set_axis_off()
    if title:
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    return save_figure(figure, output)

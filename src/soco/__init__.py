"""soco: self-supervised pretraining aligned to object detection (SoCo and its siblings)."""

import os

# OpenMP threads that spin while waiting make PyTorch's CPU kernels up to 50x slower as soon as another
# process (a data-loader worker, a second job) shares the cores; yielding at once keeps them fast.
# Set before torch is imported; a user's own setting wins.
os.environ.setdefault("KMP_BLOCKTIME", "0")

__version__ = "0.1.0"

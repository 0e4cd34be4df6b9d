"""soco: self-supervised pretraining aligned to object detection (SoCo and its siblings)."""

__version__ = "0.1.0"

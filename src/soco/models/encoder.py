"""ObjectEncoder: images and their object boxes -> one vector per box, composed from parts handed in.

Like torchvision's GeneralizedRCNN, the encoder is built from separately made parts: a backbone whose
output dict holds the maps boxes are pooled on, a `BoxPooler`, a box head and a projector. Which parts
(FPN or not, 4conv1fc or res5 head) is the business of the method that builds it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from soco.models.roi_pooling import BoxPooler, pool_rois


class ObjectEncoder(nn.Module):
    """Backbone, RoIAlign, box head and projector: (images B x 3 x H x W, boxes B x N x 4) -> (B*N, projection_dim).

    Boxes are (x1, y1, x2, y2) in the pixels of the images given; outputs are image-major (box k of image b
    is row b*N + n, N boxes per image). The state dict reads backbone.*, box_head.*, projector.* (the pooler has no weights).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_names: Sequence[str],
        pooler: BoxPooler,
        box_head: nn.Module,
        projector: nn.Module,
        pool_all_levels: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.feature_names = tuple(feature_names)
        self.pooler = pooler
        self.box_head = box_head
        self.projector = projector
        # Only a scale-aware pyramid has levels to choose from; a fixed level keeps one call's output either way.
        self.pool_all_levels = pool_all_levels and len(self.feature_names) > 1 and pooler.thresholds is not None

    @property
    def representation_dim(self) -> int:
        """Width of the box head's output (the projector's input)."""
        return self.projector.in_dim

    @property
    def projection_dim(self) -> int:
        """Width of the projected object vectors."""
        return self.projector.out_dim

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The maps boxes are pooled on (P2..P5 with an FPN, else the trunk's single map)."""
        outputs = self.backbone(images)
        return [outputs[name] for name in self.feature_names]

    def box_levels(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B*N,) index of the map each box is pooled on (0 = P2 with an FPN)."""
        return self.pooler.levels(boxes)

    def representations(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(B*N, D) object features before the projector: what the detector's box head computes."""
        return self._encode(self.feature_maps(images), boxes, lambda vectors: vectors)

    def _encode(self, features: list[torch.Tensor], boxes: torch.Tensor, tail) -> torch.Tensor:
        """(B*N, ...) `tail` of the box head's output for one (B, N, 4) box set pooled on `features`."""
        if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features[0].shape[0]:
            raise ValueError(f"boxes must be (B, N, 4) for {features[0].shape[0]} images, got {tuple(boxes.shape)}")
        if not self.pool_all_levels:
            # One head call over all boxes of the set, each pooled on its own level: a detector's box head.
            return tail(self.box_head(self.pooler(features, boxes)))
        # The release's way (SoCo_FPN.py 157-167): every box pooled on every level, the head, projector (and
        # predictor) called once per level, and each box keeps its own level's output. The pooled features and the
        # weights are the same, so in eval mode the result equals the per-level path. In training mode BatchNorm
        # normalises each call with that call's batch statistics: here over all B*N boxes pooled at one level
        # (three quarters of them at a level they do not belong to), there over the B*N boxes each at its own
        # level. The outputs, and the running statistics the detector inherits, therefore differ slightly.
        pooled_all, levels = self.pooler.pool_every_level(features, boxes)
        per_level = torch.stack([tail(self.box_head(pooled_level)) for pooled_level in pooled_all])
        return per_level[levels, torch.arange(levels.numel(), device=levels.device)]

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | list[torch.Tensor],
                predictor: nn.Module | None = None) -> torch.Tensor | list[torch.Tensor]:
        """(B*N, projection_dim) projected object vectors, passed through `predictor` too when one is given.

        `boxes` is one (B, N, 4) set, or a list of sets: the backbone then runs once and the head once per set
        (as the release does for V1, which carries one box set per view pair), and a list comes back.
        """
        features = self.feature_maps(images)

        def tail(vectors: torch.Tensor) -> torch.Tensor:
            projected = self.projector(vectors)
            return projected if predictor is None else predictor(projected)

        if isinstance(boxes, torch.Tensor):
            return self._encode(features, boxes, tail)
        return [self._encode(features, box_set, tail) for box_set in boxes]


class BoxListEncoder(nn.Module):
    """Backbone, RoIAlign of any number of boxes per image on its one map, projector: -> (N, projection_dim).

    For methods whose images carry a variable number of boxes (SCRL): boxes are (N, 4) in the images'
    pixels with an (N,) image index. The pooled S x S map is averaged (S = 1 pools one vector per box).
    The state dict reads backbone.* and projector.*.
    """

    def __init__(self, backbone: nn.Module, stride: float, projector: nn.Module, output_size: int = 1,
                 aligned: bool = True):
        super().__init__()
        self.backbone = backbone
        self.stride = float(stride)
        self.output_size = int(output_size)
        self.aligned = aligned
        self.projector = projector

    def representations(self, images: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """(N, C) pooled box features of the backbone's last map."""
        feature = self.backbone(images)["0"]
        pooled = pool_rois(feature, boxes, image_index, self.stride, self.output_size, self.aligned)
        return pooled.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """(N, projection_dim) projected box vectors."""
        return self.projector(self.representations(images, boxes, image_index))

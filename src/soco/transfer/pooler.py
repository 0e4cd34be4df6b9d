"""The detector's RoI pooling with pretraining's RoIAlign settings: aligned=True and adaptive sampling."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from soco.models.roi_pooling import ADAPTIVE_SAMPLING

__all__ = ["FPN_FEATURE_NAMES", "AlignedMultiScaleRoIAlign"]

FPN_FEATURE_NAMES = ["0", "1", "2", "3"]  # P2..P5 of BackboneWithFPN; its extra 'pool' level is not pooled


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign with Detectron2's ROIAlignV2 settings (aligned=True, adaptive sampling).

    Pretraining pools this way (soco.models.roi_pooling), while torchvision's pooler samples 2x2 points per
    bin with aligned=False, which shifts every box by half a feature cell: a transferred box head would
    see features it was not trained on. Level assignment (FPN eq. 1, canonical 224 on level 4) and the
    inference of each level's scale stay torchvision's, because the detector's large images need them.
    """

    def __init__(
        self,
        featmap_names: list[str],
        output_size: int | tuple[int, int] | list[int],
        sampling_ratio: int = ADAPTIVE_SAMPLING,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ):
        super().__init__(featmap_names, output_size, sampling_ratio,
                         canonical_scale=canonical_scale, canonical_level=canonical_level)

    def _align(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        """roi_align of some rows of rois on one map, with the half-pixel offset of aligned=True."""
        return roi_align(feature, rois, self.output_size, scale, self.sampling_ratio, aligned=True)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """(all boxes, C, *output_size) features, each box (in image pixels) pooled on its own level."""
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        if len(features) == 1:
            return self._align(features[0], rois, self.scales[0])
        levels = self.map_levels(boxes)
        first = features[0]
        result = torch.zeros((len(rois), first.shape[1], *self.output_size), dtype=first.dtype, device=first.device)
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.where(levels == level)[0]
            # Under autocast the levels may come back in different dtypes; the in-place copy needs one.
            result[index] = self._align(feature, rois[index], scale).to(result.dtype)
        return result

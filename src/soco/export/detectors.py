"""The detectors an export is written for (`--detector`): which pretrained parts each one takes."""

from __future__ import annotations

from dataclasses import dataclass

from soco.export.source import ExportError

C4_LAYOUT = "c4"


class UnknownDetectorError(ExportError):
    """The detector name is not known, or the format has no such detector."""


@dataclass(frozen=True)
class Detector:
    """One detector architecture, by the pretrained parts it has room for.

    The parts are named in the pretraining network's terms: the ResNet trunk, its res5 stage, the FPN's levels
    (2 = P2 ... 5 = P5) and the 4conv1fc RoI box head. Whatever the detector has beyond them (RPN, predictors,
    P6/P7, one-stage heads) is never pretrained.
    """

    name: str
    title: str
    res5_in_roi_head: bool  # C4: res5 runs on pooled RoI features in the RoI head, not in the backbone
    fpn_levels: tuple[int, ...]  # the FPN levels it builds from C2..C5 with lateral and output convs
    box_head: bool  # a 4conv1fc RoI box head
    one_stage: bool = False

    def fpn_level_reason(self, level: int) -> str:
        """Why this detector does not take the pretrained FPN level `level`."""
        if not self.fpn_levels:
            return f"{self.title} has no FPN"
        return f"P{level}: {self.title}'s FPN is built on C{min(self.fpn_levels)}-C{max(self.fpn_levels)}"

    def box_head_reason(self) -> str:
        """Why this detector does not take the pretrained 4conv1fc box head."""
        if self.one_stage:
            return f"{self.title} is one-stage: it has no RoI box head"
        return f"{self.title}'s RoI head is res5: it has no 4conv1fc box head"


RCNN_FPN = Detector("rcnn-fpn", "R-FPN Faster/Mask R-CNN", res5_in_roi_head=False, fpn_levels=(2, 3, 4, 5),
                    box_head=True)
RCNN_C4 = Detector("rcnn-c4", "R-C4 Faster/Mask R-CNN", res5_in_roi_head=True, fpn_levels=(), box_head=False)
RETINANET = Detector("retinanet", "RetinaNet", res5_in_roi_head=False, fpn_levels=(3, 4, 5), box_head=False,
                     one_stage=True)
FCOS = Detector("fcos", "FCOS", res5_in_roi_head=False, fpn_levels=(3, 4, 5), box_head=False, one_stage=True)

DETECTORS: dict[str, Detector] = {detector.name: detector for detector in (RCNN_FPN, RCNN_C4, RETINANET, FCOS)}
DETECTOR_NAMES = tuple(DETECTORS)


def pretrained_detector(layout: str) -> Detector:
    """The detector an encoder was pretrained as: R-C4 for a C4 encoder, R-FPN otherwise (FPN or C5)."""
    return RCNN_C4 if layout == C4_LAYOUT else RCNN_FPN


def detector_named(name: str) -> Detector:
    """The detector called `name`; UnknownDetectorError listing the known ones otherwise."""
    detector = DETECTORS.get(name.lower())
    if detector is None:
        raise UnknownDetectorError(f"unknown detector '{name}' (detectors: {', '.join(DETECTORS)})")
    return detector

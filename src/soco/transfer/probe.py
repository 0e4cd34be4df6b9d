"""A quick health check of pretrained weights without fine-tuning: k-NN and linear-probe accuracy of box features.

Each labelled box of a COCO-format data set (and, by default, as many background boxes drawn away from
them) is embedded by RoIAlign on one stage of the backbone's ResNet (C5 by default; aligned, adaptive
sampling, as pretraining pools: `soco.models.roi_pooling.pool_rois`), averaged to one vector per box.
The images are split in two (seeded); crops of the first part are the training set, crops of the other
the test set, so no test crop has a neighbour from its own image. Two scores per backbone:

* k-NN: cosine similarity to the training crops, majority vote of the k nearest (k = 20, fewer when
  there are fewer training crops; ties go to the class with the larger summed similarity);
* linear probe: multinomial logistic regression (L2 cross-validated on the training crops) on features
  standardised with the training crops' statistics, fitted full-batch with L-BFGS (at most 300 iterations)
  from zero weights: deterministic, and it uses no random state.

`probe_backbones` runs any number of backbones over one pass of the images (`soco probe` compares the
pretrained weights with a random initialisation of the same depth, the floor). Nothing here touches the
global random state or leaves a network in another mode, so a trainer may call `probe_backbone` every N
steps on its online encoder.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from soco.data.views import normalize
from soco.errors import ConfigError, DataError, SocoError
from soco.models.roi_pooling import pool_rois

__all__ = [
    "BACKGROUND",
    "PROBE_PRECISION",
    "STAGES",
    "ProbeResult",
    "format_table",
    "knn_accuracy",
    "linear_probe_accuracy",
    "pretrained_trunk",
    "probe_backbone",
    "probe_backbones",
    "resnet_trunk",
    "sample_background_boxes",
    "stage_features",
]

# Stage name -> (ResNet layer ending it, stride in pixels).
STAGES = {"c2": ("layer1", 4), "c3": ("layer2", 8), "c4": ("layer3", 16), "c5": ("layer4", 32)}
BACKGROUND = "background"
# A background box overlaps no labelled box by this IoU or more (Fast R-CNN's negatives lie below 0.5).
BACKGROUND_MAX_IOU = 0.3
BACKGROUND_TRIES = 50  # draws per wanted background box before giving up on it
POOL_SIZE = 7
KNN_K = 20
LINEAR_STEPS = 300
LINEAR_L2 = 1e-3  # the weakest of the grid
# The L2 strengths cross-validated on the training crops. Box features have hundreds of dimensions and a probe
# a few hundred crops, so a weak L2 separates the training crops perfectly and answers at chance on the test
# crops; the strength is chosen per backbone, as linear evaluations do (scikit-learn's LogisticRegressionCV).
LINEAR_L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
LINEAR_CV_FOLDS = 3
# Features are embedded without autocast: the probe is a measurement, and a few hundred crops cost little in fp32.
PROBE_PRECISION = "fp32"


@dataclass
class ProbeResult:
    """One backbone's scores and the crops they were measured on."""

    knn_accuracy: float
    linear_accuracy: float
    majority_accuracy: float  # always answering the most frequent training class: the chance floor
    k: int
    stage: str
    train_images: int
    test_images: int
    train_crops: int
    test_crops: int
    classes: dict[str, int]  # crops per class, training and test together

    def as_dict(self) -> dict:
        """Plain JSON values."""
        return asdict(self)


def resnet_trunk(module: nn.Module) -> nn.Module:
    """The torchvision ResNet inside a module (itself, a detector backbone's body, a method's encoder...)."""
    for candidate in module.modules():
        if all(hasattr(candidate, name) for name in ("conv1", "bn1", "relu", "maxpool", "layer1")):
            return candidate
    raise SocoError(f"{type(module).__name__} holds no torchvision ResNet (conv1, bn1, layer1...) to probe")


def stage_features(trunk: nn.Module, images: torch.Tensor, stage: str) -> torch.Tensor:
    """The feature map of one stage ('c2'..'c5') of a ResNet trunk for normalised images (B, 3, H, W)."""
    last_layer, _ = STAGES[stage]
    x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(images))))
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        if not hasattr(trunk, layer):
            raise SocoError(f"the backbone has no {layer} (a truncated ResNet): probe an earlier stage than {stage}")
        x = getattr(trunk, layer)(x)
        if layer == last_layer:
            return x
    raise AssertionError(stage)


def sample_background_boxes(boxes: torch.Tensor, width: int, height: int, count: int,
                            generator: torch.Generator, max_iou: float = BACKGROUND_MAX_IOU) -> torch.Tensor:
    """Up to `count` boxes (XYXY) inside the image, each the size of a random labelled box, overlapping none.

    "Overlapping" means an IoU of `max_iou` or more with a labelled box; fewer boxes come back when the
    objects leave no room.
    """
    found = []
    sizes = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1.0)
    for _ in range(count * BACKGROUND_TRIES):
        if len(found) == count:
            break
        w, h = sizes[int(torch.randint(len(sizes), (1,), generator=generator))].tolist()
        w, h = min(w, width), min(h, height)
        x, y = (torch.rand(2, generator=generator, dtype=torch.float64) * torch.tensor([width - w, height - h],
                                                                                    dtype=torch.float64)).tolist()
        candidate = torch.tensor([[x, y, x + w, y + h]], dtype=boxes.dtype)
        if float(box_iou(candidate, boxes).max()) < max_iou:
            found.append(candidate)
    return torch.cat(found) if found else boxes.new_zeros((0, 4))


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 k: int = KNN_K) -> tuple[float, int]:
    """(accuracy, k used) of a cosine k-NN majority vote; ties go to the class with the larger summed similarity."""
    k = min(k, len(train_x))
    similarity = F.normalize(test_x.double(), dim=1) @ F.normalize(train_x.double(), dim=1).T
    top_similarity, top_index = similarity.topk(k, dim=1)
    neighbour_labels = train_y[top_index]
    classes = int(max(train_y.max(), test_y.max())) + 1
    counts = torch.zeros(len(test_x), classes, dtype=torch.float64).scatter_add_(
        1, neighbour_labels, torch.ones_like(top_similarity))
    summed = torch.zeros_like(counts).scatter_add_(1, neighbour_labels, top_similarity)
    # A count outweighs any summed similarity (|sum| <= k), so the similarity only breaks ties.
    predicted = (counts * (2 * k + 1) + summed).argmax(dim=1)
    return float((predicted == test_y).double().mean()), k


def _fit_logistic(train_z: torch.Tensor, train_y: torch.Tensor, classes: int, steps: int, l2: float):
    """(weight, bias) of a multinomial logistic regression with L2 `l2`, fitted full-batch with L-BFGS from zero."""
    weight = torch.zeros(train_z.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    # L-BFGS, as scikit-learn fits logistic regression: it reaches the optimum of this convex loss in far
    # fewer steps than a first-order method, whose answer would depend on its learning rate.
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(train_z @ weight + bias, train_y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _standardised(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean = train_x.mean(dim=0)
    std = train_x.std(dim=0, unbiased=False).clamp(min=1e-6)  # dead units would divide by zero
    return [(x - mean) / std for x in (train_x, *others)]


def choose_l2(train_x: torch.Tensor, train_y: torch.Tensor, steps: int = LINEAR_STEPS,
              grid: Sequence[float] = LINEAR_L2_GRID, folds: int = LINEAR_CV_FOLDS) -> float:
    """The L2 of `grid` with the best mean accuracy over `folds` contiguous folds of the training crops (crops come
    grouped by image, so a fold holds whole images but at its edges); ties go to the stronger L2."""
    classes = int(train_y.max()) + 1
    bounds = [round(i * len(train_x) / folds) for i in range(folds + 1)]
    scores = []
    for l2 in grid:
        correct = 0
        for start, stop in zip(bounds, bounds[1:]):
            held = torch.zeros(len(train_x), dtype=torch.bool)
            held[start:stop] = True
            fit_z, held_z = _standardised(train_x[~held], train_x[held])
            weight, bias = _fit_logistic(fit_z, train_y[~held], classes, steps, l2)
            correct += int(((held_z @ weight + bias).argmax(dim=1) == train_y[held]).sum())
        scores.append((correct, l2))
    return max(scores)[1]  # (most correct, then the larger l2)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, steps: int = LINEAR_STEPS, l2: float | None = None) -> float:
    """Test accuracy of a logistic regression fitted on standardised training features, from zero weights.

    `l2` None: the strength is cross-validated on the training crops over LINEAR_L2_GRID (`choose_l2`).
    """
    if l2 is None:
        l2 = choose_l2(train_x, train_y, steps)
    train_z, test_z = _standardised(train_x, test_x)
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight, bias = _fit_logistic(train_z, train_y, classes, steps, l2)
    predicted = (test_z @ weight + bias).argmax(dim=1)
    return float((predicted == test_y).double().mean())


def _class_names(dataset, labels: list[int]) -> dict[int, str]:
    """Name of each dataset label: the COCO category name when the data set knows it."""
    to_category = getattr(dataset, "label_to_category", {})
    names = getattr(dataset, "category_names", {})
    return {label: str(names.get(to_category.get(label), f"class {label}")) for label in labels}


@dataclass
class _Crops:
    """The boxes of the probed images, their features per backbone, classes and split."""

    features: dict[str, list[torch.Tensor]]
    labels: list[torch.Tensor]


def probe_backbones(
    backbones: Mapping[str, nn.Module],
    dataset: Sequence,
    *,
    stage: str = "c5",
    k: int = KNN_K,
    linear_steps: int = LINEAR_STEPS,
    background: bool = True,
    test_fraction: float = 0.5,
    max_images: int | None = None,
    seed: int = 0,
    progress: bool = False,
    test_dataset: Sequence | None = None,
) -> dict[str, ProbeResult]:
    """Probe several backbones on the same crops of `dataset`; {name: ProbeResult}.

    `dataset[i]` is (image (3, H, W) float in [0, 1], {"boxes": (N, 4) XYXY pixels, "labels": (N,)}), as
    `soco.labelled.coco.CocoDetection` gives it. Images without boxes are skipped; `max_images`
    caps the images with boxes, taken in a seeded order. With `background`, each image adds as many
    boxes drawn away from its objects, of class "background" (so that a file of one category still
    measures something: object against background).

    `test_dataset`: the test crops come from its images and the training crops from all of `dataset`'s
    (`test_fraction` unused; `max_images` caps each), e.g. a validation file whose objects the training
    file never shows. Both must number their classes alike (the same category list).
    """
    if stage not in STAGES:
        raise ConfigError(f"stage: {stage!r} is not one of {', '.join(STAGES)}")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction: {test_fraction} is not between 0 and 1")
    source = getattr(dataset, "annotation_file", "the data set")
    picked, tested = _embed(backbones, dataset, test_dataset, stage, background, max_images, seed, progress)
    picked, is_test = _split(picked, tested, dataset, test_dataset, test_fraction, source)
    labels = torch.cat(picked.labels)
    test_mask = torch.cat([torch.full((len(y),), t) for y, t in zip(picked.labels, is_test)])
    if len(labels[~test_mask].unique()) < 2:
        raise DataError(f"{source}: the probe's training images hold one class only; it needs two "
                        "(keep the background boxes, or use more images)")
    classes, shared = _classes(dataset, labels, test_mask)
    shared.update(stage=stage, train_images=len(is_test) - sum(is_test), test_images=sum(is_test))
    train_c, test_c = classes[~test_mask], classes[test_mask]
    results = {}
    for name in backbones:
        features = torch.cat(picked.features[name]).float()
        train_x, test_x = features[~test_mask], features[test_mask]
        knn, used_k = knn_accuracy(train_x, train_c, test_x, test_c, k)
        linear = linear_probe_accuracy(train_x, train_c, test_x, test_c, steps=linear_steps)
        results[name] = ProbeResult(knn_accuracy=knn, linear_accuracy=linear, k=used_k, **shared)
    return results


def _embed(backbones: Mapping[str, nn.Module], dataset: Sequence, test_dataset: Sequence | None, stage: str,
           background: bool, max_images: int | None, seed: int, progress: bool) -> tuple[_Crops, _Crops | None]:
    """(crops of `dataset`, crops of `test_dataset` or None) embedded by every backbone in eval mode, modes restored."""
    trunks = {name: resnet_trunk(backbone) for name, backbone in backbones.items()}
    modes = {module: module.training for backbone in backbones.values() for module in backbone.modules()}
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    tested = None
    try:
        for backbone in backbones.values():
            backbone.eval()  # BatchNorm's running statistics, and no update of them
        with torch.no_grad():
            picked = _collect(trunks, dataset, order, stage, background, max_images, generator, progress)
            if test_dataset is not None:
                test_order = torch.randperm(len(test_dataset), generator=generator).tolist()
                tested = _collect(trunks, test_dataset, test_order, stage, background, max_images, generator,
                                  progress)
    finally:
        for module, training in modes.items():
            module.train(training)
    return picked, tested


def _split(picked: _Crops, tested: _Crops | None, dataset: Sequence, test_dataset: Sequence | None,
           test_fraction: float, source) -> tuple[_Crops, list[bool]]:
    """(every image's crops, test images first, and whether each image is a test image)."""
    if tested is None:
        images = len(picked.labels)
        if images < 2:
            raise DataError(f"{source}: {images} image(s) with boxes; a probe needs at least 2 (train and test)")
        test_images = min(images - 1, max(1, math.ceil(images * test_fraction)))
        return picked, [position < test_images for position in range(images)]
    for data, crops in ((dataset, picked), (test_dataset, tested)):
        if not crops.labels:
            raise DataError(f"{getattr(data, 'annotation_file', 'a data set')}: no image with boxes to probe")
    test_images = len(tested.labels)
    # Test images first, as in the split above.
    joined = _Crops({name: tested.features[name] + picked.features[name] for name in picked.features},
                    tested.labels + picked.labels)
    return joined, [position < test_images for position in range(len(joined.labels))]


def _classes(dataset: Sequence, labels: torch.Tensor, test_mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(each crop's contiguous class index, background last; the ProbeResult fields all backbones share)."""
    present = sorted(int(v) for v in labels.unique())
    names = _class_names(dataset, [v for v in present if v != 0])
    names[0] = BACKGROUND
    ordered = [v for v in present if v != 0] + ([0] if 0 in present else [])
    index = {value: i for i, value in enumerate(ordered)}
    classes = torch.tensor([index[int(v)] for v in labels])
    train_c, test_c = classes[~test_mask], classes[test_mask]
    counts = Counter(classes.tolist())
    majority = Counter(train_c.tolist()).most_common(1)[0][0]
    shared = {
        "majority_accuracy": float((test_c == majority).double().mean()),
        "train_crops": len(train_c), "test_crops": len(test_c),
        "classes": {names[value]: counts[index[value]] for value in ordered},
    }
    return classes, shared


def _collect(trunks: Mapping[str, nn.Module], dataset: Sequence, order: list[int], stage: str, background: bool,
             max_images: int | None, generator: torch.Generator, progress: bool) -> _Crops:
    """Embed the boxes (and background boxes) of the images in `order` with every trunk, in one pass."""
    from tqdm.auto import tqdm

    _, stride = STAGES[stage]
    crops = _Crops({name: [] for name in trunks}, [])
    bar = tqdm(total=max_images or len(order), unit="image", desc="probe", disable=not progress, dynamic_ncols=True)
    for position in order:
        if max_images is not None and len(crops.labels) >= max_images:
            break
        image, target = dataset[position]
        boxes = torch.as_tensor(target["boxes"]).as_subclass(torch.Tensor).float().reshape(-1, 4)
        if not len(boxes):
            continue
        labels = torch.as_tensor(target["labels"]).as_subclass(torch.Tensor).long().reshape(-1)
        image = torch.as_tensor(image).as_subclass(torch.Tensor).float()
        height, width = image.shape[-2:]
        if background:
            extra = sample_background_boxes(boxes, width, height, len(boxes), generator)
            boxes = torch.cat([boxes, extra])
            labels = torch.cat([labels, torch.zeros(len(extra), dtype=torch.long)])  # 0: torchvision's background
        pixels = normalize(image)[None]
        for name, trunk in trunks.items():
            device = next(trunk.parameters()).device
            feature = stage_features(trunk, pixels.to(device), stage)
            boxes_on = boxes.to(device)
            pooled = pool_rois(feature, boxes_on, torch.zeros(len(boxes), device=device, dtype=torch.long), stride,
                               POOL_SIZE, aligned=True)
            crops.features[name].append(pooled.float().mean(dim=(2, 3)).cpu())
        crops.labels.append(labels)
        bar.update(1)
    bar.close()
    return crops


def pretrained_trunk(depth: int, seed: int, state: Mapping[str, torch.Tensor] | None = None, name=None):
    """(ResNet body of a freshly built detector, load report or None): the random floor with `seed`, or with a
    weights file's tensors loaded (its FPN and head widths, so that every tensor it holds loads)."""
    from soco.transfer.detector import build_detector, load_pretrained
    from soco.transfer.weights import detector_widths

    torch.manual_seed(seed)
    widths = detector_widths(state) if state is not None else {}
    model = build_detector("faster_rcnn", num_classes=2, depth=depth, **widths)
    report = load_pretrained(model, state, name=name) if state is not None else None
    return model.backbone.body, report


def probe_backbone(backbone: nn.Module, dataset: Sequence, **options) -> ProbeResult:
    """Probe one backbone (see probe_backbones for the options); e.g. a trainer's online encoder every N steps."""
    return probe_backbones({"backbone": backbone}, dataset, **options)["backbone"]


def format_table(results: Mapping[str, ProbeResult], title: str = "") -> str:
    """The readable table `soco probe` prints: one row per backbone, then the majority-class floor."""
    first = next(iter(results.values()))
    classes = ", ".join(f"{name} {count}" for name, count in first.classes.items())
    lines = [title] if title else []
    lines.append(f"{first.stage} box features, {first.train_crops} training crops from {first.train_images} "
                 f"images, {first.test_crops} test crops from {first.test_images} other images; classes: {classes}")
    width = max(len(name) for name in [*results, "majority class"])
    lines.append(f"{'':{width}}  {f'k-NN (k={first.k})':>12}  {'linear probe':>12}")
    for name, result in results.items():
        lines.append(f"{name:{width}}  {100 * result.knn_accuracy:11.1f}%  {100 * result.linear_accuracy:11.1f}%")
    floor = 100 * first.majority_accuracy
    lines.append(f"{'majority class':{width}}  {floor:11.1f}%  {floor:11.1f}%")
    return "\n".join(lines)

"""Tests of soco.transfer.probe and `soco probe`: scores by hand, background boxes, a trained vs a random trunk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from soco.cli.main import main
from soco.data.views import normalize
from soco.errors import DataError, SocoError
from soco.models.backbone import build_resnet, build_resnet_fpn
from soco.models.roi_pooling import pool_rois
from soco.transfer.probe import (
    LINEAR_L2_GRID,
    format_table,
    knn_accuracy,
    choose_l2,
    linear_probe_accuracy,
    probe_backbone,
    probe_backbones,
    resnet_trunk,
    sample_background_boxes,
    stage_features,
)
from tests.transfer import make_coco_set


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class TinyTrunk(nn.Module):
    """A ResNet-shaped trunk (torchvision's attribute names and strides 2, 4, 4, 8, 16, 32) of 16 channels."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)

        def stage(stride):
            return nn.Sequential(nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())

        self.layer1, self.layer2, self.layer3, self.layer4 = stage(1), stage(2), stage(2), stage(2)


STRIPE = 24  # side of a striped square
PLACES = ((4, 4), (36, 4), (20, 36))


def striped_images(count: int, seed: int) -> list:
    """64x64 noise images with three squares each: class 1 has horizontal stripes, class 2 vertical, random colours."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:STRIPE, 0:STRIPE]
    samples = []
    for _ in range(count):
        image = rng.uniform(0.3, 0.7, (3, 64, 64)).astype(np.float32)
        boxes, labels = [], []
        for x, y in PLACES:
            label = int(rng.integers(1, 3))
            stripes = (rows // 3) % 2 if label == 1 else (cols // 3) % 2
            colour = rng.uniform(0, 1, 3)[:, None, None]
            image[:, y:y + STRIPE, x:x + STRIPE] = np.where(stripes[None] == 1, colour, 1 - colour)
            boxes.append([x, y, x + STRIPE, y + STRIPE])
            labels.append(label)
        samples.append((torch.from_numpy(image), {"boxes": torch.tensor(boxes, dtype=torch.float32),
                                                  "labels": torch.tensor(labels)}))
    return samples


def train_on_stripes(trunk: nn.Module, steps: int = 15) -> None:
    """A few supervised steps: RoI features of the squares (C3) through a linear classifier."""
    data = striped_images(32, seed=1)
    head = nn.Linear(16, 3)
    optimizer = torch.optim.Adam([*trunk.parameters(), *head.parameters()], lr=0.01)
    for step in range(steps):
        batch = data[(step * 4) % len(data):][:4]
        features = stage_features(trunk, torch.stack([normalize(image) for image, _ in batch]), "c3")
        boxes = torch.cat([target["boxes"] for _, target in batch])
        labels = torch.cat([target["labels"] for _, target in batch])
        pooled = pool_rois(features, boxes, torch.arange(len(batch)).repeat_interleave(len(PLACES)), 8, 7)
        loss = F.cross_entropy(head(pooled.mean(dim=(2, 3))), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_probe_separates_a_trained_trunk_from_a_random_one():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        trained, random = TinyTrunk(), TinyTrunk()
        train_on_stripes(trained)
    results = probe_backbones({"trained": trained, "random": random}, striped_images(32, seed=2), stage="c3",
                              background=False)
    good, floor = results["trained"], results["random"]
    # 32 images, half held out, 3 squares each; the classes are 57 horizontal and 39 vertical squares.
    assert (good.train_images, good.test_images, good.train_crops, good.test_crops) == (16, 16, 48, 48)
    assert good.classes == {"class 1": 57, "class 2": 39} and good.k == 20
    assert good.knn_accuracy >= 0.95 and good.linear_accuracy >= 0.95
    # Measured (k-NN / linear): 100 / 97.9 against 79.2 / 85.4 for the random trunk, 62.5 for the majority class.
    assert good.knn_accuracy - floor.knn_accuracy >= 0.15
    assert good.linear_accuracy - floor.linear_accuracy >= 0.1
    assert floor.majority_accuracy == good.majority_accuracy == pytest.approx(30 / 48)


def test_knn_votes_by_hand():
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_y = torch.tensor([0, 0, 1])
    test_x = torch.tensor([[1.0, 0.05], [0.1, 1.0]])
    test_y = torch.tensor([0, 1])
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=1) == (1.0, 1)
    # With all three neighbours class 0 wins 2 votes to 1 for both test points.
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=3) == (0.5, 3)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=20) == (0.5, 3)  # k capped at the crops there are
    # One vote each: the larger cosine similarity decides (0.8 for class 0 against 0.6 for class 1).
    two_x, two_y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    assert knn_accuracy(two_x, two_y, torch.tensor([[0.8, 0.6]]), torch.tensor([0]), k=2) == (1.0, 2)
    assert knn_accuracy(two_x, two_y, torch.tensor([[0.6, 0.8]]), torch.tensor([0]), k=2) == (0.0, 2)


def test_linear_probe_fits_a_separable_set_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=generator)
    y = (x[:, 3] > 0).long()  # one direction decides the class
    # 0.94 at the optimum (100 samples, 7 noise dimensions); an under-fitted model (300 Adam steps) gets 0.89.
    assert linear_probe_accuracy(x[:100], y[:100], x[100:], y[100:]) >= 0.9
    noise_labels = torch.randint(0, 2, (200,), generator=generator)
    assert linear_probe_accuracy(x[:100], noise_labels[:100], x[100:], noise_labels[100:]) <= 0.65
    # Deterministic: zero initial weights and full batches.
    assert linear_probe_accuracy(x[:100], y[:100], x[100:], y[100:]) == linear_probe_accuracy(
        x[:100], y[:100], x[100:], y[100:])


def test_cross_validated_l2_keeps_a_few_crops_in_many_dimensions_from_overfitting():
    # As many training crops as dimensions (240 crops of 256-wide c4 features, as a 27-image probe has): a weak
    # L2 interpolates the training crops and generalises worst there. The class shifts every dimension a little.
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(446) % 2
    x = torch.randn(446, 256, generator=generator) + 0.08 * (2 * y[:, None].float() - 1)
    weak = linear_probe_accuracy(x[:240], y[:240], x[240:], y[240:], l2=LINEAR_L2_GRID[0])
    chosen = choose_l2(x[:240], y[:240])
    assert chosen == 10.0
    crossed = linear_probe_accuracy(x[:240], y[:240], x[240:], y[240:])
    assert crossed == linear_probe_accuracy(x[:240], y[:240], x[240:], y[240:], l2=chosen)
    assert weak == pytest.approx(0.811, abs=0.01) and crossed == pytest.approx(0.879, abs=0.01)


def test_background_boxes_are_inside_and_away_from_objects():
    objects = torch.tensor([[10.0, 10.0, 30.0, 40.0], [50.0, 5.0, 60.0, 15.0]])
    found = sample_background_boxes(objects, 80, 60, 10, torch.Generator().manual_seed(3))
    assert found.shape == (10, 4)
    assert (found[:, :2] >= 0).all() and (found[:, 2] <= 80).all() and (found[:, 3] <= 60).all()
    from torchvision.ops import box_iou

    assert float(box_iou(found, objects).max()) < 0.3
    sizes = {tuple(round(v, 4) for v in size) for size in (found[:, 2:] - found[:, :2]).tolist()}
    assert sizes <= {(20.0, 30.0), (10.0, 10.0)}  # each the size of one of the objects
    # An object filling the image leaves no room: no background box.
    full = torch.tensor([[0.0, 0.0, 80.0, 60.0]])
    assert sample_background_boxes(full, 80, 60, 5, torch.Generator().manual_seed(0)).shape == (0, 4)


def test_probe_restores_modes_and_touches_no_random_state():
    trunk = TinyTrunk()
    trunk.train()
    trunk.layer2.eval()  # a frozen part stays frozen
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    state = torch.get_rng_state()
    result = probe_backbone(trunk, striped_images(4, seed=5), stage="c3")
    assert torch.equal(torch.get_rng_state(), state)
    assert trunk.training and trunk.layer1.training and not trunk.layer2.training and not trunk.layer2[1].training
    assert all(torch.equal(before[k], v) for k, v in trunk.state_dict().items())  # BN statistics untouched
    # With background boxes: two images of 3 squares (and up to 3 background boxes each) per side.
    assert (result.train_images, result.test_images) == (2, 2) and result.train_crops <= 12
    assert list(result.classes)[-1] == "background"


def test_trunk_is_found_in_detector_bodies_and_resnets():
    fpn = build_resnet_fpn(18)
    assert resnet_trunk(fpn) is fpn.body
    resnet = build_resnet(18)
    assert resnet_trunk(resnet) is resnet
    features = stage_features(fpn.body, torch.zeros(1, 3, 64, 96), "c4")
    assert features.shape == (1, 256, 4, 6)  # stride 16, ResNet-18's layer3 width
    with pytest.raises(SocoError, match="holds no torchvision ResNet"):
        resnet_trunk(nn.Linear(2, 2))


def test_a_separate_test_set_gives_every_test_crop_and_trains_on_every_other():
    train = striped_images(10, seed=4)
    # Test images of vertical stripes only (class 2), so the majority floor shows where the test crops came from.
    test = [(image, {"boxes": target["boxes"], "labels": torch.full((3,), 2)}) for image, target in
            striped_images(6, seed=5)]
    result = probe_backbone(TinyTrunk(), train, stage="c3", background=False, test_dataset=test)
    horizontal = sum(int((target["labels"] == 1).sum()) for _, target in train)
    assert (result.train_images, result.test_images, result.train_crops, result.test_crops) == (10, 6, 30, 18)
    assert result.classes == {"class 1": horizontal, "class 2": 30 - horizontal + 18}
    assert result.majority_accuracy == (1.0 if horizontal < 15 else 0.0)
    with pytest.raises(DataError, match="no image with boxes to probe"):
        probe_backbone(TinyTrunk(), train, stage="c3", background=False, test_dataset=[])


def test_too_few_images_or_one_class_is_an_error():
    with pytest.raises(DataError, match="1 image\\(s\\) with boxes; a probe needs at least 2"):
        probe_backbone(TinyTrunk(), striped_images(1, seed=0), stage="c3")
    one_class = [(image, {"boxes": target["boxes"], "labels": torch.ones(3, dtype=torch.long)})
                 for image, target in striped_images(4, seed=0)]
    with pytest.raises(DataError, match="one class only"):
        probe_backbone(TinyTrunk(), one_class, stage="c3", background=False)


@pytest.mark.slow
def test_cli_probe_writes_table_and_json(tmp_path, capsys):
    annotations, _ = make_coco_set(tmp_path / "set", count=4, size=(64, 48))
    weights = tmp_path / "backbone.pt"
    torch.manual_seed(1)
    state = {k: v for k, v in build_resnet(18, zero_init_residual=False).state_dict().items()
             if not k.startswith("fc.")}
    torch.save(state, weights)  # what `soco export --to backbone` writes
    out = tmp_path / "probe"
    assert main(["probe", "--weights", str(weights), "--labels", str(annotations), "--out", str(out),
                 "--stage", "c4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "weights " in printed and "backbone.body (" in printed  # load_pretrained's report line
    assert "probe of ResNet-18" in printed  # depth read from the file
    assert "pretrained (backbone.pt)" in printed and "random init" in printed and "majority class" in printed
    record = json.loads((out / "probe.json").read_text())
    assert record["depth"] == 18 and set(record["results"]) == {"pretrained (backbone.pt)", "random init"}
    assert record["precision"] == "fp32"
    result = record["results"]["random init"]
    # 4 images of 2 boxes: 2 images per side; the single category "box" against background.
    assert (result["train_images"], result["test_images"]) == (2, 2)
    assert list(result["classes"]) == ["box", "background"] and result["classes"]["box"] == 8
    assert 0.0 <= result["knn_accuracy"] <= 1.0 and result["stage"] == "c4"


@pytest.mark.slow
def test_cli_probe_tests_on_a_second_file(tmp_path, capsys):
    train, _ = make_coco_set(tmp_path / "train", count=3, size=(64, 48), seed=1)
    val, _ = make_coco_set(tmp_path / "val", count=2, size=(64, 48), seed=2)
    out = tmp_path / "probe"
    assert main(["probe", "--weights", "none", "--depth", "18", "--labels", str(train), "--test-labels", str(val),
                 "--out", str(out), "--quiet"]) == 0
    assert f"(test: {val})" in capsys.readouterr().out
    record = json.loads((out / "probe.json").read_text())
    result = record["results"]["random init"]
    # Every image of each file: 2 boxes and 2 background boxes per image.
    assert (result["train_images"], result["test_images"], result["train_crops"], result["test_crops"]) == (3, 2, 12, 8)
    assert record["test_labels"] == str(val) and record["test_fraction"] is None
    # A test file whose category 1 has another name means another class: refused, in one line.
    val.write_text(val.read_text().replace('"name": "box"', '"name": "tree"'))
    assert main(["probe", "--weights", "none", "--depth", "18", "--labels", str(train), "--test-labels", str(val),
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "category 1 is 'tree', but 'box' in" in err
    assert main(["probe", "--weights", "none", "--labels", str(train), "--test-data", str(tmp_path)]) == 2
    assert "--test-data needs --test-labels" in capsys.readouterr().err


def test_cli_probe_errors_are_one_line(tmp_path, capsys):
    annotations, _ = make_coco_set(tmp_path / "set", count=2, size=(64, 48))
    assert main(["probe", "--weights", str(tmp_path / "nope.pt"), "--labels", str(annotations)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.pt does not exist" in err
    assert main(["probe", "--weights", "none", "--labels", str(annotations), "--no-background", "--quiet",
                 "--out", str(tmp_path / "p"), "--depth", "18"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "annotations.json: the probe's training images hold one class only" in err
    weights = tmp_path / "r18.pt"
    torch.save({k: v for k, v in build_resnet(18).state_dict().items() if not k.startswith("fc.")}, weights)
    assert main(["probe", "--weights", str(weights), "--labels", str(annotations), "--depth", "34"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "r18.pt holds a ResNet-18, but depth is 34: pass --depth 18" in err


def test_format_table_rows():
    results = probe_backbones({"a": TinyTrunk()}, striped_images(4, seed=1), stage="c3", background=False)
    result = results["a"]
    table = format_table(results, title="T").splitlines()
    assert table[0] == "T" and table[2].split() == ["k-NN", "(k=6)", "linear", "probe"]  # 2 images x 3 squares
    assert table[3].split() == ["a", f"{100 * result.knn_accuracy:.1f}%", f"{100 * result.linear_accuracy:.1f}%"]
    assert table[4].split()[:2] == ["majority", "class"]


def test_cli_probe_refuses_a_category_id_given_twice(tmp_path, capsys):
    train, _ = make_coco_set(tmp_path / "train", count=2, size=(64, 48), seed=1)
    val, _ = make_coco_set(tmp_path / "val", count=2, size=(64, 48), seed=2)
    doubled = json.loads(val.read_text())
    # The second entry would relabel every box of category 1 as a class of its own.
    doubled["categories"].append({"id": 1, "name": "tree"})
    val.write_text(json.dumps(doubled))
    out = tmp_path / "probe"
    for labels, test_labels in ((train, val), (val, train)):
        assert main(["probe", "--weights", "none", "--depth", "18", "--labels", str(labels),
                     "--test-labels", str(test_labels), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err == f"soco: error: {val}: category id 1 appears twice, as 'box' and as 'tree'\n"
    assert not out.exists()

"""The SCRL method: its network as released, the loss over box pairs, images without boxes, momentum, presets."""

import copy
import math

import pytest
import torch
from torchvision.ops import roi_align

from soco.config.loading import load_config
from soco.data.dataset import ImageDataset
from soco.methods.losses import byol_regression
from soco.methods.scrl import SCRL


def tiny(*overrides):
    return load_config("scrl_tiny", list(overrides))


def make_batch(boxes_per_image, size=64, seed=0):
    """Random views and box pairs: `boxes_per_image[b]` pairs for image b."""
    g = torch.Generator().manual_seed(seed)
    count = sum(boxes_per_image)
    corners = torch.rand(count, 2, generator=g) * size / 2
    boxes = torch.cat([corners, corners + 12 + torch.rand(count, 2, generator=g) * size / 3], dim=1).clamp(max=size)
    batch_size = len(boxes_per_image)
    return {
        "views": {"v1": torch.randn(batch_size, 3, size, size, generator=g),
                  "v2": torch.randn(batch_size, 3, size, size, generator=g)},
        "boxes": {"v1": boxes, "v2": (boxes + 2).clamp(max=size)},
        "box_image": torch.repeat_interleave(torch.arange(batch_size), torch.tensor(boxes_per_image)),
        "boxes_per_image": torch.tensor(boxes_per_image),
    }


def test_network_is_the_releases():
    torch.manual_seed(0)
    method = SCRL(load_config("scrl_r50_200ep").method)
    online = method.online
    assert online.projector.linear1.in_features == 2048 and online.projector.linear2.out_features == 256
    assert online.projector.linear1.out_features == 4096 and online.projector.linear2.bias is None
    assert method.predictor.linear2.bias is None and online.aligned is False and online.output_size == 1
    # torchvision's default initialisation: the last BN of a block is not zeroed
    assert online.backbone.body.layer1[0].bn3.weight.abs().sum() > 0
    assert method.encoder_layout().parts == ("backbone",) and method.encoder_layout().kind == "c5"


def test_box_vectors_are_roi_align_1x1_on_c5_unaligned():
    torch.manual_seed(0)
    method = SCRL(tiny().method).eval()
    batch = make_batch([2, 1])
    images = batch["views"]["v1"]
    c5 = method.online.backbone(images)["0"]
    rois = torch.cat([batch["box_image"][:, None].float(), batch["boxes"]["v1"]], dim=1)
    expected = roi_align(c5, rois, 1, 1 / 32, -1, aligned=False).flatten(1)
    got = method.online.representations(images, batch["boxes"]["v1"], batch["box_image"])
    torch.testing.assert_close(got, expected)


def test_loss_is_the_symmetric_byol_regression_averaged_over_pairs():
    torch.manual_seed(0)
    method = SCRL(tiny().method)
    batch = make_batch([3, 2])
    outputs = method.training_step(batch)
    # by hand from the networks, both views in one batch as the method runs them
    images = torch.cat([batch["views"]["v1"], batch["views"]["v2"]])
    index = torch.cat([batch["box_image"], batch["box_image"] + 2])
    boxes = torch.cat([batch["boxes"]["v1"], batch["boxes"]["v2"]])
    reference = copy.deepcopy(method)
    torch.manual_seed(0)
    q = reference.predictor(reference.online(images, boxes, index))
    with torch.no_grad():
        z = reference.target(images, boxes, index)
    expected = (byol_regression(q[:5], z[5:]) + byol_regression(q[5:], z[:5])).mean()
    torch.testing.assert_close(outputs["loss"], expected, rtol=1e-5, atol=1e-6)
    assert 0 <= outputs["loss"].item() <= 8
    assert outputs["box_pairs"].item() == 5 and outputs["images_with_boxes"].item() == 2


def test_an_image_without_boxes_contributes_nothing():
    torch.manual_seed(0)
    method = SCRL(tiny().method).eval()  # BN on running statistics, so the batch's other image cannot matter
    with_empty = make_batch([3, 0])
    alone = {"views": {k: v[:1] for k, v in with_empty["views"].items()}, "boxes": with_empty["boxes"],
             "box_image": with_empty["box_image"], "boxes_per_image": with_empty["boxes_per_image"][:1]}
    torch.testing.assert_close(method.training_step(with_empty)["loss"], method.training_step(alone)["loss"])


def test_a_batch_without_any_box_gives_zero_loss_and_zero_gradients_not_a_crash():
    torch.manual_seed(0)
    method = SCRL(tiny().method)
    outputs = method.training_step(make_batch([0, 0, 0]))
    assert outputs["loss"].item() == 0.0 and outputs["box_pairs"].item() == 0
    outputs["loss"].backward()
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert all(p.grad is not None and not p.grad.any() for p in trainable)


def test_target_starts_as_the_online_copy_and_follows_the_cosine_schedule_from_0_97():
    torch.manual_seed(0)
    method = SCRL(tiny().method)
    for online, target in zip(method.online.parameters(), method.target.parameters()):
        assert torch.equal(online, target) and not target.requires_grad
    before = copy.deepcopy(method.target.state_dict())
    with torch.no_grad():
        for param in method.online.parameters():
            param.add_(1.0)
    metrics = method.after_optimizer_step(step=25, total_steps=100)
    momentum = 1 - (1 - 0.97) * (math.cos(math.pi * 25 / 100) + 1) / 2
    assert metrics["ema_momentum"] == pytest.approx(momentum)
    online = method.online.state_dict()
    for name, param in method.target.named_parameters():
        torch.testing.assert_close(param, momentum * before[name] + (1 - momentum) * online[name])
    assert load_config("scrl_r50_1000ep").method.ema_base == 0.996


def test_lars_excludes_every_norm_and_bias_by_type_not_by_name():
    method = SCRL(tiny().method)
    adapted, excluded = method.parameter_groups(1e-6)
    excluded_ids = {id(p) for p in excluded["params"]}
    # the two the release's name filter misses: the downsample BN and the MLPs' BN
    assert id(method.online.backbone.body.layer2[0].downsample[1].weight) in excluded_ids
    assert id(method.predictor.norm.weight) in excluded_ids and id(method.online.projector.norm.bias) in excluded_ids
    assert id(method.online.projector.linear1.weight) not in excluded_ids
    assert adapted["weight_decay"] == 1e-6 and excluded["weight_decay"] == 0.0 and excluded["lars"] is False


def test_released_presets():
    short, long = load_config("scrl_r50_200ep"), load_config("scrl_r50_1000ep")
    assert short.method.name == long.method.name == "scrl"
    assert (short.optim.base_lr, short.optim.weight_decay, short.train.epochs) == (0.45, 1e-6, 200)
    assert (long.optim.base_lr, long.optim.weight_decay, long.train.epochs) == (0.2, 1.5e-6, 1000)
    assert short.optim.warmup_epochs == 10 and short.optim.warmup_start_factor == 0 and short.optim.final_lr == 0
    views = short.method.views
    assert (views.size, views.crop_scale, views.boxes_per_image, views.min_box_size) == (224, [0.2, 1.0], 10, 32)
    assert views.blur == "resize" and views.box_jitter is False


def test_real_batches_of_the_tiny_data_have_box_pairs(tiny_data):
    images, _ = tiny_data
    method = SCRL(tiny().method)
    dataset = ImageDataset(images, None, method.sample_transform(), seed=0)
    batch = dataset.collate([dataset[i] for i in range(8)])
    assert batch["boxes"]["v1"].shape[0] == 10 * int((batch["boxes_per_image"] > 0).sum()) > 0
    assert torch.isfinite(method.training_step(batch)["loss"])

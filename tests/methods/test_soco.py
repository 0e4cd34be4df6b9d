"""The SoCo method: view pairs, EMA target update, the loss, pooling ways, level thresholds and presets."""

import copy

import pytest
import torch

from soco.config.loading import load_config
from soco.methods.soco import SoCo, view_pairs
from soco.methods.soco_transform import box_set_names


def tiny_config(*overrides):
    return load_config("soco_tiny", list(overrides))


def random_batch(config, batch_size=2, seed=0):
    """(views by name, boxes by set name, ids by set name): random views, K random boxes per set, ids 0..K-1."""
    generator = torch.Generator().manual_seed(seed)
    views_config = config.method.views
    sizes = {"v1": views_config.v1_size, "v2": views_config.v2_size, "v3": views_config.v3_size}
    views, boxes, ids = {}, {}, {}
    k = views_config.proposals_per_image
    for name, size in sizes.items():
        views[name] = torch.randn(batch_size, 3, size, size, generator=generator)
    for set_name in box_set_names(views_config):
        size = sizes[set_name.split(":")[0]]
        corner = torch.rand(batch_size, k, 2, generator=generator) * size * 0.5
        extent = 4 + torch.rand(batch_size, k, 2, generator=generator) * size * 0.5
        boxes[set_name] = torch.cat([corner, (corner + extent).clamp(max=size)], dim=-1)
        ids[set_name] = torch.arange(k).expand(batch_size, k)
    return views, boxes, ids


def test_view_pairs_of_each_preset():
    paper = load_config("soco_r50_fpn").method
    assert view_pairs(paper.model, paper.views) == [("v1:v2", "v2"), ("v1:v3", "v3")]
    # the release's SoCo*: a V2 resized to 112 that shares V2's pair sets (here v3) and its own 192 crop (v4)
    star = load_config("soco_star_r50_fpn").method
    assert view_pairs(star.model, star.views) == [("v1:v2", "v2"), ("v1:v2", "v3"), ("v1:v4", "v4")]
    c4 = load_config("soco_r50_c4").method
    assert view_pairs(c4.model, c4.views) == [("v1:v2", "v2")]
    no_v3 = tiny_config("method.views.use_v3=false").method
    assert view_pairs(no_v3.model, no_v3.views) == [("v1:v2", "v2")]
    shared = tiny_config("method.views.box_sets=shared").method
    assert view_pairs(shared.model, shared.views) == [("v1:v2", "v2"), ("v1:v2", "v3")]


def test_target_starts_equal_and_follows_by_ema():
    config = tiny_config()
    torch.manual_seed(0)
    model = SoCo(config.method)
    for online, target in zip(model.online.parameters(), model.target.parameters()):
        assert torch.equal(online, target) and not target.requires_grad
    before = copy.deepcopy(model.target.state_dict())
    with torch.no_grad():
        for param in model.online.parameters():
            param.add_(1.0)
    model.update_targets(0.75)
    online_state = model.online.state_dict()
    for name, param in model.target.named_parameters():
        torch.testing.assert_close(param, 0.75 * before[name] + 0.25 * online_state[name])


def test_loss_is_sum_of_four_directional_terms_in_range():
    config = tiny_config()
    torch.manual_seed(0)
    model = SoCo(config.method)
    views, boxes, ids = random_batch(config)
    loss = model.training_step({"views": views, "boxes": boxes, "box_ids": ids})["loss"]
    assert loss.shape == () and 0.0 <= loss.item() <= 16.0  # four terms, each within [0, 4]
    loss.backward()
    assert all(p.grad is not None for p in model.online.parameters())
    assert all(p.grad is None for p in model.target.parameters())


def test_per_level_loss_equals_all_level_masked_loss_in_eval_mode():
    per_level_config = tiny_config("method.model.pool_all_levels=false", "method.model.level_thresholds=[48,96,192]")
    all_level_config = tiny_config("method.model.pool_all_levels=true", "method.model.level_thresholds=[48,96,192]")
    torch.manual_seed(0)
    per_level = SoCo(per_level_config.method)
    all_level = SoCo(all_level_config.method)
    all_level.load_state_dict(per_level.state_dict())
    per_level.eval(), all_level.eval()
    views, boxes, ids = random_batch(per_level_config, seed=3)
    # boxes on both sides of the 48 px threshold, so that P2 and P3 are both used in 64 px views
    big = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 60.0, 60.0], [2.0, 2.0, 64.0, 64.0], [0.0, 0.0, 30.0, 40.0]])
    for name in ("v1:v2", "v2"):
        boxes[name] = big.expand(2, 4, 4).clone()
    torch.testing.assert_close(per_level.loss(views, boxes, ids), all_level.loss(views, boxes, ids), rtol=1e-5,
                               atol=1e-6)


def flat(config) -> dict:
    """A config as {dotted key: value}."""
    from soco.config.loading import config_to_dict

    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            out[prefix] = value

    walk("", config_to_dict(config))
    return out


def test_level_thresholds_scale_with_the_v1_size_unless_given():
    from soco.methods.soco import level_thresholds

    paper = load_config("soco_r50_fpn").method
    assert level_thresholds(paper.model, paper.views) == (48.0, 96.0, 192.0)
    small = load_config("soco_small").method
    assert level_thresholds(small.model, small.views) == pytest.approx((48 * 96 / 224, 96 * 96 / 224, 192 * 96 / 224))
    given = load_config("soco_small", ["method.model.level_thresholds=[10,20,30]"]).method
    assert level_thresholds(given.model, given.views) == (10.0, 20.0, 30.0)
    assert SoCo(tiny_config().method).online.pooler.thresholds == pytest.approx((48 * 64 / 224, 96 * 64 / 224, 192 * 64 / 224))


def level_gradients(config, tiny_data, images_per_batch=8):
    """|gradient| of each FPN output conv (P2..P5) after one SoCo step on real views of the tiny data."""
    from soco.data.dataset import ImageDataset

    images, store = tiny_data
    torch.manual_seed(0)
    method = SoCo(config.method)
    dataset = ImageDataset(images, store, method.sample_transform(), seed=0)
    batch = dataset.collate([dataset[i] for i in range(images_per_batch)])
    method.training_step(batch)["loss"].backward()
    fpn = method.online.backbone.fpn
    return [float(fpn.layer_blocks[level][0].weight.grad.abs().sum()) for level in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["soco_small", "soco_tiny"])
def test_every_pyramid_level_trains_in_the_small_presets(preset, tiny_data):
    assert all(g > 0 for g in level_gradients(load_config(preset), tiny_data))


@pytest.mark.slow
def test_with_the_224_thresholds_small_views_never_train_p5(tiny_data):
    # What the scaled thresholds fix: with 64-pixel views and 48/96/192, no box reaches P5.
    gradients = level_gradients(load_config("soco_tiny", ["method.model.level_thresholds=[48,96,192]"]), tiny_data)
    assert gradients[3] == 0.0 and gradients[0] > 0


TABLE4 = [
    ("table4_1_whole_image", {}),
    ("table4_2_selective_search", {"method.views.box_source": "proposals"}),
    ("table4_3_fpn", {"method.model.fpn": True, "method.model.scale_aware": False}),
    ("table4_4_head", {"method.model.head": True}),
    ("table4_5_scale_aware", {"method.model.scale_aware": True}),
    ("table4_6_box_jitter", {"method.views.box_jitter": True}),
    ("table4_7_multi_view", {"method.views.use_v3": True}),
]


def test_table4_presets_add_one_component_per_row_up_to_full_soco():
    baseline = flat(load_config("table4_1_whole_image"))
    assert flat(load_config("byol_image_r50")) == baseline
    assert baseline["method.views.box_source"] == "whole_image"
    assert baseline["method.model.fpn"] is False and baseline["method.model.head"] is False
    assert baseline["method.views.use_v3"] is False and baseline["method.views.box_jitter"] is False
    previous = baseline
    for preset, added in TABLE4[1:]:
        row = flat(load_config(preset))
        changed = {key: value for key, value in row.items() if previous[key] != value}
        assert changed == added, preset
        previous = row
    assert previous == flat(load_config("soco_r50_fpn"))


def test_image_level_baseline_is_global_average_pooling_of_c5_at_224():
    config = load_config("byol_image_r50", ["method.model.depth=18", "method.model.projector_hidden=64",
                                            "method.model.projection_dim=16"]).method
    torch.manual_seed(0)
    method = SoCo(config).eval()
    images = torch.randn(2, 3, 224, 224)
    whole = torch.tensor([[[0.0, 0.0, 224.0, 224.0]]] * 2)
    c5 = method.online.backbone(images)["0"]
    pooled = method.online.representations(images, whole)
    torch.testing.assert_close(pooled, c5.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    assert method.pairs == [("v1:v2", "v2")] and method.encoder_layout().parts == ("backbone",)


def test_fpn_and_head_start_from_the_release_s_weights():
    """The release's FPN convs are mmcv ConvModules (kaiming-normal, fan-out) and its head is plain PyTorch layers
    (kaiming-uniform a=sqrt(5)): at 256 channels the std of a 3x3 conv is sqrt(2 / 2304) and 1 / sqrt(3 * 2304)."""
    import math

    def weights(init):
        torch.manual_seed(0)
        model = SoCo(load_config("soco_small", [f"method.model.init={init}", "method.model.projector_hidden=64"]).method)
        fpn_conv = model.online.backbone.fpn.layer_blocks[0][0].weight
        head_conv = model.online.box_head[0][0].weight
        head_fc = [m for m in model.online.box_head.modules() if isinstance(m, torch.nn.Linear)][0]
        return fpn_conv, head_conv, head_fc

    fpn_conv, head_conv, head_fc = weights("release")
    assert fpn_conv.shape == head_conv.shape == (256, 256, 3, 3)
    assert fpn_conv.std().item() == pytest.approx(math.sqrt(2 / 2304), rel=0.02)
    assert fpn_conv.abs().max().item() > 4 * fpn_conv.std().item()  # normal, not uniform (max = 1.73 std)
    assert head_conv.std().item() == pytest.approx(1 / math.sqrt(3 * 2304), rel=0.02)
    assert head_conv.abs().max().item() <= 1.0001 / math.sqrt(2304)  # uniform within PyTorch's bound
    assert head_fc.weight.abs().max().item() <= 1.0001 / math.sqrt(256 * 49)
    fpn_conv, head_conv, _ = weights("torchvision")
    assert fpn_conv.std().item() == pytest.approx(1 / math.sqrt(2304), rel=0.02)  # kaiming-uniform a=1
    assert head_conv.std().item() == pytest.approx(math.sqrt(2 / 2304), rel=0.02)  # kaiming-normal fan-out


def test_the_paper_s_presets_run_head_projector_and_predictor_once_per_level_as_released():
    """SoCo_FPN.py 157-167: every box set goes through the head, projector and predictor on each of the 4 levels."""
    assert load_config("soco_r50_fpn").method.model.pool_all_levels is True
    assert load_config("soco_star_r50_fpn").method.model.pool_all_levels is True
    assert load_config("soco_small").method.model.pool_all_levels is False  # the CPU presets, with evidence

    def calls(pool_all_levels: str) -> dict[str, int]:
        config = tiny_config(f"method.model.pool_all_levels={pool_all_levels}")
        torch.manual_seed(0)
        model = SoCo(config.method)
        counted = {"head": 0, "predictor": 0}
        model.online.box_head.register_forward_hook(lambda *args: counted.__setitem__("head", counted["head"] + 1))
        model.predictor.register_forward_hook(lambda *args: counted.__setitem__("predictor", counted["predictor"] + 1))
        views, boxes, ids = random_batch(config)
        model.training_step({"views": views, "boxes": boxes, "box_ids": ids})
        return counted

    # 4 box sets (v1:v2, v2, v1:v3, v3) through the online network
    assert calls("true") == {"head": 16, "predictor": 16}
    assert calls("false") == {"head": 4, "predictor": 4}


def test_shared_box_sets_contrast_row_with_row_as_the_earlier_design():
    """Cycled padding repeats ids ([a, b, c, a]): the shared design contrasts rows, not ids, so a weighs 2 of 4 rows."""
    config = tiny_config("method.views.box_sets=shared")
    torch.manual_seed(0)
    model = SoCo(config.method)
    views, boxes, _ = random_batch(config)
    cycled = torch.tensor([[5, 7, 9, 5]]).expand(2, 4)
    rows = torch.arange(4).expand(2, 4)
    loss = model.loss(views, boxes, {name: cycled for name in boxes})
    torch.testing.assert_close(loss, model.loss(views, boxes, {name: rows for name in boxes}))


def test_the_c4_variant_refuses_a_third_view():
    from soco.errors import ConfigError

    with pytest.raises(ConfigError, match="use_v3"):
        load_config("soco_r50_c4", ["method.views.use_v3=true"])

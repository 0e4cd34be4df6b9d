"""The SoCo method: view pairs, EMA target update, and the per-level vs all-level loss equality."""

import copy

import pytest
import torch

from soco.config.loading import load_config
from soco.methods.soco import SoCo, view_pairs


def tiny_config(*overrides):
    return load_config("soco_tiny", list(overrides))


def random_batch(config, batch_size=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sizes = {"v1": config.views.v1_size, "v2": config.views.v2_size, "v3": config.views.v3_size}
    views, boxes = {}, {}
    k = config.views.proposals_per_image
    for name, size in sizes.items():
        views[name] = torch.randn(batch_size, 3, size, size, generator=generator)
        corner = torch.rand(batch_size, k, 2, generator=generator) * size * 0.5
        extent = 4 + torch.rand(batch_size, k, 2, generator=generator) * size * 0.5
        boxes[name] = torch.cat([corner, (corner + extent).clamp(max=size)], dim=-1)
    return views, boxes


def test_view_pairs_of_each_preset():
    assert view_pairs(load_config("soco_r50_fpn").model, load_config("soco_r50_fpn").views) == [("v1", "v2"), ("v1", "v3")]
    star = load_config("soco_star_r50_fpn")
    assert view_pairs(star.model, star.views) == [("v1", "v2"), ("v1", "v3"), ("v1", "v4")]
    c4 = load_config("soco_r50_c4")
    assert view_pairs(c4.model, c4.views) == [("v1", "v2")]
    no_v3 = tiny_config("views.use_v3=false")
    assert view_pairs(no_v3.model, no_v3.views) == [("v1", "v2")]


def test_target_starts_equal_and_follows_by_ema():
    config = tiny_config()
    torch.manual_seed(0)
    model = SoCo(config.model, config.views)
    for online, target in zip(model.online.parameters(), model.target.parameters()):
        assert torch.equal(online, target) and not target.requires_grad
    before = copy.deepcopy(model.target.state_dict())
    with torch.no_grad():
        for param in model.online.parameters():
            param.add_(1.0)
    model.update_target(0.75)
    online_state = model.online.state_dict()
    for name, param in model.target.named_parameters():
        torch.testing.assert_close(param, 0.75 * before[name] + 0.25 * online_state[name])


def test_loss_is_sum_of_four_directional_terms_in_range():
    config = tiny_config()
    torch.manual_seed(0)
    model = SoCo(config.model, config.views)
    views, boxes = random_batch(config)
    loss = model(views, boxes)
    assert loss.shape == () and 0.0 <= loss.item() <= 16.0  # four terms, each within [0, 4]
    loss.backward()
    assert all(p.grad is not None for p in model.online.parameters())
    assert all(p.grad is None for p in model.target.parameters())


def test_per_level_loss_equals_all_level_masked_loss_in_eval_mode():
    per_level_config = tiny_config()
    all_level_config = tiny_config("model.pool_all_levels=true")
    torch.manual_seed(0)
    per_level = SoCo(per_level_config.model, per_level_config.views)
    all_level = SoCo(all_level_config.model, all_level_config.views)
    all_level.load_state_dict(per_level.state_dict())
    per_level.eval(), all_level.eval()
    views, boxes = random_batch(per_level_config, seed=3)
    # boxes on both sides of the 48 px threshold, so that P2 and P3 are both used in 64 px views
    big = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 60.0, 60.0], [2.0, 2.0, 64.0, 64.0], [0.0, 0.0, 30.0, 40.0]])
    for name in ("v1", "v2"):
        boxes[name] = big.expand(2, 4, 4).clone()
    torch.testing.assert_close(per_level(views, boxes), all_level(views, boxes), rtol=1e-5, atol=1e-6)

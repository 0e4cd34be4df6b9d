"""SoCo's views: boxes land where the geometry says, sampling rules, jitter bounds, determinism, the options."""

import math

import pytest
import torch

from soco.data.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    blur_kernel_size,
    cut_out_boxes,
    denormalize,
    jitter_boxes,
    random_boxes,
    random_image_boxes,
    random_resized_crop,
)
from soco.config.validation import validate_section
from soco.errors import ConfigError
from soco.methods.soco_transform import RANDOM_CANDIDATES, SoCoTransform, box_set_names, make_views
from soco.methods.soco_transform import SoCoViewsConfig as ViewsConfig

WIDTH, HEIGHT = 200, 100
# Any crop of scale >= 0.5 and ratio in [3/4, 4/3] of a 200x100 image is >= 100 wide and >= 75
# tall, so it always overlaps this rectangle; its centre (90, 50) is off the middle, so flips show.
RECT = (50, 20, 130, 80)


def bright_rectangle_image(rect=RECT, width=WIDTH, height=HEIGHT) -> torch.Tensor:
    """A black uint8 image with one white rectangle x1 y1 x2 y2 (pixels x1..x2-1, y1..y2-1)."""
    image = torch.zeros((3, height, width), dtype=torch.uint8)
    x1, y1, x2, y2 = rect
    image[:, y1:y2, x1:x2] = 255
    return image


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def expected_box(box, params) -> list[float]:
    """Where an original-pixel box lands in a view, by hand: clip to the crop, shift, scale, flip."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left, top, right, bottom = params.region
    x1, x2 = min(max(x1, left), right) - left, min(max(x2, left), right) - left
    y1, y2 = min(max(y1, top), bottom) - top, min(max(y2, top), bottom) - top
    scale_x, scale_y = params.size / params.width, params.size / params.height
    out = [x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y]
    if params.flip:
        out = [params.size - out[2], out[1], params.size - out[0], out[3]]
    return out


def sets_with_params(out) -> list[tuple[str, torch.Tensor, object]]:
    """(set name, its boxes, the ViewParams of the view it lies in) for every box set of make_views' output."""
    params = {p.name: p for p in out["params"]}
    return [(name, boxes, params[name.split(":")[0]]) for name, boxes in out["boxes"].items()]


def bright_extent(view: torch.Tensor) -> list[float]:
    """x1 y1 x2 y2 (pixel edges) of the pixels brighter than mid-grey in a normalised view."""
    bright = denormalize(view).mean(0) > 0.5
    ys, xs = torch.nonzero(bright, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1]


def test_every_view_box_lands_on_the_bright_rectangle():
    config = ViewsConfig(box_jitter=False, use_v4=True, proposals_per_image=2)
    image = bright_rectangle_image()
    proposal = torch.tensor([RECT], dtype=torch.float32)
    flips = {name: set() for name in ("v1", "v2", "v3", "v4")}
    for seed in range(12):
        out = make_views(image, proposal, config, generator(seed), color_augment=False)
        assert out["view_names"] == ["v1", "v2", "v3", "v4"]
        assert list(out["boxes"]) == ["v1:v2", "v2", "v1:v3", "v3", "v1:v4", "v4"]
        # one proposal, padded to K=2 by repeating it
        assert all(ids.tolist() == [0, 0] for ids in out["box_ids"].values())
        views = dict(zip(out["view_names"], out["views"]))
        for set_name, boxes, params in sets_with_params(out):
            view = views[params.name]
            assert view.shape == (3, params.size, params.size)
            assert boxes.shape == (2, 4)
            torch.testing.assert_close(boxes[0], torch.tensor(expected_box(RECT, params)), atol=1e-3, rtol=0)
            assert torch.equal(boxes[0], boxes[1])
            # Pixels inside the box are the white ones: within a pixel of resampling blur.
            assert bright_extent(view) == pytest.approx(boxes[0].tolist(), abs=1.01)
            x1, y1, x2, y2 = boxes[0].tolist()
            rows = slice(math.ceil(y1) + 1, math.floor(y2) - 1)
            columns = slice(math.ceil(x1) + 1, math.floor(x2) - 1)
            inside = denormalize(view)[:, rows, columns]
            assert inside.mean() > 0.97
            flips[params.name].add(params.flip)
    assert all(states == {False, True} for states in flips.values())


def test_v1_box_by_hand_with_and_without_flip():
    image = bright_rectangle_image()
    proposal = torch.tensor([RECT], dtype=torch.float32)
    out = make_views(image, proposal, ViewsConfig(box_jitter=False, flip_prob=0.0), generator(0), color_augment=False)
    x1, y1, x2, y2 = RECT
    expected = [x1 * 224 / 200, y1 * 224 / 100, x2 * 224 / 200, y2 * 224 / 100]
    torch.testing.assert_close(out["boxes"]["v1:v2"][0], torch.tensor(expected), atol=1e-4, rtol=0)
    out = make_views(image, proposal, ViewsConfig(box_jitter=False, flip_prob=1.0), generator(0), color_augment=False)
    flipped = [224 - expected[2], expected[1], 224 - expected[0], expected[3]]
    torch.testing.assert_close(out["boxes"]["v1:v2"][0], torch.tensor(flipped), atol=1e-4, rtol=0)
    torch.testing.assert_close(out["boxes"]["v1:v3"][0], torch.tensor(flipped), atol=1e-4, rtol=0)
    assert all(params.flip for params in out["params"])


def test_v3_downsample_is_v2_scaled_exactly_with_its_own_flip():
    image = bright_rectangle_image()
    proposals = torch.tensor([RECT, [10, 10, 90, 60], [120, 30, 190, 95]], dtype=torch.float32)
    config = ViewsConfig(box_jitter=False, proposals_per_image=3, v3_mode="downsample")
    seen = set()
    for seed in range(16):
        out = make_views(image, proposals, config, generator(seed), color_augment=False)
        v2, v3 = out["params"][1], out["params"][2]
        assert (v3.top, v3.left, v3.height, v3.width) == (v2.top, v2.left, v2.height, v2.width)
        assert "v1:v3" not in out["boxes"] and torch.equal(out["box_ids"]["v3"], out["box_ids"]["v2"])
        expected = out["boxes"]["v2"] * (112 / 224)
        v2_small = torch.nn.functional.avg_pool2d(denormalize(out["views"][1])[None], 2)[0]
        if v3.flip != v2.flip:  # mirrored: x1' = 112 - x2, x2' = 112 - x1
            expected = torch.stack([112 - expected[:, 2], expected[:, 1], 112 - expected[:, 0], expected[:, 3]], 1)
            v2_small = v2_small.flip(-1)
        assert torch.equal(out["boxes"]["v3"], expected)
        # The picture is V2's too: V2 averaged over 2x2 blocks is V3 up to uint8 rounding.
        assert (v2_small - denormalize(out["views"][2])).abs().mean() < 0.02
        seen.add((v2.flip, v3.flip))
    assert seen == {(False, False), (False, True), (True, False), (True, True)}
    odd = ViewsConfig(box_jitter=False, v3_size=100, proposals_per_image=3, flip_prob=0.0, v3_mode="downsample")
    out = make_views(image, proposals, odd, generator(3), color_augment=False)
    torch.testing.assert_close(out["boxes"]["v3"], out["boxes"]["v2"] * (100 / 224), atol=1e-4, rtol=0)


def test_independent_v3_and_v4_have_their_own_crops_and_each_pair_s_boxes_meet_its_crop():
    image = bright_rectangle_image(width=300, height=300)
    # A grid of small proposals: many miss any one crop of scale [0.3, 0.5].
    proposals = torch.tensor(
        [[x, y, x + 30, y + 30] for x in range(0, 300, 40) for y in range(0, 300, 40)], dtype=torch.float32
    )
    config = ViewsConfig(use_v4=True, box_jitter=False, crop_scale=[0.3, 0.5], proposals_per_image=4)
    assert config.v3_mode == "independent"  # the release's own 112 crop is the default
    for seed in range(10):
        out = make_views(image, proposals, config, generator(seed), color_augment=False)
        params = {p.name: p for p in out["params"]}
        v2, v3, v4 = params["v2"], params["v3"], params["v4"]
        assert (v3.top, v3.left, v3.height, v3.width) != (v2.top, v2.left, v2.height, v2.width)
        assert [v3.size, v4.size] == [112, 192]
        for view in ("v2", "v3", "v4"):
            for set_name, where in ((view, params[view]), (f"v1:{view}", params["v1"])):
                for box, proposal_id in zip(out["boxes"][set_name], out["box_ids"][set_name].tolist()):
                    assert proposal_id >= 0
                    # the pair's proposals overlap the pair's crop: a box with area in that view
                    assert (box[2] - box[0]) > 0 and (box[3] - box[1]) > 0
                    expected = torch.tensor(expected_box(proposals[proposal_id], where))
                    torch.testing.assert_close(box, expected, atol=1e-3, rtol=0)


def test_shared_box_sets_meet_every_crop_row_for_row():
    """box_sets "shared", the earlier design: one K-set for all views, each of its boxes overlapping every crop."""
    image = bright_rectangle_image(width=300, height=300)
    proposals = torch.tensor(
        [[x, y, x + 30, y + 30] for x in range(0, 300, 40) for y in range(0, 300, 40)], dtype=torch.float32
    )
    config = ViewsConfig(box_sets="shared", use_v4=True, box_jitter=False, crop_scale=[0.3, 0.5], proposals_per_image=4)
    for seed in range(10):
        out = make_views(image, proposals, config, generator(seed), color_augment=False)
        assert list(out["boxes"]) == ["v1:v2", "v2", "v3", "v4"]
        ids = out["box_ids"]["v2"]
        assert all(torch.equal(other, ids) for other in out["box_ids"].values())
        for row, proposal_id in enumerate(ids.tolist()):
            if proposal_id < 0:
                continue
            for set_name, boxes, params in sets_with_params(out):
                box = boxes[row]
                assert (box[2] - box[0]) > 0 and (box[3] - box[1]) > 0  # overlaps this view's crop
                expected = torch.tensor(expected_box(proposals[proposal_id], params))
                torch.testing.assert_close(box, expected, atol=1e-3, rtol=0)


def test_view_sizes_are_configurable_and_boxes_follow():
    config = ViewsConfig(v1_size=64, v2_size=48, v3_size=20, v4_size=40, use_v4=True, box_jitter=False)
    proposal = torch.tensor([RECT], dtype=torch.float32)
    out = make_views(bright_rectangle_image(), proposal, config, generator(1))
    assert [tuple(v.shape) for v in out["views"]] == [(3, 64, 64), (3, 48, 48), (3, 20, 20), (3, 40, 40)]
    for set_name, boxes, params in sets_with_params(out):
        assert boxes.min() >= 0 and boxes.max() <= params.size
        torch.testing.assert_close(boxes[0], torch.tensor(expected_box(RECT, params)), atol=1e-3, rtol=0)


def test_proposals_outside_the_crop_are_never_chosen():
    proposals = torch.tensor(
        [[x, y, x + 18, y + 18] for x in range(0, 200, 20) for y in range(0, 100, 20)], dtype=torch.float32
    )
    config = ViewsConfig(crop_scale=[0.1, 0.2], box_jitter=False, proposals_per_image=4)
    dropped_some = False
    for seed in range(20):
        out = make_views(bright_rectangle_image(), proposals, config, generator(seed), color_augment=False)
        for view, params in zip(out["view_names"][1:], out["params"][1:]):
            left, top, right, bottom = params.region
            overlapping = {
                i for i, (x1, y1, x2, y2) in enumerate(proposals.tolist())
                if min(x2, right) > max(x1, left) and min(y2, bottom) > max(y1, top)
            }
            for set_name in (view, f"v1:{view}"):
                chosen = set(out["box_ids"][set_name].tolist())
                assert chosen <= overlapping
                # Enough candidates: K distinct picks, none repeated.
                if len(overlapping) >= 4:
                    assert len(chosen) == 4
            dropped_some |= len(overlapping) < len(proposals)
    assert dropped_some


def test_sampling_is_without_replacement_and_every_proposal_can_be_drawn():
    image = bright_rectangle_image()
    many = torch.tensor([[i, 0, WIDTH - i, HEIGHT] for i in range(10)], dtype=torch.float32)
    config = ViewsConfig(proposals_per_image=4, box_jitter=False)
    picks = set()
    for seed in range(30):
        out = make_views(image, many, config, generator(seed), color_augment=False)
        for set_name, ids in out["box_ids"].items():
            assert len(set(ids.tolist())) == 4, set_name
            picks.update(ids.tolist())
    assert picks == set(range(10))


def test_padding_draws_each_copy_of_a_pair_with_replacement_from_its_own_boxes():
    """The release pads V1's copy and the other view's copy separately, by draws with replacement (bboxs_utils.py
    255-259): with 2 proposals and K=5, each set holds both once, then 3 random repeats of its own."""
    image = bright_rectangle_image()
    two = torch.tensor([[0, 0, WIDTH, HEIGHT], [10, 10, 150, 90]], dtype=torch.float32)
    config = ViewsConfig(proposals_per_image=5, box_jitter=False)
    differ, patterns = 0, set()
    for seed in range(40):
        out = make_views(image, two, config, generator(seed), color_augment=False)
        v1_ids, v2_ids = out["box_ids"]["v1:v2"].tolist(), out["box_ids"]["v2"].tolist()
        for ids in (v1_ids, v2_ids):
            assert sorted(ids[:2]) == [0, 1] and set(ids[2:]) <= {0, 1}
            patterns.add(tuple(ids))
        assert sorted(v1_ids[:2]) == sorted(v2_ids[:2])
        differ += v1_ids[2:] != v2_ids[2:]
        for set_name, boxes, params in sets_with_params(out):
            for box, proposal_id in zip(boxes, out["box_ids"][set_name].tolist()):
                torch.testing.assert_close(box, torch.tensor(expected_box(two[proposal_id], params)), atol=1e-3,
                                           rtol=0)
    # independent draws: the copies' repeats differ in most samples, and not one cycling pattern
    assert differ > 20 and len(patterns) > 4


def test_shared_box_sets_pad_by_cycling_the_picks():
    image = bright_rectangle_image()
    two = torch.tensor([[0, 0, WIDTH, HEIGHT], [10, 10, 150, 90]], dtype=torch.float32)
    five = ViewsConfig(proposals_per_image=5, box_jitter=False, box_sets="shared")
    out = make_views(image, two, five, generator(0), color_augment=False)
    ids = out["box_ids"]["v2"].tolist()
    assert sorted(set(ids)) == [0, 1] and ids == [ids[0], ids[1]] * 2 + [ids[0]]
    for set_name, view_boxes, params in sets_with_params(out):
        assert view_boxes.shape == (5, 4)
        for row, proposal_id in enumerate(ids):  # row i is the same proposal in every view
            expected = torch.tensor(expected_box(two[proposal_id], params))
            torch.testing.assert_close(view_boxes[row], expected, atol=1e-3, rtol=0)


def test_the_box_sets_of_the_two_pairs_differ():
    """Issue 28's check: with 30 proposals and K=4 the (V1, V2) and (V1, V3) sets differ in most of 100 samples."""
    proposals = torch.tensor([[x, y, x + 40, y + 30] for x in range(0, 160, 27) for y in range(0, 70, 14)],
                             dtype=torch.float32)[:30]
    assert len(proposals) == 30
    image = bright_rectangle_image()
    config = ViewsConfig(proposals_per_image=4)
    differ = sum(
        set(out["box_ids"]["v1:v2"].tolist()) != set(out["box_ids"]["v1:v3"].tolist())
        for out in (make_views(image, proposals, config, generator(seed), color_augment=False) for seed in range(100))
    )
    assert differ > 80
    shared = ViewsConfig(proposals_per_image=4, box_sets="shared")
    out = make_views(image, proposals, shared, generator(0), color_augment=False)
    assert torch.equal(out["box_ids"]["v2"], out["box_ids"]["v3"])


def test_v1_is_jittered_separately_for_each_pair():
    proposals = torch.tensor([RECT], dtype=torch.float32)
    config = ViewsConfig(proposals_per_image=1, jitter_prob=1.0, flip_prob=0.0)
    out = make_views(bright_rectangle_image(), proposals, config, generator(0), color_augment=False)
    assert out["box_ids"]["v1:v2"].tolist() == out["box_ids"]["v1:v3"].tolist() == [0]
    assert not torch.equal(out["boxes"]["v1:v2"], out["boxes"]["v1:v3"])


def test_crops_are_drawn_again_until_each_pair_has_half_of_k_then_fewer():
    """The release's tries (dataset.py 689-709): a pair needs max(K // 2, 1) boxes, then half as many each try."""
    import soco.methods.soco_transform as soco_transform

    image = bright_rectangle_image(width=400, height=100)
    proposals = torch.tensor([[0, 0, 40, 40], [60, 0, 100, 40], [120, 0, 160, 40], [300, 60, 340, 100]],
                             dtype=torch.float32)
    one_box = (0, 0, 40, 40)      # top, left, h, w: overlaps proposal 0 only
    three_boxes = (0, 0, 40, 140)  # overlaps proposals 0, 1, 2

    def run(crops, k=4, retries=4):
        sequence = iter(crops)
        original = soco_transform.random_resized_crop
        soco_transform.random_resized_crop = lambda *args: next(sequence)
        try:
            config = ViewsConfig(proposals_per_image=k, box_jitter=False, use_v3=False, crop_retries=retries)
            return make_views(image, proposals, config, generator(0), color_augment=False)
        finally:
            soco_transform.random_resized_crop = original

    # K=4 needs 2: the one-box crop is refused once; the three-box crop of the second try stands
    out = run([one_box, three_boxes, one_box])
    assert out["params"][1].width == 140 and set(out["box_ids"]["v2"].tolist()) == {0, 1, 2}
    # after one refusal the need is 1: the second one-box crop stands (a third draw would raise StopIteration)
    out = run([one_box, one_box])
    assert out["params"][1].width == 40 and set(out["box_ids"]["v2"].tolist()) == {0}
    # no retries: the first draw stands whatever it holds
    out = run([one_box], retries=0)
    assert set(out["box_ids"]["v2"].tolist()) == {0}


def test_an_image_without_proposals_has_the_whole_image_as_its_one_proposal():
    """The release's rule (dataset.py 681-682)."""
    config = ViewsConfig(proposals_per_image=3, box_jitter=False)
    out = make_views(bright_rectangle_image(), torch.zeros((0, 4)), config, generator(0), color_augment=False)
    assert all(ids.tolist() == [0, 0, 0] for ids in out["box_ids"].values())
    torch.testing.assert_close(out["boxes"]["v1:v2"], torch.tensor([[0.0, 0.0, 224.0, 224.0]] * 3))
    torch.testing.assert_close(out["boxes"]["v2"], torch.tensor([[0.0, 0.0, 224.0, 224.0]] * 3))
    torch.testing.assert_close(out["boxes"]["v3"], torch.tensor([[0.0, 0.0, 112.0, 112.0]] * 3))


def test_a_pair_no_proposal_overlaps_contrasts_its_whole_frames():
    """After the last try a pair without a box takes each view's whole frame under one id (bboxs_utils.py 67)."""
    corner = torch.tensor([[0, 0, 10, 10]], dtype=torch.float32)
    config = ViewsConfig(proposals_per_image=2, box_jitter=False, crop_scale=[0.1, 0.15], crop_retries=0, use_v3=False)
    missed = 0
    for seed in range(20):
        out = make_views(bright_rectangle_image(), corner, config, generator(seed), color_augment=False)
        if out["box_ids"]["v2"][0] >= 0:
            continue
        missed += 1
        assert out["box_ids"]["v1:v2"].tolist() == out["box_ids"]["v2"].tolist() == [-1, -1]
        torch.testing.assert_close(out["boxes"]["v1:v2"], torch.tensor([[0.0, 0.0, 224.0, 224.0]] * 2))
        torch.testing.assert_close(out["boxes"]["v2"], torch.tensor([[0.0, 0.0, 224.0, 224.0]] * 2))
    assert missed > 5


def test_shared_box_sets_fall_back_to_the_crop_region():
    config = ViewsConfig(proposals_per_image=3, box_jitter=False, box_sets="shared", v3_mode="downsample")
    out = make_views(bright_rectangle_image(), torch.zeros((0, 4)), config, generator(0), color_augment=False)
    assert out["box_ids"]["v2"].tolist() == [-1, -1, -1]
    v1, v2, v3 = out["params"]
    torch.testing.assert_close(out["boxes"]["v2"], torch.tensor([[0.0, 0.0, 224.0, 224.0]] * 3))
    torch.testing.assert_close(out["boxes"]["v3"], torch.tensor([[0.0, 0.0, 112.0, 112.0]] * 3))
    torch.testing.assert_close(out["boxes"]["v1:v2"][0], torch.tensor(expected_box(v2.region, v1)), atol=1e-3,
                               rtol=0)


def test_crop_retries_make_a_missed_proposal_rare():
    # A small proposal in a corner: one crop of scale [0.2, 0.3] seldom covers it.
    corner = torch.tensor([[0, 0, 30, 20]], dtype=torch.float32)
    image = bright_rectangle_image()

    def misses(retries: int) -> int:
        config = ViewsConfig(crop_scale=[0.2, 0.3], crop_retries=retries, box_jitter=False, proposals_per_image=1,
                             use_v3=False)
        return sum(
            make_views(image, corner, config, generator(seed), color_augment=False)["box_ids"]["v2"].item() < 0
            for seed in range(40)
        )

    no_retry, retried = misses(0), misses(8)
    assert no_retry > 10
    assert retried < no_retry / 2


def test_jitter_stays_within_ratio_of_the_box_size():
    count = 4000
    boxes = torch.tensor([[400.0, 300.0, 600.0, 400.0]]).repeat(count, 1)
    out = jitter_boxes(boxes, 1.0, 0.1, 1000, 1000, generator(0))
    width, height = 200.0, 100.0
    dx1 = out[:, 0] - boxes[:, 0]
    dy1 = out[:, 1] - boxes[:, 1]
    width_ratio = (out[:, 2] - out[:, 0]) / width
    height_ratio = (out[:, 3] - out[:, 1]) / height
    assert dx1.abs().max() <= 0.1 * width + 1e-3 and dy1.abs().max() <= 0.1 * height + 1e-3
    assert width_ratio.min() >= 0.9 - 1e-5 and width_ratio.max() <= 1.1 + 1e-5
    assert height_ratio.min() >= 0.9 - 1e-5 and height_ratio.max() <= 1.1 + 1e-5
    # Uniform draws fill the range, and every box was jittered (p = 1).
    assert dx1.min() < -0.09 * width and dx1.max() > 0.09 * width
    assert width_ratio.min() < 0.91 and width_ratio.max() > 1.09
    assert (out != boxes).any(dim=1).all()
    half = jitter_boxes(boxes, 0.5, 0.1, 1000, 1000, generator(1))
    assert 0.45 < (half != boxes).any(dim=1).float().mean() < 0.55
    edge = jitter_boxes(torch.tensor([[0.0, 0.0, 1000.0, 1000.0]]).repeat(100, 1), 1.0, 0.1, 1000, 1000, generator(2))
    assert edge.min() >= 0 and edge.max() <= 1000


def test_jitter_applies_to_v1_only_and_off_means_exact_resize():
    proposals = torch.tensor([[40, 20, 120, 70], [60, 30, 150, 90]], dtype=torch.float32)
    image = bright_rectangle_image()
    scale = torch.tensor([224 / 200, 224 / 100, 224 / 200, 224 / 100], dtype=torch.float32)
    plain = ViewsConfig(box_jitter=False, flip_prob=0.0, proposals_per_image=2)
    jittered = ViewsConfig(box_jitter=True, jitter_prob=1.0, jitter_ratio=0.1, flip_prob=0.0, proposals_per_image=2)
    for seed in range(5):
        off = make_views(image, proposals, plain, generator(seed), color_augment=False)
        for pair in ("v1:v2", "v1:v3"):
            assert torch.equal(off["boxes"][pair], proposals[off["box_ids"][pair]] * scale)
        on = make_views(image, proposals, jittered, generator(seed), color_augment=False)
        assert all(torch.equal(on["box_ids"][name], off["box_ids"][name]) for name in off["box_ids"])
        assert torch.equal(on["boxes"]["v2"], off["boxes"]["v2"]) and torch.equal(on["boxes"]["v3"], off["boxes"]["v3"])
        for pair in ("v1:v2", "v1:v3"):
            original = proposals[on["box_ids"][pair]]
            width = original[:, 2] - original[:, 0]
            v1_in_original = on["boxes"][pair] / scale
            assert ((v1_in_original[:, 0] - original[:, 0]).abs() <= 0.1 * width + 1e-3).all()
            width_ratio = (v1_in_original[:, 2] - v1_in_original[:, 0]) / width
            assert ((width_ratio >= 0.9 - 1e-4) & (width_ratio <= 1.1 + 1e-4)).all()
            assert not torch.equal(on["boxes"][pair], off["boxes"][pair])


def test_same_seed_is_bitwise_identical_and_another_seed_differs():
    image = torch.randint(0, 256, (3, 90, 120), generator=generator(7), dtype=torch.uint8)
    proposals = torch.tensor([[5, 5, 60, 50], [30, 20, 110, 85], [0, 40, 70, 90]], dtype=torch.float32)
    config = ViewsConfig(v1_size=64, v2_size=64, v3_size=32, use_v4=True, v4_size=48)
    global_state = torch.get_rng_state()
    first = make_views(image, proposals, config, generator(11))
    assert torch.equal(torch.get_rng_state(), global_state)  # nothing drawn from the global RNG
    again = make_views(image, proposals, config, generator(11))
    other = make_views(image, proposals, config, generator(12))
    for a, b in zip(first["views"] + list(first["boxes"].values()), again["views"] + list(again["boxes"].values())):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(first["views"], other["views"]))
    # A generator resumed from a saved state continues bitwise the same.
    running = generator(5)
    make_views(image, proposals, config, running)
    state = running.get_state()
    continued = make_views(image, proposals, config, running)
    resumed = torch.Generator()
    resumed.set_state(state)
    replayed = make_views(image, proposals, config, resumed)
    assert all(torch.equal(a, b) for a, b in zip(continued["views"], replayed["views"]))
    # Colour is drawn after the geometry, so switching it off keeps each seed's crops and boxes.
    grey = make_views(image, proposals, config, generator(11), color_augment=False)
    assert grey["params"] == first["params"]
    assert all(torch.equal(grey["boxes"][name], first["boxes"][name]) for name in first["boxes"])


def test_colour_pipeline_changes_pixels_and_output_is_normalised():
    image = torch.full((3, 50, 50), 128, dtype=torch.uint8)
    config = ViewsConfig(v1_size=32, v2_size=32, v3_size=16)
    plain = make_views(image, torch.tensor([[0.0, 0.0, 50.0, 50.0]]), config, generator(0), color_augment=False)
    for view in plain["views"]:
        for channel in range(3):
            expected = (128 / 255 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
            torch.testing.assert_close(view[channel], torch.full_like(view[channel], expected), atol=1e-5, rtol=0)
    textured = torch.randint(0, 256, (3, 50, 50), generator=generator(3), dtype=torch.uint8)
    changed = 0
    for seed in range(4):
        off = make_views(textured, torch.tensor([[0.0, 0.0, 50.0, 50.0]]), config, generator(seed), color_augment=False)
        on = make_views(textured, torch.tensor([[0.0, 0.0, 50.0, 50.0]]), config, generator(seed), color_augment=True)
        changed += sum(not torch.allclose(a, b) for a, b in zip(off["views"], on["views"]))
        assert on["views"][0].dtype == torch.float32
    # V1 is always blurred, so colour on changes at least V1 every time.
    assert changed >= 4
    assert [blur_kernel_size(1.0, s, "tenth") for s in (224, 192, 112, 16)] == [23, 19, 11, 3]


def test_blur_kernel_covers_three_sigma_whatever_the_view_size():
    # 2 * ceil(3 sigma) + 1, at least 3, independent of the side
    assert [blur_kernel_size(sigma, 64) for sigma in (0.1, 0.5, 1.0, 1.01, 2.0)] == [3, 5, 7, 9, 13]
    assert blur_kernel_size(2.0, 32) == blur_kernel_size(2.0, 224) == 13
    # the old rule truncates sigma 2 to a 7-pixel kernel on 64-pixel views
    assert blur_kernel_size(2.0, 64, "tenth") == 7
    with pytest.raises(ConfigError, match="blur_kernel"):
        validate_section(ViewsConfig(blur_kernel="wide"), "method.views")


def test_whole_image_gives_one_box_equal_to_each_full_view():
    config = ViewsConfig(box_source="whole_image", proposals_per_image=4, use_v4=True, v4_size=96)
    out = make_views(bright_rectangle_image(), torch.tensor([RECT], dtype=torch.float32), config, generator(0))
    assert list(out["boxes"]) == ["v1:v2", "v2", "v1:v3", "v3", "v1:v4", "v4"]
    assert all(ids.tolist() == [0] for ids in out["box_ids"].values())
    for set_name, boxes, params in sets_with_params(out):
        assert torch.equal(boxes, torch.tensor([[0.0, 0.0, float(params.size), float(params.size)]]))


def test_random_boxes_are_k_boxes_within_every_view():
    config = ViewsConfig(box_source="random", proposals_per_image=6, box_jitter=False, use_v4=True)
    for seed in range(5):
        out = make_views(bright_rectangle_image(), torch.zeros((0, 4)), config, generator(seed), color_augment=False)
        for ids in out["box_ids"].values():
            # chosen among the random candidates exactly as proposals are
            assert all(0 <= i < RANDOM_CANDIDATES for i in ids.tolist()) and len(ids) == 6
        for set_name, boxes, params in sets_with_params(out):
            assert boxes.shape == (6, 4)
            assert boxes.min() >= 0 and boxes.max() <= params.size
            assert ((boxes[:, 2] - boxes[:, 0]) > 0).all() and ((boxes[:, 3] - boxes[:, 1]) > 0).all()
    region = (20, 10, 180, 90)
    many = random_boxes(2000, region, generator(0))
    assert many[:, 0].min() >= 20 and many[:, 2].max() <= 180 and many[:, 1].min() >= 10 and many[:, 3].max() <= 90
    mean_side = math.sqrt(160 * 80)
    sides = ((many[:, 2] - many[:, 0]) * (many[:, 3] - many[:, 1])).sqrt()
    assert sides.max() <= 0.8 * mean_side + 1e-3  # clipping only shrinks


def test_random_image_boxes_cover_the_whole_image_with_the_filter_rules():
    width, height = 400, 300
    boxes = random_image_boxes(4000, width, height, generator(0))
    box_w, box_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert boxes[:, 0].min() >= 0 and boxes[:, 1].min() >= 0
    assert boxes[:, 2].max() <= width + 1e-3 and boxes[:, 3].max() <= height + 1e-3
    assert (box_w >= 32).all() and (box_h >= 32).all()
    # the filter's aspect and relative-scale rules, up to the clipping of a side to the image
    unclipped = (box_w < width - 1e-3) & (box_h < height - 1e-3)
    aspect = box_w[unclipped] / box_h[unclipped]
    assert aspect.min() >= 1 / 3 - 1e-4 and aspect.max() <= 3 + 1e-4
    relative = (box_w * box_h).sqrt() / math.sqrt(width * height)
    assert relative.max() <= 0.8 + 1e-4 and relative[unclipped].min() >= 0.3 - 1e-4
    # over the whole image, not one crop: box centres reach every quarter of it
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
    centre_y = (boxes[:, 1] + boxes[:, 3]) / 2
    for x_half in (centre_x < width / 2, centre_x >= width / 2):
        for y_half in (centre_y < height / 2, centre_y >= height / 2):
            assert (x_half & y_half).float().mean() > 0.15


def test_random_box_candidates_are_drawn_before_the_crops_and_chosen_like_proposals():
    config = ViewsConfig(box_source="random", proposals_per_image=3, box_jitter=False, flip_prob=0.0)
    image = bright_rectangle_image()
    for seed in range(10):
        replay = generator(seed)
        candidates = random_image_boxes(RANDOM_CANDIDATES, WIDTH, HEIGHT, replay)
        out = make_views(image, torch.zeros((0, 4)), config, generator(seed), color_augment=False)
        v1 = out["params"][0]
        chosen = candidates[out["box_ids"]["v1:v2"]]
        # V1 is the whole image without flip: its boxes are the chosen candidates scaled to the view
        scale = torch.tensor([v1.size / WIDTH, v1.size / HEIGHT] * 2)
        torch.testing.assert_close(out["boxes"]["v1:v2"], chosen * scale, atol=1e-3, rtol=0)
        v2_region = out["params"][1].region
        assert all(b[0] < v2_region[2] and b[2] > v2_region[0] and b[1] < v2_region[3] and b[3] > v2_region[1]
                   for b in chosen.tolist())


def test_box_cutout_erases_inside_boxes_only_and_is_off_by_default():
    view = torch.ones((3, 40, 40))
    boxes = torch.tensor([[4.0, 4.0, 24.0, 24.0], [26.0, 26.0, 38.0, 38.0]])
    erased = cut_out_boxes(view, boxes, generator(0), probability=1.0, area=(0.2, 0.2))
    changed = (erased != view).any(dim=0)
    inside = torch.zeros((40, 40), dtype=torch.bool)
    inside[4:24, 4:24] = True
    inside[26:38, 26:38] = True
    assert changed.any() and not (changed & ~inside).any()
    # 20% of each box's area: 80 of 400 pixels and 28.8 of 144, up to rounding of the rectangle's sides
    assert 60 <= int(changed[4:24, 4:24].sum()) <= 100 and 16 <= int(changed[26:38, 26:38].sum()) <= 42
    assert torch.equal(cut_out_boxes(view, boxes, generator(0), probability=0.0), view)
    assert ViewsConfig().box_cutout is False
    proposals = torch.tensor([RECT], dtype=torch.float32)
    plain = ViewsConfig(box_jitter=False)
    with_cutout = ViewsConfig(box_jitter=False, box_cutout=True, cutout_prob=1.0)
    off = make_views(bright_rectangle_image(), proposals, plain, generator(5), color_augment=False)
    on = make_views(bright_rectangle_image(), proposals, with_cutout, generator(5), color_augment=False)
    assert torch.equal(off["views"][0], on["views"][0])  # V1 is never cut
    assert all(not torch.equal(a, b) for a, b in zip(off["views"][1:], on["views"][1:]))


def test_transform_gives_views_and_boxes_by_name_and_collates_them():
    transform = SoCoTransform(ViewsConfig(v1_size=32, v2_size=32, v3_size=16, proposals_per_image=2))
    proposals = torch.tensor([RECT], dtype=torch.float32).numpy()
    samples = [transform(bright_rectangle_image().permute(1, 2, 0).numpy(), proposals, generator(s)) for s in (0, 1)]
    batch = transform.collate(samples)
    assert list(batch["views"]) == ["v1", "v2", "v3"]
    assert list(batch["boxes"]) == list(batch["box_ids"]) == ["v1:v2", "v2", "v1:v3", "v3"]
    assert batch["views"]["v3"].shape == (2, 3, 16, 16) and batch["boxes"]["v1:v3"].shape == (2, 2, 4)
    assert torch.equal(batch["boxes"]["v2"][1], samples[1]["boxes"]["v2"])
    assert batch["box_ids"]["v1:v2"].shape == (2, 2) and batch["box_ids"]["v3"].dtype == torch.int64


def test_crop_parameters_respect_scale_and_ratio():
    for seed in range(200):
        top, left, height, width = random_resized_crop(300, 400, [0.5, 1.0], [0.75, 4 / 3], generator(seed))
        assert 0 <= top and top + height <= 300 and 0 <= left and left + width <= 400
        assert 0.5 * 120000 * 0.98 <= height * width <= 120000
        assert 0.75 * 0.97 <= width / height <= 4 / 3 * 1.03


def test_bad_configuration_values_are_refused():
    # A section is checked once, where it is loaded (not by make_views, per sample): validate_section is that check.
    with pytest.raises(ConfigError, match="box_source"):
        validate_section(ViewsConfig(box_source="boxes"), "method.views")
    with pytest.raises(ConfigError, match="v3_mode"):
        validate_section(ViewsConfig(v3_mode="half"), "method.views")
    with pytest.raises(ConfigError, match="proposals_per_image"):
        validate_section(ViewsConfig(proposals_per_image=0), "method.views")
    with pytest.raises(ConfigError, match="box_sets"):
        validate_section(ViewsConfig(box_sets="one"), "method.views")


def test_without_v3_there_are_two_views():
    proposal = torch.tensor([RECT], dtype=torch.float32)
    out = make_views(bright_rectangle_image(), proposal, ViewsConfig(use_v3=False), generator(0))
    assert out["view_names"] == ["v1", "v2"] and len(out["views"]) == len(out["boxes"]) == 2
    assert box_set_names(ViewsConfig(use_v3=False)) == ["v1:v2", "v2"]


def test_the_c4_preset_has_no_box_jitter_as_the_release_s_c4_data_set():
    """The release's C4 data set (dataset.py 403-502) never jitters: V1's boxes are the proposals resized exactly."""
    import dataclasses

    from soco.config.loading import load_config

    proposals = torch.tensor([[40, 20, 120, 70], [60, 30, 150, 90], [10, 10, 90, 60]], dtype=torch.float32)
    image = bright_rectangle_image()

    def v1_equals_the_resized_proposals(preset: str, seed: int) -> bool:
        views = dataclasses.replace(load_config(preset).method.views, flip_prob=0.0, proposals_per_image=3)
        out = make_views(image, proposals, views, generator(seed), color_augment=False)
        size = views.v1_size
        scale = torch.tensor([size / WIDTH, size / HEIGHT, size / WIDTH, size / HEIGHT])
        return torch.equal(out["boxes"]["v1:v2"], proposals[out["box_ids"]["v1:v2"]] * scale)

    assert all(v1_equals_the_resized_proposals("soco_r50_c4", seed) for seed in range(10))
    assert not all(v1_equals_the_resized_proposals("soco_r50_fpn", seed) for seed in range(10))

"""BYOL regression loss, its symmetrised pair sum (SoCo) and box-pair mean (SCRL), against hand computations."""

import math

import torch

from soco.methods.losses import box_pair_loss, byol_regression, matched_box_loss, symmetric_pair_loss


def test_byol_regression_by_hand():
    prediction = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[3.0, 4.0], [0.0, 5.0], [0.0, -1.0]])
    # cosines: 1 (same direction), 0 (orthogonal), -1 (opposite)
    torch.testing.assert_close(byol_regression(prediction, target), torch.tensor([0.0, 2.0, 4.0]))


def test_byol_regression_at_sixty_degrees_and_scale_invariance():
    prediction = torch.tensor([[1.0, 0.0]])
    target = torch.tensor([[0.5, math.sqrt(3) / 2]]) * 7.0
    torch.testing.assert_close(byol_regression(prediction * 3.0, target), torch.tensor([1.0]))  # 2 - 2*0.5


def test_target_gets_no_gradient():
    prediction = torch.randn(4, 8, requires_grad=True)
    target = torch.randn(4, 8, requires_grad=True)
    byol_regression(prediction, target).sum().backward()
    assert prediction.grad is not None and target.grad is None


def test_symmetric_pair_loss_sums_both_directions_of_each_pair():
    q = {"v1": torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), "v2": torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]),
         "v3": torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])}
    z = {"v1": torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), "v2": torch.tensor([[[0.0, 1.0], [0.0, 1.0]]]),
         "v3": torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])}
    ids = {name: torch.tensor([[4, 7]]) for name in q}  # row i is the same box in every set
    # q(v1)·z(v2): rows cos 0, 1 -> losses 2, 0 -> mean 1;  q(v2)·z(v1): cos 1, 1 -> mean 0
    # q(v1)·z(v3): cos 1, 1 -> 0;                           q(v3)·z(v1): cos 0, 0 -> 2
    total = symmetric_pair_loss(q, z, ids, [("v1", "v2"), ("v1", "v3")])
    torch.testing.assert_close(total, torch.tensor(1.0 + 0.0 + 0.0 + 2.0))


def test_matched_box_loss_meets_every_box_with_the_same_id():
    """The release's correspondence loss (SoCo_FPN.py 119-128) less its constant: per image, the mean of
    2 - 2 cos over all (prediction, target) pairs with equal ids, then the mean over images."""
    s = math.sqrt(0.5)
    prediction = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],
                               [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0], [s, s], [0.0, -1.0]],
                           [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    # image 0: prediction ids 3 5 3, target ids 3 3 9: pairs (p0,t0) cos 1, (p0,t1) cos s, (p2,t0) 1, (p2,t1) s
    # -> losses 0, 2-2s, 0, 2-2s, mean 1-s; id 5 and id 9 meet nothing
    # image 1: ids 1 2 2 against 2 1 1: (p0,t1) cos 0, (p0,t2) cos 1, (p1,t0) 1, (p2,t0) 1 -> losses 2, 0, 0, 0 -> 0.5
    prediction_ids = torch.tensor([[3, 5, 3], [1, 2, 2]])
    target_ids = torch.tensor([[3, 3, 9], [2, 1, 1]])
    loss = matched_box_loss(prediction, target, prediction_ids, target_ids)
    torch.testing.assert_close(loss, torch.tensor(((1 - s) + 0.5) / 2))
    # the release's own number: -2 times the mean matched cosine of each image, averaged
    release = -2 * ((1 + s + 1 + s) / 4 + (0 + 1 + 1 + 1) / 4) / 2
    torch.testing.assert_close(loss - 2, torch.tensor(release))
    # with the ids of aligned rows it is the mean row loss
    aligned = torch.arange(3).expand(2, 3)
    torch.testing.assert_close(matched_box_loss(prediction, target, aligned, aligned),
                               byol_regression(prediction, target).mean())


def test_box_pair_loss_is_the_mean_over_pairs_of_both_directions():
    q1 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    q2 = torch.tensor([[0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    z1 = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, -5.0], [0.0, 1.0]])
    # pair 0: q1.z2 cos 1 -> 0, q2.z1 cos 0 -> 2;    pair 1: q1.z2 cos -1 -> 4, q2.z1 cos 1/sqrt2 -> 2 - sqrt2
    # pair 2: q1.z2 cos 0 -> 2, q2.z1 cos -1 -> 4
    expected = (0 + 2 + 4 + (2 - math.sqrt(2)) + 2 + 4) / 3
    torch.testing.assert_close(box_pair_loss((q1, q2), (z1, z2)), torch.tensor(expected))


def test_box_pair_loss_of_no_pair_is_zero_not_nan():
    empty = torch.zeros((0, 4))
    assert box_pair_loss((empty, empty), (empty, empty)).item() == 0.0


def test_info_nce_by_hand():
    from soco.methods.losses import info_nce

    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    key = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    negatives = torch.tensor([[1.0, 0.0], [0.0, -1.0], [-0.6, 0.8]])
    t = 0.2
    # row 0: q.k = 0.6; q.n = 1, 0, -0.6.   row 1: q.k = 1; q.n = 0, -1, 0.8
    row0 = -math.log(math.exp(0.6 / t) / (math.exp(0.6 / t) + math.exp(1 / t) + math.exp(0) + math.exp(-0.6 / t)))
    row1 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(0) + math.exp(-1 / t) + math.exp(0.8 / t)))
    torch.testing.assert_close(info_nce(query, key, negatives, t), torch.tensor((row0 + row1) / 2))
    q = query.clone().requires_grad_(True)
    k = key.clone().requires_grad_(True)
    info_nce(q, k, negatives, t).backward()
    assert q.grad is not None and k.grad is None


def test_matched_box_loss_stays_float32_under_bf16_autocast():
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(4, 4, 256, generator=generator)
    target = prediction + 0.05 * torch.randn(4, 4, 256, generator=generator)
    ids = torch.arange(4).expand(4, 4)
    exact = matched_box_loss(prediction, target, ids, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = matched_box_loss(prediction, target, ids, ids)
    assert under_autocast.dtype == torch.float32 and 0.002 < exact.item() < 0.004  # 2 - 2 cos for a 5% change
    torch.testing.assert_close(under_autocast, exact)

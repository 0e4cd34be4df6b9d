"""BYOL regression loss, its symmetrised pair sum (SoCo) and box-pair mean (SCRL), against hand computations."""

import math

import torch

from soco.methods.losses import box_pair_loss, byol_regression, symmetric_pair_loss


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
    q = {"v1": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "v2": torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
         "v3": torch.tensor([[0.0, 1.0], [0.0, 1.0]])}
    z = {"v1": torch.tensor([[1.0, 0.0], [1.0, 0.0]]), "v2": torch.tensor([[0.0, 1.0], [0.0, 1.0]]),
         "v3": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    # q(v1)·z(v2): rows cos 0, 1 -> losses 2, 0 -> mean 1;  q(v2)·z(v1): cos 1, 1 -> mean 0
    # q(v1)·z(v3): cos 1, 1 -> 0;                           q(v3)·z(v1): cos 0, 0 -> 2
    total = symmetric_pair_loss(q, z, [("v1", "v2"), ("v1", "v3")])
    torch.testing.assert_close(total, torch.tensor(1.0 + 0.0 + 0.0 + 2.0))


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

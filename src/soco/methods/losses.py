"""Losses as small pure functions, each tested against a hand computation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in float32, or as it is in float64: losses compute in fp32 under bf16/fp16, and float64 checks stay exact."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def byol_regression(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row BYOL loss 2 - 2 cos(prediction, target); the target carries no gradient."""
    prediction = F.normalize(at_least_float32(prediction), dim=-1)
    target = F.normalize(at_least_float32(target.detach()), dim=-1)
    return 2.0 - 2.0 * (prediction * target).sum(dim=-1)


def matched_box_loss(prediction: torch.Tensor, target: torch.Tensor, prediction_ids: torch.Tensor,
                     target_ids: torch.Tensor) -> torch.Tensor:
    """Mean over images of the mean 2 - 2 cos over every (prediction box, target box) pair with the same id.

    prediction (B, K, D) and target (B, K', D) are one view pair's box vectors, ids (B, K) and (B, K'). The ids
    say which proposal each box came from, and a padded set repeats some, so box i of one view meets every box
    of the other view with its id: the release's correspondence matrix and its loss (`SoCo_FPN.py` 119-128,
    -2 times the matched mean cosine, which is this less 2). An image without a matched pair adds 0.
    """
    # autocast would run the batched product in bf16/fp16 even on fp32 inputs: cosines near 1 need fp32
    with torch.autocast(prediction.device.type, enabled=False):
        prediction = F.normalize(at_least_float32(prediction), dim=-1)
        target = F.normalize(at_least_float32(target.detach()), dim=-1)
        cosines = torch.bmm(prediction, target.transpose(1, 2))
        matches = (prediction_ids[:, :, None] == target_ids[:, None, :]).to(cosines.dtype)
        count = matches.sum(dim=(1, 2))
        per_image = (matches * (2.0 - 2.0 * cosines)).sum(dim=(1, 2)) / count.clamp(min=1)
        return per_image.mean()


def symmetric_pair_loss(
    online_predictions: dict[str, torch.Tensor],
    target_projections: dict[str, torch.Tensor],
    box_ids: dict[str, torch.Tensor],
    pairs: list[tuple[str, str]],
) -> torch.Tensor:
    """Sum over view pairs (a, b) of the matched box loss in both directions: q(a) vs z(b) and q(b) vs z(a).

    Tensors are keyed by box set name ((B, K, D) vectors, (B, K) ids); a pair names its two sets.
    """
    total = online_predictions[pairs[0][0]].new_zeros((), dtype=torch.float32)
    for set_a, set_b in pairs:
        ids_a, ids_b = box_ids[set_a], box_ids[set_b]
        total = total + matched_box_loss(online_predictions[set_a], target_projections[set_b], ids_a, ids_b)
        total = total + matched_box_loss(online_predictions[set_b], target_projections[set_a], ids_b, ids_a)
    return total


def box_pair_loss(
    online_predictions: tuple[torch.Tensor, torch.Tensor],
    target_projections: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Mean over N box pairs of l(q1, z2) + l(q2, z1), l = 2 - 2 cos; 0 (not NaN) when N is 0 (SCRL).

    Row i of every tensor is the same region of the image seen in view 1 and view 2.
    """
    (q1, q2), (z1, z2) = online_predictions, target_projections
    per_pair = byol_regression(q1, z2) + byol_regression(q2, z1)
    return per_pair.sum() / max(1, per_pair.numel())


def info_nce(query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: mean over rows of -log(exp(q.k/t) / (exp(q.k/t) + sum_j exp(q.n_j/t))).

    query and key are (N, D) rows of the same instances, negatives (Q, D), Q the queue length; all are expected unit vectors
    (the caller normalises). The key and the negatives carry no gradient; computed in float32.
    """
    # autocast would run the matrix product in bf16/fp16 even on fp32 inputs: logits / 0.2 need fp32
    with torch.autocast(query.device.type, enabled=False):
        query = at_least_float32(query)
        positive = (query * at_least_float32(key.detach())).sum(dim=-1, keepdim=True)
        negative = query @ at_least_float32(negatives.detach()).t()
        logits = torch.cat([positive, negative], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))

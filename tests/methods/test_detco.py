"""The DetCo method: each loss term by hand, the stage weights, the eight queues, heads on every stage."""

import copy
import math

import torch

from soco.config.loading import load_config
from soco.methods.detco import DetCo, detco_losses
from soco.methods.losses import info_nce


def tiny(*overrides):
    return load_config("detco_tiny", list(overrides))


def unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_each_term_and_the_stage_weights_by_hand():
    # one stage (S=1): rows are [global; local], batch of one, 2-d vectors, queues of two
    queries = torch.stack([unit([1.0, 0.0]), unit([0.0, 1.0])])
    keys = torch.stack([unit([0.6, 0.8]), unit([0.0, 1.0])])
    queues = torch.stack([unit([1.0, 0.0], [0.0, -1.0]), unit([-1.0, 0.0], [0.6, 0.8])])
    t = 0.2

    def nce(q_dot_k, q_dot_negatives):
        positive = math.exp(q_dot_k / t)
        return -math.log(positive / (positive + sum(math.exp(v / t) for v in q_dot_negatives)))

    g2g = nce(0.6, [1.0, 0.0])  # global query . global key; global queue
    l2l = nce(1.0, [0.0, 0.8])  # local query . local key; local queue
    l2g = nce(0.8, [0.0, -1.0])  # local query . global key; global queue
    out = detco_losses(queries, keys, queues, [0.7], t)
    torch.testing.assert_close(out["loss_g2g"], torch.tensor(g2g))
    torch.testing.assert_close(out["loss_l2l"], torch.tensor(l2l))
    torch.testing.assert_close(out["loss_l2g"], torch.tensor(l2g))
    torch.testing.assert_close(out["loss"], torch.tensor(0.7 * (g2g + l2l + l2g)))


def test_stage_weights_weigh_each_stage():
    torch.manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(8, 3, 4), dim=-1)
    keys = torch.nn.functional.normalize(torch.randn(8, 3, 4), dim=-1)
    queues = torch.nn.functional.normalize(torch.randn(8, 5, 4), dim=-1)
    per_stage = []
    for stage in range(4):
        one_hot = [1.0 if s == stage else 0.0 for s in range(4)]
        per_stage.append(detco_losses(queries, keys, queues, one_hot, 0.2)["loss"])
    weighted = detco_losses(queries, keys, queues, [0.1, 0.4, 0.7, 1.0], 0.2)["loss"]
    torch.testing.assert_close(weighted, sum(w * l for w, l in zip([0.1, 0.4, 0.7, 1.0], per_stage)))
    expected_stage0 = (info_nce(queries[0], keys[0], queues[0], 0.2) + info_nce(queries[4], keys[4], queues[4], 0.2)
                       + info_nce(queries[4], keys[0], queues[0], 0.2))
    torch.testing.assert_close(per_stage[0], expected_stage0)


def make_batch(batch_size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"global_q": torch.randn(batch_size, 3, 64, 64, generator=g),
            "global_k": torch.randn(batch_size, 3, 64, 64, generator=g),
            "local_q": torch.randn(batch_size, 9, 3, 16, 16, generator=g),
            "local_k": torch.randn(batch_size, 9, 3, 16, 16, generator=g)}


def test_a_step_queues_global_keys_in_levels_0_to_3_and_local_keys_in_4_to_7():
    torch.manual_seed(0)
    method = DetCo(tiny().method)
    before = method.queue.keys.clone()
    reference = copy.deepcopy(method)
    torch.manual_seed(7)
    method.training_step(make_batch())
    torch.manual_seed(7)
    from soco.methods.shuffle_bn import shuffled_forward
    batch = make_batch()
    keys = shuffled_forward(lambda v, p: reference.target(v, p).transpose(0, 1),
                            (batch["global_k"], batch["local_k"]), splits=2).transpose(0, 1)
    global_keys = reference.target.global_vectors(batch["global_k"])
    assert keys.shape == (8, 4, 16)
    torch.testing.assert_close(method.queue.keys[:, :4], keys)
    assert torch.equal(method.queue.keys[:, 4:], before[:, 4:]) and int(method.queue.pointer) == 4
    assert global_keys.shape == (4, 4, 16)


def test_heads_sit_on_every_stage_and_only_the_backbone_is_exported():
    method = DetCo(tiny().method)
    widths = [head.fc1.in_features for head in method.online.global_heads]
    assert widths == [64, 128, 256, 512]  # R18 res2..res5
    assert [head.fc1.in_features for head in method.online.local_heads] == [9 * w for w in widths]
    method.training_step(make_batch())["loss"].backward()
    assert all(p.grad is not None for p in method.online.parameters())
    assert all(p.grad is None for p in method.target.parameters())
    assert method.encoder_layout().parts == ("backbone",)
    config = load_config("detco_r50_200ep")
    assert config.method.stage_weights == [0.1, 0.4, 0.7, 1.0] and config.optim.base_lr == 0.03
    assert config.optim.name == "sgd" and config.optim.weight_decay == 1e-4 and config.train.epochs == 200

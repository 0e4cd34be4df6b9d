"""The InsLoc method: every level pools the box, the loss per level by hand, the queues, shuffle-BN, presets."""

import copy

import pytest
import torch
from torch import nn

from soco.config.loading import load_config
from soco.methods.insloc import InsLoc
from soco.methods.losses import info_nce
from soco.methods.shuffle_bn import shuffled_forward
from soco.models.roi_pooling import pool_rois


def tiny(*overrides):
    return load_config("insloc_tiny", list(overrides))


def make_batch(batch_size=4, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(batch_size, 2, generator=g) * size / 2
    boxes = torch.cat([corner, corner + 16 + torch.rand(batch_size, 2, generator=g) * size / 3], 1).clamp(max=size)
    return {"query": torch.randn(batch_size, 3, size, size, generator=g),
            "key": torch.randn(batch_size, 3, size, size, generator=g),
            "query_box": boxes, "key_box": (boxes + 3).clamp(max=size), "query_box_p5": (boxes - 2).clamp(min=0)}


def test_loss_is_the_weighted_sum_of_infonce_per_level_and_the_keys_are_queued():
    torch.manual_seed(0)
    config = tiny("method.level_weights=[1.0,0.5,0.25,2.0]")
    method = InsLoc(config.method)
    batch = make_batch()
    reference = copy.deepcopy(method)
    queue_before = method.queue.keys.clone()
    torch.manual_seed(5)
    outputs = method.training_step(batch)
    # by hand: the same networks, the key permutation replayed from the same random state
    torch.manual_seed(5)
    queries = reference.online(batch["query"], [batch["query_box"]] * 3 + [batch["query_box_p5"]])
    keys = shuffled_forward(lambda images, boxes: reference.target(images, [boxes] * 4).transpose(0, 1),
                            (batch["key"], batch["key_box"]), splits=2).transpose(0, 1)
    expected = sum(w * info_nce(queries[level], keys[level], queue_before[level], 0.2)
                   for level, w in enumerate([1.0, 0.5, 0.25, 2.0]))
    torch.testing.assert_close(outputs["loss"], expected)
    assert queries.shape == (4, 4, 16)
    torch.testing.assert_close(queries.norm(dim=-1), torch.ones(4, 4))
    # the four queues got this step's keys at slots 0-3, the pointer moved on by the batch
    torch.testing.assert_close(method.queue.keys[:, :4], keys)
    assert torch.equal(method.queue.keys[:, 4:], queue_before[:, 4:]) and int(method.queue.pointer) == 4


def stacked_by_hand(encoder, images, boxes_per_level):
    """The release's way: the four levels' pooled boxes stacked box-major and the head run once on the 4B rows."""
    maps = encoder.backbone(images)
    index = torch.arange(len(images))
    pooled = [pool_rois(maps[name], boxes, index, stride, 7, aligned=True)
              for name, stride, boxes in zip(("0", "1", "2", "3"), (4, 8, 16, 32), boxes_per_level)]
    rows = torch.stack(pooled, dim=1).reshape(4 * len(images), *pooled[0].shape[1:])  # box 0's P2..P5, box 1's, ...
    vectors = nn.functional.normalize(encoder.embed(encoder.box_head(rows)), dim=-1)
    return torch.stack([vectors[level::4] for level in range(4)]), pooled


def per_level_by_hand(encoder, pooled):
    """The old way: one head call per level, so BatchNorm normalised each level's B boxes on their own."""
    return torch.stack([nn.functional.normalize(encoder.embed(encoder.box_head(p)), dim=-1) for p in pooled])


def test_the_head_runs_once_over_the_boxes_of_all_levels_stacked_as_released():
    # release: moco_standard_roi_head.py:83-101 stacks the levels and calls the head once; insloc_fpn.py:292, 333
    torch.manual_seed(0)
    method = InsLoc(tiny().method)  # training mode: the head's BatchNorm uses the statistics of the batch it sees
    assert method.online.training and method.target.training
    batch = make_batch(batch_size=4, size=32, seed=3)
    query_boxes = [batch["query_box"]] * 3 + [batch["query_box_p5"]]
    with torch.no_grad():
        queries = method.online(batch["query"], query_boxes)
        stacked, pooled = stacked_by_hand(method.online, batch["query"], query_boxes)
        per_level = per_level_by_hand(method.online, pooled)
    assert queries.shape == (4, 4, 16)
    torch.testing.assert_close(queries, stacked, rtol=1e-5, atol=1e-6)
    # per-level calls give other vectors: the BatchNorm statistics were those of one level's 4 boxes
    assert (queries - per_level).abs().max() > 1e-2
    # the key encoder: each shuffled sub-batch of 2 images runs the head once over its 2 x 4 rows
    queue_before = method.queue.keys.clone()
    torch.manual_seed(5)
    with torch.no_grad():
        method.training_step(batch)
    torch.manual_seed(5)
    order = torch.randperm(4)
    keys, keys_per_level = torch.empty(4, 4, 16), torch.empty(4, 4, 16)
    with torch.no_grad():
        for part in torch.tensor_split(order, 2):
            images, boxes = batch["key"][part], batch["key_box"][part]
            keys[:, part], pooled = stacked_by_hand(method.target, images, [boxes] * 4)
            keys_per_level[:, part] = per_level_by_hand(method.target, pooled)
    torch.testing.assert_close(method.queue.keys[:, :4], keys, rtol=1e-5, atol=1e-6)
    assert (method.queue.keys[:, :4] - keys_per_level).abs().max() > 1e-2
    assert torch.equal(method.queue.keys[:, 4:], queue_before[:, 4:])


def test_fpn_convs_and_head_fcs_start_xavier_uniform_with_zero_bias_as_released():
    # release: necks/fpn.py:159-162 (every FPN conv), convfc_bbox_inscls_head.py:97-104 (the two fcs; the last std 0.01)
    torch.manual_seed(0)
    encoder = InsLoc(tiny().method).online  # R18, FPN 32 wide, head convs 256, fcs 12544 -> 64 -> 64 -> 16
    fpn_convs = [m for m in encoder.backbone.fpn.modules() if isinstance(m, nn.Conv2d)]
    fcs = [encoder.box_head[5], encoder.embed.fc]
    assert len(fpn_convs) == 8 and [fc.in_features for fc in fcs] == [256 * 49, 64]
    for layer in fpn_convs + fcs:
        fan_out, fan_in = layer.weight.shape[:2]
        receptive = layer.weight[0, 0].numel()
        bound = (6 / (fan_in * receptive + fan_out * receptive)) ** 0.5
        # uniform in +-bound: the largest of >= 2,048 draws lies within 5% of it (torchvision's bounds are lower:
        # sqrt(3 / fan_in) for the 1x1 laterals 64..512 -> 32, 1 / sqrt(fan_in) for the fcs)
        assert 0.95 * bound < layer.weight.abs().max() <= bound, layer
        assert layer.bias is None or torch.equal(layer.bias, torch.zeros_like(layer.bias))
    assert encoder.embed.projection.weight.std().item() == pytest.approx(0.01, rel=0.1)


def test_the_query_p5_uses_the_augmented_box_and_the_other_levels_the_true_box():
    torch.manual_seed(0)
    method = InsLoc(tiny().method).eval()
    batch = make_batch()
    both = method.online(batch["query"], [batch["query_box"]] * 3 + [batch["query_box_p5"]])
    true_only = method.online(batch["query"], [batch["query_box"]] * 4)
    torch.testing.assert_close(both[:3], true_only[:3])
    assert not torch.allclose(both[3], true_only[3])


def test_key_encoder_follows_by_constant_momentum_and_gets_no_gradient():
    torch.manual_seed(0)
    method = InsLoc(tiny().method)
    method.training_step(make_batch())["loss"].backward()
    assert all(p.grad is None for p in method.target.parameters())
    assert all(p.grad is not None for p in method.online.parameters())
    before = copy.deepcopy(method.target.state_dict())
    online = method.online.state_dict()
    assert method.after_optimizer_step(10, 100)["ema_momentum"] == 0.999 == method.after_optimizer_step(90, 100)[
        "ema_momentum"]
    name, param = next(iter(method.target.named_parameters()))
    torch.testing.assert_close(param, 0.999 * (0.999 * before[name] + 0.001 * online[name]) + 0.001 * online[name])


def test_one_process_shuffle_bn_normalises_each_shuffled_sub_batch_on_its_own():
    norm = nn.BatchNorm1d(3).train()
    inputs = torch.randn(8, 3) * torch.tensor([1.0, 5.0, 0.1]) + 2
    generator = torch.Generator().manual_seed(1)
    out = shuffled_forward(norm, (inputs,), splits=2, generator=generator)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    for part in torch.tensor_split(order, 2):
        chunk = inputs[part]
        by_hand = (chunk - chunk.mean(0)) / torch.sqrt(chunk.var(0, unbiased=False) + norm.eps)
        torch.testing.assert_close(out[part], by_hand, rtol=1e-4, atol=1e-5)
    # statistics of a sub-batch are not those of the whole batch
    whole = (inputs - inputs.mean(0)) / torch.sqrt(inputs.var(0, unbiased=False) + norm.eps)
    assert not torch.allclose(out, whole, atol=1e-3)
    identity = shuffled_forward(lambda x: x * 2, (inputs,), splits=4)
    torch.testing.assert_close(identity, inputs * 2)  # outputs come back in the inputs' order


def test_sgd_decays_every_parameter_as_released():
    method = InsLoc(tiny().method)
    (group,) = method.parameter_groups(1e-4)
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert len(group["params"]) == len(trainable) and group["weight_decay"] == 1e-4 and group["lars"] is False


def test_released_presets_and_what_export_takes():
    config = load_config("insloc_r50_fpn_200ep")
    optim = config.optim
    assert (optim.name, optim.base_lr, optim.nesterov, optim.weight_decay) == ("sgd", 0.03, True, 1e-4)
    assert optim.warmup_epochs == 0 and optim.cosine_per == "epoch" and optim.final_lr == 0
    assert config.method.queue_size == 65536 and config.method.temperature == 0.2 and config.method.momentum == 0.999
    assert load_config("insloc_r50_fpn_400ep").train.epochs == 400
    layout = InsLoc(tiny().method).encoder_layout()
    assert layout.parts == ("backbone", "fpn", "box_head") and layout.prefixes["projector"] == "embed."


def test_export_takes_backbone_fpn_convs_and_first_fc_and_reports_the_rest(tmp_path):
    from soco.config.loading import config_to_dict
    from soco.engine.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from soco.export import export_checkpoint

    config = tiny()
    method = InsLoc(config.method)
    save_checkpoint({"format_version": CHECKPOINT_FORMAT, "method": "insloc", "step": 0,
                     "encoder": method.encoder().state_dict(), "encoder_layout": method.encoder_layout().to_dict(),
                     "config": config_to_dict(config)}, tmp_path / "run" / "checkpoints" / "last.pt")
    result = export_checkpoint(tmp_path / "run", "torchvision", tmp_path / "tv.pt")
    weights = torch.load(result.output, weights_only=True)
    head = {k[len("roi_heads.box_head."):] for k in weights if k.startswith("roi_heads.box_head.")}
    assert head == set(method.online.box_head.state_dict())  # 4 convs with BN and the first fc
    assert {"5.weight", "5.bias"} <= head  # the fc after the flatten
    assert result.dropped == {"embed.*": 4}  # the second fc and the 128-d layer, weights and biases


def test_a_batch_too_small_for_the_key_sub_batches_is_a_config_error():
    from soco.errors import ConfigError

    with pytest.raises(ConfigError, match="key_bn_splits"):
        shuffled_forward(lambda x: x, (torch.zeros(3, 2),), splits=2)

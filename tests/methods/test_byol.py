"""BYOL as DeepMind released it: its networks, loss, EMA, optimiser presets, a short run, export, study arm."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as torch_f
import torchvision

from soco.cli.main import main
from soco.config.loading import load_config
from soco.engine.trainer import pretrain
from soco.export import export_checkpoint
from soco.methods.byol import BYOL
from soco.registry import method_class, study_arms
from soco.study.design import BUDGETS
from soco.study.runner import pretraining_settings


def tiny(*overrides):
    return load_config("byol_tiny", ["train.device=cpu", *overrides])


def make_batch(batch_size=4, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"views": {name: torch.randn(batch_size, 3, size, size, generator=g) for name in ("v1", "v2")}}


def test_networks_are_the_releases():
    torch.manual_seed(0)
    method = BYOL(load_config("byol_r50_100ep").method)
    projector, predictor = method.online.projector, method.predictor
    # networks.py:40-45: Linear with bias, BatchNorm, ReLU, Linear without bias; configs/byol.py:40-42
    assert (projector.linear1.in_features, projector.linear1.out_features, projector.linear2.out_features) \
        == (2048, 4096, 256)
    assert (predictor.linear1.in_features, predictor.linear1.out_features, predictor.linear2.out_features) \
        == (256, 4096, 256)
    for mlp in (projector, predictor, method.target.projector):
        assert mlp.linear1.bias is not None and mlp.linear2.bias is None
        assert isinstance(mlp.norm, torch.nn.BatchNorm1d) and isinstance(mlp.relu, torch.nn.ReLU)
        assert (mlp.norm.eps, mlp.norm.momentum) == (1e-5, 0.1)  # configs/byol.py:48-49: decay 0.9, eps 1e-5
    assert "linear2.bias" not in method.predictor.state_dict()
    # the release's Haiku BlockV1 starts each block's last BN at zero
    assert method.online.backbone.body.layer1[0].bn3.weight.abs().sum() == 0
    layout = method.encoder_layout()
    assert (layout.kind, layout.parts, layout.depth) == ("c5", ("backbone",), 50)
    assert BYOL.uses_proposals(method.config) is False
    with_bias = BYOL(tiny("method.model.output_bias=true", "method.model.zero_init_residual=false").method)
    assert with_bias.predictor.linear2.bias is not None and with_bias.online.projector.linear2.bias is not None
    assert with_bias.online.backbone.body.layer1[0].bn2.weight.abs().sum() > 0


def test_the_representation_is_the_global_average_of_c5():
    torch.manual_seed(0)
    method = BYOL(tiny().method).eval()
    images = make_batch()["views"]["v1"]
    c5 = method.online.backbone(images)["0"]
    assert c5.shape[-2:] == (2, 2)  # 64 px views: stride 32
    torch.testing.assert_close(method.online.representations(images), c5.mean(dim=(2, 3)))
    torch.testing.assert_close(method.online(images), method.online.projector(c5.mean(dim=(2, 3))))


def test_loss_is_the_symmetric_regression_by_hand_each_view_its_own_batch():
    torch.manual_seed(0)
    method = BYOL(tiny().method)
    batch = make_batch()
    reference = copy.deepcopy(method)
    loss = method.training_step(batch)["loss"]
    v1, v2 = batch["views"]["v1"], batch["views"]["v2"]
    q1, q2 = reference.predictor(reference.online(v1)), reference.predictor(reference.online(v2))
    with torch.no_grad():
        z1, z2 = reference.target(v1), reference.target(v2)
    # helpers.py:109-112: |q/|q| - z/|z||^2 = 2 - 2 cos; byol_experiment.py:243-250: both directions, mean over images
    by_hand = ((q1 / q1.norm(dim=1, keepdim=True) - z2 / z2.norm(dim=1, keepdim=True)).pow(2).sum(1)
               + (q2 / q2.norm(dim=1, keepdim=True) - z1 / z1.norm(dim=1, keepdim=True)).pow(2).sum(1)).mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-6)
    assert 0 < loss.item() < 8
    # both views in one batch (BatchNorm over 2B images) would give another loss
    both = copy.deepcopy(method)
    q = both.predictor(both.online(torch.cat([v1, v2])))
    with torch.no_grad():
        z = both.target(torch.cat([v1, v2]))
    joint = (2 - 2 * torch_f.cosine_similarity(q[:4], z[4:]) + 2 - 2 * torch_f.cosine_similarity(q[4:], z[:4])).mean()
    assert abs(joint.item() - loss.item()) > 1e-4
    loss.backward()
    assert all(p.grad is None for p in method.target.parameters())
    assert method.predictor.linear1.weight.grad.abs().sum() > 0


def test_target_starts_as_a_copy_and_follows_the_cosine_from_0_99():
    torch.manual_seed(0)
    method = BYOL(tiny().method)
    for online, target in zip(method.online.parameters(), method.target.parameters()):
        assert torch.equal(online, target) and not target.requires_grad
    # schedules.py:20-24: tau = 1 - (1 - base) (cos(pi k / K) + 1) / 2
    assert method.after_optimizer_step(step=0, total_steps=100)["ema_momentum"] == pytest.approx(0.99)
    before = copy.deepcopy(method.target.state_dict())
    with torch.no_grad():
        for param in method.online.parameters():
            param.add_(1.0)
    metrics = method.after_optimizer_step(step=50, total_steps=100)
    assert metrics["ema_momentum"] == pytest.approx(0.995)
    online = method.online.state_dict()
    for name, param in method.target.named_parameters():
        torch.testing.assert_close(param, 0.995 * before[name] + 0.005 * online[name])
    assert method.after_optimizer_step(step=100, total_steps=100)["ema_momentum"] == pytest.approx(1.0)


def test_lars_excludes_biases_and_every_batchnorm_from_decay_and_adaptation():
    method = BYOL(tiny().method)
    adapted, excluded = method.parameter_groups(1e-6)
    excluded_ids = {id(p) for p in excluded["params"]}
    assert id(method.online.backbone.body.layer2[0].downsample[1].weight) in excluded_ids
    assert id(method.predictor.norm.weight) in excluded_ids and id(method.online.projector.linear1.bias) in excluded_ids
    assert id(method.online.projector.linear1.weight) not in excluded_ids
    assert id(method.online.backbone.body.conv1.weight) not in excluded_ids
    assert (adapted["weight_decay"], adapted["lars"], excluded["weight_decay"], excluded["lars"]) == (1e-6, True, 0.0,
                                                                                                     False)
    assert not {id(p) for p in method.target.parameters()} & {id(p) for g in (adapted, excluded) for p in g["params"]}


def test_presets_hold_the_releases_numbers():
    presets = {epochs: load_config(f"byol_r50_{epochs}ep") for epochs in (40, 100, 300, 1000)}
    # configs/byol.py:21-23: lr, weight decay, EMA per length
    assert {e: (c.optim.base_lr, c.optim.weight_decay, c.method.ema_base, c.train.epochs) for e, c in presets.items()} \
        == {40: (0.45, 1e-6, 0.97, 40), 100: (0.45, 1e-6, 0.99, 100), 300: (0.3, 1e-6, 0.99, 300),
            1000: (0.2, 1.5e-6, 0.996, 1000)}
    r50 = presets[100]
    assert method_class("byol").presets.r50 == "byol_r50_100ep"
    optim = r50.optim
    # configs/byol.py:57-65: LARS eta 1e-3, momentum 0.9, 10 warm-up epochs; schedules.py:27-43: from 0, cosine to 0
    assert (optim.name, optim.trust_coefficient, optim.momentum, optim.warmup_epochs) == ("lars", 0.001, 0.9, 10)
    assert (optim.warmup_start_factor, optim.final_lr, optim.cosine_per) == (0.0, 0.0, "step")
    model = r50.method.model
    assert (model.depth, model.projector_hidden, model.projection_dim, model.predictor_hidden) == (50, 4096, 256, 4096)
    assert r50.method.views.size == 224 and r50.method.views.crop_scale == [0.08, 1.0] and r50.train.sync_bn
    small, smallest = load_config("byol_small"), load_config("byol_tiny")
    # the same view sizes and network as the other small and tiny presets of the study
    assert small.method.views.size == load_config("scrl_small").method.views.size == 96
    assert smallest.method.views.size == load_config("scrl_tiny").method.views.size == 64
    assert small.method.model.depth == smallest.method.model.depth == 18
    assert (small.train.steps, small.train.batch_size, smallest.train.steps) == (300, 16, 4)
    assert small.optim.base_lr == 0.45 and small.method.views.crop_scale == [0.08, 1.0]


def test_the_study_has_a_byol_arm_right_after_byol_image(capsys):
    names = [arm.name for arm in study_arms()]
    assert names.index("byol") == names.index("byol_image") + 1
    arm = {arm.name: arm for arm in study_arms()}["byol"]
    assert arm.presets == method_class("byol").presets and not arm.pretrains_fpn_and_head
    assert pretraining_settings("byol", BUDGETS["cpu"], "cpu")[0] == "byol_small"
    assert pretraining_settings("byol", BUDGETS["gpu"], "cuda")[0] == "byol_r50_100ep"
    assert main(["study", "--arms", "byol", "--plan", "--device", "cpu"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert plan[1].startswith("byol: BYOL as DeepMind released it: backbone only")
    assert "method byol, preset byol_small" in plan[1]


@pytest.mark.slow
def test_two_steps_of_pretraining_then_export(tiny_data, tmp_path):
    images, _ = tiny_data
    run = tmp_path / "run"
    summary = pretrain(tiny("train.steps=2"), run, images, None, progress=False)
    assert summary.steps == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    # the release's warm-up starts from 0 (schedules.py:35-37); 2 steps: warm-up over both, peak 0.45 x 4 / 256
    assert records[0]["lr"] == 0.0 and records[1]["lr"] == pytest.approx(0.45 * 4 / 256 / 2)
    assert records[0]["ema_momentum"] == pytest.approx(0.99) and all(math.isfinite(r["loss"]) for r in records)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["method"] == "byol" and state["encoder_layout"]["kind"] == "c5"
    method = BYOL(tiny().method)
    method.load_state_dict(state["method_state"])
    export_checkpoint(run, "backbone", tmp_path / "backbone.pt")
    backbone = torch.load(tmp_path / "backbone.pt", weights_only=True)
    resnet = torchvision.models.resnet18()
    missing, unexpected = resnet.load_state_dict(backbone, strict=False)
    assert unexpected == [] and sorted(missing) == ["fc.bias", "fc.weight"]
    trunk = method.online.backbone.body
    torch.testing.assert_close(resnet.layer4[1].conv2.weight, trunk.layer4[1].conv2.weight)

"""Learning-rate and EMA-momentum schedules at chosen steps."""

import math

import pytest

from soco.engine.schedules import learning_rate_at, scaled_learning_rate
from soco.methods.momentum import ema_momentum_at


def test_warmup_is_linear_from_one_hundredth():
    kwargs = dict(total_steps=1000, warmup_steps=100, peak_lr=2.0, final_lr=1e-6, warmup_start_factor=0.01)
    assert learning_rate_at(0, **kwargs) == pytest.approx(0.02)
    assert learning_rate_at(50, **kwargs) == pytest.approx(0.02 + 0.99 * 2.0 * 0.5)
    assert learning_rate_at(100, **kwargs) == pytest.approx(2.0)


def test_cosine_after_warmup_reaches_final_lr():
    kwargs = dict(total_steps=1000, warmup_steps=100, peak_lr=2.0, final_lr=1e-6, warmup_start_factor=0.01)
    halfway = 100 + 450
    assert learning_rate_at(halfway, **kwargs) == pytest.approx(1e-6 + (2.0 - 1e-6) * 0.5)
    assert learning_rate_at(1000, **kwargs) == pytest.approx(1e-6)
    quarter = 100 + 225
    assert learning_rate_at(quarter, **kwargs) == pytest.approx(1e-6 + (2.0 - 1e-6) * 0.5 * (1 + math.cos(math.pi / 4)))


def test_ema_momentum_schedule():
    assert ema_momentum_at(0, 1000, 0.99) == pytest.approx(0.99)
    assert ema_momentum_at(500, 1000, 0.99) == pytest.approx(0.995)
    assert ema_momentum_at(1000, 1000, 0.99) == pytest.approx(1.0)
    assert ema_momentum_at(250, 1000, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)


def test_linear_scaling_rule():
    assert scaled_learning_rate(1.0, 2048) == pytest.approx(8.0)
    assert scaled_learning_rate(1.0, 64) == pytest.approx(0.25)


def test_cosine_per_epoch_holds_the_learning_rate_through_each_epoch():
    from soco.engine.trainer import Schedule, schedule_position
    from soco.errors import ConfigError

    schedule = Schedule(micro_batches_per_epoch=4, steps_per_epoch=4, total_steps=12, warmup_steps=0, peak_lr=1.0,
                        images_per_step=8)
    assert [schedule_position(s, schedule, "epoch") for s in range(12)] == [0] * 4 + [4] * 4 + [8] * 4
    assert [schedule_position(s, schedule, "step") for s in range(5)] == [0, 1, 2, 3, 4]
    lrs = [learning_rate_at(schedule_position(s, schedule, "epoch"), 12, 0, 1.0, 0.0, 0.0) for s in range(12)]
    assert lrs[:4] == [1.0] * 4 and lrs[4] == lrs[7] == pytest.approx(0.75) and lrs[8] == pytest.approx(0.25)
    with pytest.raises(ConfigError, match="cosine_per"):
        schedule_position(0, schedule, "iteration")

"""Optimizers (Keras-like RMSprop, SGD, Adam, AdamW) and per-step learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from convlens.engine.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from convlens.errors import ConfigError


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_rmsprop_uses_keras_defaults() -> None:
    opt = build_optimizer(_net(), "rmsprop", 1e-3)
    assert isinstance(opt, torch.optim.RMSprop)
    g = opt.param_groups[0]
    assert g["alpha"] == 0.9 and g["eps"] == 1e-7 and g["momentum"] == 0.0 and g["lr"] == 1e-3


def test_sgd_nesterov_and_plain_momentum() -> None:
    opt = build_optimizer(_net(), "sgd", 0.1, momentum=0.9, nesterov=True)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["momentum"] == 0.9
    # Nesterov needs momentum: with none it is switched off rather than crashing.
    opt = build_optimizer(_net(), "sgd", 0.1, momentum=0.0, nesterov=True)
    assert opt.param_groups[0]["nesterov"] is False


@pytest.mark.parametrize(("name", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_family(name: str, cls: type) -> None:
    assert type(build_optimizer(_net(), name, 3e-3, weight_decay=0.01)) is cls


def test_weight_decay_skips_biases_and_norm_parameters() -> None:
    net = _net()
    groups = param_groups(net, 5e-4)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 5e-4 and groups[1]["weight_decay"] == 0.0
    assert id(net[0].weight) in decayed and id(net[4].weight) in decayed
    assert id(net[0].bias) not in decayed and id(net[1].weight) not in decayed
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


def test_constant_schedule_with_warmup() -> None:
    assert lr_factor("constant", 0, 100, 10) == pytest.approx(0.01)
    assert lr_factor("constant", 5, 100, 10) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor("constant", 10, 100, 10) == 1.0
    assert lr_factor("constant", 99, 100, 10) == 1.0
    assert lr_factor("constant", 0, 100, 0) == 1.0


def test_cosine_schedule_decays_to_zero_after_warmup() -> None:
    assert lr_factor("cosine", 10, 110, 10) == pytest.approx(1.0)
    assert lr_factor("cosine", 60, 110, 10) == pytest.approx(0.5)
    assert lr_factor("cosine", 110, 110, 10) == pytest.approx(0.0, abs=1e-12)
    vals = [lr_factor("cosine", s, 110, 10) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:], strict=False))


def test_onecycle_shape() -> None:
    total = 200
    assert lr_factor("onecycle", 0, total) == pytest.approx(1 / 25)
    assert lr_factor("onecycle", 50, total) == pytest.approx(1.0)  # peak at 25%
    assert lr_factor("onecycle", total, total) == pytest.approx(1 / 25e4)
    up = [lr_factor("onecycle", s, total) for s in range(0, 51)]
    assert all(a < b for a, b in zip(up, up[1:], strict=False))


def test_unknown_optimizer_or_schedule_is_a_user_error() -> None:
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        build_optimizer(_net(), "adagrad", 1e-3)
    with pytest.raises(ConfigError, match="schedule must be one of"):
        lr_factor("step", 0, 10)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_scheduler_follows_lr_factor_per_step(schedule: str) -> None:
    net = _net()
    opt = build_optimizer(net, "sgd", 0.2, momentum=0.0)
    sched = build_scheduler(opt, schedule, epochs=3, steps_per_epoch=7, warmup_epochs=1.0)
    seen = []
    for _ in range(21):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.2 * lr_factor(schedule, s, 21, 7) for s in range(21)]
    assert seen == pytest.approx(expected)
    # The state is plain data: a fresh optimizer + scheduler resume at the same step.
    net2 = _net()
    opt2 = build_optimizer(net2, "sgd", 0.2, momentum=0.0)
    sched2 = build_scheduler(opt2, schedule, epochs=3, steps_per_epoch=7, warmup_epochs=1.0)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    for o, s in ((opt, sched), (opt2, sched2)):
        o.step()
        s.step()
    assert math.isclose(opt2.param_groups[0]["lr"], opt.param_groups[0]["lr"])
    assert sched2.last_epoch == sched.last_epoch == 22

"""``--time``: the budget arithmetic, and a budgeted run on tiny data that completes its schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from convlens import display
from convlens.config import parse_duration
from convlens.engine import budget
from convlens.engine.optim import ONECYCLE_DIV, ONECYCLE_FINAL_DIV, progressive_epochs
from convlens.engine.training import train
from convlens.errors import ConfigError
from tests.engine.helpers import csv_rows, make_dataset, quiet, tiny_config


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("5m", 300), ("1h", 3600), ("1h30m", 5400),
                                          ("2.5m", 150), ("45", 45), (" 10M ", 600)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5 minutes", "0s", "-5m", "1d"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="time"):
        parse_duration(text)


def test_plan_fits_the_budget_with_the_final_evaluation() -> None:
    speed = budget.Speed(step_s=0.2, val_batch_s=0.05)
    epoch_s = budget.epoch_seconds(speed, steps_per_epoch=32, val_batches=16)
    assert epoch_s == pytest.approx(32 * 0.2 + 16 * 0.05 + budget.EPOCH_OVERHEAD_S)
    finish_s = budget.finish_seconds(speed, val_batches=16, views=2)
    assert finish_s == pytest.approx(2 * 16 * 0.05 + budget.FINISH_OVERHEAD_S)
    # The bf16 check before the evaluation: a bf16 and an fp32 pass over 4 batches, per view.
    checked = budget.finish_seconds(speed, val_batches=16, views=2, check_batches=4)
    assert checked == pytest.approx(finish_s + 2 * 3 * 4 * 0.05)
    spent = 10.0
    epochs = budget.plan_epochs(240.0, spent, epoch_s, finish_s)
    # The largest number of epochs whose estimate stays within the (safety-reduced) budget.
    assert budget.estimate_seconds(epochs, epoch_s, finish_s, spent) <= 240.0 * budget.SAFETY
    assert budget.estimate_seconds(epochs + 1, epoch_s, finish_s, spent) > 240.0 * budget.SAFETY
    assert epochs == int((240.0 * budget.SAFETY - spent - finish_s) // epoch_s)
    # Twice the budget, about twice the epochs; a budget too small still trains one epoch.
    assert budget.plan_epochs(480.0, spent, epoch_s, finish_s) >= 2 * epochs
    assert budget.plan_epochs(5.0, spent, epoch_s, finish_s) == 1
    with pytest.raises(ValueError):
        budget.plan_epochs(0.0, 0.0, epoch_s, finish_s)


def test_plan_counts_progressive_epochs_at_their_own_cost() -> None:
    """With progressive resizing the first half of the epochs are cheaper: the plan fits more."""
    epoch_s, small_s, finish_s, spent = 6.0, 3.0, 8.0, 10.0
    plain = budget.plan_epochs(600.0, spent, epoch_s, finish_s)
    epochs = budget.plan_epochs(600.0, spent, epoch_s, finish_s, small_s, 0.5)
    small = progressive_epochs(0.5, epochs)
    assert small == round(epochs / 2)
    estimate = budget.estimate_seconds(epochs, epoch_s, finish_s, spent, small_s, 0.5)
    assert estimate == pytest.approx(spent + small * small_s + (epochs - small) * epoch_s + finish_s)
    assert estimate <= 600.0 * budget.SAFETY < budget.estimate_seconds(epochs + 1, epoch_s, finish_s, spent, small_s, 0.5)
    assert epochs > 1.3 * plain  # ~4/3: half the epochs at half the cost
    # Without the smaller size's cost the progressive fraction changes nothing.
    assert budget.plan_epochs(600.0, spent, epoch_s, finish_s, None, 0.5) == plain


def test_long_run_notice_says_once_only_when_long(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 10_000, 2))  # every perf_counter call: 2 s later
    monkeypatch.setattr(budget.time, "perf_counter", lambda: float(next(clock)))
    said: list[str] = []
    silent: list[str] = []
    long = budget.LongRunNotice(epochs=100, steps_per_epoch=50, val_share=0.0, say=said.append, probe_steps=4)
    short = budget.LongRunNotice(epochs=1, steps_per_epoch=50, val_share=0.0, say=silent.append, probe_steps=4)
    for notice in (long, short):
        for step in range(10):
            notice(0, step)
    assert len(said) == 1 and "--time" in said[0] and "estimated training time" in said[0]
    assert silent == []
    assert budget.format_seconds(75) == "1m15s" and budget.format_seconds(5400) == "1h30m"
    assert display.clock(75) == "1:15" and display.clock(3725) == "1:02:05"


def test_time_budget_run_completes_its_schedule(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "ds", classes=2, per_class=12)
    cfg = tiny_config(data, tmp_path, time="20s", epochs=1000, optimizer="sgd", lr=0.1, schedule="onecycle")
    out = quiet()
    result = train(cfg, console=out)
    run = result.run_dir
    plan = json.loads((run / "budget.json").read_text())
    rows = csv_rows(run / "metrics.csv")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # The epochs were chosen from the budget (not the 1000 asked for), recorded, and all trained.
    assert 1 <= plan["epochs"] < 1000 and saved["epochs"] == plan["epochs"] == len(rows)
    assert saved["time"] == "20s" and plan["budget_s"] == 20.0 and plan["used_s"] > 0
    # The one-cycle schedule ran to its end: the last step's learning rate is the final one.
    assert float(rows[-1]["lr"]) == pytest.approx(0.1 / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV), rel=1e-6)
    assert result.metrics["time_budget"]["epochs"] == plan["epochs"]
    assert "time budget 20s" in out.file.getvalue()
    assert "time budget 20s" in (run / "report.html").read_text()


@pytest.mark.parametrize("name", ["sgd", "adamw", "rmsprop"])
def test_measure_speed_leaves_the_model_untouched(name: str) -> None:
    import torch

    from convlens.engine.optim import build_optimizer
    from convlens.models import create

    torch.manual_seed(0)
    model = create("tiny", 2, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, name, 0.01, 1e-4)
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 2, (4,)))] * 2

    def step(m: torch.nn.Module, batch: tuple) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(m(batch[0])[:, 0], batch[1].float())

    speed = budget.measure_speed(model, opt, step, batches, lambda m, b: m(b[0]), batches, warmup=1, timed=2)
    assert speed.step_s > 0 and speed.val_batch_s > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not opt.state  # the run's optimiser never stepped


def test_replan_scales_the_plan_to_the_first_epoch() -> None:
    plan = budget.Plan(budget_s=300.0, epochs=20, epoch_s=10.0, finish_s=5.0, spent_before_s=10.0,
                       estimate_s=215.0, first_train_s=9.0)
    assert budget.replan(plan, 9.0 * (1 + budget.REPLAN_TOLERANCE / 2)) is None  # close enough: kept
    slower, faster = budget.replan(plan, 18.0), budget.replan(plan, 4.5)
    assert slower is not None and faster is not None
    assert slower.first_epoch_ratio == pytest.approx(2.0) and slower.epoch_s == pytest.approx(20.0)
    assert slower.epochs < plan.epochs < faster.epochs and slower.planned_epochs == faster.planned_epochs == 20
    for new in (slower, faster):  # the largest number of epochs that fits, at the measured speed
        assert new.estimate_s == pytest.approx(budget.estimate_seconds(new.epochs, new.epoch_s, 5.0, 10.0))
        assert new.estimate_s <= 300.0 * budget.SAFETY
        assert budget.estimate_seconds(new.epochs + 1, new.epoch_s, 5.0, 10.0) > 300.0 * budget.SAFETY
    # Progressive resizing: the smaller epochs scale too.
    small = budget.replan(budget.Plan(budget_s=300.0, epochs=20, epoch_s=10.0, finish_s=5.0, spent_before_s=10.0,
                                      estimate_s=200.0, small_epoch_s=6.0, first_train_s=5.0), 10.0, 0.25)
    assert small is not None and small.small_epoch_s == pytest.approx(12.0)
    assert budget.replan(budget.Plan(300.0, 20, 10.0, 5.0, 10.0, 215.0), 18.0) is None  # no estimate: kept


def test_a_pessimistic_probe_is_corrected_after_the_first_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe thinks steps take 3x longer than they do: the plan after the first epoch uses the budget."""
    measure = budget.measure_speed

    def pessimistic(*args: object, **kwargs: object) -> budget.Speed:
        speed = measure(*args, **kwargs)
        return budget.Speed(step_s=3 * speed.step_s, val_batch_s=3 * speed.val_batch_s)

    monkeypatch.setattr(budget, "measure_speed", pessimistic)
    data = make_dataset(tmp_path / "ds", classes=2, per_class=12)
    cfg = tiny_config(data, tmp_path, time="15s", epochs=1000, optimizer="sgd", lr=0.1, schedule="onecycle")
    out = quiet()
    result = train(cfg, console=out)
    plan = json.loads((result.run_dir / "budget.json").read_text())
    rows = csv_rows(result.run_dir / "metrics.csv")
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert plan["first_epoch_ratio"] < 1 - budget.REPLAN_TOLERANCE and plan["epochs"] > plan["planned_epochs"]
    assert saved["epochs"] == plan["epochs"] == len(rows)
    assert f"{plan['epochs']} epochs instead of {plan['planned_epochs']}" in out.file.getvalue()
    # The schedule was rebuilt for the new total: it still ends at its final learning rate.
    assert float(rows[-1]["lr"]) == pytest.approx(0.1 / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV), rel=1e-6)


# ----------------------------------------------------------------------------- pretrained runs
LADDER = (budget.PretrainedOption("lite0"), budget.PretrainedOption("lite0", head_flip=True),
          budget.PretrainedOption("lite2", head_flip=True, finetune_epochs=3))
SPEEDS = {"lite0": 100.0, "lite2": 40.0}


def _pick(budget_s: float, speeds: dict[str, float] = SPEEDS, spent_s: float = 2.0) -> budget.PretrainedOption:
    plan = budget.plan_pretrained(budget_s, spent_s, 800, 200, speeds, LADDER)
    return budget.PretrainedOption(plan.backbone, plan.head_flip, plan.finetune_epochs)


def test_pretrained_plan_takes_the_most_preferred_option_that_fits() -> None:
    cost = {o: 2.0 + budget.option_seconds(o, 800, 200, SPEEDS[o.backbone]) for o in LADDER}
    assert cost[LADDER[0]] < cost[LADDER[1]] < cost[LADDER[2]]  # flips and the bigger backbone cost more
    for option, seconds in cost.items():  # just enough budget for each option: that option
        assert _pick(seconds / budget.SAFETY + 0.01) == option
    assert _pick(cost[LADDER[1]] / budget.SAFETY - 0.01) == LADDER[0]  # a second short: the one before
    assert _pick(1.0) == LADDER[0]  # nothing fits: the fastest, the default
    tuned = (*LADDER[:1], budget.PretrainedOption("lite0", finetune_epochs=2))
    plan = budget.plan_pretrained(1.0, 2.0, 800, 200, SPEEDS, tuned)  # as fast as the head: fine-tuning fits later
    assert (plan.backbone, plan.finetune_epochs) == ("lite0", 2)
    assert _pick(1e6, {"lite0": 100.0}) == LADDER[1]  # no probed speed for lite2: not a candidate
    plan = budget.plan_pretrained(1e6, 2.0, 800, 200, SPEEDS, LADDER)
    assert [o["estimate_s"] for o in plan.options] == pytest.approx(list(cost.values()))
    assert plan.to_dict()["feature_img_s"] == SPEEDS and "lite2 head on flip-augmented rows" in plan.summary()


def test_pretrained_plan_rejects_what_it_cannot_plan() -> None:
    with pytest.raises(ValueError, match="budget"):
        budget.plan_pretrained(0, 0, 10, 2, SPEEDS, LADDER)
    with pytest.raises(ValueError, match="speed"):
        budget.plan_pretrained(60, 0, 10, 2, {"other": 5.0}, LADDER)


def test_finetune_epochs_fill_what_the_head_left() -> None:
    # 100 s budget, 40 s spent, 10 s to finish: 97 - 50 = 47 s left, 15 s epochs -> 3
    assert budget.finetune_epochs_that_fit(100, 40, 15, 10, most=10) == 3
    assert budget.finetune_epochs_that_fit(100, 40, 15, 10, most=2) == 2  # at most what was asked
    assert budget.finetune_epochs_that_fit(100, 95, 15, 10, most=10) == 0  # over already: none


def test_the_budget_note_says_when_even_the_fastest_path_is_over_the_budget() -> None:
    from convlens.engine.recipe import budget_note

    def plan(estimate_s: float) -> budget.PretrainedPlan:
        return budget.plan_pretrained(60.0, 0.0, 2000, 1000, {"efficientnet_lite0": 2000 * 3000 / estimate_s})

    fits, over = plan(30.0), budget.plan_pretrained(60.0, 0.0, 2000, 1000, {"efficientnet_lite0": 20.0})
    assert fits.estimate_s <= 60 and "more than the budget" not in budget_note(fits)
    assert over.estimate_s > 60 and "more than the budget" in budget_note(over)


def test_a_wider_head_costs_more_and_can_tip_the_plan() -> None:
    """An ensemble's head reads 3x the features: its fit is counted ~sqrt(3)x, and that can move
    the choice to the option before it."""
    o = LADDER[2]
    base = budget.option_seconds(o, 800, 200, 40.0)
    wide = budget.option_seconds(o, 800, 200, 40.0, width=3 * budget.HEAD_FEATURES)
    assert wide - base == pytest.approx(budget.HEAD_S * (3 ** 0.5 - 1))
    just = (2.0 + base) / budget.SAFETY + 0.01  # enough for lite2 with a 1,280-wide head only
    assert _pick(just) == LADDER[2]
    plan = budget.plan_pretrained(just, 2.0, 800, 200, SPEEDS, LADDER, {"lite2": 3 * budget.HEAD_FEATURES})
    assert (plan.backbone, plan.head_flip) == ("lite0", True)

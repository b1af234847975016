"""--ema (weights' moving average) and progressive resizing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from convlens.engine.checkpoint import load_checkpoint
from convlens.engine.ema import ModelEma
from convlens.engine.optim import progressive_size
from convlens.engine.resume import resume_config
from convlens.engine.trainer import Trainer, TrainingInterrupted
from convlens.engine.training import train
from convlens.infer.bundle import load_model
from convlens.models import create
from tests.engine.helpers import make_dataset, quiet, tiny_config


def test_ema_follows_the_weights_with_its_decay() -> None:
    torch.manual_seed(0)
    model = create("vgg10", 2, 3)
    ema = ModelEma(model, decay=0.9)
    ema.update(model)  # the first update copies
    start = ema.module.stem[0].weight.clone()
    ema.updates = 1000  # past the warm-up: the full decay applies
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.stem[0].weight, start + 0.1)
    assert ema.module.stem[1].num_batches_tracked == model.stem[1].num_batches_tracked
    other = ModelEma(model, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == ema.updates
    torch.testing.assert_close(other.module.stem[0].weight, ema.module.stem[0].weight)


def test_a_restored_ema_keeps_averaging() -> None:
    """A resumed run's EMA continues as the uninterrupted one (it used to restart from the raw weights)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = ModelEma(model, 0.9)
    for _ in range(20):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
    restored = ModelEma(model, 0.9)
    restored.load_state_dict(ema.state_dict())
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    restored.update(model)
    torch.testing.assert_close(restored.module.weight, ema.module.weight)
    assert not torch.allclose(restored.module.weight, model.weight)  # an average, not the raw weights


def test_ema_run_saves_the_averaged_weights(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "ds", classes=2, per_class=12)
    result = train(tiny_config(data, tmp_path, ema=True, ema_decay=0.5), console=quiet())
    model, _ = load_model(result.bundle_path)
    last = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")
    assert "ema" in last
    best = load_checkpoint(result.run_dir / "checkpoints" / "best.pt")
    inner = model.inner if hasattr(model, "inner") else model
    averaged = best["ema"]["module"]  # the bundle holds the EMA weights of the best epoch
    for k, v in inner.state_dict().items():
        assert torch.equal(v, averaged[k].to(v.dtype)), k
    assert any(not torch.equal(averaged[k], best["model"][k]) for k in averaged)


def test_progressive_sizes() -> None:
    assert progressive_size(128, 0.0, 0, 40) is None
    assert progressive_size(128, 0.5, 0, 40) == (96, 96) and progressive_size(128, 0.5, 19, 40) == (96, 96)
    assert progressive_size(128, 0.5, 20, 40) is None


def test_progressive_run_trains_small_then_full(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "ds", classes=2, per_class=12)
    seen: list[int] = []
    cfg = tiny_config(data, tmp_path, image_size=32, progressive=0.5, epochs=2)
    from convlens.engine import trainer as trainer_mod

    t = trainer_mod.Trainer(cfg, console=quiet())
    t.fit(on_step=lambda epoch, step: seen.append(t.step_fn.input_size))
    assert seen[0] == (24, 24) and seen[-1] is None


def test_resuming_an_ema_run_keeps_its_best_averaged_weights(tmp_path: Path) -> None:
    """The best weights a resumed run holds for its bundle are the EMA's, as before the interruption."""
    data = make_dataset(tmp_path / "ds", classes=2, per_class=12)
    cfg = tiny_config(data, tmp_path, ema=True, ema_decay=0.5, epochs=2)

    def interrupt(epoch: int, step: int) -> None:
        if epoch == 1 and step == 0:  # after epoch 1's validation and best.pt
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as e:
        train(cfg, console=quiet(), on_step=interrupt)
    saved = load_checkpoint(e.value.run_dir / "checkpoints" / "best.pt")
    trainer = Trainer(resume_config(e.value.run_dir, {}), resume=e.value.run_dir, console=quiet())
    assert trainer.best_weights is not None
    for k, v in saved["ema"]["module"].items():
        assert torch.equal(trainer.best_weights[k], v), k
    assert any(not torch.equal(saved["model"][k], v) for k, v in saved["ema"]["module"].items())

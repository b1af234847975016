"""The fine-tuning recipe of a pretrained backbone: which units train at which learning rate,
the batch-norm mode, warm-up, early stopping with the head as the fallback, and the
``finetune_*`` keys' validation and resume. A random EfficientNet-Lite0 stands in for weights."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from convlens.config import TrainConfig, resolve_train_config
from convlens.engine import recipe, training, transfer
from convlens.engine.checkpoint import load_checkpoint
from convlens.engine.optim import build_optimizer, build_scheduler, layerwise_groups
from convlens.engine.resume import resume_config
from convlens.errors import ConfigError
from convlens.models import create
from tests.engine.helpers import csv_rows, make_dataset, quiet

LITE0 = SimpleNamespace(create=lambda n: create("efficientnet_lite0", n))  # what fine_tuning_model reads of a Backbone


def _ids(params: list[nn.Parameter]) -> set[int]:
    return {id(p) for p in params}


def test_layerwise_groups_decay_the_rate_back_from_the_head() -> None:
    """The last unit at lr, each one before it ``decay`` times the next; biases and norm scales
    without weight decay; units that do not train are left out."""
    units = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)) for _ in range(3)] + [nn.Linear(4, 2)]
    units[0].requires_grad_(False)
    groups = layerwise_groups([units], 1e-3, 0.5, 0.01)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    for k, unit in enumerate(reversed(units)):
        for name, p in unit.named_parameters():
            if k == 3:
                assert id(p) not in by_param
                continue
            assert by_param[id(p)] == pytest.approx((1e-3 * 0.5**k, 0.01 if p.ndim >= 2 else 0.0)), (k, name)
    peaks = [g["lr"] for g in groups]
    opt = build_optimizer(groups, "adamw", 1e-3, 0.01)
    assert [g["lr"] for g in opt.param_groups] == peaks
    # A warm-up and the cosine scale every group alike: the ratios between units stay.
    sched = build_scheduler(opt, "cosine", epochs=2, steps_per_epoch=10, warmup_epochs=0.5)
    first = [g["lr"] for g in opt.param_groups]
    assert first == pytest.approx([0.01 * lr for lr in peaks])
    for _ in range(5):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(peaks)


@pytest.mark.parametrize("share", [0.25, 0.5, 1.0])
def test_the_units_that_fine_tune_and_their_rates(share: float) -> None:
    """``finetune_units`` is the share of units (counted back from the head) that train; only
    they get gradients, each at its layer-wise rate."""
    cfg = TrainConfig(finetune_units=share, finetune_lr_decay=0.7, lr=2e-4, optimizer="adamw", weight_decay=0.0)
    model = transfer.fine_tuning_model(LITE0, 3, share)
    units = [m for _, _, m in model.summary_units()]
    n = max(2, int(len(units) * share))
    trainable = transfer.trainable_units(model, share)
    assert trainable == units[-n:] and trainable[-1] is model.head
    opt = transfer.fine_tuning_optimizer(model, cfg)
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for k, unit in enumerate(reversed(units)):
        for p in unit.parameters():
            assert p.requires_grad is (k < n)
            assert rate.get(id(p)) == (pytest.approx(2e-4 * 0.7**k) if k < n else None)
    model.train()
    model(torch.rand(2, 3, 64, 64)).sum().backward()
    for k, unit in enumerate(reversed(units)):
        grads = [p.grad for p in unit.parameters()]
        assert all(g is not None for g in grads) if k < n else all(g is None for g in grads), k


@pytest.mark.parametrize("mode", ["frozen", "train"])
def test_batch_norm_statistics_follow_the_mode(mode: str) -> None:
    """``frozen``: every batch-norm layer keeps its statistics; ``train``: those of the
    fine-tuned units follow the batches, the frozen units' never do."""
    cfg = TrainConfig(finetune_units=0.25, finetune_bn=mode)
    model = transfer.fine_tuning_model(LITE0, 2, 0.25)
    trainable = transfer.trainable_units(model, 0.25)
    tuned = {id(m) for u in trainable for m in u.modules() if isinstance(m, nn.BatchNorm2d)}
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("running_mean")}
    transfer.set_fine_tuning_mode(model, cfg)
    with torch.no_grad():
        model(torch.rand(4, 3, 64, 64))
    after = model.state_dict()
    norms = dict(model.named_modules())
    changed = {id(norms[k.rsplit(".", 1)[0]]) for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed == (tuned if mode == "train" else set())
    assert tuned  # the last quarter has batch norms to test


def test_finetune_keys_are_validated() -> None:
    """Each ``finetune_*`` key out of range or an unknown batch-norm mode: one line naming it."""
    bad = {"finetune_units": 0.0, "finetune_lr_decay": 1.5, "finetune_warmup": -1.0, "finetune_patience": -1,
           "finetune_crop_scale": 0.0}
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=rf"^{key} must be .*Received: {key}={value!r}$"):
            resolve_train_config(None, None, {key: value})
    with pytest.raises(ConfigError, match=r"finetune_bn must be one of frozen, train. Received: finetune_bn='trian'. "
                                          r"Did you mean 'train'\?"):
        resolve_train_config(None, None, {"finetune_bn": "trian"})


def test_the_pretrained_recipe_takes_fine_tunings_warmup_patience_and_crops() -> None:
    """A backbone's recipe sets the trainer's warm-up, patience and crop scale from the
    ``finetune_*`` keys (as ``lr`` from ``finetune_lr``)."""
    cfg = TrainConfig(finetune_warmup=0.3, finetune_patience=2, finetune_crop_scale=0.6, warmup_epochs=5.0,
                      patience=7, crop_scale=1.0)
    backbone = SimpleNamespace(preprocessing=SimpleNamespace(size=(224, 224), resize="crop", scale=1 / 255,
                                                             mean=(0.5,) * 3, std=(0.5,) * 3),
                               source=SimpleNamespace(arch="efficientnet_lite0"))
    layer = recipe.backbone_layer(backbone, cfg, cfg.finetune_epochs)
    assert (layer["warmup_epochs"], layer["patience"], layer["crop_scale"]) == (0.3, 2, 0.6)


@pytest.fixture(scope="module")
def lite0_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Lite0 saved as safetensors, its batch-norm statistics measured on one batch."""
    torch.manual_seed(0)
    model = create("efficientnet_lite0", 2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 224, 224) * 2 - 1)
    path = tmp_path_factory.mktemp("weights") / "lite0.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if not k.startswith("head.")}, str(path))
    return path


def test_early_stopping_keeps_the_head_and_resume_keeps_the_recipe(tmp_path: Path, lite0_file: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A fine-tuning epoch worse than the head on validation stops the run after
    ``finetune_patience`` epochs and the bundle is the head's; config.yaml records the recipe,
    and resuming reads it back."""
    import convlens.engine.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "_validate", lambda *a, **k: (9.0, 0.0))  # every fine-tuned epoch: worse
    data = make_dataset(tmp_path / "data", per_class=6, size=40)
    values = {"data": str(data), "cache_dir": str(tmp_path / "cache"), "project": str(tmp_path / "runs"),
              "workers": 1, "threads": 1, "val_fraction": 0.25, "pretrained": str(lite0_file), "batch_size": 4,
              "precision": "fp32", "device": "cpu", "finetune_epochs": 3, "finetune_patience": 1,
              "finetune_units": 0.5, "finetune_lr_decay": 0.6, "finetune_bn": "train", "finetune_warmup": 0.5,
              "finetune_crop_scale": 0.7}
    r = recipe.recipe_for(resolve_train_config(None, None, values), set(values))
    result = training.train(r, console=quiet())
    rows = csv_rows(result.run_dir / "metrics.csv")
    assert [int(row["epoch"]) for row in rows] == [1, 2] and result.stopped_early
    best = load_checkpoint(result.run_dir / "checkpoints" / "best.pt")
    assert best["best"]["epoch"] == 1  # the bundle's weights: the fitted head on the frozen backbone
    saved = resume_config(result.run_dir, {})
    expected = {k: values[k] for k in values if k.startswith("finetune_")}
    assert {k: getattr(saved, k) for k in expected} == expected
    assert (saved.patience, saved.warmup_epochs, saved.crop_scale) == (1, 0.5, 0.7)


def test_an_ensembles_members_each_decay_back_from_the_shared_head() -> None:
    """Each member's last units decay from the head's rate by their own distance from it; the
    shared head is one group."""
    from convlens.models.registry import create

    model = create("efficientnet_lite0+efficientnet_lite1", 2)
    model.requires_grad_(True)
    branches = transfer.trainable_branches(model, 0.25)
    groups = layerwise_groups(branches, 1e-3, 0.5, 0.0)
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(by_param) == sum(1 for g in groups for _ in g["params"])  # every parameter once
    for units in branches:
        assert units[-1] is model.head
        for k, unit in enumerate(reversed(units)):
            assert all(by_param[id(p)] == pytest.approx(1e-3 * 0.5**k) for p in unit.parameters())
    assert branches[0][-2] is model.members[0].head_conv and branches[1][-2] is model.members[1].head_conv


def test_a_run_saved_before_the_recipe_keys_resumes_with_the_recipe_it_trained_with(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its checkpoint's config has no ``finetune_units``: the last quarter at one rate, as then
    (the new defaults would change the trainable units and the saved optimizer state would not fit)."""
    from convlens.engine import resume

    saved = {"data": str(tmp_path), "pretrained": "efficientnet_lite0", "finetune_epochs": 2}
    monkeypatch.setattr(resume, "resolve_checkpoint", lambda r: tmp_path / "last.pt")
    monkeypatch.setattr(resume, "load_checkpoint", lambda p: {"config": dict(saved)})
    cfg = resume_config(tmp_path, {})
    assert (cfg.finetune_units, cfg.finetune_lr_decay) == (0.25, 1.0) and cfg.finetune_epochs == 2
    saved["finetune_units"] = 0.5  # a run of this recipe keeps its own values
    assert (resume_config(tmp_path, {}).finetune_units, resume_config(tmp_path, {}).finetune_lr_decay) == (0.5, 0.8)


def test_lr_find_sweeps_fine_tuning_with_its_layerwise_ratios() -> None:
    """lr-find's optimizer is fine-tuning's: the swept rate is the head's, every other unit keeps
    its decayed ratio to it (from scratch: one rate)."""
    from convlens.engine.lr_find import sweep_optimizer

    cfg = TrainConfig(finetune_lr_decay=0.5, finetune_units=0.25, lr=1e-4, optimizer="adamw")
    model = transfer.fine_tuning_model(LITE0, 3, cfg.finetune_units)
    optimizer, scales = sweep_optimizer(model, cfg, fine_tuning=True)
    units = transfer.trainable_units(model, cfg.finetune_units)
    expected = {id(p): 0.5**k for k, unit in enumerate(reversed(units)) for p in unit.parameters()}
    for group, scale in zip(optimizer.param_groups, scales, strict=True):
        assert all(expected[id(p)] == pytest.approx(scale) for p in group["params"])
    assert max(scales) == 1.0 and min(scales) == pytest.approx(0.5 ** (len(units) - 1))
    _, flat = sweep_optimizer(create("tiny", 2), TrainConfig(), fine_tuning=False)
    assert set(flat) == {1.0}

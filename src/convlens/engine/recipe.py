"""The one resolution step of ``convlens train``, ``convlens lr-find`` and ``convlens.train()``.

Defaults -> preset -> config file -> flags (:func:`convlens.config.layer_train_config`), then
the choices made from the data, once, into one immutable :class:`Recipe`:

- no data: the embedded digits, with the ``digits`` recipe under the user's own choices;
- ``pretrained: auto``: a pretrained backbone for photo folders (the rule:
  :func:`convlens.config.auto_backbone`, judged on a few really decoded images), else from scratch;
- a backbone: its weights read and hashed once (:class:`~convlens.engine.features.Backbone`),
  its preprocessing whole, and the ``pretrained`` recipe over the user's choices, each replaced
  choice named in a note;
- under torchrun, ``nproc`` is the number of processes;
- ``--time`` on a pretrained run: the backbone, flip rows and fine-tuning the budget buys
  (:func:`pretrained_budget`; the planner is :func:`convlens.engine.budget.plan_pretrained`).

After this only ``--time`` changes the number of epochs (the trainer's budget, in one place).
A resumed run takes its own saved configuration; nothing is chosen again.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from convlens.config import (
    RECIPES,
    TrainConfig,
    auto_backbone,
    decode_size,
    flag_of,
    layer_train_config,
    parse_duration,
    with_layers,
)
from convlens.data.decode import decode
from convlens.data.preprocess import Preprocessing
from convlens.data.scan import scan
from convlens.engine import budget, distributed
from convlens.engine.features import Backbone, feature_speed, load_pretrained
from convlens.engine.resume import resume_config
from convlens.errors import ConfigError, ImageError
from convlens.models.ensemble import SEPARATOR
from convlens.models.pretrained import PACKAGED

SAMPLE_IMAGES = 24  # images decoded to decide whether a dataset is photos
BACKBONE_ONLY = ("arch", "finetune_epochs", "finetune_lr", "finetune_units", "finetune_lr_decay", "finetune_bn",
                 "finetune_warmup", "finetune_patience", "finetune_crop_scale", "head_flip")  # pretrained runs only


@dataclass(frozen=True)
class Recipe:
    """What a run trains, resolved once: the configuration, the keys the user chose, the
    backbone (pretrained runs) and the notes to say about choices that do not apply."""

    cfg: TrainConfig
    chosen: frozenset[str] = frozenset()
    backbone: Backbone | None = None
    resume: Path | None = None
    notes: tuple[str, ...] = ()
    time_plan: budget.PretrainedPlan | None = None  # --time on a pretrained run: what it chose

    @property
    def pretrained(self) -> bool:
        return self.backbone is not None

    @property
    def preprocessing(self) -> Preprocessing:
        """What the data are decoded at (:func:`input_preprocessing`)."""
        return input_preprocessing(self.cfg, self.backbone)[0]


def input_preprocessing(cfg: TrainConfig, backbone: Backbone | None = None) -> tuple[Preprocessing, bool]:
    """The :class:`Preprocessing` a run decodes its data at, and whether the data decide the
    channels: a backbone's whole (from its weights), or the configuration's fields
    (``channels: 0`` = grayscale when every image is)."""
    if backbone is not None:
        return backbone.preprocessing, False
    side, decoded = cfg.image_size, decode_size(cfg)
    prep = Preprocessing(size=(side, side), channels=cfg.channels or 3, resize=cfg.resize, scale=cfg.scale,
                         mean=tuple(cfg.mean), std=tuple(cfg.std), max_pixels=cfg.max_pixels,
                         decode_size=(decoded, decoded))
    return prep, cfg.channels == 0


def resolve(overrides: dict[str, Any], config_file: str | Path | None = None,
            resume: str | Path | None = None) -> Recipe:
    """The recipe of ``convlens train``'s flags (``overrides``), config file, or run to resume."""
    if resume and config_file:
        raise ConfigError(f"--config cannot be combined with --resume: a run continues with its own "
                          f"config.yaml. Received: --config {str(config_file)!r}")
    if resume:
        return recipe_for(resume_config(resume, overrides), overrides, resume=resume)
    cfg, chosen = layer_train_config(None, config_file, overrides)
    return recipe_for(cfg, chosen)


def recipe_for(cfg: TrainConfig, chosen: Collection[str] = (), resume: str | Path | None = None) -> Recipe:
    """The data-dependent choices on top of a layered ``cfg`` (``chosen``: the keys a user set)."""
    t0 = time.perf_counter()  # --time on a pretrained run counts from here (the sample decoded, the probe)
    chosen = frozenset(str(k).replace("-", "_") for k in chosen)
    world = {"nproc": distributed.from_env().world_size} if distributed.under_torchrun() else {}
    if resume is not None:  # the run's own choices, recorded in its config
        cfg = with_layers(cfg, world) if world else cfg
        backbone = None if cfg.pretrained in ("none", "auto") else load_pretrained(cfg.pretrained, cfg.arch, cfg.max_pixels)
        return Recipe(cfg, chosen, backbone, Path(resume))
    below: dict[str, Any] = {}
    if cfg.data is None:
        from convlens.data.digits import ensure_digits_dataset

        below = {k: v for k, v in RECIPES["digits"].items() if k not in chosen}
        below["data"] = str(ensure_digits_dataset())
    pretrained = choose_pretrained(cfg, "model" in chosen)
    if pretrained == "none":
        notes = unused_backbone_options(chosen) + random_weights_note(cfg, chosen)
        return Recipe(with_layers(cfg, below, {"pretrained": pretrained}, world), chosen, notes=notes)
    plan, backbone, planned = None, None, {}
    if cfg.time and not world:  # under torchrun the launcher has planned: its choices are flags
        plan, backbone = pretrained_budget(cfg, chosen, pretrained, below.get("data") or cfg.data, t0)
        pretrained, planned = plan.backbone, {"head_flip": plan.head_flip, "finetune_epochs": plan.finetune_epochs}
    backbone = backbone or load_pretrained(pretrained, cfg.arch, cfg.max_pixels)
    recipe = backbone_layer(backbone, cfg, planned.get("finetune_epochs", cfg.finetune_epochs))
    final = with_layers(cfg, below, {"pretrained": pretrained, **planned}, recipe, world)
    notes = replaced_options(cfg, final, chosen) + ((budget_note(plan),) if plan else ())
    return Recipe(final, chosen, backbone, notes=notes, time_plan=plan)


def budget_options(cfg: TrainConfig, chosen: Collection[str], pretrained: str) -> tuple[budget.PretrainedOption, ...]:
    """The options ``--time`` chooses among: :data:`~convlens.engine.budget.PRETRAINED_OPTIONS`
    on ``pretrained``'s backbone when the user named one (every backbone with ``auto``), with the
    user's own ``--head-flip``/``--finetune-epochs`` kept (fine-tuning then up to their N)."""
    kept = {k: getattr(cfg, k) for k in ("head_flip", "finetune_epochs") if k in chosen}
    if cfg.pretrained != "auto":
        kept["backbone"] = pretrained
    return tuple(dict.fromkeys(replace(o, **kept) for o in budget.PRETRAINED_OPTIONS))


def pretrained_budget(cfg: TrainConfig, chosen: Collection[str], pretrained: str, data: str,
                      t0: float) -> tuple[budget.PretrainedPlan, Backbone]:
    """``--time`` on a pretrained run: each candidate backbone's feature speed probed on a batch,
    the plan (:func:`~convlens.engine.budget.plan_pretrained`) and the chosen backbone as read
    (``t0``: when the resolution began, the budget's start)."""
    options = budget_options(cfg, chosen, pretrained)
    backbones = {name: load_pretrained(name, cfg.arch if name == pretrained else None, cfg.max_pixels)
                 for name in dict.fromkeys(o.backbone for o in options)}
    speeds = {name: feature_speed(b) for name, b in backbones.items()}
    entries = scan(data).entries
    n = len(entries)
    # A pre-split folder's own validation set; else the share the split will hold out.
    n_val = (sum(e.subset == "val" for e in entries) if any(e.subset for e in entries)
             else round(n * cfg.val_fraction))
    plan = budget.plan_pretrained(parse_duration(cfg.time), time.perf_counter() - t0, n - n_val, n_val, speeds, options,
                                  {name: b.num_features for name, b in backbones.items()})
    return plan, backbones[plan.backbone]


def budget_note(plan: budget.PretrainedPlan) -> str:
    """The console line saying what ``--time`` chose, and from what."""
    speeds = ", ".join(f"{name} {s:.0f} img/s" for name, s in plan.feature_img_s.items())
    over = ("; that is more than the budget: nothing faster fits this data here"
            if plan.estimate_s > plan.budget_s else "")
    return (f"time budget {budget.format_seconds(plan.budget_s)}: {plan.summary(planned=True)} "
            f"(the head {budget.format_seconds(plan.estimate_s)} at most, with nothing cached{over}; "
            f"features {speeds})")


def choose_pretrained(cfg: TrainConfig, model_chosen: bool) -> str:
    """``cfg.pretrained`` with ``auto`` decided: a backbone name or ``none``.

    Whether the images are photos is judged on up to :data:`SAMPLE_IMAGES` really decoded files.
    The rule is about the data, not ``--nproc``: a pretrained run fine-tunes under DDP like any other.
    """
    if cfg.pretrained != "auto":
        return cfg.pretrained
    if cfg.data is None or cfg.preset != "default" or model_chosen:
        return "none"
    entries = scan(cfg.data).entries
    sample = entries[:: max(1, len(entries) // SAMPLE_IMAGES)][:SAMPLE_IMAGES]
    sides, gray = [], []
    for e in sample:
        try:
            img, info = decode(e.path, max_pixels=cfg.max_pixels, min_side=1, keep_gray=True)
        except ImageError:
            continue  # reported by the check later
        sides.append(min(img.size))
        gray.append(info.grayscale)
    median = float(np.median(sides)) if sides else 0.0
    return auto_backbone(True, cfg.preset, model_chosen, bool(gray) and all(gray), median)


def backbone_layer(backbone: Backbone, cfg: TrainConfig, finetune_epochs: int) -> dict[str, Any]:
    """The ``pretrained`` recipe for ``backbone``: its preprocessing, the head fit + ``finetune_epochs``
    epochs at ``cfg.finetune_lr``, with fine-tuning's warm-up, early stopping and crops (the other
    ``finetune_*`` keys are read by :class:`~convlens.engine.transfer.FineTuner` itself)."""
    p, arch = backbone.preprocessing, backbone.source.arch
    return {**RECIPES["pretrained"], "arch": arch, "model": arch, "image_size": p.size[0], "resize": p.resize,
            "scale": p.scale, "mean": list(p.mean), "std": list(p.std), "epochs": 1 + finetune_epochs,
            "lr": cfg.finetune_lr, "warmup_epochs": cfg.finetune_warmup, "patience": cfg.finetune_patience,
            "crop_scale": cfg.finetune_crop_scale}


def replaced_options(before: TrainConfig, after: TrainConfig, chosen: Collection[str]) -> tuple[str, ...]:
    """The note naming the chosen options the pretrained recipe replaced: a flag that silently
    did nothing would mislead."""
    replaced = [k for k in sorted(chosen) if k not in ("data", "pretrained", "arch") and hasattr(before, k)
                and (getattr(before, k) != getattr(after, k) or (k == "finetune_lr" and not after.finetune_epochs))]
    if not replaced:
        return ()
    flags = ", ".join(f"{flag_of(k)} {getattr(before, k)}" for k in replaced)
    return (f"note: {after.pretrained} brings its own recipe, so {flags} do not apply "
            "(--finetune-epochs N adds fine-tuning epochs at --finetune-lr; --pretrained none trains from "
            "scratch with them)",)


def random_weights_note(cfg: TrainConfig, chosen: Collection[str]) -> tuple[str, ...]:
    """The note for ``--model NAME`` without ``--pretrained`` where NAME has packaged ImageNet weights
    (a Lite backbone or an ensemble of them): the run starts from random weights, which a user
    naming a pretrained architecture rarely means."""
    if "model" not in chosen or "pretrained" in chosen or not isinstance(cfg.model, str):
        return ()
    if not all(name in PACKAGED for name in cfg.model.split(SEPARATOR)):
        return ()
    return (f"note: --model {cfg.model} trains from random weights; --pretrained {cfg.model} starts from "
            "its ImageNet weights (far better on photos)",)


def unused_backbone_options(chosen: Collection[str]) -> tuple[str, ...]:
    """The note naming the chosen options that only a pretrained backbone uses."""
    unused = [k for k in BACKBONE_ONLY if k in chosen]
    if not unused:
        return ()
    return (f"note: this run trains from scratch, so {', '.join(flag_of(k) for k in unused)} (pretrained "
            "backbones only) do not apply; --pretrained efficientnet_lite0 uses them",)

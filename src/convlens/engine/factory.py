"""The training parts, built from a :class:`TrainConfig` in one place (timm's ``create_model`` /
``create_optimizer_v2`` style): model, optimiser, schedule, loss, augmentation, loaders and the
training step. The trainer, lr-find and the fine-tuning step of the pretrained path use these,
so a new option changes the set-up of all of them at once.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from convlens import runtime
from convlens.config import TrainConfig
from convlens.engine.optim import build_optimizer, build_scheduler, progressive_resize


# ----------------------------------------------------------------------------- model
def make_model(spec: str, num_classes: int, in_channels: int, image_size: int,
               model_args: dict[str, Any] | None = None) -> Any:
    """A registry name (with ``model_args``), or a YAML/JSON layer-list file (models' ``build_model``)."""
    from convlens.models.registry import build_model

    return build_model(spec, num_classes, in_channels, input_size=image_size, **(model_args or {}))


def create_model(cfg: TrainConfig, num_classes: int, in_channels: int, dev: runtime.DeviceInfo) -> Any:
    """``cfg.model`` on the device (channels-last with ``cfg.channels_last``), seeded by ``cfg.seed``."""
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only
    model = make_model(cfg.model, num_classes, in_channels, cfg.image_size, cfg.model_args).to(dev.device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


# ----------------------------------------------------------------------------- optimiser and schedule
def create_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``model``'s parameters at ``lr`` (default ``cfg.lr``)."""
    return build_optimizer(model, cfg.optimizer, cfg.lr if lr is None else lr, cfg.weight_decay, cfg.momentum,
                           cfg.nesterov)


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                     epochs: int | None = None) -> Any:
    """``cfg.schedule`` with warm-up, stepped once per batch over ``epochs`` (default ``cfg.epochs``)."""
    return build_scheduler(optimizer, cfg.schedule, cfg.epochs if epochs is None else epochs, steps_per_epoch,
                           cfg.warmup_epochs)


# ----------------------------------------------------------------------------- loss
def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> torch.Tensor | None:
    """``auto``: inverse class frequency, scaled so the average sample weight is 1."""
    if mode == "none":
        return None
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 1.0)
    return torch.tensor(w, dtype=torch.float32)


def soft_targets(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot float targets ``(N, C)``."""
    return F.one_hot(y, num_classes).float()


def classification_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean loss for (soft) targets ``(N, C)``.

    One logit (two classes): binary cross-entropy on ``p(class 1)``, as the tutorial's sigmoid
    unit; class weights weigh the positive and negative terms. More logits: cross-entropy.
    Label smoothing moves ``ls`` of each target's mass evenly onto all classes.
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        t = targets[:, 1]
        if label_smoothing:
            t = t * (1.0 - label_smoothing) + 0.5 * label_smoothing
        z = logits[:, 0]
        if weights is None:
            return F.binary_cross_entropy_with_logits(z, t)
        w0, w1 = weights[0], weights[1]
        # weight * [pos_weight * t * log s + (1 - t) * log(1 - s)] = w1 * pos-term + w0 * neg-term
        return F.binary_cross_entropy_with_logits(z, t, weight=w0.expand_as(z), pos_weight=w1 / w0)
    return F.cross_entropy(logits, targets, weight=weights, label_smoothing=label_smoothing)


def correct_count(logits: torch.Tensor, y: torch.Tensor) -> int:
    """Correct predictions (threshold 0.5 for one logit, argmax otherwise)."""
    pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)
    return int((pred == y).sum())


# ----------------------------------------------------------------------------- augmentation
def create_augmentation(cfg: TrainConfig) -> Any:
    """``build_augmentation`` with every keyword it takes read from the config field of that name.

    A new augmentation is a ``TrainConfig`` field and a ``build_augmentation`` keyword of the
    same name: nothing here changes. ``random_crops``: a crop margin needs the augmenter's crops.
    """
    from convlens.data.augment import build_augmentation

    keywords = inspect.signature(build_augmentation).parameters
    options = {k: getattr(cfg, k) for k in keywords if hasattr(cfg, k)}
    return build_augmentation(**options, random_crops=cfg.crop_margin > 0)


# ----------------------------------------------------------------------------- data
def create_loaders(cfg: TrainConfig, prepared: Any, dev: runtime.DeviceInfo, batch_size: int | None = None,
                   rank: int = 0, world_size: int = 1) -> tuple[Any, Any]:
    """The shuffled training loader and the validation loader (None without a validation set).

    ``batch_size``: per process (default ``cfg.batch_size``); ``rank``/``world_size``: DDP shards.
    """
    from convlens.data.loader import BatchLoader

    train_set, val_set = prepared.train, prepared.val
    n_train = len(train_set.labels)
    batch_size = cfg.batch_size if batch_size is None else batch_size
    # A one-image last batch breaks BatchNorm's batch statistics: drop it in that case only.
    drop_last = n_train > cfg.batch_size and n_train % cfg.batch_size == 1
    pin = dev.type == "cuda"
    train_loader = BatchLoader(train_set, batch_size, shuffle=True, seed=cfg.seed, drop_last=drop_last,
                               pin_memory=pin, rank=rank, world_size=world_size)
    has_val = val_set is not None and len(val_set.labels) > 0
    val_loader = (BatchLoader(val_set, batch_size, shuffle=False, seed=cfg.seed, pin_memory=pin,
                              rank=rank, world_size=world_size, even=False) if has_val else None)
    return train_loader, val_loader


def create_generators(dev: runtime.DeviceInfo) -> tuple[torch.Generator, torch.Generator]:
    """The augmentation and the mixing generators, on the device where the batches are."""
    gen_device = dev.device if dev.type == "cuda" else "cpu"
    return torch.Generator(device=gen_device), torch.Generator(device=gen_device)


# ----------------------------------------------------------------------------- step
class StepFunction:
    """One training forward pass: uint8 batch -> device -> augmentation -> mixing -> model input
    -> autocast forward -> loss. Shared by the trainer, the learning-rate finder and fine-tuning."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, prep: Any, dev: runtime.DeviceInfo,
                 num_classes: int, weights: torch.Tensor | None) -> None:
        self.model, self.cfg, self.prep, self.dev = model, cfg, prep, dev
        self.num_classes, self.weights = num_classes, weights
        self.augment = create_augmentation(cfg)
        self.mixing = cfg.mixup > 0 or cfg.cutmix > 0
        self.input_size: tuple[int, int] | None = None  # progressive resizing: this epoch's size

    def __call__(self, x: torch.Tensor, y: torch.Tensor, aug_gen: torch.Generator | None = None,
                 mix_gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loss, logits)`` for a uint8 NHWC batch ``x`` and labels ``y`` (on the device)."""
        from convlens.data.augment import mix_batch
        from convlens.data.loader import to_model_input

        x = x.to(self.dev.device, non_blocking=True)
        targets = soft_targets(y, self.num_classes)
        if self.augment is not None:
            x = self.augment(x, generator=aug_gen)
        if self.mixing:
            if self.augment is None:  # mixing works on float NCHW
                x = x.permute(0, 3, 1, 2).float()
            x, targets = mix_batch(x, targets, self.cfg.mixup, self.cfg.cutmix, mix_gen)
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = progressive_resize(x.permute(0, 3, 1, 2).float() if x.dtype == torch.uint8 else x, self.input_size)
        inputs = to_model_input(x, self.prep, channels_last=self.cfg.channels_last)
        with runtime.autocast(self.dev):
            logits = self.model(inputs)
        return classification_loss(logits, targets, self.weights, self.cfg.label_smoothing), logits


def create_step(model: torch.nn.Module, cfg: TrainConfig, prepared: Any, dev: runtime.DeviceInfo) -> StepFunction:
    """The training step for ``model`` (the DDP-wrapped one under torchrun), with ``cfg``'s class weights."""
    num_classes = len(prepared.classes)
    weights = class_weights(prepared.train.labels, num_classes, cfg.class_weights)
    return StepFunction(model, cfg, prepared.preprocessing, dev, num_classes,
                        None if weights is None else weights.to(dev.device))

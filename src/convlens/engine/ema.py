"""``--ema``: an exponential moving average of the weights (timm's ModelEma, fastai's EMA).

Built on ``torch.optim.swa_utils.AveragedModel`` with its own multi-tensor update (``_avg``:
``get_ema_multi_avg_fn`` has a fixed decay, and this one ramps up); batch-norm
statistics are averaged too (``use_buffers=True``), so the average is usable as it is. The
decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates (timm's warm-up),
so early, poorly trained weights are forgotten quickly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class ModelEma:
    """``ema.update(model)`` after each optimiser step; ``ema.module`` is the averaged model."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1). Received: decay={decay}")
        self.decay = float(decay)
        self.updates = 0
        self.averaged = AveragedModel(model, multi_avg_fn=self._avg, use_buffers=True)

    @property
    def module(self) -> nn.Module:
        """The averaged model (same class and state_dict keys as the trained one)."""
        return self.averaged.module

    @torch.no_grad()
    def _avg(self, ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: Any) -> None:
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        floats = [(e, p) for e, p in zip(ema_params, params, strict=True) if e.is_floating_point()]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [p for _, p in floats], 1.0 - d)
        for e, p in zip(ema_params, params, strict=True):
            if not e.is_floating_point():  # e.g. BatchNorm's num_batches_tracked
                e.copy_(p)

    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
        # AveragedModel copies the weights instead of averaging while its own count is 0: it
        # counts the same updates, so restore it too, or a resumed run restarts the average.
        self.averaged.n_averaged.fill_(self.updates)

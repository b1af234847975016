"""Per-layer output shape, parameters, FLOPs and receptive field, like Keras's ``model.summary()``.

FLOP convention (forward pass, one image):

- convolution, transposed convolution (including depthwise/grouped) and dense layers count
  2 FLOPs per multiply-add (2 x MACs); bias additions are **not** counted;
- pooling, activations, batch norm, dropout, upsampling, flatten and residual additions count
  **0** (they are memory-bound and a few percent of the total at most).

Counting is done by :class:`torch.utils.flop_counter.FlopCounterMode` on a real forward pass,
which follows exactly this convention. Parameter counts follow Keras: trainable parameters plus
batch norm's moving mean and variance as non-trainable parameters; the model size is the bytes
of all of them (4 per fp32 value). The receptive field is the input window one output pixel
sees (theoretical, along the widest path); ``None`` ("global") after global pooling / flatten.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from convlens.errors import ConfigError, SpecError
from convlens.models.model import ConvlensModel
from convlens.models.registry import build_model, create, list_models, model_description
from convlens.models.shapes import RF, keras_shape, propagate_rf

_SHAPE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?$")


def parse_input_shape(value: str | Sequence[int]) -> tuple[int, int, int]:
    """``"300x300x3"`` (H x W x C; ``"300x300"`` means 3 channels) or a (C, H, W) sequence -> (C, H, W)."""
    if isinstance(value, str):
        m = _SHAPE_RE.match(value)
        if m:
            h, w, c = int(m.group(1)), int(m.group(2)), int(m.group(3) or 3)
            if h > 0 and w > 0 and c > 0:
                return c, h, w
        raise ConfigError(f"input must be HEIGHTxWIDTHxCHANNELS with positive integers, like 300x300x3. "
                          f"Received: input={value!r}")
    if isinstance(value, Sequence) and len(value) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        return int(value[0]), int(value[1]), int(value[2])
    raise ConfigError(f"input_shape must be (channels, height, width) or a string like '300x300x3'. "
                      f"Received: input_shape={value!r}")


@dataclass
class LayerRow:
    """One layer (or block) of a summary."""

    name: str
    type: str
    output_shape: tuple[int, ...]  # PyTorch order without the batch: (C, H, W) or (features,)
    params: int  # trainable + non-trainable (batch norm moving statistics)
    trainable_params: int
    flops: int
    receptive_field: tuple[int, int] | None  # (height, width) in input pixels; None = whole input

    @property
    def keras_shape(self) -> str:
        """The output shape as Keras prints it: ``(None, H, W, C)``."""
        return keras_shape(self.output_shape)


@dataclass
class Summary:
    """What ``convlens summary`` prints; FLOPs are for one image, forward only."""

    model: str
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    out_units: int
    output_activation: str
    rows: list[LayerRow] = field(default_factory=list)
    total_params: int = 0
    trainable_params: int = 0
    non_trainable_params: int = 0
    flops: int = 0
    size_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _count(module: nn.Module) -> tuple[int, int, int]:
    """(trainable, non-trainable, bytes) of a module's parameters and BN moving statistics."""
    params = list(module.parameters())
    tensors = params + [b for name, b in module.named_buffers() if name.endswith(("running_mean", "running_var"))]
    trainable = sum(p.numel() for p in params if p.requires_grad)
    size = sum(t.numel() * t.element_size() for t in tensors)
    return trainable, sum(t.numel() for t in tensors) - trainable, size


def _resolve(model: Any, c: int, hw: tuple[int, int], num_classes: int) -> tuple[nn.Module, str]:
    if isinstance(model, nn.Module):
        return model, getattr(model, "arch", {}).get("name") or type(model).__name__
    if isinstance(model, (list, tuple, str, os.PathLike)):  # what --model accepts
        return build_model(model, num_classes, c, hw), "layer list" if isinstance(model, (list, tuple)) else str(model)
    raise SpecError(f"summarize needs a model, a layer list, a registered name or a layer file. "
                    f"Received: {type(model).__name__}")


def summarize(model: Any, input_shape: str | Sequence[int] = "300x300x3", num_classes: int = 2) -> Summary:
    """Summarise a model, layer list, registered name or layer file for one input of ``input_shape``.

    ``input_shape`` is ``"HxWxC"`` text or a (C, H, W) sequence. Runs one forward pass on zeros in
    eval mode (the model's own mode is restored) and returns per-layer rows plus totals.
    """
    c, h, w = parse_input_shape(input_shape)
    module, name = _resolve(model, c, (h, w), num_classes)
    expected = getattr(module, "in_channels", None)
    if expected is not None and expected != c:
        raise SpecError(f"the model takes {expected}-channel images but the input has {c} channels. "
                        f"Received: input={h}x{w}x{c}")
    if isinstance(module, ConvlensModel):
        units = module.summary_units()
        out_units, activation, classes = module.out_units, module.output_activation, module.num_classes
    else:
        units = [(n, type(m).__name__, m) for n, m in module.named_children()]
        out_units, activation, classes = 0, "", num_classes
    param = next(module.parameters(), None)
    x = torch.zeros(1, c, h, w, device=param.device if param is not None else "cpu",
                    dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32)
    modes = {m: m.training for m in module.modules()}
    rows: list[LayerRow] = []
    rf: RF | None = RF()
    module.eval()
    try:
        with torch.no_grad():
            for unit_name, kind, unit in units:
                counter = FlopCounterMode(display=False)
                try:
                    with counter:
                        x = unit(x)
                except RuntimeError as e:
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise SpecError(f"the {h}x{w} input is too small for layer {unit_name!r} ({kind}) "
                                    f"({first}); use a larger input. Received: input={h}x{w}x{c}") from e
                rf = propagate_rf(unit, rf)
                trainable, fixed, _ = _count(unit)
                rows.append(LayerRow(
                    name=unit_name, type=kind, output_shape=tuple(int(d) for d in x.shape[1:]),
                    params=trainable + fixed, trainable_params=trainable, flops=int(counter.get_total_flops()),
                    receptive_field=None if rf is None else (math.ceil(rf.size[0]), math.ceil(rf.size[1])),
                ))
    finally:
        for m, training in modes.items():
            m.train(training)
    trainable, fixed, size = _count(module)
    return Summary(model=name, input_shape=(c, h, w), num_classes=classes, out_units=out_units,
                   output_activation=activation, rows=rows, total_params=trainable + fixed,
                   trainable_params=trainable, non_trainable_params=fixed,
                   flops=sum(r.flops for r in rows), size_bytes=size)


def keras_bytes(n: float) -> str:
    """Keras's readable size: 381.13 KB (1 KB = 1024 bytes). Not :func:`convlens.files.human_bytes`
    (117.7 MB): the summary keeps ``model.summary()``'s figures, as docs/tutorial.md shows them."""
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


def human_flops(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _console() -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # pipes and captured output: wide enough for one row per layer
        console = Console(width=max(console.width, 110))
    return console


def print_summary(model: Any, input_shape: str | Sequence[int] = "300x300x3", num_classes: int = 2) -> Summary:
    """Print a Keras-style table of :func:`summarize` and return the summary."""
    from rich import box
    from rich.table import Table

    s = summarize(model, input_shape, num_classes)
    c, h, w = s.input_shape
    table = Table(title=f'Model: "{s.model}"  input (None, {h}, {w}, {c})', title_justify="left",
                  box=box.HEAVY_HEAD)
    for column in ("Layer (type)", "Output Shape"):
        table.add_column(column, no_wrap=True)
    for column in ("Param #", "FLOPs", "Receptive field"):
        table.add_column(column, justify="right")
    for r in s.rows:
        rf = "global" if r.receptive_field is None else (
            str(r.receptive_field[0]) if r.receptive_field[0] == r.receptive_field[1]
            else f"{r.receptive_field[0]}x{r.receptive_field[1]}")
        table.add_row(f"{r.name} ({r.type})", r.keras_shape, f"{r.params:,}",
                      human_flops(r.flops), rf)
    console = _console()
    console.print(table)
    per = s.size_bytes / max(s.total_params, 1)
    lines = [f" Total params: {s.total_params:,} ({keras_bytes(s.size_bytes)})",
             f" Trainable params: {s.trainable_params:,} ({keras_bytes(s.trainable_params * per)})",
             f" Non-trainable params: {s.non_trainable_params:,} ({keras_bytes(s.non_trainable_params * per)})",
             f" FLOPs: {s.flops:,} ({human_flops(s.flops)}; forward, one image, a multiply-add counts 2)"]
    if s.out_units:
        unit = "1 logit" if s.out_units == 1 else f"{s.out_units} logits"
        lines.append(f" Output: {unit} for {s.num_classes} classes; {s.output_activation} is applied outside the model")
    for line in lines:
        console.print(line, highlight=False)
    return s


def print_model_list() -> None:
    """Print the registered models with their parameter counts (2 classes, RGB)."""
    from rich.table import Table

    table = Table(title="Registered models (parameters for 2 classes, RGB)", title_justify="left")
    table.add_column("Name", no_wrap=True)
    table.add_column("Params", justify="right")
    table.add_column("Description")
    for name in list_models():
        trainable, fixed, _ = _count(create(name, 2, 3))
        table.add_row(name, f"{trainable + fixed:,}", model_description(name))
    console = _console()
    console.print(table)
    console.print(" A YAML/JSON layer file works too: convlens summary my_model.yaml --input 128x128x3",
                  highlight=False)
    console.print(" An ensemble of 2-3 EfficientNet-Lite backbones joins their names with '+': "
                  "efficientnet_lite0+efficientnet_lite2", highlight=False)

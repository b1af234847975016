"""``convlens demo-layer``: one CNN building block applied to a real photo, input beside output.

Every block is the models package's own layer (:func:`convlens.models.layers.build_layers`
with a one-layer spec), never a re-implementation, so what a learner sees is exactly what a
model computes. Each figure draws the panels at the same pixel scale (a stride-2 output really
looks half as wide) and prints the shape arithmetic in its title, e.g.
``n=300, k=3, s=2, same: ceil(300 / 2) = 150``.

Kinds and what their figure shows:

- ``conv``: a named kernel (sobel-x, sobel-y, sharpen, box, edge, emboss) as one filter spanning
  all colour channels, or ``random`` (the layer's own Glorot initialisation, ``--filters N``);
- ``max_pool`` / ``avg_pool``: downsampling (``--kernel`` is the pool size, stride = pool size);
- ``relu``: a signed convolution (sobel-x by default) before and after ``max(0, x)``;
- ``dropout``: the same layer in training mode (zeros, survivors scaled by 1 / (1 - rate)) and
  in evaluation mode (the identity);
- ``batch_norm``: the image and per-channel histograms before and after normalisation;
- ``upsample``: nearest (or bilinear) repetition, with a magnified crop;
- ``conv_transpose``: learnable upsampling; with k=3, s=2 its kernel footprints overlap unevenly,
  which makes the checkerboard visible in the magnified crop.

``compare`` draws a second variant beside the first: another kind (``max_pool`` vs
``avg_pool``, ``upsample`` vs ``conv_transpose``) or option overrides (``padding=same``,
``stride=2,kernel=5``).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convlens import files as cio
from convlens.config import figure_format, suggest
from convlens.errors import ConfigError, ImageError, SpecError, UserError
from convlens.learn.layer_page import minmax

NAMED_KERNELS = ("sobel-x", "sobel-y", "sharpen", "box", "edge", "emboss", "random")
PADDINGS = ("valid", "same")
MODES = ("nearest", "bilinear")
OPTION_NAMES = ("kernel", "stride", "padding", "filters", "weights", "rate", "factor", "mode")
MAX_SHOWN_FILTERS = 8

# Kernels with a fixed 3x3 shape; ``box`` and ``random`` take any size.
_FIXED_KERNELS: dict[str, list[list[float]]] = {
    "sobel-x": [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],
    "sobel-y": [[-1, -2, -1], [0, 0, 0], [1, 2, 1]],
    "sharpen": [[0, -1, 0], [-1, 5, -1], [0, -1, 0]],
    "edge": [[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]],
    "emboss": [[-2, -1, 0], [-1, 1, 1], [0, 1, 2]],
}

# The options each kind takes, with their defaults (relu's are those of the conv feeding it).
_CONV_DEFAULTS = {"kernel": 3, "stride": 1, "padding": "valid", "filters": 1, "weights": "sobel-x"}
_POOL_DEFAULTS = {"kernel": 2, "stride": None, "padding": "valid"}  # stride None: the pool size
DEFAULTS: dict[str, dict[str, Any]] = {
    "conv": _CONV_DEFAULTS,
    "max_pool": _POOL_DEFAULTS,
    "avg_pool": _POOL_DEFAULTS,
    "relu": {"kernel": 3, "stride": 1, "padding": "same", "weights": "sobel-x"},
    "dropout": {"rate": 0.5},
    "batch_norm": {},
    "upsample": {"factor": 2, "mode": "nearest"},
    "conv_transpose": {"kernel": 3, "stride": 2, "padding": "same", "weights": "box"},
}
# The kinds this demo draws: registered layer types (tests/learn checks them against the registry).
KINDS = tuple(DEFAULTS)
# Input side in pixels: upsampling doubles it, and single pixels must stay visible in the figure.
DEFAULT_SIZE = {"upsample": 64, "conv_transpose": 64}
DEFAULT_SIZE_OTHER = 300


# ----------------------------------------------------------------------------- options
def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"KIND must be one of {', '.join(KINDS)}.{suggest(str(kind), KINDS)} "
                          f"Received: KIND={kind!r}")
    return kind


def _positive_int(name: str, v: Any, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
        raise ConfigError(f"--{name} must be an integer from 1 to {hi}. Received: --{name} {v!r}")
    return v


def resolve_options(kind: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate the options given for ``kind`` (None = not given) and fill in its defaults.

    An option that ``kind`` does not take is an error rather than silently ignored, so a learner
    never believes ``--stride 2`` changed a ReLU.
    """
    kind = _kind(kind)
    given = {k: v for k, v in (options or {}).items() if v is not None}
    allowed = DEFAULTS[kind]
    for key in given:
        if key not in OPTION_NAMES:
            raise ConfigError(f"unknown option {key!r}.{suggest(key, OPTION_NAMES)} Options: "
                              f"{', '.join(OPTION_NAMES)}. Received: {key}={given[key]!r}")
        if key not in allowed:
            takes = ", ".join(f"--{k}" for k in allowed) or "no options"
            raise ConfigError(f"--{key} does not apply to {kind} (it takes {takes}). "
                              f"Received: --{key} {given[key]!r}")
    o = {**allowed, **given}
    for key, hi in (("kernel", 31), ("stride", 16), ("filters", 64), ("factor", 8)):
        if o.get(key) is not None:
            o[key] = _positive_int(key, o[key], hi)
    if "weights" in o and "weights" not in given and o["kernel"] != 3 and o["weights"] in _FIXED_KERNELS:
        # The named default is 3x3: another size gets a kernel of that size (signed for relu).
        o["weights"] = "random" if kind == "relu" else "box"
    if kind in ("max_pool", "avg_pool") and o["stride"] is None:
        o["stride"] = o["kernel"]  # Keras's pooling default: non-overlapping windows
    for key, choices in (("padding", PADDINGS), ("mode", MODES)):  # no kind takes both
        if key in o and o[key] not in choices:
            raise ConfigError(f"--{key} must be {' or '.join(map(repr, choices))}.{suggest(str(o[key]), choices)} "
                              f"Received: --{key} {o[key]!r}")
    if "weights" in o:
        w = o["weights"]
        if w not in NAMED_KERNELS:
            raise ConfigError(f"--weights must be one of {', '.join(NAMED_KERNELS)}.{suggest(str(w), NAMED_KERNELS)} "
                              f"Received: --weights {w!r}")
        if w in _FIXED_KERNELS and o["kernel"] != 3:
            raise ConfigError(f"the {w} kernel is 3x3; use --kernel 3, or --weights box/random for other "
                              f"sizes. Received: --kernel {o['kernel']}")
        if o.get("filters", 1) > 1 and w != "random":
            raise ConfigError(f"a named kernel makes one filter; use --weights random for several. "
                              f"Received: --filters {o['filters']} with --weights {w}")
    if "rate" in o:
        r = o["rate"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
            raise ConfigError(f"--rate must be a number in [0, 1). Received: --rate {r!r}")
        o["rate"] = float(r)
    return o


def parse_compare(value: str, kind: str, options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``--compare`` -> (kind, given options) of the second variant.

    ``value`` is another KIND (it keeps the options that kind takes; ``upsample`` and
    ``conv_transpose`` map ``factor`` to ``stride`` and back) or ``key=value`` overrides
    separated by commas (``padding=same``, ``stride=2,kernel=5``).
    """
    given = {k: v for k, v in options.items() if v is not None}
    if "=" not in value:
        other = _kind(value.strip()) if value.strip() in KINDS else None
        if other is None:
            raise ConfigError(f"--compare takes another KIND ({', '.join(KINDS)}) or option=value pairs like "
                              f"padding=same.{suggest(value, KINDS)} Received: --compare {value!r}")
        keep = {k: v for k, v in given.items() if k in DEFAULTS[other]}
        if kind == "upsample" and other == "conv_transpose" and "factor" in given:
            keep["stride"] = given["factor"]
        if kind == "conv_transpose" and other == "upsample" and "stride" in given:
            keep["factor"] = given["stride"]
        return other, keep
    out = dict(given)
    for part in value.split(","):
        key, sep, raw = part.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--compare pairs must look like key=value. Received: --compare {value!r}")
        if key not in OPTION_NAMES:
            raise ConfigError(f"--compare: unknown option {key!r}.{suggest(key, OPTION_NAMES)} "
                              f"Options: {', '.join(OPTION_NAMES)}. Received: --compare {value!r}")
        out[key] = _parse_value(key, raw.strip())
    return kind, out


def _parse_value(key: str, raw: str) -> Any:
    try:
        if key in ("kernel", "stride", "filters", "factor"):
            return int(raw)
        if key == "rate":
            return float(raw)
    except ValueError as e:
        kind = "an integer" if key != "rate" else "a number"
        raise ConfigError(f"--compare: {key} must be {kind}. Received: {key}={raw!r}") from e
    return raw


# ----------------------------------------------------------------------------- arithmetic
def output_length(kind: str, n: int, options: Mapping[str, Any]) -> tuple[int, str]:
    """Output length along one axis of ``n`` pixels, and the arithmetic that gives it.

    The formulas are written out here (independently of the layer code) so a test can compare
    the printed arithmetic with the real output shape.
    """
    o = resolve_options(kind, options)
    if "kernel" in o:  # conv, relu, the pools and conv_transpose
        k, s, p = o["kernel"], o["stride"], o["padding"]
        head = f"n={n}, k={k}, s={s}, {p}"
        if kind == "conv_transpose" and p == "same":
            return n * s, f"{head}: {n} x {s} = {n * s}"
        if kind == "conv_transpose":
            out = n * s + max(k - s, 0)
            return out, f"{head}: {n} x {s} + max({k} - {s}, 0) = {out}"
        if p == "same":
            out = -(-n // s)
            text = f"{head}: ceil({n} / {s}) = {out}"
        elif s == 1:
            out = n - k + 1
            text = f"{head}: {n} - {k} + 1 = {out}"
        else:
            out = (n - k) // s + 1
            text = f"{head}: floor(({n} - {k}) / {s}) + 1 = {out}"
        return out, text
    if kind == "upsample":
        f = o["factor"]
        return n * f, f"n={n}, factor={f}: {n} x {f} = {n * f}"
    return n, f"n={n}: shape unchanged"


def arithmetic(kind: str, hw: tuple[int, int], options: Mapping[str, Any]) -> tuple[tuple[int, int], str]:
    """((out_h, out_w), text) for an input of ``hw``; one line when the image is square."""
    oh, th = output_length(kind, hw[0], options)
    ow, tw = output_length(kind, hw[1], options)
    text = th if hw[0] == hw[1] else f"height {th}; width {tw}"
    return (oh, ow), text


# ----------------------------------------------------------------------------- the layer
def named_kernel(name: str, k: int, stride: int = 1, transpose: bool = False) -> np.ndarray:
    """The ``k x k`` float32 kernel called ``name`` (not ``random``).

    ``box`` averages: 1 / k^2 for a convolution; for a transposed convolution every input pixel
    is spread over k^2 outputs that each gather from about (k / s)^2 inputs, so s^2 / k^2 keeps
    the average brightness and leaves only the uneven overlap (the checkerboard) visible.
    """
    if name == "box":
        value = (stride * stride if transpose else 1.0) / (k * k)
        return np.full((k, k), value, dtype=np.float32)
    return np.asarray(_FIXED_KERNELS[name], dtype=np.float32)


def _spec(kind: str, o: Mapping[str, Any], channels: int) -> dict[str, Any]:
    if kind in ("conv", "relu"):
        return {"type": "conv", "filters": o.get("filters", 1), "kernel_size": o["kernel"], "strides": o["stride"],
                "padding": o["padding"]}
    if kind in ("max_pool", "avg_pool"):
        return {"type": kind, "pool_size": o["kernel"], "strides": o["stride"], "padding": o["padding"]}
    if kind == "conv_transpose":
        return {"type": "conv_transpose", "filters": channels, "kernel_size": o["kernel"],
                "strides": o["stride"], "padding": o["padding"]}
    if kind == "dropout":
        return {"type": "dropout", "rate": o["rate"]}
    if kind == "batch_norm":
        return {"type": "batch_norm"}
    if kind == "upsample":
        return {"type": "upsample", "factor": o["factor"], "interpolation": o["mode"]}
    raise AssertionError(kind)


def build_layer(kind: str, options: Mapping[str, Any], channels: int, hw: tuple[int, int],
                seed: int = 0) -> tuple[Any, dict[str, Any], tuple[int, ...]]:
    """The models package's layer for ``kind`` -> (module, spec, shape inferred by the models package).

    Convolutions get their named kernel: for ``conv`` one filter whose k x k kernel is shared
    by every input channel (divided by the channel count, so the output is the kernel applied to
    the channel mean); for ``conv_transpose`` each channel maps to itself through the kernel.
    """
    import torch

    from convlens.models.spec import build_layers, init_keras_

    o = resolve_options(kind, options)
    spec = _spec(kind, o, channels)
    try:
        built = build_layers([spec], (channels, hw[0], hw[1]), fuse_pool=False)
    except SpecError as e:
        # "layer 0 (conv): ..." names a position in a model; here there is only this one layer.
        msg = str(e).split(": ", 1)[-1] if str(e).startswith("layer 0") else str(e)
        raise SpecError(f"{kind}: {msg}") from e
    module = built.modules[0]
    torch.manual_seed(seed)
    init_keras_(module)
    weights = o.get("weights")
    if weights is not None and weights != "random":
        conv = module.conv
        k = o["kernel"]
        kern = torch.from_numpy(named_kernel(weights, k, o["stride"], transpose=kind == "conv_transpose"))
        with torch.no_grad():
            conv.weight.zero_()
            if kind == "conv_transpose":  # weight: (in, out, k, k); channel c -> channel c
                for c in range(channels):
                    conv.weight[c, c] = kern
            else:  # weight: (filters=1, in, k, k)
                conv.weight[0] = kern / channels
            if conv.bias is not None:
                conv.bias.zero_()
    return module, spec, tuple(built.shapes[0])


@dataclass
class DemoResult:
    """One building block applied to an image (arrays are C x H x W float32)."""

    kind: str
    options: dict[str, Any]
    input: np.ndarray
    output: np.ndarray  # relu: after the ReLU; dropout: training mode; batch_norm: normalised
    arithmetic: str
    predicted_hw: tuple[int, int]  # from the written-out formula
    spec: dict[str, Any]
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # relu: "conv"; dropout: "eval"
    kernel: np.ndarray | None = None  # conv/relu/conv_transpose: the first filter's k x k kernel

    @property
    def shape_line(self) -> str:
        """``conv: 3x300x300 -> 1x150x150 (n=300, k=3, s=2, same: ceil(300 / 2) = 150)``."""
        return f"{self.kind}: {_shape(self.input)} -> {_shape(self.output)} ({self.arithmetic})"

    @property
    def label(self) -> str:
        """A short name of the variant: ``conv k=3 s=2 same sobel-x``."""
        o = self.options
        parts = [self.kind]
        if "kernel" in o:
            parts += [f"k={o['kernel']}", f"s={o['stride']}", o["padding"]]
        if "weights" in o:
            parts.append(o["weights"] if o.get("filters", 1) == 1 else f"{o['filters']} random filters")
        if "rate" in o:
            parts.append(f"rate={o['rate']:g}")
        if "factor" in o:
            parts += [f"x{o['factor']}", o["mode"]]
        return " ".join(parts)


def _shape(a: np.ndarray) -> str:
    return "x".join(str(d) for d in a.shape)


def apply_layer(kind: str, image: np.ndarray, options: Mapping[str, Any] | None = None, *,
                seed: int = 0) -> DemoResult:
    """Apply ``kind`` to ``image`` (H x W x C uint8, or C x H x W float in [0, 1]).

    Pixels are scaled to [0, 1], except for ``batch_norm`` which sees the tutorial's 0-255
    scale (that is the point: it removes the scale).
    """
    import torch

    o = resolve_options(kind, options)
    x = _as_chw(image)
    c, h, w = x.shape
    (ph, pw), text = arithmetic(kind, (h, w), o)
    t = torch.from_numpy(x * (255.0 if kind == "batch_norm" else 1.0))[None]
    module, spec, _ = build_layer(kind, o, c, (h, w), seed)
    extra: dict[str, np.ndarray] = {}
    with torch.no_grad():
        if kind == "dropout":
            module.train()
            torch.manual_seed(seed)
            y = module(t)
            module.eval()
            extra["eval"] = module(t)[0].numpy()
        elif kind == "batch_norm":
            module.train()  # normalise with this image's statistics, as in a training step
            y = module(t)
        elif kind == "relu":
            module.eval()
            pre = module(t)
            extra["conv"] = pre[0].numpy()
            y = torch.relu(pre)
        else:
            module.eval()
            y = module(t)
    kernel = None
    if "weights" in o:
        wt = module.conv.weight.detach()
        kernel = (wt[0, 0] if kind == "conv_transpose" else wt[0].sum(0)).numpy().copy()
    return DemoResult(kind, o, x if kind != "batch_norm" else x * 255.0, y[0].numpy(), text, (ph, pw),
                      spec, extra, kernel)


def _as_chw(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ConfigError(f"an image must be H x W x C (uint8) or C x H x W (float). Received: shape={a.shape}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
    return np.ascontiguousarray(a, dtype=np.float32)


def load_image(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """A photo decoded upright as RGB, centre-cropped to ``size x size`` uint8 (the one decoder)."""
    from convlens.data.preprocess import Preprocessing

    if not 4 <= size <= 2048:
        raise ConfigError(f"--size must be between 4 and 2048 pixels. Received: --size {size}")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"IMAGE must be an image file. Received: {str(path)!r} (not found)")
    try:
        return Preprocessing(size=(size, size), resize="crop").load(p)
    except ImageError as e:
        raise UserError(f"cannot use {str(path)!r}: {e.message}; pass a readable photo") from e


# ----------------------------------------------------------------------------- figures
def _display_rgb(a: np.ndarray) -> np.ndarray:
    """C x H x W with C in (1, 3) -> H x W x 3 in [0, 1] (values outside are clipped)."""
    rgb = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a[:3]
    return np.clip(rgb.transpose(1, 2, 0), 0.0, 1.0)


def _robust_max(a: np.ndarray) -> float:
    """The 98th percentile of |a|: a few extreme pixels must not wash out a whole map."""
    v = float(np.percentile(np.abs(a), 98))
    return v if v > 0 else (float(np.abs(a).max()) or 1.0)


def _mosaic(maps: np.ndarray, gap: int = 2) -> np.ndarray:
    """Up to 8 maps side by side in rows of 4, each divided by its own largest |value|."""
    n, h, w = maps.shape
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    out = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap), np.nan, dtype=np.float32)
    for i, m in enumerate(maps):
        top, left = (i // cols) * (h + gap), (i % cols) * (w + gap)
        out[top: top + h, left: left + w] = m / _robust_max(m)
    return out


def _array(r: DemoResult, which: str) -> np.ndarray:
    return r.input if which == "input" else (r.output if which == "output" else r.extra[which])


def _display(r: DemoResult, which: str, vlim: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """How one array of a result is best read: (array for imshow, imshow keyword arguments)."""
    a = _array(r, which)
    kind = r.kind
    if which == "input":
        return _display_rgb(a / 255.0 if kind == "batch_norm" else a), {}
    if kind == "batch_norm":
        return _display_rgb((a + 2.5) / 5.0), {}  # mean 0, std 1 -> mid-grey, +-2.5 std fill the range
    if kind == "dropout":
        return _display_rgb(a * (1.0 - r.options["rate"])), {}  # survivors back on the input's scale
    if kind in ("max_pool", "avg_pool", "upsample"):
        return _display_rgb(a), {}
    if kind == "conv_transpose":
        return _display_rgb(a if r.options["weights"] == "box" else minmax(a)), {}
    if a.shape[0] > 1:  # several random filters: a mosaic, each map on its own signed scale
        return _mosaic(a[:MAX_SHOWN_FILTERS]), {"cmap": "RdBu_r", "vmin": -1.0, "vmax": 1.0}
    if kind == "conv" and r.kernel is not None and abs(float(r.kernel.sum()) - 1.0) < 1e-4:
        # box, sharpen, emboss keep the brightness (their weights sum to 1): a grey photo
        return np.clip(a[0], 0.0, 1.0), {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    # sobel, edge, random, relu: signed maps on a diverging scale centred on zero (white = 0)
    lim = vlim if vlim is not None else _robust_max(a)
    return a[0], {"cmap": "RdBu_r", "vmin": -lim, "vmax": lim}


def _title(r: DemoResult, which: str) -> str:
    shape = _shape(_array(r, which))
    if which == "input":
        return f"input {shape}"
    if r.kind == "dropout":
        zero = float((r.output == 0).mean()) if which == "output" else 0.0
        return (f"training mode {shape}\n{zero:.0%} zeroed, rest x{1 / (1 - r.options['rate']):.3g}"
                if which == "output" else f"evaluation mode {shape}\nthe identity")
    if r.kind == "relu":
        if which == "conv":
            return f"conv ({r.options['weights']}) {shape}\nsigned: red > 0 > blue"
        zero = float((r.output == 0).mean())
        return f"after ReLU {shape}\n{zero:.0%} set to 0"
    if r.kind == "conv" and r.output.shape[0] > 1:
        shown = min(r.output.shape[0], MAX_SHOWN_FILTERS)
        return f"{r.label}\noutput {shape} (first {shown} maps)"
    return f"{r.label}\noutput {shape}"


def _kernel_panel(ax: Any, kernel: np.ndarray) -> None:
    lim = float(np.abs(kernel).max()) or 1.0
    ax.imshow(kernel, cmap="RdBu_r", vmin=-lim, vmax=lim)
    k = kernel.shape[0]
    if k <= 5:
        for (i, j), v in np.ndenumerate(kernel):
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=8 if k <= 3 else 6)
    ax.set_title(f"kernel {k}x{k}", fontsize=9)
    ax.set(xticks=[], yticks=[])


def _zoom(a: np.ndarray, frac: float = 0.25) -> np.ndarray:
    """The centre ``frac`` x ``frac`` window of an H x W x 3 array (for magnified crops)."""
    h, w = a.shape[:2]
    ch, cw = max(4, int(h * frac)), max(4, int(w * frac))
    top, left = (h - ch) // 2, (w - cw) // 2
    return a[top: top + ch, left: left + cw]


def render(results: list[DemoResult], suptitle: str) -> Any:
    """The figure: input and output(s) at one pixel scale, extras by kind; returns a Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first = results[0]
    compare = len(results) > 1
    panels: list[tuple[DemoResult, str]] = [(first, "input")]
    if compare:
        panels += [(r, "output") for r in results]
    else:  # relu: the convolution before it too; dropout: the evaluation mode too
        shown = {"relu": ("conv", "output"), "dropout": ("output", "eval")}.get(first.kind, ("output",))
        panels += [(first, which) for which in shown]
    sizes = [_panel_size(r, w) for r, w in panels]
    true_w = [w for w, _ in sizes]
    # Same pixel scale, except that a much smaller output still gets 40% of the largest width.
    widths = [max(w, 0.4 * max(true_w)) for w in true_w]
    shown_h = max(h * d / w for (w, h), d in zip(sizes, widths, strict=True))
    kernel = first.kernel if (not compare and first.kind == "conv" and first.output.shape[0] == 1) else None
    if kernel is not None:
        widths.append(max(widths) * 0.45)
    second_row = first.kind in ("batch_norm", "upsample", "conv_transpose", "max_pool", "avg_pool")
    total = sum(widths)
    fig_w = min(13.0, 3.2 * len(widths) + 0.5)
    fig_h = fig_w * shown_h / total * 1.05 + 1.3
    if second_row:
        fig_h += 2.6
    fig = Figure(figsize=(fig_w, fig_h), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 if second_row else 1, len(widths), width_ratios=widths,
                            height_ratios=[3, 2] if second_row else [1])
    axes = [fig.add_subplot(grid[0, i]) for i in range(len(widths))]
    relu_lim = _robust_max(first.extra["conv"]) if first.kind == "relu" else None
    for ax, (r, which) in zip(axes, panels, strict=False):
        shown, kw = _display(r, which, vlim=relu_lim if r.kind == "relu" else None)
        ax.imshow(shown, interpolation="nearest", **kw)
        ax.set_title(_title(r, which), fontsize=9)
        ax.set(xticks=[], yticks=[])
    if kernel is not None:
        _kernel_panel(axes[-1], kernel)
    if second_row:
        bottom = [fig.add_subplot(grid[1, i]) for i in range(len(widths))]
        if first.kind == "batch_norm":
            _histograms(bottom, panels)
        else:
            _zoom_row(bottom, panels)
    fig.suptitle(suptitle, fontsize=10)
    return fig


def _panel_size(r: DemoResult, which: str) -> tuple[float, float]:
    """(width, height) in pixels; several conv output maps make a mosaic of up to 4 columns."""
    a = _array(r, which)
    n = min(a.shape[0], MAX_SHOWN_FILTERS) if r.kind == "conv" and which == "output" else 1
    return float(min(n, 4) * a.shape[2]), float(math.ceil(n / 4) * a.shape[1])


def _histograms(axes: list[Any], panels: list[tuple[DemoResult, str]]) -> None:
    for ax, (r, which) in zip(axes, panels, strict=False):
        a = r.input if which == "input" else r.output
        for ch, colour in zip(a, ("tab:red", "tab:green", "tab:blue"), strict=False):
            ax.hist(ch.ravel(), bins=48, histtype="step", color=colour,
                    label=f"mean {ch.mean():.2f}, std {ch.std():.2f}")
        ax.legend(fontsize=7, loc="upper right", frameon=False)
        ax.set_title("per-channel histogram " + ("before" if which == "input" else "after"), fontsize=9)
        ax.tick_params(labelsize=7)


def _zoom_row(axes: list[Any], panels: list[tuple[DemoResult, str]]) -> None:
    for ax, (r, which) in zip(axes, panels, strict=False):
        shown, kw = _display(r, which)
        crop = _zoom(shown)
        ax.imshow(crop, interpolation="nearest", **kw)
        ax.set_title(f"centre crop, magnified ({crop.shape[0]}x{crop.shape[1]} px)", fontsize=8)
        ax.set(xticks=[], yticks=[])


# ----------------------------------------------------------------------------- entry points
def demo_layer(kind: str, image: str | os.PathLike[str] | np.ndarray, out: str | os.PathLike[str] = "demo.png",
               *, size: int | None = None, compare: str | None = None, seed: int = 0,
               quiet: bool = False, **options: Any) -> list[DemoResult]:
    """Apply one building block to ``image`` and write the side-by-side figure to ``out``.

    ``options`` are ``kernel``, ``stride``, ``padding``, ``filters``, ``weights``, ``rate``,
    ``factor`` and ``mode`` (None = the kind's default; an option the kind does not take is an
    error). ``compare`` adds a second variant (see :func:`parse_compare`). Prints one line per
    variant with the shape arithmetic unless ``quiet``; returns the results.
    """
    kind = _kind(kind)
    out = Path(out)
    fmt = figure_format(out)
    if out.exists() and out.is_dir():
        raise ConfigError(f"--out must be a file name, not a folder. Received: --out {str(out)!r}")
    given = {k: v for k, v in options.items() if k in OPTION_NAMES}
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r}.{suggest(unknown[0], OPTION_NAMES)} "
                          f"Options: {', '.join(OPTION_NAMES)}. Received: {unknown[0]}={options[unknown[0]]!r}")
    variants = [(kind, given)]
    if compare:
        variants.append(parse_compare(compare, kind, given))
    for k, o in variants:
        resolve_options(k, o)  # every option error before any decoding
    if isinstance(image, np.ndarray):
        arr = image
    else:
        side = size or max(DEFAULT_SIZE.get(k, DEFAULT_SIZE_OTHER) for k, _ in variants)
        arr = load_image(image, side)
    results = [apply_layer(k, arr, o, seed=seed) for k, o in variants]
    # one variant: its label over its arithmetic; two: "a  vs  b" over both lines of arithmetic
    title = "  vs  ".join(r.label for r in results) + "\n" + "\n".join(r.arithmetic for r in results)
    fig = render(results, title)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    cio.write_bytes(out, buf.getvalue())
    if not quiet:
        for r in results:
            print(r.shape_line)
        print(f"wrote {out}")
    return results


def demo_layer_command(kind: str, image: str, out: str, *, size: int | None = None, compare: str | None = None,
                       seed: int = 0, **options: Any) -> int:
    """``convlens demo-layer``: returns the exit code (user errors raise and exit 2)."""
    demo_layer(kind, image, out, size=size, compare=compare, seed=seed, **options)
    return 0

"""``convlens inspect``: what every layer of a model makes of one image, on one offline HTML page.

The model runs unit by unit through ``ConvlensModel.summary_units()`` (the same units, in the
same order, as ``convlens summary``), so each layer's output is captured without hooks and the
page's shapes match the summary table. For each layer the page shows its output shape and a
grid of its first feature maps; it also shows the first convolution's kernels as small RGB
tiles and, for a trained bundle, the prediction and the channels of the last feature map that
respond most to the image (weighted by the dense layer when the head is global average pooling
+ one dense layer: then the channel contributions add up exactly to the logit).

Everything is embedded (base64 PNGs, inline CSS), so ``inspect.html`` opens offline; a
machine-readable ``inspect.json`` is written beside it.
"""

from __future__ import annotations

import base64
import html
import io
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from convlens import files as cio
from convlens.errors import ConfigError, ImageError, UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from convlens.data.preprocess import Preprocessing

DEFAULT_IMAGE_SIZE = 128
MAX_KERNELS = 64
TOP_CHANNELS = 6
MAP_MAX_SIDE = 192  # larger maps are downsampled for the page (the shape shown is the real one)
HTML_NAME = "inspect.html"
JSON_NAME = "inspect.json"


@dataclass
class LayerView:
    """One layer (summary unit) and what it made of the image."""

    index: int
    name: str
    type: str
    shape: tuple[int, ...]  # (C, H, W) or (features,), batch excluded
    params: int
    minimum: float
    maximum: float
    mean: float
    zero_fraction: float
    note: str = ""

    @property
    def keras_shape(self) -> str:
        """``(None, H, W, C)`` as ``convlens summary`` prints it."""
        from convlens.models.shapes import keras_shape

        return keras_shape(tuple(self.shape))


@dataclass
class InspectResult:
    """What ``inspect_model`` wrote and found."""

    html_path: Path
    json_path: Path
    source: str
    trained: bool
    input_shape: tuple[int, int, int]
    layers: list[LayerView]
    prediction: dict[str, Any] | None = None
    top_channels: list[dict[str, Any]] = field(default_factory=list)
    kernels_shape: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["html_path"], d["json_path"] = str(self.html_path), str(self.json_path)
        for row, layer in zip(d["layers"], self.layers, strict=True):
            row["keras_shape"] = layer.keras_shape
        return d


# ----------------------------------------------------------------------------- loading
def _is_bundle(model: str) -> bool:
    p = Path(model)
    if p.suffix.lower() == ".convlens":
        return True
    if p.is_dir():
        return (p / "model.convlens").is_file()
    return p.is_file() and p.suffix.lower() not in (".yaml", ".yml", ".json") and zipfile.is_zipfile(p)


def load_source(model: str | os.PathLike[str], image_size: int | None = None,
                seed: int = 0) -> tuple[Any, Preprocessing, list[str] | None, bool]:
    """(model in eval mode, preprocessing, classes or None, trained) for a bundle or a MODEL.

    A bundle brings its own weights, classes and preprocessing; a registry name or a layer file
    is built with random (seeded) weights for two classes at ``image_size`` (default 128).
    """
    import torch

    from convlens.data.preprocess import Preprocessing

    name = str(model)
    if _is_bundle(name):
        from convlens.infer.bundle import load_model

        if image_size is not None:
            raise ConfigError(f"--image-size applies to a MODEL name or layer file; a bundle uses its own "
                              f"preprocessing. Received: --image-size {image_size}")
        m, meta = load_model(name, "cpu")
        return m, meta.preprocessing, list(meta.classes), True
    from convlens.models import build_model

    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 1024:
        raise ConfigError(f"--image-size must be an integer from 8 to 1024. Received: --image-size {size!r}")
    torch.manual_seed(seed)
    m = build_model(name, num_classes=2, in_channels=3, input_size=(size, size))
    return m.eval(), Preprocessing(size=(size, size)), None, False


# ----------------------------------------------------------------------------- pictures
def _png(rgb: np.ndarray) -> str:
    """uint8 H x W x 3 (or H x W) -> base64 PNG data URI."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def minmax(a: np.ndarray) -> np.ndarray:
    """``a`` scaled to its own min..max (all zeros when it is constant)."""
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def colorize(m: np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """A 2-D map scaled to its own min..max, through a matplotlib colour map -> uint8 RGB."""
    from matplotlib import colormaps

    rgb = (colormaps[cmap](minmax(m))[:, :, :3] * 255.0 + 0.5).astype(np.uint8)
    h, w = rgb.shape[:2]
    if max(h, w) > MAP_MAX_SIDE:
        scale = MAP_MAX_SIDE / max(h, w)
        img = Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                          Image.Resampling.BOX)
        rgb = np.asarray(img)
    return rgb


def kernel_tiles(weight: np.ndarray) -> list[np.ndarray]:
    """Conv weights (F, C, k, k) -> one uint8 k x k x 3 tile per filter (C = 3: RGB; else grey).

    Each tile is scaled to its own min..max so the pattern is visible whatever the weight scale.
    """
    rgb = [w[:3] if w.shape[0] >= 3 else np.repeat(w[:1], 3, axis=0) for w in weight[:MAX_KERNELS]]
    return [(minmax(t.transpose(1, 2, 0)) * 255.0 + 0.5).astype(np.uint8) for t in rgb]


def _first_conv(model: Any) -> Any:
    import torch

    return next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)


# ----------------------------------------------------------------------------- forward pass
def run_units(model: Any, x: torch.Tensor) -> tuple[list[tuple[str, str, Any, torch.Tensor, str]], torch.Tensor]:
    """Run ``model.summary_units()`` one after another -> ([(name, type, unit, output, note)], logits).

    A ReLU that the models package moved behind the following max pool (same result, cheaper)
    is applied to the convolution's output here, so the page shows what the layer means.
    """
    import torch

    from convlens.models.layers import Conv, Pool

    units = model.summary_units()
    rows = []
    with torch.no_grad():
        for i, (name, kind, unit) in enumerate(units):
            x = unit(x)
            shown, note = x, ""
            nxt = units[i + 1][2] if i + 1 < len(units) else None
            if isinstance(unit, Conv) and isinstance(nxt, Pool) and not isinstance(nxt.post_act, torch.nn.Identity):
                shown = nxt.post_act(x)
                note = (f"shown after its {type(nxt.post_act).__name__}, which runs after the next max pool "
                        f"(the same result, 4x cheaper)")
            rows.append((name, kind, unit, shown, note))
    return rows, x


def top_channels(model: Any, x: torch.Tensor, class_index: int, out_units: int,
                 k: int = TOP_CHANNELS) -> tuple[list[dict[str, Any]], np.ndarray, str]:
    """The last feature map's channels that speak most for ``class_index``.

    With a GAP + dense head the score is mean activation x dense weight (the exact contribution
    to the class logit; for a one-unit sigmoid model class 0's weights are minus class 1's);
    otherwise it is the mean activation. Returns (rows, feature maps C x h x w, method text).
    """
    import torch

    with torch.no_grad():
        f = model.forward_features(x)[0].float()
    means = f.mean(dim=(1, 2))
    head = model.gap_linear_head()
    if head is not None:
        row = 0 if out_units == 1 else class_index
        sign = 1.0 if out_units != 1 or class_index == 1 else -1.0
        weights = sign * head.weight.detach().float()[row]
        bias = sign * (float(head.bias.detach()[row]) if head.bias is not None else 0.0)
        score = means * weights
        method = (f"mean activation x dense weight (exact: the contributions plus the bias {bias:+.4g} "
                  f"add up to the logit {float(score.sum()) + bias:+.4g})")
    else:
        weights = None
        score = means
        method = "mean activation (this head is not global average pooling + one dense layer)"
    order = torch.argsort(score, descending=True)[:k]
    rows = [{"channel": int(c), "mean_activation": float(means[c]), "score": float(score[c]),
             "weight": None if weights is None else float(weights[c])} for c in order.tolist()]
    return rows, f.numpy(), method


# ----------------------------------------------------------------------------- page
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem auto;max-width:1100px;
color:#222;padding:0 1rem}
h1{font-size:1.4rem} h2{font-size:1.1rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.note{background:#fff6d6;border:1px solid #e8d48a;padding:.5rem .8rem;border-radius:4px}
table{border-collapse:collapse;font-size:.9rem} td,th{border-bottom:1px solid #eee;padding:.2rem .6rem;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.maps{display:flex;flex-wrap:wrap;gap:6px} figure{margin:0;text-align:center;font-size:.75rem;color:#555}
.maps img{width:96px;height:auto;image-rendering:pixelated;border:1px solid #ccc}
.kernels{display:flex;flex-wrap:wrap;gap:4px} .kernels img{width:40px;height:40px;image-rendering:pixelated;border:1px solid #ccc}
.top img{width:160px;height:auto;border:1px solid #ccc}
.bars{display:flex;align-items:flex-end;gap:1px;height:80px;border-bottom:1px solid #999}
.bars div{background:#4a7bb7;width:6px} .meta{color:#666;font-size:.85rem}
"""


def _bars(values: np.ndarray) -> str:
    v = np.asarray(values, dtype=np.float64)
    top = float(np.abs(v).max()) or 1.0
    cells = "".join(
        f'<div title="{i}: {x:.4g}" style="height:{max(1.0, 80.0 * abs(x) / top):.1f}px;'
        f'{"background:#c0504d;" if x < 0 else ""}"></div>' for i, x in enumerate(v[:512]))
    return f'<div class="bars">{cells}</div>'


def _layer_section(view: LayerView, out: np.ndarray, max_maps: int) -> str:
    e = html.escape
    head = (f'<h2 id="layer-{view.index}">{view.index}. {e(view.name)} <small>({e(view.type)})</small></h2>'
            f'<p class="meta">output {e(view.keras_shape)} &middot; PyTorch {"x".join(map(str, view.shape))} '
            f'&middot; {view.params:,} parameters &middot; values {view.minimum:.4g} .. {view.maximum:.4g}, '
            f'mean {view.mean:.4g}, {view.zero_fraction:.0%} zeros</p>')
    if view.note:
        head += f'<p class="meta">{e(view.note)}</p>'
    if out.ndim == 3:
        n = min(max_maps, out.shape[0])
        figs = []
        for c in range(n):
            m = out[c]
            dead = " (all 0)" if not np.any(m) else ""
            figs.append(f'<figure><img alt="channel {c}" title="channel {c}: min {m.min():.4g}, '
                        f'max {m.max():.4g}, mean {m.mean():.4g}" src="{_png(colorize(m))}">'
                        f'<figcaption>ch {c}{dead}</figcaption></figure>')
        more = f'<p class="meta">first {n} of {out.shape[0]} maps; each is scaled to its own range ' \
               f'(dark = low, yellow = high).</p>'
        return head + more + f'<div class="maps">{"".join(figs)}</div>'
    return head + '<p class="meta">a vector: one bar per value (red = negative)</p>' + _bars(out)


def _page(result: InspectResult, image: np.ndarray, outputs: list[np.ndarray], max_maps: int,
          kernels: list[np.ndarray], top_figs: list[str], top_method: str) -> str:
    e = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>convlens inspect: "
             f"{e(result.source)}</title><style>{_CSS}</style></head><body>",
             f"<h1>convlens inspect: {e(result.source)}</h1>"]
    if not result.trained:
        parts.append("<p class='note'><b>Random weights.</b> This model has not been trained: its feature maps "
                     "show what untrained filters do (edges and colour blobs by chance). Inspect a trained "
                     "bundle (<code>runs/.../model.convlens</code>) to see learned features.</p>")
    c, h, w = result.input_shape
    parts.append(f"<p><img src='{_png(image if image.shape[2] == 3 else image[:, :, 0])}' alt='input' "
                 f"style='width:{min(256, w * 2)}px;image-rendering:pixelated;border:1px solid #ccc'></p>"
                 f"<p class='meta'>model input: {h}x{w}x{c} (after the preprocessing "
                 f"{'stored in the bundle' if result.trained else 'for this model'})</p>")
    if result.prediction:
        p = result.prediction
        probs = ", ".join(f"{e(k)} {v:.1%}" for k, v in p["probabilities"].items())
        parts.append(f"<p><b>prediction: {e(p['label'])}</b> ({p['probability']:.1%}) &middot; {probs}</p>")
    rows = "".join(
        f"<tr><td class='num'>{v.index}</td><td><a href='#layer-{v.index}'>{e(v.name)}</a></td><td>{e(v.type)}</td>"
        f"<td>{e(v.keras_shape)}</td><td class='num'>{v.params:,}</td></tr>" for v in result.layers)
    parts.append("<h2>Layers</h2><table><tr><th>#</th><th>layer</th><th>type</th><th>output shape</th>"
                 f"<th>parameters</th></tr>{rows}</table>")
    if kernels:
        f, kc, kh, kw = result.kernels_shape or (0, 0, 0, 0)
        tiles = "".join(f"<img alt='kernel {i}' title='filter {i}' src='{_png(t)}'>" for i, t in enumerate(kernels))
        parts.append(f"<h2>First convolution's kernels</h2><p class='meta'>{f} filters of {kh}x{kw}x{kc}, "
                     f"{'as RGB' if kc >= 3 else 'in grey'}, each scaled to its own range"
                     f"{f' (first {len(kernels)})' if f > len(kernels) else ''}</p>"
                     f"<div class='kernels'>{tiles}</div>")
    if result.trained and result.top_channels:
        figs = "".join(
            f"<figure><img src='{src}' alt='channel {r['channel']}'><figcaption>channel {r['channel']}: "
            f"mean {r['mean_activation']:.3g}" + ("" if r["weight"] is None else
                                                  f" x weight {r['weight']:+.3g} = {r['score']:+.3g}")
            + "</figcaption></figure>" for r, src in zip(result.top_channels, top_figs, strict=True))
        explained = result.prediction["label"] if result.prediction else ""
        parts.append(f"<h2>Channels that respond most (for {e(explained)})</h2><p class='meta'>"
                     f"ranked by {e(top_method)}; each map is drawn over the image</p>"
                     f"<div class='maps top'>{figs}</div>")
    parts.append("<h2>Feature maps, layer by layer</h2>")
    for view, out in zip(result.layers, outputs, strict=True):
        parts.append(_layer_section(view, out, max_maps))
    parts.append("<p class='meta'>written by convlens inspect</p></body></html>")
    return "".join(parts)


# ----------------------------------------------------------------------------- entry points
def inspect_model(model: str | os.PathLike[str], image: str | os.PathLike[str], out: str | os.PathLike[str] = "inspect",
                  *, max_maps: int = 16, image_size: int | None = None, seed: int = 0) -> InspectResult:
    """Write ``out/inspect.html`` (self-contained) and ``out/inspect.json`` for ``image``.

    ``model`` is a bundle (trained weights, its preprocessing and classes) or a registry name /
    layer file (random weights, said so on the page).
    """
    import torch

    from convlens.decision import probabilities
    from convlens.explain.figures import overlay

    if isinstance(max_maps, bool) or not isinstance(max_maps, int) or not 1 <= max_maps <= 512:
        raise ConfigError(f"--max-maps must be an integer from 1 to 512. Received: --max-maps {max_maps!r}")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out must be a folder. Received: --out {str(out)!r} (an existing file)")
    if not Path(image).is_file():
        raise ConfigError(f"IMAGE must be an image file. Received: {str(image)!r} (not found)")
    net, prep, classes, trained = load_source(model, image_size, seed)
    try:
        arr = prep.load(image)
    except ImageError as e:
        raise UserError(f"cannot use {str(image)!r}: {e.message}; pass a readable photo") from e
    x = torch.from_numpy(prep.normalize(arr[None]))
    rows, _ = run_units(net, x)
    views, outputs = [], []
    for i, (name, kind, unit, y, note) in enumerate(rows, start=1):
        a = y[0].float().numpy()
        views.append(LayerView(i, name, kind, tuple(int(d) for d in a.shape), sum(p.numel() for p in unit.parameters()),
                               float(a.min()), float(a.max()), float(a.mean()), float((a == 0).mean()), note))
        outputs.append(a)
    conv = _first_conv(net)
    kernels = kernel_tiles(conv.weight.detach().float().numpy()) if conv is not None else []
    result = InspectResult(out_dir / HTML_NAME, out_dir / JSON_NAME, str(model), trained,
                           (int(x.shape[1]), int(x.shape[2]), int(x.shape[3])), views,
                           kernels_shape=tuple(conv.weight.shape) if conv is not None else None)
    top_figs: list[str] = []
    method = ""
    if trained and classes:
        with torch.no_grad():  # the whole model: a flip-averaged bundle averages, as predict does
            logits = net(x)
        probs = probabilities(logits.float().numpy(), net.output_activation)[0]
        k = int(np.argmax(probs))
        result.prediction = {"label": classes[k], "index": k, "probability": float(probs[k]),
                             "probabilities": {c: float(p) for c, p in zip(classes, probs, strict=True)}}
        result.top_channels, fmap, method = top_channels(net, x, k, net.out_units)
        top_figs = [_png(overlay(arr, minmax(fmap[r["channel"]]))) for r in result.top_channels]
    cio.write_text(result.html_path, _page(result, arr, outputs, max_maps, kernels, top_figs, method))
    cio.write_json(result.json_path, result.to_dict())
    return result


def inspect_command(model: str, image: str, out: str = "inspect", max_maps: int = 16,
                    image_size: int | None = None) -> int:
    """``convlens inspect``: print each layer's output shape and write the page; returns 0."""
    r = inspect_model(model, image, out, max_maps=max_maps, image_size=image_size)
    width = max(len(f"{v.name} ({v.type})") for v in r.layers)
    for v in r.layers:
        print(f"{v.index:>3}  {f'{v.name} ({v.type})':<{width}}  {v.keras_shape}")
    if r.prediction:
        print(f"prediction: {r.prediction['label']} ({r.prediction['probability']:.1%})")
    if not r.trained:
        print("note: random weights (not a trained bundle)")
    print(f"wrote {r.html_path}")
    return 0

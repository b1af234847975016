"""Class activation maps: exact CAM, Grad-CAM and Grad-CAM++ on ``forward_features``.

All three work on the split every ``ConvlensModel`` exposes: ``f = forward_features(x)``
(the last convolutional feature map, ``N x K x h x w``) and ``logits = forward_head(f)``.

- **CAM** (Zhou et al., 2016), exact for heads that are global average pooling + one dense
  layer (``model.gap_linear_head()``): ``M_c = sum_k w[c, k] f_k``. Then
  ``logit_c = mean(M_c) + b_c``, so the map is a spatial decomposition of the logit itself.
  With a single sigmoid unit (two classes) there is one weight row ``w``; the positive class's
  map is ``w . f`` and the negative class's is ``-w . f`` (its log-odds are ``-logit``).
- **Grad-CAM** (Selvaraju et al., 2017): channel weights are the spatial mean of
  ``d score / d f``; map ``= ReLU(sum_k a_k f_k)``. On a GAP + dense head ``d logit_c / d f_k``
  is ``w[c, k] / (h w)`` everywhere, hence ``Grad-CAM = ReLU(CAM) / (h w)`` (tested).
- **Grad-CAM++** (Chattopadhay et al., 2018), closed form for an exponential score:
  ``alpha = g^2 / (2 g^2 + sum_ij f g^3)``, weights ``sum_ij alpha ReLU(g)``, map
  ``= ReLU(sum_k w_k f_k)``.

The *score* differentiated is the chosen class's logit; for a single sigmoid unit it is
``+logit`` for the positive class and ``-logit`` for the negative one, so every method
explains the class asked for.

Why not pytorch-grad-cam (``grad-cam`` on PyPI), which was considered first:

1. Installing it would replace this project's torch: it imports ``torchvision`` at import
   time (``utils/model_targets.py``), and torchvision pins one exact torch release, so
   ``pip install grad-cam`` here resolved to torch 2.14.1 + torchvision 0.29.1 (plus OpenCV,
   ttach, tqdm) over the installed CPU torch 2.13 -- the multi-GB swap pyproject.toml is
   careful to avoid for users.
2. Its default target for a model with one output unit is wrong: with ``targets=None`` it
   takes ``argmax`` over a one-element output, i.e. always "category 0" = ``+logit``, so a
   confident *negative* prediction is explained with the positive class's evidence (its
   ``BinaryClassifierOutputTarget`` fixes the sign only when the caller picks it by hand).
3. It returns maps already ReLU'd, min-max normalised per image and OpenCV-resized to the
   *input tensor* size. The raw feature-resolution map is what the exact-CAM comparison,
   the negative-class sign and the upsampling to the *original* photo (through the
   bundle's squash/crop/pad geometry) need.
4. It finds the feature map with forward hooks on an ``nn.Module``; ``forward_features`` is a
   method, so a wrapper module would be needed anyway, while the explicit split here gives
   the features and their gradient with one ``torch.autograd.grad`` call and no hooks.

What remains is a few lines of tensor algebra, tested against the identities above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from convlens.config import EXPLAIN_METHODS, check_choice
from convlens.data.preprocess import Preprocessing
from convlens.errors import UserError


@dataclass
class RawMaps:
    """Feature-resolution maps ``N x h x w`` (signed for CAM), the logits and explained classes."""

    maps: torch.Tensor
    logits: torch.Tensor
    class_index: torch.Tensor


def _class_tensor(class_index: int | Sequence[int] | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    idx = torch.as_tensor(class_index, dtype=torch.long, device=device).reshape(-1)
    if idx.numel() == 1 and n != 1:
        idx = idx.expand(n)
    if idx.numel() != n:
        raise ValueError(f"class_index must be one index or one per image ({n}). Received: {idx.numel()}")
    return idx


def predicted_class(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """The decision per image: ``sigmoid(z) >= threshold`` for one unit, else the argmax."""
    if logits.shape[1] == 1:
        return (torch.sigmoid(logits[:, 0].float()) >= threshold).long()
    return logits.argmax(dim=1)


def class_score(logits: torch.Tensor, class_index: torch.Tensor) -> torch.Tensor:
    """The score each method explains: the class logit, or ``+/- logit`` for one sigmoid unit."""
    if logits.shape[1] == 1:
        sign = class_index.to(logits.dtype) * 2 - 1  # class 1 -> +1, class 0 -> -1
        return logits[:, 0] * sign
    return logits.gather(1, class_index[:, None])[:, 0]


def compute_cam(features: torch.Tensor, weight: torch.Tensor,
                class_index: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Exact CAM ``N x h x w`` from features ``N x K x h x w`` and dense weights ``units x K``.

    With one unit (two classes, sigmoid) class 1 gets ``w . f`` and class 0 gets ``-w . f``.
    """
    n = features.shape[0]
    idx = _class_tensor(class_index, n, features.device)
    w = weight.to(features.dtype)
    if w.shape[0] == 1:
        rows = w[0][None].expand(n, -1) * (idx.to(w.dtype) * 2 - 1)[:, None]
    else:
        rows = w[idx]
    return torch.einsum("nk,nkhw->nhw", rows, features)


def _choose(logits: torch.Tensor, class_index: int | Sequence[int] | torch.Tensor | None,
            threshold: float) -> torch.Tensor:
    if class_index is None:
        return predicted_class(logits.detach(), threshold)
    return _class_tensor(class_index, logits.shape[0], logits.device)


def cam(model: torch.nn.Module, x: torch.Tensor,
        class_index: int | Sequence[int] | torch.Tensor | None = None, threshold: float = 0.5) -> RawMaps:
    """Exact CAM for a model whose head is global average pooling + one dense layer."""
    dense = model.gap_linear_head() if hasattr(model, "gap_linear_head") else None
    if dense is None:
        name = getattr(model, "arch", {}).get("name", type(model).__name__)
        raise UserError(
            f"method 'cam' needs a model ending in global average pooling + one dense layer, "
            f"which {name} does not; use --method gradcam or gradcam++"
        )
    with torch.no_grad():
        f = model.forward_features(x)
        logits = model.forward_head(f).float()
        idx = _choose(logits, class_index, threshold)
        maps = compute_cam(f.float(), dense.weight.float(), idx)
    return RawMaps(maps, logits, idx)


def _features_and_grads(model: torch.nn.Module, x: torch.Tensor,
                        class_index: int | Sequence[int] | torch.Tensor | None, threshold: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        f = model.forward_features(x).detach().float().requires_grad_(True)
        logits = model.forward_head(f).float()
        idx = _choose(logits, class_index, threshold)
        # Images are independent in eval mode, so one backward pass of the summed scores
        # gives every image's own gradient.
        (grads,) = torch.autograd.grad(class_score(logits, idx).sum(), f)
    return f.detach(), grads, logits.detach(), idx


def gradcam(model: torch.nn.Module, x: torch.Tensor,
            class_index: int | Sequence[int] | torch.Tensor | None = None, threshold: float = 0.5) -> RawMaps:
    """Grad-CAM on ``forward_features`` (any model)."""
    f, g, logits, idx = _features_and_grads(model, x, class_index, threshold)
    weights = g.mean(dim=(2, 3))
    maps = F.relu(torch.einsum("nk,nkhw->nhw", weights, f))
    return RawMaps(maps, logits, idx)


def gradcampp(model: torch.nn.Module, x: torch.Tensor,
              class_index: int | Sequence[int] | torch.Tensor | None = None, threshold: float = 0.5) -> RawMaps:
    """Grad-CAM++ on ``forward_features`` (any model)."""
    f, g, logits, idx = _features_and_grads(model, x, class_index, threshold)
    g2, g3 = g.pow(2), g.pow(3)
    denom = 2 * g2 + f.sum(dim=(2, 3), keepdim=True) * g3
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                        torch.zeros_like(denom))
    weights = (alpha * F.relu(g)).sum(dim=(2, 3))
    maps = F.relu(torch.einsum("nk,nkhw->nhw", weights, f))
    return RawMaps(maps, logits, idx)


def methods_for(model: torch.nn.Module) -> tuple[str, ...]:
    """The methods ``model`` supports: the exact CAM needs a global-average-pool + dense head."""
    if not hasattr(model, "forward_features"):
        return ()
    exact = getattr(model, "gap_linear_head", lambda: None)() is not None
    return EXPLAIN_METHODS if exact else tuple(m for m in EXPLAIN_METHODS if m != "cam")


def run_method(method: str, model: torch.nn.Module, x: torch.Tensor,
               class_index: int | Sequence[int] | torch.Tensor | None = None,
               threshold: float = 0.5) -> RawMaps:
    """Dispatch ``cam`` / ``gradcam`` / ``gradcam++``."""
    fns = dict(zip(EXPLAIN_METHODS, (cam, gradcam, gradcampp), strict=True))
    return fns[check_choice("method", method, EXPLAIN_METHODS)](model, x, class_index, threshold)


# ----------------------------------------------------------------------------- geometry
def input_window(prep: Preprocessing, width: int, height: int) -> tuple[tuple[float, float, float, float],
                                                                        tuple[int, int, int, int]]:
    """Where model input and original image overlap, for the bundle's resize policy.

    Returns ``(box_in_original, box_in_input)`` as (left, top, right, bottom): the part of the
    original photo the model saw and where it lies in the model input. Mirrors Pillow's
    ``resize`` (squash), ``ImageOps.fit`` (crop, centred) and ``ImageOps.pad`` (pad, centred).
    """
    if prep.decode_size is not None:
        return _cropped_window(prep, width, height)
    h, w = prep.size
    if prep.resize == "squash":
        return (0.0, 0.0, float(width), float(height)), (0, 0, w, h)
    if prep.resize == "crop":
        live, out = width / height, w / h
        if live == out:
            cw, ch = float(width), float(height)
        elif live >= out:
            cw, ch = out * height, float(height)
        else:
            cw, ch = float(width), width / out
        left, top = (width - cw) * 0.5, (height - ch) * 0.5
        return (left, top, left + cw, top + ch), (0, 0, w, h)
    # pad: ImageOps.contain, then centred on the canvas
    im_ratio, dest = width / height, w / h
    nw, nh = w, h
    if im_ratio != dest:
        if im_ratio > dest:
            nh = round(height / width * w)
        else:
            nw = round(width / height * h)
    x0, y0 = round((w - nw) * 0.5), round((h - nh) * 0.5)
    return (0.0, 0.0, float(width), float(height)), (x0, y0, x0 + nw, y0 + nh)


def _cropped_window(prep: Preprocessing, width: int, height: int) -> tuple[tuple[float, float, float, float],
                                                                          tuple[int, int, int, int]]:
    """:func:`input_window` for a ``decode_size`` bundle: the window of the image resized to
    ``decode_size``, intersected with the centre crop that is the model input."""
    from dataclasses import replace

    (ol, ot, or_, ob), (il, it, ir, ib) = input_window(replace(prep, size=prep.resized_size, decode_size=None),
                                                       width, height)
    top, left = prep.crop_offset()
    h, w = prep.size
    cl, ct, cr, cb = max(il, left), max(it, top), min(ir, left + w), min(ib, top + h)
    sx, sy = (or_ - ol) / max(1, ir - il), (ob - ot) / max(1, ib - it)  # resized -> original pixels
    orig = (ol + (cl - il) * sx, ot + (ct - it) * sy, ol + (cr - il) * sx, ot + (cb - it) * sy)
    return orig, (cl - left, ct - top, cr - left, cb - top)


def _resize(m: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(m[None, None].float(), size=size_hw, mode="bilinear", align_corners=False)[0, 0]


def upsample_to_original(raw: torch.Tensor, prep: Preprocessing, width: int, height: int) -> torch.Tensor:
    """A feature-resolution map ``h x w`` -> ``height x width`` over the original photo (bilinear).

    The map first spans the model input; the resize policy then says which part of it shows
    the photo (pad) or which part of the photo it shows (crop). Parts of the photo the model
    never saw (cropped away) get 0: no evidence either way.
    """
    h, w = prep.size
    (left, top, right, bottom), (x0, y0, x1, y1) = input_window(prep, width, height)
    if prep.decode_size is None and prep.resize == "squash":
        return _resize(raw, (height, width))
    if prep.decode_size is None and prep.resize == "pad":
        return _resize(_resize(raw, (h, w))[y0:y1, x0:x1], (height, width))
    # crop: the whole map covers the part of the photo the model saw; a decode_size bundle's
    # centre crop: the input's window of the map does. The rest of the photo gets 0.
    l_, t_ = round(left), round(top)
    cw, ch = max(1, min(width - l_, round(right) - l_)), max(1, min(height - t_, round(bottom) - t_))
    window = raw if prep.decode_size is None else _resize(raw, (h, w))[y0:y1, x0:x1]
    inner = _resize(window, (ch, cw))
    out = torch.zeros((height, width), dtype=inner.dtype, device=inner.device)
    out[t_:t_ + ch, l_:l_ + cw] = inner
    return out


def normalize_heat(m: torch.Tensor) -> np.ndarray:
    """Positive evidence scaled to [0, 1] (``ReLU``, then divide by the maximum).

    Dividing by the maximum, not min-max stretching, keeps 0 meaning "no evidence": a map
    with no positive evidence stays all zero instead of being stretched into false hot spots.
    """
    m = F.relu(m.float())
    top = float(m.max()) if m.numel() else 0.0
    if top > 0 and np.isfinite(top):
        m = m / top
    return m.clamp_(0, 1).cpu().numpy().astype(np.float32)

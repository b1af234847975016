"""The bf16-against-fp32 check a training run makes: what ``precision="auto"`` means for the model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from convlens.evaluate.inference import predict_probabilities
from convlens.evaluate.metrics import predict_labels

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from convlens.infer.bundle import BundleMeta

# precision="auto" runs a model in bf16 only when bf16 moved its class probabilities by at most
# this much on the images checked (issue 13's goal is 1e-2 over a whole validation set; the check
# sees a sample, hence the margin). EfficientNet-Lite's depthwise blocks miss it (1.4e-2 to
# 4.8e-2 on cats_and_dogs_filtered and cat_breeds5); the from-scratch models measured pass (2-3.5e-3).
BF16_MAX_PROB_DIFF = 5e-3
BF16_CHECK_IMAGES = 256


def bf16_check_size(n_images: int, device: str = "cpu", limit: int = BF16_CHECK_IMAGES) -> int:
    """How many of ``n_images`` :func:`bf16_agreement` compares: 0 where ``auto`` is not bf16 on
    ``device`` (fp32 without native bf16, fp16 on older CUDA GPUs), else up to ``limit``."""
    import torch

    from convlens import runtime

    return min(n_images, limit) if runtime.inference_device(device, "auto").amp_dtype == torch.bfloat16 else 0


def bf16_agreement(model: torch.nn.Module, meta: BundleMeta, images: Any, device: str = "cpu",
                   batch_size: int = 64, limit: int = BF16_CHECK_IMAGES) -> dict[str, Any] | None:
    """How far bf16 moves ``model``'s probabilities from fp32 on :func:`bf16_check_size` of
    ``images`` (evenly spaced), and the precision ``auto`` should mean for it; None when that is 0."""
    size = bf16_check_size(len(images), device, limit)
    if not size:
        return None
    index = np.unique(np.linspace(0, len(images) - 1, size).round().astype(np.int64))
    sample = np.stack([np.asarray(images[int(i)]) for i in index])
    low, full = (predict_probabilities(model, meta, sample, batch_size, device, p) for p in ("bf16", "fp32"))
    diff = float(np.abs(low - full).max())
    flips = int((predict_labels(low, meta.threshold) != predict_labels(full, meta.threshold)).sum())
    return {"images": len(sample), "max_prob_diff": diff, "label_flips": flips,
            "precision": "auto" if diff <= BF16_MAX_PROB_DIFF else "fp32"}


def agreement_note(agreement: dict[str, Any]) -> str:
    """The report's sentence on :func:`bf16_agreement`."""
    verdict = ("predictions use bf16 where the hardware has it" if agreement["precision"] == "auto"
               else "this model predicts in fp32 everywhere (an explicit --precision bf16 still runs bf16)")
    return (f"bf16 against fp32 on {agreement['images']} validation images: largest probability difference "
            f"{agreement['max_prob_diff']:.1e} (limit {BF16_MAX_PROB_DIFF:g}), {agreement['label_flips']} labels "
            f"changed; {verdict}.")

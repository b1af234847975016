"""Evaluate a model on labelled images: metrics (scikit-learn), figures, ``report.html``.

``evaluate()`` runs at the end of every training on the validation set, and
``convlens evaluate BUNDLE DIR`` runs it on any labelled folder. The modules: ``labelled``
(decoding a folder), ``inference`` (the model's outputs through predict's backends), ``bf16``
(what ``precision="auto"`` means for a model), ``evaluation`` (``evaluate()``), ``command`` (the
verb), ``metrics``, ``calibration``, ``plots``, ``report`` and ``result``.
"""

from __future__ import annotations

from convlens.callable_module import callable_module
from convlens.evaluate.bf16 import (
    BF16_CHECK_IMAGES,
    BF16_MAX_PROB_DIFF,
    agreement_note,
    bf16_agreement,
    bf16_check_size,
)
from convlens.evaluate.command import evaluate_bundle, evaluate_command
from convlens.evaluate.evaluation import evaluate, model_info, novelty_summary
from convlens.evaluate.inference import (
    backend_logits,
    backend_outputs,
    predict_logits,
    predict_outputs,
    predict_probabilities,
)
from convlens.evaluate.labelled import LabelledImages, load_labelled_folder

__all__ = ["BF16_CHECK_IMAGES", "BF16_MAX_PROB_DIFF", "LabelledImages", "agreement_note", "backend_logits",
           "backend_outputs", "bf16_agreement", "bf16_check_size", "evaluate", "evaluate_bundle", "evaluate_command",
           "load_labelled_folder", "model_info", "novelty_summary", "predict_logits", "predict_outputs",
           "predict_probabilities"]

# `convlens.evaluate(bundle, dir)` is the public verb: this package, when called, runs evaluate_bundle.
callable_module(__name__, "evaluate_bundle")

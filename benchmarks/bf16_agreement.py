"""How far bf16 inference moves a trained model's probabilities from fp32, on real photos.

Runs a bundle over a labelled folder (a pre-split dataset: its validation images) twice through
the one inference path (``convlens.evaluate.predict_probabilities``, which ``convlens predict``,
``serve`` and the Python API share) in fp32 and in bf16, and reports the largest and mean
absolute probability difference, the images whose predicted label changes, and both accuracies.
It also checks that ``convlens predict``'s ``Classifier`` gives the report's numbers.

    python benchmarks/bf16_agreement.py runs/train/model.convlens ../shared/datasets/cats_and_dogs_filtered
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("data", help="labelled class folders (a pre-split dataset: its validation images)")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)

    import numpy as np

    from convlens import runtime
    from convlens.evaluate import load_labelled_folder, predict_probabilities
    from convlens.evaluate.metrics import predict_labels
    from convlens.infer import Classifier, TorchBackend
    from convlens.infer.bundle import load_model

    runtime.tune_allocator()
    runtime.configure_threads()
    model, meta = load_model(args.bundle, "cpu")
    data = load_labelled_folder(args.data, meta)
    probs = {prec: predict_probabilities(model, meta, data.images, args.batch_size, "cpu", prec)
             for prec in ("fp32", "bf16")}
    labels = {prec: predict_labels(pr, meta.threshold) for prec, pr in probs.items()}
    diff = np.abs(probs["bf16"] - probs["fp32"])
    flips = int((labels["bf16"] != labels["fp32"]).sum())
    acc = {prec: float((lab == data.labels).mean()) for prec, lab in labels.items()}
    clf = Classifier(meta, TorchBackend(model, "cpu", "bf16"))
    served = clf.predict_proba(data.images[:256])
    same_path = float(np.abs(served - probs["bf16"][:256]).max())
    n = len(data.labels)
    body = common.table(
        ["images", "classes", "max abs prob. diff", "mean abs diff", "label flips", "accuracy fp32", "accuracy bf16",
         "predict vs evaluate (bf16)"],
        [[n, len(meta.classes), f"{diff.max():.2e}", f"{diff.mean():.1e}", f"{flips} ({100 * flips / n:.2f}%)",
          f"{acc['fp32']:.4f}", f"{acc['bf16']:.4f}", f"{same_path:.1e}"]])
    ok = diff.max() <= 1e-2 and flips <= 0.002 * n
    notes = [f"{meta.arch.get('name', '?') if isinstance(meta.arch, dict) else meta.arch}, {data.note or args.data}",
             f"goal: max difference <= 1e-2 and label flips <= 0.2% of images -> {'met' if ok else 'NOT met'}"]
    print(common.report("bf16 against fp32 inference on real photos", common.command_line(), body, notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

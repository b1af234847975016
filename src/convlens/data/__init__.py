"""Data: scan a folder, check and decode images, split, cache, augment and load batches.

Never imports ``convlens.models``. ``decode`` and ``preprocess`` do not import torch, so the
ONNX prediction path can use them with only numpy and Pillow installed.
"""

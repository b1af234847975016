"""Training engine: the training loop, checkpoints, optimizers and schedules, the LR finder.

Uses ``convlens.data`` and ``convlens.models`` (which never import each other). Import the
submodules directly (``convlens.engine.trainer``); this package imports nothing heavy itself.
"""

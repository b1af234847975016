"""Typed configuration: dataclass defaults -> preset -> ``--config FILE.yaml`` -> command-line flags.

Unknown keys are rejected with a "did you mean" suggestion; values are parsed with
``yaml.safe_load`` (never ``eval``) and checked against the field's type. The resolved
configuration is saved in the run folder and in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from convlens.errors import ConfigError

T = TypeVar("T")

# The one owner of every choice list and range a user can set: argparse help and choices,
# config validation and the implementations (data/preprocess.py, data/augment.py,
# engine/optim.py, explain/) import them from here (torch-free, so `--help` stays fast).
RESIZE_POLICIES = ("squash", "crop", "pad")
OPTIMIZERS = ("rmsprop", "sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "onecycle")
# Batch-norm statistics while fine-tuning a pretrained backbone: kept (frozen) or updated by the
# fine-tuned units' batches (train).
FINETUNE_BN = ("frozen", "train")
EXPLAIN_METHODS = ("cam", "gradcam", "gradcam++")
EXPORT_FORMATS = ("onnx", "torchscript")
# A figure file's ending -> matplotlib's format (`convlens preview`, `convlens demo-layer`).
FIGURE_FORMATS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".pdf": "pdf", ".svg": "svg", ".webp": "webp"}
# The share of validation images a trained model's novelty threshold keeps as known (--accept);
# owned here, below every package, so convlens.infer.novelty and the trainer read one number.
DEFAULT_ACCEPT = 0.95

# What runs a bundle's predictions (convlens.infer.engine): auto = onnxruntime where the model
# predicts in fp32 on a CPU (faster, and verified to agree), else torch.
ENGINES = ("auto", "torch", "onnx")
# Augmentation strengths: (low, high, low bound open).
AUGMENT_RANGES = {"rotation": (0.0, 0.5, False), "crop_scale": (0.0, 1.0, True),
                  "color_jitter": (0.0, 1.0, False), "erasing": (0.0, 1.0, False),
                  "mixup": (0.0, 100.0, False), "cutmix": (0.0, 100.0, False)}

# convlens serve's batching: images per model batch (1 = off) and the longest wait for more (ms).
# The defaults were chosen with benchmarks/serve_load.py (docs/benchmarks.md, "Serving").
SERVE_RANGES = {"max_batch": (1.0, 1024.0, False), "max_wait": (0.0, 1000.0, False)}
SERVE_DEFAULTS = {"max_batch": 4, "max_wait": 5.0}


@dataclass
class TrainConfig:
    """Everything ``convlens train`` needs. Field docs become the ``--help`` text."""

    # --- data ---
    data: str | None = field(default=None, metadata={"help": "dataset folder (default: the embedded digits)"})
    val_fraction: float = field(default=0.2, metadata={"help": "validation fraction when the folder is not pre-split"})
    test_fraction: float = field(default=0.0, metadata={"help": "held-out test fraction when the folder is not pre-split"})
    seed: int = field(default=1337, metadata={"help": "seed for the split, initialisation and augmentation"})
    image_size: int = field(default=128, metadata={"help": "square input size in pixels"})
    crop_margin: float = field(default=0.125, metadata={"help": "decode images this fraction larger than image_size: training takes random image_size crops, evaluation and prediction the centre crop (0 = off)"})
    resize: str = field(default="squash", metadata={"help": "resize policy: " + " | ".join(RESIZE_POLICIES)})
    channels: int = field(default=0, metadata={"help": "input channels: 0 = auto (1 if every image is grayscale), 1 or 3"})
    cache_dir: str | None = field(default=None, metadata={"help": "decoded-image cache folder (default: user cache dir)"})
    max_pixels: int = field(default=89_478_485, metadata={"help": "images with more pixels are unusable (decompression bombs)"})
    min_side: int = field(default=8, metadata={"help": "images with a smaller side are unusable"})
    workers: int = field(default=0, metadata={"help": "decoding processes (0 = all cores)"})
    # --- model ---
    model: str = field(default="vgg10", metadata={"help": "registry name or a YAML/JSON layer file"})
    model_args: dict[str, Any] = field(default_factory=dict, metadata={"help": "keyword arguments of a registered model, as YAML: '{width: 1.0}'"})
    # --- transfer learning (pretrained backbones; see README "Pretrained backbones") ---
    pretrained: str = field(default="auto", metadata={"help": "auto | none | efficientnet_lite0|1|2 (2-3 joined by '+': an ensemble) | a weight file (.pth/.safetensors)"})
    arch: str | None = field(default=None, metadata={"help": "architecture of a --pretrained weight file when it cannot be inferred"})
    finetune_epochs: int = field(default=0, metadata={"help": "after fitting the head on frozen features, fine-tune the last blocks for N epochs"})
    finetune_lr: float = field(default=1e-4, metadata={"help": "fine-tuning's learning rate (AdamW, cosine; ~1/50 of a from-scratch one)"})
    # The fine-tuning recipe (docs/benchmarks.md, "Fine-tuning recipes"): half the units, layer-wise
    # decayed rates, batch-norm statistics frozen, a short warm-up, stopped when validation stops improving.
    finetune_units: float = field(default=0.5, metadata={"help": "share of the network's units, counted back from the head, that fine-tuning updates (at least the head and one block)"})
    finetune_lr_decay: float = field(default=0.8, metadata={"help": "layer-wise learning-rate decay: each fine-tuned unit trains at this times the rate of the unit after it (the head at --finetune-lr; 1 = one rate)"})
    finetune_bn: str = field(default="frozen", metadata={"help": "batch-norm statistics of the fine-tuned units: " + " | ".join(FINETUNE_BN)})
    finetune_warmup: float = field(default=0.3, metadata={"help": "fine-tuning's linear learning-rate warm-up in epochs (the fitted head is not disturbed by full-rate first steps)"})
    finetune_patience: int = field(default=1, metadata={"help": "stop fine-tuning after N epochs without a better validation accuracy (0 = off)"})
    finetune_crop_scale: float = field(default=1.0, metadata={"help": "fine-tuning's random resized crop minimum area (1.0 = off; --crop-scale of a from-scratch run)"})
    head_flip: bool = field(default=False, metadata={"help": "also fit the pretrained head on mirrored images' features"})
    # --- novelty (the bundle's `unknown` rule; see README "Unknown photos") ---
    accept: float = field(default=DEFAULT_ACCEPT, metadata={"help": "share of validation images the novelty threshold keeps as known; predictions less like the training images are `unknown`"})
    # --- input scaling (stored in the bundle: training and prediction always agree) ---
    scale: float = field(default=1 / 255, metadata={"help": "pixel scale: 1/255 maps 0-255 to 0-1; 1.0 keeps 0-255 (tutorial)"})
    mean: list[float] = field(default_factory=lambda: [0.0], metadata={"help": "per-channel mean subtracted after scaling"})
    std: list[float] = field(default_factory=lambda: [1.0], metadata={"help": "per-channel std divided after scaling"})
    # --- optimisation ---
    epochs: int = field(default=44, metadata={"help": "training epochs (--time chooses them from a time budget)"})
    time: str | None = field(default=None, metadata={"help": "time budget for the whole run, e.g. 90s, 5m, 1h: the epochs are chosen to fit it"})
    batch_size: int = field(default=64, metadata={"help": "global batch size"})
    optimizer: str = field(default="sgd", metadata={"help": " | ".join(OPTIMIZERS)})
    lr: float = field(default=0.2, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=5e-4, metadata={"help": "weight decay"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    nesterov: bool = field(default=True, metadata={"help": "Nesterov momentum for SGD"})
    schedule: str = field(default="onecycle", metadata={"help": "learning-rate schedule: " + " | ".join(SCHEDULES)})
    warmup_epochs: float = field(default=1.0, metadata={"help": "linear warm-up length in epochs (constant and cosine)"})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing"})
    class_weights: str = field(default="none", metadata={"help": "none | auto (inverse class frequency)"})
    patience: int = field(default=0, metadata={"help": "early stopping after N epochs without improvement (0 = off)"})
    val_every: int = field(default=4, metadata={"help": "validate every N epochs, and always the last (validation costs about a tenth of an epoch)"})
    progressive: float = field(default=0.5, metadata={"help": "progressive resizing: train this fraction of the epochs at 3/4 of image_size (0 = off)"})
    # --- augmentation (on the training device, whole batches) ---
    flip: bool = field(default=True, metadata={"help": "random horizontal flip"})
    rotation: float = field(default=0.0, metadata={"help": "random rotation as a fraction of a full turn (0.1 = +-36 degrees)"})
    crop_scale: float = field(default=1.0, metadata={"help": "random resized crop minimum area (1.0 = off)"})
    color_jitter: float = field(default=0.0, metadata={"help": "brightness/contrast/saturation jitter strength (0 = off)"})
    erasing: float = field(default=0.0, metadata={"help": "random erasing probability (0 = off)"})
    mixup: float = field(default=0.2, metadata={"help": "mixup alpha (0 = off)"})
    cutmix: float = field(default=0.0, metadata={"help": "cutmix alpha (0 = off)"})
    # --- evaluation and weight averaging (the bundle records flip_average: predict does the same) ---
    flip_average: bool = field(default=True, metadata={"help": "final evaluation, predict, serve and ONNX average the logits of each image and its mirror"})
    ema: bool = field(default=False, metadata={"help": "keep an exponential moving average of the weights and evaluate/save it"})
    ema_decay: float = field(default=0.99, metadata={"help": "EMA decay per step (with --ema)"})
    # --- runtime ---
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda[:N] | mps"})
    precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | fp32"})
    channels_last: bool = field(default=True, metadata={"help": "channels_last memory format"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0 = one per core)"})
    nproc: int = field(default=1, metadata={"help": "processes for DistributedDataParallel (launched with torchrun)"})
    # --- run folder ---
    project: str = field(default="runs", metadata={"help": "parent folder of run folders"})
    name: str = field(default="train", metadata={"help": "run folder name (name-2, name-3, ... if it exists)"})
    exist_ok: bool = field(default=False, metadata={"help": "reuse an existing run folder"})
    tensorboard: bool = field(default=False, metadata={"help": "also write TensorBoard event files to the run folder (needs the tensorboard package)"})
    preset: str = field(default="default", metadata={"help": "recipe to start from: default | tutorial | quick"})


# Every recipe in one table. The presets a user names (default, tutorial, quick) override the
# dataclass defaults, and a config file and flags override the preset; the others are chosen
# from the data by the one resolution step (convlens.engine.recipe): "digits" for the embedded
# demo (below the user's own choices), "pretrained" for a backbone (its fixed recipe, with the
# backbone's preprocessing, epochs 1 + finetune_epochs and lr finetune_lr, above them: a flag it
# replaces is named in a note).
RECIPES: dict[str, dict[str, Any]] = {
    # The dataclass defaults: the best from-scratch accuracy per CPU-minute found on
    # cats_and_dogs_filtered, cat_breeds5 and the digits (vgg10, random 128 px crops of 144 px
    # images + flips, the first half of the 44 epochs at 96 px, SGD Nesterov one-cycle 0.2, label
    # smoothing, mixup 0.2, flip-averaged evaluation; docs/benchmarks.md).
    "default": {},
    # The tutorial's recipe, faithfully: its model, 300x300 inputs on the 0-255 scale, batch 128,
    # RandomFlip + RandomRotation(0.1), RMSprop(1e-3), 25 epochs.
    "tutorial": {"model": "tutorial_cnn", "image_size": 300, "batch_size": 128, "flip": True, "rotation": 0.1,
                 "crop_scale": 1.0, "crop_margin": 0.0, "flip_average": False, "val_every": 1, "progressive": 0.0,
                 "optimizer": "rmsprop", "lr": 1e-3, "weight_decay": 0.0, "schedule": "constant",
                 "warmup_epochs": 0.0, "epochs": 25, "scale": 1.0, "mean": [0.0], "std": [1.0],
                 "label_smoothing": 0.0, "mixup": 0.0},
    # A few seconds on a laptop: for smoke tests and the first look at a dataset.
    "quick": {"model": "tiny", "image_size": 32, "epochs": 2, "batch_size": 32, "optimizer": "adamw", "lr": 5e-3,
              "val_every": 1, "progressive": 0.0, "mixup": 0.0},
    # The embedded digits (8x8 scans): small inputs, no mirror symmetry, a few seconds of epochs.
    "digits": {"image_size": 32, "flip": False, "flip_average": False, "crop_scale": 1.0, "epochs": 10,
               "val_every": 1, "progressive": 0.0, "mixup": 0.0},
    # A pretrained backbone: the head fit as epoch 1, then fine-tuning (AdamW, cosine, validated
    # every epoch); none of the from-scratch recipe's crop margin, flip averaging, progressive
    # resizing, mixup or EMA; --time chooses what the run does (engine.budget.plan_pretrained).
    "pretrained": {"channels": 3, "crop_margin": 0.0, "flip_average": False, "optimizer": "adamw",
                   "schedule": "cosine", "warmup_epochs": 0.0, "val_every": 1, "progressive": 0.0, "mixup": 0.0,
                   "ema": False},
}
PRESETS = ("default", "tutorial", "quick")  # the recipes a user may name


# ---- transfer learning: when `convlens train DIR` starts from a pretrained backbone --------------
DEFAULT_BACKBONE = "efficientnet_lite0"
PHOTO_MIN_SIDE = 64  # median shorter side (px) from which a dataset counts as photos


def auto_backbone(data_given: bool, preset: str, model_chosen: bool, grayscale: bool, median_side: float) -> str:
    """``pretrained: auto`` -> a backbone name or ``"none"``: photos get the pretrained default
    (99% vs 81% on cats_and_dogs_filtered in a fraction of the time, docs/benchmarks.md); the
    digits demo, ``--preset tutorial|quick``, an explicit ``--model``, and grayscale or tiny images
    train from scratch."""
    photos = not grayscale and median_side >= PHOTO_MIN_SIDE
    return DEFAULT_BACKBONE if data_given and preset == "default" and not model_chosen and photos else "none"


def suggest(name: str, options: typing.Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest option, or an empty string."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" Did you mean {match[0]!r}?" if match else ""


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of every field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (already parsed by YAML, or a string from the command line) to ``tp``."""
    optional, inner = _is_optional(tp)
    if isinstance(value, str) and inner is not str:
        value = yaml.safe_load(value) if value.strip() else None
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{key} needs a value. Received: {key}=None")
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if inner is str:
            return str(value)
        if origin is list:
            (item_tp,) = typing.get_args(inner)
            items = value if isinstance(value, (list, tuple)) else [value]
            return [coerce(key, v, item_tp) for v in items]
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError
            return {str(k): v for k, v in value.items()}
    except (TypeError, ValueError):
        pass
    else:
        return value
    name = getattr(inner, "__name__", str(inner))
    raise ConfigError(f"{key} must be {name}. Received: {key}={value!r}")


def flag_of(key: str) -> str:
    """The ``convlens train`` flag of a configuration key: ``finetune_lr`` -> ``--finetune-lr``."""
    return "--" + key.replace("_", "-")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) mapping of configuration keys."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; check the --config path")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}; fix the syntax") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values. Received: {type(data).__name__}")
    return data


def build(cls: type[T], *layers: dict[str, Any] | None) -> T:
    """Make a ``cls`` from its defaults and then each mapping in ``layers`` in order.

    Each later mapping overrides the earlier ones; unknown keys raise :class:`ConfigError`.
    """
    types_ = field_types(cls)
    values: dict[str, Any] = {}
    for layer in layers:
        for raw_key, value in (layer or {}).items():
            key = str(raw_key).replace("-", "_")
            if key not in types_:
                raise ConfigError(f"unknown configuration key {raw_key!r}.{suggest(key, types_)}")
            values[key] = coerce(key, value, types_[key])
    return cls(**values)


def layer_train_config(preset: str | None = None, config_file: str | Path | None = None,
                       overrides: dict[str, Any] | None = None) -> tuple[TrainConfig, frozenset[str]]:
    """Defaults -> preset -> config file -> overrides, validated; and the keys someone chose (a
    flag or keyword, the config file, or the preset: the rest are defaults, which the recipes
    chosen from the data may replace). The file is read once."""
    file_values = read_config_file(config_file) if config_file else {}
    name = (overrides or {}).get("preset") or file_values.get("preset") or preset or "default"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.{suggest(name, PRESETS)}")
    cfg = build(TrainConfig, RECIPES[name], {"preset": name}, file_values, overrides)
    validate_train_config(cfg)
    chosen = {str(k).replace("-", "_") for k in (*(overrides or {}), *file_values, *RECIPES[name])}
    return cfg, frozenset(chosen)


def resolve_train_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults -> preset -> config file -> overrides, validated (:func:`layer_train_config`)."""
    return layer_train_config(preset, config_file, overrides)[0]


def with_layers(cfg: TrainConfig, *layers: dict[str, Any]) -> TrainConfig:
    """``cfg`` with each mapping of ``layers`` laid over it in order, validated: how the one
    resolution step (convlens.engine.recipe) adds the choices made from the data."""
    out = build(TrainConfig, to_dict(cfg), *layers)
    validate_train_config(out)
    return out


def check_choice(key: str, value: str, options: typing.Sequence[str]) -> str:
    """``value`` when it is one of ``options``; else a :class:`ConfigError` with a did-you-mean."""
    if value not in options:
        raise ConfigError(
            f"{key} must be one of {', '.join(options)}. Received: {key}={value!r}.{suggest(value, options)}"
        )
    return value


def figure_format(out: Path) -> str:
    """matplotlib's format for a figure written to ``out`` (:data:`FIGURE_FORMATS`); else a :class:`ConfigError`."""
    fmt = FIGURE_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ConfigError(f"--out must end in one of {', '.join(FIGURE_FORMATS)}. Received: --out {str(out)!r}")
    return fmt


def check_range(key: str, value: float, ranges: dict[str, tuple[float, float, bool]] = AUGMENT_RANGES) -> float:
    """``value`` as a float when it lies in ``ranges[key]``; else a :class:`ConfigError`."""
    lo, hi, lo_open = ranges[key]
    if not ((lo < value if lo_open else lo <= value) and value <= hi):
        raise ConfigError(f"{key} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}]. Received: {key}={value!r}")
    return float(value)


def check_serve_range(key: str, value: float) -> float:
    """A ``convlens serve`` batching setting in ``SERVE_RANGES`` (``max_batch`` a whole number)."""
    if key == "max_batch" and not float(value).is_integer():
        raise ConfigError(f"max_batch must be a whole number of images. Received: max_batch={value!r}")
    return check_range(key, value, SERVE_RANGES)


def validate_train_config(cfg: TrainConfig) -> None:
    """Check ranges and choices; raise :class:`ConfigError` naming the key."""
    for key, options in (("resize", RESIZE_POLICIES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                         ("class_weights", ("none", "auto")), ("finetune_bn", FINETUNE_BN)):
        check_choice(key, getattr(cfg, key), options)
    for key in AUGMENT_RANGES:
        check_range(key, getattr(cfg, key))
    checks = [
        ("channels", cfg.channels in (0, 1, 3), "0 (auto), 1 or 3"),
        ("val_fraction", 0.0 <= cfg.val_fraction < 1.0, "in [0, 1)"),
        ("test_fraction", 0.0 <= cfg.test_fraction < 1.0 and cfg.val_fraction + cfg.test_fraction < 1.0,
         "in [0, 1) with val_fraction + test_fraction < 1"),
        ("image_size", cfg.image_size >= 8, ">= 8"),
        ("epochs", cfg.epochs >= 1, ">= 1"),
        ("batch_size", cfg.batch_size >= 1, ">= 1"),
        ("lr", cfg.lr > 0, "> 0"),
        ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
        ("label_smoothing", 0 <= cfg.label_smoothing < 1, "in [0, 1)"),
        ("scale", cfg.scale > 0, "> 0"),
        ("max_pixels", cfg.max_pixels > 0, "> 0"),
        ("min_side", cfg.min_side >= 1, ">= 1"),
        ("nproc", cfg.nproc >= 1, ">= 1"),
        ("patience", cfg.patience >= 0, ">= 0"),
        ("warmup_epochs", cfg.warmup_epochs >= 0, ">= 0"),
        ("finetune_epochs", cfg.finetune_epochs >= 0, ">= 0"),
        ("finetune_lr", cfg.finetune_lr > 0, "> 0"),
        ("finetune_units", 0 < cfg.finetune_units <= 1, "in (0, 1]"),
        ("finetune_lr_decay", 0 < cfg.finetune_lr_decay <= 1, "in (0, 1]"),
        ("finetune_warmup", cfg.finetune_warmup >= 0, ">= 0"),
        ("finetune_patience", cfg.finetune_patience >= 0, ">= 0"),
        ("finetune_crop_scale", 0 < cfg.finetune_crop_scale <= 1, "in (0, 1]"),
        ("crop_margin", 0 <= cfg.crop_margin <= 1, "in [0, 1]"),
        ("val_every", cfg.val_every >= 1, ">= 1"),
        ("progressive", 0 <= cfg.progressive < 1, "in [0, 1)"),
        ("ema_decay", 0 < cfg.ema_decay < 1, "in (0, 1)"),
        ("accept", 0 < cfg.accept <= 1, "in (0, 1]"),
    ]
    for key, ok, rule in checks:
        if not ok:
            raise ConfigError(f"{key} must be {rule}. Received: {key}={getattr(cfg, key)!r}")
    if cfg.time is not None:
        parse_duration(cfg.time, "time")
    if len(cfg.mean) not in (1, 3) or len(cfg.std) not in (1, 3) or any(s <= 0 for s in cfg.std):
        raise ConfigError(f"mean and std need 1 or 3 values, std > 0. Received: mean={cfg.mean}, std={cfg.std}")


def parse_duration(text: str, key: str = "time") -> float:
    """``"90s"``, ``"5m"``, ``"1.5h"``, ``"1h30m"`` or a plain number of seconds -> seconds (> 0)."""
    import re

    raw = str(text).strip().lower()
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m(?:in)?)?\s*(?:(\d+(?:\.\d+)?)s?)?", raw)
    if not raw or parts is None or not any(parts.groups()):
        raise ConfigError(f"{key} must be a duration such as 90s, 5m, 1h or 1h30m. Received: {key}={text!r}")
    h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
    seconds = h * 3600 + m * 60 + sec
    if seconds <= 0:
        raise ConfigError(f"{key} must be a positive duration. Received: {key}={text!r}")
    return seconds


def decode_size(cfg: TrainConfig) -> int:
    """The size images are decoded (and cached) at: ``image_size`` plus the crop margin."""
    return int(round(cfg.image_size * (1.0 + cfg.crop_margin)))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    """The configuration as YAML text, keys in declaration order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

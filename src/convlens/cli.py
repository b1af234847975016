"""Command-line interface. Each verb parses its arguments and makes one library call.

Library modules are imported inside the verb, so ``convlens --help`` is instant and the ONNX
prediction path never imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from convlens import __version__
from convlens.config import (
    ENGINES,
    EXPLAIN_METHODS,
    EXPORT_FORMATS,
    PRESETS,
    RECIPES,
    SERVE_DEFAULTS,
    TrainConfig,
    field_types,
    flag_of,
    suggest,
)
from convlens.errors import UserError

EPILOG = "Docs: README.md. Add --debug before the verb to see tracebacks."


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and "did you mean" suggestions for unknown flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No silent prefix matching: `--epoch` must not quietly mean `--epochs`.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if "unrecognized arguments:" in message:
            bad = message.split(":", 1)[1].split()
            known = [s for a in self._actions for s in a.option_strings]
            hints = [suggest(b.split("=")[0], known).strip() for b in bad if b.startswith("-")]
            hint = " ".join(h for h in hints if h)
            message = f"{message}.{(' ' + hint) if hint else ''} See `{self.prog} --help`"
        else:
            message = f"{message}. See `{self.prog} --help`"
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        # Train flags state their preset default themselves (their argparse default is None).
        if action.help and "(default:" in action.help:
            return action.help
        return super()._get_help_string(action)


def _add_device(s: argparse.ArgumentParser) -> None:
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")


def _add_runtime(s: argparse.ArgumentParser, batch_size: int) -> None:
    """How evaluate and predict run a model: --batch-size, --device, --precision, --engine."""
    s.add_argument("--batch-size", type=int, default=batch_size, help="batch size")
    _add_device(s)
    s.add_argument("--precision", default="auto", metavar="{auto,bf16,fp32}",
                   help="auto: bf16 where the CPU or GPU computes it natively (AVX512-BF16/AMX), else fp32")
    _add_engine(s)


def _add_engine(s: argparse.ArgumentParser) -> None:
    s.add_argument("--engine", default="auto", metavar="{" + ",".join(ENGINES) + "}",
                   help="auto: onnxruntime for a bundle predicting in fp32 on a CPU (exported and verified "
                        "once, cached), else torch")


# ----------------------------------------------------------------------------- verbs
def _cmd_summary(a: argparse.Namespace) -> int:
    from convlens.models.summary import print_model_list, print_summary

    if a.list:
        print_model_list()
        return 0
    if not a.model:
        raise UserError("summary needs a MODEL (a registered name or a layer file); "
                        "see `convlens summary --list`")
    print_summary(a.model, input_shape=a.input, num_classes=a.classes)
    return 0


def _cmd_check(a: argparse.Namespace) -> int:
    from convlens.data.check import run_check

    return run_check(
        a.dir, json_path=a.json, quarantine_dir=a.quarantine, undo=a.undo, workers=a.workers,
        max_pixels=a.max_pixels, min_side=a.min_side, near_duplicates=a.near_duplicates,
    )


def _cmd_preview(a: argparse.Namespace) -> int:
    from convlens.data.preview import write_preview

    write_preview(a.dir, a.out, augment=a.augment, seed=a.seed, image_size=a.image_size,
                  rotation=a.rotation, flip=a.flip)
    return 0


def _train_overrides(a: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(a).items() if k in names and v is not None}


def _cmd_train(a: argparse.Namespace) -> int:
    from convlens.engine.training import train_command

    return train_command(_train_overrides(a), config_file=a.config, resume=a.resume)


def _cmd_lr_find(a: argparse.Namespace) -> int:
    from convlens.engine.lr_find import lr_find_command

    return lr_find_command(_train_overrides(a), config_file=a.config, out=a.out)


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from convlens.evaluate import evaluate_command

    return evaluate_command(a.bundle, a.dir, out=a.out, batch_size=a.batch_size, device=a.device,
                            precision=a.precision, engine=a.engine)


def _cmd_predict(a: argparse.Namespace) -> int:
    from convlens.infer.commands import predict_command

    return predict_command(a.model, a.paths, top_k=a.top_k, tta="crops" if a.tta_crops else a.tta,
                           threshold=a.threshold, out=a.out, batch_size=a.batch_size, device=a.device,
                           precision=a.precision, reject=not a.no_reject, novelty_threshold=a.novelty_threshold,
                           neighbours=a.neighbours, engine=a.engine)


def _cmd_explain(a: argparse.Namespace) -> int:
    from convlens.infer.commands import explain_command

    return explain_command(a.bundle, a.paths, out=a.out, method=a.method, class_name=a.class_name,
                           device=a.device)


def _cmd_inspect(a: argparse.Namespace) -> int:
    from convlens.learn.layer_page import inspect_command

    return inspect_command(a.model, a.image, out=a.out, max_maps=a.max_maps, image_size=a.image_size)


def _cmd_demo_layer(a: argparse.Namespace) -> int:
    from convlens.learn.demo_layer import demo_layer_command

    return demo_layer_command(a.kind, a.image, a.out, size=a.size, compare=a.compare, seed=a.seed,
                              kernel=a.kernel, stride=a.stride, padding=a.padding, filters=a.filters,
                              weights=a.weights, rate=a.rate, factor=a.factor, mode=a.mode)


def _cmd_export(a: argparse.Namespace) -> int:
    from convlens.export import export_command

    return export_command(a.bundle, fmt=a.format, out=a.out, int8=a.int8,
                          calibration=a.calibration, validate=a.validate)


def _cmd_serve(a: argparse.Namespace) -> int:
    from convlens.serve import serve_command

    return serve_command(a.model, host=a.host, port=a.port, workers=a.workers,
                         max_upload_mb=a.max_upload_mb, max_batch=a.max_batch, max_wait_ms=a.max_wait,
                         api_key=a.api_key, api_key_file=a.api_key_file, no_auth=a.no_auth, engine=a.engine)


def _cmd_audit(a: argparse.Namespace) -> int:
    from convlens.audit.command import audit_command

    return audit_command(a.dir, json_path=a.json, html_path=a.html, csv_path=a.csv, backbone=a.backbone,
                         folds=a.folds, similarity=a.similarity, cache_dir=a.cache_dir, workers=a.workers,
                         top=a.top, quarantine_dir=a.quarantine, kinds=a.kinds, paths=a.paths,
                         relabel=a.relabel, undo=a.undo)


def _cmd_runs(a: argparse.Namespace) -> int:
    from convlens.engine.runs import runs_command

    return runs_command(a.dir, json_path=a.json)


def _cmd_compare(a: argparse.Namespace) -> int:
    from convlens.engine.runs import compare_command

    return compare_command(a.runs, out=a.out)


# ----------------------------------------------------------------------------- parsers
def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; the help shows the default preset's value."""
    defaults = TrainConfig(**RECIPES["default"])
    types_ = field_types(TrainConfig)
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="YAML file of configuration keys (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "data":
            continue
        tp = types_[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "default": None,
                                  "help": f"{f.metadata.get('help', '')} (default: {getattr(defaults, f.name)})"}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            kwargs.update(nargs="+", type=float, metavar="X")
        elif f.name == "preset":
            kwargs["choices"] = list(PRESETS)
        else:
            kwargs["metavar"] = f.name.upper()
        p.add_argument(flag_of(f.name), **kwargs)


def _verb(name: str, help_: str, run: Callable[[argparse.Namespace], int]
          ) -> Callable[[Callable[[argparse.ArgumentParser], None]], Callable[[argparse.ArgumentParser], None]]:
    """Register a verb: the decorated function adds its arguments; ``run`` makes the one library call."""

    def register(add_arguments: Callable[[argparse.ArgumentParser], None]) -> Callable[[argparse.ArgumentParser], None]:
        VERBS.append((name, help_, add_arguments, run))
        return add_arguments

    return register


# (name, help, add_arguments, run) in --help order; a new verb is one `_cmd_x` plus one `@_verb` function.
VERBS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = []


@_verb("summary", "print a model's layers, output shapes, parameters and FLOPs", _cmd_summary)
def _summary_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("model", nargs="?", help="registry name (see `convlens summary --list`) or a YAML/JSON layer file")
    s.add_argument("--list", action="store_true", help="list the registered models and exit")
    s.add_argument("--input", default="300x300x3", help="input size HxWxC")
    s.add_argument("--classes", type=int, default=2, help="number of classes")


@_verb("check", "decode every image of a dataset folder and report problems", _cmd_check)
def _check_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("dir", nargs="?", help="dataset folder (DIR/<class>/... or DIR/train|val/<class>/...)")
    s.add_argument("--json", metavar="REPORT.json", default=None, help="also write the report as JSON")
    s.add_argument("--quarantine", metavar="QDIR", default=None, help="move unusable files into QDIR (undo with --undo)")
    s.add_argument("--undo", metavar="MANIFEST", default=None, help="move quarantined files back")
    s.add_argument("--workers", type=int, default=0, help="decoding processes (0 = all cores)")
    s.add_argument("--max-pixels", type=int, default=89_478_485, help="pixel limit (decompression bombs)")
    s.add_argument("--min-side", type=int, default=8, help="smallest usable image side")
    s.add_argument("--near-duplicates", action="store_true", help="also find near duplicates (perceptual hash)")


@_verb("audit", "find likely label errors, near duplicates and outliers with pretrained features", _cmd_audit)
def _audit_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("dir", nargs="?", help="dataset folder (DIR/<class>/... or DIR/train|val/<class>/...)")
    s.add_argument("--json", metavar="REPORT.json", default=None, help="also write every finding as JSON")
    s.add_argument("--html", metavar="AUDIT.html", default=None, help="offline page with thumbnails per finding")
    s.add_argument("--csv", metavar="FINDINGS.csv", default=None,
                   help="one row per flagged image; edit it, then --relabel it or --quarantine --paths it")
    s.add_argument("--backbone", default=None, help="pretrained backbone NAME or weight file (default: efficientnet_lite0)")
    s.add_argument("--folds", type=int, default=None, help="cross-validation folds for out-of-sample probabilities (default: 5)")
    s.add_argument("--similarity", type=float, default=None,
                   help="feature cosine similarity of near duplicates (default: 0.92)")
    s.add_argument("--top", type=int, default=10, help="rows shown per finding in the terminal")
    s.add_argument("--cache-dir", default=None, help="decode and feature cache folder (default: user cache dir)")
    s.add_argument("--workers", type=int, default=0, help="decoding processes (0 = all cores)")
    s.add_argument("--quarantine", metavar="QDIR", default=None, help="move chosen findings into QDIR (undo with --undo)")
    s.add_argument("--kinds", metavar="KIND,...", default=None, help="with --quarantine: label, duplicate, outlier or all")
    s.add_argument("--paths", metavar="FILE.csv", default=None, help="with --quarantine: move the files in its path column")
    s.add_argument("--relabel", metavar="FILE.csv", default=None,
                   help="move each file (path column) into its new_class folder; writes an undo manifest")
    s.add_argument("--undo", metavar="MANIFEST", default=None, help="move quarantined or relabelled files back")


@_verb("preview", "write a 3x3 grid of training images (or of augmentations of one)", _cmd_preview)
def _preview_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("dir", help="dataset folder")
    s.add_argument("--out", default="grid.png", help="output PNG")
    s.add_argument("--augment", action="store_true", help="9 augmented versions of one image")
    s.add_argument("--seed", type=int, default=1337, help="random seed")
    s.add_argument("--image-size", type=int, default=300, help="image size in pixels")
    s.add_argument("--rotation", type=float, default=0.1, help="rotation fraction for --augment")
    s.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="flip for --augment")


@_verb("train", "check, split, cache, train, evaluate and report, in one command", _cmd_train)
def _train_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("data", nargs="?", default=None, help="dataset folder (default: the embedded digits)")
    s.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue a run from its last checkpoint")
    _add_train_flags(s)


@_verb("runs", "list the run folders: name, date, model, data, best validation accuracy, time", _cmd_runs)
def _runs_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("dir", nargs="?", default="runs", help="folder that holds the run folders")
    s.add_argument("--json", metavar="RUNS.json", default=None, help="also write the list as JSON")


@_verb("compare", "draw runs' curves together and show their configuration differences", _cmd_compare)
def _compare_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("runs", nargs="+", metavar="RUN", help="run folders (two or more)")
    s.add_argument("--out", default="compare", help="output folder (compare.png, compare.html)")


@_verb("lr-find", "plot loss against learning rate and suggest one", _cmd_lr_find)
def _lr_find_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("data", nargs="?", default=None, help="dataset folder (default: the embedded digits)")
    s.add_argument("--out", default="lr_find.png", help="output plot")
    _add_train_flags(s)


@_verb("evaluate", "evaluate a model bundle on a labelled folder", _cmd_evaluate)
def _evaluate_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("bundle", help="model bundle (model.convlens)")
    s.add_argument("dir", help="labelled dataset folder")
    s.add_argument("--out", default=None, help="output folder (default: eval/ beside the bundle)")
    _add_runtime(s, batch_size=64)


@_verb("predict", "classify images with a bundle or an ONNX model", _cmd_predict)
def _predict_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("model", help="model bundle (model.convlens) or model.onnx")
    s.add_argument("paths", nargs="+", help="image files, folders (recursive) or globs")
    s.add_argument("--top-k", type=int, default=1, help="classes to show per image")
    s.add_argument("--tta", action="store_true", help="average over horizontal flips")
    s.add_argument("--tta-crops", action="store_true",
                   help="average over the flip, 4 corner crops and the centre crop (12 views)")
    s.add_argument("--threshold", type=float, default=None, help="decision threshold for two-class models")
    s.add_argument("--no-reject", action="store_true",
                   help="never label an image unknown (its novelty score is still given)")
    s.add_argument("--novelty-threshold", type=float, default=None, metavar="X",
                   help="label images with a novelty above X unknown (default: the cut-off chosen at training)")
    s.add_argument("--neighbours", type=int, default=0, metavar="K",
                   help="list each image's K most similar training images (a .convlens bundle)")
    s.add_argument("--out", default=None, help="write every probability to preds.csv or preds.json")
    _add_runtime(s, batch_size=32)


@_verb("explain", "draw class activation maps for images", _cmd_explain)
def _explain_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("bundle", help="model bundle (model.convlens)")
    s.add_argument("paths", nargs="+", help="image files, folders or globs")
    s.add_argument("--out", default="explain", help="output folder")
    s.add_argument("--method", default="cam", choices=EXPLAIN_METHODS, help="map method")
    s.add_argument("--class", dest="class_name", default=None, help="class to explain (default: predicted)")
    _add_device(s)


@_verb("inspect", "show every layer's output shape and feature maps for one image (HTML page)", _cmd_inspect)
def _inspect_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("model", help="model bundle (model.convlens), registry name or YAML/JSON layer file "
                                 "(random weights)")
    s.add_argument("image", help="image file")
    s.add_argument("--out", default="inspect", help="output folder (inspect.html, inspect.json)")
    s.add_argument("--max-maps", type=int, default=16, help="feature maps shown per layer")
    s.add_argument("--image-size", type=int, default=None,
                   help="input size for a MODEL (default: 128; a bundle uses its own preprocessing)")


@_verb("demo-layer", "apply one building block to a photo and draw input beside output", _cmd_demo_layer)
def _demo_layer_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("kind", metavar="KIND", help="conv | max_pool | avg_pool | relu | dropout | batch_norm | "
                                                "upsample | conv_transpose")
    s.add_argument("image", help="image file")
    s.add_argument("--out", default="demo.png", help="output figure (.png, .jpg, .svg, .pdf, .webp)")
    s.add_argument("--kernel", type=int, default=None, help="kernel / pool size (default: 3; 2 for pools)")
    s.add_argument("--stride", type=int, default=None,
                   help="stride (default: 1; the pool size for pools; 2 for conv_transpose)")
    s.add_argument("--padding", default=None, help="valid | same (default: valid; same for relu, conv_transpose)")
    s.add_argument("--filters", type=int, default=None, help="conv filters, with --weights random (default: 1)")
    s.add_argument("--weights", default=None, help="sobel-x | sobel-y | sharpen | box | edge | emboss | random "
                                                   "(default: sobel-x, or box when --kernel is not 3; box for conv_transpose)")
    s.add_argument("--rate", type=float, default=None, help="dropout rate (default: 0.5)")
    s.add_argument("--factor", type=int, default=None, help="upsampling factor (default: 2)")
    s.add_argument("--mode", default=None, help="upsampling: nearest | bilinear (default: nearest)")
    s.add_argument("--compare", metavar="KIND|KEY=VALUE", default=None,
                   help="draw a second variant: another KIND (avg_pool, conv_transpose) or overrides "
                        "like padding=same or stride=2,kernel=5 (default: none)")
    s.add_argument("--size", type=int, default=None,
                   help="square input side in pixels, centre-cropped (default: 300; 64 for upsample, conv_transpose)")
    s.add_argument("--seed", type=int, default=0, help="seed for random weights and dropout")


@_verb("export", "export a bundle to ONNX or TorchScript", _cmd_export)
def _export_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("bundle", help="model bundle (model.convlens)")
    s.add_argument("--format", default="onnx", choices=EXPORT_FORMATS, help="export format")
    s.add_argument("--out", default=None, help="output file (default: beside the bundle)")
    s.add_argument("--int8", action="store_true", help="post-training static int8 quantisation (ONNX)")
    s.add_argument("--calibration", metavar="DIR", default=None, help="images for int8 calibration")
    s.add_argument("--validate", metavar="DIR", default=None, help="labelled folder to report the accuracy change")


@_verb("serve", "serve a model over HTTP with a small web page", _cmd_serve)
def _serve_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("model", help="model bundle (model.convlens) or model.onnx")
    s.add_argument("--host", default="127.0.0.1", help="address to bind")
    s.add_argument("--port", type=int, default=8000, help="port")
    s.add_argument("--workers", type=int, default=1, help="worker processes")
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload")
    s.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="most images per model batch: concurrent /predict requests are answered by one "
                        f"batch (1 = no batching; default {SERVE_DEFAULTS['max_batch']})")
    s.add_argument("--max-wait", type=float, default=None, metavar="MS",
                   help="longest wait for more images to fill a batch, in milliseconds "
                        f"(default {SERVE_DEFAULTS['max_wait']:g})")
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health and the page "
                        "(default: $CONVLENS_API_KEY)")
    s.add_argument("--api-key-file", default=None, metavar="FILE", help="accepted API keys, one per line")
    s.add_argument("--no-auth", action="store_true",
                   help="serve a non-loopback --host without an API key (refused otherwise)")
    _add_engine(s)


def build_parser() -> argparse.ArgumentParser:
    """The whole command-line grammar."""
    p = _Parser(prog="convlens", description=__doc__.splitlines()[0] if __doc__ else None,
                formatter_class=_Formatter, epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"convlens {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    p.set_defaults(_verbs=sub.choices)
    for name, help_, add_arguments, run in VERBS:
        s = sub.add_parser(name, help=help_, description=help_, formatter_class=_Formatter, epilog=EPILOG)
        add_arguments(s)
        s.set_defaults(func=run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``convlens`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Let the verb's own parser report it, with its name and its flags to suggest from.
        verb_parser = args._verbs.get(args.verb, parser) if args.verb else parser
        verb_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args) or 0)
    except UserError as e:
        if args.debug:
            raise
        print(f"convlens {args.verb}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"convlens {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

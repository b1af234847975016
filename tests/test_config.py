"""Configuration flow: defaults -> preset -> file -> flags, typed, unknown keys rejected."""

from __future__ import annotations

import pytest
import yaml

from convlens.config import (
    PRESETS,
    TrainConfig,
    build,
    dump_yaml,
    resolve_train_config,
)
from convlens.errors import ConfigError


def test_defaults_are_the_default_preset() -> None:
    cfg = resolve_train_config()
    assert cfg.preset == "default"
    assert cfg.seed == 1337 and cfg.val_fraction == 0.2


def test_tutorial_preset_is_the_tutorial_recipe() -> None:
    cfg = resolve_train_config("tutorial")
    assert (cfg.model, cfg.image_size, cfg.batch_size, cfg.epochs) == ("tutorial_cnn", 300, 128, 25)
    assert (cfg.optimizer, cfg.lr, cfg.schedule) == ("rmsprop", 1e-3, "constant")
    assert cfg.flip and cfg.rotation == 0.1
    assert cfg.scale == 1.0  # the tutorial trains on 0-255 inputs; the bundle records it
    assert cfg.mixup == 0.0 and resolve_train_config("quick").mixup == 0.0  # the from-scratch default's mixup is not theirs
    assert resolve_train_config().mixup == 0.2


def test_file_overrides_preset_and_flags_override_file(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("preset: tutorial\nepochs: 3\nlr: 0.01\nflip: false\n")
    cfg = resolve_train_config(None, f, {"lr": "0.5", "mean": ["0.5", "0.5", "0.5"]})
    assert cfg.model == "tutorial_cnn"  # from the preset named in the file
    assert cfg.epochs == 3 and cfg.flip is False  # from the file
    assert cfg.lr == 0.5  # flag wins, parsed from text
    assert cfg.mean == [0.5, 0.5, 0.5]


def test_unknown_key_suggests_the_closest(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="unknown configuration key 'learning_rat'"):
        resolve_train_config(None, f)
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        resolve_train_config(None, None, {"epoch": 3})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("epochs", "three", "epochs must be int. Received: epochs='three'"),
        ("epochs", 2.5, "epochs must be int"),
        ("flip", "maybe", "flip must be bool"),
        ("optimizer", "adamx", "Did you mean 'adam'"),
        ("resize", "stretch", "resize must be one of squash, crop, pad"),
        ("val_fraction", 1.5, "val_fraction must be in"),
        ("channels", 2, "channels must be 0"),
        ("preset", "tutorail", "Did you mean 'tutorial'"),
    ],
)
def test_bad_values_name_the_key(key, value, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_train_config(None, None, {key: value})


def test_yaml_is_parsed_safely_never_evaluated(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("lr: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_train_config(None, f)
    with pytest.raises(ConfigError, match="lr must be float"):
        resolve_train_config(None, None, {"lr": "__import__('os')"})


def test_config_file_errors_are_clear(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_train_config(None, tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        resolve_train_config(None, bad)


def test_resolved_config_round_trips_through_yaml() -> None:
    cfg = resolve_train_config("tutorial", None, {"epochs": 2})
    again = build(TrainConfig, yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_every_preset_resolves() -> None:
    for name in PRESETS:
        assert resolve_train_config(name).preset == name


def test_model_args_from_flag_text_and_file(tmp_path) -> None:
    cfg = resolve_train_config(None, None, {"model": "mini_xception", "model_args": "{width: 0.25}"})
    assert cfg.model_args == {"width": 0.25}
    f = tmp_path / "c.yaml"
    f.write_text("model: resnet8\nmodel_args: {widths: [16, 32, 64]}\n")
    assert resolve_train_config(None, f).model_args == {"widths": [16, 32, 64]}
    with pytest.raises(ConfigError, match="model_args must be dict"):
        resolve_train_config(None, None, {"model_args": "[1, 2]"})


def test_model_args_reach_the_model() -> None:
    from convlens.engine.factory import make_model
    from convlens.errors import SpecError

    narrow = make_model("resnet8", 2, 3, 32, {"widths": [8, 16, 32], "stem_width": 8})
    assert narrow.head.fc.in_features == 32
    with pytest.raises(SpecError, match="Did you mean 'width'"):
        make_model("mini_xception", 2, 3, 32, {"widht": 0.5})

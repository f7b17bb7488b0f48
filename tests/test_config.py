"""Every config option composes and validates; bad overrides name the full key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

from engine.config import CONFIG_DIR, ConfigError, bundled_minilm_path, validate
from tests.conftest import PYTHON, ROOT, subprocess_env

GROUPS = {
    name: sorted(p.stem for p in (Path(CONFIG_DIR) / name).glob("*.yaml"))
    for name in ("model", "data", "optim", "trainer", "loss", "backend")
}
_FILES = ["data.train_file=a.csv", "data.validation_file=b.csv", "data.text_column=text"]
NEEDS = {"data=csv": _FILES, "data=local": _FILES, "model=local": ["model.source=/models/any"]}


def _compose(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("override", [f"{group}={option}" for group, options in GROUPS.items() for option in options])
def test_every_group_option_composes_and_validates(override):
    cfg = _compose(override, *NEEDS.get(override, []))
    typed = validate(cfg)
    group, option = override.split("=")
    if group == "model":
        assert typed.model.name == option
    assert typed.trainer.epochs >= 1


def test_defaults_are_bundled_minilm_on_mrpc():
    typed = validate(_compose())
    assert typed.model.source == bundled_minilm_path()
    assert Path(typed.model.source, "config.json").is_file()
    assert typed.data.label_names == ["not_equivalent", "equivalent"]
    assert Path(typed.data.train_file).is_file()
    assert typed.backend.name.value == "auto"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=abc", "optim.lr"),
        ("trainer.epochs=three", "trainer.epochs"),
        ("trainer.epoch=3", "trainer.epoch"),
        ("+model.colour=red", "model.colour"),
        ("trainer.mixed_precision=fp8", "trainer.mixed_precision"),
    ],
)
def test_bad_override_names_the_key(override, key):
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException, ConfigError)) as info:
        validate(_compose(override))
    text = str(info.value) + str(info.value.__cause__ or "")
    assert key in text


def test_missing_required_value_names_the_key():
    with pytest.raises(ConfigError) as info:
        validate(_compose("data=csv"))
    assert "missing required value data.text_column" in str(info.value)
    with pytest.raises(ConfigError) as info:
        validate(_compose("data=csv", "data.text_column=text"))
    assert "data.train_file is required" in str(info.value)
    assert "data.validation_file is required" in str(info.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.epochs=-1", "trainer.epochs must be >= 1, got -1"),
        ("optim.lr=0", "optim.lr must be > 0"),
        ("optim.warmup_ratio=1.5", "optim.warmup_ratio must be in [0, 1)"),
        ("loss.class_weights=[1,-2]", "loss.class_weights must be"),
        ("data.quoting=double", "data.quoting must be"),
    ],
)
def test_cross_field_rules(override, message):
    with pytest.raises(ConfigError) as info:
        validate(_compose(override))
    assert message in str(info.value)


def test_cli_bad_override_exits_fast_with_the_key(tmp_path):
    result = subprocess.run(
        [PYTHON, str(ROOT / "train.py"), "optim.lr=abc", f"hydra.run.dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert result.returncode != 0
    assert "optim.lr" in result.stderr and "abc" in result.stderr
    assert not (tmp_path / "run" / "best_acc_classify.pth").exists()


def test_cli_rule_violation_is_one_clear_line(tmp_path):
    result = subprocess.run(
        [PYTHON, str(ROOT / "train.py"), "trainer.epochs=-1", f"hydra.run.dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert result.returncode == 2
    assert "trainer.epochs must be >= 1, got -1" in result.stderr
    assert "Traceback" not in result.stderr

"""blockmarket.core.config as the convert command meets it: every error names the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockmarket.core.config import Config, ConfigError, load_config
from tests.support.checkpoints import REPO, write_config


def test_repository_config_loads_and_matches_the_defaults() -> None:
    assert load_config(REPO / "config.yaml").conversion == Config().conversion


def test_wrong_type_names_key_and_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", conversion={"validation_samples": "many"})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: conversion.validation_samples:")


def test_int_is_accepted_for_a_float_but_a_string_is_not(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path / "ok.yaml", conversion={"atol": 1})).conversion.atol == 1.0
    with pytest.raises(ConfigError, match=r"conversion\.atol"):
        load_config(write_config(tmp_path / "bad.yaml", conversion={"atol": "1e-5"}))


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", conversion={"opset": 17})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(
        f"{path}: conversion.opset: unknown key (did you mean opset_version?)"
    )


def test_unreadable_or_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("conversion: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(broken)

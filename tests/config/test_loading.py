"""Typed configuration: presets, overrides, strict keys and types, and the saved resolved config."""

import pytest
import yaml

from soco.config.loading import config_to_dict, list_presets, load_config, parse_override, save_config
from soco.config.schema import Config
from soco.errors import ConfigError


def test_defaults_and_default_preset_agree():
    assert load_config("default") == Config()
    assert "default" in list_presets()


def test_overrides_are_typed_and_applied_in_order():
    config = load_config("default", ["proposals.workers=3", "proposals.min_side=16", "proposals.workers=5"])
    assert config.proposals.workers == 5
    assert config.proposals.min_side == 16.0 and isinstance(config.proposals.min_side, float)
    assert config.proposals.algorithm == "fast"


def test_override_values_parse_as_yaml_scalars():
    assert parse_override("data.images=/tmp/x=y") == (["data", "images"], "/tmp/x=y")
    assert parse_override("proposals.max_aspect=2.5") == (["proposals", "max_aspect"], 2.5)


def test_unknown_key_names_the_key_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'proposals.algoritm'.*did you mean 'proposals.algorithm'"):
        load_config("default", ["proposals.algoritm=reference"])
    with pytest.raises(ConfigError, match=r"unknown key 'proposal'.*did you mean 'proposals'"):
        load_config("default", ["proposal.workers=2"])
    with pytest.raises(ConfigError, match=r"unknown key 'workers'.*did you mean 'proposals.workers'"):
        load_config("default", ["workers=2"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("proposals.workers=two", r"proposals.workers: expected an integer, got str 'two'"),
        ("proposals.workers=2.5", r"proposals.workers: expected an integer"),
        ("proposals.min_side=true", r"proposals.min_side: expected a number"),
        ("proposals.algorithm=3", r"proposals.algorithm: expected a string"),
    ],
)
def test_wrong_type_is_an_error_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", [override])


def test_malformed_override_and_unknown_preset():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("default", ["proposals.workers"])
    with pytest.raises(ConfigError, match=r"unknown preset 'defualt'.*did you mean 'default'"):
        load_config("defualt")


def test_yaml_file_with_base_preset_and_typo(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("base: default\nproposals:\n  workers: 7\n")
    assert load_config(str(good)).proposals.workers == 7
    bad = tmp_path / "bad.yaml"
    bad.write_text("proposals:\n  chunk_szie: 7\n")
    with pytest.raises(ConfigError, match="did you mean 'proposals.chunk_size'"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_saved_config_round_trips(tmp_path):
    config = load_config("default", ["proposals.workers=4", "data.images=/data/x"])
    path = save_config(config, tmp_path / "run" / "config.yaml")
    saved = yaml.safe_load(path.read_text())
    assert saved == config_to_dict(config)
    assert load_config(str(path)) == config

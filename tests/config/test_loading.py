"""Typed configuration: presets, overrides, strict keys and types, and the saved resolved config."""

import pytest
import yaml

from soco.config.loading import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    list_presets,
    load_config,
    parse_override,
    save_config,
)
from soco.config.schema import Config, OptimConfig, TrainConfig
from soco.errors import ConfigError
from soco.methods.soco import SoCoConfig


def test_defaults_and_default_preset_agree():
    default = load_config("default")
    assert default == config_from_dict({})
    schema = Config()
    for section in ("data", "proposals", "optim", "train"):
        assert getattr(default, section) == getattr(schema, section)
    assert default.method == SoCoConfig()  # no method named: SoCo, with its own defaults
    assert "default" in list_presets()


def test_method_section_is_the_named_methods_own_and_strict():
    config = load_config("soco_tiny", ["method.views.v1_size=80", "method.ema_base=0.98"])
    assert isinstance(config.method, SoCoConfig)
    assert config.method.views.v1_size == 80 and config.method.ema_base == 0.98
    with pytest.raises(ConfigError, match=r"unknown method 'scoo'; did you mean 'soco'"):
        load_config("default", ["method.name=scoo"])
    with pytest.raises(ConfigError, match=r"unknown key 'method.views.v1_sise'.*did you mean 'method.views.v1_size'"):
        load_config("default", ["method.views.v1_sise=96"])
    # a key given without the method section, as older soco versions spelled it
    with pytest.raises(ConfigError, match=r"unknown key 'views'.*did you mean 'method.views'"):
        load_config("default", ["views.v1_size=96"])
    with pytest.raises(ConfigError, match=r"unknown key 'v1_size'.*did you mean 'method.views.v1_size'"):
        load_config("default", ["v1_size=96"])


def test_apply_overrides_works_on_any_config_dataclass():
    train = apply_overrides(TrainConfig(), ["train.steps=7", "seed=3"], prefix="train")
    assert train.steps == 7 and train.seed == 3 and train.batch_size == TrainConfig().batch_size
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lr_base'.*did you mean 'optim.base_lr'"):
        apply_overrides(OptimConfig(), ["lr_base=0.3"], prefix="optim")
    with pytest.raises(ConfigError, match=r"optim.momentum: expected a number"):
        apply_overrides(OptimConfig(), ["momentum=fast"], prefix="optim")


def test_overrides_are_typed_and_applied_in_order():
    config = load_config("default", ["proposals.workers=3", "proposals.min_side=16", "proposals.workers=5"])
    assert config.proposals.workers == 5
    assert config.proposals.min_side == 16.0 and isinstance(config.proposals.min_side, float)
    assert config.proposals.algorithm == "release"


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
    bad.write_text("proposals:\n  min_sied: 7\n")
    with pytest.raises(ConfigError, match="did you mean 'proposals.min_side'"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_saved_config_round_trips(tmp_path):
    config = load_config("default", ["proposals.workers=4", "data.images=/data/x"])
    path = save_config(config, tmp_path / "run" / "config.yaml")
    saved = yaml.safe_load(path.read_text())
    assert saved == config_to_dict(config)
    assert load_config(str(path)) == config


def test_a_method_s_own_preset_folder_is_searched_after_the_package(tmp_path, monkeypatch):
    from soco import registry
    from soco.config.loading import every_preset
    from soco.declarations import MethodPresets

    registry.method_names()  # the built-ins first: the registry put back after the test holds them
    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))
    (tmp_path / "mine_small.yaml").write_text("base: soco_tiny\ntrain: {steps: 3}\n")
    (tmp_path / "soco_tiny.yaml").write_text("train: {steps: 99}\n")  # the package's name: the package's preset

    class Mine:
        name = "mine"
        presets = MethodPresets(tiny="mine_small", small="mine_small", r50="mine_small", folder=tmp_path)

    registry.register_method(Mine)
    assert load_config("mine_small").train.steps == 3 and load_config("soco_tiny").train.steps == 4
    assert every_preset() == [*list_presets(), "mine_small"]
    with pytest.raises(ConfigError, match=r"unknown preset 'mine_smal'; did you mean 'mine_small'"):
        load_config("mine_smal")


def test_a_relative_base_file_is_read_from_the_folder_of_the_file_that_names_it(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    (folder / "shared").mkdir(parents=True)
    (folder / "shared" / "common.yaml").write_text("base: soco_tiny\nproposals:\n  workers: 5\n")
    (folder / "mine.yaml").write_text("base: shared/common.yaml\ntrain:\n  steps: 3\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working folder holds no shared/common.yaml
    config = load_config(str(folder / "mine.yaml"))
    assert (config.proposals.workers, config.train.steps, config.method.name) == (5, 3, "soco")


def test_a_key_given_twice_in_a_yaml_file_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("base: soco_tiny\ntrain:\n  steps: 3\n  batch_size: 2\n  steps: 5\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: not valid YAML: .*the key 'steps' is given twice "
                                          r"\(lines 3 and 5\)"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="the key 'a' is given twice"):
        load_config("soco_tiny", ["train.steps={a: 1, a: 2}"])

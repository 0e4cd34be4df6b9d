"""Every value of every configuration key is checked before anything is built or written, one line per problem."""

import dataclasses
import typing

import pytest
import torch

from soco.cli import bench_command, pretrain_command  # noqa: F401 - bench binds resolve_data before it is patched
from soco.cli.main import main
from soco.config import schema
from soco.config.loading import all_keys, load_config, parse_override, with_flags
from soco.config.schema import Config, TrainConfig
from soco.config.validation import (
    SHARED_SECTIONS,
    Each,
    Interval,
    OneOf,
    Range,
    Text,
    at_least,
    config_rules,
    rules_of,
    validate,
)
from soco.errors import ConfigError
from soco.registry import method_class, method_config_class, method_names


def leaf_rules(cls: type, prefix: str) -> dict[str, tuple[typing.Any, typing.Any]]:
    """{dotted key: (its type, its declared rule or None)} of a configuration dataclass and its nested sections."""
    hints = typing.get_type_hints(cls)
    found = {}
    for field in dataclasses.fields(cls):
        key, annotation = f"{prefix}.{field.name}", hints[field.name]
        if dataclasses.is_dataclass(annotation):
            found.update(leaf_rules(annotation, key))
        else:
            found[key] = (annotation, rules_of(cls).get(field.name))
    return found


def schema_keys(method: str) -> dict[str, tuple[typing.Any, typing.Any]]:
    """Every key of a run of `method` with its type and rule, found through the registry and all_keys."""
    found = {}
    for section in SHARED_SECTIONS:
        found.update(leaf_rules(typing.get_type_hints(Config)[section], section))
    found.update(leaf_rules(method_config_class(method), "method"))
    assert sorted(found) == sorted(all_keys(method_config_class(method)))  # the walk misses no key
    return found


def wrong_type(annotation) -> str:
    """An override value of the wrong type for a key of this annotation."""
    if annotation is bool:
        return "maybe"
    if annotation is str:
        return "[1, 2]"
    if typing.get_origin(annotation) is list:
        return "abc"
    return "abc"  # int and float


def _inside(bounds: Range, integer: bool) -> tuple[float, float]:
    """Two increasing values within `bounds`."""
    low = bounds.low if bounds.low is not None else -1
    first = low + (1 if integer else 0.5) if bounds.low_open else low
    return first, first + (1 if integer else 0.25)


def _outside(bounds: Range) -> float:
    """A value just outside `bounds`."""
    if bounds.low is not None:
        return bounds.low if bounds.low_open else bounds.low - 1
    return bounds.high if bounds.high_open else bounds.high + 1


def out_of_range(annotation, rule) -> list[str]:
    """Override values of the right type that the rule must refuse (none for free text and bools)."""
    if isinstance(rule, Range):
        return [repr(_outside(rule))]
    if isinstance(rule, OneOf):
        if all(isinstance(choice, str) for choice in rule.choices):
            return ["not_a_choice"]
        return [repr(max(rule.choices) + 1)]
    if isinstance(rule, Interval):
        integer = typing.get_args(annotation) == (int,)
        first, second = _inside(rule.bounds, integer)
        return [f"[{second}, {first}]", f"[{_outside(rule.bounds)}, {second}]", f"[{first}]"]
    if isinstance(rule, Each):
        if rule.length is not None:
            return ["[" + ", ".join(["1"] * (rule.length + 1)) + "]"]
        return [f"[{_outside(rule.item)}]"]
    return []


def test_every_key_of_every_method_declares_a_rule():
    missing = []
    for method in method_names():
        for key, (annotation, rule) in schema_keys(method).items():
            # method.name is checked by the registry; a bool's type is its whole range
            if rule is None and annotation is not bool and key != "method.name":
                missing.append(key)
    assert missing == []


def test_shared_choices_are_exactly_what_the_engine_accepts():
    from soco.data.proposals.selective_search import ALGORITHM_NAMES
    from soco.engine.distributed import resolve_device
    from soco.engine.optimizers import OPTIMIZERS
    from soco.engine.step import resolve_precision
    from soco.engine.trainer import Schedule, schedule_position

    assert schema.PROPOSAL_ALGORITHMS == ALGORITHM_NAMES and schema.OPTIMIZERS == OPTIMIZERS
    cpu = torch.device("cpu")
    assert [resolve_precision(p, cpu) for p in schema.PRECISIONS[1:3]] == ["fp32", "bf16"]
    assert resolve_precision("auto", cpu) in ("fp32", "bf16") and schema.PRECISIONS[3] == "fp16"
    with pytest.raises(ConfigError):
        resolve_precision("fp8", cpu)
    assert [resolve_device(d).type for d in schema.DEVICES[:2]] == ["cuda" if torch.cuda.is_available() else "cpu",
                                                                   "cpu"]
    schedule = Schedule(4, 4, 12, 0, 1.0, 4)
    assert [schedule_position(5, schedule, c) for c in schema.COSINE_PER] == [5, 4]


@pytest.fixture
def pretrain_stops_after_config(monkeypatch):
    """`soco pretrain` in-process, failing loudly if a configuration passes the checks (nothing is trained)."""
    def accepted(*args, **kwargs):
        raise AssertionError("the configuration was accepted")

    monkeypatch.setattr(pretrain_command, "resolve_data", accepted)


@pytest.mark.slow
@pytest.mark.parametrize("method", method_names())
def test_every_key_refuses_a_wrong_type_and_an_out_of_range_value_before_writing(
        method, tmp_path, capsys, pretrain_stops_after_config):
    out = tmp_path / "run"
    preset = method_class(method).tiny_preset
    checked = refused = 0
    for key, (annotation, rule) in schema_keys(method).items():
        bad_values = [wrong_type(annotation), *out_of_range(annotation, rule)]
        assert len(bad_values) > 1 or rule is None or isinstance(rule, Text), key  # every range is probed
        if key == "method.name":
            bad_values.append("no_such_method")
        for bad in bad_values:
            status = main(["pretrain", "--config", preset, "--out", str(out), "--quiet", f"{key}={bad}"])
            err = capsys.readouterr().err
            assert status == 2, (key, bad)
            assert err.startswith(f"soco: error: {key}: ") and err.count("\n") == 1, (key, bad, err)
            assert list(tmp_path.iterdir()) == [], (key, bad)
            refused += 1
        checked += 1
    assert checked == len(all_keys(method_config_class(method))) and refused > checked


def test_the_values_of_the_issue_are_refused_naming_their_key():
    cases = {
        "train.batch_size=0": "train.batch_size: must be at least 1, not 0",
        "train.steps=-1": "train.steps: must be at least 0, not -1",
        "optim.base_lr=-1": "optim.base_lr: must be greater than 0, not -1",
        "proposals.max_relative_scale=0.2": "proposals.max_relative_scale: must be at least "
                                            "proposals.min_relative_scale (0.3), not 0.2",
        "proposals.workers=-1": "proposals.workers: must be at least 0, not -1",
        "train.precision=fp8": "train.precision: must be one of 'auto', 'fp32', 'bf16', 'fp16', not 'fp8'",
        "train.workers=-2": "train.workers: must be at least -1, not -2",
        "proposals.algorithm=repiared": "did you mean 'repaired'?",
        "optim.nesterov=true": "optim.nesterov: applies to optim.name=sgd only, not lars",
        "method.model.level_thresholds=[96,48,192]": "method.model.level_thresholds: need 3 increasing values",
        "optim.base_lr=.inf": "optim.base_lr: must be greater than 0, not a finite number",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as caught:
            load_config("soco_tiny", [override])
        assert message in str(caught.value) and "\n" not in str(caught.value), override


def test_relations_between_keys_of_each_method_section():
    cases = [
        ("scrl_tiny", ["method.views.min_box_size=64"], "method.views.min_box_size must be in (0, size)"),
        ("insloc_tiny", ["method.views.paste_size=[32,65]"], "method.views.paste_size must be [low, high] with 1 <="),
        ("detco_tiny", ["method.views.patch_size=17"], "method.views.patch_size must be in [1, local_size // 3 = 16]"),
        ("soco_tiny", ["train.precision=fp16", "train.device=cpu"], "train.precision: fp16 needs a GPU"),
        ("insloc_tiny", ["optim.momentum=0"], "optim.nesterov: needs optim.momentum greater than 0"),
    ]
    for preset, overrides, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            load_config(preset, overrides)
    # the edges of each range are allowed
    config = load_config("scrl_tiny", ["method.views.min_box_size=63.5", "proposals.min_relative_scale=0.8",
                                       "optim.warmup_start_factor=0", "train.workers=-1", "train.seed=4294967295"])
    assert config.method.views.min_box_size == 63.5 and config.train.seed == 2**32 - 1


def test_a_config_built_in_python_is_checked_the_same_way():
    from soco.methods.scrl import SCRLConfig

    validate(Config(method=SCRLConfig()))
    with pytest.raises(ConfigError, match=r"^method\.views\.max_overlap: must be in \[0, 1\], not 1\.5$"):
        config = Config(method=SCRLConfig())
        config.method.views.max_overlap = 1.5
        validate(config)
    with pytest.raises(ConfigError, match=r"^train\.accumulate: must be at least 1, not 0$"):
        validate(Config(method=SCRLConfig(), train=TrainConfig(accumulate=0)))


def test_numbers_parse_as_people_write_them():
    assert parse_override("optim.base_lr=1e-4") == (["optim", "base_lr"], 0.0001)
    assert parse_override("optim.base_lr=1e30") == (["optim", "base_lr"], 1e30)
    assert parse_override("optim.base_lr=1E5")[1] == 100000.0 and parse_override("optim.final_lr=-.5")[1] == -0.5
    assert parse_override("optim.base_lr=.5e-3")[1] == 0.0005 and parse_override("train.steps=12")[1] == 12
    assert parse_override("data.images=1e3x")[1] == "1e3x" and parse_override("data.images=e5")[1] == "e5"
    config = load_config("soco_tiny", ["optim.base_lr=1e-4", "optim.weight_decay=1e30", "train.steps=1e3"])
    assert (config.optim.base_lr, config.optim.weight_decay, config.train.steps) == (0.0001, 1e30, 1000)
    assert isinstance(config.train.steps, int)
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer, got float 2.5"):
        load_config("soco_tiny", ["train.steps=2.5"])
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer, got float 1e\+30"):
        load_config("soco_tiny", ["train.steps=1e30"])


def test_numbers_in_a_yaml_file_parse_as_people_write_them(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: soco_tiny\noptim:\n  base_lr: 3e-4\n  final_lr: 1e-7\ntrain:\n  epochs: 2e1\n")
    config = load_config(str(path))
    assert (config.optim.base_lr, config.optim.final_lr, config.train.epochs) == (0.0003, 1e-7, 20.0)


def test_an_empty_or_comment_only_file_is_refused_naming_it(tmp_path):
    for text in ("", "# nothing yet\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"^{path}: the file holds no settings"):
            load_config(str(path))
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_config(str(folder))


def test_a_base_chain_that_loops_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text(f"base: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="the base chain comes back to"):
        load_config(str(tmp_path / "a.yaml"))


def test_a_key_set_by_an_option_and_an_override_names_both():
    flags = [("--steps", "train.steps", 2), ("--seed", "train.seed", None), ("--data", "data.images", "/a: b")]
    assert with_flags(["optim.base_lr=0.5"], flags) == ["optim.base_lr=0.5", "train.steps=2", 'data.images="/a: b"']
    with pytest.raises(ConfigError) as caught:
        with_flags(["train.steps=abc"], flags)
    assert str(caught.value) == ("train.steps is set twice, by --steps (train.steps=2) and by train.steps=abc; "
                                 "give one of them")
    with pytest.raises(ConfigError, match=r"data.images is set twice, by --data .* and by data={images: x}"):
        with_flags(["data={images: x}"], flags)
    assert load_config("default", with_flags([], flags)).data.images == "/a: b"


def test_rules_must_name_keys_of_their_dataclass():
    with pytest.raises(TypeError, match="names keys it does not have: size"):
        @config_rules(size=at_least(1))
        @dataclasses.dataclass
        class Sizes:
            side: int = 3
    with pytest.raises(TypeError, match="goes above @dataclass"):
        config_rules(side=at_least(1))(type("Plain", (), {}))


def test_rule_messages():
    assert Range(0.0, 1.0, high_open=True).problem(1.0) == "must be in [0, 1), not 1"
    assert Range(0.0, 1.0, low_open=True).problem(float("nan")) == "must be in (0, 1], not a finite number"
    assert at_least(3).problem(2) == "must be at least 3, not 2" and at_least(3).problem(3) is None
    assert Interval(Range(0.0, 1.0, low_open=True)).problem([0.8, 0.2]) == (
        "must be [low, high] with low <= high, not [0.8, 0.2]")
    assert Each(at_least(0.0), length=2).problem([1.0]) == "must hold 2 values, not 1: [1]"
    assert Each(at_least(0.0)).problem([1.0, -2.0]) == "every value must be at least 0, not -2 in [1, -2]"
    assert OneOf(("lars", "sgd")).problem("lasr") == "must be one of 'lars', 'sgd', not 'lasr'; did you mean 'lars'?"
    assert Text().problem("") is None


def test_a_batch_below_the_method_s_smallest_is_refused_per_micro_batch_at_loading():
    def refusal(preset, overrides) -> str:
        with pytest.raises(ConfigError) as caught:
            load_config(preset, overrides)
        return str(caught.value)

    needs_two = ("must be at least 2 for method soco, not 1: BatchNorm in SoCo's backbone, box head and projector "
                 "normalises over the images of each process's micro-batch and needs two")
    for preset in ("soco_tiny", "byol_image_tiny", "soco_r50_c4"):
        assert refusal(preset, ["train.batch_size=1"]) == f"train.batch_size: {needs_two} (set by train.batch_size=1)"
    # accumulating adds micro-batches of train.batch_size images: it does not make one large enough
    assert refusal("soco_tiny", ["train.batch_size=1", "train.accumulate=4"]).startswith("train.batch_size: must be")
    assert "method.key_bn_splits=2" in refusal("insloc_tiny", ["train.batch_size=3"])
    assert load_config("insloc_tiny", ["train.batch_size=2", "method.key_bn_splits=1"]).train.batch_size == 2
    assert load_config("scrl_tiny", ["train.batch_size=1"]).train.batch_size == 1  # both views share its BatchNorm


def test_under_torchrun_the_moco_key_sub_batches_are_the_processes_slices(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert load_config("insloc_tiny", ["train.batch_size=2"]).train.batch_size == 2
    with pytest.raises(ConfigError, match=r"^train\.batch_size: must be at least 2 for method detco, not 1: .*slice"):
        load_config("detco_tiny", ["train.batch_size=1"])


def test_a_refused_value_says_where_it_came_from(tmp_path):
    from soco.transfer.finetune import TransferConfig, apply_overrides

    def refusal(preset, overrides) -> str:
        with pytest.raises(ConfigError) as caught:
            load_config(preset, overrides)
        return str(caught.value)

    assert refusal("soco_tiny", ["train.batch_size=0"]) == ("train.batch_size: must be at least 1, not 0 "
                                                            "(set by train.batch_size=0)")
    assert refusal("soco_tiny", ["method={views: {v1_size: 0}}"]).endswith("(set by method={views: {v1_size: 0}})")
    assert refusal("insloc_tiny", ["optim.momentum=0"]) == ("optim.nesterov: needs optim.momentum greater than 0 "
                                                            "(set by insloc_tiny)")
    path = tmp_path / "mine.yaml"
    path.write_text("base: soco_tiny\ntrain:\n  batch_size: 0\n")
    assert refusal(str(path), []) == f"train.batch_size: must be at least 1, not 0 (set by {path})"
    assert refusal("soco_tiny", ["proposals.min_relative_scale=0.9"]).endswith(
        "(the default; soco_tiny does not set it)")  # the default maximum 0.8 is now below the minimum
    with pytest.raises(ConfigError, match=r"^transfer\.epochs: must be at least 1, not 0 \(set by epochs=0\)$"):
        apply_overrides(TransferConfig(), ["epochs=0"])


def test_a_number_that_is_not_finite_is_named_so_not_by_the_value_it_read_as():
    # 1e400 reads as inf, which the user never wrote (issue 26): the message names the problem instead
    for override, message in {
        "optim.weight_decay=1e400": "optim.weight_decay: must be at least 0, not a finite number "
                                    "(set by optim.weight_decay=1e400)",
        "optim.base_lr=-1e400": "optim.base_lr: must be greater than 0, not a finite number",
        "train.seed=1e400": "train.seed: expected an integer, got a number that is not finite",
    }.items():
        with pytest.raises(ConfigError) as caught:
            load_config("soco_tiny", [override])
        assert message in str(caught.value) and "inf" not in str(caught.value).replace("1e400", ""), override
    assert at_least(0).problem(float("nan")) == "must be at least 0, not a finite number"


def test_every_seed_is_a_seed_numpy_and_the_sampler_accept():
    from soco.config.loading import apply_overrides
    from soco.config.validation import MAX_SEED, SEED, validate_section
    from soco.study.design import BUDGETS
    from soco.transfer.finetune import TransferConfig

    assert SEED == Range(0, MAX_SEED) and MAX_SEED == 2**32 - 1
    assert rules_of(TrainConfig)["seed"] == SEED and rules_of(TransferConfig)["seed"] == SEED
    for seed in (-1, MAX_SEED + 1):
        with pytest.raises(ConfigError, match=f"seed: must be in \\[0, {MAX_SEED}\\], not {seed} \\(set by seed="):
            apply_overrides(TransferConfig(), [f"seed={seed}"])
        with pytest.raises(ConfigError, match="budget.seeds: every value must be in"):
            validate_section(dataclasses.replace(BUDGETS["cpu"], seeds=(0, seed)), "budget")
    assert apply_overrides(TransferConfig(), [f"seed={MAX_SEED}"]).seed == MAX_SEED


def test_the_detector_resize_is_bounded_above():
    from soco.config.loading import apply_overrides
    from soco.config.validation import MAX_IMAGE_SIDE
    from soco.transfer.finetune import TransferConfig

    for key in ("min_size", "max_size"):
        with pytest.raises(ConfigError, match=f"{key}: must be in \\[32, {MAX_IMAGE_SIDE}\\], not 100000"):
            apply_overrides(TransferConfig(), [f"{key}=100000"])

"""Run configuration: every option's range is enforced with a message naming the option."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedfleet.config import DP_OPTIONS, OPTIONS, OPTIONS_BY_NAME, SECAGG_OPTIONS, Option, RunConfig, load_toml
from fedfleet.errors import ConfigError


def bad_values(opt: Option) -> list[tuple[str, Any]]:
    """Values that ``opt`` must reject, derived from its declared kind, range and choices."""
    bad: list[tuple[str, Any]] = [("bool-true", True), ("bool-false", False), ("list", [1])]
    if opt.kind in (int, float):
        bad += [("word", "abc"), ("empty-string", ""), ("dict", {"v": 1})]
    if opt.kind is int:
        bad += [("fractional-float", 1.5), ("fractional-string", "2.5")]
    if opt.kind is float:
        bad += [("nan", float("nan")), ("nan-string", "nan"), ("inf", float("inf")), ("-inf", float("-inf"))]
    if opt.kind is str:
        bad += [("int", 3), ("float", 0.5)]
    if opt.choices:
        bad += [("not-a-choice", "no-such-" + opt.choices[0]), ("choice-upper", opt.choices[0].upper())]
    if opt.low is not None:
        step = 1 if opt.kind is int else 0.5
        bad.append(("below-low", opt.kind(opt.low - step)))
        bad.append(("below-low-string", str(opt.kind(opt.low - step))))
        if opt.low_open:
            bad.append(("at-open-low", opt.kind(opt.low)))
        if opt.kind is float:
            bad.append(("just-below-low", opt.low - 1e-9))
    if opt.high is not None:
        step = 1 if opt.kind is int else 0.5
        bad.append(("above-high", opt.kind(opt.high + step)))
        bad.append(("above-high-string", str(opt.kind(opt.high + step))))
        bad.append(("far-above-high", opt.kind(opt.high * 1000 + 1000)))
    if not opt.optional:
        bad.append(("none", None))
    return bad


BAD = [pytest.param(opt, value, id=f"{opt.name}-{label}") for opt in OPTIONS for label, value in bad_values(opt)]


@pytest.mark.parametrize(("opt", "value"), BAD)
def test_every_option_rejects_bad_values_naming_itself(opt: Option, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping({opt.name: value})
    message = str(info.value)
    assert f"'{opt.name}'" in message
    assert "Got" in message
    assert info.value.option == opt.name


def test_every_option_has_bad_values_beyond_type_errors() -> None:
    # The generator covers ranges and choices, not only wrong types, for every ranged option.
    for opt in OPTIONS:
        labels = {label for label, _ in bad_values(opt)}
        if opt.low is not None:
            assert "below-low" in labels
        if opt.high is not None:
            assert "above-high" in labels


def test_float_options_reject_integers_too_large_for_a_float() -> None:
    # tomllib reads TOML integers of any size, so ``lr = 1000…000`` reaches from_mapping as a huge int;
    # like any out-of-range value it must give a ConfigError naming the option, not an OverflowError.
    for opt in (o for o in OPTIONS if o.kind is float):
        with pytest.raises(ConfigError, match=f"'{opt.name}'.*Got"):
            RunConfig.from_mapping(tomllib.loads(f"{opt.name} = 1{'0' * 400}"))


def good_values(opt: Option) -> list[Any]:
    """Values that ``opt`` must accept, derived from its declaration."""
    good: list[Any] = []
    if opt.default is not None:
        good.append(opt.default)
    if opt.choices:
        good += list(opt.choices)
    if opt.low is not None:
        if not opt.low_open:
            good += [opt.kind(opt.low), str(opt.kind(opt.low))]
        else:
            good.append(opt.low + (1 if opt.kind is int else 1e-6))
    if opt.high is not None:
        good += [opt.kind(opt.high), str(opt.kind(opt.high))]
        if opt.low is not None:
            good.append(opt.kind((opt.low + opt.high) / 2) if opt.kind is float else int((opt.low + opt.high) // 2))
    if opt.kind is float:
        good += [v for v in (1, "1") if opt.low is None or (opt.low < 1 <= (opt.high or 2))]
    if opt.optional:
        good.append(None)
    return good


GOOD = [pytest.param(opt, value, id=f"{opt.name}-{value!r}") for opt in OPTIONS for value in good_values(opt)]
GOOD_EXTRA = {"partition": ["natural", "dirichlet:0.3"], "task": ["null", "my.module:MyTask"]}
GOOD += [pytest.param(OPTIONS_BY_NAME[name], v, id=f"{name}-{v}") for name, vs in GOOD_EXTRA.items() for v in vs]


def _context(name: str, value: Any) -> dict[str, Any]:
    """The other options a good value of ``name`` needs beside it: min_workers may not exceed workers; a
    differential-privacy option applies only with --dp central, which needs a clip norm and one of sigma or a
    target epsilon (and one worker, so that any dp_delta below 1 is below 1/workers); a secure-aggregation
    option applies only with --secure-aggregation, which needs three workers sampled."""
    if name == "dp" and value == "distributed":
        return {"dp_clip": 1.0, "dp_noise_multiplier": 1.0, "secure_aggregation": "on", "workers": 3}
    if (name == "secure_aggregation" and value == "on") or (name in SECAGG_OPTIONS and value is not None):
        return {"secure_aggregation": "on", "workers": 3}
    if name == "min_workers":
        return {"workers": 100_000}
    if (name == "dp" and value == "central") or (name in DP_OPTIONS and value is not None):
        sigma = {} if name in ("dp_noise_multiplier", "dp_target_epsilon") else {"dp_noise_multiplier": 1.0}
        return {"dp": "central", "dp_clip": 1.0, "workers": 1, **sigma}
    return {}


@pytest.mark.parametrize(("opt", "value"), GOOD)
def test_every_option_accepts_good_values(opt: Option, value: Any) -> None:
    values = {**_context(opt.name, value), opt.name: value}
    config = RunConfig.from_mapping(values)
    got = getattr(config, opt.name)
    if value is None:
        assert got is None
    else:
        assert type(got) is opt.kind
        assert got == opt.kind(value)


def test_defaults_match_the_option_table() -> None:
    config = RunConfig.from_mapping({})
    assert config == RunConfig()
    for opt in OPTIONS:
        assert getattr(config, opt.name) == opt.default
    assert config.task_options == ()
    assert config.needed_workers(0) == config.workers


def test_option_table_and_dataclass_fields_agree() -> None:
    assert [o.name for o in OPTIONS] + ["task_options", "strategy_options"] == list(RunConfig.__dataclass_fields__)


def test_allowed_text_describes_the_range() -> None:
    assert OPTIONS_BY_NAME["fraction"].allowed() == "a float in the range (0, 1]"
    assert OPTIONS_BY_NAME["rounds"].allowed() == "an int in the range [1, 1000000]"
    assert OPTIONS_BY_NAME["strategy"].allowed().startswith("one of 'fedavg', 'fedavgm', ")
    assert OPTIONS_BY_NAME["task"].allowed() == "a string"
    assert OPTIONS_BY_NAME["min_workers"].flag == "--min-workers"


def test_fraction_message_matches_the_documented_example() -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping({"fraction": 1.5})
    assert str(info.value) == "The 'fraction' option must be a float in the range (0, 1]. Got 1.5 instead."


@pytest.mark.parametrize("key", ["roundz", "task_option", "min-workers", "", "config"])
def test_unknown_keys_are_rejected_by_name(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_mapping({"rounds": 3, key: 1})
    assert repr(key) in str(info.value)
    assert info.value.option == key
    assert "known options" in str(info.value)


def test_min_workers_above_workers_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"'min_workers'.*at most 'workers' \(4\).*Got 5") as info:
        RunConfig.from_mapping({"workers": 4, "min_workers": 5})
    assert info.value.option == "min_workers"
    assert RunConfig.from_mapping({"workers": 4, "min_workers": 4}).needed_workers(5) == 4
    assert RunConfig.from_mapping({"workers": 4, "min_workers": 2}).needed_workers(0) == 2


@pytest.mark.parametrize("workers,fraction,quorum,after_first", [
    (3, 1.0, 0.5, 2), (8, 1.0, 0.5, 4), (100, 0.1, 0.5, 5), (100, 0.07, 1.0, 7), (1, 1.0, 0.5, 1), (10, 1.0, 1.0, 10),
])
def test_without_min_workers_the_first_round_waits_for_all_then_for_a_quorum(
        workers: int, fraction: float, quorum: float, after_first: int) -> None:
    config = RunConfig.from_mapping({"workers": workers, "fraction": fraction, "quorum": quorum})
    assert config.needed_workers(0) == workers
    assert config.needed_workers(1) == config.needed_workers(40) == after_first


def test_partition_error_names_the_option() -> None:
    with pytest.raises(ConfigError, match=r"'partition' option.*dirichlet:ALPHA.*Got 'dirichlet:0'") as info:
        RunConfig.from_mapping({"partition": "dirichlet:0"})
    assert info.value.option == "partition"


def test_config_is_frozen() -> None:
    config = RunConfig()
    with pytest.raises(AttributeError):
        config.rounds = 3  # type: ignore[misc]


# --- task options --------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "expected"), [
    ({}, ()),
    ({"b": "2", "a": "1"}, (("a", "1"), ("b", "2"))),
    ({"n": 3, "x": 0.5, "f": True}, (("f", "True"), ("n", "3"), ("x", "0.5"))),
    (["b=2", "a=1"], (("a", "1"), ("b", "2"))),
    (["path=/a=b", "empty="], (("empty", ""), ("path", "/a=b"))),
    ([("k", "v")], (("k", "v"),)),
])
def test_task_options_parsing(raw: Any, expected: tuple[tuple[str, str], ...]) -> None:
    config = RunConfig.from_mapping({"task_options": raw})
    assert config.task_options == expected
    assert config.task_options_dict == dict(expected)


@pytest.mark.parametrize("entry", ["novalue", "=value", ""])
def test_task_option_without_key_or_equals_is_rejected(entry: str) -> None:
    with pytest.raises(ConfigError, match=f"KEY=VALUE. Got {entry!r}") as info:
        RunConfig.from_mapping({"task_options": ["ok=1", entry]})
    assert info.value.option == "task_options"


@pytest.mark.parametrize("raw", [5, "a=1", None])
def test_task_options_of_the_wrong_type_are_rejected(raw: Any) -> None:
    with pytest.raises(ConfigError, match="'task_options'") as info:
        RunConfig.from_mapping({"task_options": raw})
    assert info.value.option == "task_options"


# --- TOML ----------------------------------------------------------------------------------------

def test_default_config_round_trips_through_toml() -> None:
    config = RunConfig()
    assert RunConfig.from_mapping(tomllib.loads(config.to_toml())) == config


def test_typical_config_round_trips_through_toml(tmp_path: Path) -> None:
    config = RunConfig.from_mapping({
        "task": "my_pkg.tasks:Task", "rounds": 12, "workers": 5, "min_workers": 3, "fraction": 0.35,
        "quorum": 1.0, "partition": "dirichlet:0.25", "seed": 2**32 - 1, "lr": 1e-05,
        "round_timeout": 0.001, "max_round_retries": 0,
        "task_options": {"data_dir": "/data/songs with space", "quote": 'say "hi"\\n', "tab": "\t"},
    })
    text = config.to_toml()
    assert RunConfig.from_mapping(tomllib.loads(text)) == config
    path = tmp_path / "run.toml"
    path.write_text(text, encoding="utf-8")
    assert RunConfig.from_mapping(load_toml(path)) == config


def test_to_toml_round_trips_characters_outside_the_basic_plane() -> None:
    # json.dumps writes U+1F3B5 as the surrogate pair "\ud83c\udfb5", which TOML does not allow.
    config = RunConfig.from_mapping({"task_options": {"playlist": "road trip 🎵"}})
    assert RunConfig.from_mapping(tomllib.loads(config.to_toml())) == config


def test_to_toml_round_trips_task_option_keys_that_are_not_bare_keys() -> None:
    # A key such as "model.size" written bare becomes a nested table; "two words" is not valid TOML.
    config = RunConfig.from_mapping({"task_options": {"model.size": "large", "two words": "x"}})
    assert RunConfig.from_mapping(tomllib.loads(config.to_toml())) == config


toml_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=10)


@given(
    rounds=st.integers(1, 1_000_000),
    workers=st.integers(1, 100_000),
    fraction=st.floats(0, 1, exclude_min=True),
    lr=st.floats(0, 100, exclude_min=True),
    seed=st.integers(0, 2**32 - 1),
    task=toml_text,
    task_options=st.dictionaries(toml_text, toml_text, max_size=3),
)
def test_any_config_round_trips_through_toml(rounds: int, workers: int, fraction: float, lr: float,
                                             seed: int, task: str, task_options: dict[str, str]) -> None:
    config = RunConfig.from_mapping({"rounds": rounds, "workers": workers, "fraction": fraction, "lr": lr,
                                     "seed": seed, "task": task, "task_options": task_options})
    assert RunConfig.from_mapping(tomllib.loads(config.to_toml())) == config


def test_load_toml_accepts_dashed_keys(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('min-workers = 2\nworkers = 3\nround-timeout = 5\n[task_options]\ndata_dir = "x"\n')
    config = RunConfig.from_mapping(load_toml(path))
    assert (config.min_workers, config.workers, config.round_timeout) == (2, 3, 5.0)
    assert config.task_options == (("data_dir", "x"),)


def test_load_toml_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_toml(path)
    assert str(path) in str(info.value)
    assert info.value.option == "config"


@pytest.mark.parametrize("text", ["rounds = ", "rounds = 3\nrounds = 4\n", "[x\n", "a = 'unterminated\n"])
def test_load_toml_invalid_toml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="is not valid TOML") as info:
        load_toml(path)
    assert str(path) in str(info.value)
    assert info.value.option == "config"


def test_values_from_toml_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("quorum = 0\n")
    with pytest.raises(ConfigError, match=r"'quorum'.*Got 0 instead"):
        RunConfig.from_mapping(load_toml(path))


# --- differences ---------------------------------------------------------------------------------

def test_differences_lists_changed_fields_in_order() -> None:
    a = RunConfig()
    b = RunConfig.from_mapping({"lr": 0.1, "rounds": 5, "task_options": ["k=v"]})
    assert a.differences(b) == ["rounds", "lr", "task_options"]
    assert b.differences(a) == ["rounds", "lr", "task_options"]
    assert a.differences(RunConfig.from_mapping({})) == []
    assert a.differences(RunConfig.from_mapping({"rounds": "30"})) == []  # same value, given as a flag string


def test_to_dict_is_plain() -> None:
    data = RunConfig.from_mapping({"task_options": {"k": "v"}}).to_dict()
    assert data["task_options"] == {"k": "v"}
    assert set(data) == {o.name for o in OPTIONS} | {"task_options", "strategy_options"}

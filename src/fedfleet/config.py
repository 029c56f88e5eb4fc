"""Run configuration: every option on one screen, validated once, frozen, saved with each run.

The allowed values are data (``OPTIONS``), so one message template serves every option and a test
can generate a bad value for each of them::

    >>> RunConfig.from_mapping({"fraction": 1.5})
    Traceback (most recent call last):
    ...
    fedfleet.errors.ConfigError: The 'fraction' option must be a float in the range (0, 1]. Got 1.5 instead.

A run's config comes from defaults, then a TOML file (``--config run.toml``), then command-line flags.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fedfleet.errors import ConfigError
from fedfleet.options import Option
from fedfleet.partition import PartitionSpec, parse_partition
from fedfleet.strategies import STRATEGIES, make_strategy
from fedfleet.strategies.privacy import ADAPTIVE_INITIAL_CLIP

OPTIONS: tuple[Option, ...] = (
    Option("task", str, "songs", "task to train: songs, or module.path:Class for your own"),
    Option("rounds", int, 30, "training rounds", low=1, high=1_000_000),
    Option("workers", int, 8, "data partitions, one per worker; `run` starts this many workers",
           low=1, high=100_000),
    Option("min_workers", int, None, "live workers needed to start a round; also the fewest sampled in one",
           low=1, high=100_000, optional=True,
           default_text="all --workers for the first round, then the quorum of a round's sample "
                        "(ceil(quorum x ceil(fraction x workers))); 1 to sample"),
    Option("fraction", float, 1.0, "share of live workers sampled each round", low=0, high=1, low_open=True),
    Option("quorum", float, 0.5, "share of sampled workers that must answer by the deadline",
           low=0, high=1, low_open=True),
    Option("partition", str, "iid", "how data is split: iid, dirichlet:ALPHA or natural (natural:COLUMN for "
           "--data-split)"),
    Option("data_source", str, None, "where workers' data comes from: partitions of the task's shared data set, "
           "or each site's own files (workers started with --data)", choices=("partitions", "sites"),
           optional=True, default_text="sites for a task that has no shared data set (tabular, images), "
                                       "else partitions"),
    Option("test_data", str, None, "a file or folder of held-out examples the coordinator scores each round's "
           "model on, for a run on the sites' own data", optional=True,
           default_text="none: a site-data run is scored by federated evaluation only"),
    Option("seed", int, 0, "seed for the split, the model init and the sampling", low=0, high=2**32 - 1),
    Option("local_epochs", int, 1, "passes over its data each worker makes per round", low=1, high=10_000),
    Option("batch_size", int, 32, "mini-batch size of local SGD", low=1, high=10_000_000),
    Option("lr", float, 0.05, "learning rate of local SGD", low=0, high=100, low_open=True),
    Option("lr_decay", float, 1.0, "factor the local learning rate is multiplied by each round: round t trains "
           "with lr x lr_decay^(t-1), the decaying step FedAvg needs to settle on non-IID data",
           low=0, high=1, low_open=True, default_text="1: the same lr every round"),
    Option("val_fraction", float, 0.1, "share of each worker's data kept to evaluate the global model locally",
           low=0, high=0.5),
    Option("server_val", int, 0, "examples of the training pool the coordinator keeps apart (a seeded draw, "
           "stratified by label) and scores each round's model on besides the test set: no worker trains on "
           "them, so choices (learning rate, rounds) can be made on them and never on the test set",
           low=0, high=100_000_000, default_text="0: none kept"),
    Option("strategy", str, "fedavg", "how updates are aggregated and applied (see fedfleet.strategies)",
           choices=tuple(STRATEGIES)),
    Option("round_timeout", float, 60.0, "seconds a round waits for its sampled workers (its deadline)",
           low=0, high=86_400, low_open=True),
    Option("worker_timeout", float, 30.0, "seconds without contact after which a worker counts as dead",
           low=1, high=86_400),
    Option("wait_timeout", float, 300.0, "seconds to wait for --min-workers live workers before failing",
           low=0, high=86_400 * 7, low_open=True),
    Option("max_round_retries", int, 3, "times in a row a round may miss its quorum before the run fails",
           low=0, high=1000),
    Option("target_accuracy", float, None, "end the run early once the global model's test accuracy reaches this",
           low=0, high=1, low_open=True, optional=True, default_text="none: run all --rounds"),
    Option("max_update_norm", float, None, "refuse a training update whose delta from the global model has a "
           "larger L2 norm (the defence of FedAvg-family strategies against scaled updates)",
           low=0, high=1e12, low_open=True, optional=True, default_text="none: no bound"),
    # Differential privacy (docs/privacy.md, fedfleet.strategies.privacy).
    Option("dp", str, "none", "differential privacy: central is DP-FedAvg with a trusted coordinator (each "
           "worker's update delta clipped to --dp-clip, Gaussian noise added to their sum, an (epsilon, delta) "
           "accounted per round); distributed is the same mechanism with each worker clipping its own delta and "
           "adding its share of the noise under --secure-aggregation, so the coordinator never holds a noise-free "
           "sum; needs pip install 'fedfleet[privacy]'", choices=("none", "central", "distributed")),
    Option("dp_clip", float, None, "L2 norm C that each sampled worker's update delta is clipped to",
           low=0, high=1e6, low_open=True, optional=True, default_text="none: required with --dp central"),
    Option("dp_clip_quantile", float, None, "adaptive clipping (Andrew et al. 2021): the clip norm follows this "
           "quantile of the update norms, starting from --dp-clip; --dp-clip adaptive is --dp-clip 0.1 with "
           "quantile 0.5", low=0, high=1, low_open=True, optional=True,
           default_text="none: the clip norm stays --dp-clip"),
    Option("dp_noise_multiplier", float, None, "sigma: the noise added to the sum of clipped deltas has standard "
           "deviation sigma x C", low=0, high=1e4, low_open=True, optional=True,
           default_text="none: give this or --dp-target-epsilon with --dp central"),
    Option("dp_target_epsilon", float, None, "epsilon that all --rounds may spend: sigma is solved for it before "
           "the run, at sampling rate --fraction", low=0, high=1e4, low_open=True, optional=True,
           default_text="none: give this or --dp-noise-multiplier with --dp central"),
    Option("dp_delta", float, None, "delta of the (epsilon, delta) guarantee; below 1/--workers",
           low=0, high=0.1, low_open=True, optional=True, default_text="1e-5, or 1/workers^2 when that is smaller"),
    Option("dp_max_epsilon", float, None, "end the run (finished) before a round that would take the epsilon "
           "spent over this", low=0, high=1e4, low_open=True, optional=True, default_text="none: run all --rounds"),
    Option("dp_seed", int, None, "seed of the DP sampling and noise, for reproducible tests only: whoever knows it "
           "can subtract the noise", low=0, high=2**32 - 1, optional=True,
           default_text="none: fresh randomness from the OS (secrets) every round"),
    # Secure aggregation (docs/privacy.md, fedfleet.secagg).
    Option("secure_aggregation", str, "off", "secure aggregation (SecAgg+): workers upload masked updates and the "
           "coordinator learns only their sum, even when some drop out after masking; --secure-aggregation "
           "alone means on", choices=("off", "on")),
    Option("secagg_threshold", float, None, "share of the sampled workers that must stay to the end of a securely "
           "aggregated round, and of a worker's neighbours needed to reconstruct its secrets", low=0.5, high=1,
           low_open=True, optional=True, default_text="0.6"),
    Option("secagg_neighbours", int, None, "k: each worker masks with and deals key shares to k others",
           low=2, high=100_000, optional=True, default_text="all others for up to 20 sampled workers, else "
                                                            "ceil(3 log2 N) rounded up to even"),
    Option("secagg_clip", float, None, "each coordinate of an update's delta is clipped to [-clip, clip] before it "
           "is encoded in the ring (the quantisation range)", low=0, high=1e6, low_open=True, optional=True,
           default_text="100"),
)
SECAGG_OPTIONS = ("secagg_threshold", "secagg_neighbours", "secagg_clip")
SECAGG_THRESHOLD = 0.6
SECAGG_CLIP = 100.0
ADAPTIVE_QUANTILE = 0.5
DP_OPTIONS = ("dp_clip", "dp_clip_quantile", "dp_noise_multiplier", "dp_target_epsilon", "dp_delta", "dp_max_epsilon",
              "dp_seed")
OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class RunConfig:
    """A validated, immutable run configuration. Build it with ``from_mapping``."""

    task: str = "songs"
    rounds: int = 30
    workers: int = 8
    min_workers: int | None = None
    fraction: float = 1.0
    quorum: float = 0.5
    partition: str = "iid"
    data_source: str | None = None
    test_data: str | None = None
    seed: int = 0
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    lr_decay: float = 1.0
    val_fraction: float = 0.1
    server_val: int = 0
    strategy: str = "fedavg"
    round_timeout: float = 60.0
    worker_timeout: float = 30.0
    wait_timeout: float = 300.0
    max_round_retries: int = 3
    target_accuracy: float | None = None
    max_update_norm: float | None = None
    dp: str = "none"
    dp_clip: float | None = None
    dp_clip_quantile: float | None = None
    dp_noise_multiplier: float | None = None
    dp_target_epsilon: float | None = None
    dp_delta: float | None = None
    dp_max_epsilon: float | None = None
    dp_seed: int | None = None
    secure_aggregation: str = "off"
    secagg_threshold: float | None = None
    secagg_neighbours: int | None = None
    secagg_clip: float | None = None
    task_options: tuple[tuple[str, str], ...] = field(default=())
    strategy_options: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Validate ``values`` (defaults fill the rest); raise ConfigError naming the first bad option."""
        unknown = sorted(set(values) - set(OPTIONS_BY_NAME) - {"task_options", "strategy_options"})
        if unknown:
            raise ConfigError(
                f"Unknown option {unknown[0]!r}; known options: {', '.join(sorted(OPTIONS_BY_NAME))}.",
                option=unknown[0],
            )
        if values.get("dp_clip") == "adaptive":
            # --dp-clip adaptive: the paper's start (0.1) and target quantile (the median), unless given.
            values = {**values, "dp_clip": ADAPTIVE_INITIAL_CLIP,
                      "dp_clip_quantile": values.get("dp_clip_quantile", ADAPTIVE_QUANTILE)}
        checked: dict[str, Any] = {}
        for opt in OPTIONS:
            checked[opt.name] = opt.check(values[opt.name]) if opt.name in values else opt.default
        try:
            spec = parse_partition(checked["partition"])
        except ValueError as exc:
            raise ConfigError(f"The 'partition' option {exc}", option="partition") from exc
        if spec.holdout:
            raise ConfigError("The 'partition' option takes no validation count: give it with --server-val.",
                              option="partition")
        if checked["server_val"] and checked["data_source"] == "sites":
            raise ConfigError("The 'server_val' option needs a shared training pool to take examples from; with "
                              "--data-source sites each site's data stays at the site (give --test-data, or "
                              "select on the federated evaluation).", option="server_val")
        if checked["min_workers"] is not None and checked["min_workers"] > checked["workers"]:
            raise ConfigError(
                f"The 'min_workers' option must be at most 'workers' ({checked['workers']}). "
                f"Got {checked['min_workers']} instead.",
                option="min_workers",
            )
        checked["task_options"] = _task_options(values.get("task_options", {}))
        checked["strategy_options"] = _task_options(values.get("strategy_options", {}), "strategy_options")
        make_strategy(checked["strategy"], dict(checked["strategy_options"]))
        _check_privacy(checked)
        _check_secure_aggregation(checked)
        return cls(**checked)

    def needed_workers(self, rounds_done: int) -> int:
        """Live workers needed before a round starts, after ``rounds_done`` completed training rounds.

        ``--min-workers`` when set; else every partition's worker for the first round (so that the
        statistics and the first model see all the data), and from then on the quorum of the sample a
        round would draw: one dead worker of three does not stall a run that needs only two answers.

        >>> cfg = RunConfig(workers=3, quorum=0.5)
        >>> cfg.needed_workers(0), cfg.needed_workers(1)
        (3, 2)
        """
        if self.min_workers is not None:
            return self.min_workers
        if rounds_done == 0:
            return self.workers
        return max(1, math.ceil(self.quorum * math.ceil(self.fraction * self.workers - 1e-9) - 1e-9))

    @property
    def partition_spec(self) -> PartitionSpec:
        """The partition every worker splits the pool by, ``--server-val`` included (the text workers get)."""
        return replace(parse_partition(self.partition), holdout=self.server_val)

    @property
    def task_options_dict(self) -> dict[str, str]:
        return dict(self.task_options)

    @property
    def strategy_options_dict(self) -> dict[str, str]:
        return dict(self.strategy_options)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["task_options"] = dict(self.task_options)
        data["strategy_options"] = dict(self.strategy_options)
        return data

    def to_toml(self) -> str:
        """The config as TOML that ``load_toml`` reads back to an equal config."""
        lines = ["# fedfleet run configuration"]
        tables = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("task_options", "strategy_options"):
                if value:
                    tables.append(f"\n[{f.name}]")
                    tables.extend(f"{_toml(k)} = {_toml(v)}" for k, v in value)
            elif value is not None:
                lines.append(f"{f.name} = {_toml(value)}")
        return "\n".join(lines + tables) + "\n"

    def differences(self, other: RunConfig) -> list[str]:
        """Names of the fields whose values differ between two configs."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def _check_privacy(c: Mapping[str, Any]) -> None:
    """ConfigError for differential-privacy options that do not fit together (or with the rest)."""
    if c["dp"] == "none":
        given = next((name for name in DP_OPTIONS if c[name] is not None), None)
        if given is not None:
            raise ConfigError(f"The '{given}' option applies only with --dp central or distributed; differential "
                              "privacy is off (--dp none).", option=given)
        return
    if c["dp"] == "distributed" and c["dp_clip_quantile"] is not None:
        raise ConfigError("Adaptive clipping ('dp_clip_quantile', --dp-clip adaptive) is not built for --dp "
                          "distributed: the count of unclipped updates would need a secure sum of its own; give a "
                          "fixed --dp-clip.", option="dp_clip_quantile")
    if c["dp"] == "distributed" and c["secure_aggregation"] != "on":
        raise ConfigError("--dp distributed needs --secure-aggregation: each worker adds only a share of the noise, "
                          "which hides its update only inside the securely aggregated sum.", option="dp")
    if c["dp_clip"] is None:
        raise ConfigError(f"The 'dp_clip' option is required with --dp {c['dp']}: the L2 norm C each update's delta "
                          "is clipped to, which the noise is sized for.", option="dp_clip")
    if (c["dp_noise_multiplier"] is None) == (c["dp_target_epsilon"] is None):
        raise ConfigError(f"--dp {c['dp']} takes exactly one of 'dp_noise_multiplier' (sigma) and 'dp_target_epsilon' "
                          "(sigma solved for it).", option="dp_noise_multiplier")
    if STRATEGIES[c["strategy"]][0] != "mean":
        raise ConfigError(f"The 'strategy' option {c['strategy']!r} cannot be used with --dp central: it picks among "
                          "the updates (a median, trimmed values, Krum's choice), so one worker's influence is not "
                          "bounded by clipping its update; use a mean-based one (fedavg, fedavgm, fedprox, "
                          "fedadagrad, fedadam, fedyogi).", option="strategy")
    bound = c["max_update_norm"]
    if bound is not None and bound < c["dp_clip"]:
        raise ConfigError(f"The 'max_update_norm' option ({bound:g}) must be at least 'dp_clip' ({c['dp_clip']:g}) "
                          "with --dp central: updates are clipped to dp_clip, so a smaller bound refuses updates "
                          "that clipping would keep while the noise is still sized for dp_clip. Lower --dp-clip "
                          "instead.", option="max_update_norm")
    delta = c["dp_delta"]
    if delta is not None and not delta < 1 / c["workers"]:
        raise ConfigError(f"The 'dp_delta' option must be below 1/workers ({1 / c['workers']:g}): at that delta, "
                          f"publishing one random worker's data whole would count as private. Got {delta!r} "
                          "instead.", option="dp_delta")


def _check_secure_aggregation(c: Mapping[str, Any]) -> None:
    """ConfigError for secure-aggregation options that do not fit together (or with the rest): whatever needs
    each worker's update in the clear."""
    if c["secure_aggregation"] == "off":
        given = next((name for name in SECAGG_OPTIONS if c[name] is not None), None)
        if given is not None:
            raise ConfigError(f"The '{given}' option applies only with --secure-aggregation.", option=given)
        return
    if STRATEGIES[c["strategy"]][0] != "mean":
        raise ConfigError(f"The 'strategy' option {c['strategy']!r} cannot be used with --secure-aggregation: it needs "
                          "every worker's update in the clear (a median, trimmed values, Krum's distances), while the "
                          "coordinator learns only their sum; use a mean-based one (fedavg, fedavgm, fedprox, "
                          "fedadagrad, fedadam, fedyogi).", option="strategy")
    if c["max_update_norm"] is not None:
        raise ConfigError("The 'max_update_norm' option cannot be used with --secure-aggregation: the coordinator "
                          "never sees an update's norm; --secagg-clip bounds each coordinate instead.",
                          option="max_update_norm")
    if c["dp"] == "central":
        raise ConfigError("--dp central cannot be used with --secure-aggregation: it clips each worker's update at "
                          "the coordinator, which secure aggregation keeps from seeing one.", option="dp")
    sampled = math.ceil(c["fraction"] * c["workers"] - 1e-9)
    if sampled < 3:
        raise ConfigError(f"--secure-aggregation needs at least 3 workers sampled a round (ceil(fraction x workers) is "
                          f"{sampled}): with 2, each could read the other's update off the sum.", option="workers")


def _toml(value: object) -> str:
    """A TOML value (or quoted key). Numbers as JSON writes them; strings as TOML basic strings, which
    unlike JSON may not hold raw control characters nor surrogate-pair escapes."""
    if not isinstance(value, str):
        return json.dumps(value)
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _task_options(raw: Any, name: str = "task_options") -> tuple[tuple[str, str], ...]:
    """KEY=VALUE strings or a TOML table, as sorted (key, value) string pairs."""
    if isinstance(raw, Mapping):
        items = list(raw.items())
    elif isinstance(raw, list | tuple):
        items = []
        for entry in raw:
            if isinstance(entry, str):
                key, sep, value = entry.partition("=")
                if not sep or not key:
                    raise ConfigError(
                        f"The '{name}' option must look like KEY=VALUE. Got {entry!r} instead.", option=name)
                items.append((key, value))
            else:
                items.append(tuple(entry))
    else:
        raise ConfigError(f"The '{name}' table must map names to values.", option=name)
    return tuple(sorted((str(k), str(v)) for k, v in items))


def load_toml(path: Path) -> dict[str, Any]:
    """Read a run config file into a plain mapping (validated later by ``RunConfig.from_mapping``)."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"Config file {path} does not exist.", option="config") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file {path} is not valid TOML: {exc}.", option="config") from exc
    # TOML keys may use dashes like the flags do.
    return {k.replace("-", "_"): v for k, v in data.items()}


UNSET = "-"  # an option one run sets and another leaves unset (e.g. --dp-clip without --dp in the other)


def flat_options(config: Mapping[str, Any]) -> dict[str, str]:
    """A run's config (``RunConfig.to_dict()``, or summary.json's ``config``) as ``name: value`` strings, in
    the config's order: task and strategy options flattened as ``task.NAME`` and ``strategy.NAME``, unset
    options (None, empty tables) left out. What a run list or a comparison of runs labels runs by.

    >>> flat_options({"fraction": 0.5, "dp_clip": None, "task_options": {"model": "mlp"}, "strategy_options": {}})
    {'fraction': '0.5', 'task.model': 'mlp'}
    """
    out: dict[str, str] = {}
    for name, value in config.items():
        if isinstance(value, dict):
            prefix = "task" if name == "task_options" else "strategy" if name == "strategy_options" else name
            out.update({f"{prefix}.{k}": _option_text(v) for k, v in sorted(value.items())})
        elif value is not None:
            out[name] = _option_text(value)
    return out


def differing_options(runs: Sequence[Mapping[str, str]]) -> list[str]:
    """The names of the ``flat_options`` whose values are not the same in every run (one a run leaves unset
    counts as ``UNSET``), in the order the runs name them: what tells the runs apart.

    >>> differing_options([{"lr": "0.1", "rounds": "5"}, {"lr": "0.2", "rounds": "5", "task.model": "mlp"}])
    ['lr', 'task.model']
    >>> differing_options([{"lr": "0.1"}])
    []
    """
    names = list(dict.fromkeys(name for run in runs for name in run))
    return [n for n in names if len({run.get(n, UNSET) for run in runs}) > 1]


def _option_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)

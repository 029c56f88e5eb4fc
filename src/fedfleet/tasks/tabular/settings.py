"""The tabular task's options: declared as data (``OPTIONS``), parsed once into ``Settings``.

Column lists and layer sizes are comma-separated strings (``features=age,income``, ``hidden=64,64``):
``ListOption`` checks their items where every option is checked (``fedfleet.tasks.task_arguments``,
in the parent of a run), so a bad list is one line before anything starts, with the same template
as every other option's message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedfleet.errors import ConfigError
from fedfleet.options import Option
from fedfleet.tasks import trees

MAX_NAME = 200  # characters of a column name or a category value
MAX_LAYERS = 8
MAX_WIDTH = 4096  # units of one hidden layer
PROBLEMS = ("classification", "regression")
MODELS = ("logreg", "mlp", "gbdt")


def parse_list(text: str, *, sizes: bool) -> tuple[str, ...] | tuple[int, ...] | None:
    """The items of a comma-separated option (names, or layer sizes when ``sizes``); None if malformed."""
    items = [item.strip() for item in text.split(",")]
    if any(not item or len(item) > MAX_NAME for item in items):
        return None
    if not sizes:
        return tuple(items) if len(set(items)) == len(items) else None
    if len(items) > MAX_LAYERS or not all(item.isdigit() and 1 <= int(item) <= MAX_WIDTH for item in items):
        return None
    return tuple(int(item) for item in items)


@dataclass(frozen=True)
class ListOption(Option):
    """A comma-separated list: of column names (distinct), or of hidden layer sizes when ``sizes``."""

    sizes: bool = False

    def allowed(self) -> str:
        if self.sizes:
            return f"a comma-separated list of up to {MAX_LAYERS} layer sizes, each an int in [1, {MAX_WIDTH}]"
        return f"a comma-separated list of distinct column names (each at most {MAX_NAME} characters)"

    def check(self, value: Any, noun: str = "option") -> Any:
        converted = super().check(value, noun)
        if converted is not None and parse_list(converted, sizes=self.sizes) is None:
            raise ConfigError(f"The '{self.name}' {noun} must be {self.allowed()}. Got {value!r} instead.",
                              option=self.name)
        return converted


OPTIONS: tuple[Option, ...] = (
    Option("label", str, None, "the column to predict (required)", optional=True,
           default_text="none: a run needs it"),
    ListOption("features", str, None, "the columns the model reads", optional=True,
               default_text="every column but the label and those in ignore"),
    ListOption("ignore", str, None, "columns left out of the default features (ids, free text, dates)",
               optional=True, default_text="none"),
    ListOption("categorical", str, None, "the features read as categories (one-hot) rather than numbers",
               optional=True, default_text="the columns holding text"),
    Option("problem", str, None, "what the label is", choices=PROBLEMS, optional=True,
           default_text="classification for a text or true/false label, or a whole-number one with at most "
                        "50 distinct values over all sites; regression otherwise"),
    Option("model", str, "logreg", "logreg: logistic (or linear) regression in numpy; mlp: a ReLU MLP in PyTorch "
           "(pip install 'fedfleet[torch]'); gbdt: histogram gradient-boosted trees in numpy, one tree level per "
           "round (--rounds n_trees x max_depth)", choices=MODELS),
    ListOption("hidden", str, "64,64", "the MLP's hidden layer sizes (model=mlp)", sizes=True),
    *trees.OPTIONS,
    Option("min_count", int, 5, "a category value counted fewer times over all sites becomes 'other'",
           low=1, high=10**12),
    Option("chunk_rows", int, 65_536, "rows read from the files into memory at a time", low=1, high=10**8),
)


@dataclass(frozen=True)
class Settings:
    """The options of one tabular task, checked and parsed."""

    label: str | None
    features: tuple[str, ...] | None
    ignore: tuple[str, ...]
    categorical: tuple[str, ...] | None
    problem: str | None
    model: str
    hidden: tuple[int, ...]
    min_count: int
    chunk_rows: int
    gbdt: tuple[tuple[str, Any], ...] = ()  # the trees' options (trees.OPTIONS), as (name, value) pairs

    @classmethod
    def parse(cls, values: dict[str, Any]) -> Settings:
        """``values`` (one per option; None for an optional one not given) checked: ConfigError names a bad one.

        Checked here as well as by ``task_arguments``: the task may be built directly (tests, notebooks).
        """
        known = {o.name: o for o in OPTIONS}
        checked: dict[str, Any] = {
            k: known[k].check(v, "task option") if v is not None or not known[k].optional else None
            for k, v in values.items()}

        def names(key: str) -> tuple[str, ...] | None:
            text = checked[key]
            return None if text is None else tuple(str(n) for n in parse_list(text, sizes=False) or ())

        settings = cls(label=checked["label"], features=names("features"), ignore=names("ignore") or (),
                       categorical=names("categorical"), problem=checked["problem"], model=checked["model"],
                       hidden=tuple(int(n) for n in parse_list(checked["hidden"], sizes=True) or ()),
                       min_count=checked["min_count"], chunk_rows=checked["chunk_rows"],
                       gbdt=tuple((n, checked.get(n, known[n].default)) for n in trees.NAMES))
        label = settings.label
        if label is not None and not 1 <= len(label) <= MAX_NAME:
            raise ConfigError(f"The 'label' task option must be a column name of 1 to {MAX_NAME} characters. Got "
                              f"{len(label)} characters instead.", option="label")
        for key in ("features", "ignore", "categorical"):
            if label is not None and label in (getattr(settings, key) or ()):
                raise ConfigError(f"The '{key}' task option names the label column {label!r}: the label is never "
                                  "a feature.", option=key)
        return settings

    def options(self) -> dict[str, Any]:
        """The options these settings were parsed from, as the task's constructor takes them."""
        def joined(items: tuple[Any, ...] | None) -> str | None:
            return None if items is None else ",".join(str(i) for i in items)

        return {"label": self.label, "features": joined(self.features), "ignore": joined(self.ignore or None),
                "categorical": joined(self.categorical), "problem": self.problem, "model": self.model,
                "hidden": joined(self.hidden), "min_count": self.min_count, "chunk_rows": self.chunk_rows,
                **dict(self.gbdt)}

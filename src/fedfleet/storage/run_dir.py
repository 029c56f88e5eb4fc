"""A run's folder: the only code that writes or reads its files.

    DIR/config.toml          the run's config, written when the run is created
    DIR/state.sqlite         the durable state (storage.sqlite.Store); the truth after a crash
    DIR/checkpoints/         the model after each recent round (storage.checkpoints)
    DIR/metrics.jsonl        one RoundRecord per completed round: a view of state.sqlite's rounds
    DIR/summary.json         the RunSummary, written when the run ends
    DIR/model.safetensors    the final model, written when the run ends
    DIR/plan.json            the plan agreed from the sites' descriptions (tasks that have one): what the
                             model's inputs and outputs mean, e.g. label classes and vocabularies
    DIR/sites/               site-NNN.* files fedfleet run --data-split wrote, one per worker

The coordinator writes through a ``RunDir``; the report, the dashboard of a finished run and the
runner read through one. Constructing a RunDir does no I/O.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedfleet.config import RunConfig
from fedfleet.errors import FedfleetError, ProtocolError, StorageError
from fedfleet.protocol import codec
from fedfleet.storage.checkpoints import Checkpoints
from fedfleet.storage.files import write_atomic, write_text_atomic
from fedfleet.storage.records import RoundRecord, RunSummary
from fedfleet.storage.sqlite import Store
from fedfleet.types import Weights

CONFIG = "config.toml"
STATE = "state.sqlite"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MODEL = "model.safetensors"
PLAN = "plan.json"
SITES = "sites"


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def state_path(self) -> Path:
        return self.path / STATE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def model_path(self) -> Path:
        return self.path / MODEL

    # --- the coordinator's side ------------------------------------------------------------------
    def open_store(self) -> Store:
        return Store(self.state_path)

    def checkpoints(self) -> Checkpoints:
        return Checkpoints(self.path / CHECKPOINTS)

    def start(self, config: RunConfig) -> None:
        """A new run: its config, and no rounds yet."""
        write_text_atomic(self.config_path, config.to_toml())
        self.metrics_path.unlink(missing_ok=True)

    def append_round(self, record: RoundRecord) -> None:
        with self.metrics_path.open("a") as fh:
            fh.write(record.model_dump_json() + "\n")

    def write_rounds(self, records: list[RoundRecord]) -> None:
        """Rewrite metrics.jsonl to hold exactly ``records`` (on resume, from state.sqlite's)."""
        write_text_atomic(self.metrics_path, "".join(r.model_dump_json() + "\n" for r in records))

    def write_summary(self, summary: RunSummary) -> None:
        write_text_atomic(self.summary_path, summary.model_dump_json(indent=2) + "\n")

    def write_model(self, parts: list[bytes | memoryview]) -> None:
        write_atomic(self.model_path, parts)

    def write_plan(self, plan: dict[str, Any]) -> None:
        write_text_atomic(self.path / PLAN, json.dumps(plan, indent=1, allow_nan=False) + "\n")

    @property
    def sites_path(self) -> Path:
        return self.path / SITES

    # --- readers ---------------------------------------------------------------------------------
    def read_config(self) -> RunConfig:
        try:
            return RunConfig.from_mapping(tomllib.loads(self.config_path.read_text()))
        except FileNotFoundError:
            raise StorageError(f"{self.path} has no {CONFIG}; is it a fedfleet run dir "
                               "(fedfleet run --out, fedfleet coordinator --data-dir)?") from None
        except (OSError, ValueError, FedfleetError) as exc:
            raise StorageError(f"cannot read {self.config_path}: {exc}") from exc

    def read_rounds(self) -> list[RoundRecord]:
        """The round records of metrics.jsonl in round order; a line that is not one is named."""
        try:
            text = self.metrics_path.read_text()
        except FileNotFoundError:
            raise StorageError(f"{self.path} has no {METRICS}; is it a fedfleet run dir "
                               "(fedfleet run --out, fedfleet coordinator --data-dir)?") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise StorageError(f"cannot read {self.metrics_path}: {exc}") from exc
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(RoundRecord.model_validate_json(line))
            except ValidationError as exc:
                raise StorageError(f"{self.metrics_path} line {number} is not a round record: "
                                   f"{_first_error(exc)}") from None
        return sorted(records, key=lambda r: r.round)

    def read_summary(self) -> RunSummary | None:
        """summary.json, or None while the run goes on (it is written when the run ends)."""
        try:
            return RunSummary.model_validate_json(self.summary_path.read_bytes())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self.summary_path}: {exc}") from exc
        except ValidationError as exc:
            raise StorageError(f"{self.summary_path} is not a run summary: {_first_error(exc)}") from None

    def read_model(self) -> tuple[Weights, dict[str, str]]:
        """The final model and its safetensors metadata (``version`` among it)."""
        try:
            return codec.decode(self.model_path.read_bytes())
        except (OSError, ProtocolError) as exc:
            raise StorageError(f"cannot read model {self.model_path}: {exc}") from exc

    def read_plan(self) -> dict[str, Any] | None:
        """The run's plan, or None if its task agrees none (or has not yet)."""
        try:
            plan = json.loads((self.path / PLAN).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {self.path / PLAN}: {exc}") from exc
        if not isinstance(plan, dict):
            raise StorageError(f"{self.path / PLAN} is not a JSON object")
        return plan

    def read_store(self) -> Store | None:
        """state.sqlite opened read-only, or None when the folder has none."""
        return Store.read_only(self.state_path) if self.state_path.is_file() else None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "json_invalid":
        return f"not valid JSON ({err['msg']})"
    return f"'{where}' {err['msg'].lower()}" if where else err["msg"]

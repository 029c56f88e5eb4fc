"""The coordinator's Prometheus metrics, served at ``GET /metrics``.

They live on a ``CollectorRegistry`` the engine owns, not on prometheus_client's global one: two
engines in one process (as in the tests) would otherwise clash on names, and a scrape shows exactly
this run. Counters and histograms are fed by the engine and the update intake where things happen;
the gauges (round, accuracy, loss, workers by state) are read from the engine's snapshot when
scraped, so they cannot drift from what ``/v1/status`` says. Everything here runs on the server's event loop, like the
engine, so a scrape reads a consistent state.

Counters start at zero when the coordinator (re)starts, which Prometheus reads as a counter reset;
``fedfleet_current_round`` is the gauge that carries on across a resume.

Which run: one series, ``fedfleet_run_info{run_id, task, partition, strategy} 1``, names the run this
process serves. That is Prometheus's advice for a label that changes rarely ("info metric"; the
exporter guide's "target labels, not static scraped labels"): a label on every series would make
each run's series new ones and every ``sum``/``rate`` in a rule or dashboard would have to name it.
Only the series about the run itself carry ``run_id`` too: its start and end times (so that an
annotation can read them after the process is gone, when there is nothing left to join). A query
that needs the run joins it in on the target::

    fedfleet_global_accuracy_ratio * on (job, instance) group_left (run_id) fedfleet_run_info

Evaluated at each instant, the join gives a coordinator restarted on the same port with a new run a
new series from that moment, and ``fedfleet_run_info{run_id="..."}`` on the right picks one run.

No ``_created`` series: prometheus_client would add one per counter and histogram (and per label
value), a timestamp that nothing here reads and Prometheus stores as a gauge of its own. The switch
is process-wide and read when a metric is made, so it is thrown here, at import, before any is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from fedfleet.errors import ProtocolError
from fedfleet.storage.records import DROP_REASONS, RoundRecord

if TYPE_CHECKING:
    from fedfleet.coordinator.engine import Snapshot

disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

# A fixed set, so that a flood of odd uploads cannot mint new time series; anything else is "other".
REJECT_REASONS = ("stale", "duplicate", "not_sampled", "unknown_worker", "bad_body", "bad_metadata",
                  "bad_schema", "non_finite", "norm", "bad_stats", "too_large", "forbidden", "other")
REFUSE_REASONS = ("unauthorized", "forbidden", "rate_limited", "bad_description", "data_source")
UPDATE_KINDS = ("stats", "train")
WORKER_STATES = ("registered", "live", "sampled", "answered", "dropped")
RUN_STATES = ("waiting", "running", "finished", "failed", "stopped")
ENDED_STATES = frozenset({"finished", "failed", "stopped"})

# Rounds take from milliseconds (a small model on loopback) to many minutes (deadlines of real fleets).
ROUND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# One step of a round: folding, evaluating or writing a model of up to some hundred MB.
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Rejections whose HTTP status says enough; the others carry their own ``reason``.
_REASON_BY_STATUS = {400: "bad_body", 404: "unknown_worker", 409: "stale", 413: "too_large", 422: "bad_schema"}


def rejection_reason(exc: BaseException) -> str:
    """The ``reason`` label of a refused upload: the error's own reason, else one its status implies."""
    if not isinstance(exc, ProtocolError):
        return "other"
    reason = exc.reason or _REASON_BY_STATUS.get(exc.status, "other")
    return reason if reason in REJECT_REASONS else "other"


class CoordinatorMetrics:
    """What the coordinator exports; one per engine."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds_completed = Counter("fedfleet_rounds_completed", "Training rounds completed", registry=r)
        self.rounds_missed_quorum = Counter(
            "fedfleet_rounds_missed_quorum", "Round attempts that closed with fewer answers than the quorum "
            "(the round is then tried again)", registry=r)
        self.updates_accepted = Counter(
            "fedfleet_updates_accepted", "Updates folded into a round, by round kind", ["kind"], registry=r)
        self.updates_rejected = Counter(
            "fedfleet_updates_rejected", "Uploads refused with a 4xx (or failed with a 5xx), by reason",
            ["reason"], registry=r)
        self.requests_refused = Counter(
            "fedfleet_requests_refused", "Requests turned away before reaching the run: no or a wrong token "
            "(unauthorized), a token outside its scope (forbidden), too many registrations (rate_limited)",
            ["reason"], registry=r)
        self.metrics_dropped = Counter(
            "fedfleet_worker_metrics_dropped", "Metrics sent with accepted updates and dropped: a name that is "
            "not snake_case of up to 48 characters (name), more than 32 of them (too_many), a value that is not "
            "finite or over 1e15 in magnitude (range)", ["reason"], registry=r)
        self.rounds_not_applied = Counter(
            "fedfleet_rounds_not_applied", "Round attempts whose aggregate was not finite, so it was not applied "
            "and the round ran again (without the updates to blame, when they could be told)", ["kind"], registry=r)
        self.secagg_failures = Counter(
            "fedfleet_secagg_failures", "Securely aggregated round attempts that failed (too few workers in a "
            "phase, or a secret whose shares would not reconstruct it) and ran again with fresh keys", registry=r)
        self.secagg_bad_shares = Counter(
            "fedfleet_secagg_bad_shares", "Key shares revealed in completed securely aggregated rounds that did not "
            "match their dealer's commitment (refused; the round's record names the sender)", registry=r)
        self.received_bytes = Counter(
            "fedfleet_update_received_bytes", "Bytes of accepted updates (safetensors bodies)", registry=r)
        self.sent_bytes = Counter("fedfleet_model_sent_bytes", "Bytes of the global model sent to workers",
                                  registry=r)
        self.round_seconds = Histogram(
            "fedfleet_round_duration_seconds", "Seconds a training round took, from waiting for workers "
            "to its checkpoint", buckets=ROUND_BUCKETS, registry=r)
        self.aggregation_seconds = Histogram(
            "fedfleet_aggregation_duration_seconds", "Seconds spent turning a round's running sum into the "
            "next global model", buckets=STEP_BUCKETS, registry=r)
        self.evaluation_seconds = Histogram(
            "fedfleet_evaluation_duration_seconds", "Seconds spent testing the new global model on the "
            "held-out set", buckets=STEP_BUCKETS, registry=r)
        self.checkpoint_seconds = Histogram(
            "fedfleet_checkpoint_duration_seconds", "Seconds spent writing a round's checkpoint",
            buckets=STEP_BUCKETS, registry=r)
        # Labelled series exist from the start at 0, so that rate() and dashboards see them before
        # the first event of their kind.
        for kind in UPDATE_KINDS:
            self.updates_accepted.labels(kind=kind)
        for reason in REJECT_REASONS:
            self.updates_rejected.labels(reason=reason)
        for reason in REFUSE_REASONS:
            self.requests_refused.labels(reason=reason)
        for reason in DROP_REASONS:
            self.metrics_dropped.labels(reason=reason)
        for kind in UPDATE_KINDS:
            self.rounds_not_applied.labels(kind=kind)
        self.gauges = _EngineGauges(snapshot, started=time.time())
        r.register(self.gauges)
        ProcessCollector(registry=r)
        # Monotonic times of the last two scrapes: the engine lingers after the run for a scrape to see
        # the end only when something scrapes, for about as long as it scrapes apart.
        self.scrapes: list[float] = []

    # --- events ----------------------------------------------------------------------------------
    def update_accepted(self, kind: str, nbytes: int) -> None:
        self.updates_accepted.labels(kind=kind).inc()
        self.received_bytes.inc(nbytes)

    def update_rejected(self, exc: BaseException) -> None:
        self.updates_rejected.labels(reason=rejection_reason(exc)).inc()

    def request_refused(self, reason: str) -> None:
        self.requests_refused.labels(reason=reason if reason in REFUSE_REASONS else "unauthorized").inc()

    def model_sent(self, nbytes: int) -> None:
        self.sent_bytes.inc(nbytes)

    def worker_metrics_dropped(self, counts: Mapping[str, int]) -> None:
        for reason, n in counts.items():
            self.metrics_dropped.labels(reason=reason if reason in DROP_REASONS else "name").inc(n)

    def round_not_applied(self, kind: str) -> None:
        self.rounds_not_applied.labels(kind=kind).inc()

    def attempt_closed(self, reached_quorum: bool) -> None:
        if not reached_quorum:
            self.rounds_missed_quorum.inc()

    def secagg_failed(self) -> None:
        self.secagg_failures.inc()

    def round_completed(self, record: RoundRecord) -> None:
        """Count a training round from its record (the one written to metrics.jsonl)."""
        self.rounds_completed.inc()
        if record.secagg is not None:
            self.secagg_bad_shares.inc(len(record.secagg.bad_shares))
        self.round_seconds.observe(record.seconds)
        self.aggregation_seconds.observe(record.timings.aggregate)
        self.evaluation_seconds.observe(record.timings.evaluate)
        self.checkpoint_seconds.observe(record.timings.checkpoint)

    # --- exposition ------------------------------------------------------------------------------
    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape body and its content type, in the format the scraper asked for (``Accept``)."""
        encoder, content_type = choose_encoder(accept or "")
        self.scrapes = [*self.scrapes[-1:], time.monotonic()]
        return encoder(self.registry), content_type

    @property
    def scrape_interval(self) -> float | None:
        """Seconds between the last two scrapes; None before the second."""
        return self.scrapes[1] - self.scrapes[0] if len(self.scrapes) == 2 else None

    @property
    def end_scraped(self) -> bool:
        """Whether a scrape has seen the run over (and so exported its end time and state)."""
        return self.gauges.ended is not None


class _EngineGauges:
    """Gauges read from the engine's snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], Snapshot], started: float) -> None:
        self.snapshot = snapshot
        self.started = started  # Unix time this process took the run up (started or resumed it)
        self.ended: float | None = None  # Unix time a scrape first saw the run over

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        yield from self._run(s)
        yield GaugeMetricFamily(
            "fedfleet_current_round", "Training round in progress, or the last completed one between rounds "
            "(0 before the first)", value=s.current_round)
        yield GaugeMetricFamily("fedfleet_rounds_planned", "Training rounds the run is configured for",
                                value=s.rounds_planned)
        # No sample before the first evaluation: an absent value, not a made-up zero.
        accuracy = GaugeMetricFamily("fedfleet_global_accuracy_ratio",
                                     "Accuracy of the global model on the held-out set (0..1)")
        loss = GaugeMetricFamily("fedfleet_global_loss", "Loss of the global model on the held-out set")
        if s.accuracy is not None:
            accuracy.add_metric([], s.accuracy)
        if s.loss is not None:
            loss.add_metric([], s.loss)
        yield accuracy
        yield loss
        participants = GaugeMetricFamily("fedfleet_round_participants",
                                         "Workers whose updates made the last completed round")
        if s.last_participants is not None:
            participants.add_metric([], s.last_participants)
        yield participants
        counts = {
            "registered": s.workers_registered,
            "live": s.workers_live,
            "sampled": s.open_round.sampled if s.open_round else 0,
            "answered": s.open_round.answered if s.open_round else 0,
            "dropped": s.dropped,
        }
        workers = GaugeMetricFamily(
            "fedfleet_workers", "Workers by state: registered, live (heard from within --worker-timeout), "
            "sampled and answered in the open round, dropped (sampled but silent in the last round attempt "
            "that closed)", labels=["state"])
        for state in WORKER_STATES:
            workers.add_metric([state], counts[state])
        yield workers
        needed = GaugeMetricFamily(
            "fedfleet_workers_needed", "Workers the run needs now: live ones to open the next round while it waits "
            "for them, answers to reach the quorum while a round is open (absent between the two)")
        wanted = s.waiting.needed if s.waiting is not None else s.open_round.needed if s.open_round else None
        if wanted is not None:
            needed.add_metric([], wanted)
        yield needed
        run_state = GaugeMetricFamily("fedfleet_run_state", "1 for the state the run is in", labels=["state"])
        for state in RUN_STATES:
            run_state.add_metric([state], 1.0 if s.state == state else 0.0)
        yield run_state
        if s.dp_epsilon is not None:  # only in a run with --dp central: absent, not 0, without it
            yield GaugeMetricFamily(
                "fedfleet_dp_epsilon", "Differential privacy spent: epsilon of the (epsilon, delta) guarantee of "
                "the models released by the recorded rounds (--dp central; delta in summary.json)",
                value=s.dp_epsilon)

    def _run(self, s: Snapshot) -> Iterator[Metric]:
        """Which run this is, and when it started and ended: what dashboards join on and annotate with."""
        info = GaugeMetricFamily("fedfleet_run_info", "Always 1; labels name the run. Join it in for the run id: "
                                 "X * on (job, instance) group_left (run_id) fedfleet_run_info",
                                 labels=["run_id", "task", "partition", "strategy"])
        info.add_metric([s.run_id, s.task, s.partition, s.strategy], 1.0)
        yield info
        start = GaugeMetricFamily("fedfleet_run_start_time_seconds", "Unix time this coordinator process started "
                                  "the run, or resumed it from its data dir", labels=["run_id"])
        start.add_metric([s.run_id], self.started)
        yield start
        # The engine says that the run is over, not when: the first scrape that sees it over keeps the time,
        # close enough for an annotation (a scrape interval late at most).
        if self.ended is None and s.state in ENDED_STATES:
            self.ended = time.time()
        end = GaugeMetricFamily("fedfleet_run_end_time_seconds", "Unix time the run was first seen over at a "
                                "scrape, and how it ended (state: finished, failed or stopped); absent until then",
                                labels=["run_id", "state"])
        if self.ended is not None:
            end.add_metric([s.run_id, s.state], self.ended)
        yield end

"""A worker process's Prometheus metrics, served with ``fedfleet worker --metrics-port PORT``.

One registry per worker process (not prometheus_client's global one, so that nothing imported by a
task can slip series into it). With ``--clients K`` the K logical workers of the process feed the
same metrics: the process is what Prometheus scrapes, and a per-worker label would multiply every
histogram by K. CPU and memory come from prometheus_client's ProcessCollector
(``process_cpu_seconds_total``, ``process_resident_memory_bytes``, ...; read from /proc on Linux).

No ``_created`` series (a creation timestamp per counter and histogram that nothing reads): the
switch is process-wide and read when a metric is made, so it is thrown at import, before any is.
"""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from fedfleet import log
from fedfleet.errors import ConfigError

disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

# A local fit takes from milliseconds (a small model) to many minutes.
TRAIN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                 300.0, 600.0)
# Moving a model over a LAN or loopback: from under a millisecond to a minute.
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0)
THROUGHPUT_BUCKETS = tuple(m * 10.0**e for e in range(1, 8) for m in (1.0, 2.5, 5.0))
UPLOAD_RESULTS = ("accepted", "rejected", "refused", "failed", "diverged", "error")


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.train_seconds = Histogram(
            "fedfleet_worker_train_duration_seconds", "Seconds of one local training (fit) of a round",
            buckets=TRAIN_BUCKETS, registry=r)
        self.examples_per_second = Histogram(
            "fedfleet_worker_train_examples_per_second", "Examples per second of one local training, "
            "counting every epoch", buckets=THROUGHPUT_BUCKETS, registry=r)
        self.examples = Counter("fedfleet_worker_examples_trained", "Examples trained on, counting every epoch",
                                registry=r)
        self.download_seconds = Histogram(
            "fedfleet_worker_model_download_duration_seconds", "Seconds to download the global model "
            "(once per model version per process)", buckets=TRANSFER_BUCKETS, registry=r)
        self.upload_seconds = Histogram(
            "fedfleet_worker_update_upload_duration_seconds", "Seconds to upload an update and hear it was accepted",
            buckets=TRANSFER_BUCKETS, registry=r)
        self.uploads = Counter(
            "fedfleet_worker_uploads", "Updates of instructions answered, by outcome: accepted; rejected (stale, "
            "duplicate, unknown worker: the round moved on); refused (the coordinator found the update bad); "
            "failed (did not get through after retries); diverged (not sent: the fit gave non-finite weights, or "
            "the statistics were non-finite); error (not built or sent: the task or the worker raised, see the "
            "log)", ["result"], registry=r)
        self.nonfinite_metrics = Counter(
            "fedfleet_worker_nonfinite_metrics", "Metric values (e.g. train_loss of a diverging fit) left out of "
            "an update because they were NaN or infinite", registry=r)
        self.clients = Gauge("fedfleet_worker_clients", "Logical workers of this process registered with the "
                             "coordinator", registry=r)
        # As the coordinator's fedfleet_run_info: the run on one info series, joined in on the target
        # (X * on (job, instance) group_left (run_id) fedfleet_worker_run_info), not a label on every series.
        self.run_info = Gauge("fedfleet_worker_run_info", "Always 1; run_id names the run this process's workers "
                              "joined (absent until one registered). Join it in for the run id: "
                              "X * on (job, instance) group_left (run_id) fedfleet_worker_run_info",
                              ["run_id"], registry=r)
        self._run_id: str | None = None
        for result in UPLOAD_RESULTS:
            self.uploads.labels(result=result)
        ProcessCollector(registry=r)

    def joined_run(self, run_id: str) -> None:
        """A worker of this process registered with the run ``run_id``: the info series names it (only it:
        a coordinator restarted with a new run replaces the old one)."""
        if run_id != self._run_id:
            self.run_info.clear()
            self.run_info.labels(run_id=run_id).set(1)
            self._run_id = run_id

    def trained(self, seconds: float, examples: int) -> None:
        """One local fit of ``examples`` examples (every epoch counted) that took ``seconds``."""
        self.train_seconds.observe(seconds)
        self.examples.inc(examples)
        if seconds > 0:
            self.examples_per_second.observe(examples / seconds)


def serve(metrics: WorkerMetrics, host: str, port: int) -> WSGIServer:
    """Serve ``metrics`` over HTTP on ``host:port`` from a daemon thread; ConfigError if it cannot listen."""
    try:
        server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise ConfigError(f"The 'metrics-port' option: cannot serve metrics on {host}:{port} ({exc.strerror or exc})",
                          option="metrics_port") from exc
    shown = f"[{host}]" if ":" in host else host
    log.event("worker.metrics", logging.INFO, url=f"http://{shown}:{server.server_port}/metrics")
    return server

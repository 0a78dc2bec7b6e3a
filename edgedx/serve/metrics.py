"""Prometheus metrics of one daemon: counts by outcome, latency histograms, queue depth. No PHI."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Seconds; an int8 slice takes about a millisecond, a 512x512 DICOM read a few more.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The daemon's metrics in a registry of their own (tests run several daemons in one process)."""

    def __init__(
        self,
        queue_depth: Callable[[], float],
        bundle: str,
        role: str,
        backend: str,
        *,
        forward_backlog: Callable[[], float] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.inputs = Counter(
            "edgedx_inputs",
            "Inputs by source and outcome "
            "(positive, negative, out_of_distribution, quarantined, duplicate, refused, busy, no-storage, error).",
            ["source", "outcome"],
            registry=self.registry,
        )
        self.inference = Histogram(
            "edgedx_inference_seconds",
            "Preprocessing and model time per instance.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.processing = Histogram(
            "edgedx_processing_seconds",
            "Time from acceptance to a published result, per instance.",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.reports_skipped = Counter(
            "edgedx_reports_skipped",
            "Results published without a DICOM SR because the source header cannot make one.",
            registry=self.registry,
        )
        self.storage_errors = Counter(
            "edgedx_storage_errors",
            "Writes of outputs that failed (disk full, I/O error); the input stays spooled and is retried.",
            registry=self.registry,
        )
        self.forwarded = Counter(
            "edgedx_forwarded", "SRs the PACS acknowledged (--forward-to).", registry=self.registry
        )
        self.forward_failures = Counter(
            "edgedx_forward_failures",
            "Failed attempts to forward (no association, or a C-STORE failure status); retried with back-off.",
            registry=self.registry,
        )
        if forward_backlog is not None:
            backlog = Gauge("edgedx_forward_backlog", "SRs waiting in the outbox.", registry=self.registry)
            backlog.set_function(forward_backlog)
        depth = Gauge("edgedx_queue_depth", "Accepted inputs not yet finished.", registry=self.registry)
        depth.set_function(queue_depth)
        info = Gauge(
            "edgedx_model_info", "The model being served.", ["bundle", "role", "backend"], registry=self.registry
        )
        info.labels(bundle=bundle, role=role, backend=backend).set(1)

    def count(self, source: str, outcome: str) -> None:
        self.inputs.labels(source=source, outcome=outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

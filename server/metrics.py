"""Prometheus metrics of one server: the events the services record, and the states read at scrape time.

Two kinds, so nothing drifts:

- states (jobs, rounds, copies and leases by state, the privacy headline ε) are read from the
  Store each time /metrics is scraped (`StoreCollector`): a restart or a crash cannot make them
  disagree with the state the server acts on;
- events that leave no record (bytes served and received, how long copy generation, uploads,
  merges and steps took, refusals and failures by reason) are counted where they happen, by the
  `Metrics` object the service hands its parts. They start at zero with the process, as
  Prometheus counters do.

Each `Metrics` has its own registry (one per app): nothing global, no test resets anything.
/metrics is admin-only (the same bearer token as the admin API): job ids, rounds and ε are the
operator's business, and one port keeps TLS and the firewall as they are.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pum.common.errors import PumError
from pum.common.states import CopyState, JobState, LeaseState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: a tiny CPU model takes milliseconds, a 7B model's copy minutes.
BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    """The counters and histograms of one server, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.served = Counter("pum_served_bytes", "Bytes sent to workers and the admin, by what they are "
                              "(copy, file: a public file, model: the merged model)", ["what"], registry=r)
        self.received = Counter("pum_received_bytes", "Bytes of deltas received from workers", registry=r)
        self.failures = Counter("pum_failures", "Failures and refusals by reason (lease_expired, given_back, "
                                "upload_<error>, step_failed)", ["reason"], registry=r)
        self.copy_seconds = Histogram("pum_copy_generation_seconds", "Time to generate and send one whole copy",
                                      buckets=BUCKETS, registry=r)
        self.upload_seconds = Histogram("pum_upload_seconds", "Time to receive, parse and check one delta",
                                        buckets=BUCKETS, registry=r)
        self.merge_seconds = Histogram("pum_merge_seconds", "Time to fold one delta into S0 and S1",
                                       buckets=BUCKETS, registry=r)
        self.step_seconds = Histogram("pum_step_seconds", "Time to apply one round's step θ ← θ + η·S1/S0",
                                      buckets=BUCKETS, registry=r)

    def attach(self, collector) -> None:
        """Add a collector of states read at scrape time (the service's `StoreCollector`)."""
        self.registry.register(collector)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)

    def failed(self, reason: str) -> None:
        self.failures.labels(reason=reason).inc()

    def counted(self, what: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """The chunks, each counted as served when it is handed to the connection."""
        counter = self.served.labels(what=what)
        for chunk in chunks:
            counter.inc(len(chunk))
            yield chunk


class StoreCollector:
    """Gauges of the states in the Store, computed at each scrape."""

    def __init__(self, store, epsilon: Callable[[str], float | None]):
        """`epsilon(job_id)`: the privacy report's headline ε (math.inf when unbounded, None when not computed)."""
        self.store, self.epsilon = store, epsilon

    def describe(self):
        return []  # nothing is read at registration: the store may still be recovering

    def collect(self):
        jobs = GaugeMetricFamily("pum_jobs", "Jobs by state", labels=["state"])
        rounds = GaugeMetricFamily("pum_job_round", "The job's current round (0 before its start)", labels=["job"])
        planned = GaugeMetricFamily("pum_job_rounds", "Rounds R the job runs", labels=["job"])
        merged = GaugeMetricFamily("pum_job_rounds_merged", "Rounds whose step has been applied", labels=["job"])
        copies = GaugeMetricFamily("pum_copies", "Copies of the job's current round by state", labels=["job", "state"])
        accepted = CounterMetricFamily("pum_copies_accepted", "Copies merged, over all rounds", labels=["job"])
        leases = GaugeMetricFamily("pum_leases", "Leases by state (expired: no heartbeat in time; failed: given "
                                   "back after a failure)", labels=["job", "state"])
        granted = CounterMetricFamily("pum_leases_granted", "Leases granted", labels=["job"])
        epsilon = GaugeMetricFamily("pum_privacy_epsilon", "The privacy report's headline ε over all R rounds "
                                    "(+Inf: unbounded; absent: not computed)", labels=["job"])
        by_state = dict.fromkeys(JobState, 0)
        for job in self.store.jobs():
            by_state[job.state] += 1
            rounds.add_metric([job.id], job.round)
            planned.add_metric([job.id], job.spec.settings.rounds_R)
            job_rounds = self.store.rounds(job.id)
            merged.add_metric([job.id], sum(r.finished_at is not None for r in job_rounds))
            accepted.add_metric([job.id], sum(r.accepted for r in job_rounds))
            current = dict.fromkeys(CopyState, 0)
            for copy in self.store.copies(job.id, job.round) if job.round else []:
                current[copy.state] += 1
            for state, count in current.items():
                copies.add_metric([job.id, str(state)], count)
            job_leases = self.store.leases(job.id)
            counts = dict.fromkeys(LeaseState, 0)
            for lease in job_leases:
                counts[lease.state] += 1
            for state, count in counts.items():
                leases.add_metric([job.id, str(state)], count)
            granted.add_metric([job.id], len(job_leases))
            value = self.epsilon(job.id)
            if value is not None:
                epsilon.add_metric([job.id], value)
        for state, count in by_state.items():
            jobs.add_metric([str(state)], count)
        return [jobs, rounds, planned, merged, copies, accepted, leases, granted, epsilon]


def headline_epsilon(report) -> float | None:
    """The report's ε as a number for a gauge: math.inf when unbounded, None when not computed."""
    return math.inf if report.epsilon == "inf" else report.epsilon


def reason_of(err: BaseException) -> str:
    """A failure's reason as a label: the error class in snake case (a bounded set), e.g. invalid_input."""
    name = type(err).__name__ if isinstance(err, PumError) else "internal_error"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()

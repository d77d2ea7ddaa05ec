"""Prometheus metrics of one server (its own registry, so tests can run several servers)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("internvl_running_sequences", "sequences being prefilled or decoded", registry=r)
        self.waiting = Gauge("internvl_waiting_sequences", "sequences waiting for KV blocks or a batch slot",
                             registry=r)
        self.preempted = Gauge("internvl_preemptions", "sequences preempted (recomputed) since start", registry=r)
        self.blocks_used = Gauge("internvl_kv_blocks_used", "KV cache blocks held by sequences", registry=r)
        self.blocks_free = Gauge("internvl_kv_blocks_free", "free KV cache blocks", registry=r)
        self.prompt_tokens = Counter("internvl_prompt_tokens", "prompt tokens accepted", registry=r)
        self.generation_tokens = Counter("internvl_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("internvl_time_to_first_token_seconds", "request arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.token_latency = Histogram("internvl_inter_token_latency_seconds", "time between two tokens of a request",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.decode_step = Histogram("internvl_decode_step_seconds", "one decode step of the whole batch",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.finished = Counter("internvl_sequences_finished", "sequences ended, by reason", ["reason"], registry=r)
        self.requests = Counter("internvl_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

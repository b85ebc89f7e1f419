"""Prometheus text metrics on --metrics-port (a plain http.server thread), Triton-style names where
Triton has one (nv_inference_*), ftjax_* for the rest.

    nv_inference_request_success / nv_inference_request_failure   counters, per model
    nv_inference_count                                             inferences (rows) completed
    nv_inference_request_duration_us / nv_inference_queue_duration_us   cumulative microseconds
    ftjax_queue_seconds, ftjax_time_to_first_token_seconds         histograms
    ftjax_generated_tokens_total                                   counter (rate() = tokens/s)
    ftjax_batch_slots_live, ftjax_batch_slots, ftjax_batch_occupancy   gauges
    ftjax_queue_waiting                                            gauge
"""
from __future__ import annotations

import collections
import http.server
import threading

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Hist:
    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.sum = 0.0
        self.n = 0

    def observe(self, v):
        self.sum += v
        self.n += 1
        for i, b in enumerate(BUCKETS):
            if v <= b:
                self.counts[i] += 1


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.success = collections.Counter()
        self.failure = collections.Counter()
        self.inferences = collections.Counter()
        self.request_us = collections.Counter()
        self.queue_us = collections.Counter()
        self.tokens_total = collections.Counter()
        self.queue_hist = collections.defaultdict(_Hist)
        self.ttft_hist = collections.defaultdict(_Hist)
        self.live = {}
        self.slots = {}
        self.waiting_fn = {}
        self.last_inference_ms = collections.Counter()

    # --- recording (scheduler thread / handlers)
    def queue_time(self, model, s):
        with self._lock:
            self.queue_hist[model].observe(s)
            self.queue_us[model] += int(s * 1e6)

    def first_token(self, model, s):
        with self._lock:
            self.ttft_hist[model].observe(s)

    def tokens(self, model, n):
        if n:
            with self._lock:
                self.tokens_total[model] += n

    def occupancy(self, model, live, slots):
        with self._lock:
            self.live[model], self.slots[model] = live, slots

    def request_done(self, model, ok: bool, seconds: float, generated: int, rows: int = 1):
        import time

        with self._lock:
            (self.success if ok else self.failure)[model] += 1
            if ok:
                self.inferences[model] += rows
            self.request_us[model] += int(seconds * 1e6)
            self.last_inference_ms[model] = int(time.time() * 1000)

    def failed(self, model):
        """A request refused before reaching the scheduler (bad input, queue full)."""
        with self._lock:
            self.failure[model] += 1

    # --- rendering
    def render(self) -> str:
        out = []
        with self._lock:
            def counter(name, help_, data):
                out.append(f"# HELP {name} {help_}\n# TYPE {name} counter")
                for m, v in sorted(data.items()):
                    out.append(f'{name}{{model="{m}",version="1"}} {v}')

            def gauge(name, help_, data):
                out.append(f"# HELP {name} {help_}\n# TYPE {name} gauge")
                for m, v in sorted(data.items()):
                    out.append(f'{name}{{model="{m}"}} {v}')

            def hist(name, help_, data):
                out.append(f"# HELP {name} {help_}\n# TYPE {name} histogram")
                for m, h in sorted(data.items()):
                    for b, c in zip(BUCKETS, h.counts):
                        out.append(f'{name}_bucket{{model="{m}",le="{b}"}} {c}')
                    out.append(f'{name}_bucket{{model="{m}",le="+Inf"}} {h.n}')
                    out.append(f'{name}_sum{{model="{m}"}} {h.sum:.6f}')
                    out.append(f'{name}_count{{model="{m}"}} {h.n}')

            counter("nv_inference_request_success", "Number of successful inference requests", self.success)
            counter("nv_inference_request_failure", "Number of failed inference requests", self.failure)
            counter("nv_inference_count", "Number of inferences (rows) performed", self.inferences)
            counter("nv_inference_request_duration_us", "Cumulative request duration in microseconds",
                    self.request_us)
            counter("nv_inference_queue_duration_us", "Cumulative time requests spend waiting in the queue",
                    self.queue_us)
            counter("ftjax_generated_tokens_total", "Tokens generated (rate() gives tokens/s)", self.tokens_total)
            hist("ftjax_queue_seconds", "Time from arrival to admission into a slot", self.queue_hist)
            hist("ftjax_time_to_first_token_seconds", "Time from arrival to the first generated token",
                 self.ttft_hist)
            gauge("ftjax_batch_slots_live", "Slots holding a request", self.live)
            gauge("ftjax_batch_slots", "Slots (engine max batch size)", self.slots)
            gauge("ftjax_batch_occupancy", "Fraction of slots holding a request",
                  {m: (self.live[m] / self.slots[m] if self.slots.get(m) else 0.0) for m in self.live})
            gauge("ftjax_queue_waiting", "Requests waiting for a slot", {m: f() for m, f in self.waiting_fn.items()})
        return "\n".join(out) + "\n"


class MetricsServer:
    """Serves Metrics.render() at /metrics (and /) on host:port; port 0 picks a free one."""

    def __init__(self, metrics: Metrics, host: str, port: int):
        m = metrics

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path.split("?")[0] not in ("/", "/metrics"):
                    self.send_error(404)
                    return
                body = m.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        try:
            self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise OSError(f"metrics server: cannot bind {host}:{port} ({e.strerror or e}); choose another "
                          f"--metrics-port") from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ftjax-metrics", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

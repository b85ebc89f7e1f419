"""Multi-host: `jax.distributed` setup, and process 0 leading the others step by step.

`initialize(coordinator_address, num_processes, process_id)` wraps `jax.distributed.initialize`: with no
arguments jax auto-detects the cluster (SLURM, Open MPI, ...). A peer that dies is noticed within
`heartbeat_timeout_s` (default 30 s, env FTJAX_HEARTBEAT_TIMEOUT_S) instead of jax's 100 s, and
joining gives up after `init_timeout_s` (default 300 s, env FTJAX_INIT_TIMEOUT_S).

Serving on several hosts (one process per host): every process loads the model onto the same global
mesh; process 0 runs the gRPC server and the scheduler, and its engine is wrapped in a `Leader` that
publishes every engine call (init_state, prefill_insert, retire, generate_steps: the request batch and
its slots) before running it. The other processes `follow`: they run the same calls in the same order
on their own copy of the decode state, so every compiled step runs on all hosts at once — no process
decides anything on its own. Calls travel through the jax.distributed coordination service's key-value
store (host-side, no device collective while idle); a follower that cannot reach process 0 for longer
than the heartbeat timeout fails with an error naming it.
"""
from __future__ import annotations

import logging
import os
import pickle
import time

import jax

log = logging.getLogger("ftjax")

_PREFIX = "ftjax/engine_call"
_KEEP = 16          # calls kept in the store; followers are never more than one call behind


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v else default


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout_s: int | None = None,
               init_timeout_s: int | None = None, local_device_ids=None) -> None:
    """jax.distributed.initialize with fail-fast timeouts; no arguments -> auto-detect as jax does.
    Idempotent. Call it before anything touches a device."""
    from jax._src import distributed as _d

    if _d.global_state.client is not None:
        return
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("coordinator_address, num_processes and process_id go together (or none: auto-detect)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} not in [0, num_processes={num_processes})")
    hb = heartbeat_timeout_s or _env_int("FTJAX_HEARTBEAT_TIMEOUT_S", 30)
    it = init_timeout_s or _env_int("FTJAX_INIT_TIMEOUT_S", 300)
    if jax.config.jax_platforms and "cpu" in jax.config.jax_platforms:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               initialization_timeout=it, heartbeat_timeout_seconds=hb)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def _client():
    from jax._src import distributed as _d

    if _d.global_state.client is None:
        raise RuntimeError("jax.distributed is not initialized (ftjax.sharding.distributed.initialize first)")
    return _d.global_state.client


class Leader:
    """Process 0's engine: publishes each call, then runs it. Anything else is the engine's own."""

    CALLS = ("init_state", "prefill_insert", "retire", "release_slots", "generate_steps", "generate_snap")

    def __init__(self, engine, channel: str = "0"):
        self._engine, self._channel, self._n = engine, channel, 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def _publish(self, op: str, args: tuple) -> None:
        c = _client()
        c.key_value_set_bytes(f"{_PREFIX}/{self._channel}/{self._n}", pickle.dumps((op, args)))
        if self._n >= _KEEP:
            try:
                c.key_value_delete(f"{_PREFIX}/{self._channel}/{self._n - _KEEP}")
            except Exception:  # noqa: BLE001 - best effort clean-up
                pass
        self._n += 1

    def init_state(self):
        self._publish("init_state", ())
        return self._engine.init_state()

    def prefill_insert(self, state, prompts, slots, max_new, params_list):
        self._publish("prefill_insert", (prompts, slots, max_new, list(params_list)))
        return self._engine.prefill_insert(state, prompts, slots, max_new, params_list)

    def retire(self, state, slots):
        self._publish("retire", (list(slots),))
        return self._engine.retire(state, slots)

    def release_slots(self, slots):   # host-side, but it decides the next calls' compiled variant: published
        self._publish("release_slots", (list(slots),))
        return self._engine.release_slots(slots)

    def generate_steps(self, state, n_steps: int):
        self._publish("generate_steps", (int(n_steps),))
        return self._engine.generate_steps(state, n_steps)

    def generate_snap(self, state, n_steps: int):
        self._publish("generate_snap", (int(n_steps),))
        return self._engine.generate_snap(state, n_steps)

    def stop(self):
        self._publish("stop", ())


def follow(engine, channel: str = "0", poll_s: float = 1.0) -> int:
    """Runs process 0's engine calls on this process until it says stop; returns the calls run.
    RuntimeError when process 0 (or the coordination service) is gone."""
    c = _client()
    state, n, last = None, 0, time.monotonic()
    while True:
        key = f"{_PREFIX}/{channel}/{n}"
        try:
            raw = c.blocking_key_value_get_bytes(key, int(poll_s * 1000))
        except Exception as e:  # noqa: BLE001 - a timeout while process 0 is idle, or process 0 is gone
            msg = str(e)
            if "DEADLINE_EXCEEDED" in msg:
                continue      # idle server; the coordination service itself watches process 0's heartbeat
            raise RuntimeError(f"lost process 0 (the server) after {time.monotonic() - last:.0f} s without an "
                               f"engine call; the coordination service says: {msg.splitlines()[0][:300]}") from e
        last = time.monotonic()
        op, args = pickle.loads(raw)
        n += 1
        if op == "stop":
            return n
        try:
            if op == "init_state":
                state = engine.init_state()
            elif op == "prefill_insert":
                state = engine.prefill_insert(state, *args)
            elif op == "retire":
                state = engine.retire(state, *args)
            elif op == "release_slots":
                engine.release_slots(*args)
            elif op == "generate_steps":
                state, _ = engine.generate_steps(state, *args)
            elif op == "generate_snap":   # the snapshot is a computation over the mesh: every process runs it
                state, _, _ = engine.generate_snap(state, *args)
            else:
                raise RuntimeError(f"unknown engine call {op!r} from process 0")
        except ValueError as e:   # the same refusal happened on process 0 (it validated the same request)
            log.info("follower: %s refused as on process 0: %s", op, e)


def lead_or_follow(models) -> bool:
    """For `python -m ftjax.serve` in a multi-host run: on process 0 wraps each model's engine in a
    Leader and returns True (serve); on the others follows process 0 until it stops and returns False.
    One process: True, nothing changed."""
    if jax.process_count() == 1:
        return True
    if jax.process_index() == 0:
        for i, m in enumerate(models):
            m.llm.engine = Leader(m.llm.engine, channel=str(i))
        return True
    import threading

    errors: list[BaseException] = []

    def run(i, m):
        try:
            follow(m.llm.engine, channel=str(i))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, m), daemon=True) for i, m in enumerate(models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return False


def release(models) -> None:
    """Process 0 at shutdown: tells the followers to stop."""
    for m in models:
        if isinstance(m.llm.engine, Leader):
            m.llm.engine.stop()

"""Read a Perfetto trace (`profile_decode.py --save-trace FILE.json.gz`) as one timeline: the host's
events (Python calls, XLA runtime TraceMe events) of at least --min-us, and the GPU's kernels merged into
busy clusters (kernels closer than --gap-us), all on one clock, in order. Shows where the host spends
the time in which the GPU waits.

    python bench/host_trace.py trace.json.gz [--min-us 100] [--gap-us 30] [--depth 3]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import perfetto_events  # noqa: E402


def load(path):
    events, pname, tname = perfetto_events(path)
    gpu, host = [], []
    for e in events:
        if e.get("ph") != "X":
            continue
        p, t = pname.get(e["pid"], ""), tname.get((e["pid"], e.get("tid")), "")
        rec = (float(e["ts"]), float(e.get("dur", 0.0)), e.get("name", ""), t)
        if "GPU" in p:
            if "Stream" in t and "memset" not in rec[2].lower():
                gpu.append(rec)
        else:
            host.append(rec)
    return gpu, host


def clusters(gpu, gap_us):
    out = []
    for ts, d, name, _ in sorted(gpu):
        if out and ts - out[-1][1] <= gap_us:
            c = out[-1]
            c[1] = max(c[1], ts + d)
            c[2] += 1
            c[3] += d
        else:
            out.append([ts, ts + d, 1, d, name])
    return out


def nest_depth(host):
    """Depth of each host event within its thread (0 = outermost)."""
    by_thread = {}
    for ev in sorted(host, key=lambda r: (r[3], r[0], -r[1])):
        by_thread.setdefault(ev[3], []).append(ev)
    depth = {}
    for evs in by_thread.values():
        stack = []
        for ev in evs:
            while stack and ev[0] >= stack[-1][0] + stack[-1][1]:
                stack.pop()
            depth[id(ev)] = len(stack)
            stack.append(ev)
    return depth


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--min-us", type=float, default=100.0)
    ap.add_argument("--gap-us", type=float, default=30.0)
    ap.add_argument("--depth", type=int, default=4, help="host events nested deeper than this are left out")
    ap.add_argument("--grep", default=None, help="only host events whose name contains this")
    a = ap.parse_args()
    gpu, host = load(a.trace)
    t0 = min([r[0] for r in gpu] + [r[0] for r in host])
    depth = nest_depth(host)
    rows = []
    for c in clusters(gpu, a.gap_us):
        rows.append((c[0], c[1] - c[0], f"GPU  {c[2]:5d} kernels busy {c[3]:8.0f} us  first {c[4][:60]}", "", 0))
    for ev in host:
        if ev[1] >= a.min_us and depth[id(ev)] <= a.depth and (a.grep is None or a.grep in ev[2]):
            rows.append((ev[0], ev[1], ev[2][:90], ev[3][:24], depth[id(ev)]))
    rows.sort(key=lambda r: (r[0], -r[1]))
    for ts, d, name, thread, dp in rows:
        print(f"{(ts - t0) / 1e3:9.3f} ms {d / 1e3:8.3f} ms  {thread:24s} {'  ' * dp}{name}")


if __name__ == "__main__":
    main()

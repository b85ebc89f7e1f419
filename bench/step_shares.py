"""Where a decode step's time goes, per kernel: reads the kernel sequence that `bench/profile_decode.py
--sequence F` writes (~2 steps from the middle of the loop: duration and gap to the previous kernel's end, µs,
then the name) and prints each kernel's median duration and share over the layers.

    python bench/step_shares.py F [--anchor decode_attention] [--weights-us 9.0]

A kernel's share is the time from the previous kernel's end to its own end (its duration plus its gap; the gap is
negative when the kernel was launched early and waited inside, as with PDL): shares add up to the span, so they
say what each kernel costs the step. The layer is the run of kernels from one anchor kernel (the attention) to
the next; its kernels are matched by position, and the kernels outside full layers (the step's head, sampler and
bookkeeping, the first layer's q/k/v) are listed one by one.
"""
from __future__ import annotations

import argparse
import re
import statistics


def read(path):
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.split(None, 2)
            if len(parts) == 3:
                rows.append((float(parts[0]), float(parts[1]), parts[2].strip()))
    return rows


def short(name: str, width: int = 60) -> str:
    name = re.sub(r"\s+", " ", name)
    return name if len(name) <= width else name[: width - 1] + "…"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("sequence")
    ap.add_argument("--anchor", default="decode_attention", help="a substring of the one kernel a layer runs once")
    ap.add_argument("--weights-us", type=float, default=None, help="a layer's weight bytes over copy bandwidth, "
                    "µs, to print beside the layer's total")
    a = ap.parse_args(argv)
    rows = read(a.sequence)
    if not rows:
        raise SystemExit(f"{a.sequence}: no kernel rows")
    # the first row's gap is unknown (0 in the file): its share is its duration
    shares = [d + (g if i else 0.0) for i, (d, g, _) in enumerate(rows)]
    anchors = [i for i, (_, _, n) in enumerate(rows) if a.anchor in n]
    if len(anchors) < 3:
        raise SystemExit(f"{a.sequence}: fewer than 3 kernels named like {a.anchor!r}; no layer to match")
    periods = [j - i for i, j in zip(anchors, anchors[1:])]
    period = statistics.mode(periods)
    layers = [(i, j) for i, j in zip(anchors, anchors[1:]) if j - i == period]
    print(f"{len(rows)} kernels, span {sum(shares):.1f} µs; {len(layers)} whole layers of {period} kernels "
          f"(anchor {a.anchor!r}; {sum(p != period for p in periods)} runs of another length)")
    print(f"{'pos':>3} {'duration':>9} {'share':>7}  kernel (first layer's name)")
    total = 0.0
    for k in range(period):
        d = statistics.median(rows[i + k][0] for i, _ in layers)
        s = statistics.median(shares[i + k] for i, _ in layers)
        total += s
        print(f"{k:3d} {d:9.1f} {s:7.1f}  {short(rows[layers[0][0] + k][2])}")
    line = f"a layer: {total:.1f} µs of shares (medians by position)"
    if a.weights_us:
        line += f" against {a.weights_us:.1f} µs of weight bytes over copy bandwidth ({total / a.weights_us:.2f}×)"
    print(line)
    inside = set()
    for i, j in layers:
        inside.update(range(i, j))
    rest = [k for k in range(len(rows)) if k not in inside]
    # the kernels outside whole layers, as runs between layers (the step boundary: head, sampler, state)
    runs, cur = [], []
    for k in rest:
        if cur and k != cur[-1] + 1:
            runs.append(cur)
            cur = []
        cur.append(k)
    if cur:
        runs.append(cur)
    for r in runs:
        print(f"outside whole layers, kernels {r[0]}–{r[-1]}: {sum(shares[k] for k in r):.1f} µs of shares")
        for k in r:
            print(f"    {rows[k][0]:8.1f} {shares[k]:7.1f}  {short(rows[k][2])}")


if __name__ == "__main__":
    main()

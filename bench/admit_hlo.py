"""How the admit executable's compiled program is cut into command buffers (CUDA graphs): per case, the number of
command-buffer calls in its entry computation (each a graph launch) and the entry's other ops (what runs as its own
thunk between them), from the optimised HLO of the admit a request really compiled. Why a 1.3B batch-1 admit takes
~1.2 ms longer to launch than a 350M one with the same 406 kernels (bench/RESULTS.md, twenty-seventh session).

    python bench/admit_hlo.py --cases 350m-1-128-8,1.3b-1-128-8 [--dump DIR]
    python bench/admit_hlo.py --cases tiny-gpt-2-16-4      # CPU smoke (no command buffers there)

On the H100 with jax 0.11.2 (twenty-eighth session) the optimised HLO held no command-buffer calls at all: that
XLA forms its command buffers later, from the thunk sequence, so the count is 0 there and what this shows is the
entry's op mix (1.3B: 310 fusions, 72 cuBLASLt GEMMs, 24 Triton kernels; 350M: 382 fusions, 24 Triton kernels).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _op(line: str):
    """The opcode of one HLO instruction line (`%x = TYPE op(...)`, TYPE a shape or a parenthesised tuple)."""
    if " = " not in line:
        return None
    rhs = line.split(" = ", 1)[1].lstrip()
    if rhs.startswith("("):   # a tuple type: skip to its closing parenthesis
        depth = 0
        for i, ch in enumerate(rhs):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                rhs = rhs[i + 1:]
                break
    else:
        rhs = rhs.split(" ", 1)[1] if " " in rhs else ""
    m = re.match(r"\s*([a-z][\w-]*)\(", rhs)
    return m.group(1) if m else None


def entry_ops(text: str):
    """(command-buffer calls, Counter of the other ops) in the ENTRY computation of an HLO module's text."""
    body, inside = [], False
    for line in text.splitlines():
        if line.startswith("ENTRY "):
            inside = True
            continue
        if inside:
            if line.startswith("}"):
                break
            body.append(line)
    calls, other = 0, collections.Counter()
    for line in body:
        op = _op(line)
        if op is None:
            continue
        if op == "call" and "command_buffer" in line:
            calls += 1
        elif op not in ("parameter", "get-tuple-element", "tuple", "constant", "bitcast"):
            kind = re.search(r'custom_call_target="([^"]+)"', line)
            other[op + (f":{kind.group(1)}" if kind else "")] += 1
    return calls, other


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="350m-1-128-8,1.3b-1-128-8")
    ap.add_argument("--dump", default=None, help="write each admit's optimised HLO text here")
    a = ap.parse_args()

    import jax
    import numpy as np

    import ftjax
    from bench.e2e import MODELS, SMOKE_MODELS, random_params
    from ftjax.config import ModelConfig
    models = {**MODELS, **SMOKE_MODELS}
    for case in a.cases.split(","):
        name, b, t_in, t_out = case.rsplit("-", 3)
        b, t_in, t_out = int(b), int(t_in), int(t_out)
        cfg = ModelConfig(**models[name])
        llm = ftjax.LLM(cfg, random_params(cfg), dtype="bfloat16", max_batch_size=b, max_seq_len=t_in + t_out,
                        max_beam_width=1)
        eng = llm.engine
        real, seen = eng._admit, {}

        def recording(*args, **kw):   # the shapes of the admit call a real request makes
            seen["args"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), args)
            seen["kw"] = kw
            return real(*args, **kw)

        eng._admit = recording
        prompts = np.random.RandomState(0).randint(1, cfg.vocab, size=(b, t_in)).tolist()
        llm.generate(prompts, max_new_tokens=t_out, end_id=None)
        eng._admit = real
        text = real.lower(*seen["args"], **seen["kw"]).compile().as_text()
        if a.dump:
            os.makedirs(a.dump, exist_ok=True)
            with open(os.path.join(a.dump, f"admit-{case}.hlo.txt"), "w") as f:
                f.write(text)
        calls, other = entry_ops(text)
        print(json.dumps({"case": case, "device": jax.devices()[0].device_kind, "command_buffer_calls": calls,
                          "entry_ops_outside": dict(other.most_common()),
                          "fusions_total": sum(_op(line) == "fusion" for line in text.splitlines())}), flush=True)
        llm = eng = real = None


if __name__ == "__main__":
    main()

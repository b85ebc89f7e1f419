"""Pipeline parallel for decoder-only models: stages of contiguous layers on the mesh's `pipeline` axis
(T5: `pipeline_t5.PipelinedT5` runs its encoder and decoder on this same schedule).

The model is not changed (DESIGN.md convention 8): `PipelinedGPT` drives the same Flax modules from
outside — the embedding, one `gpt.Block` per layer, the final norm and logits — and implements the
family interface the engine sees (`init_cache`, `prefill`, `write_prefix`, `decode`, `full_logits`).

Params are restacked per stage (`stack_params`): {"embed", "final_norm", ["lm_head"], "stages": [Lp]}
where stages[j] is layer (s * Lp + j)'s tree with every leaf stacked over stages s: [P, ...], logical
axes ("stage", ...). Stage s holds only its own layers (the "stage" axis is sharded over `pipeline`);
the embedding and logits (vocab-parallel over `tensor`) are computed by every stage group.

The cache is a list over a stage's local layers j of {"k", "v"} [B, P, k, S, h]: slot first as every
family's cache (insert and beam reordering index rows), the stage dim sharded over `pipeline`.

Schedule (prefill and decode alike): the rows are split into M micro-batches (M <= P, dividing the
rows); at tick t = 0 .. M + P - 2 stage s runs micro-batch t - s through its layers, then hands its
activations to stage s + 1 with a `ppermute` (a collective-permute in the compiled step), so up to P
stages work at once. It runs under `shard_map`, manual over `pipeline` only: inside a stage the
`tensor` axis stays with XLA SPMD (Megatron tensor parallel as without pipeline). Idle ticks write
their K/V at position S (out of range: dropped). The last stage's outputs reach every stage group by
one psum over `pipeline` of [rows, d] activations; weights never move between stages.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.models import gpt
from ftjax.models.families import write_rows
from ftjax.sharding import rules as R


def stage_layers(num_layers: int, pipeline: int) -> int:
    return num_layers // pipeline


def stack_params(params: dict[str, Any], num_layers: int, pipeline: int) -> dict[str, Any]:
    """Host (numpy) restack: layers_{s*Lp+j} -> stages[j] with leaves [P, ...]."""
    Lp = stage_layers(num_layers, pipeline)
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["stages"] = [jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                  *[params[f"layers_{s * Lp + j}"] for s in range(pipeline)])
                     for j in range(Lp)]
    return out


def stack_axes(axes: dict[str, Any], num_layers: int, pipeline: int) -> dict[str, Any]:
    Lp = stage_layers(num_layers, pipeline)
    out = {k: v for k, v in axes.items() if not k.startswith("layers_")}
    out["stages"] = [jax.tree.map(lambda a: ("stage",) + tuple(a), axes[f"layers_{j}"], is_leaf=R.is_axes)
                     for j in range(Lp)]
    return out


def micro_batches(rows: int, pipeline: int) -> int:
    """The most micro-batches (<= P) that divide `rows`."""
    return max(m for m in range(1, pipeline + 1) if rows % m == 0)


class PipelinedGPT:
    """GPT family on P pipeline stages (see the module docstring)."""

    samples_at_prefill = True

    def __init__(self, base, mesh, rules):
        self.base, self.cfg, self.dtype = base, base.cfg, base.dtype
        self.model = base.model
        self.mesh, self.rules = mesh, rules
        self.P = mesh.shape[R.PIPELINE]
        self.Lp = stage_layers(self.cfg.num_layers, self.P)
        self.block = gpt.Block(self.cfg, base.dtype, base.model.impl)

    # ------------------------------------------------------------------ pieces of the model, outside
    def _embed(self, params, tokens, positions):
        return self.model.apply({"params": {"embed": params["embed"]}}, tokens, positions,
                                method=lambda m, t, p: m.embed(t, p))

    def _head(self, params, h):
        keep = {k: params[k] for k in ("embed", "final_norm", "lm_head") if k in params}
        return self.model.apply({"params": keep}, h, method=lambda m, h: m.logits(m.final_norm(h)))

    # ----------------------------------------------------------------------------------- the stages
    def _shard_map(self, fn, in_specs, out_specs):
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                             axis_names={R.PIPELINE}, check_vma=False)

    def _ticks(self, M, step, carry):
        """Runs the schedule inside shard_map. step(carry, x_in, m, valid) -> (carry, x_out)."""
        P = self.P
        s = jax.lax.axis_index(R.PIPELINE)
        carry, buf, first = carry
        out = None
        for t in range(M + P - 1):
            m = t - s
            valid = (m >= 0) & (m < M)
            mc = jnp.clip(m, 0, M - 1)
            x_in = jnp.where(s == 0, first[min(t, M - 1)], buf) if t < M else buf
            carry, h = step(carry, x_in, mc, valid)
            if out is None:
                out = jnp.zeros((M,) + h.shape, h.dtype)
            keep = (s == P - 1) & valid
            out = jax.lax.dynamic_update_index_in_dim(
                out, jnp.where(keep, h, jax.lax.dynamic_index_in_dim(out, mc, 0, False)), mc, 0)
            if P > 1:
                buf = jax.lax.ppermute(h, R.PIPELINE, [(i, i + 1) for i in range(P - 1)])
        # in float32: exact (only the last stage's value is non-zero), and XLA:CPU aborts the process on a bf16
        # all-reduce over one axis of a partly manual shard_map (AllReducePromotion, jax 0.10)
        last = jnp.where(s == P - 1, out, jnp.zeros_like(out))
        out = jax.lax.psum(last.astype(jnp.float32), R.PIPELINE).astype(out.dtype)
        return carry, out

    def _stages_prefill(self, params, x, lengths):
        """x [b, T, d] -> (h [b, T, d] after the last layer, kv list j of (k, v) [b, P, T, k, h])."""
        b, T, d = x.shape
        M = micro_batches(b, self.P)
        mb = b // M
        c = self.cfg
        pspec = jax.tree.map(lambda _: R.stage_spec(self.rules), params["stages"])

        def fn(stages, x, lengths):
            stages = jax.tree.map(lambda a: a[0], stages)
            pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (mb, T))
            kv0 = [(jnp.zeros((b, T, c.kv_heads, c.dim_per_head), self.dtype),) * 2 for _ in range(self.Lp)]
            lm = lengths.reshape(M, mb)

            def step(kv, h, m, valid):
                ln = jax.lax.dynamic_index_in_dim(lm, m, 0, False)
                new = []
                for lp, (kb, vb) in zip(stages, kv):
                    h, k, v = self.block.apply({"params": lp}, h, pos, ln, method=gpt.Block.prefill)
                    put = lambda buf, a: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                        buf, jnp.where(valid, a.astype(buf.dtype),
                                       jax.lax.dynamic_slice_in_dim(buf, m * mb, mb, 0)), m * mb, 0)
                    new.append((put(kb, k), put(vb, v)))
                return new, h

            kv, out = self._ticks(M, step, (kv0, jnp.zeros((mb, T, d), x.dtype), x.reshape(M, mb, T, d)))
            kv = [(k[:, None], v[:, None]) for k, v in kv]
            return out.reshape(b, T, d), kv

        kv_spec = [(R.batch_stage_spec(self.rules),) * 2 for _ in range(self.Lp)]
        return self._shard_map(fn, (pspec, R.manual_replicated(), R.manual_replicated()),
                               (R.manual_replicated(), kv_spec))(params["stages"], x, lengths)

    def _stages_decode(self, params, x, positions, cache):
        """x [B, d]; positions [B]; cache list j of {"k","v"} [B, P, k, S, h] -> (h [B, d], cache)."""
        B, d = x.shape
        S = cache[0]["k"].shape[3]
        M = micro_batches(B, self.P)
        mb = B // M
        pspec = jax.tree.map(lambda _: R.stage_spec(self.rules), params["stages"])
        cspec = jax.tree.map(lambda _: R.batch_stage_spec(self.rules), cache)

        def fn(stages, x, positions, cache):
            stages = jax.tree.map(lambda a: a[0], stages)
            cache = jax.tree.map(lambda a: a[:, 0], cache)                 # [B, k, S, h]
            pm = positions.reshape(M, mb)

            def step(cache, h, m, valid):
                pos = jnp.where(valid, jax.lax.dynamic_index_in_dim(pm, m, 0, False), S)   # S: write dropped
                new = []
                for lp, cl in zip(stages, cache):
                    kc = jax.lax.dynamic_slice_in_dim(cl["k"], m * mb, mb, 0)
                    vc = jax.lax.dynamic_slice_in_dim(cl["v"], m * mb, mb, 0)
                    h, kc, vc = self.block.apply({"params": lp}, h, pos, kc, vc, method=gpt.Block.decode)
                    new.append({"k": jax.lax.dynamic_update_slice_in_dim(cl["k"], kc, m * mb, 0),
                                "v": jax.lax.dynamic_update_slice_in_dim(cl["v"], vc, m * mb, 0)})
                return new, h

            cache, out = self._ticks(M, step, (cache, jnp.zeros((mb, d), x.dtype), x.reshape(M, mb, d)))
            return out.reshape(B, d), jax.tree.map(lambda a: a[:, None], cache)

        return self._shard_map(fn, (pspec, R.manual_replicated(), R.manual_replicated(), cspec),
                               (R.manual_replicated(), cspec))(params["stages"], x, positions, cache)

    # ------------------------------------------------------------------------------ family interface
    def init_cache(self, B: int, S: int):
        c = self.cfg
        shape = (B, self.P, c.kv_heads, S, c.dim_per_head)
        return [{"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)} for _ in range(self.Lp)]

    def _forward(self, params, tokens, lengths):
        b, T = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (b, T))
        x = self._embed(params, tokens, positions)
        return self._stages_prefill(params, x, lengths)

    def prefill(self, params, tokens, lengths):
        """tokens [b, T]; lengths [b] -> (logits [b, v], kv list j of (k, v) [b, P, T, k, h])."""
        h, kv = self._forward(params, tokens, lengths)
        h = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return self._head(params, h), kv

    def full_logits(self, params, tokens, lengths):
        h, _ = self._forward(params, tokens, lengths)
        return self._head(params, h)

    def write_prefix(self, cache, prefix, src, slots, start=None):
        return [{"k": write_rows(layer["k"], jnp.moveaxis(k, 2, 3), src, slots, start),   # [b, P, k, T, h]
                 "v": write_rows(layer["v"], jnp.moveaxis(v, 2, 3), src, slots, start)}
                for layer, (k, v) in zip(cache, prefix)]

    def reorder(self, cache, src):
        """Beam search: row i continues row src[i] [B] (rows are the slot dim; each stage moves its own)."""
        return jax.tree.map(lambda a: a[src], cache)

    def decode(self, params, tokens, positions, cache):
        x = self._embed(params, tokens, positions)
        h, cache = self._stages_decode(params, x, positions, cache)
        return self._head(params, h), cache

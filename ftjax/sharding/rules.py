"""THE rule table: logical axis names -> mesh axes. The only place in ftjax with PartitionSpec literals.

Every param, cache and activation dimension carries a logical name (DESIGN.md convention 2). The mesh
has two axes, `pipeline` (stages, one contiguous block of layers each) and `tensor` (Megatron tensor
parallel inside a stage). `RULES` is the table; `rules_for(cfg, tensor)` is the same table with the two
decisions a config forces:

  kv_heads -> None (replicated) when the model has fewer kv heads than the tensor size (GQA/MQA with
              kv_heads < T: every tensor shard keeps all kv heads; T must then be a multiple of them);
  positions-> None when T does not divide the learned position table's rows;
  vocab    -> None for a model that cannot pad its vocabulary (T5 has no valid_vocab_size) when T does
              not divide it. Decoder configs are padded instead (`pad_vocab`), never refused.

Megatron layout that follows from the table: q/k/v and mlp-in kernels [d, n|k|f] are column-parallel
(output dim sharded), attention-out and mlp-out [n|f, d] row-parallel (input dim sharded: XLA SPMD
inserts one all-reduce per sublayer), the token embedding [v, d] and lm_head [d, v] vocab-parallel,
the K/V cache [B, k, S, h] sharded over kv heads; embed (the residual stream) is replicated.
"""
from __future__ import annotations

import dataclasses
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

PIPELINE, TENSOR = "pipeline", "tensor"
MESH_AXES = (PIPELINE, TENSOR)

# logical axis -> mesh axis (None: replicated).
RULES: dict[str, str | None] = {
    "stage": PIPELINE,      # leading dim of per-stage stacked params / cache  [P, ...]
    "vocab": TENSOR,        # embedding rows, lm_head columns, logits
    "heads": TENSOR,        # q, attention-out, T5 relative-bias table columns
    "kv_heads": TENSOR,     # k, v, the K/V cache (-> None when kv_heads < T)
    "mlp": TENSOR,          # mlp in / gate / out
    "embed": None,          # the residual stream d
    "head_dim": None,
    "norm": None,
    "positions": TENSOR,    # learned position table rows (looked up like the vocab-parallel embedding)
    "buckets": None,        # T5 relative-position buckets
    "batch": None,          # slots
    "seq": None,            # cache positions
}

# Cache leaves by rank: both families keep [slot, kv heads, positions, head_dim] K/V and [slot] ints.
CACHE_AXES = {4: ("batch", "kv_heads", "seq", "head_dim"), 1: ("batch",),
              5: ("batch", "stage", "kv_heads", "seq", "head_dim")}   # pipelined: [B, P, k, S, h]


def rules_for(cfg, tensor: int) -> dict[str, str | None]:
    """The table for one model at tensor size `tensor` (see the module docstring)."""
    r = dict(RULES)
    if cfg.kv_heads % tensor:
        r["kv_heads"] = None
    if cfg.vocab_size % tensor and not hasattr(cfg, "valid_vocab_size"):
        r["vocab"] = None
    if cfg.max_positions % tensor:
        r["positions"] = None
    return r


def spec(axes, rules: dict[str, str | None]) -> PartitionSpec:
    """Logical axes (a tuple of names, or None for a scalar) -> PartitionSpec. KeyError names an axis
    the table does not know."""
    if axes is None:
        return PartitionSpec()
    out = []
    for a in axes:
        if a is not None and a not in rules:
            raise KeyError(f"logical axis {a!r} has no rule in ftjax/sharding/rules.py")
        out.append(None if a is None else rules[a])
    return PartitionSpec(*out)


def manual_spec(axes, rules: dict[str, str | None], mesh_axes) -> PartitionSpec:
    """spec(axes, rules) naming only the mesh axes in `mesh_axes` (the others: None): the in/out spec of
    a shard_map manual over `mesh_axes`, inside which the dimensions on the other axes stay whole
    (or are already local, inside an outer shard_map manual over them)."""
    return PartitionSpec(*[a if a in mesh_axes else None for a in spec(axes, rules)])


def named(mesh, axes, rules) -> NamedSharding:
    return NamedSharding(mesh, spec(axes, rules))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def is_axes(x) -> bool:
    """A leaf of a logical-axes tree: a tuple of names/None (flax's PartitionSpec is a tuple)."""
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(mesh, axes_tree, rules):
    return jax.tree.map(lambda a: named(mesh, a, rules), axes_tree, is_leaf=is_axes)


def cache_axes(cache):
    """Logical axes of a family's cache pytree, by leaf rank (CACHE_AXES)."""
    def one(leaf):
        nd = np.ndim(leaf) if not hasattr(leaf, "ndim") else leaf.ndim
        if nd not in CACHE_AXES:
            raise ValueError(f"cache leaf of shape {np.shape(leaf)}: no logical axes for rank {nd}")
        return CACHE_AXES[nd]
    return jax.tree.map(one, cache)


def stage_spec(rules) -> PartitionSpec:
    """shard_map in/out spec of a per-stage stacked array (only the pipeline axis is manual)."""
    return PartitionSpec(rules["stage"])


def batch_stage_spec(rules) -> PartitionSpec:
    """shard_map spec of a pipelined cache leaf [B, P, ...]."""
    return PartitionSpec(None, rules["stage"])


def manual_replicated() -> PartitionSpec:
    return PartitionSpec()


def padded_vocab(vocab_size: int, tensor: int) -> int:
    return -(-vocab_size // tensor) * tensor


def pad_vocab(cfg, params, tensor: int):
    """Decoder configs: pad the vocabulary rows to a multiple of `tensor` (GPT-2's 50257 at T=8 -> 50264).
    Returns (cfg with vocab_size padded and valid_vocab_size set, params with zero rows/columns added).
    The model masks ids >= valid_vocab_size out of the logits, so outputs are unchanged."""
    if not hasattr(cfg, "valid_vocab_size") or cfg.vocab_size % tensor == 0:
        return cfg, params
    v = padded_vocab(cfg.vocab_size, tensor)
    extra = v - cfg.vocab_size

    def pad(a, axis):
        width = [(0, 0)] * np.ndim(a)
        width[axis] = (0, extra)
        return np.pad(np.asarray(a), width)

    def pad_kernel(k):   # [d, v], or int8 QuantizedWeight(q [d, v], scale [v]) / QuantizedWeightT(qt [v, d], ..)
        if hasattr(k, "qt"):
            return type(k)(pad(k.qt, 0), pad(k.scale, 0))
        return type(k)(pad(k.q, 1), pad(k.scale, 0)) if hasattr(k, "scale") else pad(k, 1)

    params = dict(params)
    tokens = params["embed"]["tokens"]   # [v, d], or the int8 table QuantizedWeightT(qt [v, d], scale [v])
    params["embed"] = dict(params["embed"], tokens=pad_kernel(tokens) if hasattr(tokens, "qt") else pad(tokens, 0))
    if "lm_head" in params:
        head = dict(params["lm_head"], kernel=pad_kernel(params["lm_head"]["kernel"]))
        if "bias" in head:
            head["bias"] = pad(head["bias"], 0)
        params["lm_head"] = head
    cfg = dataclasses.replace(cfg, vocab_size=v, valid_vocab_size=cfg.vocab)
    return cfg, params


def describe(rules) -> str:
    return ", ".join(f"{k}->{v}" for k, v in rules.items())


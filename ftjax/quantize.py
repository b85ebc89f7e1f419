"""INT8 weight-only quantization (FasterTransformer's `int8_mode=1`).

Each projection weight of attention and the MLP (q, k, v, o; wi, wg, wo — in GPT and T5 blocks) becomes a
`QuantizedWeight(q int8 [*in, *out], scale float [*out])`: symmetric, per output channel,
w ≈ q * scale with scale = max|w[:, c]| / 127 and q = round(w / scale) in [-127, 127]. The token
embedding (and the tied output head that reuses it), position embeddings, norms and biases stay in the
model dtype. An untied `lm_head/kernel` [d, v] is quantized too (per vocab column; `lm_head=False` keeps
it in the model dtype, as FT does): on LLaMA-3-8B it holds 1/16 of the weights, and int8 weights
reach <= 0.55x the bf16 bytes only with it. A tied head is the token embedding and stays, as in FT.

Mode "int8-embed" (an ftjax addition) quantizes the token embedding too, per row: `embed/tokens` [v, d]
becomes QuantizedWeightT(qt int8 [v, d], scale [v]) — the lookup reads qt[id] * scale[id], and the tied
output head is the same int8 matrix with one scale per vocab column, read by the one linear op like any
QuantizedWeightT. It halves the bytes the decode step's tied head streams (GPT 1.3B: 206 -> 103 MB a step)
at the cost of the embedding's rounding in both places (bench/RESULTS.md has its accuracy and speed).

Quantization changes the model from outside (DESIGN.md convention 8): the param tree keeps its keys,
only `.../kernel` leaves become QuantizedWeight (a NamedTuple, hence a pytree that jit, device_put and
orbax flatten), and the one linear op (`ftjax.layers.linear.linear`) dequantises inside its matmul.

On disk (orbax) a QuantizedWeight is stored as `{"q", "scale"}` under its kernel's key and the checkpoint
config records `"quantize": "int8"`; `from_storage` regroups it when the checkpoint is read.

`quantize_params(..., transposed=True)` stores each int8 weight transposed instead (`QuantizedWeightT`,
q [*out, *in], the input dims contiguous): the same values, a layout the small-M decode kernel reads
along K without byte-wise shared-memory loads (1.3B int8 decode step 1.146 -> 1.045 ms on an H100,
bench/RESULTS.md). The Engine puts int8 weights in that layout itself whenever its decode step runs the
small-M kernel (`set_int8_layout`; `Engine.int8_layout` overrides it). On disk it is the same
`{"q", "scale"}` as a QuantizedWeight (`to_storage` transposes it back).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.layers.linear import QuantizedWeight, QuantizedWeightT

MODES = ("int8", "int8-embed")
# Parent module names of the weights quantized (GPT Attention/MLP, T5 Attn/MLP).
PROJECTIONS = ("q", "k", "v", "o", "wi", "wg", "wo")
QMAX = 127.0

__all__ = ["QuantizedWeight", "QuantizedWeightT", "transpose_quantized", "quantize_weight", "quantize_rows", "dequantize",
           "quantize_params", "set_int8_layout", "is_quantized", "param_bytes", "from_storage", "logical_axes", "int8_accuracy", "check_mode"]


def check_mode(quantize: str | None) -> str | None:
    if quantize is not None and quantize not in MODES:
        raise ValueError(f"quantize: unknown {quantize!r}; expected None or one of {MODES}")
    return quantize


def _n_in(name: str, ndim: int) -> int:
    """Input dims of a kernel: the output projection `o` contracts (heads, head_dim), others one dim."""
    return ndim - 1 if name == "o" else 1


@jax.jit
def _quantize_jnp(w, scale_like):  # w [*in, *out] (in flattened by the caller's reshape)
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=0)
    scale = jnp.where(amax > 0, amax / QMAX, 1.0)
    q = jnp.clip(jnp.round(w / scale), -QMAX, QMAX).astype(jnp.int8)
    return q, scale.astype(scale_like.dtype)


def quantize_weight(w, n_in: int = 1, scale_dtype=np.float32) -> QuantizedWeight:
    """w [*in, *out] (numpy -> numpy on the host; jax.Array -> on its device; ShapeDtypeStruct -> shapes)
    -> QuantizedWeight
    q int8 [*in, *out], scale [*out] in scale_dtype, with |w - q * scale| <= scale / 2 elementwise."""
    shape = tuple(w.shape)
    if not 1 <= n_in < len(shape):
        raise ValueError(f"quantize_weight: n_in={n_in} for a weight of shape {shape}")
    fan_in = int(np.prod(shape[:n_in]))
    out = shape[n_in:]
    if isinstance(w, jax.ShapeDtypeStruct):  # abstract: shapes only (memory planning, sharding specs)
        return QuantizedWeight(jax.ShapeDtypeStruct(shape, jnp.int8), jax.ShapeDtypeStruct(out, scale_dtype))
    if isinstance(w, jax.Array):
        q, scale = _quantize_jnp(w.reshape(fan_in, -1), jnp.zeros((), scale_dtype))
        return QuantizedWeight(q.reshape(shape), scale.reshape(out))
    w2 = np.asarray(w, np.float32).reshape(fan_in, -1)
    amax = np.abs(w2).max(axis=0)
    scale = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(w2 / scale), -QMAX, QMAX).astype(np.int8)
    return QuantizedWeight(q.reshape(shape), scale.reshape(out).astype(scale_dtype))


def quantize_rows(w, scale_dtype=np.float32) -> QuantizedWeightT:
    """An embedding table w [v, d] -> QuantizedWeightT(qt int8 [v, d], scale [v]): one scale per row, i.e. per
    output channel of the tied head x @ w.T (numpy on the host, jax.Array on its device, ShapeDtypeStruct:
    shapes only)."""
    shape = tuple(w.shape)
    if len(shape) != 2:
        raise ValueError(f"quantize_rows: an embedding table [vocab, d] expected, got shape {shape}")
    # the table's transpose [d, v] is the head's weight [in, out]: its per-column quantization, stored back [v, d]
    wt = jax.ShapeDtypeStruct(shape[::-1], w.dtype) if isinstance(w, jax.ShapeDtypeStruct) else w.T
    return transpose_quantized(quantize_weight(wt, 1, scale_dtype))


def _is_table(path) -> bool:
    """A tree path (keys) ending in embed/tokens: the token embedding, whose int8 form is always a
    QuantizedWeightT [v, d] (rows looked up, and the tied head's [out, in])."""
    keys = [getattr(k, "key", k) for k in path]
    return len(keys) >= 2 and keys[-2:] == ["embed", "tokens"]


def _qt_perm(ndim: int, n_out: int, to_t: bool):
    """Axis permutation [*in, *out] -> [*out, *in] (to_t) or back."""
    n_in = ndim - n_out
    return (tuple(range(n_in, ndim)) + tuple(range(n_in))) if to_t else (
        tuple(range(n_out, ndim)) + tuple(range(n_out)))


def transpose_quantized(w, lead: int = 0):
    """QuantizedWeight <-> QuantizedWeightT (the same values; numpy stays on the host, a jax.Array on its
    device, a ShapeDtypeStruct is shapes only). lead: leading dims of both q and scale that stay in place
    (1 for a pipeline-stacked weight, [stages, ...])."""
    to_t = isinstance(w, QuantizedWeight)
    q = w.q if to_t else w.qt
    perm = tuple(range(lead)) + tuple(lead + i for i in _qt_perm(len(q.shape) - lead, len(w.scale.shape) - lead, to_t))
    if isinstance(q, jax.ShapeDtypeStruct):
        qq = jax.ShapeDtypeStruct(tuple(q.shape[i] for i in perm), q.dtype)
    elif isinstance(q, jax.Array) and isinstance(q.sharding, jax.sharding.NamedSharding):
        # on a mesh: the transposed array keeps each dim's mesh axes (a rule-table placement stays one)
        spec = tuple(q.sharding.spec) + (None,) * (q.ndim - len(q.sharding.spec))
        out = jax.sharding.NamedSharding(q.sharding.mesh, jax.sharding.PartitionSpec(*(spec[i] for i in perm)))
        qq = jax.jit(lambda a: jnp.transpose(a, perm), out_shardings=out)(q)
    elif isinstance(q, jax.Array):
        qq = jnp.transpose(q, perm)
    else:
        qq = np.ascontiguousarray(np.transpose(q, perm))
    return QuantizedWeightT(qq, w.scale) if to_t else QuantizedWeight(qq, w.scale)


def _in_layout(w, transposed: bool, lead: int = 0):
    """w (a QuantizedWeight or QuantizedWeightT) as QuantizedWeightT when transposed, else QuantizedWeight."""
    return w if isinstance(w, QuantizedWeightT) == bool(transposed) else transpose_quantized(w, lead)


def dequantize(w, dtype=jnp.float32):
    """QuantizedWeight or QuantizedWeightT -> the float weight [*in, *out]."""
    if isinstance(w, QuantizedWeightT):
        w = transpose_quantized(w)
    return (w.q.astype(jnp.float32) * w.scale.astype(jnp.float32)).astype(dtype)


def _is_q(x) -> bool:
    return isinstance(x, (QuantizedWeight, QuantizedWeightT))


def is_quantized(params) -> bool:
    return any(_is_q(x) for x in jax.tree.leaves(params, is_leaf=_is_q))


def quantize_params(params: dict[str, Any], cfg=None, *, mode: str = "int8", lm_head: bool = True,
                    scale_dtype=np.float32, delete_source: bool = False,
                    progress: Callable[[str], None] | None = None, transposed: bool = False) -> dict[str, Any]:
    """The same tree with every attention / MLP projection kernel (and the untied `lm_head/kernel` unless
    `lm_head=False`; with mode "int8-embed" also the token embedding, as a QuantizedWeightT by rows) replaced
    by a QuantizedWeight. Leaves already quantized are kept. Numpy leaves are
    quantized on the host (nothing reaches a device); jax.Array leaves on their device, one weight at a
    time — with `delete_source` each float weight is deleted as soon as its int8 copy exists, so at most
    one float weight is alive beside the int8 tree. `cfg` is accepted for symmetry with the loaders
    (the weights are found by name). `transposed`: QuantizedWeightT leaves (q stored [*out, *in]); leaves
    already quantized are converted to that layout (or back, with False)."""
    check_mode(mode)
    del cfg
    count = [0]
    embedding = mode == "int8-embed"

    def walk(node, name):
        if isinstance(node, dict):
            out = {}
            for k in list(node):
                v = node[k]
                if name == "embed" and k == "tokens" and (embedding or _is_q(v)):
                    out[k] = _in_layout(v, True) if _is_q(v) else quantize_rows(v, scale_dtype)
                    count[0] += not _is_q(v)
                    if delete_source and isinstance(v, jax.Array):
                        v.delete()
                elif k == "kernel" and _is_q(v):
                    out[k] = _in_layout(v, transposed)
                elif k == "kernel" and not isinstance(v, dict) and (
                        name in PROJECTIONS or (lm_head and name == "lm_head")):
                    out[k] = _in_layout(quantize_weight(v, _n_in(name, len(v.shape)), scale_dtype), transposed)
                    count[0] += 1
                    if delete_source and isinstance(v, jax.Array):
                        v.delete()
                else:
                    out[k] = walk(v, k)
            return out
        return node

    out = walk(params, "")
    if progress is not None:
        progress(f"int8: quantized {count[0]} weights")
    return out


def set_int8_layout(params, transposed: bool):
    """The same tree with every int8 weight in one layout: QuantizedWeightT (transposed=True) or
    QuantizedWeight (an int8 token embedding stays a QuantizedWeightT [v, d] either way). Float leaves are left as they are (nothing is quantized here). numpy leaves are
    transposed on the host, jax.Array leaves on their device (a weight's old layout is freed once nothing
    else holds it)."""
    def fix(path, w):
        if not _is_q(w):
            return w
        if _is_table(path):   # the token embedding: rows looked up, so always [v, d]
            return _in_layout(w, True)
        stacked = any(getattr(k, "key", None) == "stages" for k in path)   # pipeline-stacked: [stages, ...]
        return _in_layout(w, transposed, lead=int(stacked))

    return jax.tree_util.tree_map_with_path(fix, params, is_leaf=_is_q)


def param_bytes(params) -> int:
    """Bytes of every array leaf (int8 values and scales count as they are)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(params)))


def from_storage(tree, _name: str = "", _parent: str = ""):
    """Regroup `{"q": int8, "scale": float}` dicts (how orbax stores a QuantizedWeight) into QuantizedWeight;
    embed/tokens (stored [v, d], as it is used) into a QuantizedWeightT."""
    if isinstance(tree, dict):
        if set(tree) == {"q", "scale"} and not isinstance(tree["q"], dict):
            table = (_parent, _name) == ("embed", "tokens")
            return (QuantizedWeightT if table else QuantizedWeight)(tree["q"], tree["scale"])
        return {k: from_storage(v, k, _name) for k, v in tree.items()}
    return tree


def to_storage(tree):
    """QuantizedWeight leaves -> `{"q", "scale"}` dicts (the structure orbax restores); a QuantizedWeightT
    is stored as the QuantizedWeight it transposes, except the int8 token embedding ([v, d] as it is)."""
    return _to_storage(tree, "", "")


def _to_storage(tree, name, parent):
    if isinstance(tree, QuantizedWeightT) and (parent, name) == ("embed", "tokens"):
        return {"q": tree.qt, "scale": tree.scale}   # the int8 embedding keeps its [v, d] rows
    if isinstance(tree, QuantizedWeightT):
        tree = transpose_quantized(tree)
    if isinstance(tree, QuantizedWeight):
        return {"q": tree.q, "scale": tree.scale}
    if isinstance(tree, dict):
        return {k: _to_storage(v, k, name) for k, v in tree.items()}
    return tree


def logical_axes(axes, params):
    """The logical-axes tree of the model (kernel -> its names) made to match a quantized `params` tree:
    a QuantizedWeight kernel gets QuantizedWeight(q=kernel axes, scale=its output axes); a QuantizedWeightT
    QuantizedWeightT(qt=output axes + input axes, scale=output axes)."""
    def walk(a, p, name):
        if isinstance(p, QuantizedWeightT) and name == "tokens":   # the int8 embedding [v, d], scale [v]
            return QuantizedWeightT(tuple(a), tuple(a)[:1])
        if isinstance(p, QuantizedWeight):
            names = tuple(a)
            return QuantizedWeight(names, names[_n_in(name, len(names)):])
        if isinstance(p, QuantizedWeightT):
            names = tuple(a)
            n = _n_in(name, len(names))
            return QuantizedWeightT(names[n:] + names[:n], names[n:])
        if isinstance(p, dict):
            return {k: walk(a[k], v, k) for k, v in p.items()}
        return a

    return walk(axes, params, "")


def int8_accuracy(llm_fp, llm_q, prompts) -> dict[str, float]:
    """Next-token agreement of a quantized LLM with a float one over every position of `prompts`:
    {"top1": fraction of positions whose argmax agrees, "kl": mean KL(p_fp || p_q) in nats,
     "max_kl": the largest, "positions": n}."""
    return int8_accuracy_from_logits(llm_fp.logits(prompts), llm_q.logits(prompts), [len(p) for p in prompts])


def int8_accuracy_from_logits(a, b, lengths) -> dict[str, float]:
    """`int8_accuracy` from the two logits arrays [b, t, v] (float, then quantized) and the prompt lengths."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    lens = np.asarray(lengths)
    mask = np.arange(a.shape[1])[None, :] < lens[:, None]                     # [b, t]
    la = a - _logsumexp(a)
    lb = b - _logsumexp(b)
    kl = np.sum(np.exp(la) * (la - lb), axis=-1)                                # [b, t]
    agree = a.argmax(-1) == b.argmax(-1)
    return {"top1": float(agree[mask].mean()), "kl": float(kl[mask].mean()), "max_kl": float(kl[mask].max()),
            "positions": int(mask.sum())}


def _logsumexp(x):
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))

"""Megatron-LM GPT checkpoints (`model_optim_rng.pt`), the layout FasterTransformer's
`examples/pytorch/gpt/utils/megatron_ckpt_convert.py` reads.

Accepted paths:
  * the checkpoint root holding `latest_checkpointed_iteration.txt` ("release" or an iteration
    number) and `release/` or `iter_XXXXXXX/` below it;
  * the directory holding `mp_rank_00/`, `mp_rank_01/`, ... (one per tensor-parallel rank), each with
    `model_optim_rng.pt`;
  * a single `model_optim_rng.pt` file, or a directory holding one (tensor parallel size 1).

Each `model_optim_rng.pt` is a torch-pickled dict: `args` (an `argparse.Namespace`), `checkpoint_version`
and `model.language_model` = {`embedding`: {`word_embeddings.weight` [v/T, d], `position_embeddings.weight`
[p, d]}, `transformer` (older) or `encoder` (newer): {`layers.{i}.input_layernorm.{weight,bias}`,
`layers.{i}.attention.query_key_value.{weight [3d/T, d], bias [3d/T]}` (newer: `self_attention.`),
`layers.{i}.attention.dense.{weight [d, d/T], bias [d]}`, `post_attention_layernorm`,
`mlp.dense_h_to_4h.{weight [f/T, d], bias [f/T]}`, `mlp.dense_4h_to_h.{weight [d, f/T], bias [d]}`,
`final_layernorm.{weight,bias}`}, and `output_layer.weight` [v/T, d] when the output embedding is untied}.

Fused QKV rows per rank follow Megatron's `fix_query_key_value_ordering`: checkpoint_version 0 orders
them (3, np, hn); 1.0 orders them (np, hn, 3); 2.0 and later (np, 3, hn), np = heads per rank.
Column-parallel weights (QKV, h_to_4h, word embeddings) are concatenated over ranks along their output
rows; row-parallel ones (attention dense, 4h_to_h) along their input columns; their biases are
replicated (rank 0's is used).

Vocabulary: the embedding has `padded_vocab_size` rows. With `tokenizer_type == "GPT2BPETokenizer"` and
at least 50257 rows, `valid_vocab_size` is 50257 (GPT-2's BPE vocabulary; the padding rows are never
produced), and bos = eos = 50256 (`<|endoftext|>`). Otherwise every row is valid and bos/eos are None.
A checkpoint without pickled `args` (the 345M release) is taken as GPT-2 BPE when it has >= 50257 rows.

GELU is the tanh form when `args.bias_gelu_fusion` (Megatron's default; also assumed when there are
no args, as for the 345M release) or `args.openai_gelu`; exact (erf) only for --no-bias-gelu-fusion. Post-LayerNorm residuals
(`apply_residual_connection_post_layernorm`), rotary positions, RMSNorm, SwiGLU, bias-free linears and
pipeline-parallel shards are refused with an error naming the setting.

Reading uses `torch.load(..., weights_only=False)`: `args` is a pickled `argparse.Namespace`, which the
safe loader refuses. Only load Megatron checkpoints you trust.

The public 345M release (checkpoint_version 0) carries no `args`; its shapes give everything but the
head count, which must then be passed as `num_heads=` (16 for that release).
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Any, Callable

import numpy as np

from ftjax.checkpoint.common import check_params, nest
from ftjax.config import ModelConfig

CKPT_NAME = "model_optim_rng.pt"
GPT2_VOCAB = 50257
GPT2_EOS = 50256


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("reading Megatron-LM checkpoints (model_optim_rng.pt) needs torch: "
                          "pip install 'ftjax[torch]'") from e
    return torch


def resolve_rank_files(path: str) -> list[str]:
    """The `model_optim_rng.pt` of every tensor-parallel rank, in rank order."""
    if os.path.isfile(path):
        return [path]
    latest = os.path.join(path, "latest_checkpointed_iteration.txt")
    if os.path.exists(latest):
        try:
            with open(latest) as fh:
                tag = fh.read(4096).strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{latest}: cannot read ({e})") from None
        if tag != "release" and not tag.isdigit():
            raise ValueError(f"{latest}: expected 'release' or an iteration number, found {tag[:40]!r}")
        sub = "release" if tag == "release" else f"iter_{int(tag):07d}"
        if not os.path.isdir(os.path.join(path, sub)):
            raise ValueError(f"{latest} names {tag!r} but {os.path.join(path, sub)} does not exist")
        path = os.path.join(path, sub)
    if os.path.exists(os.path.join(path, CKPT_NAME)):
        return [os.path.join(path, CKPT_NAME)]
    subdirs = sorted(os.listdir(path)) if os.path.isdir(path) else []
    pp = [s for s in subdirs if re.fullmatch(r"(mp_rank_\d+_\d+|tp_rank_\d+_pp_rank_\d+)", s)]
    if pp:
        raise ValueError(f"{path}: pipeline-parallel Megatron shards ({pp[0]}, ...) are not supported; "
                         "merge the pipeline stages first")
    ranks = sorted(int(m.group(1)) for s in subdirs if (m := re.fullmatch(r"mp_rank_(\d+)", s)))
    if not ranks:
        raise ValueError(f"{path}: no Megatron checkpoint here (looked for latest_checkpointed_iteration.txt, "
                         f"{CKPT_NAME}, mp_rank_XX/{CKPT_NAME})")
    if ranks != list(range(len(ranks))):
        raise ValueError(f"{path}: tensor-parallel ranks {ranks} are not 0..{len(ranks) - 1}")
    files = [os.path.join(path, f"mp_rank_{r:02d}", CKPT_NAME) for r in ranks]
    for f in files:
        if not os.path.exists(f):
            raise ValueError(f"{path}: missing {f}")
    return files


class _Stub:
    """Stands in for classes of packages not installed here (Megatron's own optimizer / scheduler
    objects pickled beside the weights); the weights themselves never need them."""

    def __init__(self, *a, **k):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state


def _lenient_pickle():
    import pickle
    import types

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                return type(name, (_Stub,), {"__module__": module})

    mod = types.ModuleType("ftjax_lenient_pickle")
    mod.__dict__.update({k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
    mod.Unpickler = Unpickler
    return mod


def _load_pt(f: str) -> dict[str, Any]:
    torch = _torch()
    # weights_only=False: `args` is an argparse.Namespace (see the module docstring). Classes from
    # packages that are not installed (e.g. `megatron.*` in the optimizer state) load as stubs.
    try:
        return torch.load(f, map_location="cpu", weights_only=False, pickle_module=_lenient_pickle())
    except FileNotFoundError:
        raise
    except Exception as e:   # truncated zip (OSError / RuntimeError), bad pickle, EOFError, ...
        raise ValueError(f"{f}: cannot read the torch checkpoint, truncated or corrupt "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None


def _np(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.float()
        return t.numpy()
    return np.asarray(t, dtype=np.float32)


def _arg(args, *names, default=None):
    for n in names:
        if args is not None and getattr(args, n, None) is not None:
            return getattr(args, n)
    return default


def load_megatron_gpt(path: str, num_heads: int | None = None,
                      progress: Callable[[str], None] | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Returns (config, params as a nested dict of float32 numpy arrays in ftjax's layout).

    `num_heads` is only needed (and only used) for a checkpoint without pickled `args`.
    `progress`, when given, is called with one line per shard read and per layer converted.
    """
    say = progress or (lambda msg: None)
    files = resolve_rank_files(path)
    shards = []
    for r, f in enumerate(files):
        say(f"reading Megatron rank {r + 1}/{len(files)}: {f}")
        shards.append(_load_pt(f))
    for f, sd in zip(files, shards):   # every rank, not only rank 0
        if not isinstance(sd, dict) or "model" not in sd:
            keys = list(sd)[:8] if isinstance(sd, dict) else type(sd).__name__
            raise ValueError(f"{f}: not a Megatron checkpoint (no 'model' entry; keys {keys})")
        lm = sd["model"].get("language_model") if isinstance(sd["model"], dict) else None
        if not isinstance(lm, dict):
            raise ValueError(f"{f}: not a Megatron GPT checkpoint (no 'model.language_model' dict)")
    first = shards[0]
    args = first.get("args")
    if args is not None and not isinstance(args, argparse.Namespace):
        args = argparse.Namespace(**dict(args)) if isinstance(args, dict) else args
    version = float(first.get("checkpoint_version", 0) or 0)
    T = len(files)
    tp = _arg(args, "tensor_model_parallel_size", "model_parallel_size", default=T)
    if int(tp) != T:
        raise ValueError(f"{path}: args.tensor_model_parallel_size is {tp} but {T} mp_rank_XX shards were found")
    if int(_arg(args, "pipeline_model_parallel_size", default=1)) != 1:
        raise ValueError(f"{path}: pipeline_model_parallel_size "
                         f"{args.pipeline_model_parallel_size} is not supported (merge the stages first)")

    def refuse(flag, why):
        raise ValueError(f"{path}: Megatron args.{flag} = {getattr(args, flag)!r}: {why} is not supported")

    if args is not None:
        if getattr(args, "apply_residual_connection_post_layernorm", False):
            refuse("apply_residual_connection_post_layernorm", "post-LayerNorm residual")
        if getattr(args, "position_embedding_type", "learned_absolute") not in ("learned_absolute", None):
            refuse("position_embedding_type", "non-learned positions")
        if getattr(args, "normalization", "LayerNorm") not in ("LayerNorm", None):
            refuse("normalization", "a norm other than LayerNorm")
        if getattr(args, "swiglu", False):
            refuse("swiglu", "SwiGLU")
        if getattr(args, "add_bias_linear", True) is False:
            refuse("add_bias_linear", "bias-free linear layers")
        if getattr(args, "num_query_groups", None) and getattr(args, "group_query_attention", False):
            refuse("group_query_attention", "grouped-query attention")

    # Per-rank flat state dicts of the language model (names without the language_model prefix).
    lm_keys = None
    per_rank = []
    for f, sd in zip(files, shards):
        lm = sd["model"]["language_model"]
        body_key = "encoder" if "encoder" in lm else "transformer" if "transformer" in lm else None
        if body_key is None:
            raise ValueError(f"{f}: model.language_model has neither 'encoder' nor 'transformer' "
                             f"(keys {list(lm)})")
        flat = {}
        emb = lm.get("embedding", {})
        for k, v in _flatten(emb).items():
            flat["embedding." + k] = v
        for k, v in lm[body_key].items():
            flat["body." + k.replace(".self_attention.", ".attention.")] = v
        for k, v in _flatten(lm.get("output_layer", {})).items():
            flat["output_layer." + k] = v
        per_rank.append(flat)
        if lm_keys is None:
            lm_keys = set(flat)

    def get(rank, name):
        sd = per_rank[rank]
        if name not in sd:
            raise ValueError(f"{files[rank]}: missing weight {name.replace('body.', body_key + '.')!r}")
        return _np(sd[name])

    def cat(name, axis):
        parts = [get(r, name) for r in range(T)]
        shapes = [p.shape for p in parts]
        if len(set(shapes)) > 1:   # Megatron splits evenly: every rank holds the same shape
            shown = "; ".join(f"{files[r]}: {shapes[r]}" for r in range(T))
            raise ValueError(f"{path}: weight {name.replace('body.', body_key + '.')!r} has different shapes on "
                             f"the tensor-parallel ranks (each rank should hold an equal slice): {shown}")
        return np.concatenate(parts, axis=axis)

    wte = cat("embedding.word_embeddings.weight", 0)       # [v, d]
    wpe = get(0, "embedding.position_embeddings.weight")   # [p, d]
    v_rows, d = wte.shape
    layer_ids = sorted({int(m.group(1)) for k in lm_keys if (m := re.match(r"body\.layers\.(\d+)\.", k))})
    L = len(layer_ids)
    if layer_ids != list(range(L)) or L == 0:
        raise ValueError(f"{path}: layer indices {layer_ids[:8]} are not 0..L-1")
    n_args = _arg(args, "num_attention_heads")
    n = int(n_args if n_args is not None else (num_heads or 0))
    if n <= 0:
        raise ValueError(f"{path}: the checkpoint has no args.num_attention_heads; pass num_heads= "
                         "(16 for the public Megatron 345M release)")
    if num_heads is not None and n_args is not None and int(num_heads) != int(n_args):
        raise ValueError(f"{path}: num_heads={num_heads} disagrees with args.num_attention_heads={n_args}")
    if int(_arg(args, "hidden_size", default=d)) != d:
        raise ValueError(f"{path}: args.hidden_size={args.hidden_size} but word_embeddings have width {d}")
    if int(_arg(args, "num_layers", default=L)) != L:
        raise ValueError(f"{path}: args.num_layers={args.num_layers} but the checkpoint has {L} layers")
    if n % T or d % n:
        raise ValueError(f"{path}: num_attention_heads {n} must divide hidden {d} and be a multiple of "
                         f"the tensor parallel size {T}")
    h, npr = d // n, n // T
    f_rows = sum(np.shape(per_rank[r].get("body.layers.0.mlp.dense_h_to_4h.weight", np.zeros((0,))))[0]
                 for r in range(T))
    # ffn_hidden_size may be absent: older args mean 4 * hidden; with no args at all, the weights say.
    f = int(_arg(args, "ffn_hidden_size", default=4 * d if args is not None else f_rows))
    padded = int(_arg(args, "padded_vocab_size", default=v_rows))
    if padded != v_rows:
        raise ValueError(f"{path}: args.padded_vocab_size={padded} but word_embeddings have {v_rows} rows")
    gpt2_bpe = _arg(args, "tokenizer_type") == "GPT2BPETokenizer" or (args is None and v_rows >= GPT2_VOCAB)
    valid = GPT2_VOCAB if gpt2_bpe and v_rows >= GPT2_VOCAB else v_rows
    eos = GPT2_EOS if gpt2_bpe and v_rows >= GPT2_VOCAB else None
    tied = "output_layer.weight" not in lm_keys
    cfg = ModelConfig(
        vocab_size=v_rows,
        hidden=d,
        num_layers=L,
        num_heads=n,
        ffn_dim=f,
        max_positions=int(_arg(args, "max_position_embeddings", default=wpe.shape[0])),
        # Megatron's fused bias-GELU (`bias_gelu_fusion`, on by default) is the tanh approximation, as
        # is `openai_gelu`; only --no-bias-gelu-fusion trains with the exact (erf) GELU.
        activation="gelu_tanh" if (_arg(args, "openai_gelu", default=False)
                                   or _arg(args, "bias_gelu_fusion", default=True)) else "gelu",
        norm_eps=float(_arg(args, "layernorm_epsilon", "norm_epsilon", default=1e-5)),
        tie_embeddings=tied,
        valid_vocab_size=valid if valid != v_rows else None,
        bos_id=eos,
        eos_id=eos,
    )

    def qkv_order(a, rank_name):
        """Per-rank fused QKV rows [3 * np * hn, ...] -> [3, np, hn, ...] (q, k, v first)."""
        rest = a.shape[1:]
        if a.shape[0] != 3 * npr * h:
            raise ValueError(f"{rank_name} has shape {a.shape}, expected {(3 * npr * h,) + rest}")
        if version == 0:
            return a.reshape((3, npr, h) + rest)
        if version == 1.0:
            return np.moveaxis(a.reshape((npr, h, 3) + rest), 2, 0)
        return np.moveaxis(a.reshape((npr, 3, h) + rest), 1, 0)

    flat = {"embed/tokens": wte, "embed/positions": wpe,
            "final_norm/scale": get(0, "body.final_layernorm.weight"),
            "final_norm/bias": get(0, "body.final_layernorm.bias")}
    if not tied:
        flat["lm_head/kernel"] = cat("output_layer.weight", 0).T  # [d, v]
    for i in range(L):
        p, o = f"body.layers.{i}.", f"layers_{i}/"
        qw = [qkv_order(get(r, p + "attention.query_key_value.weight"),
                        f"{files[r]}: {body_key}.layers.{i}.attention.query_key_value.weight") for r in range(T)]
        qb = [qkv_order(get(r, p + "attention.query_key_value.bias"),
                        f"{files[r]}: {body_key}.layers.{i}.attention.query_key_value.bias") for r in range(T)]
        w = np.concatenate(qw, axis=1)  # [3, n, h, d]
        b = np.concatenate(qb, axis=1)  # [3, n, h]
        for j, name in enumerate("qkv"):
            flat[o + f"attn/{name}/kernel"] = np.ascontiguousarray(np.transpose(w[j], (2, 0, 1)))  # [d, n, h]
            flat[o + f"attn/{name}/bias"] = b[j]
        dense = cat(p + "attention.dense.weight", 1)  # [d_out, d_in = n*h]
        if dense.shape != (d, n * h):
            raise ValueError(f"{path}: merged {body_key}.layers.{i}.attention.dense.weight has shape "
                             f"{dense.shape}, expected {(d, n * h)}")
        flat[o + "attn/o/kernel"] = np.ascontiguousarray(dense.T).reshape(n, h, d)
        flat[o + "attn/o/bias"] = get(0, p + "attention.dense.bias")
        flat[o + "ln1/scale"], flat[o + "ln1/bias"] = get(0, p + "input_layernorm.weight"), get(0, p + "input_layernorm.bias")
        flat[o + "ln2/scale"] = get(0, p + "post_attention_layernorm.weight")
        flat[o + "ln2/bias"] = get(0, p + "post_attention_layernorm.bias")
        flat[o + "mlp/wi/kernel"] = np.ascontiguousarray(cat(p + "mlp.dense_h_to_4h.weight", 0).T)  # [d, f]
        flat[o + "mlp/wi/bias"] = cat(p + "mlp.dense_h_to_4h.bias", 0)
        flat[o + "mlp/wo/kernel"] = np.ascontiguousarray(cat(p + "mlp.dense_4h_to_h.weight", 1).T)  # [f, d]
        flat[o + "mlp/wo/bias"] = get(0, p + "mlp.dense_4h_to_h.bias")
        say(f"Megatron layer {i + 1}/{L}")
    params = nest(flat)
    check_params(cfg, params, path)
    return cfg, params


def _flatten(tree, prefix=""):
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    elif prefix:
        out[prefix] = tree
    return out

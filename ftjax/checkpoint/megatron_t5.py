"""Megatron-LM and NeMo Megatron T5 checkpoints, read without Megatron or NeMo installed — the layouts
FasterTransformer's `examples/pytorch/t5/utils/megatron_t5_ckpt_convert.py` and `nemo_t5_ckpt_convert.py`
(FT v5.1 - v5.3) read.

NeMo (`MegatronT5Model`, NeMo 1.x): a `.nemo` file (a tar, optionally gzipped, holding `model_config.yaml`
and `model_weights.ckpt` or `mp_rank_XX/model_weights.ckpt`), or the folder it unpacks to, or a
`model_weights.ckpt` beside its yaml. The yaml is read with PyYAML (NeMo writes it resolved). Each
`model_weights.ckpt` is a torch-pickled flat state dict (optionally under `state_dict`; an O2 model's names
start with `model.`):
  enc_dec_model.encoder_embedding.word_embeddings.weight                       [v/T, d]  (vocab-parallel)
  enc_dec_model.decoder_embedding.word_embeddings.weight                       (same tensor when shared)
  enc_dec_model.{encoder,decoder}_relative_position_embedding.relative_position_embedding.weight  [B, n]
  enc_dec_model.tokens_head.weight [v/T, d] (untied head only), enc_dec_model.tokens_head.bias [v/T]
  enc_dec_model.enc_dec_model.{encoder,decoder}.model.final_layernorm.weight  [d]
  enc_dec_model.enc_dec_model.encoder.model.layers.{i}.
      input_layernorm.weight [d]; self_attention.query_key_value.weight [3 n/T h, d];
      self_attention.dense.weight [d, n/T h]; post_attention_layernorm.weight [d];
      mlp.dense_h_to_4h.weight [f/T, d]; mlp.dense_h_to_4h_2.weight [f/T, d] (gated); mlp.dense_4h_to_h.weight [d, f/T]
  enc_dec_model.enc_dec_model.decoder.model.layers.{i}.
      input_layernorm, self_attention.{query_key_value,dense}, post_attention_layernorm,
      inter_attention.query.weight [n/T h, d]; inter_attention.key_value.weight [2 n/T h, d];
      inter_attention.dense.weight [d, n/T h]; post_inter_attention_layernorm.weight; mlp.* as the encoder's
Fused rows per rank are ordered (n/T, 3, h) / (n/T, 2, h) — or (3, n/T, h) when `megatron_legacy`.
Column-parallel weights (QKV, query, key_value, h_to_4h[_2], word embeddings, tokens head) are concatenated
over ranks along their rows, row-parallel ones (dense, 4h_to_h) along their columns; norms and the
relative-position tables are replicated (rank 0's is used).

Config (`model_config.yaml`, top level or per-stack `encoder:` / `decoder:` sub-configs): num_layers,
hidden_size, ffn_hidden_size, num_attention_heads, kv_channels (null = hidden / heads), activation
(relu, gelu, geglu, reglu, swiglu; `openai_gelu` selects the tanh GELU), bias, normalization,
position_embedding_type, relative_attention_num_buckets (32), relative_attention_max_distance (128),
relative_position_bias_self_attention_only, normalize_attention_scores (True: scores / sqrt(kv_channels),
folded here into the query weights), layernorm_epsilon (1e-5), transformer_block_type, headscale,
share_token_embeddings, share_decoder_tokens_head_embeddings (True: the output is the word embedding,
without T5 v1.0's d_model**-0.5 scaling), tokens_head_bias, tensor_model_parallel_size,
pipeline_model_parallel_size. Token ids: NeMo keeps them in the tokenizer, which is not read here; the
yaml may carry `decoder_start_token_id` / `eos_token_id` / `pad_token_id`, else 0 / 1 / 0 (T5's
sentencepiece convention) — pass `start_id` / `end_id` to generate for other tokenizers.

What the ftjax T5 model expresses, and so what loads: pre-LN stacks with RMS norms, no biases (an
all-zero tokens-head bias is dropped), relative position bias in self-attention only, relu / gelu / gated
FFNs, one word embedding for both stacks — i.e. HF-T5-shaped NeMo models (`bias: False`, `normalization:
rmsnorm`, `position_embedding_type: relative`). Everything else is refused with an error naming the
setting: `bias: True` (biased linears), `normalization: layernorm | layernorm1p` (LayerNorm with bias),
`position_embedding_type: learned_absolute | alibi | kerple`, `transformer_block_type: post_ln |
normformer`, `headscale`, `arch` other than transformer, fast-* / squared-relu activations, cross-attention
position bias, separate decoder embeddings, a non-zero LM-head bias, pipeline-parallel shards.

Megatron-LM T5 (`megatron/model/t5_model.py`; the layout FT's `megatron_t5_ckpt_convert.py` reads): the
paths `megatron.resolve_rank_files` takes (`latest_checkpointed_iteration.txt` + `release/` / `iter_XXXXXXX/`,
a folder of `mp_rank_XX/`, or one `model_optim_rng.pt`), one file per tensor-parallel rank, each
{`args`, `checkpoint_version`, `model`: {`language_model`: {`embedding`: {`word_embeddings.weight` [v/T, d],
`position_embeddings.weight` [p, d]}, `encoder`, `decoder`}, `lm_head`: {`bias` [v/T]}}} with, per stack,
  layers.{i}.input_layernorm.{weight,bias} [d]; self_attention.query_key_value.{weight [3 n/T h, d], bias};
  self_attention.dense.{weight [d, n/T h], bias [d]}; post_attention_layernorm.{weight,bias};
  (decoder) inter_attention.query.{weight [n/T h, d], bias}, inter_attention.key_value.{weight [2 n/T h, d],
  bias}, inter_attention.dense.{weight, bias}, post_inter_attention_layernorm.{weight,bias};
  mlp.dense_h_to_4h.{weight [f/T, d], bias [f/T]}; mlp.dense_4h_to_h.{weight [d, f/T], bias [d]};
  final_layernorm.{weight,bias}
(older releases name the self attention `layers.{i}.attention.*`; both are read). Fused rows per rank follow
`fix_query_key_value_ordering`, as for GPT: checkpoint_version 0 (parts, n/T, h), 1.0 (n/T, h, parts),
2.0 and 3.0 (n/T, parts, h), for query_key_value (3 parts) and key_value (2). Column-parallel weights and
biases (QKV, query, key_value, h_to_4h, word embeddings, lm_head.bias) are concatenated over ranks along
their rows, row-parallel weights (dense, 4h_to_h) along their columns; norms, row-parallel biases and the
position table are replicated (rank 0's is used). Loaded as a T5Config with norm="layernorm",
linear_bias=True, position="learned" (max_positions = the table's rows; one table for both stacks),
lm_head_bias=True, tied output without scaling (logits = h @ word_embeddings.T + lm_head.bias); the
1/sqrt(kv_channels) score scaling (apply_query_key_layer_scaling cancels out) is folded into the query
weight and bias. Args read: num_layers / encoder_num_layers, decoder_num_layers, hidden_size,
num_attention_heads, kv_channels, ffn_hidden_size, layernorm_epsilon (1e-5), openai_gelu / bias_gelu_fusion
(GELU in tanh form when either is set — Megatron's fused bias-GELU is the tanh form and bias_gelu_fusion
defaults on; exact erf GELU only with `--no-bias-gelu-fusion`), tokenizer_type, tensor/pipeline sizes.
Token ids: with a BertWordPiece tokenizer and >= 30524 rows, decoder start [BOS] = 30522 and eos [EOS] =
30523 (FT's example values), pad 0; otherwise start 0, no eos, pad 0 — pass `start_id` / `end_id` to
generate. Refused with an error naming the arg: pipeline-parallel shards, post-LN residuals, non-learned
positions, RMSNorm, SwiGLU, bias-free linears, untied output layer, grouped-query attention.
Tested (tests/test_t5_megatron.py) with TP=2 shards of checkpoint_version 0, 1.0 and 3.0.

Reading uses `torch.load(..., weights_only=False)` with stub classes for pickled objects of packages not
installed (NeMo / Megatron / OmegaConf objects stored beside the weights). Only load checkpoints you trust.
"""
from __future__ import annotations

import os
import re
import tarfile
import tempfile
from typing import Any, Callable

import numpy as np

from ftjax.checkpoint.common import check_params, nest
from ftjax.checkpoint.megatron import _load_pt, _np, resolve_rank_files
from ftjax.config import T5Config

NEMO_WEIGHTS = "model_weights.ckpt"
NEMO_CONFIG = "model_config.yaml"
_E = "enc_dec_model."
_STACK = "enc_dec_model.enc_dec_model.{}.model."


# ------------------------------------------------------------------------------------------------ detection
def is_nemo(path: str) -> bool:
    """A `.nemo` archive, a `model_weights.ckpt` file, or a folder holding model_config.yaml and weights."""
    if os.path.isfile(path):
        return path.endswith(".nemo") or os.path.basename(path).endswith(".ckpt")
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, NEMO_CONFIG)):
        return False
    return os.path.exists(os.path.join(path, NEMO_WEIGHTS)) or any(
        re.fullmatch(r"(mp_rank_\d+|tp_rank_\d+_pp_rank_\d+)", e) for e in os.listdir(path))


def is_megatron_t5(path: str) -> bool:
    """Whether a Megatron-LM checkpoint (any layout megatron.resolve_rank_files takes) holds a T5."""
    try:
        files = resolve_rank_files(path)
    except ValueError:
        return False
    import torch

    from ftjax.checkpoint.megatron import _lenient_pickle
    try:  # memory-mapped: only the pickle is read
        sd = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True, pickle_module=_lenient_pickle())
    except Exception:
        sd = _load_pt(files[0])
    model = sd.get("model", {}) if isinstance(sd, dict) else {}
    lm = model.get("language_model", {}) if isinstance(model, dict) else {}
    return isinstance(lm, dict) and "decoder" in lm


def _shard_readers(shards, files, T):
    """(get, cat) over tensor-parallel state dicts: get(r, key, shape) checks presence and shape (errors
    name the rank's file, the key and both shapes); cat(key, shape, axis) joins the T ranks."""
    def get(r, key, shape):
        sd = shards[r]
        if key not in sd:
            raise ValueError(f"{files[r]}: missing weight {key!r}")
        a = _np(sd[key])
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"{files[r]}: weight {key!r} has shape {tuple(a.shape)}, expected {tuple(shape)}")
        return a.astype(np.float32)

    def cat(key, shape, axis):
        return np.concatenate([get(r, key, shape) for r in range(T)], axis=axis)

    return get, cat


def load_megatron_t5(path: str, progress: Callable[[str], None] | None = None,
                     **_) -> tuple[T5Config, dict[str, Any]]:
    """(T5Config, params as float32 numpy arrays) from a Megatron-LM T5 checkpoint (see the module docstring)."""
    import argparse

    from ftjax.checkpoint.megatron import _arg, _flatten

    say = progress or (lambda msg: None)
    files = resolve_rank_files(path)
    T = len(files)
    shards = []
    for r, fn in enumerate(files):
        say(f"reading Megatron T5 rank {r + 1}/{T}: {fn}")
        shards.append(_load_pt(fn))
    first = shards[0]
    args = first.get("args")
    if isinstance(args, dict):
        args = argparse.Namespace(**args)
    version = float(first.get("checkpoint_version", 0) or 0)
    tp = int(_arg(args, "tensor_model_parallel_size", "model_parallel_size", default=T))
    if tp != T:
        raise ValueError(f"{path}: args.tensor_model_parallel_size is {tp} but {T} mp_rank_XX shards were found")
    if int(_arg(args, "pipeline_model_parallel_size", default=1)) != 1:
        raise ValueError(f"{path}: pipeline_model_parallel_size {args.pipeline_model_parallel_size}: "
                         "pipeline-parallel shards are not supported (merge the stages first)")

    def refuse(flag, why):
        raise ValueError(f"{path}: Megatron args.{flag} = {getattr(args, flag)!r}: {why} is not supported "
                         "by the ftjax T5 model")

    if args is not None:
        if getattr(args, "apply_residual_connection_post_layernorm", False):
            refuse("apply_residual_connection_post_layernorm", "post-LayerNorm residual")
        if getattr(args, "position_embedding_type", "learned_absolute") not in ("learned_absolute", None):
            refuse("position_embedding_type", "positions other than learned absolute")
        if getattr(args, "normalization", "LayerNorm") not in ("LayerNorm", None):
            refuse("normalization", "a norm other than LayerNorm")
        if getattr(args, "swiglu", False):
            refuse("swiglu", "SwiGLU")
        if getattr(args, "add_bias_linear", True) is False:
            refuse("add_bias_linear", "bias-free linear layers in a Megatron-LM T5")
        if getattr(args, "untie_embeddings_and_output_weights", False):
            refuse("untie_embeddings_and_output_weights", "an output layer separate from the word embedding")
        if getattr(args, "group_query_attention", False):
            refuse("group_query_attention", "grouped-query attention")

    # Per-rank flat dicts: "embedding.word_embeddings.weight", "encoder.layers.0....", "lm_head.bias".
    per_rank = []
    for fn, sd in zip(files, shards):
        model = sd.get("model") if isinstance(sd, dict) else None
        lm = model.get("language_model") if isinstance(model, dict) else None
        if not isinstance(lm, dict) or "encoder" not in lm or "decoder" not in lm:
            raise ValueError(f"{fn}: not a Megatron-LM T5 checkpoint (model.language_model needs 'encoder' "
                             "and 'decoder')")
        flat = {"embedding." + k: v for k, v in _flatten(lm.get("embedding", {})).items()}
        for side in ("encoder", "decoder"):
            for k, v in _flatten(lm[side]).items():  # older releases: layers.{i}.attention.* (self attention)
                flat[f"{side}.{k.replace('.attention.', '.self_attention.')}"] = v
        for k, v in _flatten(model.get("lm_head", {})).items():
            flat["lm_head." + k] = v
        per_rank.append(flat)

    get, cat = _shard_readers(per_rank, files, T)

    wte_key = "embedding.word_embeddings.weight"
    if wte_key not in per_rank[0]:
        raise ValueError(f"{files[0]}: missing weight {'model.language_model.' + wte_key!r}")
    v_rows, d = (int(s) for s in per_rank[0][wte_key].shape)
    emb = cat(wte_key, (v_rows, d), 0)                                     # [v, d] (vocab-parallel)
    p_rows = int(np.shape(per_rank[0].get("embedding.position_embeddings.weight", np.zeros((0, d))))[0])
    n = int(_arg(args, "num_attention_heads", default=0))
    if n <= 0:
        raise ValueError(f"{path}: the checkpoint has no args.num_attention_heads")
    h = int(_arg(args, "kv_channels", default=d // n))
    if int(_arg(args, "hidden_size", default=d)) != d:
        raise ValueError(f"{path}: args.hidden_size={args.hidden_size} but word_embeddings have width {d}")
    if n % T:
        raise ValueError(f"{path}: num_attention_heads {n} is not a multiple of the tensor parallel size {T}")
    npr = n // T
    fr = int(np.shape(per_rank[0].get("encoder.layers.0.mlp.dense_h_to_4h.weight", np.zeros((0,))))[0])
    f = int(_arg(args, "ffn_hidden_size", default=fr * T))
    if f % T:
        raise ValueError(f"{path}: ffn_hidden_size {f} is not a multiple of the tensor parallel size {T}")
    fr = f // T

    def n_layers(side):
        ids = sorted({int(m.group(1)) for k in per_rank[0] if (m := re.match(side + r"\.layers\.(\d+)\.", k))})
        if not ids or ids != list(range(len(ids))):
            raise ValueError(f"{path}: {side} layer indices {ids[:8]} are not 0..L-1")
        return len(ids)

    layers = {"encoder": n_layers("encoder"), "decoder": n_layers("decoder")}
    want = {"encoder": _arg(args, "encoder_num_layers", "num_layers"),
            "decoder": _arg(args, "decoder_num_layers", "num_layers")}
    for side in layers:
        if want[side] is not None and int(want[side]) != layers[side]:
            raise ValueError(f"{path}: args say {want[side]} {side} layers but the checkpoint has {layers[side]}")

    def order(a, parts):  # per-rank fused rows [(parts * npr * h), ...] -> [parts, npr, h, ...]
        rest = a.shape[1:]
        if parts == 1 or version == 0:
            return a.reshape((parts, npr, h) + rest)
        if version == 1.0:
            return np.moveaxis(a.reshape((npr, h, parts) + rest), 2, 0)
        return np.moveaxis(a.reshape((npr, parts, h) + rest), 1, 0)

    def fused(key, parts):  # -> [parts] of (kernel [d, n, h], bias [n, h])
        w = np.concatenate([order(get(r, key + ".weight", (parts * npr * h, d)), parts) for r in range(T)], 1)
        b = np.concatenate([order(get(r, key + ".bias", (parts * npr * h,)), parts) for r in range(T)], 1)
        return [(np.ascontiguousarray(w[j].transpose(2, 0, 1)), b[j]) for j in range(parts)]

    qs = h ** -0.5  # Megatron's 1/sqrt(kv_channels) (apply_query_key_layer_scaling cancels out), folded into q
    flat: dict[str, Any] = {"embed/tokens": emb,
                            "embed/positions": get(0, "embedding.position_embeddings.weight", (p_rows, d)),
                            "lm_head_bias": cat("lm_head.bias", (v_rows,), 0)}

    def norm(o, key):
        flat[o + "/scale"], flat[o + "/bias"] = get(0, key + ".weight", (d,)), get(0, key + ".bias", (d,))

    def attn(o, pre, q_key, kv_key):
        if kv_key is None:
            (qw, qb), (kw, kb), (vw, vb) = fused(pre + q_key, 3)
        else:
            ((qw, qb),) = fused(pre + q_key, 1)
            (kw, kb), (vw, vb) = fused(pre + kv_key, 2)
        flat[o + "/q/kernel"], flat[o + "/q/bias"] = qw * qs, qb * qs
        flat[o + "/k/kernel"], flat[o + "/k/bias"] = kw, kb
        flat[o + "/v/kernel"], flat[o + "/v/bias"] = vw, vb
        dense = pre + ("self_attention" if kv_key is None else "inter_attention") + ".dense"
        flat[o + "/o/kernel"] = cat(dense + ".weight", (d, npr * h), 1).T.reshape(n, h, d)
        flat[o + "/o/bias"] = get(0, dense + ".bias", (d,))

    for side, nl in layers.items():
        norm(f"{side}/final_norm", f"{side}.final_layernorm")
        for i in range(nl):
            p, o = f"{side}.layers.{i}.", f"{side}/layers_{i}/"
            if side == "encoder":
                norm(o + "ln_attn", p + "input_layernorm")
                attn(o + "attn", p, "self_attention.query_key_value", None)
            else:
                norm(o + "ln_self", p + "input_layernorm")
                attn(o + "self_attn", p, "self_attention.query_key_value", None)
                norm(o + "ln_cross", p + "post_attention_layernorm")
                attn(o + "cross_attn", p, "inter_attention.query", "inter_attention.key_value")
            norm(o + "ln_ff", p + ("post_attention_layernorm" if side == "encoder" else "post_inter_attention_layernorm"))
            flat[o + "mlp/wi/kernel"] = np.ascontiguousarray(cat(p + "mlp.dense_h_to_4h.weight", (fr, d), 0).T)
            flat[o + "mlp/wi/bias"] = cat(p + "mlp.dense_h_to_4h.bias", (fr,), 0)
            flat[o + "mlp/wo/kernel"] = np.ascontiguousarray(cat(p + "mlp.dense_4h_to_h.weight", (d, fr), 1).T)
            flat[o + "mlp/wo/bias"] = get(0, p + "mlp.dense_4h_to_h.bias", (d,))
            say(f"Megatron T5 {side} layer {i + 1}/{nl}")

    fused_gelu = _arg(args, "bias_gelu_fusion", default=True)
    act = "gelu_tanh" if (_arg(args, "openai_gelu", default=False) or fused_gelu) else "gelu"
    bert = str(_arg(args, "tokenizer_type", default="")).startswith("BertWordPiece") and emb.shape[0] >= 30524
    cfg = T5Config(vocab_size=emb.shape[0], hidden=d, head_dim=h, ffn_dim=f, num_heads=n,
                   num_encoder_layers=layers["encoder"], num_decoder_layers=layers["decoder"],
                   norm_eps=float(_arg(args, "layernorm_epsilon", "norm_epsilon", default=1e-5)),
                   activation=act, gated_ffn=False, tie_embeddings=True, scale_logits=False,
                   max_positions=p_rows, norm="layernorm", linear_bias=True, position="learned", lm_head_bias=True,
                   decoder_start_id=30522 if bert else 0, eos_id=30523 if bert else None, pad_id=0)
    params = nest(flat)
    check_params(cfg, params, path)
    return cfg, params


# ------------------------------------------------------------------------------------------------ NeMo
def _read_yaml(fn: str) -> dict[str, Any]:
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("reading NeMo checkpoints needs PyYAML (pip install pyyaml)") from e
    with open(fn) as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"{fn}: not a NeMo model config (a YAML mapping)")
    return cfg


def _nemo_files(root: str, cfg: dict[str, Any]) -> list[str]:
    T = int(cfg.get("tensor_model_parallel_size", 1) or 1)
    P = int(cfg.get("pipeline_model_parallel_size", 1) or 1)
    if P != 1 or any(re.fullmatch(r"tp_rank_\d+_pp_rank_\d+", e) for e in os.listdir(root)):
        raise ValueError(f"{root}: pipeline_model_parallel_size {P}: pipeline-parallel NeMo shards "
                         "(tp_rank_XX_pp_rank_XXX) are not supported; merge the stages first")
    if T == 1:
        files = [os.path.join(root, NEMO_WEIGHTS)]
    else:
        files = [os.path.join(root, f"mp_rank_{r:02d}", NEMO_WEIGHTS) for r in range(T)]
    for f in files:
        if not os.path.exists(f):
            raise ValueError(f"{root}: tensor_model_parallel_size {T}, but {os.path.relpath(f, root)} is missing")
    return files


def load_nemo_t5(path: str, progress: Callable[[str], None] | None = None, **_) -> tuple[T5Config, dict[str, Any]]:
    """(T5Config, params as float32 numpy arrays) from a `.nemo` archive, its unpacked folder, or a
    `model_weights.ckpt` beside its `model_config.yaml`."""
    say = progress or (lambda msg: None)
    if os.path.isfile(path) and path.endswith(".nemo"):
        with tempfile.TemporaryDirectory(prefix="ftjax_nemo_") as tmp:
            say(f"unpacking {path}")
            try:
                with tarfile.open(path, "r:*") as tar:
                    tar.extractall(tmp, filter="data")
            except tarfile.TarError as e:
                raise ValueError(f"{path}: not a readable .nemo archive ({e})") from None
            subs = [os.path.join(tmp, e) for e in os.listdir(tmp)]
            root = tmp if os.path.exists(os.path.join(tmp, NEMO_CONFIG)) else next(
                (s for s in subs if os.path.exists(os.path.join(s, NEMO_CONFIG))), None)
            if root is None:
                raise ValueError(f"{path}: the archive holds no {NEMO_CONFIG}")
            return _load_nemo_dir(root, path, say)
    if os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))
    return _load_nemo_dir(path, path, say)


def _stack_cfg(cfg: dict[str, Any], side: str) -> dict[str, Any]:
    sub = cfg.get(side)
    return {**cfg, **sub} if isinstance(sub, dict) else cfg


def _load_nemo_dir(root: str, source: str, say) -> tuple[T5Config, dict[str, Any]]:
    yml = os.path.join(root, NEMO_CONFIG)
    if not os.path.exists(yml):
        raise ValueError(f"{source}: no {NEMO_CONFIG} beside the weights")
    top = _read_yaml(yml)
    enc_c, dec_c = _stack_cfg(top, "encoder"), _stack_cfg(top, "decoder")
    where = f"{source} ({NEMO_CONFIG})"

    def refuse(key, val, why):
        raise ValueError(f"{where}: {key}: {val!r} ({why}) is not supported by the ftjax T5 model")

    for c in (enc_c, dec_c):
        if c.get("bias", True):
            refuse("bias", c.get("bias", True), "biased linear layers; the ftjax T5 model has none")
        if str(c.get("normalization", "layernorm")).lower() != "rmsnorm":
            refuse("normalization", c.get("normalization", "layernorm"), "LayerNorm with bias; ftjax T5 uses RMSNorm")
        if str(c.get("position_embedding_type", "learned_absolute")) != "relative":
            refuse("position_embedding_type", c.get("position_embedding_type", "learned_absolute"),
                   "ftjax T5 has relative position bias only")
        if str(c.get("transformer_block_type", "pre_ln")) != "pre_ln":
            refuse("transformer_block_type", c.get("transformer_block_type"), "only pre-LN blocks")
        if c.get("headscale", False):
            refuse("headscale", True, "per-head output scaling")
        if str(c.get("arch", "transformer")) != "transformer":
            refuse("arch", c.get("arch"), "only the plain transformer stack")
        if c.get("relative_position_bias_self_attention_only", True) is False:
            refuse("relative_position_bias_self_attention_only", False, "position bias in cross attention")
        if c.get("megatron_legacy", False) != enc_c.get("megatron_legacy", False):
            refuse("megatron_legacy", c.get("megatron_legacy"), "stacks with different QKV layouts")
    for key in ("hidden_size", "num_attention_heads", "ffn_hidden_size", "kv_channels", "activation",
                "relative_attention_num_buckets", "relative_attention_max_distance", "layernorm_epsilon",
                "normalize_attention_scores", "openai_gelu"):
        if enc_c.get(key) != dec_c.get(key):
            raise ValueError(f"{where}: encoder {key} {enc_c.get(key)!r} differs from decoder {dec_c.get(key)!r}; "
                             "the ftjax T5 model has one setting for both stacks")
    act_name = str(enc_c.get("activation", "gelu")).lower()
    acts = {"relu": ("relu", False), "gelu": ("gelu", False), "geglu": ("gelu", True), "reglu": ("relu", True),
            "swiglu": ("silu", True)}
    if act_name not in acts:
        refuse("activation", act_name, "supported: relu, gelu, geglu, reglu, swiglu")
    act, gated = acts[act_name]
    if act == "gelu" and enc_c.get("openai_gelu", False):
        act = "gelu_tanh"
    d, n = int(enc_c["hidden_size"]), int(enc_c["num_attention_heads"])
    h = int(enc_c.get("kv_channels") or d // n)
    f = int(enc_c["ffn_hidden_size"])
    legacy = bool(enc_c.get("megatron_legacy", False))
    scale_q = bool(enc_c.get("normalize_attention_scores", True))

    files = _nemo_files(root, top)
    T = len(files)
    if n % T or f % T:
        raise ValueError(f"{where}: tensor_model_parallel_size {T} must divide heads {n} and ffn_hidden_size {f}")
    npr = n // T
    shards = []
    for r, fn in enumerate(files):
        say(f"reading NeMo rank {r + 1}/{T}: {fn}")
        sd = _load_pt(fn)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        if not isinstance(sd, dict):
            raise ValueError(f"{fn}: not a NeMo state dict")
        shards.append({(k[6:] if k.startswith("model.") else k): v for k, v in sd.items()})

    get, cat = _shard_readers(shards, files, T)

    def fused(key, parts):  # [(np, parts, h) rows, d] per rank -> [parts] of [d, n, h]
        out = []
        for r in range(T):
            w = get(r, key, (npr * parts * h, d))
            w = w.reshape(parts, npr, h, d) if legacy else w.reshape(npr, parts, h, d).transpose(1, 0, 2, 3)
            out.append(w)
        w = np.concatenate(out, axis=1)                                    # [parts, n, h, d]
        return [np.ascontiguousarray(w[j].transpose(2, 0, 1)) for j in range(parts)]

    qs = h ** -0.5 if scale_q else 1.0
    emb_key = _E + "encoder_embedding.word_embeddings.weight"
    if emb_key not in shards[0]:
        raise ValueError(f"{files[0]}: missing weight {emb_key!r}")
    v_rows = int(shards[0][emb_key].shape[0])  # vocabulary rows per rank (vocab-parallel, padded)
    emb = cat(emb_key, (v_rows, d), 0)
    v = emb.shape[0]
    dec_emb_key = _E + "decoder_embedding.word_embeddings.weight"
    if dec_emb_key in shards[0] and not np.array_equal(cat(dec_emb_key, (v_rows, d), 0), emb):
        raise ValueError(f"{where}: separate decoder word embeddings ({dec_emb_key}) are not supported; "
                         "the ftjax T5 model shares one embedding")
    B = int(enc_c.get("relative_attention_num_buckets", 32))
    flat: dict[str, Any] = {"embed/tokens": emb}
    layers = {"encoder": int(enc_c["num_layers"]), "decoder": int(dec_c["num_layers"])}
    for side, nl in layers.items():
        pre = _STACK.format(side)
        flat[f"{side}/rel_bias/table"] = get(
            0, _E + f"{side}_relative_position_embedding.relative_position_embedding.weight", (B, n))
        flat[f"{side}/final_norm/scale"] = get(0, pre + "final_layernorm.weight", (d,))
        for i in range(nl):
            p, o = f"{pre}layers.{i}.", f"{side}/layers_{i}/"
            sa = "attn" if side == "encoder" else "self_attn"
            q, k, vv = fused(p + "self_attention.query_key_value.weight", 3)
            flat[o + f"{sa}/q/kernel"], flat[o + f"{sa}/k/kernel"], flat[o + f"{sa}/v/kernel"] = q * qs, k, vv
            flat[o + f"{sa}/o/kernel"] = cat(p + "self_attention.dense.weight", (d, npr * h), 1).T.reshape(n, h, d)
            ln = ("ln_attn", "ln_ff") if side == "encoder" else ("ln_self", "ln_ff")
            flat[o + f"{ln[0]}/scale"] = get(0, p + "input_layernorm.weight", (d,))
            if side == "decoder":
                flat[o + "ln_cross/scale"] = get(0, p + "post_attention_layernorm.weight", (d,))
                (cq,) = fused(p + "inter_attention.query.weight", 1)
                ck, cv = fused(p + "inter_attention.key_value.weight", 2)
                flat[o + "cross_attn/q/kernel"], flat[o + "cross_attn/k/kernel"] = cq * qs, ck
                flat[o + "cross_attn/v/kernel"] = cv
                flat[o + "cross_attn/o/kernel"] = cat(p + "inter_attention.dense.weight", (d, npr * h), 1).T.reshape(n, h, d)
                flat[o + "ln_ff/scale"] = get(0, p + "post_inter_attention_layernorm.weight", (d,))
            else:
                flat[o + "ln_ff/scale"] = get(0, p + "post_attention_layernorm.weight", (d,))
            fr = f // T
            if gated:  # NeMo: act(h_to_4h(x)) * h_to_4h_2(x) -> ftjax wg = h_to_4h, wi = h_to_4h_2
                flat[o + "mlp/wg/kernel"] = cat(p + "mlp.dense_h_to_4h.weight", (fr, d), 0).T
                flat[o + "mlp/wi/kernel"] = cat(p + "mlp.dense_h_to_4h_2.weight", (fr, d), 0).T
            else:
                flat[o + "mlp/wi/kernel"] = cat(p + "mlp.dense_h_to_4h.weight", (fr, d), 0).T
            flat[o + "mlp/wo/kernel"] = cat(p + "mlp.dense_4h_to_h.weight", (d, fr), 1).T
            say(f"NeMo T5 {side} layer {i + 1}/{nl}")
    bias_key = _E + "tokens_head.bias"
    if bias_key in shards[0]:
        if np.any(cat(bias_key, (v_rows,), 0)):
            raise ValueError(f"{where}: a non-zero LM-head bias ({bias_key}; tokens_head_bias: True) is not "
                             "supported by the ftjax T5 model")
    tie = bool(top.get("share_decoder_tokens_head_embeddings", True))
    head_key = _E + "tokens_head.weight"
    if not tie:
        flat["lm_head/kernel"] = np.ascontiguousarray(cat(head_key, (v_rows, d), 0).T)
    biased = sorted(k for k in shards[0] if k.endswith(".bias") and k != bias_key)
    if biased:
        raise ValueError(f"{where}: weights {biased[:4]} are biases, which the ftjax T5 model does not have")

    def tok(key, default):
        val = top.get(key)
        return default if val is None else int(val)

    cfg = T5Config(vocab_size=v, hidden=d, head_dim=h, ffn_dim=f, num_heads=n,
                   num_encoder_layers=layers["encoder"], num_decoder_layers=layers["decoder"],
                   relative_buckets=B, relative_max_distance=int(enc_c.get("relative_attention_max_distance", 128)),
                   norm_eps=float(enc_c.get("layernorm_epsilon", 1e-5)), activation=act, gated_ffn=gated,
                   tie_embeddings=tie, scale_logits=False,
                   max_positions=int(top.get("max_position_embeddings", 512) or 512),
                   decoder_start_id=tok("decoder_start_token_id", 0), eos_id=tok("eos_token_id", 1),
                   pad_id=tok("pad_token_id", 0))
    params = nest(flat)
    check_params(cfg, params, source)
    return cfg, params

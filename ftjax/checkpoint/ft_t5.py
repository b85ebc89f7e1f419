"""FasterTransformer's converted T5 folders: what `examples/pytorch/t5/utils/huggingface_t5_ckpt_convert.py`
(FT v5.0 - v5.3, and the later numpy-mode rewrite) writes into `{out}/{T}-gpu/`, and what
`T5EncoderWeight.cc`, `T5EncoderLayerWeight.cc`, `T5DecodingWeight.cc` and `T5DecoderLayerWeight.cc` read
(the Triton backend's `T5TritonModel.cc` reads the config).

config.ini (written with configparser from the HF config's `to_dict()`):
  [encoder]   d_model, d_kv, d_ff, num_heads, num_layers, vocab_size,
              relative_attention_num_buckets_or_max_pos_seq_len (HF's relative_attention_num_buckets),
              relative_attention_max_distance, layer_norm_epsilon, feed_forward_proj, weight_data_type, ...
  [decoder]   the same for the decoder stack (num_layers = the decoder depth), decoder_start_token_id,
              eos_token_id, pad_token_id, tie_word_embeddings (FT's default: true)
  [structure] t5_with_bias (false), use_gated_activation, position_embedding_type ("relative"; v5.0 wrote 0)

Weights (T = tensor-parallel ranks, n heads of h, d = d_model, f = d_ff, v = vocab, B = buckets; every
file a raw little-endian C-order array of weight_data_type fp32 / fp16 / bf16, no header):
  shared.weight_T.bin                                            [v, d]  (the embedding FT reads)
  shared.weight.bin                                              [d, v]  (written, not read)
  lm_head.weight.bin                                             [v, d]  (optional; FT uses it when present)
  {encoder,decoder}.final_layer_norm.weight.bin                  [d]
  {encoder,decoder}.block.0.layer.0.SelfAttention.relative_attention_bias.weight.{r}.bin   [n/T, B]
  encoder.block.{i}.layer.0.layer_norm.weight.bin                [d]
  encoder.block.{i}.layer.0.SelfAttention.{q,k,v}.weight.{r}.bin [d, n/T * h]
  encoder.block.{i}.layer.0.SelfAttention.o.weight.{r}.bin       [n/T * h, d]
  encoder.block.{i}.layer.1.layer_norm.weight.bin                [d]
  encoder.block.{i}.layer.1.DenseReluDense.wi.weight.{r}.bin     [d, f/T]  (gated: HF's wi_0, the activated one)
  encoder.block.{i}.layer.1.DenseReluDense.wi2.weight.{r}.bin    [d, f/T]  (gated only: HF's wi_1)
  encoder.block.{i}.layer.1.DenseReluDense.wo.weight.{r}.bin     [f/T, d]
  decoder.block.{i}.layer.0.layer_norm.weight.bin                [d]
  decoder.block.{i}.layer.0.SelfAttention.qkv.weight.{r}.bin     [d, 3, n/T * h]  (fused)
  decoder.block.{i}.layer.0.SelfAttention.o.weight.{r}.bin       [n/T * h, d]
  decoder.block.{i}.layer.1.layer_norm.weight.bin                [d]
  decoder.block.{i}.layer.1.EncDecAttention.{q,k,v}.weight.{r}.bin, .o.weight.{r}.bin   (as the encoder's)
  decoder.block.{i}.layer.2.layer_norm.weight.bin                [d]
  decoder.block.{i}.layer.2.DenseReluDense.{wi,wi2,wo}.weight.{r}.bin                    (as the encoder's)

Each rank's columns hold its n/T heads, head-major. T is `tensor_para_size` when the config names it
(NeMo's converter writes it), else the count of encoder layer-0 `o.weight` rank files; the path may be the
`{T}-gpu/` folder or the folder above it holding exactly one such folder.

Output projection, as FT's T5Decoding: `lm_head.weight.bin` when present (the HF converter writes it even
for tied models; when it equals the embedding the model stays tied), else the embedding; logits are scaled by
d_model**-0.5 when `tie_word_embeddings` is true (HF T5 v1.0), or as `scale_decoder_outputs` says when the
config carries it (transformers 5).

Refused, naming the setting: `t5_with_bias = true` (Megatron / NeMo T5: biased linears, LayerNorm with
bias, an LM-head bias `shared.bias.bin`, 1/sqrt(d_kv) attention scaling), `position_embedding_type =
absolute` (`shared.ape.bin`), adapters, IA3, prompt tables, and encoder/decoder stacks whose widths differ
— the ftjax T5 model expresses none of them.
"""
from __future__ import annotations

import configparser
import os
import re
from typing import Any, Callable

import numpy as np

from ftjax.checkpoint.common import check_params, nest
from ftjax.checkpoint.ft import RawFiles
from ftjax.config import T5Config, _Ini, read_ini

_WEIGHT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_TRUE = ("1", "true", "yes", "on")


def is_ft_t5_dir(path: str) -> bool:
    """An FT T5 folder: config.ini with an [encoder] section beside shared.weight_T.bin."""
    return (os.path.exists(os.path.join(path, "config.ini"))
            and os.path.exists(os.path.join(path, "shared.weight_T.bin")))


def find_ft_t5(path: str) -> str | None:
    """The FT T5 folder at `path` or in its single `<N>-gpu` subfolder; None when there is none."""
    if not os.path.isdir(path):
        return None
    if is_ft_t5_dir(path):
        return path
    subs = sorted(s for s in os.listdir(path)
                  if re.fullmatch(r"\d+-gpu", s) and is_ft_t5_dir(os.path.join(path, s)))
    if len(subs) > 1:
        raise ValueError(f"{path}: several FasterTransformer T5 folders {subs}; pass the one to load")
    return os.path.join(path, subs[0]) if subs else None


def _np_dtype(name: str, ini: str):
    key = next((k for k in _WEIGHT_DTYPES if k in name.strip().lower()), None)  # FT matches by substring
    if key is None:
        raise ValueError(f"{ini}: unsupported weight_data_type {name!r} (expected fp32, fp16 or bf16)")
    if key == "bf16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_WEIGHT_DTYPES[key])


def _activation(proj: str, ini: str) -> tuple[str, bool]:
    """HF / FT feed_forward_proj -> (ftjax activation, gated). Same semantics as T5Config.from_hf."""
    p = proj.strip().lower()
    gated = p.startswith("gated-") or p in ("geglu", "reglu", "swiglu")
    base = {"geglu": "gelu", "reglu": "relu", "swiglu": "silu"}.get(p, p.removeprefix("gated-"))
    act = {"relu": "relu", "gelu": "gelu_tanh" if gated else "gelu", "gelu_new": "gelu_tanh",
           "silu": "silu"}.get(base)
    if act is None:
        raise ValueError(f"{ini}: unsupported feed_forward_proj {proj!r} (relu, gelu, gelu_new, silu, gated-*)")
    return act, gated


def _config(ini: str) -> tuple[T5Config, configparser.ConfigParser]:
    cp = read_ini(ini)
    for sec in ("encoder", "decoder"):
        if sec not in cp:
            raise ValueError(f"{ini}: no [{sec}] section (sections: {cp.sections()}); not an FT T5 folder")
    enc, dec = cp["encoder"], cp["decoder"]
    st = cp["structure"] if "structure" in cp else {}

    def need(sec, key):
        if key not in sec:
            raise ValueError(f"{ini}: [{sec.name}] has no {key}")
        try:
            return int(sec[key])
        except ValueError:
            raise ValueError(f"{ini}: [{sec.name}] {key} = {sec[key]!r} is not an integer") from None

    if st.get("t5_with_bias", "false").strip().lower() in _TRUE:
        raise ValueError(f"{ini}: [structure] t5_with_bias = {st['t5_with_bias']} (a Megatron / NeMo T5: biased "
                         "linears, LayerNorm with bias, LM-head bias shared.bias.bin, 1/sqrt(d_kv) attention "
                         "scaling) is not supported: the ftjax T5 model has RMS norms and no biases")
    pe = st.get("position_embedding_type", "relative").strip().lower()
    if pe not in ("relative", "0"):
        raise ValueError(f"{ini}: [structure] position_embedding_type = {pe!r} (learned absolute positions, "
                         "shared.ape.bin) is not supported: the ftjax T5 model has relative position bias only")
    for key in ("num_tasks", "adapter_inter_size", "ia3_num_tasks"):
        for sec in (enc, dec, st):
            if key in sec and sec[key].strip() not in ("0", ""):
                raise ValueError(f"{ini}: {key} = {sec[key]} (prompt tables / adapters / IA3) is not supported")
    for key in ("d_model", "d_kv", "num_heads", "d_ff", "vocab_size"):
        if need(enc, key) != need(dec, key):
            raise ValueError(f"{ini}: [encoder] {key} = {enc[key]} differs from [decoder] {key} = {dec[key]}; "
                             "the ftjax T5 model has one width for both stacks")
    buckets_key = "relative_attention_num_buckets_or_max_pos_seq_len"
    if need(enc, buckets_key) != need(dec, buckets_key):
        raise ValueError(f"{ini}: encoder and decoder {buckets_key} differ ({enc[buckets_key]} vs {dec[buckets_key]})")
    act, gated = _activation(enc.get("feed_forward_proj", "relu"), ini)
    if "use_gated_activation" in st and (st["use_gated_activation"].strip().lower() in _TRUE) != gated:
        raise ValueError(f"{ini}: [structure] use_gated_activation = {st['use_gated_activation']} contradicts "
                         f"feed_forward_proj = {enc.get('feed_forward_proj')!r}")
    tie = dec.get("tie_word_embeddings", "true").strip().lower() in _TRUE
    scale = dec["scale_decoder_outputs"].strip().lower() in _TRUE if "scale_decoder_outputs" in dec else tie

    def opt_int(sec, key, default):
        v = _Ini(sec, ini).opt_int(key)
        return default if v is None else v

    cfg = T5Config(
        vocab_size=need(enc, "vocab_size"), hidden=need(enc, "d_model"), head_dim=need(enc, "d_kv"),
        ffn_dim=need(enc, "d_ff"), num_heads=need(enc, "num_heads"),
        num_encoder_layers=need(enc, "num_layers"), num_decoder_layers=need(dec, "num_layers"),
        relative_buckets=need(enc, buckets_key),
        relative_max_distance=opt_int(enc, "relative_attention_max_distance", 128),  # FT's kernels fix 128
        norm_eps=_Ini(enc, ini).float("layer_norm_epsilon", 1e-6), activation=act, gated_ffn=gated,
        tie_embeddings=tie, scale_logits=scale,
        decoder_start_id=opt_int(dec, "decoder_start_token_id", 0), eos_id=opt_int(dec, "eos_token_id", None),
        pad_id=opt_int(dec, "pad_token_id", 0))
    return cfg, cp


def load_ft_t5(path: str, progress: Callable[[str], None] | None = None) -> tuple[T5Config, dict[str, Any]]:
    """(T5Config, params as a nested dict of float32 numpy arrays in ftjax's T5 layout)."""
    import dataclasses

    say = progress or (lambda msg: None)
    root = find_ft_t5(path)
    if root is None:
        raise ValueError(f"{path}: no FasterTransformer T5 folder (config.ini + shared.weight_T.bin) here or in "
                         "a '<N>-gpu' subfolder")
    ini = os.path.join(root, "config.ini")
    cfg, cp = _config(ini)
    dtype = _np_dtype(cp["encoder"].get("weight_data_type", "fp32"), ini)
    d, n, h, f, v = cfg.hidden, cfg.num_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    o0 = "encoder.block.0.layer.0.SelfAttention.o.weight.{}.bin"
    found = 0
    while os.path.exists(os.path.join(root, o0.format(found))):
        found += 1
    tp = _Ini(cp["encoder"], ini).opt_int("tensor_para_size")
    T = tp if tp else (found or 1)
    if found != T:
        raise ValueError(f"{ini}: tensor_para_size {T}, but {root} holds {found} rank file(s) "
                         f"{o0.format('{r}')}")
    if n % T or f % T:
        raise ValueError(f"{ini}: {T} tensor-parallel ranks must divide num_heads {n} and d_ff {f}")
    npr, fr = n // T, f // T

    files = RawFiles(root, dtype, T)
    read, ranks = files.read, files.ranks

    def attn(pre, out, fused=False):
        if fused:  # [d, 3, n/T, h] per rank -> [d, 3, n, h]
            qkv = ranks(pre + "qkv.weight", (d, 3, npr, h), 2)
            q, k, vv = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        else:
            q, k, vv = (ranks(pre + f"{x}.weight", (d, npr, h), 1) for x in "qkv")
        flat[out + "/q/kernel"], flat[out + "/k/kernel"] = np.ascontiguousarray(q), np.ascontiguousarray(k)
        flat[out + "/v/kernel"] = np.ascontiguousarray(vv)
        flat[out + "/o/kernel"] = ranks(pre + "o.weight", (npr, h, d), 0)

    def mlp(pre, out):
        if cfg.gated_ffn:  # FT's wi = HF's wi_0 (activated) -> ftjax wg; wi2 = HF's wi_1 -> ftjax wi
            flat[out + "/wg/kernel"] = ranks(pre + "wi.weight", (d, fr), 1)
            flat[out + "/wi/kernel"] = ranks(pre + "wi2.weight", (d, fr), 1)
        else:
            flat[out + "/wi/kernel"] = ranks(pre + "wi.weight", (d, fr), 1)
        flat[out + "/wo/kernel"] = ranks(pre + "wo.weight", (fr, d), 0)

    B = cfg.relative_buckets
    flat: dict[str, Any] = {"embed/tokens": read("shared.weight_T.bin", (v, d))}
    for side, nl in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        rel = ranks(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (npr, B), 0)  # [n, B]
        flat[f"{side}/rel_bias/table"] = np.ascontiguousarray(rel.T)
        flat[f"{side}/final_norm/scale"] = read(f"{side}.final_layer_norm.weight.bin", (d,))
        for i in range(nl):
            b, o = f"{side}.block.{i}.layer.", f"{side}/layers_{i}"
            if side == "encoder":
                flat[o + "/ln_attn/scale"] = read(b + "0.layer_norm.weight.bin", (d,))
                attn(b + "0.SelfAttention.", o + "/attn")
                flat[o + "/ln_ff/scale"] = read(b + "1.layer_norm.weight.bin", (d,))
                mlp(b + "1.DenseReluDense.", o + "/mlp")
            else:
                flat[o + "/ln_self/scale"] = read(b + "0.layer_norm.weight.bin", (d,))
                attn(b + "0.SelfAttention.", o + "/self_attn", fused=True)
                flat[o + "/ln_cross/scale"] = read(b + "1.layer_norm.weight.bin", (d,))
                attn(b + "1.EncDecAttention.", o + "/cross_attn")
                flat[o + "/ln_ff/scale"] = read(b + "2.layer_norm.weight.bin", (d,))
                mlp(b + "2.DenseReluDense.", o + "/mlp")
            say(f"FT T5 {side} layer {i + 1}/{nl} ({T} rank file{'s' if T > 1 else ''} each)")
    if os.path.exists(os.path.join(root, "lm_head.weight.bin")):
        head = read("lm_head.weight.bin", (v, d))
        if not np.array_equal(head, flat["embed/tokens"]):
            flat["lm_head/kernel"] = np.ascontiguousarray(head.T)
            cfg = dataclasses.replace(cfg, tie_embeddings=False)
        else:
            cfg = dataclasses.replace(cfg, tie_embeddings=True)
    else:
        cfg = dataclasses.replace(cfg, tie_embeddings=True)
    params = nest(flat)
    check_params(cfg, params, root)
    return cfg, params

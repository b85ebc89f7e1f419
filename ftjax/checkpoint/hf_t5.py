"""Hugging Face T5 directories (T5ForConditionalGeneration: t5 v1.0, v1.1, mt5 layouts)."""
from __future__ import annotations

import os
from typing import Any


from ftjax.checkpoint.common import check_params, nest
from ftjax.checkpoint.hf import _getter, read_state_dict, warn_unused
from ftjax.config import T5Config, read_json


def load_t5(path: str, progress=None) -> tuple[T5Config, dict[str, Any]]:
    fn = os.path.join(path, "config.json")
    cfg = T5Config.from_hf(read_json(fn), source=fn)
    sd = read_state_dict(path, progress=progress)
    d, n, h, f = cfg.hidden, cfg.num_heads, cfg.head_dim, cfg.ffn_dim
    get = _getter(path, sd)   # float32 `name` (torch layout); with a shape, checked (errors name the tensor)

    def attn(prefix, out):   # torch Linear weights are [out, in]
        flat[f"{out}/q/kernel"] = get(prefix + "q.weight", (n * h, d)).T.reshape(d, n, h)
        flat[f"{out}/k/kernel"] = get(prefix + "k.weight", (n * h, d)).T.reshape(d, n, h)
        flat[f"{out}/v/kernel"] = get(prefix + "v.weight", (n * h, d)).T.reshape(d, n, h)
        flat[f"{out}/o/kernel"] = get(prefix + "o.weight", (d, n * h)).T.reshape(n, h, d)

    def mlp(prefix, out):
        if cfg.gated_ffn:
            flat[f"{out}/wg/kernel"] = get(prefix + "wi_0.weight", (f, d)).T
            flat[f"{out}/wi/kernel"] = get(prefix + "wi_1.weight", (f, d)).T
        else:
            flat[f"{out}/wi/kernel"] = get(prefix + "wi.weight", (f, d)).T
        flat[f"{out}/wo/kernel"] = get(prefix + "wo.weight", (d, f)).T

    emb = "shared.weight" if "shared.weight" in sd else "encoder.embed_tokens.weight"
    flat: dict[str, Any] = {"embed/tokens": get(emb)}
    for side, nl in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        flat[f"{side}/rel_bias/table"] = get(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        flat[f"{side}/final_norm/scale"] = get(f"{side}.final_layer_norm.weight")
        for i in range(nl):
            b, o = f"{side}.block.{i}.layer.", f"{side}/layers_{i}"
            if side == "encoder":
                attn(b + "0.SelfAttention.", o + "/attn")
                flat[o + "/ln_attn/scale"] = get(b + "0.layer_norm.weight")
                mlp(b + "1.DenseReluDense.", o + "/mlp")
                flat[o + "/ln_ff/scale"] = get(b + "1.layer_norm.weight")
            else:
                attn(b + "0.SelfAttention.", o + "/self_attn")
                flat[o + "/ln_self/scale"] = get(b + "0.layer_norm.weight")
                attn(b + "1.EncDecAttention.", o + "/cross_attn")
                flat[o + "/ln_cross/scale"] = get(b + "1.layer_norm.weight")
                mlp(b + "2.DenseReluDense.", o + "/mlp")
                flat[o + "/ln_ff/scale"] = get(b + "2.layer_norm.weight")
            if progress:
                progress(f"{side} layer {i + 1}/{nl}")
    if not cfg.tie_embeddings:
        flat["lm_head/kernel"] = get("lm_head.weight").T
    params = nest(flat)
    check_params(cfg, params, path)
    # the encoder / decoder embed_tokens (and a tied lm_head) are copies of shared.weight, not weights of their own
    warn_unused(path, {k: v for k, v in sd.items() if not k.endswith("embed_tokens.weight")
                       and not (cfg.tie_embeddings and k == "lm_head.weight")}, get.used)
    return cfg, params

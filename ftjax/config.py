"""Frozen model configurations, built from a checkpoint's own config file.

One `ModelConfig` describes a decoder-only transformer of the GPT family (GPT-2, Megatron GPT, and by
options the GPT-J / NeoX / LLaMA families). Nothing is inferred from file or model names: every field
comes from the checkpoint's config (`config.json`, FT's `config.ini`, Megatron's pickled `args`) or
from an explicit argument.
"""
from __future__ import annotations

import configparser
import dataclasses
import json
import os
from typing import Any

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rotary", "none")
DTYPES = ("float32", "bfloat16", "float16")

# HF `activation_function` spellings -> ftjax activation names.
_HF_ACT = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer. Shapes: d = hidden, n = num_heads, k = num_kv_heads, h = head_dim."""

    vocab_size: int                 # rows of the token embedding (may be padded)
    hidden: int                     # d
    num_layers: int
    num_heads: int                  # n
    ffn_dim: int                    # f
    max_positions: int              # longest sequence (prompt + generated) the model accepts
    num_kv_heads: int | None = None  # k; None -> num_heads (MHA)
    head_dim: int | None = None     # h; None -> hidden // num_heads
    activation: str = "gelu_tanh"
    gated_ffn: bool = False         # SwiGLU-style: act(x W_gate) * (x W_in)
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    position: str = "learned"
    rotary_dim: int | None = None   # None -> head_dim (when position == "rotary")
    rotary_interleaved: bool = False  # GPT-J pairs (2i, 2i+1); False: NeoX/LLaMA halves
    rope_theta: float = 10000.0
    parallel_residual: bool = False  # GPT-J / NeoX: x + attn(ln1 x) + mlp(ln2 x)
    tie_embeddings: bool = True
    attn_bias: bool = True          # biases on q/k/v and the attention output projection
    mlp_bias: bool = True
    valid_vocab_size: int | None = None  # ids >= this never sampled (padded embedding rows); None -> vocab_size
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    arch: str = "gpt"

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"ModelConfig.{field}: {why}")

        for f in ("vocab_size", "hidden", "num_layers", "num_heads", "ffn_dim", "max_positions"):
            if int(getattr(self, f)) <= 0:
                bad(f, f"must be positive, got {getattr(self, f)}")
        if self.activation not in ACTIVATIONS:
            bad("activation", f"unknown {self.activation!r}; expected one of {ACTIVATIONS}")
        if self.norm not in NORMS:
            bad("norm", f"unknown {self.norm!r}; expected one of {NORMS}")
        if self.position not in POSITIONS:
            bad("position", f"unknown {self.position!r}; expected one of {POSITIONS}")
        if self.head_dim is None and self.hidden % self.num_heads:
            bad("num_heads", f"hidden {self.hidden} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.kv_heads:
            bad("num_kv_heads", f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.kv_heads}")
        if self.position == "rotary" and (self.rot_dim > self.dim_per_head or self.rot_dim % 2):
            bad("rotary_dim", f"{self.rot_dim} must be even and <= head_dim {self.dim_per_head}")
        if self.valid_vocab_size is not None and not 0 < self.valid_vocab_size <= self.vocab_size:
            bad("valid_vocab_size", f"{self.valid_vocab_size} not in (0, vocab_size={self.vocab_size}]")

    # Derived sizes (properties, never stored twice).
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.num_heads

    @property
    def rot_dim(self) -> int:
        return self.rotary_dim or self.dim_per_head

    @property
    def vocab(self) -> int:
        """Number of token ids that may be fed or generated."""
        return self.valid_vocab_size or self.vocab_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"ftjax config: unknown keys {sorted(unknown)}")
        return cls(**d)

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """From a Hugging Face `config.json` dict (GPT-2 family)."""
        mt = hf.get("model_type")
        if mt != "gpt2":
            raise ValueError(
                f"config.json: unsupported model_type {mt!r} (architectures={hf.get('architectures')}); "
                "this ftjax build loads: gpt2")
        act = hf.get("activation_function", "gelu_new")
        if act not in _HF_ACT:
            raise ValueError(f"config.json: unsupported activation_function {act!r}")
        d = hf["n_embd"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden=d,
            num_layers=hf["n_layer"],
            num_heads=hf["n_head"],
            ffn_dim=hf.get("n_inner") or 4 * d,
            max_positions=hf["n_positions"],
            activation=_HF_ACT[act],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            bos_id=hf.get("bos_token_id"),
            eos_id=hf.get("eos_token_id"),
            pad_id=hf.get("pad_token_id"),
        )

    @classmethod
    def from_ft_ini(cls, path: str) -> "ModelConfig":
        """From FasterTransformer's converted `config.ini` ([gpt] section)."""
        cp = configparser.ConfigParser()
        if not cp.read(path):
            raise ValueError(f"config.ini: cannot read {path}")
        if "gpt" not in cp:
            raise ValueError(f"config.ini: {path} has no [gpt] section (sections: {cp.sections()})")
        s = cp["gpt"]

        def need(key):
            if key not in s:
                raise ValueError(f"config.ini: [gpt] is missing {key!r} ({path})")
            return s[key]

        n, h = int(need("head_num")), int(need("size_per_head"))
        # FT's ParallelGptTritonModel: activation_type default "Gelu" (FT's GELU is the tanh form).
        raw_act = s.get("activation_type", s.get("activation", "Gelu"))
        act = {"gelu": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu", "silu": "silu"}.get(raw_act.lower())
        if act is None:
            raise ValueError(f"config.ini: unsupported activation_type {raw_act!r} ({path})")

        def flag(key, default):
            return s.get(key, str(default)).strip().lower() in ("1", "true", "yes", "on")

        # FT GPT variants this build does not implement are refused by name (defaults as FT's reader).
        if s.get("layernorm_type", "pre_layernorm") != "pre_layernorm":
            raise ValueError(f"config.ini: unsupported layernorm_type {s.get('layernorm_type')!r} ({path})")
        for key, default, ok in (("has_positional_encoding", True, True), ("has_pre_decoder_layernorm", False, False),
                                 ("has_post_decoder_layernorm", True, True), ("use_attention_linear_bias", False, False),
                                 ("has_adapters", False, False)):
            if flag(key, default) != ok:
                raise ValueError(f"config.ini: unsupported {key} = {s.get(key)!r} ({path})")
        end = s.get("end_id")
        start = s.get("start_id")
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden=n * h,
            num_layers=int(need("num_layer")),
            num_heads=n,
            ffn_dim=int(need("inter_size")),
            max_positions=int(s.get("max_pos_seq_len", s.get("n_positions", "1024"))),
            activation=act,
            # FT's reader defaults layernorm_eps to 1e-6 (HF-converted folders do not write it).
            norm_eps=float(s.get("layernorm_eps", "1e-6")),
            tie_embeddings=True,
            bos_id=int(start) if start is not None else None,
            eos_id=int(end) if end is not None else None,
        )


def default_config() -> ModelConfig:
    """The embedded default model: a small GPT-2 shaped config with seeded random weights."""
    return ModelConfig(vocab_size=1024, hidden=256, num_layers=4, num_heads=4, ffn_dim=1024,
                       max_positions=512, activation="gelu_tanh", bos_id=0, eos_id=1)


def read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"missing {path}")
    with open(path) as f:
        return json.load(f)

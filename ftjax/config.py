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
    rope_scaling: str | None = None  # None | "llama3" (LLaMA-3.1 frequency-dependent scaling)
    rope_scaling_factor: float = 1.0  # llama3: long wavelengths divided by this
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int | None = None  # llama3: pre-training context length
    parallel_residual: bool = False  # GPT-J / NeoX: x + attn(ln1 x) + mlp(ln2 x)
    shared_layernorm: bool = False  # GPT-J: x + attn(ln1 x) + mlp(ln1 x); the block has no ln2
    tie_embeddings: bool = True
    lm_head_bias: bool = False      # GPT-J: the (untied) output projection has a bias [v]
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
            if not _is_int(getattr(self, f)):
                bad(f, f"must be an integer, got {getattr(self, f)!r}")
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
        if self.shared_layernorm and not self.parallel_residual:
            bad("shared_layernorm", "a shared layer norm needs parallel_residual=True")
        if self.lm_head_bias and self.tie_embeddings:
            bad("lm_head_bias", "an output bias needs an untied head (tie_embeddings=False)")
        if self.rope_scaling not in (None, "llama3"):
            bad("rope_scaling", f"unknown {self.rope_scaling!r}; expected None or 'llama3'")
        if self.rope_scaling == "llama3":
            if not self.rope_original_max_positions or self.rope_original_max_positions <= 0:
                bad("rope_original_max_positions", "llama3 rope scaling needs a positive pre-training length")
            if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor or self.rope_scaling_factor <= 0:
                bad("rope_scaling_factor", f"llama3 needs factor > 0 and 0 < low_freq_factor "
                    f"({self.rope_low_freq_factor}) < high_freq_factor ({self.rope_high_freq_factor})")
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
        return _from_dict(cls, d, "ftjax config")

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """From a Hugging Face `config.json` dict: model_type gpt2, llama, gptj or gpt_neox. `source` (the
        file's path) prefixes the errors: a missing or mistyped key is named."""
        mt = hf.get("model_type")
        if mt not in _HF_FAMILIES and mt != "gpt2":
            raise ValueError(
                f"{source}: unsupported model_type {mt!r} (architectures={hf.get('architectures')}); "
                f"this ftjax build loads: {', '.join(['gpt2', *_HF_FAMILIES])}")
        try:
            return getattr(cls, _HF_FAMILIES.get(mt, "_from_hf_gpt2"))(hf)
        except KeyError as e:
            raise ValueError(f"{source}: model_type {mt!r} needs the key {e.args[0]!r}, which is "
                             f"missing (architectures={hf.get('architectures')})") from None
        except (TypeError, ValueError) as e:
            msg = str(e).removeprefix("config.json: ")
            raise ValueError(f"{source}: {msg}") from None

    @classmethod
    def _from_hf_gpt2(cls, hf: dict[str, Any]) -> "ModelConfig":
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
    def _from_hf_llama(cls, hf: dict[str, Any]) -> "ModelConfig":
        """LlamaForCausalLM: RMSNorm, SwiGLU (gate/up/down), grouped-query attention, half-split rotary."""
        d, n = hf["hidden_size"], hf["num_attention_heads"]
        h = hf.get("head_dim") or d // n
        rope = _hf_rope(hf, default_partial=1.0)
        return cls(
            vocab_size=hf["vocab_size"], hidden=d, num_layers=hf["num_hidden_layers"], num_heads=n,
            ffn_dim=hf["intermediate_size"], max_positions=hf.get("max_position_embeddings", 2048),
            num_kv_heads=hf.get("num_key_value_heads") or n, head_dim=h if h != d // n else None,
            activation=_hf_act(hf.get("hidden_act", "silu"), "hidden_act"), gated_ffn=True,
            norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), position="rotary",
            rotary_dim=_rot_dim(h, rope.pop("partial")), rotary_interleaved=False, **rope,
            tie_embeddings=hf.get("tie_word_embeddings", False),
            attn_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
            **_hf_ids(hf))

    @classmethod
    def _from_hf_gptj(cls, hf: dict[str, Any]) -> "ModelConfig":
        """GPTJForCausalLM: one layer norm shared by the parallel attention and MLP, interleaved partial
        rotary (theta 10000), no attention biases, untied head with a bias."""
        d, n = hf["n_embd"], hf["n_head"]
        if hf.get("tie_word_embeddings", False):
            raise ValueError("config.json: GPT-J with tie_word_embeddings=true is not supported "
                             "(its head has a bias of its own)")
        return cls(
            vocab_size=hf["vocab_size"], hidden=d, num_layers=hf["n_layer"], num_heads=n,
            ffn_dim=hf.get("n_inner") or 4 * d, max_positions=hf.get("n_positions", 2048),
            activation=_hf_act(hf.get("activation_function", "gelu_new"), "activation_function"),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="rotary",
            rotary_dim=hf.get("rotary_dim") or None, rotary_interleaved=True, rope_theta=10000.0,
            parallel_residual=True, shared_layernorm=True, tie_embeddings=False, lm_head_bias=True,
            attn_bias=False, mlp_bias=True, **_hf_ids(hf))

    @classmethod
    def _from_hf_neox(cls, hf: dict[str, Any]) -> "ModelConfig":
        """GPTNeoXForCausalLM: partial half-split rotary (rotary_pct), parallel residual with two norms
        (or sequential when use_parallel_residual is false), fused per-head qkv."""
        d, n = hf["hidden_size"], hf["num_attention_heads"]
        rope = _hf_rope(hf, default_partial=0.25)  # HF's GPTNeoXConfig default rotary_pct
        return cls(
            vocab_size=hf["vocab_size"], hidden=d, num_layers=hf["num_hidden_layers"], num_heads=n,
            ffn_dim=hf["intermediate_size"], max_positions=hf.get("max_position_embeddings", 2048),
            activation=_hf_act(hf.get("hidden_act", "gelu"), "hidden_act"),
            norm_eps=hf.get("layer_norm_eps", 1e-5), position="rotary",
            rotary_dim=_rot_dim(d // n, rope.pop("partial")), rotary_interleaved=False, **rope,
            parallel_residual=bool(hf.get("use_parallel_residual", True)),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            attn_bias=bool(hf.get("attention_bias", True)), mlp_bias=True, **_hf_ids(hf))

    @classmethod
    def from_ft_ini(cls, path: str) -> "ModelConfig":
        """From FasterTransformer's converted `config.ini` ([gpt] section)."""
        cp = read_ini(path)
        for fam in ("gptj", "gptneox"):
            if "gpt" not in cp and fam in cp:
                return cls._from_ft_rotary_ini(cp[fam], fam, path)
        if "gpt" not in cp:
            raise ValueError(f"config.ini: {path} has no [gpt], [gptj] or [gptneox] section "
                             f"(sections: {cp.sections()})")
        s = _Ini(cp["gpt"], path)
        n, h = s.int("head_num"), s.int("size_per_head")
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
        return cls(
            vocab_size=s.int("vocab_size"),
            hidden=n * h,
            num_layers=s.int("num_layer"),
            num_heads=n,
            ffn_dim=s.int("inter_size"),
            max_positions=s.int("max_pos_seq_len", None) or s.int("n_positions", 1024),
            activation=act,
            # FT's reader defaults layernorm_eps to 1e-6 (HF-converted folders do not write it).
            norm_eps=s.float("layernorm_eps", 1e-6),
            tie_embeddings=True,
            bos_id=s.opt_int("start_id"),
            eos_id=s.opt_int("end_id"),
        )

    @classmethod
    def _from_ft_rotary_ini(cls, s, fam: str, path: str) -> "ModelConfig":
        """FT's [gptj] (huggingface_gptj_ckpt_convert.py) or [gptneox] (huggingface_gptneox_convert.py)
        section. FT's GptJ / GptNeoX use GELU (tanh form), rotary theta 10000 and layernorm eps 1e-6
        (compile-time constants there); `layernorm_eps` / `activation_type` / `max_pos_seq_len` are read
        when present. GPT-J: interleaved rotary, one shared layer norm, no attention biases, head with a
        bias; NeoX: half-split rotary, `use_gptj_residual` 1 = parallel residual."""
        s = _Ini(s, path)
        n, h = s.int("head_num"), s.int("size_per_head")
        raw_act = s.get("activation_type", "Gelu")
        act = {"gelu": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu", "silu": "silu"}.get(raw_act.lower())
        if act is None:
            raise ValueError(f"config.ini: unsupported activation_type {raw_act!r} ({path})")
        rot = s.opt_int("rotary_embedding") or h
        common = dict(
            vocab_size=s.int("vocab_size"), hidden=n * h, num_layers=s.int("num_layer"), num_heads=n,
            ffn_dim=s.int("inter_size"), max_positions=s.int("max_pos_seq_len", 2048),
            activation=act, norm_eps=s.float("layernorm_eps", 1e-6), position="rotary",
            rotary_dim=rot if rot != h else None, rope_theta=10000.0, parallel_residual=True,
            tie_embeddings=False,
            bos_id=s.opt_int("start_id"),
            eos_id=s.opt_int("end_id"))
        if fam == "gptj":
            return cls(**common, rotary_interleaved=True, shared_layernorm=True, lm_head_bias=True,
                       attn_bias=False, mlp_bias=True)
        common["parallel_residual"] = s.get("use_gptj_residual", "1").strip().lower() in ("1", "true")
        return cls(**common, rotary_interleaved=False, attn_bias=True, mlp_bias=True)


_HF_FAMILIES = {"llama": "_from_hf_llama", "gptj": "_from_hf_gptj", "gpt_neox": "_from_hf_neox"}


def _hf_act(name: str, key: str) -> str:
    if name not in _HF_ACT:
        raise ValueError(f"config.json: unsupported {key} {name!r}")
    return _HF_ACT[name]


def _hf_ids(hf: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad ids; a list of eos ids (LLaMA-3 instruct) gives its first as the default end_id."""
    def one(v):
        if isinstance(v, (list, tuple)):
            return v[0] if v else None
        return v

    return {"bos_id": one(hf.get("bos_token_id")), "eos_id": one(hf.get("eos_token_id")),
            "pad_id": one(hf.get("pad_token_id"))}


def _rot_dim(head_dim: int, partial: float) -> int | None:
    r = int(head_dim * partial)  # as HF: int(head_size * rotary_pct)
    return None if r == head_dim else r


def _hf_rope(hf: dict[str, Any], default_partial: float) -> dict[str, Any]:
    """Rotary settings from either config.json spelling: transformers >= 5 `rope_parameters`
    {rope_type, rope_theta, partial_rotary_factor, factor, ...}, or the older top-level `rope_theta` /
    `rotary_emb_base`, `rotary_pct` / `partial_rotary_factor` and `rope_scaling`. Returns ModelConfig
    keyword arguments plus "partial" (the rotary fraction of head_dim)."""
    rp = dict(hf.get("rope_parameters") or {})
    rs = dict(hf.get("rope_scaling") or {})
    theta = rp.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    partial = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", default_partial)))
    scaling = rp if rp.get("rope_type", rp.get("type", "default")) != "default" else rs
    kind = scaling.get("rope_type", scaling.get("type")) or "default"
    out: dict[str, Any] = {"rope_theta": float(theta), "partial": float(partial)}
    if kind == "default":
        return out
    if kind != "llama3":
        raise ValueError(f"config.json: unsupported rope type {kind!r} (this build supports default and llama3)")
    out.update(rope_scaling="llama3", rope_scaling_factor=float(scaling["factor"]),
               rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
               rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
               rope_original_max_positions=int(scaling.get("original_max_position_embeddings")
                                               or hf.get("max_position_embeddings", 2048)))
    return out


def default_config() -> ModelConfig:
    """The embedded default model: a small GPT-2 shaped config with seeded random weights."""
    return ModelConfig(vocab_size=1024, hidden=256, num_layers=4, num_heads=4, ffn_dim=1024,
                       max_positions=512, activation="gelu_tanh", bos_id=0, eos_id=1)


def read_json(path: str) -> dict[str, Any]:
    """A JSON object from `path`; FileNotFoundError when absent, ValueError naming the file when it is not
    valid JSON or not an object."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"missing {path}")
    with open(path) as f:
        try:
            out = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not a text (JSON) file ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(out).__name__}")
    return out


def _from_dict(cls, d: dict[str, Any], what: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{what}: unknown keys {sorted(unknown)}")
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = required - set(d)
    if missing:
        raise ValueError(f"{what}: missing keys {sorted(missing)}")
    return cls(**d)


_REQUIRED = object()


def _is_int(v) -> bool:
    """True for anything int() takes as a whole number (ints, numpy ints, 3.0); False for None, "32", 2.5."""
    if isinstance(v, (str, bytes)) or v is None:
        return False
    try:
        return int(v) == v
    except (TypeError, ValueError, OverflowError):
        return False


class _Ini:
    """One section of an FT config.ini: typed reads whose errors name the file, the section and the key."""

    def __init__(self, sec, path: str):
        self.sec, self.path = sec, path

    def __contains__(self, key):
        return key in self.sec

    def get(self, key, default=None):
        return self.sec.get(key, default)

    def _bad(self, key, kind):
        return ValueError(f"config.ini: [{self.sec.name}] {key} = {self.sec[key]!r} is not {kind} ({self.path})")

    def need(self, key):
        if key not in self.sec:
            raise ValueError(f"config.ini: [{self.sec.name}] is missing {key!r} ({self.path})")
        return self.sec[key]

    def int(self, key, default=_REQUIRED):
        if key not in self.sec:
            if default is _REQUIRED:
                self.need(key)
            return default
        try:
            return int(self.sec[key].strip())
        except ValueError:
            raise self._bad(key, "an integer") from None

    def opt_int(self, key):
        """An integer, or None when absent / 'None' / empty."""
        if self.sec.get(key, "None").strip() in ("None", ""):
            return None
        return self.int(key)

    def float(self, key, default):
        if key not in self.sec:
            return default
        try:
            return float(self.sec[key].strip())
        except ValueError:
            raise self._bad(key, "a number") from None


def read_ini(path: str):
    """configparser.ConfigParser of `path`; ValueError naming the file when it is unreadable or malformed
    (no section header, duplicate keys, ...)."""
    cp = configparser.ConfigParser()
    try:
        ok = cp.read(path)
    except configparser.Error as e:
        raise ValueError(f"{path}: not a valid config.ini ({' '.join(str(e).split())})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text (ini) file ({e})") from None
    if not ok:
        raise ValueError(f"config.ini: cannot read {path}")
    return cp


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Encoder-decoder T5 (v1.0: ReLU FFN, tied output with d_model**-0.5 scaling; v1.1: gated GELU,
    untied lm_head). Shapes: d = hidden, n = num_heads, h = head_dim (T5's d_kv)."""

    vocab_size: int
    hidden: int
    head_dim: int
    ffn_dim: int
    num_heads: int
    num_encoder_layers: int
    num_decoder_layers: int
    relative_buckets: int = 32
    relative_max_distance: int = 128
    norm_eps: float = 1e-6
    activation: str = "relu"        # FFN activation (gelu_tanh for v1.1's gated-gelu)
    gated_ffn: bool = False
    tie_embeddings: bool = True     # output projection is the shared embedding
    scale_logits: bool = True       # decoder output * d_model**-0.5 before the projection (v1.0)
    max_positions: int = 512        # longest encoder input / decoder output ftjax allocates for
    # (with position="learned": the rows of the learned position table)
    norm: str = "rmsnorm"           # "rmsnorm" (T5) | "layernorm" (with bias; Megatron-LM T5)
    linear_bias: bool = False       # biases on q/k/v/o and the FFN (Megatron-LM T5)
    position: str = "relative"      # "relative" (T5 bucketed bias) | "learned" (absolute table added to the
                                    # token embedding, shared by both stacks; no relative bias)
    lm_head_bias: bool = False      # a [vocab] bias added to the logits (Megatron-LM T5's lm_head.bias)
    decoder_start_id: int = 0
    eos_id: int | None = 1
    pad_id: int | None = 0
    arch: str = "t5"

    def __post_init__(self):
        for f in ("vocab_size", "hidden", "head_dim", "ffn_dim", "num_heads", "num_encoder_layers",
                  "num_decoder_layers", "relative_buckets", "relative_max_distance", "max_positions"):
            if not _is_int(getattr(self, f)):
                raise ValueError(f"T5Config.{f}: must be an integer, got {getattr(self, f)!r}")
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"T5Config.{f}: must be positive, got {getattr(self, f)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"T5Config.activation: unknown {self.activation!r}; expected one of {ACTIVATIONS}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"T5Config.norm: unknown {self.norm!r}; expected 'rmsnorm' or 'layernorm'")
        if self.position not in ("relative", "learned"):
            raise ValueError(f"T5Config.position: unknown {self.position!r}; expected 'relative' or 'learned'")

    # The names the engine and sampling use for every family.
    @property
    def kv_heads(self) -> int:
        return self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim

    @property
    def num_layers(self) -> int:
        return self.num_decoder_layers

    @property
    def vocab(self) -> int:
        return self.vocab_size

    @property
    def bos_id(self) -> int:
        return self.decoder_start_id

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "T5Config":
        return _from_dict(cls, d, "ftjax T5 config")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], max_positions: int = 512, source: str = "config.json") -> "T5Config":
        """From a Hugging Face T5 `config.json` (t5, t5 v1.1, mt5 style); `source` prefixes the errors."""
        if hf.get("model_type") not in ("t5", "mt5"):
            raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not T5")
        proj = hf.get("feed_forward_proj", "relu")
        if not isinstance(proj, str):
            raise ValueError(f"{source}: feed_forward_proj {proj!r} is not a string")
        gated = proj.startswith("gated-")
        act = proj.removeprefix("gated-")
        act = {"relu": "relu", "gelu": "gelu_tanh" if gated else "gelu", "gelu_new": "gelu_tanh",
               "silu": "silu"}.get(act)
        if act is None:
            raise ValueError(f"{source}: unsupported feed_forward_proj {proj!r}")
        try:
            return cls._from_hf(hf, act, gated, max_positions)
        except KeyError as e:
            raise ValueError(f"{source}: model_type {hf.get('model_type')!r} needs the key {e.args[0]!r}, "
                             "which is missing") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def _from_hf(cls, hf, act, gated, max_positions):
        return cls(
            vocab_size=hf["vocab_size"], hidden=hf["d_model"], head_dim=hf["d_kv"], ffn_dim=hf["d_ff"],
            num_heads=hf["num_heads"], num_encoder_layers=hf["num_layers"],
            num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
            relative_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_max_distance=hf.get("relative_attention_max_distance", 128),
            norm_eps=hf.get("layer_norm_epsilon", 1e-6), activation=act, gated_ffn=gated,
            # transformers 5 always ties and says whether to scale in `scale_decoder_outputs`; older
            # v1.1 configs say tie_word_embeddings=false (separate lm_head, no scaling).
            tie_embeddings=hf.get("tie_word_embeddings", True) is not False,
            scale_logits=hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False),
            max_positions=max_positions,
            decoder_start_id=hf.get("decoder_start_token_id", 0) or 0,
            eos_id=hf.get("eos_token_id", 1), pad_id=hf.get("pad_token_id", 0))

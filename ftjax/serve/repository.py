"""Model repository: `<dir>/<name>/config.pbtxt` in Triton's format, parsed with protobuf text_format
against `model_config_pb2.ModelConfig`, honouring FasterTransformer's backend parameters.

FT parameters read (string values, as FT writes them):
    model_type             "GPT" (also GPT-J, GPT-NeoX, LLaMA: one decoder) or "T5"
    model_checkpoint_path  the checkpoint: an FT-converted folder (config.ini + *.bin, or its
                           `<N>-gpu/` subfolder), HF, Megatron or ftjax; relative paths are taken
                           from the model's folder
    data_type              fp32 | fp16 | bf16 (overridden by --dtype)
    tensor_para_size, pipeline_para_size   must agree with the load (only 1 in this build)
    int8_mode              0, or 1: weight-only INT8 of the projections (FT's int8_mode=1; ftjax.quantize
                           "int8", applied as the checkpoint loads; --quantize int8-embed also quantizes
                           the embedding); FT's 2 (SmoothQuant W8A8) is refused
Triton fields: `max_batch_size` (the largest batch one request may carry; 0 = no limit) and
`model_transaction_policy.decoupled` (true: ModelStreamInfer sends one response per token).
Other FT parameters (enable_custom_all_reduce, ...) are accepted and ignored.
"""
from __future__ import annotations

import dataclasses
import os

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ftjax.serve import tensors

DATA_TYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "float32": "float32",
              "float16": "float16", "bfloat16": "bfloat16"}
DEFAULT_NAME = "fastertransformer"
DEFAULT_MAX_BATCH = 1024   # Triton max_batch_size of a model served without a config.pbtxt (as serve/model_repository)


class RepositoryError(ValueError):
    pass


@dataclasses.dataclass
class ModelSpec:
    name: str
    checkpoint: str | None            # None: the embedded default model
    dtype: str | None = None          # from data_type; None -> the server's --dtype / default
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    int8_mode: int = 0
    model_type: str = "GPT"
    max_request_batch: int = 0        # Triton max_batch_size (0 = unlimited)
    decoupled: bool = True
    config: mc.ModelConfig | None = None


def _param(cfg: mc.ModelConfig, key: str, default: str | None = None) -> str | None:
    if key in cfg.parameters:
        return cfg.parameters[key].string_value.strip()
    return default


def _int_param(cfg, key, where, default):
    v = _param(cfg, key, None)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise RepositoryError(f"{where}: parameter {key} must be an integer, got {v!r}") from None


def parse_config(path: str) -> mc.ModelConfig:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise RepositoryError(f"{path}: not UTF-8 text ({e})") from None
    cfg = mc.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as e:
        raise RepositoryError(f"{path}: not a Triton model config ({e})") from None
    return cfg


def spec_from_config(cfg: mc.ModelConfig, model_dir: str, name: str, where: str) -> ModelSpec:
    model_type = (_param(cfg, "model_type", "GPT") or "GPT").upper()
    if model_type in ("T5-ENCODER", "BART", "MBART"):
        raise RepositoryError(f"{where}: model_type {model_type}: only T5 encoder-decoder models are served")
    if model_type not in ("GPT", "GPTJ", "GPT-J", "GPTNEOX", "GPT-NEOX", "LLAMA", "T5"):
        raise RepositoryError(f"{where}: model_type {model_type!r} is not supported (expected GPT, GPT-J, "
                              "GPT-NeoX, LLaMA or T5)")
    tp = _int_param(cfg, "tensor_para_size", where, 1)
    pp = _int_param(cfg, "pipeline_para_size", where, 1)
    int8 = _int_param(cfg, "int8_mode", where, 0)
    if tp < 1 or pp < 1:
        raise RepositoryError(f"{where}: tensor_para_size / pipeline_para_size must be >= 1, got {tp} / {pp}")
    if int8 not in (0, 1):
        raise RepositoryError(f"{where}: int8_mode {int8}: only 0 (none) and 1 (weight-only INT8) are served; "
                              "FT's int8_mode 2 (SmoothQuant, int8 activations) is not")
    dt = _param(cfg, "data_type", None)
    dtype = None
    if dt:
        if dt.lower() not in DATA_TYPES:
            raise RepositoryError(f"{where}: data_type {dt!r} not one of fp32, fp16, bf16")
        dtype = DATA_TYPES[dt.lower()]
    ckpt = _param(cfg, "model_checkpoint_path", None)
    if not ckpt:
        raise RepositoryError(f"{where}: parameter model_checkpoint_path is missing (the checkpoint folder)")
    if not os.path.isabs(ckpt):
        ckpt = os.path.join(model_dir, ckpt)
    if not os.path.exists(ckpt):
        raise RepositoryError(f"{where}: model_checkpoint_path {ckpt} does not exist")
    if cfg.max_batch_size < 1:
        # Triton's 0 means the dims include no batch dimension; ftjax's FT tensors always lead with one
        raise RepositoryError(f"{where}: max_batch_size {cfg.max_batch_size}: ftjax reads FT's tensors with a batch "
                              f"dimension; set max_batch_size >= 1 (FT's configs use 1024)")
    decoupled = bool(cfg.model_transaction_policy.decoupled)
    return ModelSpec(name=name, checkpoint=ckpt, dtype=dtype, tensor_parallel=tp, pipeline_parallel=pp,
                     int8_mode=int8, model_type=model_type, max_request_batch=max(0, int(cfg.max_batch_size)),
                     decoupled=decoupled, config=cfg)


def load_repository(root: str) -> list[ModelSpec]:
    """Every `<root>/<name>/config.pbtxt`; the model is named by its folder (Triton's rule), and a
    `name:` inside the config must agree when given."""
    if not os.path.isdir(root):
        raise RepositoryError(f"--model-repository {root}: not a directory")
    specs = []
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        p = os.path.join(d, "config.pbtxt")
        if not os.path.isdir(d) or not os.path.exists(p):
            continue
        cfg = parse_config(p)
        if cfg.name and cfg.name != name:
            raise RepositoryError(f"{p}: name {cfg.name!r} disagrees with its folder {name!r}")
        cfg.name = name
        specs.append(spec_from_config(cfg, d, name, p))
    if not specs:
        raise RepositoryError(f"--model-repository {root}: no <name>/config.pbtxt found")
    return specs


def default_config(name: str, max_request_batch: int = 0, decoupled: bool = True, t5: bool = False) -> mc.ModelConfig:
    """The ModelConfig reported for a model served without a config.pbtxt (--model or the default)."""
    cfg = mc.ModelConfig(name=name, backend="fastertransformer", max_batch_size=max_request_batch)
    cfg.model_transaction_policy.decoupled = decoupled
    if t5:
        cfg.parameters["model_type"].string_value = "T5"
    fill_io(cfg, t5=t5)
    return cfg


def fill_io(cfg: mc.ModelConfig, t5: bool = False):
    """Declares FT's GPT (or T5) inputs/outputs when the config has none (dims exclude the batch dim)."""
    dt = lambda s: mc.DataType.Value("TYPE_" + ("STRING" if s == "BYTES" else s))  # noqa: E731
    inputs, required = (tensors.T5_INPUTS, tensors.T5_REQUIRED) if t5 else (tensors.GPT_INPUTS, tensors.GPT_REQUIRED)
    if not cfg.input:
        for name, t in inputs.items():
            inp = cfg.input.add(name=name, data_type=dt(t))
            if name == "input_ids":
                inp.dims.extend([-1])
            elif name in tensors.GPT_WORDS:
                inp.dims.extend([2, -1])
                inp.optional = True
            else:
                inp.dims.extend([1])
                inp.optional = name not in required
    if not cfg.output:
        for name, (t, dims) in (tensors.T5_OUTPUTS if t5 else tensors.GPT_OUTPUTS).items():
            cfg.output.add(name=name, data_type=dt(t), dims=dims[1:])
    return cfg

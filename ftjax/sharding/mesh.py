"""The (pipeline, tensor) device mesh, and the layout checks whose errors name the numbers.

Devices: the first T x P of `jax.devices()` in a single-process run; all of them in a multi-host run
(CONTRACTS.md, Multi-host). Devices are ordered by (process, id), so a tensor group is the consecutive
devices of one host and pipeline stages span hosts: one process per node, T = GPUs per node,
P = nodes.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars

import jax
import numpy as np
from jax.sharding import Mesh

from ftjax.sharding.rules import MESH_AXES


def check_layout(cfg, tensor: int, pipeline: int) -> None:
    """ValueError naming the numbers when the model cannot be laid out on T x P."""
    if tensor < 1 or pipeline < 1:
        raise ValueError(f"tensor_parallel={tensor}, pipeline_parallel={pipeline}: both must be >= 1")
    if cfg.num_heads % tensor:
        raise ValueError(f"tensor_parallel={tensor} does not divide the model's {cfg.num_heads} attention heads")
    k = cfg.kv_heads
    if k % tensor and tensor % k:
        raise ValueError(f"tensor_parallel={tensor}: the model's {k} kv heads are neither a multiple nor a "
                         f"divisor of it (kv heads are sharded when T divides them, replicated when they divide T)")
    if cfg.ffn_dim % tensor:
        raise ValueError(f"tensor_parallel={tensor} does not divide the model's FFN width {cfg.ffn_dim}")
    if pipeline > 1:
        if getattr(cfg, "arch", "gpt") == "t5":   # encoder and decoder each split into P stage blocks
            for part, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
                if n % pipeline:
                    raise ValueError(f"pipeline_parallel={pipeline} does not divide the model's {n} {part} layers")
        elif cfg.num_layers % pipeline:
            raise ValueError(f"pipeline_parallel={pipeline} does not divide the model's {cfg.num_layers} layers")


def _check_hosts(devices) -> None:
    per = collections.Counter(d.process_index for d in devices)
    if len(set(per.values())) > 1:
        shown = ", ".join(f"process {p}: {n}" for p, n in sorted(per.items()))
        raise ValueError(f"hosts have different local device counts ({shown}); every host must bring the same "
                         "number of devices")


def make_mesh(tensor: int = 1, pipeline: int = 1, devices=None) -> Mesh:
    """Mesh with axes ("pipeline", "tensor") of shape (P, T)."""
    if tensor < 1 or pipeline < 1:
        raise ValueError(f"tensor_parallel={tensor}, pipeline_parallel={pipeline}: both must be >= 1")
    devs = list(jax.devices() if devices is None else devices)
    devs.sort(key=lambda d: (d.process_index, d.id))
    n = tensor * pipeline
    if jax.process_count() > 1 and devices is None:
        _check_hosts(devs)
        if n != len(devs):
            raise ValueError(f"tensor_parallel={tensor} x pipeline_parallel={pipeline} = {n}, but a multi-host run "
                             f"uses all {len(devs)} devices of its {jax.process_count()} processes "
                             f"({len(devs) // jax.process_count()} per host); T x P must equal {len(devs)}")
    elif n > len(devs):
        raise ValueError(f"tensor_parallel={tensor} x pipeline_parallel={pipeline} = {n} devices, but only "
                         f"{len(devs)} are available ({devs[0].platform})")
    return Mesh(np.array(devs[:n], dtype=object).reshape(pipeline, tensor), MESH_AXES)


def mesh_shape(mesh: Mesh) -> tuple[int, int]:
    """(T, P) of a mesh made by make_mesh."""
    return mesh.shape[MESH_AXES[1]], mesh.shape[MESH_AXES[0]]


# ------------------------------------------------------------------ the mesh the attention kernels see
# The Pallas attention kernels are custom calls that XLA's SPMD partitioner cannot split: on a mesh,
# `ftjax.pallas.ops` runs them once per shard under shard_map. The model modules know no mesh
# (DESIGN.md convention 8), so the layout hands it to ops.py through this context while a step is
# traced (`Layout.wrap_family` enters it around every family method).
_ATTENTION_MESH: contextvars.ContextVar = contextvars.ContextVar("ftjax_attention_mesh", default=None)


@contextlib.contextmanager
def attention_mesh(mesh: Mesh, rules: dict):
    """While tracing inside: attention runs per shard of `mesh`, its arrays laid out by `rules`."""
    token = _ATTENTION_MESH.set((mesh, rules))
    try:
        yield
    finally:
        _ATTENTION_MESH.reset(token)


def current_attention_mesh():
    """(mesh, rules) set by `attention_mesh`, or None (one device, or traced outside a layout)."""
    return _ATTENTION_MESH.get()

"""A model laid out on a (pipeline, tensor) mesh: param placement, the pipelined family, the decode
state's shardings. The engine holds one `Layout` when it runs on a mesh; everything it does comes from
the rule table (`rules.py`)."""
from __future__ import annotations

import functools
import inspect
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ftjax.sharding import pipeline as PP
from ftjax.sharding import pipeline_t5 as PT5
from ftjax.sharding import rules as R
from ftjax.sharding.mesh import attention_mesh, check_layout, mesh_shape

log = logging.getLogger("ftjax")


def _is_t5(cfg) -> bool:
    return getattr(cfg, "arch", "gpt") == "t5"


def _layer_groups(cfg) -> dict:
    """Where the layers_i live in the param tree -> their count: {None: L} (top level, GPT) or
    {"encoder": Le, "decoder": Ld} (T5)."""
    return PT5.part_layers(cfg) if _is_t5(cfg) else {None: cfg.num_layers}


def _family_module(cfg):
    if _is_t5(cfg):
        from ftjax.models import t5 as m
    else:
        from ftjax.models import gpt as m
    return m


class Layout:
    def __init__(self, cfg, mesh: Mesh):
        self.mesh = mesh
        self.T, self.P = mesh_shape(mesh)
        check_layout(cfg, self.T, self.P)
        self.rules = R.rules_for(cfg, self.T)

    # --------------------------------------------------------------------------------------- params
    def prepare(self, cfg, params):
        """Host-side: pad the vocabulary to a multiple of T (decoder configs). -> (cfg, params)."""
        if cfg.vocab_size % self.T and hasattr(cfg, "valid_vocab_size"):
            params = jax.tree.map(lambda a: np.asarray(a) if isinstance(a, jax.Array) else a, params)
            return R.pad_vocab(cfg, params, self.T)
        return cfg, params

    def param_axes(self, cfg, stacked: bool = True, params=None):
        """Logical axes of every param; `params` (unstacked) given and int8: QuantizedWeight(q axes,
        scale axes) where the kernel is quantized (ftjax.quantize.logical_axes)."""
        _, axes = _family_module(cfg).abstract_params(cfg)
        axes = jax.tree.map(tuple, axes, is_leaf=R.is_axes)
        if params is not None:
            from ftjax.quantize import is_quantized, logical_axes

            if is_quantized(params):
                axes = logical_axes(axes, params)
        if stacked and self.P > 1:
            axes = PT5.stack_axes(axes, cfg, self.P) if _is_t5(cfg) else PP.stack_axes(axes, cfg.num_layers, self.P)
        return axes

    def param_shardings(self, cfg, params=None):
        return R.tree_shardings(self.mesh, self.param_axes(cfg, params=params), self.rules)

    def restore_shardings(self, cfg):
        """Shardings of the stored (unstacked) param tree, for orbax to restore onto: each process reads
        only its own shards. With P > 1, layer i lives on its stage's devices only."""
        axes = self.param_axes(cfg, stacked=False)
        if self.P == 1:
            return R.tree_shardings(self.mesh, axes, self.rules)
        out = dict(R.tree_shardings(self.mesh, axes, self.rules))
        for group, L in _layer_groups(cfg).items():
            Lp = PP.stage_layers(L, self.P)
            sub_axes = axes if group is None else axes[group]
            sub_out = out if group is None else dict(out[group])
            for k, a in sub_axes.items():
                if k.startswith("layers_"):
                    s = int(k.split("_")[1]) // Lp
                    sub = Mesh(self.mesh.devices[s:s + 1], self.mesh.axis_names)
                    sub_out[k] = R.tree_shardings(sub, a, self.rules)
            if group is not None:
                out[group] = sub_out
        return out

    def place_params(self, cfg, params, dtype):
        """Params (host numpy, or device arrays restored onto `restore_shardings`) -> device arrays on
        the rule table's shardings, floats cast to `dtype`. Host arrays go through
        make_array_from_callback: each process puts only its own shards."""
        stacked = PT5.is_stacked(params) if _is_t5(cfg) else "stages" in params
        shardings = self.param_shardings(cfg, params if not stacked else None)
        if self.P > 1 and not stacked:
            if any(isinstance(x, jax.Array) for x in jax.tree.leaves(params)):
                params = self._stack_on_device(cfg, params)
            elif _is_t5(cfg):
                params = PT5.stack_params(params, cfg, self.P)
            else:
                params = PP.stack_params(params, cfg.num_layers, self.P)

        def put(a, s):
            floating = jnp.issubdtype(a.dtype, jnp.floating)
            if isinstance(a, jax.Array):
                if not a.sharding.is_equivalent_to(s, a.ndim):
                    a = jax.device_put(a, s)
                return a.astype(dtype) if floating and a.dtype != dtype else a
            a = np.asarray(a)
            npd = jnp.dtype(dtype) if floating else a.dtype
            return jax.make_array_from_callback(a.shape, s, lambda idx: np.asarray(a[idx]).astype(npd))

        return jax.tree.map(put, params, shardings)

    def _stack_on_device(self, cfg, params):
        """Layer i restored on stage s's devices -> stages[j] [P, ...] on the full mesh, built from the
        per-device buffers (no data moves between stages or hosts)."""
        unstacked = self.param_axes(cfg, stacked=False)
        out = dict(params)
        for group, L in _layer_groups(cfg).items():
            ps, ax = (params, unstacked) if group is None else (params[group], unstacked[group])
            sub = self._stack_layers_on_device(ps, PP.stack_axes(ax, L, self.P), L)
            if group is None:
                out = sub
            else:
                out[group] = sub
        return out

    def _stack_layers_on_device(self, params, axes, num_layers):
        """One tree holding layers_0 .. layers_{L-1} -> the same with "stages" (see _stack_on_device)."""
        Lp = PP.stage_layers(num_layers, self.P)
        out = {k: v for k, v in params.items() if not k.startswith("layers_")}
        stages = []
        for j in range(Lp):   # a stage with no device on this host was not restored here (absent)
            per_stage = [params[f"layers_{s * Lp + j}"] for s in range(self.P) if f"layers_{s * Lp + j}" in params]

            def stack(ax, *arrs):
                sh = R.named(self.mesh, ax, self.rules)
                bufs = [sd.data[None] for a in arrs for sd in a.addressable_shards]
                return jax.make_array_from_single_device_arrays((self.P,) + arrs[0].shape, sh, bufs,
                                                                dtype=arrs[0].dtype)

            stages.append(jax.tree.map(stack, axes["stages"][j], *per_stage, is_leaf=R.is_axes))
        out["stages"] = stages
        return out

    def wrap_family(self, family):
        """The family the engine drives on this mesh: pipeline stages when P > 1; with the Pallas
        kernels, every method traced under `attention_mesh` so that ftjax.pallas.ops runs them once
        per shard (their own heads on each device) instead of on gathered arrays."""
        if self.P > 1:
            cls = PT5.PipelinedT5 if _is_t5(family.cfg) else PP.PipelinedGPT
            family = cls(family, self.mesh, self.rules)
        if getattr(getattr(family, "model", None), "impl", None) == "pallas":
            family = OnMesh(family, self.mesh, self.rules)
        return family

    # ---------------------------------------------------------------------------------------- state
    def state_shardings(self, state):
        """Shardings of a DecodeState (or any tree with a .cache): the cache by the table, the rest
        replicated (every process holds the ids, lengths and sampling state)."""
        rep = R.replicated(self.mesh)
        cache = R.tree_shardings(self.mesh, R.cache_axes(state.cache), self.rules)
        rest = jax.tree.map(lambda _: rep, state._replace(cache=None))
        return rest._replace(cache=cache)

    def constrain_state(self, state):
        return jax.lax.with_sharding_constraint(state, self.state_shardings(state))

    def replicated(self):
        return R.replicated(self.mesh)


class OnMesh:
    """A family whose every method runs under `attention_mesh(mesh, rules)`: while a step is traced,
    the attention calls in the model see the mesh (the modules themselves know none). Other attributes
    (cfg, model, samples_at_prefill, ...) are the wrapped family's, unchanged."""

    def __init__(self, family, mesh: Mesh, rules: dict):
        self.__dict__.update(_family=family, _mesh=mesh, _rules=rules)

    def __getattr__(self, name):
        attr = getattr(self._family, name)
        if not inspect.ismethod(attr):   # cfg, model (a Flax module: callable, but no method), ...
            return attr

        @functools.wraps(attr)
        def on_mesh(*args, **kwargs):
            with attention_mesh(self._mesh, self._rules):
                return attr(*args, **kwargs)
        return on_mesh

    def __setattr__(self, name, value):
        setattr(self._family, name, value)


def as_layout(cfg, mesh) -> Layout | None:
    return None if mesh is None else Layout(cfg, mesh)




def load_sharded(path: str, mesh: Mesh):
    """(cfg, params) of an ftjax (orbax) checkpoint restored straight onto the layout's shardings: each
    process reads only its own shards (with P > 1, only the layers of its own stages). None for other
    formats (read on the host, then placed shard by shard by the Engine), for int8 checkpoints, and when
    the vocabulary must be padded first."""
    from ftjax.checkpoint import detect_format

    if detect_format(path) != "ftjax":
        return None
    import os

    import orbax.checkpoint as ocp

    from ftjax.checkpoint.common import check_shapes, expected_shapes
    from ftjax.checkpoint.orbax_io import PARAMS_DIR, _np_dtype, read_config, read_meta, stored_shapes

    meta = read_meta(path)
    if meta.get("quantize"):
        return None
    cfg = read_config(path, meta)
    # The same key / shape check as check_params on the tensor_parallel=1 path, from orbax's metadata (no
    # array is read): a config with fewer layers than stored, a missing or misshapen array is named here.
    check_shapes(expected_shapes(cfg), stored_shapes(path), os.path.join(path, PARAMS_DIR))
    lay = Layout(cfg, mesh)
    if cfg.vocab_size % lay.T and hasattr(cfg, "valid_vocab_size"):
        return None
    shardings = lay.restore_shardings(cfg)
    if lay.P > 1:
        me = jax.process_index()
        mine = {s for s in range(lay.P) if any(d.process_index == me for d in mesh.devices[s].flat)}
        for group, L in _layer_groups(cfg).items():
            Lp = PP.stage_layers(L, lay.P)
            sub = shardings if group is None else shardings[group]
            sub = {k: v for k, v in sub.items() if not k.startswith("layers_") or int(k.split("_")[1]) // Lp in mine}
            shardings = sub if group is None else dict(shardings, **{group: sub})
    shapes, _ = _family_module(cfg).abstract_params(cfg)
    npd = _np_dtype(meta["dtype"])
    def like(tree, keys):   # the part of `tree` that `keys` (shardings, filtered per stage) names
        return {k: like(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in keys.items()}

    item = jax.tree.map(lambda sh, x: jax.ShapeDtypeStruct(x.shape, npd, sharding=sh), shardings,
                        like(shapes, shardings))
    args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=npd), item)
    ckpt = ocp.PyTreeCheckpointer()
    params = ckpt.restore(os.path.join(os.path.abspath(path), PARAMS_DIR),
                          args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
    return cfg, params

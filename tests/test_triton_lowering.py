"""Every Pallas kernel of the decode step lowers through Pallas' Triton lowering for CUDA, checked on this
CPU machine: `jax.export` lowers for the "cuda" platform without a GPU, and the Triton lowering runs in
Python during that lowering. Interpret-mode tests cannot catch a kernel the Triton lowering rejects (the
interpreter accepts more, e.g. a load's `other` without a mask); this does, before any device time is
spent. The fused decode step of two model shapes is lowered whole, and its kernel calls are counted."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from ftjax.config import ModelConfig
from ftjax.layers.linear import small_m_kernel
from ftjax.models import gpt
from ftjax.pallas.add_norm import add_norm
from ftjax.pallas.decode_attention import decode_attention, decode_attention_append
from ftjax.pallas.small_linear import small_linear, small_linear_parts

TRITON = "__gpu$xla.gpu.triton"


def lower_cuda(f, *args) -> str:
    exp = export.export(jax.jit(f), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
    return exp.mlir_module()


def sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("M,D,S,kind", [(1, 1024, 8, "layernorm"), (3, 1600, 0, "rmsnorm"), (16, 4096, 2, "layernorm")])
def test_add_norm_lowers(M, D, S, kind):
    beta = sds((D,)) if kind == "layernorm" else None
    parts = sds((S, M, D), jnp.float32) if S else None
    pb = sds((D,)) if S else None
    txt = lower_cuda(lambda x, p, b, g, be: add_norm(x, p, None, b, gamma=g, beta=be, kind=kind),
                     sds((M, D)), parts, pb, sds((D,)), beta)
    assert txt.count(TRITON) == 1


@pytest.mark.parametrize("b,n,kh,h,S", [(1, 16, 16, 64, 4), (2, 32, 8, 128, 1), (3, 8, 1, 64, 2)])
def test_decode_attention_append_lowers(b, n, kh, h, S):
    s = 512
    mult = (sds((n, h), jnp.float32), sds((kh, h), jnp.float32), sds((kh, h), jnp.float32))
    txt = lower_cuda(lambda q, k, v, kc, vc, p, m: decode_attention_append(q, k, v, kc, vc, p, m, None),
                     sds((S, b, n, h), jnp.float32), sds((S, b, kh, h), jnp.float32), sds((S, b, kh, h), jnp.float32),
                     sds((b, kh, s, h)), sds((b, kh, s, h)), sds((b,), jnp.int32), mult)
    assert txt.count(TRITON) == 1


def test_decode_attention_append_packed_lowers():
    """A packed q/k/v source (the same operand three times, read at head offsets): one Triton call."""
    b, kh, h, S, s = 1, 16, 128, 8, 512
    txt = lower_cuda(lambda x, kc, vc, p, m, bi: decode_attention_append(x, None, None, kc, vc, p, m, bi),
                     sds((S, b, 3 * kh, h), jnp.float32), sds((b, kh, s, h)), sds((b, kh, s, h)),
                     sds((b,), jnp.int32), sds((3 * kh, h), jnp.float32), sds((3 * kh, h)))
    assert txt.count(TRITON) == 1


@pytest.mark.parametrize("b,t,n,kh,h", [(64, 128, 16, 16, 64), (1, 500, 32, 8, 128), (2, 40, 4, 1, 80)])
def test_packed_prefill_attention_lowers(b, t, n, kh, h):
    """The prefill kernel on a packed [b, t, n + 2k, h] projection (q, K and V picked by head offsets in the
    BlockSpecs; the same operand three times): one Triton call, no split of the array before it."""
    from ftjax.pallas.prefill_attention import prefill_attention_packed
    txt = lower_cuda(lambda x, ln: prefill_attention_packed(x, ln, num_heads=n, kv_heads=kh),
                     sds((b, t, n + 2 * kh, h)), sds((b,), jnp.int32))
    assert txt.count(TRITON) == 1
    if t % 128 == 0:    # no padding, so nothing slices the output either
        assert "stablehlo.slice" not in txt


@pytest.mark.parametrize("b,t,n,kh,h,S", [(64, 128, 16, 16, 64, 136), (1, 512, 16, 16, 128, 544), (2, 64, 8, 2, 128, 64)])
def test_packed_prefill_attention_writing_the_cache_lowers(b, t, n, kh, h, S):
    """With the caches given, the kernel writes the prompt's K/V into them itself: one Triton call, the caches
    aliased to its outputs (no dynamic_update_slice, no copy of them)."""
    from ftjax.pallas.prefill_attention import prefill_attention_packed
    txt = lower_cuda(lambda x, ln, kc, vc, st: prefill_attention_packed(x, ln, num_heads=n, kv_heads=kh,
                                                                         cache=(kc, vc), start=st),
                     sds((b, t, n + 2 * kh, h)), sds((b,), jnp.int32), sds((b + 3, kh, S, h)), sds((b + 3, kh, S, h)),
                     sds((), jnp.int32))
    assert txt.count(TRITON) == 1
    assert "dynamic_update_slice" not in txt


@pytest.mark.parametrize("h", [32, 64, 128])
def test_decode_attention_append_warps_follow_head_dim(h):
    """The append kernel runs 2 warps where head_dim <= 64 (DecodeConfig.small_head_warps), else num_warps;
    an explicit config without small_head_warps keeps num_warps."""
    from ftjax.pallas.decode_attention import APPEND_CONFIG, DecodeConfig
    b, n, kh, S, s = 2, 8, 8, 1, 256
    args = (sds((S, b, n, h), jnp.float32), sds((S, b, kh, h), jnp.float32), sds((S, b, kh, h), jnp.float32),
            sds((b, kh, s, h)), sds((b, kh, s, h)), sds((b,), jnp.int32))
    warps = lambda txt: [int(w) for w in re.findall(r"num_warps = (\d+)", txt)]  # noqa: E731
    want = APPEND_CONFIG.small_head_warps if h <= 64 else APPEND_CONFIG.num_warps
    assert want == (2 if h <= 64 else 4)
    assert warps(lower_cuda(lambda q, k, v, kc, vc, p: decode_attention_append(q, k, v, kc, vc, p), *args)) == [want]
    plain = DecodeConfig(block_k=64, min_blocks_per_split=1, num_warps=8)
    assert warps(lower_cuda(lambda q, k, v, kc, vc, p: decode_attention_append(q, k, v, kc, vc, p, config=plain),
                            *args)) == [8]


@pytest.mark.parametrize("M,D,S", [(1, 2048, 16), (3, 1600, 0)])
def test_add_stats_and_normalising_projection_lower(M, D, S):
    from ftjax.pallas.add_norm import add_stats, normalise
    parts = sds((S, M, D), jnp.float32) if S else None
    assert lower_cuda(lambda x, p: add_stats(x, p), sds((M, D)), parts).count(TRITON) == 1
    assert lower_cuda(lambda x, st, g, b: normalise(x, st, g, b), sds((M, D)), sds((2, M, 13), jnp.float32),
                      sds((D,)), sds((D,))).count(TRITON) == 1
    norm = lambda st, g, b: (st, g, b, "layernorm", 1e-5)  # noqa: E731
    txt = lower_cuda(lambda x, w, st, g, b: small_linear_parts(x, [w], norm=norm(st, g, b)), sds((M, D)),
                     sds((D, 512)), sds((2, M, 16), jnp.float32), sds((D,)), sds((D,)))
    assert txt.count(TRITON) == 1


@pytest.mark.parametrize("dequant", ["cvt", "bits", "asm"])
@pytest.mark.parametrize("xdt", [jnp.bfloat16, jnp.float16])
def test_int8_dequant_variants_lower(dequant, xdt):
    from ftjax.pallas.small_linear import SmallLinearConfig
    cfg = SmallLinearConfig(dequant=dequant)
    txt = lower_cuda(lambda x, w, s: small_linear(x, [w], [s], config=cfg), sds((2, 1000), xdt),
                     sds((1000, 384), jnp.int8), sds((384,), jnp.float32))
    assert txt.count(TRITON) == 1
    if dequant == "asm":
        assert "prmt.b32" in txt      # the PTX went into the kernel


def test_transposed_int8_projection_lowers():
    D = 2048
    txt = lower_cuda(lambda x, a, b, st, g, be: small_linear_parts(
        x, [a, b], norm=(st, g, be, "layernorm", 1e-5), transposed=[True, True]),
        sds((1, D)), sds((768, D), jnp.int8), sds((256, D), jnp.int8), sds((2, 1, 16), jnp.float32),
        sds((D,)), sds((D,)))
    assert txt.count(TRITON) == 1


def test_projection_and_attention_kernels_lower():
    x = sds((2, 1000))
    ws = [sds((1000, 384)), sds((1000, 96), jnp.int8)]
    assert lower_cuda(lambda x, a, c, s: small_linear(x, [a, c], [None, s]), x, *ws,
                      sds((96,), jnp.float32)).count(TRITON) == 1
    assert lower_cuda(lambda x, a, c: small_linear_parts(x, [a, c]), x, *ws).count(TRITON) == 1
    assert lower_cuda(lambda q, k, v, n: decode_attention(q, k, v, n), sds((2, 8, 64)), sds((2, 2, 256, 64)),
                      sds((2, 2, 256, 64)), sds((2,), jnp.int32)).count(TRITON) == 1


SHAPES = {
    "gpt2": dict(),
    "llama": dict(position="rotary", norm="rmsnorm", gated_ffn=True, activation="silu", num_kv_heads=2,
                  attn_bias=False, mlp_bias=False, tie_embeddings=False),
}


@pytest.mark.parametrize("family", sorted(SHAPES))
def test_fused_decode_step_lowers(family):
    cfg = ModelConfig(vocab_size=300, max_positions=256, hidden=128, num_layers=2, num_heads=4, ffn_dim=256,
                      bos_id=0, eos_id=1, **SHAPES[family])
    model = gpt.build(cfg, jnp.bfloat16, "pallas")
    params = jax.eval_shape(lambda: gpt.init_params(cfg, dtype=jnp.bfloat16))
    b, s = 2, 256
    cache = [{"k": sds((b, cfg.kv_heads, s, cfg.dim_per_head)), "v": sds((b, cfg.kv_heads, s, cfg.dim_per_head))}
             for _ in range(cfg.num_layers)]

    def step(p, tok, pos, c):
        with small_m_kernel(True, interpret=False, fuse=True):
            return model.apply({"params": p}, tok, pos, c, method=gpt.GPT.decode)

    args = (params, sds((b,), jnp.int32), sds((b,), jnp.int32), cache)
    txt = lower_cuda(step, *args)
    for name in ("ftjax_add_stats", "ftjax_add_norm", "ftjax_decode_attention_append", "ftjax_small_linear"):
        assert f'name = "{name}"' in txt, name
    # kernel call sites (the lowered module holds each distinct kernel once): per layer two residual adds
    # with row statistics (the norms are applied inside the next projection), one q/k/v, one attention with
    # the K/V write, o, MLP in, MLP out; then the final add + norm and (untied) the head
    jtxt = str(jax.make_jaxpr(step)(*args))
    L = cfg.num_layers
    assert len(re.findall(r"name=add_stats\b", jtxt)) == 2 * L
    assert len(re.findall(r"name=add_norm\b", jtxt)) == 1
    assert len(re.findall(r"name=decode_attention_append\b", jtxt)) == L
    assert len(re.findall(r"name=_small_linear_parts\b", jtxt)) == 4 * L
    assert len(re.findall(r"name=_small_linear\b", jtxt)) == (0 if cfg.tie_embeddings else 1)
    assert "scatter" not in jtxt        # the K/V write is the attention kernel's


@pytest.mark.parametrize("pdl", [False, True])
def test_grid_dependency_wait_in_every_decode_kernel(pdl, monkeypatch):
    """ftjax.pallas._common.PDL: with it on, each decode-path kernel carries the grid-dependency wait (and
    early launch of its dependents) as inline PTX; off (and on a machine without a Hopper GPU, where the
    default None resolves off) none does."""
    from ftjax.pallas import _common as C
    from ftjax.pallas.add_norm import add_stats, normalise

    monkeypatch.setattr(C, "PDL", pdl)
    jax.clear_caches()
    try:
        texts = [
            lower_cuda(lambda x, w, s: small_linear(x, [w], [s], transposed=[True]), sds((1, 2048)),
                       sds((6144, 2048), jnp.int8), sds((6144,), jnp.float32)),
            lower_cuda(lambda x, w: small_linear_parts(x, [w, w]), sds((3, 512)), sds((512, 256))),
            lower_cuda(lambda x, p: add_stats(x, p), sds((1, 2048)), sds((4, 1, 2048), jnp.float32)),
            lower_cuda(lambda x, st, g: normalise(x, st, g, kind="rmsnorm"), sds((2, 1024)),
                       sds((2, 2, 2), jnp.float32), sds((1024,))),
            lower_cuda(lambda x, g: add_norm(x, gamma=g, kind="rmsnorm"), sds((2, 1024)), sds((1024,))),
            lower_cuda(lambda q, k, v, kc, vc, p: decode_attention_append(q, k, v, kc, vc, p),
                       sds((1, 2, 16, 64), jnp.float32), sds((1, 2, 4, 64), jnp.float32),
                       sds((1, 2, 4, 64), jnp.float32), sds((2, 4, 256, 64)), sds((2, 4, 256, 64)),
                       sds((2,), jnp.int32)),
            lower_cuda(lambda q, kc, vc, n: decode_attention(q, kc, vc, n), sds((2, 16, 64)),
                       sds((2, 16, 256, 64)), sds((2, 16, 256, 64)), sds((2,), jnp.int32)),
        ]
    finally:
        jax.clear_caches()
    for i, txt in enumerate(texts):
        assert txt.count(TRITON) == 1
        assert ("griddepcontrol.wait" in txt) == pdl, f"kernel {i}"
        assert ("griddepcontrol.launch_dependents" in txt) == pdl, f"kernel {i}"
    # more rows than PDL_MAX_ROWS (batch-64 steps measured slower with PDL): never
    wide = lower_cuda(lambda x, w: small_linear(x, [w]), sds((C.PDL_MAX_ROWS + 1, 512)), sds((512, 256)))
    jax.clear_caches()
    assert wide.count(TRITON) == 1 and "griddepcontrol" not in wide
    monkeypatch.setattr(C, "PDL", None)
    assert C.pdl_on(False) == (jax.default_backend() == "gpu" and C._device_has_pdl())
    assert not C.pdl_on(True)


def test_pdl_trigger_first_swaps_the_instructions(monkeypatch):
    """_common.PDL_TRIGGER_FIRST: the kernel lets its dependents launch before it waits (default: after)."""
    from ftjax.pallas import _common as C

    monkeypatch.setattr(C, "PDL", True)
    f = lambda x, w: small_linear_parts(x, [w])  # noqa: E731
    jax.clear_caches()
    try:
        default = lower_cuda(f, sds((1, 512)), sds((512, 256)))
        monkeypatch.setattr(C, "PDL_TRIGGER_FIRST", True)
        jax.clear_caches()
        first = lower_cuda(f, sds((1, 512)), sds((512, 256)))
    finally:
        jax.clear_caches()
    assert default.index("griddepcontrol.wait") < default.index("griddepcontrol.launch_dependents")
    assert first.index("griddepcontrol.launch_dependents") < first.index("griddepcontrol.wait")

"""The admit's prefill writing the prompts' K/V into the cache itself (`engine.PREFILL_WRITES_KV`; on the packed
q/k/v path the Pallas prefill attention kernel writes them, its caches aliased to its outputs) against the
engine's separate insert (off): the same cache rows, tokens and log probs, on fresh random weights, for the
kernel (interpreted; multi-head and grouped-query), XLA's attention and a rotary model (one in-place update per
cache in the layer); and the kernel alone against the float32 reference and the K/V it was given."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import ftjax
from ftjax import engine as E
from ftjax.config import ModelConfig
from ftjax.models import gpt
from ftjax.pallas import prefill_attention as PA

SHAPES = {
    "gpt2": dict(),
    "mqa": dict(num_kv_heads=1),
    "llama": dict(position="rotary", norm="rmsnorm", gated_ffn=True, activation="silu", num_kv_heads=2,
                  attn_bias=False, mlp_bias=False, tie_embeddings=False),
}


def _engine(cfg, params, on, attention, monkeypatch):
    monkeypatch.setattr(E, "PREFILL_WRITES_KV", on)
    monkeypatch.setattr(E, "INSERT_IN_PLACE_MIN_TOKENS", 0)   # the two-request admit below is contiguous too
    llm = ftjax.LLM(cfg, params, dtype="float32", attention=attention, max_batch_size=4, max_seq_len=64)
    assert llm.engine._prefill_writes_kv == on
    return llm


@pytest.mark.parametrize("family,attention,in_kernel", [
    ("gpt2", "pallas", True), ("mqa", "pallas", True), ("gpt2", "xla", False), ("llama", "pallas", False)])
def test_prefill_writes_the_same_cache_and_tokens(family, attention, in_kernel, monkeypatch):
    seed = np.random.randint(1 << 30)
    cfg = ModelConfig(vocab_size=300, max_positions=64, hidden=64, num_layers=2, num_heads=4, ffn_dim=96,
                      bos_id=0, eos_id=1, **SHAPES[family])
    params = gpt.init_params(cfg, seed=seed % 1000)
    rng = np.random.RandomState(seed % 997)
    prompts = [list(rng.randint(2, 300, size=n)) for n in (9, 5)]
    decided = []
    real = PA.kernel_writes_kv
    monkeypatch.setattr(PA, "kernel_writes_kv", lambda *a: decided.append(real(*a)) or decided[-1])
    out = {}
    for on in (False, True):
        llm = _engine(cfg, params, on, attention, monkeypatch)
        eng = llm.engine
        st = eng.init_state()
        # two requests into slots 1 and 2 (consecutive: the contiguous admit), a state already holding one in 0
        st = eng.prefill_insert(st, [[7, 8, 9]], [0], [4], llm.sampling_params(1, end_id=None))
        st = eng.prefill_insert(st, prompts, [1, 2], [6, 6], llm.sampling_params(2, end_id=None))
        cache = [{k: np.asarray(v) for k, v in layer.items()} for layer in st.cache]
        res = llm.generate(prompts, max_new_tokens=6, end_id=None, return_log_probs=True)
        out[on] = cache, res.tokens, np.asarray(res.output_log_probs)
    if attention == "pallas" and in_kernel:
        assert decided and all(decided), decided     # the kernel wrote them
    else:
        assert not any(decided)
    (c0, t0, lp0), (c1, t1, lp1) = out[False], out[True]
    for l0, l1 in zip(c0, c1):
        for name in ("k", "v"):
            a, b = l0[name], l1[name]
            np.testing.assert_array_equal(a[0, :, :3], b[0, :, :3])   # the earlier request's row is untouched
            for slot, p in ((1, prompts[0]), (2, prompts[1])):
                np.testing.assert_allclose(b[slot, :, :len(p)], a[slot, :, :len(p)], rtol=1e-5, atol=1e-6,
                                           err_msg=f"seed {seed} {name} slot {slot}")
    assert t1 == t0, f"seed {seed}"
    np.testing.assert_allclose(lp1, lp0, atol=1e-5, err_msg=f"seed {seed}")


@pytest.mark.parametrize("b,t,n,kh,h,B,S", [(2, 20, 4, 2, 16, 5, 64), (1, 30, 2, 1, 32, 2, 32), (3, 16, 4, 4, 16, 3, 16)])
def test_kernel_writes_the_prompt_rows(b, t, n, kh, h, B, S):
    """prefill_attention_packed with the caches: its output against the float32 reference, cache rows start ..
    start + b - 1 hold the prompt's K and V at positions 0 .. t - 1, every other row is as it was."""
    rng = np.random.default_rng()
    qkv = jnp.asarray(rng.standard_normal((b, t, n + 2 * kh, h)), jnp.float32)
    lengths = jnp.asarray(rng.integers(1, t + 1, b), jnp.int32)
    kc = jnp.asarray(rng.standard_normal((B, kh, S, h)), jnp.float32)
    vc = jnp.asarray(rng.standard_normal((B, kh, S, h)), jnp.float32)
    start = int(rng.integers(0, B - b + 1))
    out, kc2, vc2 = PA.prefill_attention_packed(qkv, lengths, num_heads=n, kv_heads=kh, interpret=True,
                                                cache=(kc, vc), start=start)
    ref = PA.prefill_attention_reference(qkv[:, :, :n], qkv[:, :, n:n + kh], qkv[:, :, n + kh:], lengths)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for old, new, x in ((kc, kc2, qkv[:, :, n:n + kh]), (vc, vc2, qkv[:, :, n + kh:])):
        want = np.array(old)
        want[start:start + b, :, :t] = np.swapaxes(np.asarray(x), 1, 2)
        new = np.asarray(new)
        np.testing.assert_array_equal(new[:, :, :t], want[:, :, :t])
        rows = [r for r in range(B) if not start <= r < start + b]
        np.testing.assert_array_equal(new[rows], want[rows])


def test_kernel_leaves_what_it_cannot_write_to_the_update():
    """The kernel writes only where the padded prompt fits the cache, head_dim needs no padding, the dtypes agree
    and the cache's offsets fit int32; otherwise `write_kv_into` does (the same rows)."""
    import jax

    cache = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    assert PA.kernel_writes_kv(cache(64, 16, 160, 64), jnp.bfloat16, 64, 128)
    assert not PA.kernel_writes_kv(cache(64, 16, 160, 64), jnp.bfloat16, 64, 192)        # overruns the positions
    assert not PA.kernel_writes_kv(cache(4, 8, 64, 80), jnp.bfloat16, 80, 64)            # padded head_dim
    assert not PA.kernel_writes_kv(cache(4, 8, 64, 64, dt=jnp.float32), jnp.bfloat16, 64, 64)
    assert not PA.kernel_writes_kv(cache(256, 32, 2048, 128), jnp.bfloat16, 128, 512)   # 2^31 elements

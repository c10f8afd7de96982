"""Attention by implementation (pallas_kernels/attention.py): this project's Pallas flash attention and splash
attention (both interpreted on the CPU) and the model's own XLA attention against the naive masked reference,
which is itself checked against attention run on each document alone; padding gives zeros and no gradient; the
model runs on any implementation; impossible choices name what the backend supports; the kernels lower for CUDA
and TPU.

Tolerances: float32 inputs agree to a few float32 ulps of the largest value (measured <= 1.2e-6 absolute on
values of order 1), so 1e-5 of the largest value catches a wrong mask or a missed block by orders of magnitude.
bfloat16 inputs: XLA and splash upcast them; their results are rounded to bfloat16, where values a few float32
ulps apart can round one bfloat16 ulp (2^-8) apart: 2^-7 of the largest value. The Pallas kernel multiplies in
bfloat16 with float32 accumulation, as flash attention does: the probabilities (and, backward, dS) are rounded to
bfloat16 (2^-8 relative) before each product that uses them, two or three roundings deep in the gradients, plus
the roundings of both results: 2^-5 of the largest value. A wrong mask or a missed key block is wrong by O(1).
"""
import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3pm_jax.models.transformer import Transformer, attention, segment_mask
from d3pm_jax.training import state
from pallas_kernels import attention as kernels

from test_train import experiment


def _packed(seed, batch, length, heads, width, dtype):
  """Random q, k, v and segment ids: two or three documents per row and a padded tail."""
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(batch, length, heads, width)), dtype) for _ in range(3))
  segments = np.zeros((batch, length), np.int32)
  for b in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, length - 4), 2, replace=False))
    segments[b, :cuts[0]], segments[b, cuts[0]:cuts[1]], segments[b, cuts[1]:length - 3 - b] = 1, 2, 3
  return q, k, v, jnp.asarray(segments)


def _impl(name, length):
  if name == "pallas":
    return functools.partial(kernels.flash_attention, block_q=16, block_k=32, interpret=True)
  if name == "splash":
    return functools.partial(kernels.splash_attention, interpret=True)
  return lambda q, k, v, seg, causal: attention(q, k, v, causal, None if seg is None else segment_mask(seg))


CASES = {"pallas": [(2, 70, 2, 24), (1, 33, 3, 16)], "splash": [(1, 128, 2, 32)], "xla": [(2, 70, 2, 24)]}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl,shape", [(i, s) for i, cases in CASES.items() for s in cases])
def test_outputs_and_gradients_equal_the_masked_reference(impl, shape, causal, dtype):
  q, k, v, segments = _packed(zlib.crc32(repr((impl, shape, causal)).encode()) % 1000, *shape, dtype)  # fixed
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), dtype)
  want, want_vjp = jax.vjp(lambda q, k, v: kernels.attention_reference(q, k, v, segments, causal), q, k, v)
  got, got_vjp = jax.vjp(lambda q, k, v: _impl(impl, shape[1])(q, k, v, segments, causal), q, k, v)
  tol = 1e-5 if dtype == jnp.float32 else 2.0 ** -5 if impl == "pallas" else 2.0 ** -7
  pad = np.asarray(segments == 0)
  for a, b in [(got, want)] + list(zip(got_vjp(cotangent), want_vjp(cotangent))):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(b).max())
    assert (a[pad] == 0).all()  # padding: zero output, and no gradient reaches it


def test_the_reference_is_attention_on_each_document_alone():
  """Attention within a document, computed on that document's positions alone (no mask at all), equals the
  reference's masked attention of the packed row there: nothing crosses a segment boundary."""
  q, k, v, segments = _packed(7, 2, 40, 2, 8, jnp.float32)
  packed = kernels.attention_reference(q, k, v, segments)
  for b in range(2):
    for s in (1, 2, 3):
      idx = np.flatnonzero(np.asarray(segments[b]) == s)
      alone = kernels.attention_reference(q[b:b + 1, idx], k[b:b + 1, idx], v[b:b + 1, idx])
      np.testing.assert_allclose(packed[b:b + 1, idx], alone, atol=1e-6)
  # And in causal form, a document's first position sees only itself.
  causal = kernels.attention_reference(q, k, v, segments, causal=True)
  np.testing.assert_allclose(causal[:, 0], v[:, 0], atol=1e-6)


@pytest.mark.parametrize("impl", ["pallas", "splash"])
def test_the_model_gives_the_same_logits_on_any_attention(impl):
  """The tiny test model at 128 positions (splash's smallest block), two packed rows, one with padding."""
  base = experiment()
  base = dataclasses.replace(base, model=dataclasses.replace(base.model, max_len=128),
                             data=dataclasses.replace(base.data, seq_len=128))
  other = dataclasses.replace(base, model=dataclasses.replace(base.model, attention_impl=impl,
                                                              kernel_interpret=True))
  params = state.init_state(base, Transformer(base.model), state.make_optimizer(base.train)).params
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 128)), jnp.int32)
  segments = jnp.asarray([[1] * 50 + [2] * 78, [1] * 100 + [0] * 28], jnp.int32)
  t = jnp.asarray([0.3, 0.8])
  got = Transformer(other.model).apply({"params": params}, tokens, t, segments_BxL=segments)
  want = Transformer(base.model).apply({"params": params}, tokens, t, segments_BxL=segments)
  real = np.asarray(segments > 0)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5 * float(jnp.abs(want).max()))


def test_impossible_choices_name_what_the_backend_supports():
  if jax.default_backend() == "cpu":
    for impl in ("cudnn", "splash", "pallas"):
      with pytest.raises(ValueError, match=rf"attention_impl='{impl}' cannot run on this backend \('cpu'\), which "
                                           rf"supports \['xla'\]"):
        kernels.select(impl)
  with pytest.raises(ValueError, match=r"unknown model.attention_impl 'flash'; valid:"):
    dataclasses.replace(experiment().model, attention_impl="flash")
  with pytest.raises(ValueError, match=r"length \(48\) to be a multiple of its block \(128\)"):
    kernels.splash_attention(*(jnp.zeros((1, 48, 1, 8)),) * 3, interpret=True)
  with pytest.raises(ValueError, match="block_q must be a power of two"):
    kernels.flash_attention(*(jnp.zeros((1, 48, 1, 8)),) * 3, block_q=24, interpret=True)


def test_the_kernels_lower_for_their_hardware():
  q, k, v, segments = _packed(3, 2, 128, 2, 64, jnp.bfloat16)

  def grads(f):
    return jax.jit(jax.grad(lambda q, k, v: f(q, k, v, segments, False).astype(jnp.float32).sum(),
                            argnums=(0, 1, 2))).trace(q, k, v)

  cuda = grads(kernels.flash_attention).lower(lowering_platforms=("cuda",)).as_text()
  assert cuda.count("triton") >= 3  # forward, dq, dk/dv
  tpu = grads(kernels.splash_attention).lower(lowering_platforms=("tpu",)).as_text()
  assert "tpu_custom_call" in tpu

"""The fused sampling head (pallas_kernels/fused_sample.py): the tiled twin and the Pallas kernel (interpreted)
draw exactly the naive Gumbel-max's ids for the same noise, with the same probabilities; the draws follow the
tempered softmax (chi-square at fixed seeds, with the power to reject a wrong temperature); the hashed noise is
uniform and refined near 0; the kernel lowers for CUDA."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from pallas_kernels import fused_sample

CASES = [(70, 48, 300, 295, 7, 0.7), (37, 8, 5, 5, None, 1.0), (1, 20, 130, 129, 0, 2.0), (64, 32, 256, 256, 255, 1.0)]


def _inputs(seed, n, d, v, dtype):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(n, d)), dtype),
          jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d) * 2.0, dtype))


def _impl(name):
  if name == "tiled":
    return functools.partial(fused_sample.sample_tiled, tile_v=64)
  return functools.partial(fused_sample.sample_pallas, interpret=True, block_n=16, tile_v=64, chunk_d=16)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("impl", ["tiled", "pallas"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_draws_equal_the_naive_gumbel_max_for_the_same_noise(impl, dtype, case):
  n, d, v, num_classes, exclude, temperature = CASES[case]
  with jax.enable_x64(dtype == "float64"):
    h, w = _inputs(case + 10 * (impl == "pallas"), n, d, v, dtype)
    kwargs = dict(num_classes=num_classes, exclude=exclude, temperature=temperature, dtype=jnp.dtype(dtype))
    seed = 1000 + case
    want_ids, want_p = fused_sample.sample_reference(h, w, seed, **kwargs)
    ids, p = _impl(impl)(h, w, seed, **kwargs)
    np.testing.assert_array_equal(ids, want_ids)
    assert exclude is None or not (np.asarray(ids) == exclude).any()
    assert (np.asarray(ids) < num_classes).all()
    # float32: a few ulps of the softmax's sums; float64 likewise at its precision.
    np.testing.assert_allclose(p, want_p, rtol=1e-5 if dtype == "float32" else 1e-12)
    other, _ = _impl(impl)(h, w, seed + 1, **kwargs)
    assert n < 30 or (np.asarray(other) != np.asarray(ids)).any()  # the seed matters


@pytest.mark.parametrize("impl", ["reference", "tiled", "pallas"])
def test_draws_follow_the_tempered_softmax(impl):
  """20,000 rows with the same hidden state: the counts of the 5 allowed classes fit softmax(logits / T) (the
  mask class, 2, never drawn), and reject the untempered softmax."""
  rows, temperature = 20000, 0.5
  h = jnp.ones((rows, 2), jnp.float32)
  w = jnp.asarray([[0.3, -0.2, 2.0, 0.1, -0.4, 0.0], [0.1, 0.2, 0.5, -0.3, 0.0, 0.05]], jnp.float32)
  sample = {"reference": fused_sample.sample_reference, "tiled": _impl("tiled"),
            "pallas": functools.partial(fused_sample.sample_pallas, interpret=True, block_n=512, tile_v=8,
                                        chunk_d=2)}[impl]
  ids, p = sample(h, w, 77, num_classes=6, exclude=2, temperature=temperature)
  counts = np.bincount(np.asarray(ids), minlength=6)
  assert counts[2] == 0
  logits = np.asarray(h[0] @ w, np.float64)
  allowed = np.array([0, 1, 3, 4, 5])

  def expected(t):
    q = np.exp(logits[allowed] / t - (logits[allowed] / t).max())
    return q / q.sum()

  assert scipy.stats.chisquare(counts[allowed], rows * expected(temperature)).pvalue > 1e-4
  assert scipy.stats.chisquare(counts[allowed], rows * expected(1.0)).pvalue < 1e-6
  np.testing.assert_allclose(np.asarray(p), expected(temperature)[np.searchsorted(allowed, np.asarray(ids))],
                             rtol=1e-5)


def test_the_hashed_noise_is_uniform_and_refined_near_zero():
  """2^22 cells: the coarse uniforms are uniform (KS); about 2^-12 of the cells fall in the lowest cell and are
  refined, and those refined values are themselves uniform over it (so the Gumbel tail goes on past 16.6)."""
  rows, cols = jnp.arange(2 ** 11)[:, None], jnp.arange(2 ** 11)[None, :]
  coarse = np.asarray(fused_sample._uniform(5, rows, cols, 0, jnp.float32)).ravel()
  assert scipy.stats.kstest(coarse, "uniform").pvalue > 1e-4
  fine = np.asarray(fused_sample.fine_uniform(5, rows, cols)).ravel()
  low = fine[fine < 2.0 ** -12]
  lo, hi = scipy.stats.binom.interval(1 - 1e-6, fine.size, 2.0 ** -12)
  assert lo <= low.size <= hi
  assert scipy.stats.kstest(low / 2.0 ** -12, "uniform").pvalue > 1e-4
  # Finer than the 2^-24 grid of one float32 draw, on which every unrefined value would lie.
  assert np.mean(np.mod(low.astype(np.float64) / 2.0 ** -24, 1.0) != 0) > 0.9
  assert np.isfinite(np.asarray(fused_sample.gumbel(5, rows, cols))).all()


def test_bad_arguments_name_the_value():
  h, w = jnp.zeros((4, 8)), jnp.zeros((8, 10))
  with pytest.raises(ValueError, match="temperature must be > 0; got 0"):
    fused_sample.sample_reference(h, w, 0, num_classes=10, temperature=0)
  with pytest.raises(ValueError, match=r"exclude must be a class in \[0, 10\) or None; got 10"):
    fused_sample.sample_tiled(h, w, 0, num_classes=10, exclude=10)
  with pytest.raises(ValueError, match="tile_v must be a power of two"):
    fused_sample.sample_pallas(h, w, 0, num_classes=10, tile_v=12, interpret=True)


def test_the_sampling_kernel_lowers_for_cuda():
  h, w = jnp.ones((70, 48), jnp.bfloat16), jnp.ones((48, 300), jnp.float32)
  lowered = jax.jit(lambda h, w: fused_sample.sample_pallas(h, w, 3, num_classes=295, exclude=7)).trace(h, w).lower(
      lowering_platforms=("cuda",))
  assert "triton" in lowered.as_text()

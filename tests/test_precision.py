"""Float32 exactness (no 64-bit JAX, as on TPU): unmasking at a GPT-2-sized vocabulary, moves of the uniform
process, the nearest-neighbour posterior against a float64 dense reference, and the fine uniform draws."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from d3pm_jax import draws, get_schedule, make_process
from d3pm_jax.sampling import SamplerConfig, reverse_step

GPT2_VOCAB = 50257
CHUNKS, CHUNK = 2, 2560  # 5,120 positions, drawn in chunks so [positions, V] float32 arrays stay ~0.5 GB
# These programs run long on big arrays: compiled with XLA's full optimisation, whatever the suite's default
# (tests/conftest.py turns it off for the many tiny programs); measured 2.8x faster at level 3 than at 0.
OPTIMIZED = {"xla_backend_optimization_level": 3}


@pytest.fixture(autouse=True)
def float32_only():
  assert not jax.config.jax_enable_x64


def linear_alpha(t, eps=1e-4):  # the linear schedule, written out in float64
  return eps + (1.0 - 2.0 * eps) * (1.0 - t)


def binomial_interval(n, p, tail=1e-4):
  lo, hi = scipy.stats.binom.interval(1.0 - tail, n, p)
  return int(lo), int(hi)


@pytest.mark.slow
def test_first_absorbing_step_at_gpt2_vocabulary_unmasks_the_expected_number():
  """T = 500, t = 1 -> 0.998: each masked position unmasks with probability 2.0e-3, so 10.24 of 5,120 are
  expected, each token with probability ~4e-8 (log -17.0) against ~0.998 for mask. A one-shot mask-versus-token
  categorical in float32 unmasks none: its Gumbel noise saturates at -log(-log(1 - 2^-24)) = 16.6."""
  proc = make_process("absorbing", GPT2_VOCAB + 1, get_schedule("linear"))
  t, s = 1.0, 0.998
  step = jax.jit(lambda key, logits: reverse_step(proc, key, proc.x0_log_probs(logits, x_t), x_t,
                                                  jnp.full((CHUNK,), s), jnp.full((CHUNK,), t), SamplerConfig()),
                 compiler_options=OPTIMIZED)
  x_t = jnp.full((CHUNK, 1), proc.mask_id, jnp.int32)
  unmasked = 0
  for c in range(CHUNKS):
    # An untrained network: nearly flat over 50,257 tokens, each ~2e-8 of the posterior against ~0.999 for mask
    # (a fixed ripple of +-0.1 rather than random logits, whose generation took a third of the test's time).
    logits = jax.jit(lambda c: 0.1 * jnp.sin(0.7071 * jnp.arange(GPT2_VOCAB + 1) + (1.3 * jnp.arange(CHUNK) + c)
                                             [:, None, None]), compiler_options=OPTIMIZED)(float(c))
    x_s = np.asarray(step(jax.random.PRNGKey(c), logits))
    unmasked += int((x_s != proc.mask_id).sum())
    assert x_s.max() <= proc.mask_id
  p = (linear_alpha(s) - linear_alpha(t)) / (1.0 - linear_alpha(t))
  lo, hi = binomial_interval(CHUNKS * CHUNK, p)
  assert lo >= 1  # the interval excludes 0, so the float32-saturated sampler fails here
  assert lo <= unmasked <= hi, (unmasked, lo, hi, CHUNKS * CHUNK * p)


@pytest.mark.slow
def test_uniform_step_at_gpt2_vocabulary_moves_the_expected_number():
  """Uniform process, t = 0.5 -> 0.4995, a prediction spread evenly over the vocabulary (an untrained network):
  each of 50,257 tokens has posterior probability ~4e-8 against ~0.998 for staying, together ~2e-3. The number of
  positions that move lies in the binomial interval of the exact float64 move probability, which excludes 0
  (where a float32 one-shot jax.random.gumbel draw lands: its noise saturates at 16.6 < -log(4e-8) = 17.0)."""
  vocab = GPT2_VOCAB
  proc = make_process("uniform", vocab, get_schedule("linear"))
  t, s = 0.5, 0.4995
  x_t = jax.random.randint(jax.random.PRNGKey(0), (CHUNK, 1), 0, vocab)
  step = jax.jit(lambda key, log_p: reverse_step(proc, key, log_p, x_t, jnp.full((CHUNK,), s),
                                                 jnp.full((CHUNK,), t), SamplerConfig()), compiler_options=OPTIMIZED)
  log_p = jnp.full((CHUNK, 1, vocab), -np.log(vocab), jnp.float32)
  moved = sum(int((np.asarray(step(jax.random.PRNGKey(c), log_p)) != np.asarray(x_t)).sum()) for c in range(CHUNKS))
  # Exact posterior in float64 with a uniform prediction p(h) = 1/V: by symmetry every y != x_t has the same
  # weight Qst[y, x_t] * sum_h p(h) Qs[h, y] / Qt[h, x_t], so only four distinct matrix entries are needed.
  a_s, a_t = linear_alpha(s), linear_alpha(t)
  a_st = a_t / a_s
  diag = lambda a: a + (1.0 - a) / vocab  # Qbar[x, x] of the uniform process
  off = lambda a: (1.0 - a) / vocab       # Qbar[x, y], y != x

  def mixture(y_is_xt):
    same = (diag(a_s) if y_is_xt else off(a_s)) / diag(a_t)  # h = x_t
    if y_is_xt:
      return (same + (vocab - 1) * off(a_s) / off(a_t)) / vocab
    return (same + diag(a_s) / off(a_t) + (vocab - 2) * off(a_s) / off(a_t)) / vocab  # h = x_t, h = y, others

  stay = diag(a_st) * mixture(True)
  move = (vocab - 1) * off(a_st) * mixture(False)
  p_move = move / (stay + move)
  lo, hi = binomial_interval(CHUNKS * CHUNK, p_move)
  assert lo >= 1
  assert lo <= moved <= hi, (moved, lo, hi, CHUNKS * CHUNK * p_move)


def expm_positive(rates, tau):
  """expm(tau R) in float64 with *relative* accuracy on every entry, however tiny (scipy's expm is accurate only
  to ~1e-16 of the norm): a Taylor series over a step of norm <= 1e-3, whose entries are non-negative, then
  repeated squaring of a non-negative matrix, which loses no relative accuracy."""
  squarings = max(0, int(np.ceil(np.log2(tau * np.abs(np.diag(rates)).max() / 1e-3))))
  step = tau / 2 ** squarings * rates
  out, term = np.eye(len(rates)), np.eye(len(rates))
  for k in range(1, 10):
    term = term @ step / k
    out = out + term
  out = np.maximum(out, 0.0)
  for _ in range(squarings):
    out = out @ out
  return out


def reference_posterior(rates, tau_s, tau_t, p0_NxV, x_t_N):
  """p(x_s = y | x_t) = sum_h p(h) Qs[h, y] Qst[y, x_t] / Qt[h, x_t], in float64."""
  q_s, q_t, q_st = (expm_positive(rates, tau) for tau in (tau_s, tau_t, tau_t - tau_s))
  post = (p0_NxV / q_t[:, x_t_N].T) @ q_s * q_st[:, x_t_N].T
  return post / post.sum(axis=1, keepdims=True)


def byte_process():  # the stdlib nearest-neighbour configs' process: bytes, 8-NN, rate 4, a 0.1 uniform share
  from d3pm_jax.data import pipeline
  return make_process("nearest_neighbor", 256, get_schedule("linear"), embeddings=pipeline.byte_features(), k=8,
                      rate_scale=4.0, uniform_rate=0.1)


def sparse_process():  # 64 random points in the plane, 3-NN, no uniform share: Qbar entries down to 1e-49
  with pytest.warns(UserWarning, match="mixes poorly"):
    return make_process("nearest_neighbor", 64, get_schedule("linear"),
                        embeddings=np.random.default_rng(0).normal(size=(64, 2)), k=3, rate_scale=4.0)


@pytest.mark.parametrize("which,t", [("bytes", 1 / 1000), ("bytes", 1 / 128), ("bytes", 0.5),
                                     ("sparse", 1 / 128), ("sparse", 0.5)])
def test_nearest_neighbor_posterior_in_float32_matches_float64_reference(which, t):
  """Random Dirichlet predictions and predictions that put 0.9 on a token far from x_t (an early network), one
  and several steps back from t: total variation from the float64 posterior below 1e-3 (measured <= 4e-5).
  The sparse graph without a uniform share is not checked at t = 1/1000: entries there fall below float32's
  smallest normal number (see the nearest_neighbor module)."""
  proc = byte_process() if which == "bytes" else sparse_process()
  num = proc.num_states
  rates = np.asarray(proc.rates_VxV, np.float64)
  rng = np.random.default_rng(1)
  n = 48
  x_t = rng.integers(0, num, n)
  spread = rng.dirichlet(np.full(num, 0.3), n)
  far = np.zeros((n, num))
  far[np.arange(n), (x_t + num // 2) % num] = 1.0
  p0 = np.concatenate([spread, 0.9 * far + 0.1 * spread])
  x_t = np.concatenate([x_t, x_t])
  tau = lambda u: -np.log(linear_alpha(u))
  for s in (max(t - 1 / 1000, 0.0), t / 2):
    log_post = proc.posterior_logits(jnp.asarray(p0, jnp.float32), jnp.asarray(x_t), jnp.float32(s), jnp.float32(t))
    assert log_post.dtype == jnp.float32
    ours = np.exp(np.asarray(log_post, np.float64))
    total_variation = 0.5 * np.abs(ours - reference_posterior(rates, tau(s), tau(t), p0, x_t)).sum(axis=1)
    assert total_variation.max() < 1e-3, (s, t, total_variation.max())


@pytest.mark.parametrize("t", [1 / 1000, 1 / 128, 0.5])
def test_nearest_neighbor_marginal_keeps_relative_accuracy_of_tiny_entries(t):
  """Every entry of Qbar(t) above 1e-30 (at t = 1/1000 they reach down there between tokens many edges apart)
  within 5e-4 relative of the float64 reference in float32; an eigendecomposition has ~6e-7 absolute error."""
  proc = sparse_process()
  ref = expm_positive(np.asarray(proc.rates_VxV, np.float64), -np.log(linear_alpha(t)))
  ours = np.asarray(proc.marginal(jnp.eye(proc.num_states, dtype=jnp.float32), jnp.float32(t)), np.float64)
  kept = ref > 1e-30
  assert (ref[kept] < 1e-12).sum() > (100 if t < 0.1 else -1)
  np.testing.assert_allclose(ours[kept], ref[kept], rtol=5e-4)


def test_fine_uniform_is_uniform_and_resolves_below_float32_grid():
  u = np.asarray(draws.fine_uniform(jax.random.PRNGKey(0), (4_000_000,)), np.float64)
  assert u.min() >= 0 and u.max() < 1
  assert scipy.stats.kstest(u, "uniform").pvalue > 1e-4
  # About 2^-12 of the draws land in the refined cell [0, 2^-12); inside it they are uniform again and finer
  # than jax.random.uniform's float32 grid of 2^-23 (which holds only 2^11 values there).
  low = u[u < 2.0 ** -12]
  assert abs(low.size - 4_000_000 * 2.0 ** -12) < 5 * np.sqrt(4_000_000 * 2.0 ** -12)
  assert scipy.stats.kstest(low * 2.0 ** 12, "uniform").pvalue > 1e-4
  off_grid = np.mod(low, 2.0 ** -23) != 0
  assert off_grid.mean() > 0.99


def test_gumbel_upper_tail_is_not_cut_at_float32_resolution():
  """P(G > 16) = 1 - exp(-e^-16) = 1.1e-7: about 15 of 2^27 draws, where jax.random.gumbel's float32 draws never
  exceed 15.9 (its uniforms stop 2^-23 below 1)."""
  g = jax.jit(lambda key: draws.gumbel(key, (2 ** 27,)), compiler_options=OPTIMIZED)(jax.random.PRNGKey(1))
  beyond = int(jnp.sum(g > 16.0))
  expected = 2 ** 27 * -np.expm1(-np.exp(-16.0))
  lo, hi = binomial_interval(2 ** 27, expected / 2 ** 27)
  assert lo >= 1 and lo <= beyond <= hi, (beyond, expected)

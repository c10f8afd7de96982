"""The correctness backbone: a Markov source with exact likelihood and its exact forward-backward denoiser.

With the oracle denoiser the continuous-time ELBO (reconstruction at t = 0 and prior at t = 1 included) must equal
each sequence's exact NLL, and the discrete-time VLB must lie above the source entropy and fall toward it as T grows.
These check processes, posteriors, losses and estimators together, from first principles.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3pm_jax import get_schedule, losses, make_process
from d3pm_jax.data.synthetic import MarkovSource

pytestmark = pytest.mark.usefixtures("x64")

K = 4  # data states of the source


def source():
  # Dirichlet concentration 2: no transition is tiny, so no sequence is dominated by the t = 0 reconstruction gap.
  return MarkovSource.random(seed=0, num_states=K, concentration=2.0)


def processes():
  sched = get_schedule("linear")
  emb = np.random.default_rng(0).normal(size=(K, 2))
  return {
      "absorbing": make_process("absorbing", K + 1, sched),
      "uniform": make_process("uniform", K, sched),
      # k = 2 over 4 tokens is connected; rate_scale 3 mixes it by t = 1.
      "nearest_neighbor": make_process("nearest_neighbor", K, sched, embeddings=emb, k=2, rate_scale=3.0),
  }


def all_sequences(num_states, length):
  return jnp.asarray(list(itertools.product(range(num_states), repeat=length)), jnp.int32)


def test_markov_source_likelihood_and_entropy_by_enumeration():
  src = MarkovSource.random(seed=3, num_states=3, concentration=1.0)
  seqs = all_sequences(3, 5)
  log_p = np.asarray(src.log_prob(seqs))
  assert np.exp(log_p).sum() == pytest.approx(1.0, abs=1e-12)
  assert src.entropy(5) == pytest.approx(-(np.exp(log_p) * log_p).sum(), rel=1e-12)
  samples = src.sample(jax.random.PRNGKey(0), 20000, 5)
  first_counts = np.bincount(np.asarray(samples[:, 0]), minlength=3) / 20000
  np.testing.assert_allclose(first_counts, src.initial_K, atol=0.015)


@pytest.mark.parametrize("name", ["absorbing", "uniform", "nearest_neighbor"])
def test_oracle_posterior_equals_enumeration(name):
  src, proc = source(), processes()[name]
  length, t = 4, 0.45
  seqs = all_sequences(K, length)
  log_prior = np.asarray(src.log_prob(seqs))
  q_t = np.asarray(proc.dense_marginal(t))
  x_t = proc.sample_marginal(jax.random.PRNGKey(2), jnp.array([[0, 1, 2, 3], [3, 3, 1, 0]]), t)
  got = np.asarray(src.posterior(proc, x_t, jnp.full((2,), t)))
  for b in range(2):
    with np.errstate(divide="ignore"):  # absorbing: an unmasked x_t rules out every other x_0 (log 0)
      log_joint = log_prior + np.log(q_t[np.asarray(seqs), np.asarray(x_t[b])]).sum(axis=1)
    weights = np.exp(log_joint - log_joint.max())
    weights /= weights.sum()
    for n in range(length):
      expected = np.bincount(np.asarray(seqs[:, n]), weights=weights, minlength=proc.num_states)
      np.testing.assert_allclose(got[b, n], expected, atol=1e-12)


def quadrature_nelbo(proc, logits_fn, x0_SxL, *, nodes=32, samples=4096, seed=0):
  """recon + integral + prior per sequence, the integral by Gauss-Legendre in u with t = u^2 (dense near t = 0,
  where the uniform-type integrands vary fastest) and `samples` draws of x_t per node."""
  num_seqs = x0_SxL.shape[0]
  x0 = jnp.tile(x0_SxL, (samples, 1))

  @jax.jit
  def at_node(key, u):
    t_B = jnp.full((x0.shape[0],), u * u)
    return losses.ctmc_diffusion(proc, logits_fn, key, x0, t_B).reshape(samples, num_seqs).mean(0) * 2 * u

  u_nodes, u_weights = np.polynomial.legendre.leggauss(nodes)
  integral = sum(0.5 * w * at_node(jax.random.PRNGKey(seed + i), 0.5 * (u + 1))
                 for i, (u, w) in enumerate(zip(u_nodes, u_weights)))
  recon = losses.reconstruction(proc, logits_fn, jax.random.PRNGKey(seed - 1), x0).reshape(samples, num_seqs).mean(0)
  return np.asarray(integral + recon + losses.prior(proc, x0_SxL))


@pytest.mark.parametrize("name", ["absorbing", "uniform", "nearest_neighbor"])
def test_continuous_elbo_with_oracle_equals_exact_nll(name):
  """Tolerance: 1% relative per sequence (measured: under 0.5% for all three processes at this sample size)."""
  src, proc = source(), processes()[name]
  x0 = src.sample(jax.random.PRNGKey(1), 3, 8)
  nll = -np.asarray(src.log_prob(x0))
  nelbo = quadrature_nelbo(proc, src.oracle_logits_fn(proc), x0)
  np.testing.assert_allclose(nelbo, nll, rtol=0.01)


@pytest.mark.parametrize("name", ["absorbing", "uniform", "nearest_neighbor"])
def test_monte_carlo_continuous_elbo_estimator_is_unbiased(name):
  """The library's MC estimator (antithetic t): its mean is within 4 standard errors + 0.5% of the exact NLL."""
  src, proc = source(), processes()[name]
  x0 = src.sample(jax.random.PRNGKey(1), 3, 8)
  nll = -np.asarray(src.log_prob(x0))
  samples = 4096
  x0_tiled = jnp.tile(x0, (samples, 1))  # tiled, so each sequence's copies spread over the antithetic grid
  out = jax.jit(lambda k: losses.continuous_elbo(proc, src.oracle_logits_fn(proc), k, x0_tiled,
                                                 num_time_samples=4))(jax.random.PRNGKey(5))
  nelbo = np.asarray(out["nelbo"]).reshape(samples, 3)
  stderr = nelbo.std(axis=0) / np.sqrt(samples * 4)
  assert np.all(np.abs(nelbo.mean(axis=0) - nll) <= 4 * stderr + 0.005 * nll), (nelbo.mean(0), nll, stderr)


def markov_block_oracle(src, proc, length, block_size):
  """The exact block-diffusion denoiser of ``src`` (``losses.BlockLogitsFn``): block b's prediction is the
  forward-backward posterior given x_0 of the blocks before it, x_t of block b and nothing after (masked, so
  marginalised). An absorbing posterior does not depend on t, so any t in (0, 1) serves."""
  oracle = src.oracle_logits_fn(proc)

  def logits_fn(x_t_BxL, x0_BxL, blocks_BxL):
    out = jnp.zeros(x_t_BxL.shape + (proc.num_states,), jnp.result_type(float))
    for b in range(length // block_size):
      seen = jnp.where(blocks_BxL < b, x0_BxL, jnp.where(blocks_BxL == b, x_t_BxL, proc.mask_id))
      out = jnp.where((blocks_BxL == b)[..., None], oracle(seen, jnp.full((x_t_BxL.shape[0],), 0.5)), out)
    return out
  return logits_fn


@pytest.mark.parametrize("block_size", [2, 4, 8])
def test_block_elbo_with_the_block_oracle_equals_exact_nll(block_size):
  """Block diffusion's NELBO (``losses.block_elbo``, every block at its own t) with the exact block denoiser of a
  Markov chain is the sum over blocks of each block's masked-diffusion bound given the blocks before it, each
  tight, so it equals the exact NLL: over 2048 copies of each of 3 sequences (L = 8) x 4 time samples, the mean
  lies within 4 standard errors + 0.5% of it, at L' = 2, 4 and 8 (L' = 8 is one block: the plain masked ELBO).
  Each block draws its t independently (``antithetic=False``): antithetic draws give a row's blocks neighbouring
  points of one grid, nearly the same t, which would hide a block scored at another block's time; so would
  L' = 1 and t = 1. Mutation: every block weighted by block 0's -alpha'/(1 - alpha)."""
  src, proc = source(), processes()["absorbing"]
  length, samples = 8, 2048
  x0 = src.sample(jax.random.PRNGKey(1), 3, length)
  nll = -np.asarray(src.log_prob(x0))
  x0_tiled = jnp.tile(x0, (samples, 1))  # tiled, so each sequence's copies spread over the antithetic grid
  oracle = markov_block_oracle(src, proc, length, block_size)
  out = jax.jit(lambda k: losses.block_elbo(proc, oracle, k, x0_tiled, block_size, antithetic=False,
                                             num_time_samples=4))(
      jax.random.PRNGKey(5))
  nelbo = np.asarray(out["nelbo"]).reshape(samples, 3)
  stderr = nelbo.std(axis=0) / np.sqrt(samples * 4)
  assert np.all(np.abs(nelbo.mean(axis=0) - nll) <= 4 * stderr + 0.005 * nll), (nelbo.mean(0), nll, stderr)


def test_general_elbo_equals_masked_elbo_for_absorbing():
  src, proc = source(), processes()["absorbing"]
  x0 = src.sample(jax.random.PRNGKey(1), 64, 8)
  t_B = jax.random.uniform(jax.random.PRNGKey(2), (64,))
  for logits_fn in (src.oracle_logits_fn(proc),
                    lambda x, t: jax.random.normal(jax.random.PRNGKey(3), x.shape + (K + 1,))):
    key = jax.random.PRNGKey(4)
    general = losses.ctmc_diffusion(proc, logits_fn, key, x0, t_B)
    masked = losses.masked_diffusion(proc, logits_fn, key, x0, t_B)
    np.testing.assert_allclose(general, masked, rtol=1e-10, atol=1e-12)
    assert float(jnp.max(masked)) > 0


@pytest.mark.parametrize("name", ["absorbing", "uniform", "nearest_neighbor"])
def test_discrete_vlb_bounds_entropy_and_tightens_with_steps(name):
  """Averaged over source sequences, the T-step VLB minus each sequence's NLL (a control variate) is >= 0 within
  noise and falls toward 0 as T grows: T = 2, 5, 20, 100."""
  src, proc = source(), processes()[name]
  num_seqs, repeats, length = 256, 32, 6
  x0 = jnp.tile(src.sample(jax.random.PRNGKey(1), num_seqs, length), (repeats, 1))
  nll = -src.log_prob(x0)
  gaps, errs = [], []
  for steps in (2, 5, 20, 100):
    # A long-running program: XLA's full optimisation, whatever the suite's default (tests/conftest.py).
    vlb = jax.jit(lambda k: losses.d3pm_vlb_exact(proc, src.oracle_logits_fn(proc), k, x0, steps),
                  compiler_options={"xla_backend_optimization_level": 3})(jax.random.PRNGKey(steps))
    per_seq = np.asarray(vlb - nll).reshape(repeats, num_seqs).mean(axis=0)
    gaps.append(per_seq.mean())
    errs.append(per_seq.std() / np.sqrt(num_seqs))
  gaps, errs = np.array(gaps), np.array(errs)
  assert np.all(gaps >= -4 * errs), (gaps, errs)  # E[VLB] >= entropy
  assert gaps[0] - gaps[-1] > 4 * np.hypot(errs[0], errs[-1]), (gaps, errs)  # it tightens...
  assert np.all(np.diff(gaps) <= 3 * np.hypot(errs[1:], errs[:-1])), (gaps, errs)  # ...monotonically within noise
  assert gaps[-1] < 0.02 * src.entropy(length)  # and at T = 100 is close to the entropy

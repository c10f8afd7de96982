"""Losses with arbitrary denoisers: invariants, independent dense references, unbiasedness, gradients."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3pm_jax import get_schedule, losses, make_process

V = 6
B, L = 8, 5


def build(name, schedule="cosine"):
  kwargs = {}
  if name == "nearest_neighbor":
    kwargs = dict(embeddings=np.random.default_rng(0).normal(size=(V, 3)), k=2, rate_scale=4.0)
  return make_process(name, V, get_schedule(schedule), **kwargs)


PROCESS_NAMES = ["absorbing", "uniform", "nearest_neighbor"]


def random_logits_fn(seed=0, scale=2.0):
  return lambda x_t, t: scale * jax.random.normal(jax.random.PRNGKey(seed), x_t.shape + (V,)) + 0 * t[:, None, None]


def knowing_logits_fn(x0):
  """A denoiser that knows x_0: all its mass on the truth."""
  return lambda x_t, t: jnp.where(jax.nn.one_hot(x0, V, dtype=bool), 0.0, -1e4)


def data(proc, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), (B, L), 0, proc.num_data_states)


def dense_ctmc_integrand(proc, logits_fn, key, x0, t_B):
  """The CTMC integrand written naively from dense matrices, position by position, in float64 numpy."""
  x_t = proc.sample_marginal(key, x0, t_B)
  log_p = np.asarray(proc.x0_log_probs(logits_fn(x_t, t_B), x_t))
  rates = np.asarray(proc.rate_matrix())
  out = np.zeros(x0.shape[0])
  for b in range(x0.shape[0]):
    q = np.asarray(proc.dense_marginal(t_B[b]))
    dtau = float(proc.schedule.dtau_dt(t_B[b]))
    for n in range(x0.shape[1]):
      a, c = int(x0[b, n]), int(x_t[b, n])
      p = np.exp(log_p[b, n])
      for y in range(V):
        if y == c or rates[y, c] == 0:
          continue
        s = q[a, y] / q[a, c]
        s_hat = sum(p[h] * q[h, y] / q[h, c] for h in range(V) if q[h, c] > 0)
        bracket = s_hat - (s * np.log(s_hat) - s * (np.log(s) - 1) if s > 0 else 0.0)
        out[b] += dtau * rates[y, c] * bracket
  return out


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_ctmc_integrand_equals_dense_reference(name):
  proc = build(name)
  x0 = data(proc)
  t_B = jnp.linspace(0.05, 0.95, B)
  key = jax.random.PRNGKey(7)
  got = losses.ctmc_diffusion(proc, random_logits_fn(), key, x0, t_B)
  np.testing.assert_allclose(got, dense_ctmc_integrand(proc, random_logits_fn(), key, x0, t_B), rtol=1e-9)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_a_denoiser_that_knows_x0_pays_nothing(name):
  proc = build(name)
  x0 = data(proc)
  t_B = jnp.linspace(0.05, 0.95, B)
  fn = knowing_logits_fn(x0)
  np.testing.assert_allclose(losses.ctmc_diffusion(proc, fn, jax.random.PRNGKey(0), x0, t_B), 0.0, atol=1e-9)
  terms = losses.d3pm_step_terms(proc, fn, jax.random.PRNGKey(1), x0, jnp.arange(1, B + 1), 10)
  np.testing.assert_allclose(terms["vlb"], 0.0, atol=1e-9)
  np.testing.assert_allclose(terms["ce"], 0.0, atol=1e-9)


@pytest.mark.usefixtures("x64")
def test_subs_unmasked_positions_carry_zero_loss():
  proc = build("absorbing")
  x0 = data(proc)
  t_B = jnp.full((B,), 0.5)
  key = jax.random.PRNGKey(3)
  x_t = proc.sample_marginal(key, x0, t_B)
  unmasked = x_t != proc.mask_id
  assert bool(unmasked.any()) and bool((~unmasked).any())
  log_p = proc.x0_log_probs(random_logits_fn()(x_t, t_B), x_t)
  np.testing.assert_allclose(jnp.exp(log_p)[unmasked], jax.nn.one_hot(x_t[unmasked], V), atol=0)
  np.testing.assert_allclose(jnp.exp(log_p)[..., proc.mask_id], 0.0, atol=0)
  # Changing the network's output at unmasked positions changes nothing.
  noisy = lambda x, t: random_logits_fn()(x, t) + jnp.where(unmasked[..., None], 100.0 * jnp.arange(V), 0.0)
  for term in (losses.masked_diffusion, losses.ctmc_diffusion):
    np.testing.assert_allclose(term(proc, noisy, key, x0, t_B), term(proc, random_logits_fn(), key, x0, t_B))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_d3pm_single_step_loss_is_unbiased_for_the_full_vlb(name):
  proc = build(name)
  x0 = data(proc)[:2]
  steps = 8
  fn = random_logits_fn(scale=1.0)
  exact = losses.d3pm_vlb_exact
  # Exact over t with many x_t samples; the one-step estimator averaged over many keys.
  reps = 4000
  x0_rep = jnp.tile(x0, (reps, 1))
  full = jax.jit(lambda k: exact(proc, fn, k, x0_rep, steps))(jax.random.PRNGKey(0)).reshape(reps, 2)
  single = jax.jit(lambda k: losses.d3pm_loss(proc, fn, k, x0_rep, steps, hybrid_lambda=0.0)["vlb"])(
      jax.random.PRNGKey(1)).reshape(reps, 2)
  err = np.hypot(np.std(full, 0), np.std(single, 0)) / np.sqrt(reps)
  assert np.all(np.abs(full.mean(0) - single.mean(0)) < 4 * err), (full.mean(0), single.mean(0), err)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_d3pm_hybrid_loss_is_the_one_step_term_plus_lambda_ce(name):
  """D3PM's reference code trains on L_i + lambda * CE (not T * L_i + lambda * CE); the reported bound stays
  T * L_i + prior. Checked against KLs written out from dense matrices for the x_t the loss actually drew."""
  proc = build(name)
  x0 = np.asarray(data(proc))
  steps, lam = 4, 0.3
  seen = []

  def recording_fn(x_t, t):
    seen.append((np.asarray(x_t), np.asarray(t)))
    return random_logits_fn()(x_t, t)

  out = losses.d3pm_loss(proc, recording_fn, jax.random.PRNGKey(2), jnp.asarray(x0), steps, hybrid_lambda=lam)
  (x_t, t_B), = seen
  log_p = np.asarray(proc.x0_log_probs(random_logits_fn()(jnp.asarray(x_t), jnp.asarray(t_B)), jnp.asarray(x_t)))
  prior = np.asarray(proc.prior())
  q1 = np.asarray(proc.dense_marginal(1.0))
  step_B = np.rint(t_B * steps).astype(int)
  assert 1 in step_B and step_B.max() > 1  # both kinds of term are exercised
  for b in range(B):
    i = step_B[b]
    q_s, q_t = np.asarray(proc.dense_marginal((i - 1) / steps)), np.asarray(proc.dense_marginal(i / steps))
    q_st = np.asarray(proc.dense_transition((i - 1) / steps, i / steps))
    step_term = ce = 0.0
    for n in range(L):
      a, c, p = x0[b, n], x_t[b, n], np.exp(log_p[b, n])
      ce -= log_p[b, n, a]
      if i == 1:
        step_term -= log_p[b, n, a]
        continue
      true = q_s[a] * q_st[:, c] / q_t[a, c]  # q(x_{i-1} | x_i, x_0)
      model = sum(p[h] * q_s[h] * q_st[:, c] / q_t[h, c] for h in range(V) if q_t[h, c] > 0)
      step_term += sum(true[y] * np.log(true[y] / model[y]) for y in range(V) if true[y] > 0)
    prior_term = sum(q1[a] @ np.where(q1[a] > 0, np.log(np.where(q1[a] > 0, q1[a], 1) / prior), 0) for a in x0[b])
    np.testing.assert_allclose(out["loss"][b], step_term + lam * ce, rtol=1e-9)
    np.testing.assert_allclose(out["vlb"][b], steps * step_term + prior_term, rtol=1e-9)
    np.testing.assert_allclose(out["ce"][b], ce, rtol=1e-12)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_padding_weights_remove_positions(name):
  proc = build(name)
  x0 = data(proc)
  weights = jnp.ones((B, L)).at[:, 3:].set(0.0)
  fn = random_logits_fn()
  garbled = lambda x, t: fn(x, t) + jnp.where(weights[..., None] > 0, 0.0, 50.0 * jnp.arange(V))
  key = jax.random.PRNGKey(0)
  a = losses.continuous_elbo(proc, fn, key, x0, weights_BxL=weights)
  b = losses.continuous_elbo(proc, garbled, key, x0, weights_BxL=weights)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-12)
  assert float(losses.per_token(a["nelbo"], x0, weights)) == pytest.approx(float(a["nelbo"].sum()) / (B * 3))


@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_gradients_are_finite_in_float32(name):
  proc = build(name)
  x0 = data(proc)
  logits0 = jax.random.normal(jax.random.PRNGKey(0), (B, L, V))

  def loss(logits, kind):
    fn = lambda x, t: logits
    if kind == "d3pm":
      return jnp.mean(losses.d3pm_loss(proc, fn, jax.random.PRNGKey(1), x0, 20)["loss"])
    return jnp.mean(losses.continuous_elbo(proc, fn, jax.random.PRNGKey(1), x0, kind=kind)["nelbo"])

  for kind in ["ctmc", "d3pm"] + (["masked"] if name == "absorbing" else []):
    value, grad = jax.value_and_grad(loss)(logits0, kind)
    assert value.dtype == jnp.float32 and np.isfinite(float(value))
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0


def test_likelihood_accumulator_is_token_weighted_float64():
  acc = losses.LikelihoodAccumulator()
  rng = np.random.default_rng(0)
  chunks = [(rng.uniform(0, 50, size=16).astype(np.float32), rng.integers(1, 20, size=16)) for _ in range(100)]
  for nats, tokens in chunks:
    acc.add(jnp.asarray(nats), tokens)
  total = sum(np.float64(n).sum() for n, _ in chunks)
  count = sum(int(t.sum()) for _, t in chunks)
  res = acc.result()
  assert res["tokens"] == count
  assert res["nats_per_token"] == pytest.approx(total / count, rel=1e-12)
  assert res["bits_per_token"] == pytest.approx(total / count / math.log(2), rel=1e-12)
  assert res["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-12)
  with pytest.raises(ValueError, match="no tokens"):
    losses.LikelihoodAccumulator().result()


@pytest.mark.parametrize("call,match", [
    (lambda: losses.continuous_elbo(build("uniform"), random_logits_fn(), jax.random.PRNGKey(0),
                                    jnp.zeros((2, 3), jnp.int32), kind="sedd"),
     "unknown continuous ELBO kind 'sedd'; valid: \\['ctmc', 'masked'\\]"),
    (lambda: losses.continuous_elbo(build("uniform"), random_logits_fn(), jax.random.PRNGKey(0),
                                    jnp.zeros((2, 3), jnp.int32), kind="masked"), "needs the absorbing process"),
    (lambda: losses.d3pm_loss(build("uniform"), random_logits_fn(), jax.random.PRNGKey(0),
                              jnp.zeros((2, 3), jnp.int32), num_steps=0), "num_steps must be >= 1"),
    (lambda: losses.continuous_elbo(build("absorbing"), random_logits_fn(), jax.random.PRNGKey(0),
                                    jnp.full((2, 3), V - 1, jnp.int32)), r"\[5, 5, 5, 5\] outside the valid range"),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", PROCESS_NAMES)
def test_d3pm_losses_ignore_padded_positions(name):
  """d3pm_loss and d3pm_vlb_exact with weights 0 on positions 3..: changing the tokens there and garbling the
  denoiser's logits there changes nothing (it changes the unweighted values)."""
  proc = build(name)
  x0 = data(proc)
  other_x0 = x0.at[:, 3:].set((x0[:, 3:] + 1) % proc.num_data_states)
  weights = jnp.ones((B, L)).at[:, 3:].set(0.0)
  fn = random_logits_fn()
  garbled = lambda x, t: fn(x, t) + jnp.where(weights[..., None] > 0, 0.0, 50.0 * jnp.arange(V))
  key = jax.random.PRNGKey(4)
  for f in (lambda logits_fn, x, w: losses.d3pm_loss(proc, logits_fn, key, x, 10, 0.1, weights_BxL=w),
            lambda logits_fn, x, w: {"vlb": losses.d3pm_vlb_exact(proc, logits_fn, key, x, 10, weights_BxL=w)}):
    a, b = f(fn, x0, weights), f(garbled, other_x0, weights)
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-12)
    unweighted = f(fn, x0, None)["vlb"], f(garbled, other_x0, None)["vlb"]
    assert float(jnp.abs(unweighted[0] - unweighted[1]).max()) > 1e-3


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name,kind", [("uniform", "ctmc"), ("absorbing", "masked")])
def test_without_recon_the_elbo_drops_exactly_the_reconstruction_term(name, kind):
  """with_recon=False (the training objective: one network call fewer) leaves the diffusion and prior terms
  as they were for the same key, has no recon entry, and its nelbo is short by exactly the recon term (which is
  0 for masking, whose unmasked tokens are copied, and positive for the uniform process)."""
  proc = build(name)
  x0, fn, key = data(proc), random_logits_fn(), jax.random.PRNGKey(5)
  calls = []
  counting = lambda x, t: (calls.append(1), fn(x, t))[1]
  full = losses.continuous_elbo(proc, counting, key, x0, kind=kind)
  with_calls = len(calls)
  short = losses.continuous_elbo(proc, counting, key, x0, kind=kind, with_recon=False)
  assert "recon" not in short and len(calls) - with_calls == with_calls - 1
  np.testing.assert_allclose(short["diffusion"], full["diffusion"], rtol=1e-12)
  np.testing.assert_allclose(full["nelbo"] - short["nelbo"], full["recon"], rtol=1e-9)
  assert float(jnp.min(full["recon"])) > 0 if name == "uniform" else float(jnp.max(full["recon"])) == 0


def test_antithetic_times_are_evenly_spaced_and_plain_ones_are_not():
  """antithetic=True: one uniform offset, then B points evenly spaced modulo 1 (sorted gaps all 1/B);
  antithetic=False: independent uniforms, whose sorted gaps vary."""
  seen = {}
  proc = build("absorbing")
  for antithetic in (True, False):
    def recording(x_t, t, antithetic=antithetic):
      seen[antithetic] = np.asarray(t)
      return random_logits_fn()(x_t, t)
    x0 = jax.random.randint(jax.random.PRNGKey(1), (64, L), 0, proc.num_data_states)
    losses.continuous_elbo(proc, recording, jax.random.PRNGKey(6), x0, kind="masked", antithetic=antithetic,
                           with_recon=False)
  for antithetic, t in seen.items():
    gaps = np.diff(np.sort(np.concatenate([t, [np.min(t) + 1.0]])))
    assert t.shape == (64,) and np.all((0 <= t) & (t < 1))
    if antithetic:
      np.testing.assert_allclose(gaps, 1 / 64, atol=1e-6)
    else:
      assert gaps.max() > 3 / 64 and gaps.min() < 1 / 256

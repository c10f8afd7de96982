"""Temperature, nucleus and greedy act on p_theta(x_0 | x_t), and the reverse step is formed exactly from the
shaped prediction: the unmasking schedule never depends on the knobs, and the sampled distribution equals an
enumeration of the exact reverse chain."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from d3pm_jax import get_schedule, make_process
from d3pm_jax.sampling import SamplerConfig, sample, time_grid

KNOBS = [dict(temperature=0.5), dict(), dict(temperature=2.0), dict(top_p=0.9), dict(greedy=True)]
EPS = 1e-4


def linear_alpha(t):
  return EPS + (1.0 - 2.0 * EPS) * (1.0 - t)


@pytest.mark.parametrize("knob", KNOBS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "plain")
def test_masked_fraction_follows_the_schedule_whatever_the_knobs(knob):
  """V = 101, L = 400, 16 steps, linear schedule: after the step to time s the number of masked positions is
  Binomial(N, (1 - alpha(s)) / (1 - alpha(1))). Tempering the posterior over x_s instead (mask included) leaves
  66% masked before the last step at temperature 0.5, where 6% are expected."""
  vocab, batch, length, steps = 101, 16, 400, 16
  proc = make_process("absorbing", vocab, get_schedule("linear"))
  table = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (vocab, vocab))
  logits_fn = lambda x_t, t_B: table[x_t] + jnp.roll(table[x_t], 1, axis=1)  # confident, depends on x_t
  cfg = SamplerConfig(num_steps=steps, return_trajectory=True, **knob)
  x0, traj = jax.jit(lambda key: sample(proc, logits_fn, key, batch, length, cfg))(jax.random.PRNGKey(1))
  masked = np.asarray((traj == proc.mask_id).sum(axis=(1, 2)))
  n = batch * length
  for i, s in enumerate(np.arange(steps - 1, -1, -1) / steps):  # after step i the time is s
    if s == 0:
      assert masked[i] == 0
      continue
    p = (1.0 - linear_alpha(s)) / (1.0 - linear_alpha(1.0))
    lo, hi = scipy.stats.binom.interval(1.0 - 1e-6, n, p)
    assert lo <= masked[i] <= hi, (i, s, masked[i], lo, hi, n * p)
  if knob.get("greedy"):  # every token is the argmax of the prediction it was unmasked under
    assert int(x0.max()) < proc.mask_id


# ---------------------------------------------------------------- enumeration of the exact reverse chain

V_DATA, LENGTH, STEPS, SAMPLES = 3, 2, 3, 20000


def build(name):
  if name == "absorbing":
    return make_process("absorbing", V_DATA + 1, get_schedule("linear"))
  if name == "uniform":
    return make_process("uniform", V_DATA, get_schedule("linear"))
  return make_process("nearest_neighbor", V_DATA, get_schedule("linear"), k=1, rate_scale=4.0,
                      embeddings=np.array([[0.0], [1.0], [2.5]]))  # the path 0 - 1 - 2


def network_tables(num_states):
  rng = np.random.default_rng(3)
  return rng.normal(size=(num_states, num_states)) * 1.5, rng.normal(size=(num_states, num_states)), rng.normal(
      size=(LENGTH, num_states))


def make_logits_fn(tables):
  own, other, timed = (jnp.asarray(x, jnp.float32) for x in tables)
  # Position n sees its own state, the other position's state, and t: the prediction is a joint function of x_t.
  return lambda x_t, t_B: own[x_t] + other[x_t[:, ::-1]] + t_B[:, None, None] * timed[None]


def np_logits(tables, x_t, t):
  own, other, timed = tables
  return np.stack([own[x_t[n]] + other[x_t[1 - n]] + t * timed[n] for n in range(LENGTH)])


def np_shape(p, knob):
  """The knobs by their definitions, on a probability vector."""
  if knob.get("greedy"):
    return np.eye(len(p))[np.argmax(p)]
  p = p ** (1.0 / knob.get("temperature", 1.0))
  p = p / p.sum()
  top_p = knob.get("top_p", 1.0)
  if top_p < 1.0:
    order = np.argsort(-p)
    keep = order[: np.searchsorted(np.cumsum(p[order]), top_p) + 1]  # the smallest prefix reaching top_p
    p = np.where(np.isin(np.arange(len(p)), keep), p, 0.0)
    p = p / p.sum()
  return p


def exact_distribution(proc, tables, knob, shape_posterior=False):
  """P(x_0) over [V_DATA] ** LENGTH by running the reverse chain over every state of [V] ** LENGTH. With
  ``shape_posterior`` the knobs act on the one-step posterior instead (the sampler's old behaviour)."""
  num = proc.num_states
  rates = np.asarray(proc.rate_matrix(), np.float64)
  qbar = lambda t: scipy.linalg.expm(-np.log(linear_alpha(t)) * rates)
  absorbing = num == V_DATA + 1
  if absorbing:
    dist = {(proc.mask_id,) * LENGTH: 1.0}
  else:
    prior = np.asarray(proc.prior(), np.float64)
    dist = {x: float(np.prod(prior[list(x)])) for x in itertools.product(range(num), repeat=LENGTH)}
  times = np.asarray(time_grid("uniform", STEPS), np.float64)
  for i in range(STEPS, 0, -1):
    t, s = times[i], times[i - 1]
    q_t, q_s = qbar(t), qbar(s)
    q_st = scipy.linalg.expm((np.log(linear_alpha(s)) - np.log(linear_alpha(t))) * rates)
    new = {}
    for x_t, prob in dist.items():
      x_t = np.array(x_t)
      logits = np_logits(tables, x_t, t)
      per_position = []
      for n in range(LENGTH):
        if absorbing and x_t[n] != proc.mask_id:  # SUBS: an unmasked token is its own x_0
          p0 = np.eye(num)[x_t[n]]
        else:
          z = logits[n][:V_DATA] if absorbing else logits[n]
          p0 = np.zeros(num)
          p0[: len(z)] = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        col = q_t[:, x_t[n]]
        # sum_h p(h) q(x_s | x_t, h), q(x_s = y | x_t, h) = Qs[h, y] Qst[y, x_t] / Qt[h, x_t].
        posterior = lambda p: ((p / np.where(col > 0, col, 1.0)) * (col > 0)) @ q_s * q_st[:, x_t[n]]
        if s == 0:
          step = np_shape(p0, knob)
        elif shape_posterior:
          step = np_shape(posterior(p0) / posterior(p0).sum(), knob)
        else:
          step = posterior(np_shape(p0, knob))
        per_position.append(step / step.sum())
      for x_s in itertools.product(range(num), repeat=LENGTH):
        w = prob * np.prod([per_position[n][x_s[n]] for n in range(LENGTH)])
        if w > 0:
          new[x_s] = new.get(x_s, 0.0) + w
    dist = new
  out = np.zeros((V_DATA,) * LENGTH)
  for x, prob in dist.items():
    assert max(x) < V_DATA or prob < 1e-12, (x, prob)  # the last step leaves no mask
    if max(x) < V_DATA:
      out[x] += prob
  return out.ravel() / out.sum()


def chi_square_pvalue(counts, probs):
  """Goodness of fit with cells of expected count < 5 pooled; cells of probability 0 must be empty."""
  assert counts[probs == 0].sum() == 0, "a sample fell where the exact chain puts no mass"
  expected = probs * counts.sum()
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  if len(obs) == 1:  # one possible outcome (greedy): emptiness of the other cells was the whole test
    return 1.0
  return scipy.stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize("knob", KNOBS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "plain")
@pytest.mark.parametrize("name", ["absorbing", "uniform", "nearest_neighbor"])
def test_sampled_distribution_equals_the_enumerated_reverse_chain(name, knob):
  """V_DATA = 3 (plus the mask), L = 2, 3 steps, a network whose prediction depends on both positions and t:
  20,000 samples fit the exact distribution of the reverse chain built from the shaped prediction (chi-square
  p > 1e-4), and where the knobs change the chain, they reject the chain built by shaping the posterior."""
  proc = build(name)
  tables = network_tables(proc.num_states)
  cfg = SamplerConfig(num_steps=STEPS, **knob)
  x0, _ = jax.jit(lambda key: sample(proc, make_logits_fn(tables), key, SAMPLES, LENGTH, cfg))(jax.random.PRNGKey(4))
  x0 = np.asarray(x0)
  counts = np.bincount(x0[:, 0] * V_DATA + x0[:, 1], minlength=V_DATA ** LENGTH)
  exact = exact_distribution(proc, tables, knob)
  assert chi_square_pvalue(counts, exact) > 1e-4, (counts / SAMPLES, exact)
  old = exact_distribution(proc, tables, knob, shape_posterior=True)
  if 0.5 * np.abs(old - exact).sum() > 0.02:  # the test has the power to see the old behaviour
    assert (counts[old == 0].sum() > 0) or chi_square_pvalue(counts, old) < 1e-6

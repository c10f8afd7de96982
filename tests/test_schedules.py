"""Schedules: endpoints, derivatives against autodiff, D3PM's discrete grids against their beta products."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d3pm_jax import schedules
from d3pm_jax.schedules import get_schedule

pytestmark = pytest.mark.usefixtures("x64")

CONTINUOUS = ["linear", "cosine", "poly2", "poly0.5", "loglinear", "geometric"]
DISCRETE = [("jsd", 10), ("linear_betas", 50), ("cosine_betas", 20)]


def all_schedules(eps=1e-4):
  return ([get_schedule(n, eps=eps) for n in CONTINUOUS] +
          [get_schedule(n, eps=eps, num_steps=T) for n, T in DISCRETE])


@pytest.mark.parametrize("sched", all_schedules(), ids=lambda s: s.name)
def test_endpoints_range_and_monotone(sched):
  t = jnp.linspace(0.0, 1.0, 1001)
  alpha = sched.alpha(t)
  assert float(alpha[0]) == pytest.approx(1 - sched.eps, abs=1e-12)
  assert float(alpha.min()) >= sched.eps - 1e-15 and float(alpha.max()) <= 1 - sched.eps + 1e-15
  assert bool(jnp.all(jnp.diff(alpha) <= 1e-15)), "alpha must not increase with t"
  if sched.name not in ("linear_betas", "cosine_betas"):  # those betas need not reach alpha_raw(1) = 0
    assert float(alpha[-1]) == pytest.approx(sched.eps, abs=1e-9)


@pytest.mark.parametrize("sched", all_schedules()[: len(CONTINUOUS)], ids=lambda s: s.name)
def test_derivative_matches_autodiff(sched):
  t = jnp.linspace(0.01, 0.99, 37)
  auto = jax.vmap(jax.grad(lambda u: sched.alpha(u)))(t)
  np.testing.assert_allclose(sched.dalpha_dt(t), auto, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(sched.dtau_dt(t), -auto / sched.alpha(t), rtol=1e-10)
  np.testing.assert_allclose(sched.tau(t), -jnp.log(sched.alpha(t)), rtol=1e-12)


@pytest.mark.parametrize("name,steps", DISCRETE)
def test_discrete_derivative_is_slope_between_grid_points(name, steps):
  sched = get_schedule(name, num_steps=steps)
  grid = sched.alpha(jnp.arange(steps + 1) / steps)
  mid = (jnp.arange(steps) + 0.5) / steps
  np.testing.assert_allclose(sched.dalpha_dt(mid), jnp.diff(grid) * steps, rtol=1e-10, atol=1e-12)


def test_discrete_grids_equal_beta_products():
  steps = 10
  eps = 1e-4

  def squash(raw):
    return eps + (1 - 2 * eps) * np.asarray(raw)

  grid_t = jnp.arange(steps + 1) / steps
  # jsd: beta_i = 1 / (T - i + 1) telescopes to alpha_i = 1 - i / T, so the grid equals `linear`.
  np.testing.assert_allclose(get_schedule("jsd", num_steps=steps).alpha(grid_t), squash(1 - np.arange(11) / 10),
                             atol=1e-12)
  np.testing.assert_allclose(get_schedule("jsd", num_steps=steps).alpha(grid_t),
                             get_schedule("linear").alpha(grid_t), atol=1e-12)
  # linear betas: a running product computed term by term.
  betas = [1e-4 + (0.02 - 1e-4) * j / (steps - 1) for j in range(steps)]
  expected = [1.0]
  for beta in betas:
    expected.append(expected[-1] * (1 - beta))
  np.testing.assert_allclose(get_schedule("linear_betas", num_steps=steps).alpha(grid_t), squash(expected),
                             rtol=1e-12)
  # cosine betas from D3PM's f(i) = cos((i/T + 0.008) / 1.008 * pi / 2); with the 0.999 cap only on the last step.
  f = [math.cos((i / steps + 0.008) / 1.008 * math.pi / 2) for i in range(steps + 1)]
  expected = [1.0]
  for i in range(1, steps + 1):
    expected.append(expected[-1] * (1 - min(1 - f[i] / f[i - 1], 0.999)))
  np.testing.assert_allclose(get_schedule("cosine_betas", num_steps=steps).alpha(grid_t), squash(expected),
                             rtol=1e-12)


def test_named_closed_forms():
  t = jnp.array([0.0, 0.3, 0.7, 1.0])
  raw = lambda s: (s.alpha(t) - s.eps) / (1 - 2 * s.eps)
  np.testing.assert_allclose(raw(get_schedule("cosine")), 1 - np.sin(np.pi / 2 * np.asarray(t)), atol=1e-12)
  np.testing.assert_allclose(raw(get_schedule("poly3")), 1 - np.asarray(t) ** 3, atol=1e-12)
  geo = get_schedule("geometric")
  sigma = 1e-4 ** (1 - np.asarray(t)) * 20.0 ** np.asarray(t)
  expected = (np.exp(-sigma) - np.exp(-20.0)) / (np.exp(-1e-4) - np.exp(-20.0))
  np.testing.assert_allclose(raw(geo), expected, rtol=1e-12)


def test_eps_zero_gives_exact_endpoints():
  sched = get_schedule("cosine", eps=0.0)
  assert float(sched.alpha(0.0)) == 1.0
  assert float(sched.alpha(1.0)) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="quadratic"), "unknown schedule 'quadratic'; valid:"),
    (dict(name="poly0"), "positive exponent"),
    (dict(name="jsd"), "needs num_steps"),
    (dict(name="linear", num_steps=10), "drop num_steps"),
    (dict(name="linear", eps=0.6), "eps must lie in"),
])
def test_bad_schedules_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    get_schedule(**kwargs)


@pytest.mark.parametrize("t", [-0.1, 1.5, [0.2, 1.01]])
def test_time_outside_unit_interval_raises(t):
  with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
    get_schedule("linear").alpha(jnp.asarray(t))


@pytest.mark.parametrize("name", schedules.VALID_NAMES)
def test_every_listed_schedule_builds_and_falls_from_one_to_zero(name):
  """Each name the error message offers is a working schedule: alpha from 1 - eps at t = 0 down to ~0 at t = 1
  (D3PM's T = 1000 for the discrete ones), non-increasing on a fine grid, with a finite derivative of the right
  sign; an unlisted name is refused."""
  spelled = "poly2" if name == "poly<k>" else name
  eps = 1e-4
  grid = {"grid": tuple(1.0 - np.arange(1001) / 1000)} if name == "mutual_information" else {}
  sched = get_schedule(spelled, eps=eps, num_steps=1000 if name in schedules.DISCRETE else None, **grid)
  t = jnp.linspace(0.0, 1.0, 401)
  alpha = np.asarray(sched.alpha(t), np.float64)
  assert abs(alpha[0] - (1.0 - eps)) < 1e-6 and eps - 1e-9 <= alpha[-1] < 1e-3
  assert (np.diff(alpha) <= 1e-7).all()
  slope = np.asarray(sched.dalpha_dt(t[1:-1]), np.float64)
  assert np.isfinite(slope).all() and (slope <= 0).all()
  with pytest.raises(ValueError, match=r"unknown schedule 'linea'; valid: \["):
    get_schedule("linea")


@pytest.mark.parametrize("name", ["linear", "cosine", "poly2", "geometric", "cosine_betas"])
def test_time_at_alpha_inverts_alpha(name):
  sched = get_schedule(name, num_steps=50 if name == "cosine_betas" else None)
  t = jnp.linspace(0.0, 1.0, 41)
  back = sched.time_at_alpha(sched.alpha(t))
  np.testing.assert_allclose(sched.alpha(back), sched.alpha(t), atol=2e-6)
  if name != "cosine_betas":  # strictly decreasing alpha: the time itself comes back
    np.testing.assert_allclose(back, t, atol=1e-4)
  np.testing.assert_allclose(sched.time_at_alpha(jnp.array([2.0, -1.0])), [0.0, 1.0], atol=1e-6)  # clipped


# ---------------------------------------------------------------- D3PM's mutual-information schedule

def _information(p, q):
  """I(x_0; x_t) = sum_x sum_y p(x) q(y|x) log(q(y|x) / m(y)), term by term (no shared code with the library)."""
  m = [sum(p[x] * q[x][y] for x in range(len(p))) for y in range(len(p))]
  return sum(p[x] * q[x][y] * math.log(q[x][y] / m[y]) for x in range(len(p)) for y in range(len(p))
             if p[x] > 0 and q[x][y] > 0)


def test_mutual_information_grid_makes_the_information_fall_linearly():
  """On a toy unigram distribution and the uniform process (q(y|x) = a [x = y] + (1 - a) / V, written out here),
  each grid point's information is (1 - i/T) H(x_0), the paper's definition, to 1e-9 nats. Mutations: targets
  rising with i, H(x_t) in place of the information, or the squash left out of alpha (off by ~eps H)."""
  p, num_steps, eps, vocab = [0.5, 0.25, 0.15, 0.1], 8, 1e-3, 4
  uniform = lambda a_N: (a_N[:, None, None] * jnp.eye(vocab)[None] + (1.0 - a_N[:, None, None]) / vocab)
  grid = schedules.mutual_information_grid(uniform, p, num_steps, eps)
  entropy = -sum(x * math.log(x) for x in p)
  assert grid[0] == 1.0 and grid[-1] == 0.0 and all(a >= b for a, b in zip(grid, grid[1:]))
  for i in range(1, num_steps):
    a = eps + (1 - 2 * eps) * grid[i]
    q = [[a * (x == y) + (1 - a) / vocab for y in range(vocab)] for x in range(vocab)]
    assert abs(_information(p, q) - (1 - i / num_steps) * entropy) < 1e-9, i
  sched = get_schedule("mutual_information", eps=eps, num_steps=num_steps, grid=grid)
  np.testing.assert_allclose(sched.alpha(jnp.arange(num_steps + 1) / num_steps), eps + (1 - 2 * eps) * np.array(grid),
                             atol=1e-12)


@pytest.mark.usefixtures("x64")
def test_the_uniform_processs_mutual_information_schedule_is_the_written_out_grid():
  """``state.build_process`` computes the grid from the library's uniform process; it equals the grid of the
  transition written out here, q(y | x) = a [x = y] + (1 - a) / V, to 1e-9 (transitions at the wrong alpha, e.g.
  a^2, move it far more)."""
  from d3pm_jax.config import ProcessConfig
  from d3pm_jax.models.transformer import ModelConfig
  from d3pm_jax.training import state
  counts, vocab, eps = np.array([50, 25, 15, 10]), 4, 1e-3
  cfg = ProcessConfig(name="uniform", loss="d3pm", schedule="mutual_information", eps=eps, num_steps=8)
  process = state.build_process(cfg, ModelConfig(vocab_size=vocab), unigram_V=counts)
  uniform = lambda a_N: (a_N[:, None, None] * jnp.eye(vocab)[None] + (1.0 - a_N[:, None, None]) / vocab)
  grid = np.array(schedules.mutual_information_grid(uniform, counts / counts.sum(), 8, eps))
  t = jnp.arange(9) / 8
  np.testing.assert_allclose(process.schedule.alpha(t), eps + (1 - 2 * eps) * grid, atol=1e-9)


def test_mutual_information_schedule_is_jsd_for_absorbing():
  """For absorbing, I(x_0; x_t) = alpha H(x_0) whatever the unigram distribution, so the schedule is D3PM's
  1/(T - t + 1) (``jsd``) exactly, through the library's process and ``state.build_process``."""
  from d3pm_jax.config import ProcessConfig
  from d3pm_jax.models.transformer import ModelConfig
  from d3pm_jax.training import state
  counts = np.array([40, 3, 17, 0, 9])
  cfg = ProcessConfig(name="absorbing", loss="d3pm", schedule="mutual_information", eps=0.0, num_steps=20)
  process = state.build_process(cfg, ModelConfig(vocab_size=6), unigram_V=counts)
  jsd = get_schedule("jsd", eps=0.0, num_steps=20)
  t = jnp.arange(21) / 20
  np.testing.assert_allclose(process.schedule.alpha(t), jsd.alpha(t), atol=1e-12)
  with pytest.raises(ValueError, match="computed from the training data's unigram frequencies"):
    state.build_process(cfg, ModelConfig(vocab_size=6))
  with pytest.raises(ValueError, match="a grid is given exactly for the mutual_information schedule"):
    get_schedule("mutual_information", num_steps=4)

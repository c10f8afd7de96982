"""Noise schedules: the keep-probability alpha(t) on continuous time t in [0, 1], and its derivative.

Every corruption process in d3pm_jax is ``Qbar(t) = expm(tau(t) R)`` with ``tau(t) = -log alpha(t)``, so a
schedule is all a process needs to know about time. ``alpha`` falls from 1 at t = 0 to 0 at t = 1; to keep
``tau`` and the loss weights finite it is squashed affinely into ``[eps, 1 - eps]``:

    alpha(t) = eps + (1 - 2 eps) * alpha_raw(t),     dalpha_dt(t) = (1 - 2 eps) * alpha_raw'(t).

The affine squash (rather than a hard clip) keeps ``dalpha_dt`` the exact derivative of ``alpha`` everywhere, so
a continuous-time ELBO integrated against it stays an exact identity.

Continuous schedules (``alpha_raw``):
  linear       1 - t
  cosine       1 - cos(pi/2 (1 - t))            (MD4's "cosine", MaskGIT's mask ratio)
  poly<k>      1 - t**k, e.g. poly2, poly0.5   (MD4's polynomial family)
  loglinear    1 - t                            (MDLM's log-linear: sigma(t) = -log(1 - t); eps as above)
  geometric    exp(-sigma_min**(1-t) sigma_max**t) normalised to [0, 1]   (SEDD; sigma_min=1e-4, sigma_max=20)

D3PM's discrete-time schedules, defined by betas over ``num_steps`` = T steps, through the same interface:
``alpha_raw(i / T) = prod_{j <= i} (1 - beta_j)`` exactly on the grid and linear in between.
  jsd           beta_i = 1 / (T - i + 1)        (whose grid values equal ``linear``'s)
  linear_betas  beta_i = linspace(beta_start, beta_end, T)
  cosine_betas  beta_i = min(1 - f(i)/f(i-1), 0.999),  f(i) = cos((i/T + 0.008) / 1.008 * pi/2)
  mutual_information  D3PM's (its Appendix A.5): the grid for which the mutual information between x_0 and x_t
                falls linearly, I(x_0; x_{t_i}) = (1 - i/T) H(x_0), x_0 drawn from the data's unigram
                distribution. It depends on the process and the data, so it is computed
                (``mutual_information_grid``) and passed in as ``grid``; for absorbing it is ``jsd``'s.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from d3pm_jax import _checks

CONTINUOUS = ("linear", "cosine", "poly<k>", "loglinear", "geometric")
DISCRETE = ("jsd", "linear_betas", "cosine_betas", "mutual_information")
VALID_NAMES = CONTINUOUS + DISCRETE
_POLY = re.compile(r"^poly(\d+(\.\d+)?)$")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A noise schedule. Hashable, so it can be a static argument of jitted functions.

  Attributes:
    name: one of ``VALID_NAMES`` (``poly<k>`` with a positive number k, e.g. ``poly3``).
    eps: alpha is squashed into [eps, 1 - eps]; 0 <= eps < 0.5.
    num_steps: T for the discrete-time D3PM schedules; ignored (and must be None) for continuous ones.
    beta_start, beta_end: the endpoints of ``linear_betas``.
    sigma_min, sigma_max: total-noise endpoints of ``geometric``.
    grid: alpha_raw at t_i = i / T, i = 0..T (``mutual_information`` only: ``mutual_information_grid``).
  """
  name: str
  eps: float = 1e-4
  num_steps: int | None = None
  beta_start: float = 1e-4
  beta_end: float = 0.02
  sigma_min: float = 1e-4
  sigma_max: float = 20.0
  grid: tuple[float, ...] | None = None

  def __post_init__(self):
    if not (0.0 <= self.eps < 0.5):
      raise ValueError(f"schedule eps must lie in [0, 0.5); got {self.eps}")
    is_poly = _POLY.match(self.name) is not None
    if not is_poly and self.name not in VALID_NAMES:
      raise ValueError(f"unknown schedule {self.name!r}; valid: {sorted(VALID_NAMES)} "
                       "(poly<k> takes a positive number, e.g. 'poly2')")
    if is_poly and float(_POLY.match(self.name).group(1)) <= 0:
      raise ValueError(f"schedule {self.name!r} needs a positive exponent, e.g. 'poly2'")
    if self.name in DISCRETE:
      if self.num_steps is None or int(self.num_steps) < 1:
        raise ValueError(f"discrete-time schedule {self.name!r} needs num_steps >= 1; got {self.num_steps}")
    elif self.num_steps is not None:
      raise ValueError(f"num_steps applies only to the discrete-time schedules {DISCRETE}; "
                       f"schedule {self.name!r} is continuous, drop num_steps={self.num_steps}")
    if self.name == "geometric" and not (0 < self.sigma_min < self.sigma_max):
      raise ValueError(f"geometric schedule needs 0 < sigma_min < sigma_max; got {self.sigma_min}, {self.sigma_max}")
    if (self.name == "mutual_information") != (self.grid is not None):
      raise ValueError(f"a grid is given exactly for the mutual_information schedule (computed from the process "
                       f"and the data's unigram frequencies by mutual_information_grid); schedule {self.name!r} got "
                       f"{'none' if self.grid is None else 'one'}")
    if self.grid is not None:
      grid = np.asarray(self.grid, np.float64)
      if grid.shape != (int(self.num_steps) + 1,) or not (np.all(np.diff(grid) <= 0) and grid.min() >= 0
                                                          and grid.max() <= 1):
        raise ValueError(f"the mutual_information grid must hold num_steps + 1 = {int(self.num_steps) + 1} "
                         f"non-increasing values in [0, 1]; got {grid.size} values")
    if self.name == "linear_betas" and not (0 <= self.beta_start <= 1 and 0 <= self.beta_end <= 1):
      raise ValueError(f"linear_betas needs betas in [0, 1]; got {self.beta_start}, {self.beta_end}")

  @property
  def is_discrete(self) -> bool:
    return self.name in DISCRETE

  # -- the raw schedule, alpha_raw(0) = 1 and alpha_raw(1) = 0 (or nearly, for some discrete ones) --

  def _grid(self) -> np.ndarray:
    """alpha_raw at t_i = i / T for the discrete schedules, float64, shape [T + 1]."""
    if self.grid is not None:
      return np.asarray(self.grid, np.float64)
    num_steps = int(self.num_steps)
    i = np.arange(1, num_steps + 1, dtype=np.float64)
    if self.name == "jsd":
      betas = 1.0 / (num_steps - i + 1.0)
    elif self.name == "linear_betas":
      betas = np.linspace(self.beta_start, self.beta_end, num_steps)
    else:  # cosine_betas
      f = np.cos((np.arange(num_steps + 1) / num_steps + 0.008) / 1.008 * np.pi / 2)
      betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    return np.concatenate([[1.0], np.cumprod(1.0 - betas)])

  def _raw(self, t):
    if self.is_discrete:
      return jnp.interp(t, jnp.linspace(0.0, 1.0, int(self.num_steps) + 1), jnp.asarray(self._grid()))
    if self.name in ("linear", "loglinear"):
      return 1.0 - t
    if self.name == "cosine":
      return 1.0 - jnp.sin(0.5 * math.pi * t)  # = 1 - cos(pi/2 (1 - t)), exact at t = 0
    if self.name == "geometric":
      lo, hi = math.exp(-self.sigma_min), math.exp(-self.sigma_max)
      sigma = self.sigma_min ** (1.0 - t) * self.sigma_max ** t
      return (jnp.exp(-sigma) - hi) / (lo - hi)
    k = float(_POLY.match(self.name).group(1))
    return 1.0 - t ** k

  def _raw_derivative(self, t):
    if self.is_discrete:
      num_steps = int(self.num_steps)
      grid = jnp.asarray(self._grid())
      idx = jnp.clip(jnp.floor(t * num_steps).astype(jnp.int32), 0, num_steps - 1)
      return (grid[idx + 1] - grid[idx]) * num_steps
    if self.name in ("linear", "loglinear"):
      return -jnp.ones_like(t)
    if self.name == "cosine":
      return -0.5 * math.pi * jnp.cos(0.5 * math.pi * t)
    if self.name == "geometric":
      lo, hi = math.exp(-self.sigma_min), math.exp(-self.sigma_max)
      sigma = self.sigma_min ** (1.0 - t) * self.sigma_max ** t
      dsigma = sigma * math.log(self.sigma_max / self.sigma_min)
      return -dsigma * jnp.exp(-sigma) / (lo - hi)
    k = float(_POLY.match(self.name).group(1))
    return -k * t ** (k - 1.0)

  # -- the public interface --

  def alpha(self, t):
    """Keep-probability alpha(t) in [eps, 1 - eps]; ``t`` any shape, values in [0, 1]."""
    _checks.check_unit_interval("t", t)
    t = jnp.asarray(t, dtype=jnp.result_type(float, t))
    return self.eps + (1.0 - 2.0 * self.eps) * self._raw(t)

  def dalpha_dt(self, t):
    """d alpha / dt (<= 0), the exact derivative of ``alpha``; same shape as ``t``."""
    _checks.check_unit_interval("t", t)
    t = jnp.asarray(t, dtype=jnp.result_type(float, t))
    return (1.0 - 2.0 * self.eps) * self._raw_derivative(t)

  def time_at_alpha(self, alpha, iterations: int = 40):
    """The time t with alpha(t) = ``alpha`` (any shape; clipped to [alpha(1), alpha(0)]), by bisection, since
    alpha is non-increasing: 40 halvings resolve t to 1e-12. Where alpha is flat, some t of the flat stretch."""
    target = jnp.clip(jnp.asarray(alpha, dtype=jnp.result_type(float, alpha)), self.alpha(1.0), self.alpha(0.0))

    def halve(_, bounds):
      lo, hi = bounds
      mid = 0.5 * (lo + hi)
      later = self.alpha(mid) > target  # alpha still above the target: t lies after mid
      return jnp.where(later, mid, lo), jnp.where(later, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iterations, halve, (jnp.zeros_like(target), jnp.ones_like(target)))
    return 0.5 * (lo + hi)

  def tau(self, t):
    """tau(t) = -log alpha(t), the integrated rate: Qbar(t) = expm(tau(t) R)."""
    return -jnp.log(self.alpha(t))

  def dtau_dt(self, t):
    """d tau / dt = -alpha'(t) / alpha(t) >= 0, the instantaneous rate multiplier."""
    return -self.dalpha_dt(t) / self.alpha(t)


def mutual_information(p_V, q_NxVxV):
  """I(x_0; x_t) in nats ``[N]`` for x_0 ~ ``p_V`` and x_t | x_0 = x ~ row x of each ``q_NxVxV``:
  H(x_t) - H(x_t | x_0), in the inputs' precision."""
  p = jnp.asarray(p_V, jnp.result_type(q_NxVxV))
  marginal_NxV = jnp.einsum("x,nxy->ny", p, q_NxVxV)
  h_marginal = -jnp.sum(jax.scipy.special.xlogy(marginal_NxV, marginal_NxV), axis=-1)
  h_conditional = -jnp.einsum("x,nx->n", p, jnp.sum(jax.scipy.special.xlogy(q_NxVxV, q_NxVxV), axis=-1))
  return h_marginal - h_conditional


def mutual_information_grid(transition_fn, p_V, num_steps: int, eps: float, coarse: int = 257,
                            iterations: int = 6, chunk: int = 64) -> tuple[float, ...]:
  """D3PM's mutual-information schedule as an ``alpha_raw`` grid over t_i = i / T: each value solves
  I(x_0; x_{t_i}) = (1 - i / T) H(x_0), x_0 ~ ``p_V``, where ``transition_fn(alpha_N) -> [N, V, V]`` is the
  process's q(x_t | x_0) at keep-probabilities alpha (after the squash ``alpha = eps + (1 - 2 eps) alpha_raw``).
  The information falls as alpha does, so each target has one root: bracketed on ``coarse`` evenly spaced values,
  then refined by ``iterations`` steps of false position (Illinois): within 1e-9 nats in float64 (the tests), at
  float32's precision otherwise. A target beyond the squash's range lands on its end (alpha_raw 1 at t = 0, 0 at
  t = 1)."""
  p = np.asarray(p_V, np.float64)
  if p.ndim != 1 or p.min() < 0 or not p.sum() > 0:
    raise ValueError("p_V must be a non-negative [V] vector of (unigram) frequencies with a positive sum")
  p = p / p.sum()
  positive = p[p > 0]
  entropy = -float(np.sum(positive * np.log(positive)))

  compiled = jax.jit(lambda a_raw: mutual_information(p, transition_fn(eps + (1.0 - 2.0 * eps) * a_raw)))

  def information(a_raw):  # in chunks of one shape, so the process's transitions compile once
    padded = np.pad(a_raw, (0, -a_raw.size % chunk), constant_values=1.0)
    return np.concatenate([np.asarray(compiled(jnp.asarray(padded[i:i + chunk])), np.float64)
                           for i in range(0, padded.size, chunk)])[:a_raw.size]

  nodes = np.linspace(0.0, 1.0, coarse)
  info_nodes = np.maximum.accumulate(information(nodes))  # non-decreasing in alpha_raw
  targets = (1.0 - np.arange(num_steps + 1) / num_steps) * entropy
  right = np.clip(np.searchsorted(info_nodes, targets), 1, coarse - 1)  # the root lies in [nodes[r-1], nodes[r]]
  lo, hi = nodes[right - 1], nodes[right]
  f_lo, f_hi = info_nodes[right - 1] - targets, info_nodes[right] - targets
  err_lo, err_hi = np.abs(f_lo), np.abs(f_hi)  # the ends' true residuals (Illinois halves f_lo, f_hi)
  inside = (f_lo <= 0) & (f_hi >= 0)
  last = np.zeros(targets.size, np.int8)  # which end the previous step moved: 1 lo, -1 hi
  for _ in range(iterations):
    span = np.where(f_hi - f_lo > 0, f_hi - f_lo, 1.0)
    mid = np.where(inside, lo - f_lo * (hi - lo) / span, lo)
    f_mid = information(mid) - targets
    left = f_mid < 0  # the root is above mid: move lo
    # Illinois: when the same end moves twice running, halve the other end's value so that it moves too.
    f_hi = np.where(left & (last == 1), 0.5 * f_hi, np.where(left, f_hi, f_mid))
    f_lo = np.where(~left & (last == -1), 0.5 * f_lo, np.where(left, f_mid, f_lo))
    lo, hi = np.where(left, mid, lo), np.where(left, hi, mid)
    err_lo, err_hi = np.where(left, np.abs(f_mid), err_lo), np.where(left, err_hi, np.abs(f_mid))
    last = np.where(left, 1, -1).astype(np.int8)
  grid = np.where(err_hi < err_lo, hi, lo)
  # H(x_0) is above any information the squashed alpha keeps and 0 below it: the ends are the squash's ends.
  grid[0], grid[-1] = 1.0, 0.0
  return tuple(float(x) for x in np.minimum.accumulate(grid))


def get_schedule(name: str, eps: float = 1e-4, num_steps: int | None = None, **kwargs) -> Schedule:
  """Builds a schedule by name; unknown names raise ValueError listing the valid ones."""
  return Schedule(name=name, eps=eps, num_steps=num_steps, **kwargs)

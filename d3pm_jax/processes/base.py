"""The interface every corruption process offers, and the parts that follow from it generically.

A process is a rate matrix R over V states (V counts every state, mask included) and a schedule:
``Qbar(t) = expm(tau(t) R)`` with ``tau = -log alpha``. Row convention: ``q(x_t | x_0) = onehot(x_0) @ Qbar(t)``.
Because every Qbar in the family is ``expm(tau R)`` for one fixed R, the transition from s to t is the same map
with keep-probability ``alpha(t) / alpha(s)``, so a subclass implements only four primitives, each in terms of a
keep-probability ``a`` (shape broadcastable to the leading dims, values in (0, 1]):

  ``_apply(probs_xV, a)``   probs @ expm(-log(a) R)           (linear in probs)
  ``_column(x, a)``         expm(-log(a) R)[:, x] for every row   -> [..., V]
  ``rate_column(x)``        R[:, x]                               -> [..., V]
  ``rate_matrix()``         R, dense [V, V]  (small V; the tests' independent reference)

and ``stationary()`` and ``sample_marginal``. Shapes: ``x`` integer ``[...]``, probabilities ``[..., V]``,
times ``t``/``s`` scalar or with leading dims of ``x`` (``t_B`` against ``x_BxL``).
"""
from __future__ import annotations

import abc

import jax
import jax.numpy as jnp

from d3pm_jax import _checks
from d3pm_jax.schedules import Schedule

# Log-probability of an impossible state. Finite so that 0 * NEG_INF = 0 and gradients stay NaN-free.
NEG_INF = -1e30


def safe_log(x):
  """log(x) for x > 0 and NEG_INF for x == 0, with gradients that never produce NaN."""
  positive = x > 0
  return jnp.where(positive, jnp.log(jnp.where(positive, x, 1.0)), NEG_INF)


def expand_time(t, ndim: int):
  """Right-pads ``t``'s shape with singleton axes so it broadcasts against an array of rank ``ndim``."""
  t = jnp.asarray(t)
  return t.reshape(t.shape + (1,) * (ndim - t.ndim))


class Process(abc.ABC):
  """Base class: subclasses are frozen dataclasses with a ``schedule`` field."""

  schedule: Schedule

  # ---- what a subclass provides ----
  @property
  @abc.abstractmethod
  def num_states(self) -> int:
    """V, every state of the process (mask included)."""

  @property
  def num_data_states(self) -> int:
    """How many states clean data x_0 may take: ids ``[0, num_data_states)``. V unless there is a mask."""
    return self.num_states

  @abc.abstractmethod
  def _apply(self, probs_xV, a):
    """``probs_xV @ expm(-log(a) R)``; ``a`` broadcasts against ``probs_xV[..., 0]``."""

  @abc.abstractmethod
  def _column(self, x, a):
    """``expm(-log(a) R)[j, x]`` for every j: shape ``x.shape + (V,)``."""

  @abc.abstractmethod
  def rate_column(self, x):
    """``R[y, x]`` for every y: the forward rate from y into x. Shape ``x.shape + (V,)``."""

  @abc.abstractmethod
  def rate_matrix(self):
    """The dense rate matrix R, ``[V, V]`` (rows sum to zero). For small V and for tests."""

  @abc.abstractmethod
  def stationary(self):
    """The stationary distribution of R, ``[V]``."""

  @abc.abstractmethod
  def sample_marginal(self, key, x0, t):
    """Draws x_t ~ q(x_t | x_0) for integer ``x0`` ``[...]``; returns integers of the same shape."""

  # ---- the shared interface ----
  def keep_probability(self, t, ndim: int):
    """alpha(t) shaped to broadcast against a rank-``ndim`` array of leading dims."""
    return expand_time(self.schedule.alpha(t), ndim)

  def marginal(self, x0_probs, t):
    """q(x_t | x_0) for one-hot or soft ``x0_probs`` ``[..., V]``; returns ``[..., V]``."""
    return self._apply(x0_probs, self.keep_probability(t, x0_probs.ndim - 1))

  def marginal_column(self, x_t, t):
    """q(x_t | x_0 = j) for every j: the likelihood of the observed ``x_t`` ``[...]``; returns ``[..., V]``."""
    self._check_states("x_t", x_t)
    return self._column(x_t, self.keep_probability(t, jnp.ndim(x_t)))

  def transition_alpha(self, s, t, ndim: int):
    """The keep-probability of the transition s -> t, alpha(t) / alpha(s), for s <= t."""
    return self.keep_probability(t, ndim) / self.keep_probability(s, ndim)

  def transition_column(self, x_t, s, t):
    """q(x_t | x_s = j) for every j, s <= t; returns ``[..., V]``."""
    self._check_states("x_t", x_t)
    return self._column(x_t, self.transition_alpha(s, t, jnp.ndim(x_t)))

  def posterior_logits(self, x0_probs, x_t, s, t):
    """Normalised log q(x_s | x_t, x_0) ``[..., V]`` for s < t.

    With soft ``x0_probs`` (a denoiser's prediction p(x_0 | x_t)) this is the exact mixture
    ``sum_{x_0} q(x_s | x_t, x_0) p(x_0 | x_t)``, so an exact x_0-posterior gives the exact reverse step. Values
    of x_0 that cannot have produced ``x_t`` (q(x_t | x_0) = 0) are dropped and the rest renormalised.
    """
    logits = safe_log(self.transition_column(x_t, s, t)) + self.log_ratio_mixture(safe_log(x0_probs), x_t, t, s)
    return jax.nn.log_softmax(logits, axis=-1)

  def log_ratio_mixture(self, x0_log_probs, x_t, t, u):
    """log sum_h p(h) Qbar(u)[h, y] / Qbar(t)[h, x_t] for every y, ``[..., V]``; h with Qbar(t)[h, x_t] = 0
    (which cannot have produced x_t) are dropped. At u = t this is the model's ratio q_t(y) / q_t(x_t) of the
    CTMC ELBO; at u = s < t, up to the transition factor, the posterior mixture."""
    col_t = self.marginal_column(x_t, t)
    log_w = jnp.where(col_t > 0, x0_log_probs - safe_log(col_t), NEG_INF)
    # Shifted so the linear map never sees overflowing or all-zero inputs.
    shift = jax.lax.stop_gradient(jnp.max(log_w, axis=-1, keepdims=True))
    return safe_log(self.marginal(jnp.exp(log_w - shift), u)) + shift

  def x0_log_probs(self, logits, x_t):
    """Normalised log p(x_0 | x_t) ``[..., V]`` from a network's raw ``logits``. Overridden by absorbing (SUBS)."""
    del x_t
    return jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)

  def prior(self):
    """The model's p(x_1): the marginal at t = 1 of x_0 uniform over the data states, ``[V]``.

    Equals ``stationary()`` for uniform and nearest-neighbour processes; for absorbing it is
    ``(1 - alpha(1)) e_mask + alpha(1) * uniform``, which keeps KL(q(x_1 | x_0) || prior) finite while alpha(1) > 0.
    """
    uniform = jnp.zeros((self.num_states,)).at[: self.num_data_states].set(1.0 / self.num_data_states)
    return self.marginal(uniform, 1.0)

  def prior_kl(self, x0):
    """KL(q(x_1 | x_0) || prior) in nats for each integer ``x0`` ``[...]``; the ELBO's prior term per token."""
    self._check_data("x0", x0)
    q1 = self.marginal(jax.nn.one_hot(x0, self.num_states), 1.0)
    log_ratio = safe_log(q1) - safe_log(self.prior())
    return jnp.sum(jnp.where(q1 > 0, q1 * log_ratio, 0.0), axis=-1)

  # ---- dense references (small V) ----
  def dense_marginal(self, t):
    """Qbar(t) = expm(tau(t) R) as a dense ``[V, V]`` matrix, computed by ``expm`` of the dense R. Scalar t."""
    return jax.scipy.linalg.expm(self.schedule.tau(t) * self.rate_matrix())

  def dense_transition(self, s, t):
    """Qbar(s, t) = expm((tau(t) - tau(s)) R), dense ``[V, V]``, for scalar s <= t."""
    return jax.scipy.linalg.expm((self.schedule.tau(t) - self.schedule.tau(s)) * self.rate_matrix())

  # ---- input checks (concrete values only; silent under jit) ----
  def _check_states(self, name: str, x):
    _checks.check_token_ids(name, x, self.num_states, "states")

  def _check_data(self, name: str, x):
    _checks.check_token_ids(name, x, self.num_data_states, "data token ids")

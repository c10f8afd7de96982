"""Absorbing (mask) diffusion: each token is replaced by the mask state at rate tau'(t), never to return.

R = 1 e_mask^T - I with the mask row zero, so Qbar(t) = alpha I + (1 - alpha) 1 e_mask^T. The mask is the last
state by default (``mask_id = V - 1``); data tokens are ``[0, V - 1)``. The closed forms below never build
``[..., V, V]``, and ``sample_marginal`` never builds ``[..., V]``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from d3pm_jax.processes.base import NEG_INF, Process
from d3pm_jax.schedules import Schedule


@dataclasses.dataclass(frozen=True)
class AbsorbingProcess(Process):
  """Masking process over ``vocab_size`` states, the mask included (the last id)."""
  vocab_size: int
  schedule: Schedule

  def __post_init__(self):
    if self.vocab_size < 2:
      raise ValueError(f"absorbing process needs vocab_size >= 2 (data tokens + mask); got {self.vocab_size}")

  @property
  def num_states(self) -> int:
    return self.vocab_size

  @property
  def num_data_states(self) -> int:
    return self.vocab_size - 1

  @property
  def mask_id(self) -> int:
    return self.vocab_size - 1

  def _apply(self, probs_xV, a):
    a = a[..., None]
    total = jnp.sum(probs_xV, axis=-1, keepdims=True)
    is_mask = jnp.arange(self.vocab_size) == self.mask_id
    return a * probs_xV + (1.0 - a) * total * is_mask

  def _column(self, x, a):
    a = a[..., None]
    one_hot = jax.nn.one_hot(x, self.vocab_size, dtype=a.dtype)
    x_is_mask = (x == self.mask_id)[..., None]
    # Column m is 1 - a everywhere but 1 at m itself; any other column c is a at c and 0 elsewhere.
    return jnp.where(x_is_mask, (1.0 - a) + a * one_hot, a * one_hot)

  def rate_column(self, x):
    one_hot = jax.nn.one_hot(x, self.vocab_size)
    x_is_mask = (x == self.mask_id)[..., None]
    return jnp.where(x_is_mask, 1.0 - one_hot, -one_hot)

  def rate_matrix(self):
    eye = jnp.eye(self.vocab_size)
    to_mask = jnp.zeros((self.vocab_size, self.vocab_size)).at[:, self.mask_id].set(1.0)
    return (to_mask - eye).at[self.mask_id].set(0.0)

  def stationary(self):
    return jax.nn.one_hot(self.mask_id, self.vocab_size)

  def prior_kl(self, x0):
    """KL(q(x_1 | x_0) || prior) per token without the ``[..., V]`` marginals (the masked ELBO's train step holds
    no ``[B, L, V]`` array): q(x_1 | x_0) keeps x_0 with alpha(1) and masks it otherwise, and the prior gives x_0
    alpha(1) / K (K data states) and the mask 1 - alpha(1), so the KL is alpha(1) log K for every data token."""
    self._check_data("x0", x0)
    a1 = jnp.asarray(self.schedule.alpha(1.0), jnp.result_type(float))
    return jnp.full(jnp.shape(x0), a1 * jnp.log(float(self.num_data_states)))

  def sample_marginal(self, key, x0, t):
    self._check_data("x0", x0)
    keep = jax.random.uniform(key, jnp.shape(x0)) < self.keep_probability(t, jnp.ndim(x0))
    return jnp.where(keep, x0, self.mask_id)

  def x0_log_probs(self, logits, x_t):
    """SUBS: the mask is never predicted, and an unmasked x_t is its own x_0 (carried over)."""
    log_probs = super().x0_log_probs(logits.at[..., self.mask_id].set(NEG_INF), x_t)
    carried = jnp.where(jax.nn.one_hot(x_t, self.vocab_size, dtype=bool), 0.0, NEG_INF)
    return jnp.where((x_t == self.mask_id)[..., None], log_probs, carried.astype(log_probs.dtype))

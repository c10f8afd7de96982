"""Uniform diffusion (D3PM-uniform, SEDD-uniform): each token is resampled uniformly at rate tau'(t).

R = 1 1^T / V - I, so Qbar(t) = alpha I + (1 - alpha) 1 1^T / V. Closed forms never build ``[..., V, V]``, and
``sample_marginal`` never builds ``[..., V]``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from d3pm_jax.processes.base import Process
from d3pm_jax.schedules import Schedule


@dataclasses.dataclass(frozen=True)
class UniformProcess(Process):
  """Uniform process over ``vocab_size`` states."""
  vocab_size: int
  schedule: Schedule

  def __post_init__(self):
    if self.vocab_size < 2:
      raise ValueError(f"uniform process needs vocab_size >= 2; got {self.vocab_size}")

  @property
  def num_states(self) -> int:
    return self.vocab_size

  def _apply(self, probs_xV, a):
    a = a[..., None]
    total = jnp.sum(probs_xV, axis=-1, keepdims=True)
    return a * probs_xV + (1.0 - a) * total / self.vocab_size

  def _column(self, x, a):
    a = a[..., None]
    return a * jax.nn.one_hot(x, self.vocab_size, dtype=a.dtype) + (1.0 - a) / self.vocab_size

  def rate_column(self, x):
    return jax.nn.one_hot(x, self.vocab_size) * -1.0 + 1.0 / self.vocab_size

  def rate_matrix(self):
    return jnp.full((self.vocab_size, self.vocab_size), 1.0 / self.vocab_size) - jnp.eye(self.vocab_size)

  def stationary(self):
    return jnp.full((self.vocab_size,), 1.0 / self.vocab_size)

  def sample_marginal(self, key, x0, t):
    self._check_data("x0", x0)
    keep_key, draw_key = jax.random.split(key)
    keep = jax.random.uniform(keep_key, jnp.shape(x0)) < self.keep_probability(t, jnp.ndim(x0))
    fresh = jax.random.randint(draw_key, jnp.shape(x0), 0, self.vocab_size, dtype=jnp.asarray(x0).dtype)
    return jnp.where(keep, x0, fresh)

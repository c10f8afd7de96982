"""Random draws that stay exact in float32: uniforms resolved finely near 0, Gumbel noise that does not saturate.

``jax.random.uniform`` in float32 returns multiples of 2^-23, so ``jax.random.gumbel`` (built on it) never exceeds
about 16.6. Gumbel-max then cannot pick a token whose log-probability lies more than ~19 nats below the leader:
a mask state of probability 1 - 1e-3 beats each of 50,257 tokens of probability 2e-8, although together they
should win 1 draw in 1000. ``fine_uniform`` refines the cell nearest 0 twice (``LEVELS`` draws, each refining the
lowest 2^-12 of the one before), which keeps the distribution exactly uniform while resolving values down to
2^-47, so ``gumbel`` reaches ~32 and only events of probability below ~1e-14 are lost.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LEVELS = 3
_REFINE = 2.0 ** -12


def fine_uniform(key, shape, dtype=jnp.float32):
  """Uniform on [0, 1) with fine resolution near 0: where a draw falls in the lowest 2^-12 (an event of
  probability exactly 2^-12, since 2^-12 is a multiple of the grid), it is replaced by a fresh draw scaled into
  that cell, ``LEVELS - 1`` times. In float64 one level already resolves 2^-52."""
  levels = 1 if jnp.dtype(dtype) == jnp.float64 else LEVELS
  keys = jax.random.split(key, levels)
  u = jax.random.uniform(keys[-1], shape, dtype)
  for level_key in keys[-2::-1]:  # innermost first: u is the refinement of the next coarser draw's lowest cell
    coarse = jax.random.uniform(level_key, shape, dtype)
    u = jnp.where(coarse < _REFINE, u * _REFINE, coarse)
  return u


def gumbel(key, shape, dtype=jnp.float32):
  """Standard Gumbel noise -log(E), E = -log(1 - U) ~ Exp(1) with U from ``fine_uniform``: E ~ U near 0 keeps
  relative precision, so the upper tail is not cut at 16.6 in float32."""
  u = fine_uniform(key, shape, dtype)
  return -jnp.log(-jnp.log1p(-u))


def categorical(key, log_probs_xV, dtype=jnp.float32):
  """One draw per row from ``softmax(log_probs_xV)`` (unnormalised is fine) by Gumbel-max in ``dtype``; -inf or
  very negative entries are never drawn. Returns int32 ``[...]``."""
  logits = log_probs_xV.astype(dtype)
  return jnp.argmax(logits + gumbel(key, logits.shape, dtype), axis=-1).astype(jnp.int32)


def bernoulli(key, p, shape=None, dtype=jnp.float32):
  """True with probability ``p`` (resolved to ~1e-14 in float32, where ``jax.random.bernoulli`` stops at 2^-23)."""
  p = jnp.asarray(p, dtype)
  shape = p.shape if shape is None else shape
  return fine_uniform(key, shape, dtype) < p

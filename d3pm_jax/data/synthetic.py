"""A source with known likelihood: a first-order Markov chain over K data states, and its exact denoiser.

The chain's log-likelihood and entropy are exact. For any corruption process, x_t is a hidden Markov model whose
hidden states are x_0 and whose emission matrix is Qbar(t) (positions are corrupted independently), so the exact
per-position posterior p(x_0^n | x_t) follows from forward-backward. With that oracle as the denoiser, a
correct continuous-time ELBO equals the chain's NLL; the tests build on this.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from d3pm_jax.processes.base import Process, safe_log


@dataclasses.dataclass(frozen=True, eq=False)
class MarkovSource:
  """x^1 ~ initial_K, x^n | x^{n-1} ~ transition_KxK[x^{n-1}]. A pytree of its two arrays."""
  initial_K: jax.Array
  transition_KxK: jax.Array

  @classmethod
  def random(cls, seed: int, num_states: int, concentration: float = 1.0) -> "MarkovSource":
    """Initial and transition rows drawn from a symmetric Dirichlet(concentration) (>= 1 avoids tiny probs)."""
    if num_states < 2:
      raise ValueError(f"a Markov source needs num_states >= 2; got {num_states}")
    if concentration <= 0:
      raise ValueError(f"Dirichlet concentration must be positive; got {concentration}")
    rng = np.random.default_rng(seed)
    alpha = np.full(num_states, float(concentration))
    return cls(initial_K=rng.dirichlet(alpha), transition_KxK=rng.dirichlet(alpha, size=num_states))

  @property
  def num_states(self) -> int:
    return self.initial_K.shape[0]

  def sample(self, key, batch: int, length: int):
    """Sequences ``x_BxL`` (int32) drawn from the chain."""
    init = jnp.asarray(self.initial_K)
    trans = jnp.asarray(self.transition_KxK)
    first_key, rest_key = jax.random.split(key)
    first_B = jax.random.categorical(first_key, jnp.log(init), shape=(batch,))

    def step(prev_B, step_key):
      nxt_B = jax.random.categorical(step_key, jnp.log(trans[prev_B]))
      return nxt_B, nxt_B

    _, rest_LxB = jax.lax.scan(step, first_B, jax.random.split(rest_key, length - 1))
    return jnp.concatenate([first_B[:, None], rest_LxB.T], axis=1).astype(jnp.int32)

  def log_prob(self, x_BxL):
    """Exact log p(x) in nats, ``[B]``."""
    init = jnp.asarray(self.initial_K)
    trans = jnp.asarray(self.transition_KxK)
    return jnp.log(init[x_BxL[:, 0]]) + jnp.sum(jnp.log(trans[x_BxL[:, :-1], x_BxL[:, 1:]]), axis=1)

  def entropy(self, length: int) -> float:
    """Exact entropy of length-``length`` sequences in nats, computed in float64 on the host."""
    init = np.asarray(self.initial_K, np.float64)
    trans = np.asarray(self.transition_KxK, np.float64)
    row_entropy = -np.sum(trans * np.log(trans), axis=1)
    marginal = init
    total = -np.sum(init * np.log(init))
    for _ in range(length - 1):
      total += marginal @ row_entropy
      marginal = marginal @ trans
    return float(total)

  def posterior(self, process: Process, x_t_BxL, t_B):
    """Exact p(x_0^n = h | x_t) for every position, ``[B, L, V]`` (zero beyond the K data states).

    Forward-backward with emissions q(x_t^n | x_0^n = h) = Qbar(t)[h, x_t^n], normalised at every step.
    """
    num_data = self.num_states
    if process.num_data_states != num_data:
      raise ValueError(f"the source has {num_data} states but the process takes {process.num_data_states} data states")
    emit_BxLxK = process.marginal_column(x_t_BxL, t_B)[..., :num_data]
    trans = jnp.asarray(self.transition_KxK, emit_BxLxK.dtype)
    init = jnp.asarray(self.initial_K, emit_BxLxK.dtype)
    emit_LxBxK = jnp.swapaxes(emit_BxLxK, 0, 1)

    def normalise(v):
      return v / jnp.sum(v, axis=-1, keepdims=True)

    def forward(msg_BxK, emit_BxK):
      msg_BxK = normalise((msg_BxK @ trans) * emit_BxK)
      return msg_BxK, msg_BxK

    first_BxK = normalise(init * emit_LxBxK[0])
    _, fwd_rest = jax.lax.scan(forward, first_BxK, emit_LxBxK[1:])
    fwd_LxBxK = jnp.concatenate([first_BxK[None], fwd_rest], axis=0)

    def backward(msg_BxK, emit_BxK):
      msg_BxK = normalise((emit_BxK * msg_BxK) @ trans.T)
      return msg_BxK, msg_BxK

    last_BxK = jnp.ones_like(first_BxK)
    _, bwd_rest = jax.lax.scan(backward, last_BxK, emit_LxBxK[1:], reverse=True)
    bwd_LxBxK = jnp.concatenate([bwd_rest, last_BxK[None]], axis=0)
    post_BxLxK = jnp.swapaxes(normalise(fwd_LxBxK * bwd_LxBxK), 0, 1)
    pad = process.num_states - num_data
    return jnp.pad(post_BxLxK, ((0, 0), (0, 0), (0, pad)))

  def oracle_logits_fn(self, process: Process):
    """A denoiser ``logits_fn(x_t_BxL, t_B) -> logits_BxLxV`` that returns the exact log-posterior."""
    return lambda x_t_BxL, t_B: safe_log(self.posterior(process, x_t_BxL, t_B))


jax.tree_util.register_dataclass(MarkovSource, data_fields=["initial_K", "transition_KxK"], meta_fields=[])

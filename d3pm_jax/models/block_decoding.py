"""The denoiser as ``sampling.block_sample`` reads it: block by block, with or without a KV cache.

``cached`` keeps the clean blocks' keys and values (``Attention``'s block decoding): denoising block b runs the
network on block b's L' tokens against the cache, and committing block b runs it once more on the clean block,
writing its keys and values. The result is exact: it is the block-diffusion pass's computation for that block
(``Transformer(clean_BxL=...)``), where x_t of block b sees x_0 of the blocks before it and x_0 of block b sees
x_0 up to its own. The cache is a ring of ``window`` positions: past it, generation continues with the most recent
``window`` positions as context, a sliding window, for any length.

``uncached`` holds the tokens so far and recomputes the whole prefix at every step with one block-diffusion pass
over all L positions: the reference the cached sampler is tested against, and the baseline of its speed-up.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from d3pm_jax import blocks
from d3pm_jax.models.transformer import Transformer


def window_for(model: Transformer, length: int, block_size: int) -> int:
  """The cache's positions: every earlier block up to ``length``, and at most ``model.max_len`` positions of
  context with the block itself (whole blocks; at least one)."""
  context = min(length, model.config.max_len) - block_size
  return max(block_size, context // block_size * block_size)


def cached(model: Transformer, params, batch: int, block_size: int, window: int):
  """``(denoise_fn, commit_fn, cache)`` for ``sampling.block_sample``, the state a KV cache of ``window``
  positions (a multiple of ``block_size``)."""
  if window % block_size:
    raise ValueError(f"the cache window ({window}) must be a whole number of blocks of {block_size}")
  cache = model.init(jax.random.PRNGKey(0), jnp.zeros((batch, window), jnp.int32), decode=True)["cache"]

  def denoise(cache, x_t_BxLb, b):
    logits, _ = model.apply({"params": params, "cache": cache}, x_t_BxLb, decode=True, mutable=["cache"])
    return logits

  def commit(cache, x_BxLb, b):
    _, mutated = model.apply({"params": params, "cache": cache}, x_BxLb, decode=True, commit=True,
                             mutable=["cache"])
    return mutated["cache"]

  return denoise, commit, cache


def uncached(model: Transformer, params, batch: int, length: int, block_size: int, mask_id: int):
  """``(denoise_fn, commit_fn, tokens)`` for ``sampling.block_sample``, the state the ``[B, L]`` tokens sampled
  so far (mask elsewhere); every call runs the block-diffusion pass over all of them."""
  ids = blocks.block_ids(batch, length, block_size)

  def denoise(tokens, x_t_BxLb, b):
    start = (0, b * block_size)
    noisy = jax.lax.dynamic_update_slice(tokens, x_t_BxLb, start)
    logits = model.apply({"params": params}, noisy, clean_BxL=tokens, blocks_BxL=ids, block_size=block_size)
    return jax.lax.dynamic_slice_in_dim(logits, b * block_size, block_size, axis=1)

  def commit(tokens, x_BxLb, b):
    return jax.lax.dynamic_update_slice(tokens, x_BxLb, (0, b * block_size))

  return denoise, commit, jnp.full((batch, length), mask_id, jnp.int32)

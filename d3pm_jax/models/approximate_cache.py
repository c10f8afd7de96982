"""Approximate KV caches for sampling a masked-diffusion denoiser (Fast-dLLM's prefix cache and DualCache).

A bidirectional denoiser's keys and values at every position depend on every token, so no cache of them is exact
while tokens change. Fast-dLLM's observation is that within one semi-autoregressive block they change little: a
refresh pass over the whole sequence stores every layer's keys and values, and the block's following steps run
only a window of positions against them (``Transformer(window_start=...)``):
  prefix  the window is the block and everything after it (the masked suffix): the clean prefix is reused;
  dual    the window is the block alone: the prefix and the masked suffix are reused (DualCache).
The result is approximate; ``SamplerConfig(cache_refresh=1)`` refreshes at every step and is then exact (the
tests check it). Block diffusion (BD3-LM) has its own exact cache, ``models/block_decoding.py``.
"""
from __future__ import annotations

from d3pm_jax import sampling
from d3pm_jax.models.transformer import Transformer


def kv_cache(model: Transformer, params) -> sampling.KVCache:
  """The denoiser's refresh and window passes as ``sampling.sample`` takes them (``kv_cache=``)."""
  if model.config.causal:
    raise ValueError("an approximate KV cache samples the bidirectional denoiser; this model is causal (the AR "
                     "baseline has its own exact cache)")

  def refresh(x_BxL, t_B):
    logits, mutated = model.apply({"params": params}, x_BxL, t_B, write_stale=True, mutable=["cache"])
    return logits, mutated["cache"]

  def window(cache, x_BxW, start, t_B):
    return model.apply({"params": params, "cache": cache}, x_BxW, t_B, window_start=start)

  return sampling.KVCache(refresh=refresh, window=window)

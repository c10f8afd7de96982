"""Block diffusion's structure (BD3-LM, Arriola et al. 2025): which block each position belongs to, and the
diffusion time of each block.

A row of L tokens is cut into blocks of L' (``block_size``) tokens. Masked diffusion runs inside each block, and
the blocks are autoregressive: block b is denoised given the clean tokens of the blocks before it. L' = L is
MD4/MDLM; L' = 1 is an autoregressive model.

Blocks are numbered per row, left to right, from 0. In a stream (no segment ids) block b holds positions
[b L', (b + 1) L'). In a packed row (``segments_BxL``, documents side by side, 0 for padding) the blocks restart at
each document's first token, so a block never spans two documents: a document of 10 tokens at L' = 4 is cut
4 + 4 + 2, and the next document starts a new block. Padding forms blocks of its own, which nothing sees.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def check_block_size(length: int, block_size: int) -> None:
  """``block_size`` must divide ``length``: the blocks tile the row."""
  if block_size < 1 or length % block_size:
    raise ValueError(f"block diffusion needs a block size that divides the sequence length {length}; got "
                     f"block_size={block_size} (valid: the divisors of {length})")


def block_ids(batch: int, length: int, block_size: int, segments_BxL=None):
  """int32 ``[B, L]``: each position's block number within its row, left to right from 0 (module docstring)."""
  check_block_size(length, block_size)
  position_L = jnp.arange(length, dtype=jnp.int32)
  if segments_BxL is None:
    return jnp.broadcast_to(position_L // block_size, (batch, length))
  segments_BxL = jnp.asarray(segments_BxL, jnp.int32)
  new_document = segments_BxL != jnp.pad(segments_BxL, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
  # Each position's offset within its document: its position less that of its document's first token.
  start_BxL = jax.lax.cummax(jnp.where(new_document, position_L, 0), axis=1)
  starts_block = (position_L - start_BxL) % block_size == 0
  return (jnp.cumsum(starts_block, axis=1) - 1).astype(jnp.int32)


def num_slots(length: int, block_size: int, segmented: bool) -> int:
  """How many blocks a row can hold: L / L' in a stream; up to L in a packed row (every document restarts)."""
  return length if segmented else length // block_size


def position_times(times_BxS, block_ids_BxL):
  """Each position's time ``[B, L]``: its block's entry of ``times_BxS``."""
  return jnp.take_along_axis(times_BxS, block_ids_BxL, axis=1)

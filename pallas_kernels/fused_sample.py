"""The output head fused with Gumbel-max sampling: from hidden states ``h_NxD`` and the head ``W_DxV``, one draw
per row from ``softmax(h @ W / temperature)`` over the classes ``[0, num_classes)`` less ``exclude`` (the mask),
and the drawn class's probability under that softmax (what a confidence-ordered sampler ranks by), visiting the
vocabulary in tiles so that ``[N, V]`` is never formed.

The noise is a counter-based hash of ``(seed, row, column)``, not ``jax.random``: every implementation (and a
GPU kernel, which has no ``jax.random``) computes the same Gumbel variable for the same cell, so they must draw
the same ids. Uniforms are refined near 0 as ``d3pm_jax.draws.fine_uniform`` refines them (three 2^-12 levels in
float32, resolving 2^-47, so the Gumbel tail is not cut at 16.6); ``dtype=float64`` resolves 2^-52 in one level.

  ``sample_reference``  the naive ``[N, V]`` computation, the definition.
  ``sample_tiled``      a ``lax.scan`` over vocabulary tiles with a running argmax and log-sum-exp.
  ``sample_pallas``     a Triton-style Pallas kernel (one program per block of rows); ``interpret=True`` anywhere.
  ``sample_pallas_tpu`` a Mosaic TPU kernel (tiles as the grid's inner axis, running draw in VMEM), float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

_NEG = -1e30
LEVELS = 3
_REFINE = 2.0 ** -12


# ---------------------------------------------------------------- the noise

def _mix(x):
  """A 32-bit integer finaliser (lowbias32): every input bit flips about half of the output bits."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _bits(seed, rows, cols, stream: int):
  """uint32 hash of ``(seed, stream, row, column)``; ``rows`` and ``cols`` broadcast."""
  x = _mix(jnp.asarray(seed, jnp.uint32) ^ jnp.uint32((0x9E3779B9 * (stream + 1)) & 0xFFFFFFFF))
  x = _mix(x ^ rows.astype(jnp.uint32))
  return _mix(x ^ (cols.astype(jnp.uint32) * jnp.uint32(0x85EBCA6B)))


def _uniform(seed, rows, cols, stream: int, dtype):
  """Uniform on [0, 1) on a grid of 2^-24 (float32) or 2^-53 (float64, from two hashes)."""
  if jnp.dtype(dtype) == jnp.float64:
    high = (_bits(seed, rows, cols, 2 * stream) >> 5).astype(jnp.float64)
    low = (_bits(seed, rows, cols, 2 * stream + 1) >> 6).astype(jnp.float64)
    return (high * 67108864.0 + low) * 2.0 ** -53
  return (_bits(seed, rows, cols, stream) >> 8).astype(jnp.float32) * 2.0 ** -24


def fine_uniform(seed, rows, cols, dtype=jnp.float32):
  """Uniform on [0, 1) for the cells ``(rows, cols)``: where the coarse draw falls in the lowest 2^-12 it is
  replaced by the next draw scaled into that cell, twice (float32), as ``d3pm_jax.draws.fine_uniform`` does."""
  levels = 1 if jnp.dtype(dtype) == jnp.float64 else LEVELS
  u = _uniform(seed, rows, cols, levels - 1, dtype)
  for level in range(levels - 2, -1, -1):
    coarse = _uniform(seed, rows, cols, level, dtype)
    u = jnp.where(coarse < _REFINE, u * _REFINE, coarse)
  return u


def gumbel(seed, rows, cols, dtype=jnp.float32):
  """Standard Gumbel noise of the cells ``(rows, cols)`` for ``seed``: -log(-log1p(-U)), U ``fine_uniform``."""
  return -jnp.log(-jnp.log1p(-fine_uniform(seed, rows, cols, dtype)))


def _check(h_NxD, w_DxV, num_classes, exclude, temperature):
  if w_DxV.ndim != 2 or w_DxV.shape[0] != h_NxD.shape[1]:
    raise ValueError(f"W must be [D={h_NxD.shape[1]}, V]; got {w_DxV.shape}")
  if not 0 < num_classes <= w_DxV.shape[1]:
    raise ValueError(f"num_classes must lie in [1, V={w_DxV.shape[1]}]; got {num_classes}")
  if exclude is not None and not 0 <= exclude < num_classes:
    raise ValueError(f"exclude must be a class in [0, {num_classes}) or None; got {exclude}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0; got {temperature}")


def _tempered(logits, cols, num_classes, exclude, temperature):
  valid = cols < num_classes
  if exclude is not None:
    valid &= cols != exclude
  return jnp.where(valid, logits / temperature, _NEG), valid


# ---------------------------------------------------------------- the definition

def sample_reference(h_NxD, w_DxV, seed, *, num_classes: int, exclude: int | None = None, temperature: float = 1.0,
                     dtype=jnp.float32):
  """``(ids_N int32, prob_N)``: Gumbel-max over the full ``[N, V]`` tempered logits, and the softmax probability
  of the drawn class."""
  _check(h_NxD, w_DxV, num_classes, exclude, temperature)
  n, v = h_NxD.shape[0], w_DxV.shape[1]
  logits = jnp.dot(h_NxD.astype(dtype), w_DxV.astype(dtype), preferred_element_type=dtype)
  rows, cols = jnp.arange(n)[:, None], jnp.arange(v)[None, :]
  scaled, _ = _tempered(logits, cols, num_classes, exclude, temperature)
  ids = jnp.argmax(scaled + gumbel(seed, rows, cols, dtype), axis=-1).astype(jnp.int32)
  log_p = jax.nn.log_softmax(scaled, axis=-1)
  return ids, jnp.exp(jnp.take_along_axis(log_p, ids[:, None], axis=-1)[:, 0])


# ---------------------------------------------------------------- pure JAX, tiled

def sample_tiled(h_NxD, w_DxV, seed, *, num_classes: int, exclude: int | None = None, temperature: float = 1.0,
                 dtype=jnp.float32, tile_v: int = 2048):
  """``sample_reference``'s draws and probabilities with ``[N, tile_v]`` logits at a time."""
  _check(h_NxD, w_DxV, num_classes, exclude, temperature)
  n, d = h_NxD.shape
  pad = -w_DxV.shape[1] % tile_v
  w = jnp.pad(w_DxV, ((0, 0), (0, pad))) if pad else w_DxV
  tiles = jnp.moveaxis(w.reshape(d, -1, tile_v), 1, 0)
  h = h_NxD.astype(dtype)
  rows = jnp.arange(n)[:, None]

  def step(carry, inputs):
    best, best_id, best_logit, m, s = carry
    index, w_DxT = inputs
    cols = index * tile_v + jnp.arange(tile_v)[None, :]
    scaled, _ = _tempered(jnp.dot(h, w_DxT.astype(dtype), preferred_element_type=dtype), cols, num_classes,
                          exclude, temperature)
    noisy = scaled + gumbel(seed, rows, cols, dtype)
    arg = jnp.argmax(noisy, axis=-1)
    tile_best = jnp.take_along_axis(noisy, arg[:, None], axis=-1)[:, 0]
    better = tile_best > best  # ties keep the earlier column, as argmax over the whole row does
    best_logit = jnp.where(better, jnp.take_along_axis(scaled, arg[:, None], axis=-1)[:, 0], best_logit)
    best_id = jnp.where(better, (index * tile_v + arg).astype(jnp.int32), best_id)
    m_new = jnp.maximum(m, scaled.max(axis=-1))
    s = s * jnp.exp(m - m_new) + jnp.exp(scaled - m_new[:, None]).sum(axis=-1)
    return (jnp.maximum(best, tile_best), best_id, best_logit, m_new, s), None

  init = (jnp.full((n,), -jnp.inf, dtype), jnp.zeros((n,), jnp.int32), jnp.zeros((n,), dtype),
          jnp.full((n,), _NEG, dtype), jnp.zeros((n,), dtype))
  (_, ids, logit, m, s), _ = jax.lax.scan(step, init, (jnp.arange(tiles.shape[0], dtype=jnp.int32), tiles))
  return ids.astype(jnp.int32), jnp.exp(logit - m - jnp.log(s))


# ---------------------------------------------------------------- Pallas (a Triton-style GPU kernel)

def _kernel(seed_ref, h_ref, w_ref, ids_ref, prob_ref, *, num_tiles, tile_v, chunk_d, num_chunks, num_classes,
            exclude, temperature, dtype):
  rows_in_block = h_ref.shape[0]
  rows = (pl.program_id(0) * rows_in_block + jax.lax.broadcasted_iota(jnp.int32, (rows_in_block, tile_v), 0))
  seed = seed_ref[0]

  def tile(j, carry):
    best, best_id, best_logit, m, s = carry
    logits = jnp.zeros((rows_in_block, tile_v), dtype)
    for c in range(num_chunks):
      h = h_ref[:, pl.ds(c * chunk_d, chunk_d)].astype(dtype)
      w = w_ref[pl.ds(c * chunk_d, chunk_d), pl.ds(j * tile_v, tile_v)].astype(dtype)
      logits += jnp.dot(h, w, preferred_element_type=dtype)
    cols = j * tile_v + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    scaled, _ = _tempered(logits, cols, num_classes, exclude, temperature)
    noisy = scaled + gumbel(seed, rows, cols, dtype)
    tile_best = jnp.max(noisy, axis=1)
    # The first column reaching the maximum (argmax's tie rule), found without an argmax primitive.
    arg = jnp.min(jnp.where(noisy == tile_best[:, None], cols, jnp.iinfo(jnp.int32).max), axis=1)
    tile_logit = jnp.sum(jnp.where(cols == arg[:, None], scaled, 0.0), axis=1)
    better = tile_best > best
    m_new = jnp.maximum(m, jnp.max(scaled, axis=1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(scaled - m_new[:, None]), axis=1)
    return (jnp.maximum(best, tile_best), jnp.where(better, arg, best_id), jnp.where(better, tile_logit, best_logit),
            m_new, s)

  init = (jnp.full((rows_in_block,), -jnp.inf, dtype), jnp.zeros((rows_in_block,), jnp.int32),
          jnp.zeros((rows_in_block,), dtype), jnp.full((rows_in_block,), _NEG, dtype),
          jnp.zeros((rows_in_block,), dtype))
  _, ids, logit, m, s = jax.lax.fori_loop(0, num_tiles, tile, init)
  ids_ref[...] = ids
  prob_ref[...] = jnp.exp(logit - m - jnp.log(s)).astype(prob_ref.dtype)


def sample_pallas(h_NxD, w_DxV, seed, *, num_classes: int, exclude: int | None = None, temperature: float = 1.0,
                  dtype=jnp.float32, block_n: int = 32, tile_v: int = 128, chunk_d: int = 64,
                  interpret: bool = False):
  """``sample_reference``'s draws and probabilities from a Pallas kernel; ``block_n``, ``tile_v`` and
  ``chunk_d`` are powers of two (Triton), the inputs zero-padded to whole blocks."""
  _check(h_NxD, w_DxV, num_classes, exclude, temperature)
  for name, value in (("block_n", block_n), ("tile_v", tile_v), ("chunk_d", chunk_d)):
    if value < 1 or value & (value - 1):
      raise ValueError(f"{name} must be a power of two (Triton's blocks are); got {value}")
  n, d = h_NxD.shape
  v = w_DxV.shape[1]
  chunk_d = min(chunk_d, pl.next_power_of_2(d))
  n_pad, v_pad, d_pad = (-(-n // block_n) * block_n, -(-v // tile_v) * tile_v, -(-d // chunk_d) * chunk_d)
  h = jnp.pad(h_NxD, ((0, n_pad - n), (0, d_pad - d)))
  w = jnp.pad(w_DxV, ((0, d_pad - d), (0, v_pad - v)))
  kernel = functools.partial(_kernel, num_tiles=v_pad // tile_v, tile_v=tile_v, chunk_d=chunk_d,
                             num_chunks=d_pad // chunk_d, num_classes=num_classes, exclude=exclude,
                             temperature=float(temperature), dtype=jnp.dtype(dtype))
  ids, prob = pl.pallas_call(
      kernel, out_shape=(jax.ShapeDtypeStruct((n_pad,), jnp.int32), jax.ShapeDtypeStruct((n_pad,), dtype)),
      grid=(n_pad // block_n,),
      in_specs=[pl.BlockSpec((1,), lambda i: (0,)), pl.BlockSpec((block_n, d_pad), lambda i: (i, 0)),
                pl.BlockSpec((d_pad, v_pad), lambda i: (0, 0))],
      out_specs=(pl.BlockSpec((block_n,), lambda i: (i,)), pl.BlockSpec((block_n,), lambda i: (i,))),
      interpret=interpret, compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
  )(jnp.asarray(seed, jnp.uint32).reshape(1), h, w)
  return ids[:n], prob[:n]


def select(impl: str, *, tile_v: int = 2048, interpret: bool = False):
  """The ``draw(h, W, seed, *, num_classes, exclude, temperature, dtype)`` of implementation ``impl`` (``tiled``
  or ``pallas``; the Pallas kernel is Triton's: on another backend it needs ``interpret``)."""
  if impl not in ("tiled", "pallas"):
    raise ValueError(f"unknown fused sampling implementation {impl!r}; valid: ['pallas', 'tiled']")
  if impl == "tiled":
    return functools.partial(sample_tiled, tile_v=tile_v)
  backend = jax.default_backend()
  if backend == "tpu":
    return sample_pallas_tpu
  if backend != "gpu" and not interpret:
    raise ValueError(f"head_impl 'pallas' runs Triton kernels on GPUs and Mosaic kernels on TPUs; this backend is "
                     f"{backend!r}: use 'tiled' (or 'xla'), or set model.kernel_interpret=True to interpret the "
                     f"kernels")
  return functools.partial(sample_pallas, interpret=interpret)


# ---------------------------------------------------------------- Pallas (a Mosaic TPU kernel)

def _tpu_kernel(seed_ref, h_ref, w_ref, ids_ref, prob_ref, best_ref, id_ref, logit_ref, m_ref, s_ref, *, tile_v,
                num_classes, exclude, temperature):
  """Grid (row blocks, vocabulary tiles), the tiles the inner axis: the running Gumbel-max and log-sum-exp in
  VMEM scratch, the draw written at the last tile."""
  i, j, last = pl.program_id(0), pl.program_id(1), pl.num_programs(1) - 1
  block_n = h_ref.shape[0]

  @pl.when(j == 0)
  def _():
    best_ref[...] = jnp.full(best_ref.shape, -jnp.inf, jnp.float32)
    id_ref[...] = jnp.zeros(id_ref.shape, jnp.int32)
    logit_ref[...] = jnp.zeros(logit_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
    s_ref[...] = jnp.zeros(s_ref.shape, jnp.float32)

  logits = jnp.dot(h_ref[...].astype(jnp.float32), w_ref[...].astype(jnp.float32),
                   preferred_element_type=jnp.float32)
  rows = i * block_n + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 0)
  cols = j * tile_v + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  scaled, _ = _tempered(logits, cols, num_classes, exclude, temperature)
  noisy = scaled + gumbel(seed_ref[0], rows, cols, jnp.float32)
  tile_best = jnp.max(noisy, axis=1, keepdims=True)
  arg = jnp.min(jnp.where(noisy == tile_best, cols, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
  tile_logit = jnp.sum(jnp.where(cols == arg, scaled, 0.0), axis=1, keepdims=True)
  better = tile_best > best_ref[...]
  id_ref[...] = jnp.where(better, arg, id_ref[...])
  logit_ref[...] = jnp.where(better, tile_logit, logit_ref[...])
  best_ref[...] = jnp.maximum(best_ref[...], tile_best)
  m = m_ref[...]
  m_new = jnp.maximum(m, jnp.max(scaled, axis=1, keepdims=True))
  s_ref[...] = s_ref[...] * jnp.exp(m - m_new) + jnp.sum(jnp.exp(scaled - m_new), axis=1, keepdims=True)
  m_ref[...] = m_new

  @pl.when(j == last)
  def _():
    ids_ref[...] = id_ref[...]
    prob_ref[...] = jnp.exp(logit_ref[...] - m_ref[...] - jnp.log(s_ref[...]))


def sample_pallas_tpu(h_NxD, w_DxV, seed, *, num_classes: int, exclude: int | None = None,
                      temperature: float = 1.0, dtype=jnp.float32, block_n: int = 256, tile_v: int = 512):
  """``sample_reference``'s draws and probabilities from a Mosaic TPU kernel (float32 only; ``block_n`` a
  multiple of 8, ``tile_v`` of 128). Under ``pltpu.force_tpu_interpret_mode()`` it runs on any backend."""
  _check(h_NxD, w_DxV, num_classes, exclude, temperature)
  if jnp.dtype(dtype) != jnp.float32:
    raise ValueError(f"the TPU sampling kernel draws in float32 (TPUs have no float64); got {jnp.dtype(dtype)}")
  if block_n % 8 or tile_v % 128:
    raise ValueError(f"block_n must be a multiple of 8 and tile_v of 128 (TPU sublanes and lanes); got {block_n}, "
                     f"{tile_v}")
  n, d = h_NxD.shape
  v = w_DxV.shape[1]
  n_pad, v_pad = -(-n // block_n) * block_n, -(-v // tile_v) * tile_v
  h = jnp.pad(h_NxD, ((0, n_pad - n), (0, 0)))
  w = jnp.pad(w_DxV, ((0, 0), (0, v_pad - v)))
  column = pl.BlockSpec((block_n, 1), lambda i, j: (i, 0))
  kernel = functools.partial(_tpu_kernel, tile_v=tile_v, num_classes=num_classes, exclude=exclude,
                             temperature=float(temperature))
  ids, prob = pl.pallas_call(
      kernel, grid=(n_pad // block_n, v_pad // tile_v),
      in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), pl.BlockSpec((block_n, d), lambda i, j: (i, 0)),
                pl.BlockSpec((d, tile_v), lambda i, j: (0, j))],
      out_specs=(column, column),
      out_shape=(jax.ShapeDtypeStruct((n_pad, 1), jnp.int32), jax.ShapeDtypeStruct((n_pad, 1), jnp.float32)),
      scratch_shapes=[pltpu.VMEM((block_n, 1), jnp.float32), pltpu.VMEM((block_n, 1), jnp.int32)]
      + [pltpu.VMEM((block_n, 1), jnp.float32)] * 3,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
  )(jnp.asarray(seed, jnp.uint32).reshape(1), h, w)
  return ids[:n, 0], prob[:n, 0]

"""The output head fused with Gumbel-max sampling: from hidden states ``h_NxD`` and the head ``W_DxV``, one draw
per row from ``softmax(h @ W / temperature)`` over the classes ``[0, num_classes)`` less ``exclude`` (the mask),
and the drawn class's probability under the model's own, untempered ``softmax(h @ W)`` over the same classes
(what a confidence-ordered sampler ranks by: the knobs shape the draw, not the ranking), visiting the vocabulary
in tiles so that ``[N, V]`` is never formed.

The noise is a counter-based hash of ``(seed, row, column)``, not ``jax.random``: every implementation (and a
GPU kernel, which has no ``jax.random``) computes the same Gumbel variable for the same cell, so they must draw
the same ids. Uniforms are refined near 0 as ``d3pm_jax.draws.fine_uniform`` refines them (three 2^-12 levels in
float32, resolving 2^-47, so the Gumbel tail is not cut at 16.6); ``dtype=float64`` resolves 2^-52 in one level.

  ``sample_reference``  the naive ``[N, V]`` computation, the definition.
  ``sample_tiled``      a ``lax.scan`` over vocabulary tiles with a running argmax and log-sum-exp.
  ``sample_pallas``     a Triton-style Pallas kernel (a program per block of rows and vocabulary split, the width
                        visited in chunks); ``interpret=True`` anywhere.
  ``sample_pallas_tpu`` a Mosaic TPU kernel (tiles as the grid's inner axis, running draw in VMEM), float32.

Each returns partial draws (per split: the best noisy tempered logit, its column, its untempered logit, and the
running max and sum of the untempered logits) that ``combine_draws`` reduces; under a mesh the same reduction runs
across the vocabulary shards, and the noise hashes each row's global index, so a sharded draw equals the
single-device one for the same seed.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from pallas_kernels import fused_ce, fused_ce_mosaic, fused_ce_triton
from pallas_kernels.common import NEG, by_backend, precision_of, valid_columns, vmapped, xla_precision

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
    high = _signed(_bits(seed, rows, cols, 2 * stream) >> 5).astype(jnp.float64)
    low = _signed(_bits(seed, rows, cols, 2 * stream + 1) >> 6).astype(jnp.float64)
    return (high * 67108864.0 + low) * 2.0 ** -53
  return _signed(_bits(seed, rows, cols, stream) >> 8).astype(jnp.float32) * 2.0 ** -24


def _signed(bits):
  """uint32 values below 2^31 as int32, by a bitcast: Mosaic has no unsigned-to-float conversion, and a signed
  one gives the same floats."""
  return jax.lax.bitcast_convert_type(bits, jnp.int32)


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


def _tempered(logits, local, offset, v, num_classes, exclude, temperature):
  """``(scaled, raw, valid, cols)``: the logits of the columns ``local`` (of a shard starting at ``offset``)
  divided by the temperature (``scaled``, what the draw uses) and as they are (``raw``, what the probability
  uses) where they are classes (``common.valid_columns``), NEG elsewhere."""
  valid, cols = valid_columns(local, offset, v, num_classes, exclude)
  return jnp.where(valid, logits / temperature, NEG), jnp.where(valid, logits, NEG), valid, cols


# ---------------------------------------------------------------- the definition

def sample_reference(h_NxD, w_DxV, seed, *, num_classes: int, exclude: int | None = None, temperature: float = 1.0,
                     dtype=jnp.float32):
  """``(ids_N int32, prob_N)``: Gumbel-max over the full ``[N, V]`` tempered logits, and the drawn class's
  probability under the untempered softmax over the classes."""
  _check(h_NxD, w_DxV, num_classes, exclude, temperature)
  n, v = h_NxD.shape[0], w_DxV.shape[1]
  logits = jnp.dot(h_NxD.astype(dtype), w_DxV.astype(dtype), precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=dtype)
  rows = jnp.arange(n)[:, None]
  scaled, raw, _, cols = _tempered(logits, jnp.arange(v)[None, :], 0, v, num_classes, exclude, temperature)
  ids = jnp.argmax(scaled + gumbel(seed, rows, cols, dtype), axis=-1).astype(jnp.int32)
  log_p = jax.nn.log_softmax(raw, axis=-1)
  return ids, jnp.exp(jnp.take_along_axis(log_p, ids[:, None], axis=-1)[:, 0])




# ---------------------------------------------------------------- partial draws, combined across splits and shards

def _dot_dtype(dot_dtype, dtype):
  """The products' input dtype (default: the draw's own, exact) and their stated precision."""
  dot = jnp.dtype(dtype if dot_dtype is None else dot_dtype)
  if dot == jnp.float64:
    return dot, jax.lax.Precision.HIGHEST
  return dot, precision_of(dot)


def combine_draws(best_SxN, id_SxN, logit_SxN, m_SxN, s_SxN, vocab_axis=None):
  """``(ids_N, prob_N)`` from per-split partial draws (splits on axis 0, in column order): the largest noisy
  logit wins, ties to the lowest column (as an argmax over the whole row); across the ``vocab_axis`` shards of a
  mesh too. The probability is the winner's untempered logit against the combined untempered log-sum-exp."""
  k = jnp.argmax(best_SxN, axis=0)[None]
  best_N, id_N, logit_N = (jnp.take_along_axis(x, k, axis=0)[0] for x in (best_SxN, id_SxN, logit_SxN))
  m_N = jnp.max(m_SxN, axis=0)
  if vocab_axis is not None:
    m_N = jax.lax.pmax(m_N, vocab_axis)
  s_N = jnp.sum(s_SxN * jnp.exp(m_SxN - m_N), axis=0)
  if vocab_axis is not None:
    top_N = jax.lax.pmax(best_N, vocab_axis)
    winner_N = jax.lax.pmin(jnp.where(best_N == top_N, id_N, jnp.iinfo(jnp.int32).max), vocab_axis)
    mine_N = id_N == winner_N  # one shard holds the winning column
    logit_N, s_N = jax.lax.psum((jnp.where(mine_N, logit_N, 0), s_N), vocab_axis)
    id_N = winner_N
  return id_N.astype(jnp.int32), jnp.exp(logit_N - m_N - jnp.log(s_N))


def _mesh_draw(partials, h_NxD, w_DxV, seed):
  """``combine_draws`` of ``partials(h, W, seed, row_offset, col_offset)`` on one device, or per shard of the
  mesh in scope: rows over (data, fsdp) (the noise hashes each row's global index), the vocabulary over tensor.
  Under ``common.vmapped_axes`` the rows are one replica's block of a vmap laid over those axes, which shard_map
  leaves to the vmap: the global index counts the replicas before this device's too."""
  mesh, rows, vocab = fused_ce.mesh_layout(h_NxD.shape[0], w_DxV.shape[1])
  seed = jnp.asarray(seed, jnp.uint32)
  if mesh is None:
    return combine_draws(*partials(h_NxD, w_DxV, seed, 0, 0))
  row_spec = rows or None
  replicas = tuple(a for a in vmapped() if mesh.shape.get(a, 1) > 1)

  def local(h, w, seed):
    shards = math.prod(mesh.shape[a] for a in rows)
    block = jax.lax.axis_index(replicas) * shards if replicas else 0  # one replica per device of the vmap's axes
    row_offset = (block + (jax.lax.axis_index(rows) if rows else 0)) * h.shape[0]
    return combine_draws(*partials(h, w, seed, row_offset, fused_ce.vocab_offset(vocab, w.shape[1])), vocab)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(row_spec, None), P(None, vocab), P()),
                       out_specs=(P(row_spec), P(row_spec)), check_vma=False)(h_NxD, w_DxV, seed)


def _cost(rows: int, d: int, v: int, block_n: int, tiles: int, splits: int, itemsize: int, out_itemsize: int,
          h_per_tile: bool) -> pl.CostEstimate:
  """What one sampling kernel does on its padded ``rows`` x ``v`` logits over width ``d``, in ``tiles`` tiles and
  ``splits`` vocabulary splits: the logits' product; per logit the Gumbel noise's log1p and log and the
  untempered sum's exp, and a rescale per row and tile; the bytes moved: each row block's W columns once, its
  ``h`` once or (``h_per_tile``: the Triton kernel's width loop reloads it) again for every tile, and five
  partial draws per split out."""
  loads = ((tiles if h_per_tile else 1) * rows * d + rows // block_n * d * v) * itemsize
  return pl.CostEstimate(flops=2 * rows * d * v, transcendentals=3 * rows * v + rows * tiles,
                         bytes_accessed=loads + 5 * splits * rows * out_itemsize)


# ---------------------------------------------------------------- pure JAX, tiled

def _tiled_partials(h_NxD, w_DxV, seed, row_offset, col_offset, *, num_classes, exclude, temperature, dtype,
                    dot_dtype, tile_v):
  n, d = h_NxD.shape
  v = w_DxV.shape[1]
  dot, precision = _dot_dtype(dot_dtype, dtype)
  pad = -v % tile_v
  w = w_DxV.astype(dot)
  w = jnp.pad(w, ((0, 0), (0, pad))) if pad else w
  tiles = jnp.moveaxis(w.reshape(d, -1, tile_v), 1, 0)
  h = h_NxD.astype(dot)
  rows = row_offset + jnp.arange(n)[:, None]
  acc = jnp.float64 if dot == jnp.float64 else jnp.float32

  def step(carry, inputs):
    best, best_id, best_logit, m, s = carry
    index, w_DxT = inputs
    logits = jnp.dot(h, w_DxT, precision=precision, preferred_element_type=acc).astype(dtype)
    scaled, raw, valid, cols = _tempered(logits, index * tile_v + jnp.arange(tile_v)[None, :], col_offset, v,
                                         num_classes, exclude, temperature)
    noisy = scaled + gumbel(seed, rows, cols, dtype)
    arg = jnp.argmax(noisy, axis=-1)
    tile_best = jnp.take_along_axis(noisy, arg[:, None], axis=-1)[:, 0]
    better = tile_best > best  # ties keep the earlier column, as argmax over the whole row does
    best_logit = jnp.where(better, jnp.take_along_axis(raw, arg[:, None], axis=-1)[:, 0], best_logit)
    best_id = jnp.where(better, (col_offset + index * tile_v + arg).astype(jnp.int32), best_id)
    m_new = jnp.maximum(m, raw.max(axis=-1))
    s = s * jnp.exp(m - m_new) + jnp.where(valid, jnp.exp(raw - m_new[:, None]), 0).sum(axis=-1)
    return (jnp.maximum(best, tile_best), best_id, best_logit, m_new, s), None

  init = (jnp.full((n,), -jnp.inf, dtype), jnp.zeros((n,), jnp.int32), jnp.zeros((n,), dtype),
          jnp.full((n,), NEG, dtype), jnp.zeros((n,), dtype))
  out, _ = jax.lax.scan(step, init, (jnp.arange(tiles.shape[0], dtype=jnp.int32), tiles))
  return tuple(x[None] for x in out)


def sample_tiled(h_NxD, w_DxV, seed, *, num_classes: int, exclude: int | None = None, temperature: float = 1.0,
                 dtype=jnp.float32, dot_dtype=None, tile_v: int = 2048):
  """``sample_reference``'s draws and probabilities with ``[N, tile_v]`` logits at a time (products in
  ``dot_dtype``, default ``dtype``); per shard under a mesh."""
  _check(h_NxD, w_DxV, num_classes, exclude, temperature)
  partials = functools.partial(_tiled_partials, num_classes=num_classes, exclude=exclude,
                               temperature=float(temperature), dtype=jnp.dtype(dtype), dot_dtype=dot_dtype,
                               tile_v=int(tile_v))
  return _mesh_draw(partials, h_NxD, w_DxV, seed)


# ---------------------------------------------------------------- Pallas (a Triton-style GPU kernel)

def _kernel(seed_ref, off_ref, h_ref, w_ref, best_ref, id_ref, logit_ref, m_ref, s_ref, *, tiles_per_split, num_tiles,
            tile_v, v, chunk_d, num_chunks, num_classes, exclude, temperature, dtype, precision, acc_dtype):
  """One block of rows and one vocabulary split: the running Gumbel-max (noisy tempered value, column,
  untempered logit) and untempered log-sum-exp over the split's tiles, the width visited in chunks inside each
  tile."""
  rows_in_block = h_ref.shape[0]
  split = pl.program_id(1)
  rows = off_ref[0] + pl.program_id(0) * rows_in_block + jax.lax.broadcasted_iota(
      jnp.int32, (rows_in_block, tile_v), 0)
  seed = seed_ref[0]

  def tile(k, carry):
    best, best_id, best_logit, m, s = carry
    j = split * tiles_per_split + k
    logits = fused_ce_triton._logits(h_ref, w_ref, j, tile_v=tile_v, chunk_d=chunk_d, num_chunks=num_chunks,
                                     precision=precision, acc_dtype=acc_dtype).astype(dtype)
    scaled, raw, valid, cols = _tempered(logits, j * tile_v + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1),
                                         off_ref[1], v, num_classes, exclude, temperature)
    noisy = scaled + gumbel(seed, rows, cols, dtype)
    tile_best = jnp.max(noisy, axis=1)
    # The first column reaching the maximum (argmax's tie rule), found without an argmax primitive.
    arg = jnp.min(jnp.where(noisy == tile_best[:, None], cols, jnp.iinfo(jnp.int32).max), axis=1)
    tile_logit = jnp.sum(jnp.where(cols == arg[:, None], raw, 0.0), axis=1)
    better = tile_best > best
    m_new = jnp.maximum(m, jnp.max(raw, axis=1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.where(valid, jnp.exp(raw - m_new[:, None]), 0.0), axis=1)
    return (jnp.maximum(best, tile_best), jnp.where(better, arg, best_id), jnp.where(better, tile_logit, best_logit),
            m_new, s)

  init = (jnp.full((rows_in_block,), -jnp.inf, dtype), jnp.zeros((rows_in_block,), jnp.int32),
          jnp.zeros((rows_in_block,), dtype), jnp.full((rows_in_block,), NEG, dtype),
          jnp.zeros((rows_in_block,), dtype))
  best, ids, logit, m, s = jax.lax.fori_loop(
      0, fused_ce_triton.split_length(split, tiles_per_split, num_tiles), tile, init)
  best_ref[...] = best
  id_ref[...] = ids
  logit_ref[...] = logit
  m_ref[...] = m
  s_ref[...] = s


def _pallas_partials(h_NxD, w_DxV, seed, row_offset, col_offset, *, num_classes, exclude, temperature, dtype,
                     dot_dtype, interpret, blocks):
  n, d = h_NxD.shape
  v = w_DxV.shape[1]
  dot, precision = _dot_dtype(dot_dtype, dtype)
  # 8 warps by default: the hash and the running draw hold more per thread than the loss kernel (4 warps spill).
  plan = fused_ce_triton.TritonPlan(n=n, d=d, v=v, num_classes=num_classes, exclude=exclude,
                                    dot_dtype="float32" if dot == jnp.float64 else dot.name, interpret=interpret,
                                    **{"num_warps": 8, **blocks})
  bn, splits = plan.block_n, plan.num_splits
  h, w = fused_ce_triton.prepare(plan, h_NxD, w_DxV, dot)  # float64 draws multiply in float64
  args = plan.kernel_args()
  kernel = functools.partial(_kernel, tiles_per_split=plan.tiles_per_split, num_tiles=plan.num_tiles,
                             tile_v=args["tile_v"], v=v,
                             chunk_d=args["chunk_d"], num_chunks=args["num_chunks"], num_classes=num_classes,
                             exclude=exclude, temperature=temperature, dtype=dtype, precision=precision,
                             acc_dtype=jnp.float64 if dot == jnp.float64 else jnp.float32)
  partial = pl.BlockSpec((None, bn), lambda i, s: (s, i))
  shapes = [jax.ShapeDtypeStruct((splits, plan.n_pad), t) for t in (dtype, jnp.int32, dtype, dtype, dtype)]
  offsets = jnp.stack([jnp.asarray(row_offset, jnp.int32), jnp.asarray(col_offset, jnp.int32)])
  out = pl.pallas_call(
      kernel, out_shape=tuple(shapes), grid=(plan.n_pad // bn, splits),
      in_specs=[pl.BlockSpec((1,), lambda i, s: (0,)), pl.BlockSpec((2,), lambda i, s: (0,)),
                pl.BlockSpec((bn, plan.d_pad), lambda i, s: (i, 0)),
                pl.BlockSpec((plan.d_pad, plan.v_pad), lambda i, s: (0, 0))],
      out_specs=(partial,) * 5, interpret=interpret, compiler_params=plan.params(),
      cost_estimate=_cost(plan.n_pad, plan.d_pad, plan.v_pad, bn, plan.num_tiles, splits, h.dtype.itemsize,
                          jnp.dtype(dtype).itemsize, h_per_tile=True),
  )(seed.reshape(1), offsets, h, w)
  return tuple(x[:, :n] for x in out)


def sample_pallas(h_NxD, w_DxV, seed, *, num_classes: int, exclude: int | None = None, temperature: float = 1.0,
                  dtype=jnp.float32, dot_dtype=None, interpret: bool = False, **blocks):
  """``sample_reference``'s draws and probabilities from a Triton-style kernel (``blocks``: ``block_n``,
  ``tile_v``, ``chunk_d``, ``splits``, ``num_warps``, ``num_stages`` of ``fused_ce_triton.TritonPlan``); products
  in ``dot_dtype`` (default ``dtype``); per shard under a mesh."""
  _check(h_NxD, w_DxV, num_classes, exclude, temperature)
  partials = functools.partial(_pallas_partials, num_classes=num_classes, exclude=exclude,
                               temperature=float(temperature), dtype=jnp.dtype(dtype), dot_dtype=dot_dtype,
                               interpret=interpret, blocks=blocks)
  return _mesh_draw(partials, h_NxD, w_DxV, seed)


def select(impl: str, *, tile_v: int = 2048, interpret: bool = False, dot_dtype=None):
  """The ``draw(h, W, seed, *, num_classes, exclude, temperature, dtype)`` of implementation ``impl`` (``tiled``
  or ``pallas``; the Pallas kernel is Triton's on GPUs and Mosaic's on TPUs: on another backend it needs
  ``interpret``), its products in ``dot_dtype`` (default: the draw's dtype)."""
  return by_backend("fused sampling", impl, ("pallas", "tiled"),
                    tiled=functools.partial(sample_tiled, tile_v=tile_v, dot_dtype=dot_dtype),
                    triton=functools.partial(sample_pallas, interpret=interpret, dot_dtype=dot_dtype),
                    mosaic=functools.partial(sample_pallas_tpu, dot_dtype=dot_dtype), interpret=interpret)


# ---------------------------------------------------------------- Pallas (a Mosaic TPU kernel)

def _tpu_kernel(seed_ref, off_ref, h_ref, w_ref, best_out, id_out, logit_out, m_out, s_out, best_ref, id_ref,
                logit_ref, m_ref, s_ref, *, tile_v, v, num_classes, exclude, temperature, precision):
  """Grid (row blocks, vocabulary tiles), the tiles the inner axis: the running Gumbel-max (tempered) and
  untempered log-sum-exp in VMEM scratch, written out at the last tile."""
  i, j, last = pl.program_id(0), pl.program_id(1), pl.num_programs(1) - 1
  block_n = h_ref.shape[0]

  @pl.when(j == 0)
  def _():
    best_ref[...] = jnp.full(best_ref.shape, -jnp.inf, jnp.float32)
    id_ref[...] = jnp.zeros(id_ref.shape, jnp.int32)
    logit_ref[...] = jnp.zeros(logit_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, NEG, jnp.float32)
    s_ref[...] = jnp.zeros(s_ref.shape, jnp.float32)

  logits = jnp.dot(h_ref[...], w_ref[...], precision=precision, preferred_element_type=jnp.float32)
  rows = off_ref[0] + i * block_n + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 0)
  scaled, raw, valid, cols = _tempered(logits, j * tile_v + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1),
                                       off_ref[1], v, num_classes, exclude, temperature)
  noisy = scaled + gumbel(seed_ref[0], rows, cols, jnp.float32)
  tile_best = jnp.max(noisy, axis=1, keepdims=True)
  arg = jnp.min(jnp.where(noisy == tile_best, cols, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
  tile_logit = jnp.sum(jnp.where(cols == arg, raw, 0.0), axis=1, keepdims=True)
  better = tile_best > best_ref[...]
  id_ref[...] = jnp.where(better, arg, id_ref[...])
  logit_ref[...] = jnp.where(better, tile_logit, logit_ref[...])
  best_ref[...] = jnp.maximum(best_ref[...], tile_best)
  m = m_ref[...]
  m_new = jnp.maximum(m, jnp.max(raw, axis=1, keepdims=True))
  s_ref[...] = s_ref[...] * jnp.exp(m - m_new) + jnp.sum(jnp.where(valid, jnp.exp(raw - m_new), 0.0), axis=1,
                                                         keepdims=True)
  m_ref[...] = m_new

  @pl.when(j == last)
  def _():
    best_out[...] = best_ref[...]
    id_out[...] = id_ref[...]
    logit_out[...] = logit_ref[...]
    m_out[...] = m_ref[...]
    s_out[...] = s_ref[...]


def _tpu_partials(h_NxD, w_DxV, seed, row_offset, col_offset, *, num_classes, exclude, temperature, dot_dtype,
                  block_n, tile_v):
  n, d = h_NxD.shape
  v = w_DxV.shape[1]
  dot = jnp.dtype(jnp.float32 if dot_dtype is None else dot_dtype)
  n_pad, v_pad = -(-n // block_n) * block_n, -(-v // tile_v) * tile_v
  h = jnp.pad(h_NxD.astype(dot), ((0, n_pad - n), (0, 0)))
  w = jnp.pad(w_DxV.astype(dot), ((0, 0), (0, v_pad - v)))
  column = pl.BlockSpec((block_n, 1), lambda i, j: (i, 0))
  kernel = functools.partial(_tpu_kernel, tile_v=tile_v, v=v, num_classes=num_classes, exclude=exclude,
                             temperature=temperature,
                             precision=xla_precision(dot))
  types = (jnp.float32, jnp.int32, jnp.float32, jnp.float32, jnp.float32)
  vmem = (2 * (block_n * d + d * tile_v) * dot.itemsize + 6 * block_n * tile_v * 4
          + 3 * 5 * block_n * 128 * 4 + (1 << 20))
  out = pl.pallas_call(
      kernel, grid=(n_pad // block_n, v_pad // tile_v),
      in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), pl.BlockSpec(memory_space=pltpu.SMEM),
                pl.BlockSpec((block_n, d), lambda i, j: (i, 0)), pl.BlockSpec((d, tile_v), lambda i, j: (0, j))],
      out_specs=(column,) * 5, out_shape=tuple(jax.ShapeDtypeStruct((n_pad, 1), t) for t in types),
      scratch_shapes=[pltpu.VMEM((block_n, 1), t) for t in types],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                           vmem_limit_bytes=-(-vmem // (1 << 20)) << 20),
      cost_estimate=_cost(n_pad, d, v_pad, block_n, v_pad // tile_v, 1, dot.itemsize, 4, h_per_tile=False),
  )(seed.reshape(1), jnp.stack([jnp.asarray(row_offset, jnp.int32), jnp.asarray(col_offset, jnp.int32)]), h, w)
  return tuple(x[:n, 0][None] for x in out)


def sample_pallas_tpu(h_NxD, w_DxV, seed, *, num_classes: int, exclude: int | None = None,
                      temperature: float = 1.0, dtype=jnp.float32, dot_dtype=None, block_n: int = 0,
                      tile_v: int = 0):
  """``sample_reference``'s draws and probabilities from a Mosaic TPU kernel (float32 draws; ``block_n`` a
  multiple of 8, ``tile_v`` of 128, 0 picking the largest that fit the default scoped VMEM, as the fused loss's
  blocks do); per shard under a mesh. Under ``pltpu.force_tpu_interpret_mode()`` it runs on any backend."""
  _check(h_NxD, w_DxV, num_classes, exclude, temperature)
  if jnp.dtype(dtype) != jnp.float32:
    raise ValueError(f"the TPU sampling kernel draws in float32 (TPUs have no float64); got {jnp.dtype(dtype)}")
  if block_n % 8 or tile_v % 128:
    raise ValueError(f"block_n must be a multiple of 8 and tile_v of 128 (TPU sublanes and lanes); got {block_n}, "
                     f"{tile_v}")
  dot = jnp.dtype(jnp.float32 if dot_dtype is None else dot_dtype)
  chosen = fused_ce_mosaic.blocks_for(h_NxD.shape[1], dot.itemsize)
  partials = functools.partial(_tpu_partials, num_classes=num_classes, exclude=exclude,
                               temperature=float(temperature), dot_dtype=dot, block_n=block_n or chosen[0],
                               tile_v=tile_v or chosen[1])
  return _mesh_draw(partials, h_NxD, w_DxV, seed)

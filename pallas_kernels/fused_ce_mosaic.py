"""The fused head's weighted cross-entropy as Mosaic TPU kernels (``pltpu.force_tpu_interpret_mode()`` runs them
anywhere).

Grids whose inner axis is the reduction, accumulators in VMEM scratch: the forward and ``dh`` over (row blocks,
vocabulary tiles), ``dW`` over (vocabulary tiles, row blocks). Products take ``dot_dtype`` inputs (bfloat16 on the
fast path) with float32 accumulation and a stated precision. Each call states its VMEM need
(``vmem_limit_bytes``), computed from its blocks: double-buffered inputs and outputs, scratch, and the
``[block_n, tile_v]`` float32 temporaries of one tile. ``blocks_for`` picks the largest blocks whose need fits
the 16 MiB that v4 and v5e give a kernel by default, so D = 2048 (``configs/diffusion_1b.py``) fits.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import NEG, HeadProblem, valid_columns, xla_precision

DEFAULT_SCOPED_VMEM = 16 << 20  # v4 and v5e; v5p and v6e give 32 MiB
_TEMPORARIES = 6  # [block_n, tile_v] float32 arrays live at once in a tile's body (logits, exp, masks, dlogits)


def vmem_bytes(block_n: int, tile_v: int, d: int, itemsize: int) -> int:
  """The most VMEM any of the three kernels needs with these blocks (the ``dh`` kernel: its accumulator and
  output block are ``[block_n, D]`` float32)."""
  inputs = 2 * (block_n * d + d * tile_v) * itemsize + 2 * 3 * block_n * 128 * 4  # h, W tile, row columns
  temporaries = _TEMPORARIES * block_n * tile_v * 4
  dh = 2 * block_n * d * 4 + block_n * d * 4  # output block (double-buffered) and accumulator
  dw = 2 * d * tile_v * 4 + d * tile_v * 4
  return inputs + temporaries + max(dh, dw)


def blocks_for(d: int, itemsize: int, budget: int = DEFAULT_SCOPED_VMEM) -> tuple[int, int]:
  """The largest ``(block_n, tile_v)`` (multiples of 8 and 128) whose VMEM need, with 1 MiB to spare, fits
  ``budget``."""
  for block_n, tile_v in ((256, 512), (256, 256), (128, 256), (128, 128), (64, 128), (32, 128), (8, 128)):
    if vmem_bytes(block_n, tile_v, d, itemsize) + (1 << 20) <= budget:
      return block_n, tile_v
  raise ValueError(f"no TPU block shape fits D={d} in {budget >> 20} MiB of VMEM; use model.head_impl='tiled'")


def _fwd_kernel(off_ref, h_ref, w_ref, t_ref, wt_ref, m_out, s_out, tgt_out, m_ref, s_ref, tgt_ref, *, tile_v, v,
                num_classes, exclude, precision):
  """Running max, sum of exp(logit - max) and target logit over this shard's columns in VMEM scratch, written at
  the last tile. Row blocks of weight 0 compute nothing (and write zeros)."""
  j, last = pl.program_id(1), pl.num_programs(1) - 1

  @pl.when(j == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, NEG, jnp.float32)
    s_ref[...] = jnp.zeros(s_ref.shape, jnp.float32)
    tgt_ref[...] = jnp.zeros(tgt_ref.shape, jnp.float32)

  active = jnp.max(jnp.abs(wt_ref[...])) > 0

  @pl.when(active)
  def _():
    logits = jnp.dot(h_ref[...], w_ref[...], precision=precision, preferred_element_type=jnp.float32)
    logits, valid, cols = _masked(logits, j, tile_v, v, off_ref[0], num_classes, exclude)
    m = m_ref[...]
    m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
    s_ref[...] = s_ref[...] * jnp.exp(m - m_new) + jnp.sum(jnp.where(valid, jnp.exp(logits - m_new), 0.0), axis=1,
                                                           keepdims=True)
    m_ref[...] = m_new
    tgt_ref[...] += jnp.sum(jnp.where(cols == t_ref[...], logits, 0.0), axis=1, keepdims=True)

  @pl.when(j == last)
  def _():
    m_out[...] = jnp.where(active, m_ref[...], 0.0)
    s_out[...] = jnp.where(active, s_ref[...], 0.0)
    tgt_out[...] = jnp.where(active, tgt_ref[...], 0.0)


def _masked(logits, j, tile_v, v, offset, num_classes, exclude):
  local = j * tile_v + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  valid, cols = valid_columns(local, offset, v, num_classes, exclude)
  return jnp.where(valid, logits, NEG), valid, cols


def _dlogits(off_ref, h_ref, w_ref, t_ref, lse_ref, coef_ref, j, tile_v, v, num_classes, exclude, precision):
  logits = jnp.dot(h_ref[...], w_ref[...], precision=precision, preferred_element_type=jnp.float32)
  logits, valid, cols = _masked(logits, j, tile_v, v, off_ref[0], num_classes, exclude)
  p = jnp.where(valid, jnp.exp(logits - lse_ref[...]), 0.0)
  coef = coef_ref[...]
  return jnp.where(coef != 0, coef * (p - (cols == t_ref[...]).astype(jnp.float32)), 0.0)


def _accumulate(step, acc_ref, out_ref, coef_ref, partial):
  """One program of a grid whose axis 1 is a reduction: ``acc_ref`` starts at zero at the first step, adds
  ``partial()`` where the row block has a nonzero coefficient (masked rows cost nothing), and is written to
  ``out_ref`` at the last step."""
  @pl.when(step == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(jnp.max(jnp.abs(coef_ref[...])) > 0)
  def _():
    acc_ref[...] += partial()

  @pl.when(step == pl.num_programs(1) - 1)
  def _():
    out_ref[...] = acc_ref[...]


def _dh_kernel(off_ref, h_ref, w_ref, t_ref, lse_ref, coef_ref, dh_ref, acc_ref, *, tile_v, v, num_classes, exclude,
               precision):
  """Grid (row blocks, vocabulary tiles), the tiles the inner reduction: dh = dlogits W^T."""
  j = pl.program_id(1)

  def partial():
    dlogits = _dlogits(off_ref, h_ref, w_ref, t_ref, lse_ref, coef_ref, j, tile_v, v, num_classes, exclude,
                       precision)
    return jax.lax.dot_general(dlogits.astype(w_ref.dtype), w_ref[...], (((1,), (1,)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)

  _accumulate(j, acc_ref, dh_ref, coef_ref, partial)


def _dw_kernel(off_ref, h_ref, w_ref, t_ref, lse_ref, coef_ref, dw_ref, acc_ref, *, tile_v, v, num_classes, exclude,
               precision):
  """Grid (vocabulary tiles, row blocks), the row blocks the inner reduction: dW = h^T dlogits."""
  j, i = pl.program_id(0), pl.program_id(1)

  def partial():
    dlogits = _dlogits(off_ref, h_ref, w_ref, t_ref, lse_ref, coef_ref, j, tile_v, v, num_classes, exclude,
                       precision)
    return jax.lax.dot_general(h_ref[...], dlogits.astype(h_ref.dtype), (((0,), (0,)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)

  _accumulate(i, acc_ref, dw_ref, coef_ref, partial)


@dataclasses.dataclass(frozen=True)
class MosaicPlan(HeadProblem):
  block_n: int = 0  # 0: blocks_for(d)
  tile_v: int = 0

  def __post_init__(self):
    xla_precision(self.dot_dtype)  # validates
    if self.block_n % 8 or self.tile_v % 128:
      raise ValueError(f"block_n must be a multiple of 8 and tile_v of 128 (TPU sublanes and lanes; 0 chooses by "
                       f"VMEM); got {self.block_n}, {self.tile_v}")

  @property
  def blocks(self) -> tuple[int, int]:
    chosen = blocks_for(self.d, jnp.dtype(self.dot_dtype).itemsize)
    return self.block_n or chosen[0], self.tile_v or chosen[1]

  @property
  def n_pad(self):
    return -(-self.n // self.blocks[0]) * self.blocks[0]

  @property
  def v_pad(self):
    return -(-self.v // self.blocks[1]) * self.blocks[1]

  @property
  def vmem_limit_bytes(self) -> int:
    need = vmem_bytes(*self.blocks, self.d, jnp.dtype(self.dot_dtype).itemsize)
    return -(-(need + (1 << 20)) // (1 << 20)) << 20

  def partials(self, *args):
    return _partials(self, *args)

  def backward(self, *args):
    return _backward(self, *args)

  def cost(self, kernel) -> pl.CostEstimate:
    """What one call of ``kernel`` does on the padded sizes when every row block is live, for XLA's cost model
    (which counts nothing inside a ``pallas_call`` otherwise): the ``[n_pad, v_pad]`` logits' product over D,
    twice for ``dh`` and ``dW`` (recomputed, then multiplied by ``W`` or ``h``); an exp per logit, and the
    forward's rescale per row and tile; the bytes the pipeline moves, which fetches a block again only when its
    index changes: the operand indexed by the grid's inner axis once per outer step."""
    (bn, tv), n, v, d = self.blocks, self.n_pad, self.v_pad, self.d
    itemsize, rows, tiles = jnp.dtype(self.dot_dtype).itemsize, n // bn, v // tv
    logits = n * v
    if kernel is _fwd_kernel:  # h once, W per row block; targets and weights in, (m, s, target) out
      moved = (n * d + rows * d * v) * itemsize + 5 * n * 4
      return pl.CostEstimate(flops=2 * logits * d, transcendentals=logits + n * tiles, bytes_accessed=moved)
    if kernel is _dh_kernel:  # h once, W per row block; targets, lse, coef in, float32 dh out
      moved = (n * d + rows * d * v) * itemsize + 3 * n * 4 + n * d * 4
    else:  # dW: W once, h and the row columns per tile, float32 dW out
      moved = (tiles * n * d + d * v) * itemsize + tiles * 3 * n * 4 + d * v * 4
    return pl.CostEstimate(flops=4 * logits * d, transcendentals=logits, bytes_accessed=moved)

  def call(self, kernel, grid, in_specs, out_specs, out_shape, scratch):
    return pl.pallas_call(
        functools.partial(kernel, tile_v=self.blocks[1], v=self.v, num_classes=self.num_classes, exclude=self.exclude,
                          precision=xla_precision(self.dot_dtype)),
        grid=grid, in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM)] + in_specs, out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch], cost_estimate=self.cost(kernel),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=self.vmem_limit_bytes))

  def specs(self, rows_first: bool):
    """Specs for (h, W tile, a row column) over a grid (rows, tiles) or (tiles, rows)."""
    (bn, tv), d = self.blocks, self.d
    if rows_first:
      row = lambda shape: pl.BlockSpec(shape, lambda i, j: (i, 0))
      tile = pl.BlockSpec((d, tv), lambda i, j: (0, j))
    else:
      row = lambda shape: pl.BlockSpec(shape, lambda j, i: (i, 0))
      tile = pl.BlockSpec((d, tv), lambda j, i: (0, j))
    return row((bn, d)), tile, row((bn, 1))


def _padded(plan: MosaicPlan, h_NxD, w_DxV, *columns_N):
  dtype = jnp.dtype(plan.dot_dtype)
  h = jnp.pad(h_NxD.astype(dtype), ((0, plan.n_pad - plan.n), (0, 0)))
  w = jnp.pad(w_DxV.astype(dtype), ((0, 0), (0, plan.v_pad - plan.v)))
  return (h, w) + tuple(jnp.pad(c, (0, plan.n_pad - plan.n))[:, None] for c in columns_N)


def _partials(plan: MosaicPlan, h_NxD, w_DxV, targets_N, weights_N, offset):
  """``(m, s, target)``, each ``[1, N]``, over this shard's columns (``fused_ce_triton._partials``' contract)."""
  h, w, t, wt = _padded(plan, h_NxD, w_DxV, targets_N, weights_N)
  (bn, tv) = plan.blocks
  rows, tile, column = plan.specs(rows_first=True)
  col = jax.ShapeDtypeStruct((plan.n_pad, 1), jnp.float32)
  m, s, target = plan.call(_fwd_kernel, (plan.n_pad // bn, plan.v_pad // tv), [rows, tile, column, column],
                           (column,) * 3, (col,) * 3, [(bn, 1)] * 3)(_offset(offset), h, w, t, wt)
  return m[:plan.n, 0][None], s[:plan.n, 0][None], target[:plan.n, 0][None]


def _offset(offset):
  return jnp.reshape(offset, (1,)).astype(jnp.int32)


def _backward(plan: MosaicPlan, h_NxD, w_DxV, targets_N, lse_N, coef_N, offset):
  h, w, t, lse, coef = _padded(plan, h_NxD, w_DxV, targets_N, lse_N, coef_N)
  (bn, tv) = plan.blocks
  num_rows, num_tiles = plan.n_pad // bn, plan.v_pad // tv
  rows, tile, column = plan.specs(rows_first=True)
  dh = plan.call(_dh_kernel, (num_rows, num_tiles), [rows, tile, column, column, column],
                 pl.BlockSpec((bn, plan.d), lambda i, j: (i, 0)),
                 jax.ShapeDtypeStruct((plan.n_pad, plan.d), jnp.float32), [(bn, plan.d)])(_offset(offset), h, w, t,
                                                                                        lse, coef)
  rows, tile, column = plan.specs(rows_first=False)
  dw = plan.call(_dw_kernel, (num_tiles, num_rows), [rows, tile, column, column, column],
                 pl.BlockSpec((plan.d, tv), lambda j, i: (0, j)),
                 jax.ShapeDtypeStruct((plan.d, plan.v_pad), jnp.float32), [(plan.d, tv)])(_offset(offset), h, w, t,
                                                                                        lse, coef)
  return dh[:plan.n], dw[:, :plan.v]

"""The output head fused with a weighted cross-entropy: ``loss_N = weights_N * CE(h_N @ W, targets_N)``, never
materialising the ``[N, V]`` logits.

At 8 x 1024 tokens and GPT-2's 50,257 classes the float32 logits of one micro-batch are 1.6 GB, and their
gradient as much again. Here the vocabulary is visited in tiles of ``tile_v`` columns with an online
log-sum-exp (running max and rescaled sum), so only ``[N, tile_v]`` is ever live; the backward pass recomputes
each tile's logits from ``h`` and ``W`` and the saved log-sum-exp.

The cross-entropy runs over the classes ``[0, num_classes)`` less ``exclude``: the absorbing process's mask
class (the SUBS parameterisation: the denoiser never predicts the mask), and the padding columns of a head
padded to a multiple of the tile (``model.vocab_pad_multiple``). The weights carry everything else: the
ELBO's ``-alpha'(t) / (1 - alpha(t))``, the mask (0 at unmasked positions) and padding (0). They are constants:
no gradient flows to them (they depend on t and the corruption, never on parameters).

Three implementations of one contract, each checked against the others (``tests/test_fused_ce.py``):

  ``weighted_ce_reference``  the naive ``[N, V]`` computation, the definition.
  ``weighted_ce_tiled``      a ``lax.scan`` over vocabulary tiles with a ``custom_vjp``: pure JAX, every backend.
  ``weighted_ce_pallas``     Pallas kernels (Triton-style: one program per block of rows, the vocabulary and the
                             model width visited in a loop inside it) for GPUs; ``interpret=True`` runs them on
                             the CPU. Rows of weight 0 are gathered into whole blocks that skip their matmuls (the
                             masked ELBO's unmasked positions cost nothing).
  ``weighted_ce_pallas_tpu`` the same as Mosaic TPU kernels (the reduction as the grid's inner axis, accumulators
                             in VMEM); ``pltpu.force_tpu_interpret_mode()`` runs them on the CPU.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

IMPLS = ("xla", "tiled", "pallas")
_NEG = -1e30  # a logit that exp() sends to 0 without the NaNs of -inf arithmetic


def _valid_columns(start, width: int, num_classes: int, exclude):
  """``[width]`` bool: columns ``start + i`` that are classes of the cross-entropy."""
  cols = start + jnp.arange(width)
  valid = cols < num_classes
  if exclude is not None:
    valid &= cols != exclude
  return valid, cols


def _check(h_NxD, w_DxV, targets_N, weights_N, num_classes: int, exclude):
  n, d = h_NxD.shape
  if w_DxV.ndim != 2 or w_DxV.shape[0] != d:
    raise ValueError(f"W must be [D={d}, V]; got {w_DxV.shape}")
  if targets_N.shape != (n,) or weights_N.shape != (n,):
    raise ValueError(f"targets and weights must be [N={n}]; got {targets_N.shape} and {weights_N.shape}")
  if not 0 < num_classes <= w_DxV.shape[1]:
    raise ValueError(f"num_classes must lie in [1, V={w_DxV.shape[1]}]; got {num_classes}")
  if exclude is not None and not 0 <= exclude < num_classes:
    raise ValueError(f"exclude must be a class in [0, {num_classes}) or None; got {exclude}")


# ---------------------------------------------------------------- the definition

def weighted_ce_reference(h_NxD, w_DxV, targets_N, weights_N, *, num_classes: int, exclude: int | None = None):
  """``weights_N * (logsumexp over the classes - logit[target])`` from the full float32 ``[N, V]`` logits."""
  _check(h_NxD, w_DxV, targets_N, weights_N, num_classes, exclude)
  logits_NxV = jnp.dot(h_NxD.astype(jnp.float32), w_DxV.astype(jnp.float32), preferred_element_type=jnp.float32)
  valid, _ = _valid_columns(0, w_DxV.shape[1], num_classes, exclude)
  logits_NxV = jnp.where(valid, logits_NxV, -jnp.inf)
  ce_N = (jax.nn.logsumexp(logits_NxV, axis=-1)
          - jnp.take_along_axis(logits_NxV, targets_N[:, None].astype(jnp.int32), axis=-1)[:, 0])
  return jax.lax.stop_gradient(weights_N.astype(jnp.float32)) * ce_N


# ---------------------------------------------------------------- pure JAX, tiled

def _pad_columns(w_DxV, tile: int):
  pad = -w_DxV.shape[1] % tile
  return jnp.pad(w_DxV, ((0, 0), (0, pad))) if pad else w_DxV


def _tiles(w_DxV, tile: int):
  """``[T, D, tile]``: W's columns in tiles (zero-padded at the end)."""
  w = _pad_columns(w_DxV, tile)
  return jnp.moveaxis(w.reshape(w.shape[0], -1, tile), 1, 0)


def _tiled_forward(h_NxD, w_DxV, targets_N, num_classes, exclude, tile):
  """``(ce_N, lse_N)`` by a scan over vocabulary tiles with an online log-sum-exp."""
  h = h_NxD.astype(jnp.float32)
  n = h.shape[0]

  def step(carry, inputs):
    m_N, s_N, target_N = carry
    index, w_DxT = inputs
    logits_NxT = jnp.dot(h, w_DxT.astype(jnp.float32), preferred_element_type=jnp.float32)
    valid, cols = _valid_columns(index * tile, tile, num_classes, exclude)
    logits_NxT = jnp.where(valid, logits_NxT, _NEG)
    m_new = jnp.maximum(m_N, logits_NxT.max(axis=-1))
    s_N = s_N * jnp.exp(m_N - m_new) + jnp.exp(logits_NxT - m_new[:, None]).sum(axis=-1)
    target_N = target_N + jnp.where(cols[None, :] == targets_N[:, None], logits_NxT, 0.0).sum(axis=-1)
    return (m_new, s_N, target_N), None

  tiles = _tiles(w_DxV, tile)
  init = (jnp.full((n,), _NEG, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
  (m_N, s_N, target_N), _ = jax.lax.scan(step, init, (jnp.arange(tiles.shape[0]), tiles))
  lse_N = m_N + jnp.log(s_N)
  return lse_N - target_N, lse_N


def _tiled_backward(h_NxD, w_DxV, targets_N, lse_N, coef_N, num_classes, exclude, tile):
  """``(dh_NxD, dW_DxV)`` of ``sum(coef_N * ce_N)``, recomputing each tile's logits."""
  h = h_NxD.astype(jnp.float32)

  def step(dh_NxD, inputs):
    index, w_DxT = inputs
    w32 = w_DxT.astype(jnp.float32)
    logits_NxT = jnp.dot(h, w32, preferred_element_type=jnp.float32)
    valid, cols = _valid_columns(index * tile, tile, num_classes, exclude)
    p_NxT = jnp.where(valid, jnp.exp(logits_NxT - lse_N[:, None]), 0.0)
    dlogits_NxT = coef_N[:, None] * (p_NxT - (cols[None, :] == targets_N[:, None]))
    dh_NxD = dh_NxD + jnp.dot(dlogits_NxT, w32.T, preferred_element_type=jnp.float32)
    return dh_NxD, jnp.dot(h.T, dlogits_NxT, preferred_element_type=jnp.float32)

  tiles = _tiles(w_DxV, tile)
  dh_NxD, dw_TxDxT = jax.lax.scan(step, jnp.zeros(h.shape, jnp.float32), (jnp.arange(tiles.shape[0]), tiles))
  dw_DxV = jnp.moveaxis(dw_TxDxT, 0, 1).reshape(h.shape[1], -1)[:, :w_DxV.shape[1]]
  return dh_NxD, dw_DxV


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _tiled(h_NxD, w_DxV, targets_N, weights_N, num_classes, exclude, tile):
  ce_N, _ = _tiled_forward(h_NxD, w_DxV, targets_N, num_classes, exclude, tile)
  return weights_N.astype(jnp.float32) * ce_N


def _tiled_fwd(h_NxD, w_DxV, targets_N, weights_N, num_classes, exclude, tile):
  ce_N, lse_N = _tiled_forward(h_NxD, w_DxV, targets_N, num_classes, exclude, tile)
  return weights_N.astype(jnp.float32) * ce_N, (h_NxD, w_DxV, targets_N, weights_N, lse_N)


def _tiled_bwd(num_classes, exclude, tile, residuals, g_N):
  h_NxD, w_DxV, targets_N, weights_N, lse_N = residuals
  dh, dw = _tiled_backward(h_NxD, w_DxV, targets_N, lse_N, g_N * weights_N.astype(jnp.float32), num_classes,
                           exclude, tile)
  return dh.astype(h_NxD.dtype), dw.astype(w_DxV.dtype), _int_zeros(targets_N), jnp.zeros_like(weights_N)


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def _int_zeros(x):
  """The cotangent of an integer input: float0 zeros."""
  return np.zeros(x.shape, jax.dtypes.float0)


def weighted_ce_tiled(h_NxD, w_DxV, targets_N, weights_N, *, num_classes: int, exclude: int | None = None,
                      tile_v: int = 2048):
  """``weighted_ce_reference``'s value and gradients (for ``h`` and ``W``), holding ``[N, tile_v]`` logits at a
  time."""
  _check(h_NxD, w_DxV, targets_N, weights_N, num_classes, exclude)
  return _tiled(h_NxD, w_DxV, targets_N.astype(jnp.int32), weights_N, num_classes, exclude, int(tile_v))


# ---------------------------------------------------------------- Pallas (Triton-style GPU kernels)

def _tile_logits(h_ref, w_ref, j, tile_v, chunk_d, num_chunks):
  """``[block_n, tile_v]`` float32 logits of vocabulary tile ``j``, summed over the width in chunks."""
  logits = jnp.zeros((h_ref.shape[0], tile_v), jnp.float32)
  for c in range(num_chunks):
    h = h_ref[:, pl.ds(c * chunk_d, chunk_d)].astype(jnp.float32)
    w = w_ref[pl.ds(c * chunk_d, chunk_d), pl.ds(j * tile_v, tile_v)].astype(jnp.float32)
    logits += jnp.dot(h, w, preferred_element_type=jnp.float32)
  return logits


def _masked_tile(logits, j, tile_v, num_classes, exclude):
  cols = j * tile_v + jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  valid = cols < num_classes
  if exclude is not None:
    valid &= cols != exclude
  return jnp.where(valid, logits, _NEG), valid, cols


def _fwd_kernel(h_ref, w_ref, t_ref, wt_ref, ce_ref, lse_ref, *, num_tiles, tile_v, chunk_d, num_chunks,
                num_classes, exclude):
  """One block of rows: ``ce`` and ``lse`` by an online log-sum-exp over the vocabulary tiles."""
  active = jnp.max(jnp.abs(wt_ref[...])) > 0

  @pl.when(active)
  def _():
    targets = t_ref[...]

    def tile(j, carry):
      m, s, target = carry
      logits, _, cols = _masked_tile(_tile_logits(h_ref, w_ref, j, tile_v, chunk_d, num_chunks), j, tile_v,
                                     num_classes, exclude)
      m_new = jnp.maximum(m, jnp.max(logits, axis=1))
      s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
      target = target + jnp.sum(jnp.where(cols == targets[:, None], logits, 0.0), axis=1)
      return m_new, s, target

    rows = h_ref.shape[0]
    init = (jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32), jnp.zeros((rows,), jnp.float32))
    m, s, target = jax.lax.fori_loop(0, num_tiles, tile, init)
    lse = m + jnp.log(s)
    ce_ref[...] = lse - target
    lse_ref[...] = lse

  @pl.when(jnp.logical_not(active))
  def _():
    ce_ref[...] = jnp.zeros(ce_ref.shape, jnp.float32)
    lse_ref[...] = jnp.zeros(lse_ref.shape, jnp.float32)


def _dlogits(h_ref, w_ref, j, targets, lse, coef, tile_v, chunk_d, num_chunks, num_classes, exclude):
  logits, valid, cols = _masked_tile(_tile_logits(h_ref, w_ref, j, tile_v, chunk_d, num_chunks), j, tile_v,
                                     num_classes, exclude)
  p = jnp.where(valid, jnp.exp(logits - lse[:, None]), 0.0)
  return coef[:, None] * (p - (cols == targets[:, None]).astype(jnp.float32))


def _dh_kernel(h_ref, w_ref, t_ref, lse_ref, coef_ref, dh_ref, *, num_tiles, tile_v, chunk_d, num_chunks,
               num_classes, exclude):
  """One block of rows: ``dh = sum_tiles dlogits @ W_tile^T``, accumulated per width chunk."""
  coef = coef_ref[...]
  active = jnp.max(jnp.abs(coef)) > 0

  @pl.when(active)
  def _():
    targets, lse = t_ref[...], lse_ref[...]

    def tile(j, acc):
      dlogits = _dlogits(h_ref, w_ref, j, targets, lse, coef, tile_v, chunk_d, num_chunks, num_classes, exclude)
      out = []
      for c in range(num_chunks):
        w = w_ref[pl.ds(c * chunk_d, chunk_d), pl.ds(j * tile_v, tile_v)].astype(jnp.float32)
        out.append(acc[c] + jax.lax.dot_general(dlogits, w, (((1,), (1,)), ((), ())),
                                                preferred_element_type=jnp.float32))
      return tuple(out)

    init = tuple(jnp.zeros((h_ref.shape[0], chunk_d), jnp.float32) for _ in range(num_chunks))
    acc = jax.lax.fori_loop(0, num_tiles, tile, init)
    for c in range(num_chunks):
      dh_ref[:, pl.ds(c * chunk_d, chunk_d)] = acc[c].astype(dh_ref.dtype)

  @pl.when(jnp.logical_not(active))
  def _():
    dh_ref[...] = jnp.zeros(dh_ref.shape, dh_ref.dtype)


def _dw_kernel(h_ref, w_ref, t_ref, lse_ref, coef_ref, dw_ref, *, block_n, num_blocks, tile_v, chunk_d,
               num_chunks, num_classes, exclude):
  """One vocabulary tile and width chunk: ``dW[chunk, tile] = sum over row blocks h[rows, chunk]^T @ dlogits``.
  Row blocks whose weights are all zero are skipped."""
  j, c = pl.program_id(0), pl.program_id(1)

  def rows(b, acc):
    coef = coef_ref[pl.ds(b * block_n, block_n)]

    def contribute(acc):
      targets, lse = t_ref[pl.ds(b * block_n, block_n)], lse_ref[pl.ds(b * block_n, block_n)]
      h_rows = _RowWindow(h_ref, b * block_n, block_n)
      dlogits = _dlogits(h_rows, w_ref, j, targets, lse, coef, tile_v, chunk_d, num_chunks, num_classes, exclude)
      h = h_ref[pl.ds(b * block_n, block_n), pl.ds(c * chunk_d, chunk_d)].astype(jnp.float32)
      return acc + jax.lax.dot_general(h, dlogits, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    return jax.lax.cond(jnp.max(jnp.abs(coef)) > 0, contribute, lambda acc: acc, acc)

  acc = jax.lax.fori_loop(0, num_blocks, rows, jnp.zeros((chunk_d, tile_v), jnp.float32))
  dw_ref[...] = acc.astype(dw_ref.dtype)


class _RowWindow:
  """Rows ``[start, start + size)`` of a ref, indexable like the ref itself (for ``_tile_logits``)."""

  def __init__(self, ref, start, size):
    self.ref, self.start, self.shape = ref, start, (size,) + tuple(ref.shape[1:])

  def __getitem__(self, index):
    rows, cols = index
    assert rows == slice(None)
    return self.ref[pl.ds(self.start, self.shape[0]), cols]


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static shapes of one call: the padded sizes and the blocks."""
  n: int
  d: int
  v: int
  block_n: int
  tile_v: int
  chunk_d: int
  num_classes: int
  exclude: int | None
  interpret: bool

  @property
  def n_pad(self):
    return -(-self.n // self.block_n) * self.block_n

  @property
  def v_pad(self):
    return -(-self.v // self.tile_v) * self.tile_v

  @property
  def d_pad(self):
    return -(-self.d // self.chunk_d) * self.chunk_d

  def kwargs(self):
    return dict(tile_v=self.tile_v, chunk_d=self.chunk_d, num_chunks=self.d_pad // self.chunk_d,
                num_classes=self.num_classes, exclude=self.exclude)

  def forward(self, *args):
    return _pallas_forward(self, *args)

  def backward(self, *args):
    return _pallas_backward(self, *args)

  def call(self, kernel, grid, in_specs, out_specs, out_shape, **static):
    return pl.pallas_call(functools.partial(kernel, **self.kwargs(), **static), out_shape=out_shape, grid=grid,
                          in_specs=in_specs, out_specs=out_specs, interpret=self.interpret,
                          compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2))


def _padded(plan: _Plan, h_NxD, w_DxV, *rows_N):
  h = jnp.pad(h_NxD, ((0, plan.n_pad - plan.n), (0, plan.d_pad - plan.d)))
  w = jnp.pad(w_DxV, ((0, plan.d_pad - plan.d), (0, plan.v_pad - plan.v)))
  return (h, w) + tuple(jnp.pad(r, (0, plan.n_pad - plan.n)) for r in rows_N)


def _row_specs(plan: _Plan, count: int):
  return [pl.BlockSpec((plan.block_n,), lambda i: (i,)) for _ in range(count)]


def _pallas_forward(plan: _Plan, h_NxD, w_DxV, targets_N, weights_N):
  h, w, t, wt = _padded(plan, h_NxD, w_DxV, targets_N, weights_N)
  row = jax.ShapeDtypeStruct((plan.n_pad,), jnp.float32)
  ce, lse = plan.call(
      _fwd_kernel, (plan.n_pad // plan.block_n,),
      [pl.BlockSpec((plan.block_n, plan.d_pad), lambda i: (i, 0)),
       pl.BlockSpec((plan.d_pad, plan.v_pad), lambda i: (0, 0))] + _row_specs(plan, 2),
      _row_specs(plan, 2), (row, row), num_tiles=plan.v_pad // plan.tile_v)(h, w, t, wt)
  return ce[:plan.n], lse[:plan.n]


def _pallas_backward(plan: _Plan, h_NxD, w_DxV, targets_N, lse_N, coef_N):
  h, w, t, lse, coef = _padded(plan, h_NxD, w_DxV, targets_N, lse_N, coef_N)
  num_tiles, num_chunks = plan.v_pad // plan.tile_v, plan.d_pad // plan.chunk_d
  dh = plan.call(
      _dh_kernel, (plan.n_pad // plan.block_n,),
      [pl.BlockSpec((plan.block_n, plan.d_pad), lambda i: (i, 0)),
       pl.BlockSpec((plan.d_pad, plan.v_pad), lambda i: (0, 0))] + _row_specs(plan, 3),
      pl.BlockSpec((plan.block_n, plan.d_pad), lambda i: (i, 0)),
      jax.ShapeDtypeStruct((plan.n_pad, plan.d_pad), jnp.float32), num_tiles=num_tiles)(h, w, t, lse, coef)
  whole = [pl.BlockSpec((plan.n_pad, plan.d_pad), lambda j, c: (0, 0)),
           pl.BlockSpec((plan.d_pad, plan.v_pad), lambda j, c: (0, 0))]
  whole += [pl.BlockSpec((plan.n_pad,), lambda j, c: (0,)) for _ in range(3)]
  dw = plan.call(
      _dw_kernel, (num_tiles, num_chunks), whole, pl.BlockSpec((plan.chunk_d, plan.tile_v), lambda j, c: (c, j)),
      jax.ShapeDtypeStruct((plan.d_pad, plan.v_pad), jnp.float32), block_n=plan.block_n,
      num_blocks=plan.n_pad // plan.block_n)(h, w, t, lse, coef)
  return dh[:plan.n, :plan.d], dw[:plan.d, :plan.v]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pallas(plan, h_NxD, w_DxV, targets_N, weights_N):
  """``weights * ce`` from the kernels of ``plan`` (``_Plan``: Triton, ``_TpuPlan``: Mosaic), which provides
  ``forward -> (ce, lse)`` and ``backward -> (dh, dW)``."""
  ce_N, _ = plan.forward(h_NxD, w_DxV, targets_N, weights_N)
  return weights_N * ce_N


def _pallas_fwd(plan, h_NxD, w_DxV, targets_N, weights_N):
  ce_N, lse_N = plan.forward(h_NxD, w_DxV, targets_N, weights_N)
  return weights_N * ce_N, (h_NxD, w_DxV, targets_N, weights_N, lse_N)


def _pallas_bwd(plan, residuals, g_N):
  h_NxD, w_DxV, targets_N, weights_N, lse_N = residuals
  dh, dw = plan.backward(h_NxD, w_DxV, targets_N, lse_N, g_N * weights_N)
  return dh.astype(h_NxD.dtype), dw.astype(w_DxV.dtype), _int_zeros(targets_N), jnp.zeros_like(weights_N)


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def _skipping_zero_rows(plan, h_NxD, w_DxV, targets_N, weights_N):
  """``_pallas`` with the rows of weight 0 moved behind the others (a stable sort), so they fill whole blocks that
  the kernels skip: the masked ELBO's unmasked positions, wherever they are, cost nothing."""
  weights_N = jax.lax.stop_gradient(weights_N.astype(jnp.float32))
  order = jnp.argsort(weights_N == 0, stable=True)
  loss_N = _pallas(plan, h_NxD[order], w_DxV, targets_N.astype(jnp.int32)[order], weights_N[order])
  return jnp.zeros_like(loss_N).at[order].set(loss_N)


def weighted_ce_pallas(h_NxD, w_DxV, targets_N, weights_N, *, num_classes: int, exclude: int | None = None,
                       block_n: int = 32, tile_v: int = 128, chunk_d: int = 64, interpret: bool = False):
  """``weighted_ce_reference``'s value and gradients (for ``h`` and ``W``) from Pallas kernels; ``weights`` are
  constants (no gradient flows to them). Rows are reordered so that those of weight 0 fill whole blocks, which
  the kernels skip. ``block_n``, ``tile_v`` and ``chunk_d`` must be powers of two (Triton);
  the inputs are zero-padded to whole blocks. ``interpret=True`` runs the kernels on any backend."""
  _check(h_NxD, w_DxV, targets_N, weights_N, num_classes, exclude)
  for name, value in (("block_n", block_n), ("tile_v", tile_v), ("chunk_d", chunk_d)):
    if value < 1 or value & (value - 1):
      raise ValueError(f"{name} must be a power of two (Triton's blocks are); got {value}")
  n, d = h_NxD.shape
  plan = _Plan(n=n, d=d, v=w_DxV.shape[1], block_n=block_n, tile_v=tile_v,
               chunk_d=min(chunk_d, pl.next_power_of_2(d)), num_classes=num_classes, exclude=exclude,
               interpret=interpret)
  return _skipping_zero_rows(plan, h_NxD, w_DxV, targets_N, weights_N)


def select(impl: str, *, tile_v: int = 2048, interpret: bool = False):
  """The ``weighted_ce(h, W, targets, weights, *, num_classes, exclude)`` of implementation ``impl``
  (``tiled`` or ``pallas``; ``xla`` is the unfused head, which has none). The Pallas kernels are Triton's: on
  another backend they need ``interpret``."""
  if impl not in IMPLS[1:]:
    raise ValueError(f"unknown fused head implementation {impl!r}; valid: {list(IMPLS[1:])} ('xla' computes the "
                     f"logits and needs none)")
  if impl == "tiled":
    return functools.partial(weighted_ce_tiled, tile_v=tile_v)
  backend = jax.default_backend()
  if backend == "tpu":
    return weighted_ce_pallas_tpu
  if backend != "gpu" and not interpret:
    raise ValueError(f"head_impl 'pallas' runs Triton kernels on GPUs and Mosaic kernels on TPUs; this backend is "
                     f"{backend!r}: use 'tiled' (or 'xla'), or set model.kernel_interpret=True to interpret the "
                     f"kernels")
  return functools.partial(weighted_ce_pallas, interpret=interpret)


# ---------------------------------------------------------------- Pallas (Mosaic TPU kernels)

def _tpu_fwd_kernel(h_ref, w_ref, t_ref, wt_ref, ce_ref, lse_ref, m_ref, s_ref, tgt_ref, *, tile_v, num_classes,
                    exclude):
  """Grid (row blocks, vocabulary tiles), the tiles the inner reduction: running max, sum and target logit in
  VMEM scratch, the results written at the last tile. Row blocks of weight 0 compute nothing."""
  j, last = pl.program_id(1), pl.num_programs(1) - 1

  @pl.when(j == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
    s_ref[...] = jnp.zeros(s_ref.shape, jnp.float32)
    tgt_ref[...] = jnp.zeros(tgt_ref.shape, jnp.float32)

  active = jnp.max(jnp.abs(wt_ref[...])) > 0

  @pl.when(active)
  def _():
    logits = jnp.dot(h_ref[...].astype(jnp.float32), w_ref[...].astype(jnp.float32),
                     preferred_element_type=jnp.float32)
    logits, _, cols = _masked_tile(logits, j, tile_v, num_classes, exclude)
    m = m_ref[...]
    m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
    s_ref[...] = s_ref[...] * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new), axis=1, keepdims=True)
    m_ref[...] = m_new
    tgt_ref[...] += jnp.sum(jnp.where(cols == t_ref[...], logits, 0.0), axis=1, keepdims=True)

  @pl.when(j == last)
  def _():
    lse = m_ref[...] + jnp.log(jnp.where(active, s_ref[...], 1.0))
    ce_ref[...] = jnp.where(active, lse - tgt_ref[...], 0.0)
    lse_ref[...] = jnp.where(active, lse, 0.0)


def _tpu_dlogits(h_ref, w_ref, t_ref, lse_ref, coef_ref, j, tile_v, num_classes, exclude):
  logits = jnp.dot(h_ref[...].astype(jnp.float32), w_ref[...].astype(jnp.float32), preferred_element_type=jnp.float32)
  logits, valid, cols = _masked_tile(logits, j, tile_v, num_classes, exclude)
  p = jnp.where(valid, jnp.exp(logits - lse_ref[...]), 0.0)
  return coef_ref[...] * (p - (cols == t_ref[...]).astype(jnp.float32))


def _tpu_dh_kernel(h_ref, w_ref, t_ref, lse_ref, coef_ref, dh_ref, acc_ref, *, tile_v, num_classes, exclude):
  j, last = pl.program_id(1), pl.num_programs(1) - 1

  @pl.when(j == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(jnp.max(jnp.abs(coef_ref[...])) > 0)
  def _():
    dlogits = _tpu_dlogits(h_ref, w_ref, t_ref, lse_ref, coef_ref, j, tile_v, num_classes, exclude)
    acc_ref[...] += jax.lax.dot_general(dlogits, w_ref[...].astype(jnp.float32), (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)

  @pl.when(j == last)
  def _():
    dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _tpu_dw_kernel(h_ref, w_ref, t_ref, lse_ref, coef_ref, dw_ref, acc_ref, *, tile_v, num_classes, exclude):
  """Grid (vocabulary tiles, row blocks), the row blocks the inner reduction."""
  j, i, last = pl.program_id(0), pl.program_id(1), pl.num_programs(1) - 1

  @pl.when(i == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(jnp.max(jnp.abs(coef_ref[...])) > 0)
  def _():
    dlogits = _tpu_dlogits(h_ref, w_ref, t_ref, lse_ref, coef_ref, j, tile_v, num_classes, exclude)
    acc_ref[...] += jax.lax.dot_general(h_ref[...].astype(jnp.float32), dlogits, (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

  @pl.when(i == last)
  def _():
    dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


@dataclasses.dataclass(frozen=True)
class _TpuPlan:
  n: int
  d: int
  v: int
  block_n: int
  tile_v: int
  num_classes: int
  exclude: int | None

  @property
  def n_pad(self):
    return -(-self.n // self.block_n) * self.block_n

  @property
  def v_pad(self):
    return -(-self.v // self.tile_v) * self.tile_v

  def forward(self, *args):
    return _tpu_forward(self, *args)

  def backward(self, *args):
    return _tpu_backward(self, *args)

  def call(self, kernel, grid, in_specs, out_specs, out_shape, scratch):
    return pl.pallas_call(
        functools.partial(kernel, tile_v=self.tile_v, num_classes=self.num_classes, exclude=self.exclude),
        grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary")))

  def specs(self, rows_first: bool):
    """Specs for (h, W, targets, lse or weights, coef) over a grid (rows, tiles) or (tiles, rows)."""
    bn, tv, d = self.block_n, self.tile_v, self.d
    if rows_first:
      row = lambda shape: pl.BlockSpec(shape, lambda i, j: (i, 0))
      tile = pl.BlockSpec((d, tv), lambda i, j: (0, j))
    else:
      row = lambda shape: pl.BlockSpec(shape, lambda j, i: (i, 0))
      tile = pl.BlockSpec((d, tv), lambda j, i: (0, j))
    return row((bn, d)), tile, row((bn, 1))


def _tpu_padded(plan: _TpuPlan, h_NxD, w_DxV, *columns_N):
  h = jnp.pad(h_NxD, ((0, plan.n_pad - plan.n), (0, 0)))
  w = jnp.pad(w_DxV, ((0, 0), (0, plan.v_pad - plan.v)))
  return (h, w) + tuple(jnp.pad(c, (0, plan.n_pad - plan.n))[:, None] for c in columns_N)


def _tpu_forward(plan: _TpuPlan, h_NxD, w_DxV, targets_N, weights_N):
  h, w, t, wt = _tpu_padded(plan, h_NxD, w_DxV, targets_N, weights_N)
  rows, tile, column = plan.specs(rows_first=True)
  col = jax.ShapeDtypeStruct((plan.n_pad, 1), jnp.float32)
  ce, lse = plan.call(_tpu_fwd_kernel, (plan.n_pad // plan.block_n, plan.v_pad // plan.tile_v),
                      [rows, tile, column, column], (column, column), (col, col), [(plan.block_n, 1)] * 3)(h, w, t, wt)
  return ce[:plan.n, 0], lse[:plan.n, 0]


def _tpu_backward(plan: _TpuPlan, h_NxD, w_DxV, targets_N, lse_N, coef_N):
  h, w, t, lse, coef = _tpu_padded(plan, h_NxD, w_DxV, targets_N, lse_N, coef_N)
  num_rows, num_tiles = plan.n_pad // plan.block_n, plan.v_pad // plan.tile_v
  rows, tile, column = plan.specs(rows_first=True)
  dh = plan.call(_tpu_dh_kernel, (num_rows, num_tiles), [rows, tile, column, column, column], rows,
                 jax.ShapeDtypeStruct((plan.n_pad, plan.d), jnp.float32), [(plan.block_n, plan.d)])(h, w, t, lse, coef)
  rows, tile, column = plan.specs(rows_first=False)
  dw = plan.call(_tpu_dw_kernel, (num_tiles, num_rows), [rows, tile, column, column, column], tile,
                 jax.ShapeDtypeStruct((plan.d, plan.v_pad), jnp.float32), [(plan.d, plan.tile_v)])(h, w, t, lse, coef)
  return dh[:plan.n], dw[:, :plan.v]


def weighted_ce_pallas_tpu(h_NxD, w_DxV, targets_N, weights_N, *, num_classes: int, exclude: int | None = None,
                           block_n: int = 256, tile_v: int = 512):
  """``weighted_ce_pallas`` as Mosaic TPU kernels (grids whose inner axis is the reduction, accumulators in
  VMEM); ``block_n`` a multiple of 8 and ``tile_v`` of 128 (the TPU's sublanes and lanes). Under
  ``pltpu.force_tpu_interpret_mode()`` they run on any backend."""
  _check(h_NxD, w_DxV, targets_N, weights_N, num_classes, exclude)
  if block_n % 8 or tile_v % 128:
    raise ValueError(f"block_n must be a multiple of 8 and tile_v of 128 (TPU sublanes and lanes); got {block_n}, "
                     f"{tile_v}")
  plan = _TpuPlan(n=h_NxD.shape[0], d=h_NxD.shape[1], v=w_DxV.shape[1], block_n=block_n, tile_v=tile_v,
                  num_classes=num_classes, exclude=exclude)
  return _skipping_zero_rows(plan, h_NxD, w_DxV, targets_N, weights_N)

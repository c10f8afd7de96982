"""Every Triton kernel compiles for sm_90 at the shapes the shipped configs use (pallas_kernels/triton_check.py).

Lowering for ('cuda',) only serialises Triton IR; here Triton's own pipeline (the registry's ``triton`` package,
pinned in the test extra) compiles it down to a cubin with ptxas, so a non-power-of-two array, a block over an
sm_90 block's 232,448 B of shared memory or heavy register spills fail here, as they would inside XLA on an H100.
Where ``triton`` cannot be installed (it ships Linux x86-64 wheels only) the test skips and says so. The table of
shared memory, registers and spills is printed (``pytest -s``) and is what the README quotes.
"""
import concurrent.futures
import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import attention, fused_ce, fused_sample, triton_check

triton = pytest.importorskip("triton", reason="the 'triton' package (Linux x86-64 wheels only) is not installed: "
                                              "the sm_90 compile check cannot run here")

pytestmark = pytest.mark.slow

N = 1024  # rows of the head's kernels: the program does not depend on it beyond the grid
HEAD_SHAPES = [(256, 50257), (768, 50257), (1024, 50257), (2048, 50257), (768, 131072)]  # (D, V); 128k for the record
ATTENTION_SHAPES = [(8, 1024, 12, 64), (4, 1024, 16, 128)]  # (B, L, H, K)
MAX_SPILL_BYTES = 256


def _struct(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def _head_kernels(d, v, dot_dtype):
  def loss(h, w, targets, weights):
    return fused_ce.weighted_ce_pallas(h, w, targets, weights, num_classes=v, exclude=v - 1,
                                       dot_dtype=dot_dtype).sum()

  args = (_struct((N, d)), _struct((d, v)), _struct((N,), jnp.int32), _struct((N,)))
  return triton_check.triton_kernels(jax.grad(loss, argnums=(0, 1)), *args)


def _sample_kernels(d, v, dot_dtype):
  def draw(h, w):
    return fused_sample.sample_pallas(h, w, 7, num_classes=v, exclude=v - 1, dot_dtype=dot_dtype)

  return triton_check.triton_kernels(draw, _struct((N, d)), _struct((d, v)))


def _attention_kernels(shape, causal, block_size=0):
  """Forward, dq and dk/dv kernels; with ``block_size``, under block diffusion's mask (x_t then x_0: 2N rows)."""
  def loss(q, k, v, segments, blocks):
    extra = dict(blocks_BxL=blocks, block_size=block_size) if block_size else {}
    return attention.flash_attention(q, k, v, segments, causal, **extra).astype(jnp.float32).sum()

  q = _struct(shape, jnp.bfloat16)
  ids = _struct(shape[:2], jnp.int32)
  return triton_check.triton_kernels(jax.grad(loss, argnums=(0, 1, 2)), q, q, q, ids, ids)


def _cases():
  cases = []
  for d, v in HEAD_SHAPES:
    for dot_dtype in ("bfloat16", "float32"):
      cases.append((f"fused_ce D={d} V={v} {dot_dtype}", functools.partial(_head_kernels, d, v, dot_dtype)))
      cases.append((f"fused_sample D={d} V={v} {dot_dtype}", functools.partial(_sample_kernels, d, v, dot_dtype)))
  for shape in ATTENTION_SHAPES:
    for causal in (False, True):
      cases.append((f"attention {shape} causal={causal}", functools.partial(_attention_kernels, shape, causal)))
  # Block diffusion's 2L pass at L = 1024, blocks of 16 (the OWT config's length).
  bd_shape = (4, 2048, 12, 64)
  cases.append((f"attention {bd_shape} BD3 L'=16", functools.partial(_attention_kernels, bd_shape, False, 16)))
  return cases


def test_every_triton_kernel_compiles_for_sm90_within_shared_memory_and_without_large_spills():
  kernels = [(case, kernel) for case, lower in _cases() for kernel in lower()]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # each compile is its own subprocess
    reports = list(pool.map(lambda item: triton_check.compile_sm90(item[1]), kernels))
  print(f"\nTriton {triton.__version__}, sm_90; shared limit {triton_check.SM90_SHARED_BYTES} B")
  print(f"{'case':44s} {'kernel':18s} {'warps':>5s} {'stages':>6s} {'shared B':>9s} {'regs':>5s} "
        f"{'spill B':>8s} {'wgmma':>5s}")
  failures = []
  for (case, kernel), report in zip(kernels, reports):
    if not report["ok"]:
      failures.append(f"{case} {kernel.name}: {report['error']}")
      continue
    spill = report["spill_stores"] + report["spill_loads"]
    print(f"{case:44s} {kernel.name:18s} {kernel.num_warps:5d} {kernel.num_stages:6d} {report['shared']:9d} "
          f"{report['registers']:5d} {spill:8d} {str(report['wgmma']):>5s}")
    if not report["fits"]:
      failures.append(f"{case} {kernel.name}: {report['shared']} B of shared memory")
    if spill > MAX_SPILL_BYTES:
      failures.append(f"{case} {kernel.name}: {spill} B of register spills")
    if "bfloat16" in case or "attention" in case:
      if not report["wgmma"]:
        failures.append(f"{case} {kernel.name}: bfloat16 products not on wgmma")
  assert not failures, "\n".join(failures)


def test_the_check_finds_a_kernel_over_shared_memory():
  """The check itself: a kernel staging a 64 x 1024 and a 1024 x 64 float32 block (512 KiB) compiles but is
  reported over the limit (a check that passed everything would pass this). Small products: ptxas takes 4 s on
  them, a minute on 256-row ones."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as pltriton

  def kernel(x_ref, y_ref, o_ref):
    o_ref[...] = jnp.dot(x_ref[...], y_ref[...], preferred_element_type=jnp.float32)

  def call(x, y):
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((64, 64), jnp.float32),
                          compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1))(x, y)

  [big] = triton_check.triton_kernels(call, _struct((64, 1024)), _struct((1024, 64)))
  report = triton_check.compile_sm90(big)
  assert report["ok"] and not report["fits"], report

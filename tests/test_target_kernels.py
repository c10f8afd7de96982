"""The shipped kernels compiled by the real compilers for chips that are not here: XLA:TPU with Mosaic (libtpu) for
v4, v5e, v5p and v6e, XLA:GPU with Triton, cuDNN and ptxas (the CUDA plugin) for the H100 (``runtime.targets``).

Every compile runs in a fresh interpreter (``_run``), which sets the compilers' environment before JAX starts its
backends there (``targets.prepare_environment``) and keeps libtpu and the CUDA plugin out of the suite's own
processes. One program per target and layout holds every kernel at every shape, so that each costs one compile:
the fused head's value and gradient and the fused draw at D in {768, 1024, 2048} x V in {50257, 32768, 8192},
attention's value and gradient at head widths 64 and 128 (splash on TPUs; the Pallas flash kernels and cuDNN on
GPUs), on one device and per shard under a (data, tensor) mesh. Its compiled HLO must hold every kernel as the
backend's own custom call, so that a program in which the jnp twin silently replaced a kernel fails.

What the compilers check, and so what these tests find: a Mosaic kernel's blocks over the chip's VMEM, a Triton
kernel's over an sm_90 block's 232,448 B of shared memory, PTX that ptxas refuses. ``test_an_oversized_block_*``
shows each compiler refusing one of the shipped kernels with its blocks made too large, so that a pass means
something.
"""
import concurrent.futures
import functools
import importlib.util
import json
import os
import re
import resource
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {"v4": "tpu:v4-8", "v5e": "tpu:v5e-4", "v5p": "tpu:v5p-8", "v6e": "tpu:v6e-4", "h100": "gpu:h100x8"}
MESHES = {"tpu": (2, 2), "gpu": (4, 2)}  # (data, tensor) over the target's first devices
WIDTHS = (768, 1024, 2048)
VOCABS = (50257, 32768, 8192)
ROWS = 256  # the head's rows per shard: the kernels' code does not depend on it, and XLA's sort compiles faster
ATTENTION = ((1024, 12, 64), (1024, 16, 128))  # (L, H, K), batch 2 per shard
# GPUs also compile what only they run: the flash kernels causal and under block diffusion's mask (x_t then x_0,
# blocks of 16), and float32 products (other tiles and warps) at the widest shape.
CAUSAL = (1024, 12, 64)
BLOCK_DIFFUSION = (2048, 12, 64, 16)  # (2L, H, K, block size)
FLOAT32_HEAD = (2048, 50257)

COMPILERS = importlib.util.find_spec("libtpu") is not None and importlib.util.find_spec("jax_plugins.xla_cuda12")
pytestmark = pytest.mark.skipif(not COMPILERS, reason="libtpu and the CUDA plugin (the compile extra) are not "
                                                      "installed: pip install -e '.[compile]'")


def _run(call: str, timeout: float = 600) -> dict:
  """``call`` (an expression over this module, ``t``) evaluated in a fresh interpreter with the compilers'
  environment; its JSON result. libtpu takes a lock file that would keep a second process (another test worker)
  from starting it; these processes only compile, so they share it. The suite's XLA_FLAGS stay: they lower the
  optimisation of XLA's own CPU and GPU code, not Mosaic's, Triton's or ptxas's."""
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_ENABLE_COMPILATION_CACHE="false")
  env.pop("JAX_PLATFORMS", None)
  code = ("import json, sys; sys.path.insert(0, 'tests'); from d3pm_jax.runtime import targets; "
          f"targets.prepare_environment(); import test_target_kernels as t; print(json.dumps({call}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env=env)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _mesh(spec: str, shape):
  import numpy as np
  from jax.sharding import Mesh

  from d3pm_jax.runtime import targets

  target = targets.parse_target(spec)
  devices = targets.devices(target)[:shape[0] * shape[1]]
  return target.platform, Mesh(np.array(devices).reshape(shape), ("data", "tensor"))


def _struct(mesh, shape, dtype, *spec):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*spec)))


def _lower(platform: str, mesh, program, *args):
  """``program`` traced with the kernels chosen for ``platform`` and the mesh in scope (``under_mesh_rules``)."""
  import jax

  from pallas_kernels.common import compiling_for

  with compiling_for(platform), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return jax.jit(program).lower(*args)


# ---------------------------------------------------------------- the cost the compiler sees

def head_flops(n: int, d: int, v: int) -> dict:
  """``cost_analysis()`` FLOPs of the fused head's forward and of its value and gradient (``h`` and ``W``), the
  Mosaic kernels compiled for one v5e with bfloat16 products."""
  import jax
  import jax.numpy as jnp

  from pallas_kernels import fused_ce

  platform, mesh = _mesh("tpu:v5e-4", (1, 1))
  args = (_struct(mesh, (n, d), jnp.bfloat16), _struct(mesh, (d, v), jnp.bfloat16), _struct(mesh, (n,), jnp.int32),
          _struct(mesh, (n,), jnp.float32))

  def loss(h, w, targets_N, weights_N):
    return fused_ce.weighted_ce_pallas_tpu(h, w, targets_N, weights_N, num_classes=v, exclude=v - 1,
                                           dot_dtype="bfloat16").sum()

  gradient = jax.value_and_grad(loss, argnums=(0, 1))
  return {name: _lower(platform, mesh, fn, *args).compile().cost_analysis()["flops"]
          for name, fn in (("forward", loss), ("value_and_grad", gradient))}


def test_the_compiler_counts_the_fused_heads_flops():
  """libtpu counts nothing inside a Pallas call but what the call declares (``pl.CostEstimate``). By hand, a
  product of [N, D] and [D, V] is 2 N D V FLOPs (a multiply and an add per term): the forward kernel computes the
  logits once, 2 N D V; the backward's dh kernel recomputes them (2 N D V) and multiplies dlogits by W^T (2 N D V),
  the dW kernel recomputes them too (2 N D V) and multiplies h^T by dlogits (2 N D V): 10 N D V for the value
  and gradient. The kernels iterate V padded to their tile (50,688 here, 0.9% more) and XLA's own ops (the sort of
  the rows by weight, the log-sum-exp) add under 0.1%. Dropping any kernel's estimate, or a backward kernel's
  recompute, moves the value and gradient's count by 20% or more, a forward factor the forward's by 50%."""
  n, d, v = 8192, 768, 50257
  flops = _run(f"t.head_flops({n}, {d}, {v})")
  assert flops["forward"] == pytest.approx(2 * n * d * v, rel=0.1)
  assert flops["value_and_grad"] == pytest.approx(10 * n * d * v, rel=0.1)


# ---------------------------------------------------------------- every kernel at every shape

def _every_kernel(platform: str, mesh):
  """``(program, args, expected)`` for ``platform`` under ``mesh``: ``expected`` counts the kernel custom calls
  its HLO must hold, by custom call target (prefix)."""
  import jax
  import jax.numpy as jnp

  from pallas_kernels import attention, fused_ce, fused_sample
  from pallas_kernels.common import compiling_for

  data, tensor = mesh.shape["data"], mesh.shape["tensor"]
  gpu = platform == "gpu"
  heads = [(d, v, "bfloat16") for d in WIDTHS for v in VOCABS] + ([FLOAT32_HEAD + ("float32",)] if gpu else [])
  attends = [(shape, "splash" if not gpu else "pallas", False, 0) for shape in ATTENTION]
  if gpu:
    attends += [(shape, "cudnn", False, 0) for shape in ATTENTION]
    attends += [(CAUSAL, "pallas", True, 0), (BLOCK_DIFFUSION[:3], "pallas", False, BLOCK_DIFFUSION[3])]
  with compiling_for(platform):
    losses = {dtype: fused_ce.select("pallas", dot_dtype=dtype) for dtype in ("bfloat16", "float32")}
    draws = {dtype: fused_sample.select("pallas", dot_dtype=dtype) for dtype in ("bfloat16", "float32")}
    kernels = ({"cudnn": attention.cudnn_attention, "pallas": attention.select("pallas")} if gpu
               else {"splash": attention.select("splash")})

  def program(head_args, attention_args):
    out = []
    for (h, w, targets_N, weights_N), (_, v, dtype) in zip(head_args, heads):
      loss = lambda h, w: losses[dtype](h, w, targets_N, weights_N, num_classes=v, exclude=v - 1).sum()
      out.append(jax.value_and_grad(loss, argnums=(0, 1))(h, w))
      out.append(draws[dtype](h, w, 7, num_classes=v, exclude=v - 1))
    for (q, k, v, segments, blocks), (_, impl, causal, block_size) in zip(attention_args, attends):
      extra = dict(blocks_BxL=blocks, block_size=block_size) if block_size else {}
      loss = lambda q, k, v: kernels[impl](q, k, v, segments, causal, **extra).astype(jnp.float32).sum()
      out.append(jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v))
    return out

  n = ROWS * data
  head_args = []
  for d, v, dtype in heads:
    columns = -(-v // 128) * 128 if tensor > 1 else v  # model.vocab_pad_multiple: they divide over 'tensor'
    head_args.append((_struct(mesh, (n, d), dtype, "data", None), _struct(mesh, (d, columns), dtype, None, "tensor"),
                      _struct(mesh, (n,), jnp.int32, "data"), _struct(mesh, (n,), jnp.float32, "data")))
  attention_args = []
  for (length, num_heads, width), _, _, block_size in attends:
    qkv = _struct(mesh, (2 * data, length, num_heads, width), jnp.bfloat16, "data", None, "tensor", None)
    ids = _struct(mesh, (2 * data, length), jnp.int32, "data", None)
    attention_args.append((qkv, qkv, qkv, ids, ids if block_size else None))
  flash = sum(impl != "cudnn" for _, impl, _, _ in attends)
  if gpu:  # the head's forward and dlogits kernels, the draw's; forward, dq and dk/dv; cuDNN's forward and backward
    expected = {"__gpu$xla.gpu.triton": 3 * len(heads) + 3 * flash, "__cudnn$fmha": 2 * len(ATTENTION)}
  else:  # the head's forward, dh and dW kernels, the draw's; splash's forward, dq and dk/dv
    expected = {"tpu_custom_call": 4 * len(heads) + 3 * flash}
  return program, (head_args, attention_args), expected


def compile_every_kernel(spec: str, layout: str) -> dict:
  """Compiles ``_every_kernel`` for target ``spec`` on one device (``layout`` 'one') or its ``MESHES`` mesh:
  the seconds the compile took and the CPU seconds it used (ptxas's included: a loaded machine stretches the
  first, not the second), the kernel custom calls of each kind in its HLO and those expected."""
  platform, mesh = _mesh(spec, (1, 1) if layout == "one" else MESHES[spec.partition(":")[0]])
  program, args, expected = _every_kernel(platform, mesh)
  lowered = _lower(platform, mesh, program, *args)
  start, cpu = time.perf_counter(), _cpu_seconds()
  hlo = lowered.compile().as_text()
  found = {kind: len(re.findall(rf'custom_call_target="{re.escape(kind)}', hlo)) for kind in expected}
  return {"seconds": time.perf_counter() - start, "cpu": _cpu_seconds() - cpu, "found": found, "expected": expected}


def _cpu_seconds() -> float:
  return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                        resource.RUSAGE_CHILDREN)))


@pytest.mark.slow
def test_every_shipped_kernel_compiles_for_every_target():
  """Two compiles at a time (each is mostly one thread; ptxas runs beside XLA:GPU), the longest first."""
  jobs = [(chip, layout) for chip in TARGETS for layout in ("mesh", "one")]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    reports = dict(zip(jobs, pool.map(lambda job: _run(f"t.compile_every_kernel({TARGETS[job[0]]!r}, "
                                                       f"{job[1]!r})"), jobs)))
  print("\n" + "\n".join(f"{chip:5s} {layout:4s} compiled in {r['seconds']:5.1f} s ({r['cpu']:5.1f} s of CPU), "
                         f"kernels {r['found']}" for (chip, layout), r in reports.items()))
  missing = {job: r for job, r in reports.items() if r["found"] != r["expected"]}
  assert not missing, f"kernel custom calls found != expected (the jnp twin ran instead?): {missing}"


# ---------------------------------------------------------------- what the compilers refuse

def oversized_head(platform: str) -> str:
  """The compiler's message for the fused head's forward with blocks too large for the chip: on v4 (16 MiB of
  VMEM) a [4096, 2048] bfloat16 W tile, double-buffered; on an H100, 256 x 256 tiles staged 128 columns of the
  width at a time in 4 stages (512 KiB of shared memory). Empty when it compiled."""
  import jax.numpy as jnp

  from pallas_kernels import fused_ce

  if platform == "tpu":
    spec, (n, d, v), head = "tpu:v4-8", (8, 4096, 2048), functools.partial(
        fused_ce.weighted_ce_pallas_tpu, block_n=8, tile_v=2048)
  else:
    spec, (n, d, v), head = "gpu:h100x8", (1024, 768, 8192), functools.partial(
        fused_ce.weighted_ce_pallas, block_n=256, tile_v=256, chunk_d=128, num_stages=4)
  platform, mesh = _mesh(spec, (1, 1))
  args = (_struct(mesh, (n, d), jnp.bfloat16), _struct(mesh, (d, v), jnp.bfloat16), _struct(mesh, (n,), jnp.int32),
          _struct(mesh, (n,), jnp.float32))
  loss = lambda h, w, targets_N, weights_N: head(h, w, targets_N, weights_N, num_classes=v,
                                                 dot_dtype="bfloat16").sum()
  try:
    _lower(platform, mesh, loss, *args).compile()
  except Exception as error:  # the compilers raise JaxRuntimeError; any other error fails the match below
    return str(error)
  return ""


@pytest.mark.parametrize("platform, limit", [
    ("tpu", r"Ran out of memory in memory space vmem\. Used [\d.]+M of 16\.00M vmem"),
    ("gpu", r"Shared memory size limit exceeded: requested 524288, available: 232448")], ids=["tpu", "gpu"])
def test_an_oversized_block_is_refused_by_the_compiler(platform, limit):
  message = _run(f"t.oversized_head({platform!r})")
  assert re.search(limit, message), message[-2000:]

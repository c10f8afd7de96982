"""The fused head's kernels compiled by the real TPU compiler for a chip that is not here: XLA:TPU with Mosaic
(libtpu), for one v5e (``runtime.targets``), whose cost analysis must count the kernels' FLOPs.

Every compile runs in a fresh interpreter (``_run``), which sets the compilers' environment before JAX starts its
backends there (``targets.prepare_environment``) and keeps libtpu and the CUDA plugin out of the suite's own
processes.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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

"""Compile this package's Triton kernels for sm_90 (H100/H200) on a machine without a GPU.

Lowering a Pallas kernel for ``('cuda',)`` only serialises its Triton IR into an XLA custom call: Triton's passes,
the shared-memory allocation and ptxas run inside XLA when the program is compiled on a GPU. This module takes
the IR that JAX emits and runs Triton's own pipeline on it with the ``triton`` package from the registry
(ttir -> ttgir -> llir -> ptx -> cubin, with ptxas), so that a kernel that would fail on the GPU - an array of
non-power-of-two size, a block over the shared memory of an sm_90 block, heavy register spills - fails here.

    kernels = triton_kernels(fn, *args)            # lower jax.jit(fn)(*args) for CUDA: one entry per pallas_call
    report = compile_sm90(kernels[0])              # {'shared': bytes, 'registers': ..., 'spill_stores': ...}

It stands in for XLA's own compile (whose Triton is a fork of some other version) until a GPU run confirms it:
``benchmarks/accelerator_check.py`` compiles and runs the same kernels through XLA on the hardware.
The compile runs in a subprocess (``python -m pallas_kernels.triton_check FILE WARPS STAGES``), so that
Triton's copy of LLVM and MLIR never shares a process with jaxlib's.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

# An sm_90 block may use at most this much shared memory (227 KiB, the opt-in maximum of H100 and H200).
SM90_SHARED_BYTES = 232_448


@dataclasses.dataclass(frozen=True)
class TritonKernel:
  """One ``pallas_call`` as XLA would receive it: the Triton module's text and its launch parameters."""
  name: str
  ttir: str
  num_warps: int
  num_stages: int


def triton_kernels(fn, *args) -> list[TritonKernel]:
  """The Triton kernels of ``jax.jit(fn)(*args)`` lowered for CUDA (``args`` may be ``ShapeDtypeStruct``s), in
  lowering order. Reads the modules as JAX's Pallas lowering builds them (a private function, wrapped for the
  duration of the call)."""
  import jax
  from jax._src.lib.mlir import ir
  from jax._src.pallas.triton import pallas_call_registration as registration

  modules = []
  original = registration.lowering.lower_jaxpr_to_triton_module

  def recording(*a, **k):
    result = original(*a, **k)
    modules.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  registration.lowering.lower_jaxpr_to_triton_module = recording
  try:
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = original
  calls = []

  def walk(operation):
    for region in operation.regions:
      for block in region.blocks:
        for op in block.operations:
          if op.operation.name == "stablehlo.custom_call" and "mhlo.backend_config" in op.attributes:
            config = op.attributes["mhlo.backend_config"]
            calls.append((ir.StringAttr(config["name"]).value, ir.IntegerAttr(config["num_warps"]).value,
                          ir.IntegerAttr(config["num_stages"]).value))
          walk(op.operation)

  walk(lowered.compiler_ir("stablehlo").operation)
  if len(calls) != len(modules):
    raise RuntimeError(f"found {len(calls)} Triton custom calls but captured {len(modules)} modules: JAX's Pallas "
                       "lowering has changed; update pallas_kernels/triton_check.py")
  kernels = []
  for (name, warps, stages), text in zip(calls, modules):
    if f"@{name}" not in text:
      raise RuntimeError(f"custom call {name!r} does not match its captured module; update triton_check.py")
    kernels.append(TritonKernel(name=name, ttir=text, num_warps=warps, num_stages=stages))
  return kernels


def compile_sm90(kernel: TritonKernel, timeout: float = 600) -> dict:
  """Triton's compile of ``kernel`` for sm_90, in a subprocess: ``{'ok': True, 'shared': bytes,
  'registers': per thread, 'spill_stores', 'spill_loads', 'stack': bytes, 'wgmma': bool, 'fits': shared <=
  SM90_SHARED_BYTES}``, or ``{'ok': False, 'error': the compiler's message}``."""
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, f"{kernel.name}.ttir")
    with open(path, "w") as f:
      f.write(kernel.ttir)
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=os.path.join(folder, "cache"))
    proc = subprocess.run([sys.executable, "-m", "pallas_kernels.triton_check", path, str(kernel.num_warps),
                           str(kernel.num_stages)], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode or not lines:
    return {"ok": False, "error": (proc.stderr.strip() or proc.stdout.strip())[-3000:]}
  return json.loads(lines[-1])


_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def _compile(path: str, num_warps: int, num_stages: int) -> dict:
  """Run Triton's CUDA stages on the module in ``path`` (this process only imports ``triton``)."""
  from triton._C.libtriton import ir
  from triton.backends.compiler import GPUTarget
  from triton.backends.nvidia.compiler import get_ptxas
  from triton.compiler.compiler import Language, make_backend

  backend = make_backend(GPUTarget("cuda", 90, 32))
  context = ir.context()
  ir.load_dialects(context)
  backend.load_dialects(context)
  module = ir.parse_mlir_module(path, context)
  module.context = context
  options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages, "num_ctas": 1})
  stages = {}
  backend.add_stages(stages, options, Language.TRITON)
  metadata = {}
  wgmma = False
  for name, stage in stages.items():
    if name == "cubin":
      break
    module = stage(module, metadata)
    if name == "ttgir":
      wgmma = "warp_group_dot" in str(module)
  ptx = module
  with tempfile.TemporaryDirectory() as folder:
    source = os.path.join(folder, "kernel.ptx")
    with open(source, "w") as f:
      f.write(ptx)
    proc = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", source, "-o",
                           os.path.join(folder, "kernel.cubin")], capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"ptxas failed:\n{proc.stderr}")
  frame, used = _FRAME.search(proc.stderr), _REGISTERS.search(proc.stderr)
  if not (frame and used):
    raise RuntimeError(f"cannot read ptxas's report:\n{proc.stderr}")
  stack, spill_stores, spill_loads = (int(x) for x in frame.groups())
  registers = int(used.group(1))
  shared = int(metadata["shared"])
  return {"ok": True, "shared": shared, "fits": shared <= SM90_SHARED_BYTES, "registers": registers,
          "stack": stack, "spill_stores": spill_stores, "spill_loads": spill_loads, "wgmma": wgmma}


if __name__ == "__main__":
  print(json.dumps(_compile(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))

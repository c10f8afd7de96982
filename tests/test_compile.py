"""``d3pm-compile``: a run's programs compiled by the real TPU and GPU compilers for chips that are not here.

The FLOP count the roofline uses is checked against an independent computation (XLA's cost analysis of the same
step lowered with every layer and micro-batch unrolled); the command's verdicts against programs built to fit or
not; the kernels against the target's platform.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from d3pm_jax.config import from_config
from d3pm_jax.models.transformer import Transformer
from d3pm_jax.runtime import flops, targets
from d3pm_jax.training import aot, train
from d3pm_jax.training.state import build_process, init_state, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config_module(name: str):
  spec = importlib.util.spec_from_file_location(f"{name}_config", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


test_config = _config_module("test")
COMPILERS = importlib.util.find_spec("libtpu") is not None and importlib.util.find_spec("jax_plugins.xla_cuda12")
needs_compilers = pytest.mark.skipif(not COMPILERS, reason="libtpu and the CUDA plugin (the compile extra) are not "
                                                           "installed: pip install -e '.[compile]'")
# A small model whose products dominate its elementwise work, so a count of products alone meets XLA's whole count.
SIZES = dict(d_model=256, num_heads=4, mlp_dim=768, num_layers=3, max_len=64)


def _step(arg, **overrides):
  raw = test_config.get_config(arg)
  raw.model.update(**SIZES)
  raw.data.seq_len = 64
  raw.train.batch_size = 8
  for key, value in overrides.items():
    section, name = key.split("__")
    raw[section][name] = value
  config = from_config(raw, vocab_size=256)
  model, optimizer = Transformer(config.model), make_optimizer(config.train)
  step = train.make_train_step(config, model, build_process(config.process, config.model), optimizer)
  return step, jax.eval_shape(lambda: init_state(config, model, optimizer)), jax.ShapeDtypeStruct((8, 64), jnp.int32)


@pytest.mark.parametrize("arg", [None, "autoregressive", "bd3lm", "uniform"])
def test_the_flop_count_sees_every_layer_and_micro_batch_as_an_unrolled_lowering_does(arg):
  """Scanned layers, rematerialised, over 2 micro-batches: the count of products equals XLA's cost analysis of the
  same step with its layers unrolled and one micro-batch (which has no loop to undercount), less the elementwise
  work XLA also counts (~1% here). Counting a scan body once would give a third (layers) or half (micro-batches)."""
  counted = flops.count(*_step(arg, model__scan_layers=True, model__remat=True, train__grad_accum=2))
  step, state, batch = _step(arg, model__scan_layers=False, model__remat=True, train__grad_accum=1)
  unrolled = jax.jit(step).lower(state, batch).cost_analysis()["flops"]
  assert counted.unbounded_loops == 0 and counted.uncounted_kernels == 0
  assert 0.97 * unrolled <= counted.flops <= unrolled, (counted.flops, unrolled)


def test_target_names_resolve_to_slices_and_bad_ones_list_the_valid_forms():
  assert (targets.parse_target("tpu:v4-64").num_devices, targets.parse_target("tpu:v4-64").num_hosts) == (32, 8)
  assert targets.parse_target("tpu:v5e-256").num_devices == 256
  assert targets.parse_target("tpu:v5p-128").num_devices == 64
  assert (targets.parse_target("gpu:h100x8x4").num_devices, targets.parse_target("gpu:h100x8x4").num_hosts) == (32, 4)
  assert targets.tpu_topology(targets.CHIPS["v5e"], 256) == "v5e:16x16"
  assert targets.tpu_topology(targets.CHIPS["v4"], 32) == "v4:2x4x4"
  for bad in ("tpu:v4-6", "tpu:v9-8", "gpu:a100x8", "cpu:8"):
    with pytest.raises(ValueError, match="valid: tpu:<chip>-<size>"):
      targets.parse_target(bad)


def _compile_cli(*args):
  """The command as a user runs it: without the XLA flags the suite compiles its own small programs with."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "d3pm_jax.cli.compile", "--config=configs/test.py", *args],
                        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


KERNELS = ["--config.model.head_impl=auto", "--config.model.attention_impl=auto", "--config.model.dtype=bfloat16",
           "--config.data.seq_len=128", "--config.model.max_len=128", "--config.train.batch_size=16"]


@needs_compilers
@pytest.mark.slow
@pytest.mark.parametrize("target,kinds", [("tpu:v5e-8", ("Mosaic",)), ("gpu:h100x8", ("Triton", "cuDNN"))])
def test_each_program_compiles_for_the_target_with_its_platforms_kernels(target, kinds):
  """The train step, evaluation step and sampler of a run with 'auto' kernels compile on 8 devices of each
  platform, each holding that platform's kernels (chosen for the target, though this process's backend is the
  CPU), and fit with room to spare."""
  result = _compile_cli(f"--target={target}", *KERNELS)
  assert result.returncode == 0, result.stderr[-3000:]
  blocks = result.stdout.split("\n" + "train step:")[1]
  for program in ("eval step:", "sampler (4 steps):"):
    assert program in blocks, result.stdout
  for line in result.stdout.splitlines():
    if line.startswith("  kernels:"):
      assert all(kind in line for kind in kinds), line
    if line.startswith("  memory per device:"):
      assert ", fits (" in line, line


@needs_compilers
@pytest.mark.slow
def test_a_program_that_compiles_but_does_not_fit_exits_2_with_its_buffers_and_the_knobs():
  """A head and embedding of 393,216 rows (the vocabulary padded) of width 1024: a train state of 12.1 GiB
  (parameters, two Adam moments and EMA in float32) and Adam's temporaries need more than the 14.4 GiB allowed of a
  16 GiB v5e chip, yet libtpu compiles the step (it checks only the temporaries against HBM). The command reads
  the fit from the memory analysis and says what would help."""
  result = _compile_cli("--target=tpu:v5e-1", "--config.model.d_model=1024", "--config.model.num_heads=8",
                        "--config.model.vocab_pad_multiple=393216", "--config.train.batch_size=8",
                        "--programs=train")
  assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
  assert "train step: compiled in" in result.stdout and "DOES NOT FIT" in result.stdout
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith("d3pm-compile: error: the train step needs")
  assert "largest buffers: f32[" in message and "--config.mesh.fsdp=-1" in message and "model.remat" in message


def test_without_the_compiler_it_names_the_command_that_installs_it():
  """As if libtpu were not installed: exit 2 and the pip command pinned to this JAX's version."""
  code = ("import importlib.util as u, sys; real = u.find_spec; "
          "u.find_spec = lambda name, *a: None if name == 'libtpu' else real(name, *a); "
          "sys.argv = ['d3pm-compile', '--config=configs/test.py', '--target=tpu:v4-8']; "
          "from d3pm_jax.cli import compile; compile.run()")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 2, result.stderr[-2000:]
  assert f'pip install "jax[tpu,cuda12]=={jax.__version__}"' in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("jax_plugins.xla_cuda12") is None,
                    reason="the CUDA plugin is not installed")
def test_a_command_on_a_machine_without_a_gpu_driver_prints_no_traceback():
  """With the compile extra installed, JAX logs the CUDA plugin's failed start (no driver) with a traceback; a
  d3pm command, without the compile environment the tests run with, prints one line for it instead."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES")}
  code = ("import jax; from absl import app; from d3pm_jax.cli import common; "
          "app.run(common.guarded(lambda argv: print(jax.devices())))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "no GPU driver answered" in result.stderr, result.stderr[-3000:]


def test_a_failure_paragraph_names_the_compilers_message_and_the_knobs():
  """A refused program's report carries the compiler's own words into the one paragraph."""
  from d3pm_jax.cli import compile as compile_cli
  raw = test_config.get_config()
  config = from_config(raw, vocab_size=256)
  refused = aot.Program("train step", 1.0, error="RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm.")
  target = targets.parse_target("tpu:v5e-8")
  text = compile_cli.failure(config, target, [refused])
  assert "does not compile for tpu:v5e-8" in text and "Ran out of memory in memory space hbm" in text
  assert "model.remat=True" in text and "head_impl=auto" in text


@needs_compilers
def test_each_targets_devices_are_of_its_chip():
  """The compiler's topology for each example target has the target's chip count, and its devices' kind maps back
  to the chip whose peaks the roofline uses (so accelerator_check, on the real chip, picks the same figures)."""
  for name in targets.EXAMPLES:
    target = targets.parse_target(name)
    devices = targets.devices(target)
    assert len(devices) == target.num_devices
    assert {targets.chip_of(d.device_kind) for d in devices} == {target.chip}, (name, devices[0].device_kind)


def test_the_roofline_bounds_time_by_the_slower_resource_and_mfu_by_one():
  """On one v5e (197 TFLOP/s, 819 GB/s): 1.97e12 FLOPs take at least 10 ms, 8.19e9 bytes at least 10 ms too; the
  larger wins, and an MFU bound whose plain-model FLOPs outnumber the counted ones (an uncounted kernel) is 1."""
  target = targets.parse_target("tpu:v5e-1")
  memory = aot.Memory(state=0, arguments=0, outputs=0, aliased=0, temporaries=0, code=0)
  compute = aot.roofline(aot.Program("p", 0.0, memory, flops=1.97e12, model_flops=0.985e12, hbm_bytes=4.1e9), target)
  assert compute.bound == "compute" and compute.seconds == pytest.approx(0.01) and compute.mfu == pytest.approx(0.5)
  slow = aot.roofline(aot.Program("p", 0.0, memory, flops=1e12, model_flops=1e12, hbm_bytes=16.38e9), target)
  assert slow.bound == "memory" and slow.seconds == pytest.approx(0.02)
  assert aot.roofline(aot.Program("p", 0.0, memory, flops=1e12, model_flops=3e12, hbm_bytes=0.0), target).mfu == 1.0

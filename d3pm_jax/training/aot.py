"""A run's real programs compiled ahead of time for a TPU or GPU slice that is not here (``d3pm-compile``).

``compile_programs(config, target)`` builds the train step, the evaluation step and the sampler exactly as
``d3pm-train`` does (``train.make_placement``, ``train.compile_steps``, ``state.make_sampler``), on the target's
devices (``runtime.targets``), with the kernels chosen for the target's platform, and compiles each from abstract
shapes: no data, parameters or accelerator. For each it reports what the compiler decided - per-device memory,
the kernels and collectives in the program - and a roofline bound from the chip's published peaks.

Memory is ``memory_analysis()``'s: arguments + outputs - aliased (donated) + temporaries + generated code, per
device. A compile that succeeds is not a fit: libtpu refuses only temporaries above HBM, and XLA:GPU warns and
compiles. The fit compares the total with HBM less ``targets.FIT_MARGIN``.

The roofline: FLOPs from the traced program (``runtime.flops``: every layer, micro-batch, sampler step and kernel),
HBM bytes from the compiled cost where the compiler gives one (libtpu; it counts a loop body once, so this is a lower
bound), and at least the program's arguments and outputs. The step cannot take less than
``max(FLOPs / peak, bytes / bandwidth)`` per device, and MFU (the model's FLOPs without rematerialisation or the
kernels' recomputation, over that time at peak) cannot exceed the bound printed.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from d3pm_jax.config import ExperimentConfig
from d3pm_jax.data import prepared
from d3pm_jax.models.transformer import Transformer
from d3pm_jax.runtime import flops as flops_lib, hlo, sharding, targets
from d3pm_jax.training import train
from d3pm_jax.training.state import build_process, init_state, make_optimizer, make_sampler
from pallas_kernels.common import compiling_for

# Vocabularies of the tokenizers when no prepared data set is at hand (d3pm-prepare's defaults); ``sentencepiece``
# is data.spm_vocab_size, or D3PM's 8192 on LM1B.
TOKENIZER_VOCAB = {"bytes": 256, "text8": 27, "gpt2": 50257, "wordpiece": 30522}
KERNEL_TARGETS = {"tpu_custom_call": "Mosaic", "__gpu$xla.gpu.triton": "Triton"}


@dataclasses.dataclass(frozen=True)
class DataShape:
  """What the programs need of the data: the tokenizer's vocabulary and whether rows carry segment ids."""
  vocab_size: int
  segments: bool
  source: str


def data_shape(config: ExperimentConfig) -> DataShape:
  """From the prepared data set's metadata when it is here, else the tokenizer's nominal vocabulary and
  d3pm-prepare's default packing for the data set (LM1B's MDLM setup pads one sentence per row: segment ids)."""
  data = config.data
  path = data.prepared_dir
  if path and os.path.exists(os.path.join(path, prepared.METADATA)):
    metadata = prepared.load_metadata(path)
    return DataShape(int(metadata["tokenizer"]["vocab_size"]), metadata["packing"] not in prepared.UNSEGMENTED,
                     path)
  if data.tokenizer == "sentencepiece":
    vocab = 8192 if data.name == "lm1b" else data.spm_vocab_size
  else:
    vocab = TOKENIZER_VOCAB[data.tokenizer]
  segments = data.name == "lm1b" and data.tokenizer == "wordpiece" and not path.rstrip("/").endswith("_stream")
  return DataShape(vocab, segments, f"{data.tokenizer} tokenizer's vocabulary (no prepared data read)")


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-device bytes: the train state's shards (parameters, optimiser state, EMA), and ``memory_analysis()``'s
  parts."""
  state: int
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


@dataclasses.dataclass(frozen=True)
class Program:
  """One compiled program's report; ``error`` holds the compiler's message when it refused the program."""
  name: str
  compile_seconds: float
  memory: Memory | None = None
  kernels: tuple = ()          # the kind of each kernel call the compiled program holds
  kernel_names: tuple = ()     # the Pallas kernels the traced program calls
  collectives: dict = dataclasses.field(default_factory=dict)
  flops: float = 0.0           # per step, all devices, as executed (rematerialisation and recomputation included)
  model_flops: float = 0.0     # the same program's FLOPs without rematerialisation or fused kernels
  hbm_bytes: float = 0.0       # per device, a lower bound
  unbounded_loops: int = 0
  uncounted_kernels: int = 0
  largest: tuple = ()          # (bytes, description) of the program's largest buffers
  error: str | None = None


def shard_bytes(tree) -> int:
  """Bytes one device holds of ``tree``'s arrays (``ShapeDtypeStruct``s with shardings)."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def _abstract(tree, shardings):
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def kernels_in(hlo_text: str) -> tuple:
  """The kind of every kernel custom call in compiled HLO (Mosaic, Triton or cuDNN), one entry per call: the kernels
  the compiler kept (the traced program's Pallas calls are named by ``runtime.flops``)."""
  found = []
  for target in re.findall(r'custom_call_target="([^"]+)"', hlo_text):
    if target in KERNEL_TARGETS:
      found.append(KERNEL_TARGETS[target])
    elif target.startswith("__cudnn$"):
      found.append("cuDNN " + target[len("__cudnn$"):])
  return tuple(found)


def largest_buffers(hlo_text: str, count: int = 3) -> tuple:
  """The ``count`` largest array results of the compiled program's instructions, ``(bytes, 'dtype[shape] op
  (source op)')``, largest first: where the memory goes when a program does not fit."""
  seen = {}
  for line in hlo_text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\S+?)\(", line)
    if not match or match.group(3) == "parameter":
      continue
    found = hlo.arrays(match.group(2))
    if match.group(2).startswith("(") or len(found) != 1:  # a tuple's arrays are counted where they are made
      continue
    dtype, dims = found[0]
    size = hlo.array_bytes(dtype, dims)
    source = re.search(r'op_name="([^"]+)"', line)
    what = f"{dtype}[{','.join(map(str, dims))}] {match.group(3)}" + (f" ({source.group(1)})" if source else "")
    seen[what] = max(seen.get(what, 0), size)
  return tuple(sorted(((b, w) for w, b in seen.items()), reverse=True)[:count])


def _report(name, build, args, flop_fn, model_flop_fn, state_bytes: int, target, roofline: bool = True) -> Program:
  """Compiles ``build()``'s jitted function at ``args`` for the target and reads what the compiler decided; with
  ``roofline``, counts its FLOPs (``flop_fn``, and the plain model's, ``model_flop_fn``)."""
  started = time.perf_counter()
  try:
    with compiling_for(target.platform):
      compiled = build().lower(*args).compile()
  except Exception as e:  # noqa: BLE001 - the compiler's refusal is the report
    return Program(name, time.perf_counter() - started, error=" ".join(str(e).split()))
  seconds = time.perf_counter() - started
  stats = compiled.memory_analysis()
  memory = Memory(state=state_bytes, arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
                  aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
                  code=stats.generated_code_size_in_bytes)
  text = compiled.as_text()
  with compiling_for(target.platform):
    count = flop_fn() if roofline else flops_lib.Count(0.0)
  model = model_flop_fn() if roofline else flops_lib.Count(0.0)
  hbm_bytes = targets.hbm_bytes_at_least(compiled)
  return Program(name, seconds, memory, kernels_in(text), tuple(sorted(count.kernels)),
                 hlo.summary(hlo.collectives(text)), count.flops, model.flops, hbm_bytes, count.unbounded_loops,
                 count.uncounted_kernels, largest_buffers(text))


def _plain(config: ExperimentConfig) -> ExperimentConfig:
  """The same model computed plainly: no rematerialisation, XLA attention and head (its FLOPs are the model's)."""
  model = dataclasses.replace(config.model, remat=False, attention_impl="xla", head_impl="xla")
  return dataclasses.replace(config, model=model)


PROGRAMS = ("train", "eval", "sampler")


def compile_programs(config: ExperimentConfig, target: targets.Target, segments: bool = False,
                     programs: tuple = PROGRAMS, devices=None, roofline: bool = True) -> list[Program]:
  """``programs`` of ``config`` (of ``PROGRAMS``: the train step, the evaluation step, the sampler) compiled for
  ``target`` (the caller has run ``targets.prepare_environment()`` before JAX started); ``roofline=False`` skips
  counting their FLOPs."""
  devices = targets.devices(target) if devices is None else devices
  tcfg = config.train

  def parts(cfg):
    model = Transformer(cfg.model)
    optimizer = make_optimizer(cfg.train)
    process = build_process(cfg.process, cfg.model, np.ones(cfg.model.vocab_size)
                            if cfg.process.schedule == "mutual_information" else None)
    placement = train.make_placement(cfg, model, optimizer, devices=devices)
    return model, optimizer, process, placement

  model, optimizer, process, placement = parts(config)
  abstract_state = _abstract(jax.eval_shape(lambda: init_state(config, model, optimizer)), placement.state)
  state_bytes = shard_bytes(abstract_state)
  batch = jax.ShapeDtypeStruct((tcfg.batch_size, config.data.seq_len), jnp.int32, sharding=placement.batch)
  tokens = (batch, batch) if segments else batch
  window = (jax.ShapeDtypeStruct((2,), jnp.float32, sharding=placement.replicated),) if config.process.clip_search \
      else ()
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=placement.replicated)
  weights = jax.ShapeDtypeStruct(batch.shape, jnp.float32, sharding=placement.batch)
  eval_args = (abstract_state.params, key, batch, weights, batch if segments else None)
  plain = _plain(config)

  def step_flops(cfg):
    def run():
      m, opt, proc, place = parts(cfg)
      state = jax.eval_shape(lambda: init_state(cfg, m, opt))
      step = sharding.under_mesh_rules(train.make_train_step(cfg, m, proc, opt), place.mesh, cfg.mesh.rules)
      return flops_lib.count(step, state, tokens, *window)
    return run

  def eval_flops(cfg):
    def run():
      m, _, proc, place = parts(cfg)
      step = sharding.under_mesh_rules(train.make_eval_step(cfg, m, proc), place.mesh, cfg.mesh.rules)
      return flops_lib.count(step, *eval_args)
    return run

  def sampler(cfg):
    m, _, proc, place = parts(cfg)
    return make_sampler(cfg, m, proc, cfg.train.sample_steps, cfg.train.num_samples, out_sharding=place.replicated,
                        mesh=place.mesh)

  def sampler_flops(cfg):
    return lambda: flops_lib.count(sampler(cfg), abstract_state.params, key)

  reports = {
      "train": lambda: _report("train step", lambda: train.compile_steps(config, model, process, optimizer,
                                                                         placement)[0],
                               (abstract_state, tokens) + window, step_flops(config), step_flops(plain), state_bytes,
                               target, roofline),
      "eval": lambda: _report("eval step", lambda: train.compile_steps(config, model, process, optimizer,
                                                                       placement)[1],
                              eval_args, eval_flops(config), eval_flops(plain), shard_bytes(abstract_state.params),
                              target, roofline),
      "sampler": lambda: _report(f"sampler ({tcfg.sample_steps} steps)", lambda: sampler(config),
                                 (abstract_state.params, key), sampler_flops(config), sampler_flops(plain),
                                 shard_bytes(abstract_state.params), target, roofline),
  }
  return [reports[name]() for name in PROGRAMS if name in programs]


@dataclasses.dataclass(frozen=True)
class Roofline:
  seconds: float      # lower bound on one call's time
  mfu: float          # upper bound on model FLOPs utilisation
  bound: str          # 'compute' or 'memory'


def roofline(program: Program, target: targets.Target) -> Roofline:
  """The lower bound on the program's time on ``target`` and the upper bound on its MFU, from the chip's peaks."""
  seconds, bound = targets.roofline_seconds(program.flops / target.num_devices, program.hbm_bytes, target.chip)
  seconds = max(seconds, 1e-12)
  # MFU never exceeds 1; the ratio can, where the model's plain FLOPs outnumber those counted in the program
  # (kernels without a cost estimate, splash attention's, count nothing).
  return Roofline(seconds, min(1.0, program.model_flops / target.num_devices / target.chip.peak_flops / seconds),
                  bound)

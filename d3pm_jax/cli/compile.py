"""``d3pm-compile --config=FILE[:arg] --target=T [--config.section.key=value ...]``: compile a run for a TPU or GPU
slice that is not here, and say whether it fits.

T is ``tpu:v4-64`` / ``tpu:v5e-256`` / ``tpu:v5p-128`` / ``tpu:v6e-64`` (Cloud TPU names: v4 and v5p count
TensorCores, two per chip) or ``gpu:h100x8`` / ``gpu:h100x8x4`` (4 hosts of 8) / ``gpu:h200x8``. The config's train
step, evaluation step and sampler are compiled by the target's real compiler (libtpu's XLA:TPU with Mosaic, or
XLA:GPU with ptxas) from abstract shapes, at the config's batch, length, dtype, mesh (resolved to the target's
devices) and kernels, the kernels chosen for the target's platform. For each program it prints per-device memory
against the chip's HBM, compile seconds, the kernels and collectives in the compiled program, and a roofline bound
on step time and MFU from the chip's published peaks (``runtime/targets.py`` names each source).

Exit status 0 when every program compiles and fits, 2 (one paragraph on stderr, naming the largest buffers and the
knobs that would help) when one does not. Needs the compilers: ``pip install -e '.[compile]'``. What a compile does
not show: run time, autotuning (XLA:GPU picks fallback GEMM configurations without a device), and whether cuDNN
builds its attention plan on the real driver.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

from d3pm_jax.runtime import targets

# Before JAX starts a backend, in this command's process only. It compiles for the target's devices and never uses
# this machine's own accelerators (a TPU or GPU host keeps them for the jobs running there).
targets.prepare_environment()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from d3pm_jax.cli import common  # noqa: E402
from d3pm_jax.config import base_config, from_config  # noqa: E402
from d3pm_jax.runtime import files  # noqa: E402
from d3pm_jax.training import aot  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally with ':arg'.",
                                          lock_config=True)
_TARGET = flags.DEFINE_string("target", None, f"The slice to compile for, e.g. {', '.join(targets.EXAMPLES)}.")
_SEGMENTS = flags.DEFINE_enum("segments", "auto", ["auto", "yes", "no"],
                              "Whether training rows carry segment ids (packed or padded data); auto: the prepared "
                              "data set's metadata when present, else d3pm-prepare's default for the data set.")
_PROGRAMS = flags.DEFINE_multi_enum("programs", ["train", "eval", "sampler"], ["train", "eval", "sampler"],
                                    "Which programs to compile (repeat or comma-separate): the train step, the "
                                    "evaluation step, the sampler.")
_ROOFLINE = flags.DEFINE_boolean("roofline", True, "Count each program's FLOPs for the roofline bound (it traces "
                                 "the program twice more); --noroofline reports memory, kernels and collectives only.")
_JSON = flags.DEFINE_string("json", None, "Also write the report to this JSON file (benchmarks/compile_table.py "
                            "assembles the README's table from these).")
flags.mark_flags_as_required(["config", "target"])

GIB = float(1 << 30)
COMPILERS = {"tpu": ("libtpu", "libtpu (jax[tpu])"), "gpu": ("jax_plugins.xla_cuda12", "the CUDA plugin (jax[cuda12])")}


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


def _gib(n: float) -> str:
  return f"{n / GIB:.2f}"


def _bytes(n: float) -> str:
  for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{int(n)} B"


def _seconds(s: float) -> str:
  return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def describe(program, target, roofline: bool = True) -> list[str]:
  """The lines printed for one compiled program (its roofline line only where its FLOPs were counted)."""
  if program.error:
    return [f"{program.name}: refused by the compiler after {program.compile_seconds:.1f} s: {program.error}"]
  m, usable = program.memory, target.usable_bytes
  verdict = "fits" if m.total <= usable else "DOES NOT FIT"
  kinds = {kind: program.kernels.count(kind) for kind in sorted(set(program.kernels))}
  roof = aot.roofline(program, target)
  loops = (f"; {program.unbounded_loops} while loop(s) of unknown trip count counted once"
           if program.unbounded_loops else "")
  loops += (f"; {program.uncounted_kernels} Pallas call(s) without a cost estimate (splash attention's) not "
            f"counted" if program.uncounted_kernels else "")
  collectives = ", ".join(
      f"{kind} x{c['count']} ({_bytes(c['bytes'])}" + (f"; {c['in_loop']} inside loops)" if c["in_loop"] else ")")
      for kind, c in program.collectives.items())
  return [
      f"{program.name}: compiled in {program.compile_seconds:.1f} s",
      f"  memory per device: {_gib(m.total)} GiB of {_gib(target.chip.hbm_bytes)} GiB HBM, {verdict} (at most "
      f"{_gib(usable)} GiB: {targets.FIT_MARGIN:.0%} kept free); state {_gib(m.state)} GiB (parameters, optimiser "
      f"and EMA); arguments {_gib(m.arguments)}, outputs {_gib(m.outputs)}, aliased {_gib(m.aliased)}, "
      f"temporaries {_gib(m.temporaries)}, code {_gib(m.code)} GiB",
      "  kernels: " + (", ".join(f"{kind} x{n}" for kind, n in kinds.items()) or "none (XLA only)")
      + (f" (Pallas: {', '.join(program.kernel_names)})" if program.kernel_names else ""),
      "  collectives per device (written once each; one inside a loop runs every iteration): "
      + (collectives or "none"),
  ] + ([f"  roofline: {program.flops:.3g} FLOPs per call on all devices (model {program.model_flops:.3g}), >= "
        f"{_gib(program.hbm_bytes)} GiB of HBM traffic per device -> at least {_seconds(roof.seconds)} "
        f"({roof.bound}-bound), MFU at most {roof.mfu:.0%}{loops}"] if roofline else [])


def knobs(config) -> str:
  """The settings that would shrink a program that does not fit, given what the config already does."""
  helps = ["a smaller train.batch_size or a larger train.grad_accum (fewer rows per device at once)"]
  if config.mesh.fsdp == 1:
    helps.append("--config.mesh.fsdp=-1 --config.mesh.data=1 (shard parameters, optimiser state and EMA)")
  if config.mesh.tensor == 1:
    helps.append("--config.mesh.tensor=2 or more (shard heads, MLP and vocabulary)")
  if not config.model.remat:
    helps.append("--config.model.remat=True (recompute each block in the backward pass)")
  if config.model.head_impl == "xla":
    helps.append("--config.model.head_impl=auto (the target's fused head never holds the [rows, vocabulary] "
                 "logits)")
  if config.model.vocab_pad_multiple == 1:
    helps.append("--config.model.vocab_pad_multiple=128 (a vocabulary that divides a tensor axis)")
  return "; ".join(helps)


def failure(config, target, programs) -> str | None:
  """One paragraph on the programs that did not compile or fit, or None."""
  bad = [p for p in programs if p.error or p.memory.total > target.usable_bytes]
  if not bad:
    return None
  parts = []
  for p in bad:
    if p.error:
      parts.append(f"the {p.name} does not compile for {target.name}; the compiler said: "
                   f"{p.error[:1500].rstrip('.')}")
    else:
      largest = ", ".join(f"{what} {_bytes(b)}" for b, what in p.largest)
      m = p.memory
      parts.append(f"the {p.name} needs {_gib(m.total)} GiB per device (state {_gib(m.state)}, temporaries "
                   f"{_gib(m.temporaries)}), more than the {_gib(target.usable_bytes)} GiB a {target.chip.name} "
                   f"allows ({targets.FIT_MARGIN:.0%} of its HBM kept free); its largest buffers: {largest}")
  return "; ".join(parts) + f". What would help: {knobs(config)}."


def report(config_name: str, target, programs, roofline: bool = True) -> dict:
  """The printed report as data: per program its memory, fit, compile time, kernels, collectives and (where
  counted) roofline."""
  rows = []
  for p in programs:
    row = {"name": p.name, "compile_seconds": p.compile_seconds, "error": p.error}
    if not p.error:
      row.update(memory={**dataclasses.asdict(p.memory), "total": p.memory.total}, fits=p.memory.total <=
                 target.usable_bytes, kernels=list(p.kernels), kernel_names=list(p.kernel_names),
                 collectives=p.collectives)
      if roofline:
        roof = aot.roofline(p, target)
        row.update(flops=p.flops, model_flops=p.model_flops, hbm_bytes=p.hbm_bytes, step_seconds=roof.seconds,
                   mfu_bound=roof.mfu, bound=roof.bound)
    rows.append(row)
  return {"config": config_name, "target": target.name, "chip": target.chip.name, "devices": target.num_devices,
          "hbm_bytes": target.chip.hbm_bytes, "usable_bytes": target.usable_bytes, "programs": rows}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  target = targets.parse_target(_TARGET.value)
  module, package = COMPILERS[target.platform]
  if not _installed(module):
    raise ValueError(f"--target={target.name} needs {package}, which is not installed; install it with "
                     f"{targets.install_command()}")
  raw = _CONFIG.value
  shape = aot.data_shape(from_config(raw, vocab_size=2))
  config = from_config(raw, vocab_size=shape.vocab_size)
  segments = shape.segments if _SEGMENTS.value == "auto" else _SEGMENTS.value == "yes"
  mesh = config.mesh.shape(target.num_devices)
  rows = config.train.batch_size // (mesh[0] * mesh[1])
  print(f"{config_flags.get_config_filename(flags.FLAGS['config'])} for {target.name}: {target.num_devices} x "
        f"{target.chip.name} on {target.num_hosts} host(s); mesh (data, fsdp, tensor) = {mesh}; batch "
        f"{config.train.batch_size} x {config.data.seq_len} ({rows} rows per data shard, grad_accum "
        f"{config.train.grad_accum}); vocabulary {config.model.vocab_size} ({shape.source}), rows "
        f"{'with' if segments else 'without'} segment ids; model dtype {config.model.dtype}, attention "
        f"{config.model.attention_impl}, head {config.model.head_impl}, remat {config.model.remat}")
  programs = aot.compile_programs(config, target, segments, tuple(_PROGRAMS.value), roofline=_ROOFLINE.value)
  for program in programs:
    print("\n".join(describe(program, target, _ROOFLINE.value)), flush=True)
  if _JSON.value:
    files.write_json(_JSON.value, report(config_flags.get_config_filename(flags.FLAGS["config"]), target, programs,
                                         _ROOFLINE.value))
  problem = failure(config, target, programs)
  if problem:
    common.fail(problem)


def run():
  common.run(main, "d3pm-compile", schema=base_config)


if __name__ == "__main__":
  run()

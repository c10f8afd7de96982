"""Accelerators this library compiles for without having them: each chip's published figures, target names such as
``tpu:v5e-256`` or ``gpu:h100x8``, and the target's devices from a real compiler's topology.

libtpu (``jax[tpu]``) and the CUDA plugin (``jax[cuda12]``) each hold a real compiler - XLA:TPU with Mosaic, XLA:GPU
with ptxas - that compiles for a topology of devices without any chip being present
(``jax.experimental.topologies``). A program lowered with ``ShapeDtypeStruct`` inputs sharded over those devices
and compiled there is what the chips would run: its VMEM, shared memory and HBM use are the compiler's own.

Target names follow Cloud TPU's: the number after a v4 or v5p counts TensorCores (two per chip: ``v4-8`` is 4 chips,
``v5p-128`` is 64), after a v5e or v6e it counts chips. A GPU target is ``gpu:<chip>x<per host>[x<hosts>]``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

FIT_MARGIN = 0.10  # of HBM left free: the runtime's own buffers, the input pipeline, checkpoint staging, fragmentation
HOST_BOUNDS = (2, 2, 1)  # TPU chips per host (a 4-chip host, as v4, v5p and most v5e/v6e hosts are)
GPU_TARGETS = os.path.join(os.path.dirname(__file__), "gpu_targets")
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip's published figures: dense bfloat16 matmul FLOP/s, HBM bytes and HBM bytes/s, each from
  ``source``. For a TPU, the topology name's prefix and chip configuration libtpu expects, and how many units of a
  Cloud TPU name (``v4-8``) one chip is."""
  key: str
  name: str
  platform: str
  peak_flops: float
  hbm_bytes: int
  hbm_bandwidth: float
  source: str
  topology: str = ""
  chip_config: str = "default"
  units_per_chip: int = 1


CHIPS = {c.key: c for c in (
    Chip("v4", "TPU v4", "tpu", 275e12, 32 * GIB, 1228e9, "https://cloud.google.com/tpu/docs/v4",
         topology="v4", chip_config="megacore", units_per_chip=2),
    Chip("v5e", "TPU v5e", "tpu", 197e12, 16 * GIB, 819e9, "https://cloud.google.com/tpu/docs/v5e",
         topology="v5e"),
    Chip("v5p", "TPU v5p", "tpu", 459e12, 95 * GIB, 2765e9, "https://cloud.google.com/tpu/docs/v5p",
         topology="v5", chip_config="megacore", units_per_chip=2),
    Chip("v6e", "TPU v6e (Trillium)", "tpu", 918e12, 32 * GIB, 1640e9, "https://cloud.google.com/tpu/docs/v6e",
         topology="v6e"),
    # The GPUs' memory is the device's own size in its target description (gpu_targets/*.txtpb).
    Chip("h100", "NVIDIA H100 SXM", "gpu", 989.4e12, 84929347584, 3.35e12,
         "https://www.nvidia.com/en-us/data-center/h100/ (datasheet: dense BF16 989.4 TFLOPS, 3.35 TB/s)"),
    Chip("h200", "NVIDIA H200 SXM", "gpu", 989.4e12, 150754820096, 4.8e12,
         "https://www.nvidia.com/en-us/data-center/h200/ (datasheet: dense BF16 989 TFLOPS, 4.8 TB/s)"),
)}
EXAMPLES = ("tpu:v4-8", "tpu:v4-64", "tpu:v5e-256", "tpu:v5p-128", "tpu:v6e-64", "gpu:h100x8", "gpu:h100x8x4",
            "gpu:h200x8")


@dataclasses.dataclass(frozen=True)
class Target:
  """A named slice of ``num_devices`` chips over ``num_hosts`` hosts."""
  name: str
  chip: Chip
  num_devices: int
  num_hosts: int

  @property
  def platform(self) -> str:
    return self.chip.platform

  @property
  def usable_bytes(self) -> int:
    """What a program may use on one device and still fit: HBM less ``FIT_MARGIN``."""
    return int(self.chip.hbm_bytes * (1 - FIT_MARGIN))


# A device's ``device_kind`` (as JAX reports it on the chip, or on a topology's device) -> its chip.
_KINDS = (("H200", "h200"), ("H100", "h100"), ("v5 lite", "v5e"), ("v5e", "v5e"), ("v6", "v6e"), ("v5", "v5p"),
          ("v4", "v4"))


def chip_of(device_kind: str) -> Chip | None:
  """The chip of a device whose ``device_kind`` is given ('NVIDIA H100 80GB HBM3', 'TPU v5 lite', ...), or None
  for one this table has no figures for."""
  return next((CHIPS[key] for text, key in _KINDS if text in device_kind), None)


def roofline_seconds(flops_per_device: float, bytes_per_device: float, chip: Chip) -> tuple[float, str]:
  """The least time a program can take on one ``chip`` (its published peaks), and what bounds it."""
  compute, memory = flops_per_device / chip.peak_flops, bytes_per_device / chip.hbm_bandwidth
  return max(compute, memory), ("compute" if compute >= memory else "memory")


def hbm_bytes_at_least(compiled) -> float:
  """A lower bound on the HBM bytes one call of ``compiled`` moves per device: its arguments and outputs, or the
  compiler's own count where it gives one (libtpu's, which counts a loop body once)."""
  stats, cost = compiled.memory_analysis(), compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return max(float(cost.get("bytes accessed", 0.0)), float(stats.argument_size_in_bytes + stats.output_size_in_bytes))


def _bad(spec: str, why: str) -> ValueError:
  return ValueError(f"target {spec!r}: {why}; valid: tpu:<chip>-<size> with chip in "
                    f"{sorted(k for k, c in CHIPS.items() if c.platform == 'tpu')}, or gpu:<chip>x<devices per "
                    f"host>[x<hosts>] with chip in {sorted(k for k, c in CHIPS.items() if c.platform == 'gpu')}, "
                    f"for example {', '.join(EXAMPLES)}")


def parse_target(spec: str) -> Target:
  """``tpu:v5e-256`` (256 chips), ``tpu:v4-64`` (64 TensorCores: 32 chips), ``gpu:h100x8`` (one host of 8),
  ``gpu:h100x8x4`` (4 hosts of 8)."""
  platform, _, rest = spec.partition(":")
  if platform == "tpu":
    match = re.fullmatch(r"(v\w+?)-(\d+)", rest)
    if not match or match.group(1) not in CHIPS or CHIPS[match.group(1)].platform != "tpu":
      raise _bad(spec, "not a TPU chip and size")
    chip, units = CHIPS[match.group(1)], int(match.group(2))
    chips, left = divmod(units, chip.units_per_chip)
    if left or chips < 1 or chips & (chips - 1):
      raise _bad(spec, f"a {chip.key} slice's size must be a power of two number of chips (x{chip.units_per_chip} "
                       f"in its name); got {units}")
    return Target(spec, chip, chips, max(1, chips // math.prod(HOST_BOUNDS)))
  if platform == "gpu":
    match = re.fullmatch(r"([a-z]\w*?)x(\d+)(?:x(\d+))?", rest)
    if not match or match.group(1) not in CHIPS or CHIPS[match.group(1)].platform != "gpu":
      raise _bad(spec, "not a GPU chip and count")
    per_host, hosts = int(match.group(2)), int(match.group(3) or 1)
    if per_host < 1 or hosts < 1:
      raise _bad(spec, "the device and host counts must be positive")
    return Target(spec, CHIPS[match.group(1)], per_host * hosts, hosts)
  raise _bad(spec, f"unknown platform {platform!r}")


def tpu_topology(chip: Chip, chips: int) -> str:
  """libtpu's topology name for ``chips`` chips: a 2D grid for v5e/v6e (``v5e:16x16``), a 3D torus for v4/v5p
  (``v4:2x2x4``), grown from one host's ``2x2(x1)`` by doubling the shortest side (the last of equals)."""
  sides = [1, 1] if chip.units_per_chip == 1 else ([2, 2, 1] if chips >= 4 else [1, 1, 1])
  while math.prod(sides) < chips:
    shortest = min(sides)
    sides[len(sides) - 1 - sides[::-1].index(shortest)] *= 2
  return f"{chip.topology}:" + "x".join(map(str, sides))


def _host_bounds(target: Target) -> tuple[int, int, int]:
  """``HOST_BOUNDS``, or the whole slice when it is smaller than one host."""
  if target.num_devices >= math.prod(HOST_BOUNDS):
    return HOST_BOUNDS
  return (target.num_devices, 1, 1)


def prepare_environment() -> None:
  """What the compilers need to start without chips, set (where unset) in this process only and before JAX starts
  its backends: the CUDA plugin skips its driver check, libtpu is told its accelerator and host so it does not
  warn, and several processes may load libtpu at once (each compiling; by default the first holds a lock file and
  the others fail). A process with a GPU or TPU keeps working: these only skip checks."""
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def install_command() -> str:
  import jax
  return f'pip install "jax[tpu,cuda12]=={jax.__version__}"  (or: pip install -e ".[compile]")'


def _compiler_missing(target: Target, error: Exception) -> RuntimeError:
  package = "libtpu (jax[tpu])" if target.platform == "tpu" else "the CUDA plugin (jax[cuda12])"
  return RuntimeError(
      f"compiling for {target.name} needs {package} installed at this JAX's version; install it with "
      f"{install_command()}. If it is installed, JAX started its backends before prepare_environment() ran in this "
      f"process (d3pm-compile calls it first). The compiler said: {error}")


def devices(target: Target) -> list:
  """The target's devices, without chips: ``jax.experimental.topologies`` descriptions a program is compiled for
  (never run on). Raises with the install command when the target's compiler is not installed."""
  from jax.experimental import topologies
  try:
    if target.platform == "tpu":
      topo = topologies.get_topology_desc(
          platform="tpu", topology_name=tpu_topology(target.chip, target.num_devices),
          chip_config_name=target.chip.chip_config, chips_per_host_bounds=_host_bounds(target), num_slices=1,
          wrap=(False, False, False))
    else:
      with open(os.path.join(GPU_TARGETS, f"{target.chip.key}.txtpb")) as f:
        config = f.read()
      topo = topologies.get_topology_desc(platform="cuda", target_config=config,
                                          topology=f"1x{target.num_hosts}x{target.num_devices // target.num_hosts}")
  except NotImplementedError as e:  # JAX found no plugin for the platform
    raise _compiler_missing(target, e) from e
  found = list(topo.devices)
  if len(found) != target.num_devices:
    raise RuntimeError(f"{target.name}: the compiler's topology has {len(found)} devices, not {target.num_devices}")
  return found

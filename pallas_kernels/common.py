"""What every kernel of this package shares: the masked logit, the stated precision of a product, which columns
of a vocabulary tile are classes, and the choice between the jnp twin and the backend's Pallas kernel."""
from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp

NEG = -1e30  # a logit that exp() sends to 0 without the NaNs of -inf arithmetic
DOT_DTYPES = ("bfloat16", "float32")


def precision_of(dot_dtype) -> jax.lax.DotAlgorithmPreset:
  """The stated algorithm of a product whose inputs are ``dot_dtype``, for Triton and XLA on GPUs: float32
  accumulation always, and true float32 (never TF32) for float32 inputs."""
  name = jnp.dtype(dot_dtype).name
  if name == "bfloat16":
    return jax.lax.DotAlgorithmPreset.BF16_BF16_F32
  if name == "float32":
    return jax.lax.DotAlgorithmPreset.F32_F32_F32
  raise ValueError(f"dot_dtype must be one of {list(DOT_DTYPES)}; got {name!r}")


def xla_precision(dot_dtype) -> jax.lax.Precision:
  """The same statement as a ``Precision`` every backend (and Mosaic) accepts: exact float32, or one bfloat16
  pass (exact for bfloat16 inputs)."""
  precision_of(dot_dtype)  # validates
  return jax.lax.Precision.HIGHEST if jnp.dtype(dot_dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def valid_columns(local, offset, v: int, num_classes: int, exclude: int | None):
  """``(valid, cols)`` for the column indices ``local`` (any shape) of a shard whose columns start at global id
  ``offset``: the global ids, and which are classes - below ``num_classes``, not ``exclude`` (the mask), and not
  the shard's padding (``local >= v``)."""
  cols = offset + local
  valid = (local < v) & (cols < num_classes)
  if exclude is not None:
    valid &= cols != exclude
  return valid, cols


@dataclasses.dataclass(frozen=True)
class HeadProblem:
  """The static problem of one fused output-head call, which each backend's plan extends with its blocks: ``n``
  rows of width ``d`` against ``v`` columns (a shard's), the classes those below ``num_classes`` but ``exclude``,
  the products in ``dot_dtype``. Rows whose weight is zero are skipped by every plan's backward pass."""
  n: int
  d: int
  v: int
  num_classes: int
  exclude: int | None
  dot_dtype: str = "bfloat16"
  skips_zero_rows = True


_TARGET: list[str] = []  # the platform a program is being compiled for, innermost last (``compiling_for``)


@contextlib.contextmanager
def compiling_for(platform: str):
  """Within this block the kernels are chosen for ``platform`` ('tpu', 'gpu' or 'cpu') instead of this process's
  default backend: a program traced here for a TPU topology gets the Mosaic kernels on a machine whose own backend
  is the CPU (``d3pm-compile``)."""
  if platform not in ("cpu", "gpu", "tpu"):
    raise ValueError(f"unknown platform {platform!r}; valid: ['cpu', 'gpu', 'tpu']")
  _TARGET.append(platform)
  try:
    yield
  finally:
    _TARGET.pop()


def target_platform() -> str:
  """The platform kernels are chosen for: the innermost ``compiling_for``, else ``jax.default_backend()``."""
  return _TARGET[-1] if _TARGET else jax.default_backend()


_MAPPED: list[tuple[str, ...]] = []  # mesh axes that surrounding vmaps lay their mapped dimension over (innermost last)


@contextlib.contextmanager
def vmapped_axes(axes):
  """Declares that the code traced in this block runs under ``jax.vmap(..., spmd_axis_name=axes)``: the kernels'
  ``shard_map`` calls must leave the mesh ``axes`` out of their specs (vmap's batching rule adds them, and refuses
  specs that name them), so they shard their rows over the other batch axes only (``train.PerReplica``)."""
  _MAPPED.append(tuple(axes))
  try:
    yield
  finally:
    _MAPPED.pop()


def vmapped() -> tuple[str, ...]:
  """The mesh axes taken by the surrounding ``vmapped_axes`` blocks (none outside one)."""
  return tuple(a for axes in _MAPPED for a in axes)


def by_backend(what: str, impl: str, valid, *, tiled, triton, mosaic, interpret: bool, hint: str = ""):
  """The callable that implementation ``impl`` of ``what`` means on the target platform (``target_platform``):
  ``tiled`` (the jnp twin, any backend), or for ``pallas`` the Triton kernel on GPUs, the Mosaic one on TPUs, and
  the Triton one interpreted elsewhere when ``interpret`` is set. ``hint`` follows the list of valid names in the
  error."""
  if impl not in valid:
    raise ValueError(f"unknown {what} implementation {impl!r}; valid: {list(valid)}{hint}")
  if impl == "tiled":
    return tiled
  backend = target_platform()
  if backend == "tpu":
    return mosaic
  if backend != "gpu" and not interpret:
    raise ValueError(f"head_impl 'pallas' runs Triton kernels on GPUs and Mosaic kernels on TPUs; this backend is "
                     f"{backend!r}: use 'tiled' (or 'xla'), or set model.kernel_interpret=True to interpret the "
                     f"kernels")
  return triton

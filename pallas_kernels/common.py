"""What every kernel of this package shares: the masked logit, the stated precision of a product, and which
columns of a vocabulary tile are classes."""
from __future__ import annotations

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

"""Input checks that run when values are concrete and stay silent under tracing.

Inside ``jax.jit`` a value is a tracer and cannot be inspected without a host sync, so these checks
apply to eager calls (tests, notebooks, evaluation scripts) and to the outermost call of a jitted
function whose arguments are concrete only at the Python level. They never change numerics.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np


def is_concrete(x: Any) -> bool:
  """True when ``x`` can be read on the host without tracing (not a ``jax.core.Tracer``)."""
  return not isinstance(x, jax.core.Tracer)


def check_unit_interval(name: str, t: Any) -> None:
  """Raises ValueError if a concrete time ``t`` lies outside [0, 1]."""
  if not is_concrete(t):
    return
  arr = np.asarray(t)
  if arr.size and (np.isnan(arr).any() or arr.min() < 0.0 or arr.max() > 1.0):
    bad = arr[(arr < 0.0) | (arr > 1.0) | np.isnan(arr)].ravel()[:4]
    raise ValueError(f"{name} must lie in [0, 1]; got values {bad.tolist()}")


def check_token_ids(name: str, x: Any, num_valid: int, what: str = "token ids") -> None:
  """Raises ValueError if concrete integer ids in ``x`` fall outside [0, num_valid)."""
  if not is_concrete(x):
    return
  arr = np.asarray(x)
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{name} must hold integer {what}; got dtype {arr.dtype}")
  if arr.size and (arr.min() < 0 or arr.max() >= num_valid):
    bad = arr[(arr < 0) | (arr >= num_valid)].ravel()[:4]
    raise ValueError(f"{name} holds {what} {bad.tolist()} outside the valid range [0, {num_valid})")


def check_choice(kind: str, name: str, valid: Any) -> None:
  """Raises ValueError naming ``name`` and the sorted valid choices when ``name`` is not one."""
  if name not in valid:
    raise ValueError(f"unknown {kind} {name!r}; valid: {sorted(valid)}")

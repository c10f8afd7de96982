"""Shared fixtures. The math tests run in float64 (``x64``) so that closed forms can be compared with dense
references to ~1e-12; a few tests run in the default float32 on purpose."""
import jax
import pytest


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield

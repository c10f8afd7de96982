"""d3pm_jax: discrete diffusion language models in JAX.

Shape legend used in names throughout: B batch, L length, V states (mask included), D model width,
H heads, T discrete steps, K data states of a synthetic source.
"""
from d3pm_jax.processes import make_process
from d3pm_jax.schedules import get_schedule

__version__ = "0.1.0"
__all__ = ["make_process", "get_schedule"]

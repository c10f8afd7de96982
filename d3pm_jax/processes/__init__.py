"""Corruption processes: one module per process, one interface (``base.Process``).

``make_process(name, vocab_size, schedule, **kwargs)`` builds any of them by name.
"""
from __future__ import annotations

from d3pm_jax import _checks
from d3pm_jax.processes.absorbing import AbsorbingProcess
from d3pm_jax.processes.base import NEG_INF, Process, safe_log
from d3pm_jax.processes.nearest_neighbor import NearestNeighborProcess, knn_graph
from d3pm_jax.processes.uniform import UniformProcess
from d3pm_jax.schedules import Schedule, get_schedule

PROCESSES = ("absorbing", "uniform", "nearest_neighbor")


def make_process(name: str, vocab_size: int, schedule: Schedule | str = "linear", **kwargs) -> Process:
  """Builds a corruption process.

  Args:
    name: one of ``PROCESSES``.
    vocab_size: V, every state of the process; for ``absorbing`` the mask is the last state, id V - 1.
    schedule: a ``Schedule`` or a schedule name (built with its defaults).
    **kwargs: for ``nearest_neighbor``: ``embeddings`` (an array ``[V, D]`` or a ``.npy`` path), ``k``, and
      optionally ``uniform_rate``, ``metric``, ``rate_scale``. The other processes take none.
  """
  _checks.check_choice("process", name, PROCESSES)
  if isinstance(schedule, str):
    schedule = get_schedule(schedule)
  if name == "nearest_neighbor":
    missing = {"embeddings", "k"} - set(kwargs)
    if missing:
      raise ValueError(f"nearest_neighbor needs {sorted(missing)}: an embedding table [V, D] (array or .npy path) "
                       "and the number of neighbours k")
    process = NearestNeighborProcess.from_embeddings(kwargs.pop("embeddings"), kwargs.pop("k"), schedule, **kwargs)
    if process.num_states != vocab_size:
      raise ValueError(f"the embedding table has {process.num_states} rows but vocab_size is {vocab_size}")
    return process
  if kwargs:
    raise ValueError(f"process {name!r} takes no options; got {sorted(kwargs)}")
  cls = AbsorbingProcess if name == "absorbing" else UniformProcess
  return cls(vocab_size=vocab_size, schedule=schedule)


__all__ = ["AbsorbingProcess", "NearestNeighborProcess", "UniformProcess", "Process", "PROCESSES", "NEG_INF",
           "knn_graph", "make_process", "safe_log"]

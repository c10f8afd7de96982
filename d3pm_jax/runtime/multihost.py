"""Joining JAX's multi-controller runtime: one Python process per host (or per GPU), all running the same program.

``initialize(mode, coordinator_address, num_processes, process_id)`` is called by ``d3pm-train`` before JAX touches
a device. With explicit values (``--coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0``, or
JAX's own ``JAX_COORDINATOR_ADDRESS``) it joins that job; otherwise ``jax.distributed.initialize()`` detects the
cluster itself (Cloud TPU pods, SLURM, Open MPI). ``mode``:

- ``auto``: initialise when explicit values are given or the environment is a multi-process cluster job (SLURM with
  more than one task, Open MPI, a Cloud TPU pod or a GKE TPU job); a plain single-machine run stays single-process.
- ``on``: always initialise (``jax.distributed.initialize`` raises if it can find no cluster).
- ``off``: never (one process, every local device).
"""
from __future__ import annotations

import os
from typing import Mapping

import jax

from d3pm_jax import _checks

MODES = ("auto", "on", "off")


def cluster_detected(environ: Mapping[str, str]) -> str | None:
  """The multi-process cluster job this environment belongs to, or None (a plain run, or a one-task job)."""
  if int(environ.get("SLURM_NTASKS", environ.get("SLURM_NPROCS", "1")) or 1) > 1 and "SLURM_JOB_ID" in environ:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in environ or "OMPI_COMM_WORLD_SIZE" in environ:
    return "openmpi"
  if "," in environ.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in environ:
    return "tpu"
  return None


def plan(mode: str, coordinator_address: str | None, num_processes: int | None, process_id: int | None,
         environ: Mapping[str, str]) -> dict | None:
  """The keyword arguments for ``jax.distributed.initialize``, or None to stay single-process (pure: tested
  without starting anything)."""
  _checks.check_choice("distributed mode", mode, MODES)
  explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
  given = {k: v for k, v in explicit.items() if v is not None}
  if mode == "off":
    if given:
      raise ValueError(f"--distributed=off contradicts the explicit {sorted(given)}; drop them or use auto")
    return None
  if given and len(given) < 3 and "JAX_COORDINATOR_ADDRESS" not in environ:
    missing = sorted(set(explicit) - set(given))
    raise ValueError(f"multi-process flags come together: {sorted(given)} given, {missing} missing "
                     "(or let jax.distributed.initialize detect a TPU pod / SLURM job by giving none)")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes must be >= 1; got {num_processes}")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must lie in [0, {num_processes}) for --num_processes="
                     f"{num_processes}")
  if mode == "on" or given or "JAX_COORDINATOR_ADDRESS" in environ or cluster_detected(environ):
    return given
  return None


def initialize(mode: str = "auto", coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins the multi-process job described by the arguments or the environment; returns whether it did. Must run
  before anything initialises a JAX backend."""
  kwargs = plan(mode, coordinator_address, num_processes, process_id, os.environ)
  if kwargs is None:
    return False
  jax.distributed.initialize(**kwargs)
  return True


def sync(name: str, timeout_s: int = 3 * 3600) -> None:
  """A barrier across processes (a no-op for one process): every process waits here, up to ``timeout_s``, until
  all arrive. It waits on the coordination service, not on a device collective: a collective's first use gives
  up after 30 s (gloo on CPU), far less than one process may spend, e.g. training a tokenizer."""
  if jax.process_count() > 1:
    import orbax.checkpoint as ocp
    ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def is_leader() -> bool:
  """Process 0: the one that writes logs, metrics and printed results."""
  return jax.process_index() == 0

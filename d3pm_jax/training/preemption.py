"""Preemption: on SIGTERM (a cluster reclaiming the machine) or Ctrl-C, the train loop saves a checkpoint at the step
in flight and exits 0, within ``train.preemption_grace_s`` seconds.

``Preemption`` is a context manager that catches the two signals while the loop runs: the first one only records
the request (the loop polls ``requested``) and starts a watchdog that ends the process with status 1 if the save
has not finished within the grace period (the newest complete checkpoint stays the resume point: a checkpoint
becomes visible only once whole). A second Ctrl-C interrupts at once.

Under several processes only some may receive the signal, yet all must stop after the same step (each saves its
shards of one checkpoint). ``make_agreement`` turns each process's flag into one decision by a tiny all-reduce
dispatched after each step and read one step later with the step's metrics, so the host never waits for it.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

EXIT_GRACE_EXCEEDED = 1


class Preemption:
  """Records SIGTERM / SIGINT between ``__enter__`` and ``__exit__`` (installed only in the main thread, where
  Python allows handlers); ``requested`` turns true at the first one."""

  def __init__(self, grace_s: float, describe=lambda: "", out=sys.stderr):
    self.grace_s, self.describe, self.out = grace_s, describe, out
    self.requested = False
    self.signal_name = None
    self._previous = {}
    self._watchdog = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    if self._watchdog is not None:
      self._watchdog.cancel()
    return False

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now (the checkpoints on disk stay whole)
    if self.requested:
      return
    self.requested = True
    self.signal_name = signal.Signals(signum).name
    print(f"{self.signal_name} received: saving a checkpoint at the step in flight, then exiting (at most "
          f"{self.grace_s:g} s, train.preemption_grace_s)", file=self.out, flush=True)
    self._watchdog = threading.Timer(self.grace_s, self._expire)
    self._watchdog.daemon = True
    self._watchdog.start()

  def _expire(self):
    print(f"the checkpoint after {self.signal_name} did not finish within train.preemption_grace_s="
          f"{self.grace_s:g} s; exiting without it. {self.describe()}", file=self.out, flush=True)
    self.out.flush()
    os._exit(EXIT_GRACE_EXCEEDED)


def make_agreement(mesh, rows_spec, rows: int):
  """``agree(flag) -> array``: the OR over all processes of each one's ``flag``, as a replicated scalar array to
  read later (``bool(jax.device_get(...))``). ``rows_spec`` and ``rows`` are the batch's row sharding and global
  row count, so each process contributes exactly its own rows. For one process, the flag itself."""
  if jax.process_count() == 1:
    return lambda flag: flag
  sharding = NamedSharding(mesh, PartitionSpec(rows_spec))
  reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))
  local_rows = rows // jax.process_count()

  def agree(flag: bool):
    local = np.full((local_rows,), int(flag), np.int32)
    return reduce(jax.make_array_from_process_local_data(sharding, local, (rows,)))

  return agree

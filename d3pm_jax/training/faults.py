"""Fault injection at named points of the train loop, for the tests of preemption and crash recovery.

A crash test must kill a run at a chosen moment (mid-step, mid-save, mid-evaluation), not after a guessed number
of seconds. ``D3PM_FAULT`` names the moments: a comma-separated list of ``SIGNAL:POINT:STEP[:PROCESS]``, e.g.
``D3PM_FAULT=KILL:save_started:4`` sends SIGKILL to this process right after the save of step 4 began (its files
are still being written), and ``TERM:step_dispatched:3:1`` sends SIGTERM to process 1 of a multi-process job once
step 3 is dispatched. ``POINTS`` lists the moments; ``SIGNALS`` the signals. Unset (always, outside tests), every
``hit`` is a dictionary lookup that finds nothing.
"""
from __future__ import annotations

import functools
import os
import signal

ENV = "D3PM_FAULT"
POINTS = {
    "step_dispatched": "the step's computation was dispatched and may still be running",
    "eval_batch": "STEP is the validation batch's index, during an evaluation",
    "save_started": "the checkpoint of step STEP is being written in the background",
}
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}


def parse(spec: str) -> dict:
  """``{(point, step): (signal, process or None)}`` from a ``D3PM_FAULT`` value; raises naming a bad entry."""
  plan = {}
  for entry in filter(None, (e.strip() for e in spec.split(","))):
    parts = entry.split(":")
    if (len(parts) not in (3, 4) or parts[0] not in SIGNALS or parts[1] not in POINTS
        or not all(p.isdigit() for p in parts[2:])):
      raise ValueError(f"{ENV} entry {entry!r} is not SIGNAL:POINT:STEP[:PROCESS] with SIGNAL in {sorted(SIGNALS)}"
                       f" and POINT in {sorted(POINTS)}")
    plan[(parts[1], int(parts[2]))] = (SIGNALS[parts[0]], int(parts[3]) if len(parts) == 4 else None)
  return plan


@functools.lru_cache(maxsize=None)
def _plan(spec: str) -> dict:
  return parse(spec)


def hit(point: str, step: int, process: int = 0) -> None:
  """Sends this process the signal planned for ``point`` at ``step``, if any."""
  spec = os.environ.get(ENV)
  if not spec:
    return
  planned = _plan(spec).get((point, step))
  if planned is not None and planned[1] in (None, process):
    os.kill(os.getpid(), planned[0])

"""Crashes and preemption: d3pm-train killed with SIGKILL at chosen moments (``D3PM_FAULT``, ``faults.py``: mid-step,
mid-save, mid-evaluation) resumes each time from the newest complete checkpoint and ends bit-identical to an
uninterrupted run; SIGTERM and Ctrl-C save the step in flight and exit 0, on one process and on two."""
import os
import pathlib
import random
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from d3pm_jax.training import checkpoints, faults, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The Markov corpus is built in memory in milliseconds, so a restart costs only JAX's start-up and compilation.
STEPS = 40
ARGS = [f"--config={ROOT / 'configs' / 'test.py'}", "--config.data.name=markov", f"--config.train.steps={STEPS}",
        "--config.train.checkpoint_every=2", "--config.train.eval_every=3", "--config.train.eval_batches=2",
        "--config.train.log_every=1", "--config.train.num_samples=1"]


@pytest.fixture(scope="module")
def run_env():
  """The environment of every d3pm-train subprocess here: the session's persistent compilation cache
  (tests/conftest.py) is in it, so only the first one compiles."""
  assert os.environ.get("JAX_COMPILATION_CACHE_DIR")
  return dict(os.environ, JAX_PLATFORMS="cpu")


def train_cmd(workdir, *extra):
  return [sys.executable, "-m", "d3pm_jax.cli.train", *ARGS, f"--workdir={workdir}", *extra]


def complete_steps(workdir) -> list:
  directory = pathlib.Path(checkpoints.checkpoint_dir(str(workdir)))
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def saved_state(workdir, step) -> list:
  """Every array of the checkpoint's train state (step, parameters, EMA, optimiser moments, rng), as saved."""
  path = pathlib.Path(checkpoints.checkpoint_dir(str(workdir))) / str(step) / "state"
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever mesh saved it
  with ocp.StandardCheckpointer() as ckpt:
    meta = ckpt.metadata(path).item_metadata
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    tree = ckpt.restore(path, target)
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_fault_plan_parses_and_rejects_bad_entries():
  assert faults.parse("KILL:save_started:4, TERM:step_dispatched:3:1") == {
      ("save_started", 4): (signal.SIGKILL, None), ("step_dispatched", 3): (signal.SIGTERM, 1)}
  with pytest.raises(ValueError, match=r"'KILL:mid_save:4' is not SIGNAL:POINT:STEP.*'save_started'"):
    faults.parse("KILL:mid_save:4")


@pytest.mark.slow
def test_kill_9_at_chosen_moments_then_resume_ends_bit_identical(tmp_path, run_env):
  """6 trials (each kind of moment twice), each killing the run at a moment drawn with a fixed seed — just after
  a step is dispatched (the computation in flight), just after a checkpoint's save began (its files half-written in
  the background), or during an evaluation — always past the step the restart resumed from. Every restart resumes
  from the newest complete checkpoint (an interrupted save is skipped, logged and removed), and the final train
  state (parameters, EMA, Adam moments, rng) equals bit for bit that of the same config trained in one go in another
  process, which also holds only if the data stream resumed at the right batch."""
  workdir = tmp_path / "killed"
  draw = random.Random(13)
  resumed_from, kinds, skipped_partial = 0, set(), 0
  for trial in range(6):
    point = ("step_dispatched", "save_started", "eval_batch")[trial % 3]
    if point == "step_dispatched":
      at = resumed_from + draw.randint(1, 2)
    elif point == "save_started":
      at = resumed_from + 2 - resumed_from % 2 + 2 * draw.randint(0, 1)   # a later multiple of checkpoint_every
    else:
      at = draw.randint(0, 1)   # the evaluation's batch index, in the first evaluation this run reaches
    out = subprocess.run(train_cmd(workdir), capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(run_env, D3PM_FAULT=f"KILL:{point}:{at}"))
    assert out.returncode == -signal.SIGKILL, (trial, point, at, out.stdout[-2000:], out.stderr[-3000:])
    kinds.add(point)
    assert (f"resumed from step {resumed_from} in" in out.stdout) == (resumed_from > 0), (trial, out.stdout[-2000:])
    skipped_partial += "skipping the incomplete checkpoint" in out.stdout
    resumed_from = (complete_steps(workdir) or [0])[-1]
  assert resumed_from < STEPS and kinds == {"step_dispatched", "save_started", "eval_batch"}
  assert skipped_partial >= 1  # at least one restart met a half-written checkpoint
  out = subprocess.run(train_cmd(workdir), capture_output=True, text=True, timeout=300, cwd=ROOT, env=run_env)
  assert out.returncode == 0 and f"resumed from step {resumed_from} in" in out.stdout, out.stderr[-3000:]

  # The same experiment in one go, in this process (a different process, compiled afresh).
  reference = tmp_path / "uninterrupted"
  config = checkpoints.load_experiment(str(workdir))
  train.train_and_evaluate(config, str(reference), quiet=True)
  assert complete_steps(reference)[-1] == complete_steps(workdir)[-1] == STEPS
  killed, whole = saved_state(workdir, STEPS), saved_state(reference, STEPS)
  assert len(killed) == len(whole) > 10
  for a, b in zip(killed, whole):
    np.testing.assert_array_equal(a, b)
  assert checkpoints.read_progress(str(workdir))["next_batch"] == checkpoints.read_progress(str(reference))[
      "next_batch"] == STEPS


def test_sigterm_saves_the_step_in_flight_and_exits_0(tmp_path, run_env):
  """SIGTERM from outside, sent once the loop is running (read from its progress lines, not timed): the run saves
  a checkpoint at the step in flight — not at a multiple of checkpoint_every — and exits 0, which it does only
  within train.preemption_grace_s (past it, the watchdog exits 1)."""
  workdir = tmp_path / "work"
  proc = subprocess.Popen(train_cmd(workdir, "--config.train.checkpoint_every=1000"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=ROOT, env=run_env)
  for line in proc.stdout:
    if line.startswith("step 3/"):
      break
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "SIGTERM received" in err and "validation:" not in out
  steps = complete_steps(workdir)
  assert len(steps) == 1 and 4 <= steps[0] < STEPS  # nothing but the preemption saved
  assert f"stopped at step {steps[0]} on request" in out
  assert len(saved_state(workdir, steps[0])) > 10


def test_ctrl_c_saves_and_a_second_one_is_not_needed(tmp_path, run_env):
  """SIGINT right after step 5 is dispatched: the checkpoint holds step 5 exactly and the run exits 0."""
  workdir = tmp_path / "work"
  out = subprocess.run(train_cmd(workdir), capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(run_env, D3PM_FAULT="INT:step_dispatched:5"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "SIGINT received" in out.stderr and complete_steps(workdir)[-1] == 5
  assert checkpoints.read_progress(str(workdir))["next_batch"] == 5


def test_a_save_past_the_grace_period_exits_1_and_keeps_the_last_checkpoint(tmp_path, run_env):
  """With a grace period far shorter than a save, SIGTERM at step 5 ends the process with status 1 and a message;
  no checkpoint of step 5 appears and the newest complete one restores."""
  workdir = tmp_path / "work"
  out = subprocess.run(train_cmd(workdir, "--config.train.preemption_grace_s=1e-6"), capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env=dict(run_env, D3PM_FAULT="TERM:step_dispatched:5"))
  assert out.returncode == 1, out.stderr[-3000:]
  assert "did not finish within train.preemption_grace_s=1e-06 s" in out.stderr
  steps = complete_steps(workdir)
  assert steps and steps[-1] <= 4
  assert len(saved_state(workdir, steps[-1])) > 10


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, run_env):
  """launch/local_multiprocess.sh with 2 processes; only process 1 receives SIGTERM (after step 3). The flag is
  agreed through an all-reduce read one step later, so both save their shards of one checkpoint at step 4 and
  exit 0; the checkpoint is complete and process 0 says why it stopped."""
  workdir, logs = tmp_path / "work", tmp_path / "logs"
  out = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "2", "--", *train_cmd(workdir),
                        "--config.train.batch_size=8", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                        "--config.train.checkpoint_every=1000"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(run_env, PYTHON=sys.executable, LOG_DIR=str(logs),
                                D3PM_FAULT="TERM:step_dispatched:3:1"))
  worker = (logs / "process_1.log").read_text()
  assert out.returncode == 0, out.stderr[-3000:] + worker[-3000:]
  assert "SIGTERM received" in worker and "SIGTERM received" not in out.stderr
  assert "step 4: stopping on another process's signal" in out.stdout
  assert complete_steps(workdir) == [4] and checkpoints.read_progress(str(workdir))["next_batch"] == 4
  assert len(saved_state(workdir, 4)) > 10

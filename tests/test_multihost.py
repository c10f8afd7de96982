"""Multi-host: the decision to join a job, each process's share of the data, and two real processes trained
through launch/local_multiprocess.sh against one process with the same devices."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from d3pm_jax.config import experiment_from_dict
from d3pm_jax.data import pipeline
from d3pm_jax.runtime import multihost
from d3pm_jax.training import checkpoints, train
from d3pm_jax.training.state import init_state, make_optimizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SLURM = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "1"}


@pytest.mark.parametrize("mode,flags,environ,expected", [
    ("auto", (None, None, None), {}, None),                                   # a plain run stays single-process
    ("auto", ("10.0.0.1:1234", 2, 1), {}, {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                                          "process_id": 1}),
    ("auto", (None, None, None), SLURM, {}),                                  # JAX detects the SLURM job
    ("auto", (None, None, None), dict(SLURM, SLURM_NTASKS="1"), None),        # a one-task job is a plain run
    ("auto", (None, None, None), {"TPU_WORKER_HOSTNAMES": "w0,w1"}, {}),      # a multi-host TPU slice
    ("auto", (None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1"}, {}),     # JAX's own variable
    ("on", (None, None, None), {}, {}),
    ("off", (None, None, None), SLURM, None),
])
def test_plan(mode, flags, environ, expected):
  assert multihost.plan(mode, *flags, environ=environ) == expected


@pytest.mark.parametrize("mode,flags,match", [
    ("auto", ("h:1", 2, None), r"\['process_id'\] missing"),
    ("auto", ("h:1", 2, 2), r"--process_id=2 must lie in \[0, 2\)"),
    ("off", ("h:1", 2, 0), "contradicts"),
    ("sometimes", (None, None, None), r"unknown distributed mode 'sometimes'; valid: \['auto', 'off', 'on'\]"),
])
def test_plan_rejects_bad_flags(mode, flags, match):
  with pytest.raises(ValueError, match=match):
    multihost.plan(mode, *flags, environ={})


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_read_disjoint_rows_of_the_same_global_batches(processes):
  windows = np.arange(97)[:, None] * np.ones((1, 3), np.int32)
  whole = pipeline.train_batches(windows, 8, seed=5, process_index=0, process_count=1)
  shares = [pipeline.train_batches(windows, 8, seed=5, process_index=p, process_count=processes)
            for p in range(processes)]
  for i in (0, 1, 11, 12, 40):  # 12 batches of 8 fill one epoch of 97: 11 and 12 straddle a reshuffle
    parts = [s[i] for s in shares]
    assert all(part.shape == (8 // processes, 3) for part in parts)
    np.testing.assert_array_equal(np.concatenate(parts), whole[i])
    ids = [set(part[:, 0]) for part in parts]
    assert sum(map(len, ids)) == len(set().union(*ids)) == 8  # no window read by two processes


def test_indivisible_batch_raises():
  with pytest.raises(ValueError, match="train.batch_size=6 must divide evenly over 4 processes"):
    pipeline.train_batches(np.zeros((10, 2), np.int32), 6, seed=0, process_index=0, process_count=4)


ARGS = ["--config=configs/test.py", "--config.data.name=markov", "--config.train.batch_size=8",
        "--config.train.steps=3", "--config.train.eval_every=3",
        "--config.mesh.data=2", "--config.mesh.fsdp=2"]


def _slurm_job(tmp_path, flags):
  """``launch/slurm_gpu.sbatch`` under a stand-in srun that starts 2 tasks with SLURM's variables (and 2 CPU devices
  each), as a cluster would: JAX must find the coordinator, process count and ids from them alone. Returns the
  script's completed process and the two tasks' logs."""
  import socket
  for job_id in range(1000, 1000 + 4096):  # JAX derives the coordinator port from the job id
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", job_id % 4096 + 61440))
        break
      except OSError:
        continue
  logs = tmp_path / "slurm_logs"
  logs.mkdir()
  _fake_tool(tmp_path, "srun", f"""
while [[ "$1" == --* ]]; do shift; done
pids=()
for i in 0 1; do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" > {logs}/task_$i.log 2>&1 &
  pids+=($!)
done
status=0
for pid in "${{pids[@]}}"; do wait "$pid" || status=$?; done
exit $status
""")
  env = dict(os.environ, PATH=f"{tmp_path}:{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
             SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  out = subprocess.run(["bash", "launch/slurm_gpu.sbatch", *flags], capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env=env)
  task = [(logs / f"task_{i}.log").read_text() for i in range(2)]
  assert out.returncode == 0, out.stderr[-2000:] + task[0][-2000:] + task[1][-2000:]
  return out, task


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  """2 processes x 2 CPU devices (gloo collectives over 127.0.0.1) train 3 steps on a (data=2, fsdp=2) mesh and
  end with the parameters of 1 process x 4 devices (atol 1e-5: the same mesh, reductions crossing processes) and
  the same validation bits; each process feeds its own half of every batch, and only process 0 prints results.
  Then the step-3 checkpoint is removed and the job resumes through the SLURM script (``_slurm_job``) from the
  checkpoint both processes saved at step 2: it ends with the same parameters again."""
  command = [sys.executable, "-m", "d3pm_jax.cli.train", *ARGS, "--config.train.checkpoint_every=2"]
  env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(tmp_path / "logs"))
  multi = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "2", "--", *command,
                          f"--workdir={tmp_path / 'multi'}"], capture_output=True, text=True, timeout=600,
                         cwd=ROOT, env=env)
  assert multi.returncode == 0, multi.stderr[-4000:]
  single = subprocess.run([*command, f"--workdir={tmp_path / 'single'}"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT,
                          env=dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
                                   JAX_PLATFORMS="cpu"))
  assert single.returncode == 0, single.stderr[-4000:]

  worker_log = (tmp_path / "logs" / "process_1.log").read_text()
  assert "process 0 of 2: 2 local devices, rows 0:4 of each global batch of 8" in multi.stdout
  assert "process 1 of 2: 2 local devices, rows 4:8 of each global batch of 8" in worker_log
  assert "validation:" not in worker_log and "samples" not in worker_log

  def bits(out):
    return [line for line in out.splitlines() if line.startswith("validation:")]
  assert bits(multi.stdout) and bits(multi.stdout) == bits(single.stdout)

  config = experiment_from_dict(json.loads((tmp_path / "single" / "experiment.json").read_text()))
  params = {name: checkpoints.restore_params(str(tmp_path / name), config) for name in ("multi", "single")}
  assert params["multi"][1] == params["single"][1] == 3
  initial = init_state(config, train.Transformer(config.model), make_optimizer(config.train)).params
  diff = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                params["multi"][0], params["single"][0])
  moved = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                 params["single"][0], initial)
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-3  # training really moved the parameters
  assert max(jax.tree_util.tree_leaves(diff)) < 1e-5
  # Metrics come from process 0 alone: one record per logged step, as in the single-process run.
  records = [(tmp_path / name / "metrics.jsonl").read_text().splitlines() for name in ("multi", "single")]
  assert len(records[0]) == len(records[1]) > 0

  shutil.rmtree(tmp_path / "multi" / "checkpoints" / "3")
  _, task = _slurm_job(tmp_path, [*ARGS, "--config.train.checkpoint_every=2", f"--workdir={tmp_path / 'multi'}"])
  assert "process 0 of 2" in task[0] and "resumed from step 2" in task[0] and "validation:" in task[0]
  assert "process 1 of 2" in task[1] and "validation:" not in task[1]
  again, step = checkpoints.restore_params(str(tmp_path / "multi"), config)
  assert step == 3
  diff = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                again, params["single"][0])
  assert max(jax.tree_util.tree_leaves(diff)) < 1e-5


def _fake_tool(directory: pathlib.Path, name: str, body: str) -> None:
  path = directory / name
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(0o755)


def test_tpu_pod_launcher_runs_the_same_command_on_every_worker(tmp_path):
  """With a stand-in gcloud that records its arguments: one ssh to --worker=all whose remote command, read back by
  a shell, is d3pm-train --distributed=on with every flag intact (spaces and quotes included)."""
  _fake_tool(tmp_path, "gcloud", f'printf "%s\\n" "$@" > {tmp_path}/argv\n')
  env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", PROJECT="lab", REPO_DIR="/opt/d3pm")
  flags = ["--config=configs/diffusion_1b.py", "--workdir=/shared/run one", "--config.train.steps=7"]
  out = subprocess.run(["bash", "launch/tpu_pod.sh", "pod-a", "us-west4-a", *flags], capture_output=True,
                       text=True, timeout=60, cwd=ROOT, env=env)
  assert out.returncode == 0, out.stderr
  argv = (tmp_path / "argv").read_text().splitlines()
  assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod-a"]
  assert {"--project=lab", "--zone=us-west4-a", "--worker=all"} <= set(argv)
  remote = next(a for a in argv if a.startswith("--command="))[len("--command="):]
  # What the worker's shell will run, split as that shell splits it:
  words = subprocess.run(["bash", "-c", 'printf "%s\\n" ' + remote.split("&& d3pm-train", 1)[1]],
                         capture_output=True, text=True).stdout.splitlines()
  assert remote.startswith("cd /opt/d3pm && pip install") and "&& d3pm-train " in remote
  assert words == ["--distributed=on", *flags]


BARRIER = """
import sys
args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:])
import jax
jax.distributed.initialize(args["coordinator_address"], int(args["num_processes"]), int(args["process_id"]))
from d3pm_jax.runtime import multihost
if jax.process_index() == 0:  # a barrier process 1 never joins: it must give up after its own timeout
  try:
    multihost.sync("process 0 alone", timeout_s=2)
    print("alone: passed", flush=True)
  except Exception as e:
    print(f"alone: {type(e).__name__}: {e}", flush=True)
multihost.sync("both")  # process 1 has been waiting here all along
print(f"process {jax.process_index()}: both passed", flush=True)
"""


def test_barrier_waits_on_the_coordination_service_with_its_own_timeout(tmp_path):
  """multihost.sync is the coordination service's barrier, with the timeout it is given (hours by default), not a
  device collective (which gives up after 30 s on CPU): process 0 meets a barrier that process 1 never joins, and
  it times out with DEADLINE_EXCEEDED after the 2 s asked for, while process 1 waits at the next barrier, which
  both then pass."""
  script = tmp_path / "barrier.py"
  script.write_text(BARRIER)
  out = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "1", "--", sys.executable, str(script)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(tmp_path / "logs")))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "alone: JaxRuntimeError: DEADLINE_EXCEEDED: Barrier timed out" in out.stdout
  assert "process 0: both passed" in out.stdout
  assert "process 1: both passed" in (tmp_path / "logs" / "process_1.log").read_text()

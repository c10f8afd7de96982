"""Bad input to d3pm-train gets one paragraph naming the value and the valid choices, with exit status 2 — never a
traceback: the cases a user meets (each checked for its message), a property-based test drawing random overrides
and flags (hypothesis, in tests/cli_harness.py), and a disk that fills up during a save."""
import json
import pathlib
import subprocess
import sys

import pytest

from d3pm_jax.training import checkpoints

ROOT = pathlib.Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "cli_harness.py"
BASE = [f"--config={ROOT / 'configs' / 'test.py'}", "--config.data.name=markov", "--config.train.steps=1",
        "--config.train.eval_every=1", "--config.train.num_samples=1", "--config.train.sample_steps=2"]


def run_batch(module: str, calls: list, tmp_path) -> list:
  """Each command line of ``calls`` through the module's entry point, all in one subprocess."""
  (tmp_path / "calls.json").write_text(json.dumps(calls))
  out = subprocess.run([sys.executable, str(HARNESS), "batch", module, str(tmp_path / "calls.json"),
                        str(tmp_path / "results.json")], capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads((tmp_path / "results.json").read_text())


def run_fuzz(mode: str, *args) -> dict:
  """A hypothesis fuzzer of tests/cli_harness.py in a subprocess, which must pass; its outcome counts by exit code."""
  out = subprocess.run([sys.executable, str(HARNESS), mode, *map(str, args)], capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-5000:]
  return json.loads(out.stderr.rsplit("outcomes by exit code: ", 1)[1].splitlines()[0])


def test_each_kind_of_bad_input_is_named_with_exit_2(tmp_path):
  work = str(tmp_path / "work")
  cases = [  # (extra flags, what the one-paragraph message must say); the first one trains and so must succeed
      ([f"--workdir={work}"], None),
      ([f"--workdir={work}", "--config.process.name=uniform", "--config.process.loss=ctmc"],
       "the workdir holds a checkpoint of a different experiment"),
      ([f"--workdir={work}", "--config.train.stepz=2"],
       "there is no key 'stepz' in config.train; valid: ['b1', 'b2', 'batch_size'"),
      ([f"--workdir={work}", "--config.trian.steps=2"],
       "there is no key 'trian' in the top level of the config; valid: ['data', 'mesh', 'model', 'process', "
       "'train']"),
      ([f"--workdir={work}", "--config.train.steps=many"], "--config.train.steps=many: invalid literal for int()"),
      ([f"--workdir={work}", "--config.process.loss=ar"],
       "process 'absorbing' cannot train with loss 'ar'; valid: ['ctmc', 'd3pm', 'masked']"),
      ([f"--workdir={work}", "--config.mesh.data=3"], "mesh (data, fsdp, tensor) = (3, 1, 1) has 3 devices but 1 are"),
      ([f"--workdir={work}", "--config.data.seq_len=32"], "data.seq_len=32 exceeds model.max_len=16"),
      ([f"--workdir={work}", "--config.data.prepared_dir=/nonexistent/lm1b"],
       "/nonexistent/lm1b is not a prepared data set"),
      ([f"--workdir={work}", "--config.data.name=wikipedia"],
       "unknown data set 'wikipedia'; valid: ['lm1b', 'markov', 'openwebtext', 'stdlib', 'text8']"),
      (["--workdir=/proc/no_such_dir"], "--workdir=/proc/no_such_dir cannot be written"),
      ([f"--workdir={work}", "--config.train.seed=" + str(2 ** 70)], "train.seed must fit in 64 bits"),
      ([f"--workdir={work}", "--config.model.num_heads=3"], "must split into num_heads=3 heads"),
      ([f"--workdir={work}", "stray"], "unexpected arguments ['stray']"),
      ([], "--workdir must have a value other than None"),
  ]
  results = run_batch("d3pm_jax.cli.train", [BASE + extra for extra, _ in cases], tmp_path)
  assert results[0]["code"] == 0 and results[0]["exception"] is None, results[0]["err"][-2000:]
  for (extra, message), result in zip(cases[1:], results[1:]):
    last = result["err"].rstrip("\n").splitlines()[-1]
    assert result["code"] == 2 and result["exception"] is None, (extra, result["err"][-2000:])
    assert last.startswith("d3pm-train: error: ") and message in last, (extra, last)
    assert "Traceback" not in result["err"]
  # The refused foreign run left the workdir's config alone: it still describes the checkpoint.
  assert checkpoints.load_experiment(work).process.name == "absorbing"


@pytest.mark.slow
def test_random_overrides_and_flags_succeed_or_fail_cleanly(tmp_path):
  """hypothesis draws (with a fixed seed) up to four overrides from valid and invalid values of many keys, a
  workdir (fresh, shared with earlier draws, unwritable, a file) and stray flags; every outcome must be exit 0 or
  a one-paragraph usage error with exit 2."""
  outcomes = run_fuzz("fuzz-train", tmp_path)
  assert outcomes.get("0", 0) >= 2 and outcomes.get("2", 0) >= 10, outcomes  # both kinds of outcome were drawn


@pytest.mark.slow
def test_a_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path):
  """A run resumed with every file capped at 64 KiB (as a full disk fails writes) cannot write the parameters of
  its next checkpoint: it stops with status 1 and a one-paragraph message, no traceback, and the checkpoint saved
  before still restores."""
  work = tmp_path / "work"
  cmd = [sys.executable, "-m", "d3pm_jax.cli.train", *BASE, f"--workdir={work}", "--config.train.steps=4",
         "--config.train.checkpoint_every=2", "--config.train.eval_every=100"]
  first = subprocess.run(cmd + ["--config.train.steps=2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert first.returncode == 0, first.stderr[-3000:]
  # bash caps the file size (ulimit -f, in KiB) and ignores SIGXFSZ, so a write past it fails with EFBIG, and
  # execs the run with both inherited (no Python runs between fork and exec in this multithreaded process).
  full = subprocess.run(["bash", "-c", 'ulimit -f 64 && trap "" XFSZ && exec "$@"', "bash", *cmd],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  last = full.stderr.rstrip("\n").splitlines()[-1]
  assert full.returncode == 1, full.stderr[-3000:]
  assert last.startswith("d3pm-train: error: out of disk space") and "Traceback" not in full.stderr, \
      full.stderr[-5000:]
  config = checkpoints.load_experiment(str(work))
  params, step = checkpoints.restore_params(str(work), config)
  assert step == 2 and len(params) > 2

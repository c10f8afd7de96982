"""Every script under benchmarks/ runs to its figures at a tiny size (a smoke run: the figures themselves are
meaningless at this size and are not checked, only that each script still runs end to end and prints its table)."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

RUNS = {
    "accelerator_check.py": (["--rehearse"], "rows ok"),  # every row at tiny shapes, kernels interpreted
    "memory.py": (["--tokens", "64", "--width", "32", "--vocab", "256,512", "--tile", "128"], "fused / naive"),
    "kernels.py": (["--reps", "1", "--tokens", "64", "--width", "32", "--vocab", "256", "--attention", "1,128,2,32"],
                   "xla (the model's own)"),
    "sampling.py": (["--batch", "1", "--quick", "--lengths", "16", "--steps", "2,4", "--bd3-length", "16",
                     "--bd3-blocks", "4"], "cache speedup"),
    "scaling.py": (["--config", str(ROOT / "configs" / "test.py"), "--devices", "2", "--vocab", "63", "--batch", "4",
                    "--seq-len", "16"], "data"),
    "train_step.py": (["--steps", "1"], "MFU"),
    # The session's tiny trained workdirs (tests/conftest.py) stand in for a trained model and its evaluator.
    "samplers.py": (["--workdir", "{tiny_workdir}", "--evaluator", "{tiny_ar_workdir}", "--num-samples", "2",
                     "--blocks", "2", "--quick", "--temperatures", "1", "--at-entropy", "1.5"],
                    ("threshold 0.7, 2 blocks, cache dual, T 1", "gen-ppl at the data's entropy",
                     "gen-ppl at entropy (1.500 bits)")),
    "data.py": (["--batches", "5", "--steps", "1"], "pipeline / train step"),
}


def test_every_benchmark_script_has_a_smoke_run():
  scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py")} - {"harness.py"}  # the scripts' shared helper
  assert scripts == set(RUNS), f"give each script a tiny run here: {sorted(scripts ^ set(RUNS))}"


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_runs_at_a_tiny_size(script, request):
  args, expected = RUNS[script]
  args = [request.getfixturevalue(a[1:-1]) if a.startswith("{") else a for a in args]
  out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  for line in (expected,) if isinstance(expected, str) else expected:
    assert line in out.stdout, out.stdout[-2000:]


@pytest.mark.parametrize("args, message", [
    (["--temperatures", "1", "--at-entropy", "two"], "give comma-separated entropies in bits"),
    (["--at-entropy", "1.5"], "give --temperatures too"),
    (["--temperatures", "1", "--at-entropy", "8.5"], "entropies are bits in [0, 8.006]"),
])
def test_samplers_at_entropy_is_checked(args, message, tiny_workdir, tiny_ar_workdir):
  """A malformed, orphaned or impossible --at-entropy (a unigram entropy over the tiny model's 257 tokens, bytes
  and the mask, is at most log2 257 = 8.006 bits) stops the script with a message naming the value, before any
  sampling."""
  out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "samplers.py"), "--workdir", str(tiny_workdir),
                        "--evaluator", str(tiny_ar_workdir), *args], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode != 0 and message in out.stderr and "--at-entropy=" in out.stderr, out.stderr[-2000:]

"""Every script under benchmarks/ runs to its figures at a tiny size (a smoke run: the figures themselves are
meaningless at this size and are not checked, only that each script still runs end to end and prints its table)."""
import dataclasses
import importlib.util
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
    # Every quick sampler, the dual cache's swept at two temperatures: only that one has a frontier to read.
    "samplers.py": (["--workdir", "{tiny_workdir}", "--evaluator", "{tiny_ar_workdir}", "--num-samples", "2",
                     "--blocks", "2", "--quick", "--only", "ancestral", "--only", "first-hitting", "--only",
                     "cache none", "--only", "cache prefix", "--only", "threshold 0.7, 2 blocks, cache dual=1,1.5",
                     "--only", "rank noise", "--only", "ReMDM", "--at-entropy", "1.5"],
                    ("threshold 0.7, 2 blocks, cache dual, T 1.5", "\nfirst-hitting ", "ReMDM cap 0.02",
                     "\nthreshold 0.7 rank noise 1000, 2 blocks, cache dual ",
                     "gen-ppl at entropy (1.500 bits), along each sampler's temperature frontier [95% bootstrap "
                     "over samples]:\n  threshold 0.7, 2 blocks, cache dual ",
                     "\nancestral 8 steps x 2 blocks, dual cache ", "paired by key")),
    "data.py": (["--batches", "5", "--steps", "1"], "pipeline / train step"),
    # Its compiles are the paper configs' (tests/test_paper_targets.py); here it renders the kept reports.
    "compile_table.py": (["--render-only"], "| `owt_md4_small` | `tpu:v5e-256` |"),
}


def test_every_benchmark_script_has_a_smoke_run():
  scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py")} - {"harness.py"}  # the scripts' shared helper
  assert scripts == set(RUNS), f"give each script a tiny run here: {sorted(scripts ^ set(RUNS))}"


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_runs_at_a_tiny_size(script, request):
  args, expected = RUNS[script]
  args = [request.getfixturevalue(a[1:-1]) if a.startswith("{") else a for a in args]
  out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *map(str, args)], capture_output=True,
                       text=True, timeout=600, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  for line in (expected,) if isinstance(expected, str) else expected:
    assert line in out.stdout, out.stdout[-2000:]


@pytest.mark.parametrize("args, message", [
    (["--temperatures", "1", "--at-entropy", "two"], "--at-entropy='two': give comma-separated entropies in bits"),
    (["--at-entropy", "1.5"], "--at-entropy='1.5' reads temperature frontiers: give --temperatures (or --only"),
    (["--temperatures", "1", "--at-entropy", "8.5"], "--at-entropy='8.5': entropies are bits in [0, 8.006]"),
    (["--only", "ReMDM=0.9,hot"], "--only 'ReMDM=0.9,hot': give comma-separated temperatures"),
    (["--only", "ReMDM=0.9,-1"], "--only 'ReMDM=0.9,-1': give comma-separated temperatures"),  # SamplerConfig's
])
def test_samplers_flags_are_checked(args, message, tiny_workdir, tiny_ar_workdir):
  """A malformed, orphaned or impossible --at-entropy (a unigram entropy over the tiny model's 257 tokens, bytes
  and the mask, is at most log2 257 = 8.006 bits), or a bad temperature in --only, stops the script with a
  message naming the value, before any sampling."""
  out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "samplers.py"), "--workdir", str(tiny_workdir),
                        "--evaluator", str(tiny_ar_workdir), *args], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]


def _samplers_script():
  spec = importlib.util.spec_from_file_location("samplers", ROOT / "benchmarks" / "samplers.py")
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, str(ROOT / "benchmarks"))  # its sibling helper, as when run as a script
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))
  return module


def test_samplers_only_picks_one_label_piece_with_its_own_temperatures():
  """One --only value is one piece of a label, commas and all, so one tau with one cache runs alone; a value's
  own temperatures replace --temperatures for the samplers it picks, and the others keep --temperatures."""
  script = _samplers_script()
  rows = script.settings(512, 64, quick=False)
  chosen = script.select(rows, [("threshold 0.9, 64 blocks, cache dual", [1.0, 2.0], "a"),
                                ("ancestral 512", [0.8], "b"), ("first-hitting", None, "c")], [1.5, 2.5])
  assert [(label, cfg.temperature, sampler) for label, cfg, sampler in chosen] == [
      ("ancestral 512 steps, T 0.8", 0.8, "ancestral 512 steps"),
      ("first-hitting, T 1.5", 1.5, "first-hitting"),
      ("first-hitting, T 2.5", 2.5, "first-hitting"),
      ("threshold 0.9, 64 blocks, cache dual, T 1", 1.0, "threshold 0.9, 64 blocks, cache dual"),
      ("threshold 0.9, 64 blocks, cache dual, T 2", 2.0, "threshold 0.9, 64 blocks, cache dual")]
  picked = {label: cfg for label, cfg in rows}["threshold 0.9, 64 blocks, cache dual"]
  assert chosen[-1][1] == dataclasses.replace(picked, temperature=2.0)  # only the temperature changes
  # No --only: every sampler, plain when there are no temperatures.
  assert [label for label, _, _ in script.select(rows, [], [])] == [label for label, _ in rows]


@pytest.mark.parametrize("only, message", [
    ([("ancestral 64,ReMDM", [], "ancestral 64,ReMDM")], "repeat the flag for several"),
    ([("cache dual", [], "cache dual"), ("threshold 0.5", [], "threshold 0.5")], "both pick"),
])
def test_samplers_only_refuses_what_it_cannot_pick(only, message):
  """A value matching no label (the old comma-separated form among them) or two values picking one sampler stop
  the script with a message naming the values."""
  script = _samplers_script()
  with pytest.raises(SystemExit, match=message) as stop:
    script.select(script.settings(512, 4, quick=False), only, [])
  assert all(repr(value) in str(stop.value) for _, _, value in only[:2])


"""Runs d3pm-train or d3pm-sample many times in one process, exactly as their entry points do (``common.run`` of the
module's ``main``), so a test can make dozens of CLI calls for the price of one JAX start-up. Not collected by
pytest: the tests run it as a subprocess, because absl's flags of the two commands cannot live in one process.

  python tests/cli_harness.py batch MODULE CALLS.json RESULTS.json   # each call's exit code, stdout and stderr
  python tests/cli_harness.py fuzz-train WORKROOT                     # hypothesis: random overrides and flags
  python tests/cli_harness.py fuzz-sample DIFFUSION_DIR AR_DIR        # hypothesis: random d3pm-sample flags

The property the fuzzers check for every drawn command line: it succeeds (exit 0), or it fails as a usage error
(exit 2) whose last line on stderr is one ``PROG: error: ...`` paragraph — never an uncaught exception or a
traceback.
"""
import contextlib
import importlib
import io
import json
import os
import pathlib
import sys
import traceback

import jax
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROGS = {"d3pm_jax.cli.train": "d3pm-train", "d3pm_jax.cli.sample": "d3pm-sample"}


def call(module_name: str, argv: list) -> dict:
  """One command line through the module's entry point: ``{"code", "out", "err", "exception"}``."""
  module = importlib.import_module(module_name)
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # config_flags adds one per override
    delattr(flags.FLAGS, name)
  jax.config.update("jax_enable_x64", False)  # d3pm-sample turns it on for float64 draws
  sys.argv = [PROGS[module_name], *argv]
  out, err = io.StringIO(), io.StringIO()
  result = {"code": None, "exception": None}
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      module.run()
    except SystemExit as e:
      result["code"] = 0 if e.code is None else e.code
    except BaseException:  # noqa: BLE001 - what the property forbids
      result["exception"] = traceback.format_exc()
  return {**result, "out": out.getvalue(), "err": err.getvalue()}


OUTCOMES = {}


def check_outcome(prog: str, argv: list, result: dict) -> None:
  """Success, or a clean usage error."""
  OUTCOMES[result["code"]] = OUTCOMES.get(result["code"], 0) + 1
  context = f"{prog} {' '.join(argv)}\nexit {result['code']}\nstderr: {result['err'][-3000:]}"
  assert result["exception"] is None, f"{context}\nuncaught: {result['exception']}"
  assert "Traceback (most recent call last)" not in result["err"], context
  assert result["code"] in (0, 2), context
  if result["code"] == 2:
    last = result["err"].rstrip("\n").splitlines()[-1]
    assert last.startswith(f"{prog}: error: ") and len(last) > len(prog) + 10, context


def fuzz_train(root: pathlib.Path) -> None:
  from hypothesis import HealthCheck, given, settings, strategies as st
  choices = {  # override: valid values, then invalid ones
      "train.steps": ["1", "2", "0", "-1", "abc", "1.5"],
      "train.batch_size": ["2", "4", "0", "3", "x"],
      "train.grad_accum": ["1", "2", "0"],
      "train.warmup_steps": ["0", "1", "5", "-2"],
      "train.learning_rate": ["1e-3", "0", "fast"],
      "train.preemption_grace_s": ["30", "0"],
      "train.seed": ["0", "7", str(2 ** 70)],
      "data.seq_len": ["8", "16", "0", "17", "64"],
      "data.name": ["markov", "wiki", ""],
      "data.prepared_dir": ["/nonexistent/prepared"],
      "process.name": ["absorbing", "uniform", "autoregressive", "nearest_neighbor", "gaussian"],
      "process.loss": ["masked", "d3pm", "ctmc", "ar", "elbo"],
      "model.num_heads": ["2", "4", "3", "0"],
      "model.dtype": ["float32", "bfloat16", "float16"],
      "model.head_impl": ["xla", "fused", "nope"],
      "mesh.data": ["1", "2", "0"],
      "train.stepz": ["1"],
      "nosection.key": ["1"],
      "train.steps.deeper": ["1"],
  }
  workdirs = st.sampled_from(["fresh", "shared", "/proc/d3pm_unwritable", "file"])
  extras = st.lists(st.sampled_from(["positional", "--distributed=sometimes", "--num_processes=2", "--unknown=1",
                                     "--distributed=off"]), max_size=2, unique=True)
  counter = iter(range(10**6))
  (root / "a_file").write_text("not a directory")

  @settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "30")), deadline=None, derandomize=True,
            database=None, suppress_health_check=list(HealthCheck))
  @given(st.dictionaries(st.sampled_from(sorted(choices)), st.integers(0, 5), max_size=4), workdirs, extras)
  def property_(picked, workdir, extra):
    overrides = [f"--config.{k}={choices[k][i % len(choices[k])]}" for k, i in picked.items()]
    where = {"fresh": root / f"run_{next(counter)}", "shared": root / "shared", "file": root / "a_file"}.get(
        workdir, pathlib.Path(workdir))
    argv = [f"--config={ROOT / 'configs' / 'test.py'}", f"--workdir={where}", "--config.data.name=markov",
            "--config.train.steps=2", "--config.train.eval_every=2", "--config.train.num_samples=1",
            "--config.train.sample_steps=2", *overrides,
            *(e if e != "positional" else "stray" for e in extra)]
    check_outcome("d3pm-train", argv, call("d3pm_jax.cli.train", argv))

  property_()


def fuzz_sample(diffusion: str, autoregressive: str) -> None:
  from hypothesis import HealthCheck, given, settings, strategies as st
  texts = st.lists(st.one_of(st.text(max_size=6), st.sampled_from(["[MASK]", "[MASK]*3", "[MASK]*40", "\\n",
                                                                    "[MASK]*0", "[mask]"])), max_size=4).map("".join)
  options = st.fixed_dictionaries({}, optional={
      "steps": st.sampled_from(["1", "3", "0", "-2", "x"]),
      "strategy": st.sampled_from(["ancestral", "confidence", "first_hitting", "threshold", "bogus"]),
      "threshold": st.sampled_from(["0", "0.7", "-1"]),
      "remask": st.sampled_from(["none", "psi", "cap", "bogus"]),
      "kappa": st.sampled_from(["0.5", "2"]),
      "eta": st.sampled_from(["0.1", "-1"]),
      "cache": st.sampled_from(["none", "dual", "bogus"]),
      "blocks": st.sampled_from(["1", "2", "4", "0", "3"]),
      "time_grid": st.sampled_from(["uniform", "cosine", "log"]),
      "num_samples": st.sampled_from(["1", "2", "0"]),
      "temperature": st.sampled_from(["0.5", "1", "0", "-1", "inf"]),
      "top_p": st.sampled_from(["0.5", "1", "0", "1.5"]),
      "seed": st.sampled_from(["0", "-1", "7", str(2 ** 70)]),
      "precision": st.sampled_from(["float32", "float64", "float16"]),
      "prompt": texts, "infill": texts,
  })
  switches = st.lists(st.sampled_from(["--greedy", "--ema", "--nogreedy", "stray"]), max_size=2, unique=True)
  workdirs = st.sampled_from([diffusion, autoregressive, "/nonexistent/run", str(pathlib.Path(diffusion).parent)])

  @settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "30")), deadline=None, derandomize=True,
            database=None, suppress_health_check=list(HealthCheck))
  @given(options, switches, workdirs)
  def property_(opts, extra, workdir):
    argv = [f"--workdir={workdir}", *(f"--{k}={v}" for k, v in opts.items()), *extra]
    if "steps" not in opts and workdir == diffusion:
      argv.append("--steps=2")  # keep the default 128 steps out of the budget
    check_outcome("d3pm-sample", argv, call("d3pm_jax.cli.sample", argv))

  property_()


if __name__ == "__main__":
  mode, *args = sys.argv[1:]  # call() replaces sys.argv
  if mode == "batch":
    module_name, calls, results = args
    outcome = [call(module_name, argv) for argv in json.loads(pathlib.Path(calls).read_text())]
    pathlib.Path(results).write_text(json.dumps(outcome))
  elif mode == "fuzz-train":
    fuzz_train(pathlib.Path(args[0]))
    print("outcomes by exit code: " + json.dumps(OUTCOMES), file=sys.stderr)
  elif mode == "fuzz-sample":
    fuzz_sample(*args)
    print("outcomes by exit code: " + json.dumps(OUTCOMES), file=sys.stderr)
  else:
    sys.exit(f"unknown mode {mode!r}; valid: batch, fuzz-train, fuzz-sample")

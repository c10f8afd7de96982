"""``--help`` of every installed ``d3pm-*`` command, run as a new user runs it: the console script (whose
``__main__`` is pip's wrapper, with no docstring and no flags) prints the command's own docstring, with its example
command line, and its own flags, and not the flags of the libraries it imports."""
import pathlib
import re
import subprocess
import sys

import pytest

COMMANDS = {
    "d3pm-train": ("d3pm-train --config=configs/x.py", ["--config", "--workdir", "--distributed"]),
    "d3pm-sample": ("d3pm-sample --workdir=DIR", ["--workdir", "--steps", "--strategy", "--prompt", "--infill"]),
    "d3pm-eval": ("d3pm-eval --workdir=DIR", ["--workdir", "--evaluator", "--time_samples", "--ema", "--frontier"]),
    "d3pm-compare": ("d3pm-compare --configs=a.py", ["--configs", "--workdir", "--override", "--time_samples"]),
    "d3pm-prepare": ("d3pm-prepare --dataset=NAME", ["--dataset", "--out", "--packing", "--validation"]),
    "d3pm-compile": ("d3pm-compile --config=FILE", ["--config", "--target", "--programs", "--json", "--segments"]),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_prints_the_commands_purpose_and_its_own_flags(command):
  """Mutation: no ``common.show_command_help`` (absl then prints "USAGE: d3pm-train [flags]" and no flag), or the
  shared evaluation flags not adopted by d3pm-eval and d3pm-compare."""
  script = pathlib.Path(sys.executable).parent / command
  assert script.exists(), f"{script} is not installed: pip install -e '.[test]'"
  out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  example, names = COMMANDS[command]
  assert example in out.stdout, out.stdout[:2000]
  for name in names:
    assert re.search(rf"\n\s+--(\[no\])?{name[2:]}:", out.stdout), (name, out.stdout[-3000:])
  assert "grain" not in out.stdout and "Try --helpfull" not in out.stdout.split("flags:")[0]

"""Every paper config compiles, with the real TPU or GPU compiler, for the hardware its docstring names, and fits.

Each config's ``HARDWARE`` lists the targets its docstring promises; here the train step (the program that decides
the fit: the largest state and activations) is compiled for each by ``d3pm-compile`` as a user runs it, at the
config's own batch, mesh and kernels, and its per-device memory must fit the chip's HBM with the stated margin.
The README's table of the same compiles is rendered from ``docs/compile/`` (``tests/test_readme.py``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import compile_table  # noqa: E402  (benchmarks/compile_table.py)

COMPILERS = importlib.util.find_spec("libtpu") is not None and importlib.util.find_spec("jax_plugins.xla_cuda12")
PAPER_CONFIGS = ("lm1b_d3pm", "lm1b_mdlm", "lm1b_bd3lm", "owt_md4_small", "owt_bd3lm", "text8_md4", "md4_small",
                 "diffusion_1b")
HARDWARE = compile_table.hardware()
CASES = [(config, target) for config in PAPER_CONFIGS for target in HARDWARE.get(config, ())]


def test_every_paper_config_names_its_hardware_in_its_docstring():
  """``HARDWARE`` is what the docstring promises: each target appears there, and every paper config has one."""
  for config in PAPER_CONFIGS:
    assert HARDWARE.get(config), f"configs/{config}.py names no HARDWARE"
    doc = (ROOT / "configs" / f"{config}.py").read_text().split('"""')[1]
    for target in HARDWARE[config]:
      assert re.search(rf"d3pm-compile [^\n]*--target={re.escape(target)}\b", doc), (config, target)


@pytest.mark.skipif(not COMPILERS, reason="libtpu and the CUDA plugin (the compile extra) are not installed: "
                                          "pip install -e '.[compile]'")
@pytest.mark.slow
@pytest.mark.parametrize("config,target", CASES)
def test_the_paper_config_compiles_for_its_hardware_and_fits(config, target, tmp_path):
  out = tmp_path / "report.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user runs it
  result = subprocess.run([sys.executable, "-m", "d3pm_jax.cli.compile", f"--config=configs/{config}.py",
                           f"--target={target}", "--programs=train", "--noroofline", f"--json={out}"], capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env=env)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  report = json.loads(out.read_text())
  (train,) = report["programs"]
  assert train["error"] is None and train["memory"]["total"] <= report["usable_bytes"], train

"""The correctness rows of benchmarks/accelerator_check.py on the hardware itself: skipped on a CPU (where
tests/test_benchmarks.py rehearses every row of the script at tiny shapes, kernels interpreted), run whenever a
GPU or TPU is present. ``pytest -m accelerator`` lists them."""
import importlib.util
import pathlib

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.accelerator,
              pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"),
                                 reason="needs a GPU or TPU; on a CPU the script's rehearsal runs instead")]


def _check():
  spec = importlib.util.spec_from_file_location("accelerator_check", ROOT / "benchmarks" / "accelerator_check.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("section", ["compile", "correct"])
def test_every_row_of_the_section_passes_on_this_accelerator(section, capsys):
  check = _check()
  status = check.main(["--only", section])
  out = capsys.readouterr().out
  assert status == 0, out[-6000:]

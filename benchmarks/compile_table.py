"""The README's table of paper configs x accelerator targets, from the real compilers (``d3pm-compile``).

    python benchmarks/compile_table.py              # every config's HARDWARE targets (tens of minutes on 2 cores)
    python benchmarks/compile_table.py --only owt_md4_small
    python benchmarks/compile_table.py --render-only    # print the table of the kept reports

Each config under ``configs/`` that names ``HARDWARE`` (the targets its docstring promises) is compiled for each
target by ``d3pm-compile --programs=train`` in its own process; the reports are kept in ``docs/compile/*.json``
and the table between the README's ``compile-table`` markers is rendered from all of them
(``tests/test_readme.py`` checks it is). A config that does not compile or fit makes the script exit 1 after
writing the rest.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
REPORTS = ROOT / "docs" / "compile"
BEGIN, END = "<!-- compile-table: begin -->", "<!-- compile-table: end -->"


def hardware() -> dict[str, tuple]:
  """``{config name: its HARDWARE targets}`` for the configs that name them."""
  found = {}
  for path in sorted((ROOT / "configs").glob("*.py")):
    spec = importlib.util.spec_from_file_location(f"{path.stem}_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if getattr(module, "HARDWARE", None):
      found[path.stem] = tuple(module.HARDWARE)
  return found


def report_path(config: str, target: str) -> pathlib.Path:
  return REPORTS / f"{config}@{target.replace(':', '_')}.json"


def render(reports: list[dict]) -> str:
  """The markdown table of the train steps' reports, one row per (config, target), in name order."""
  lines = ["| config | target | GiB per device (of HBM) | fits | compile s | step >= (roofline) | MFU <= |",
           "|---|---|---|---|---|---|---|"]
  for r in sorted(reports, key=lambda r: (r["config"], r["target"])):
    p = next(p for p in r["programs"] if p["name"] == "train step")
    name = pathlib.Path(r["config"]).stem
    if p["error"]:
      lines.append(f"| `{name}` | `{r['target']}` | - | does not compile | {p['compile_seconds']:.0f} | - | - |")
      continue
    step = p["step_seconds"]
    lines.append(f"| `{name}` | `{r['target']}` | {p['memory']['total'] / 2**30:.1f} ({r['hbm_bytes'] / 2**30:.0f}) "
                 f"| {'yes' if p['fits'] else 'no'} | {p['compile_seconds']:.0f} | "
                 f"{step * 1e3:.0f} ms ({p['bound']}) | {p['mfu_bound']:.0%} |")
  return "\n".join(lines)


def load_reports() -> list[dict]:
  return [json.loads(pathlib.Path(path).read_text()) for path in sorted(glob.glob(str(REPORTS / "*.json")))]


def readme_table(text: str) -> str:
  """The table between the README's markers."""
  return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", action="append", default=[], help="config names to recompile (default: all)")
  parser.add_argument("--render-only", action="store_true", help="print the table of the reports in docs/compile, "
                      "compiling and writing nothing")
  args = parser.parse_args()
  if args.render_only:
    print(render(load_reports()))
    return
  REPORTS.mkdir(parents=True, exist_ok=True)
  failed = []
  for config, chosen in hardware().items():
    if args.only and config not in args.only:
      continue
    for target in chosen:
      out = report_path(config, target)
      command = [sys.executable, "-m", "d3pm_jax.cli.compile", f"--config=configs/{config}.py", f"--target={target}",
                 "--programs=train", f"--json={out}"]
      print("$ " + " ".join(command[1:]), flush=True)
      result = subprocess.run(command, cwd=ROOT, text=True, capture_output=True,
                              env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
      print(result.stdout, result.stderr.strip().splitlines()[-1] if result.returncode else "", flush=True)
      if result.returncode:
        failed.append(f"{config} on {target}")
  readme = ROOT / "README.md"
  before, rest = readme.read_text().split(BEGIN, 1)
  readme.write_text(f"{before}{BEGIN}\n{render(load_reports())}\n{END}{rest.split(END, 1)[1]}")
  if failed:
    sys.exit(f"did not compile or fit: {', '.join(failed)}")


if __name__ == "__main__":
  main()

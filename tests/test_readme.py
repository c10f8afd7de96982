"""The README's promises: its test command is the one CI runs, and its Python example runs."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
  test_commands = [line for block in blocks for line in block.splitlines() if "pytest" in line]
  assert len(test_commands) == 1, test_commands
  ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
              if line.strip() and not line.strip().startswith("#")]
  assert test_commands[0].strip() in ci_lines


def test_readme_python_example_runs():
  readme = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
  assert blocks
  for block in blocks:
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert float(namespace["md4"]["nelbo"].mean()) > 0
    assert abs(float(namespace["md4"]["nelbo"].mean()) - float(namespace["ctmc"]["nelbo"].mean())) < 1e-3


def test_readme_comparison_comes_from_the_committed_report():
  """The README's comparison table is the committed d3pm-compare report's, its plot is a real PNG there, and the
  command beside it names the report's configs in the report's order."""
  readme = (ROOT / "README.md").read_text()
  report = (ROOT / "docs" / "comparison" / "report.md").read_text()
  section = readme.split("## Comparing corruption processes")[1].split("\n## ")[0]
  rows = [line for line in section.splitlines() if line.startswith("| stdlib_")]
  assert len(rows) == 6
  assert all(row in report.splitlines() for row in rows)
  command = re.search(r"d3pm-compare --configs=(\S+)", section).group(1).split(",")
  listed = re.findall(r"\(((?:configs/)[\w./]+)\)", report.split("\n\n")[1])
  assert command == listed
  plot = re.search(r"!\[[^\]]*\]\((docs/comparison/[\w.]+\.png)\)", section).group(1)
  from test_compare import assert_real_png
  assert_real_png(ROOT / plot)


@pytest.mark.parametrize("name", ["comparison", "block_diffusion"])
def test_the_published_report_is_the_code_rendering_of_its_published_json(name):
  """``docs/NAME/report.md`` is byte for byte what ``compare.render_report`` makes of the committed
  ``compare.json`` and ``*.eval.json`` (run order kept), so no published cell can drift from the code that
  formats it. Mutation: any change to the report's format or to one committed figure."""
  from d3pm_jax.evaluation import compare
  directory = ROOT / "docs" / name
  assert compare.render_report(str(directory)) == (directory / "report.md").read_text()


def test_the_readme_compile_table_is_the_rendering_of_the_committed_reports():
  """The table of paper configs x targets is what ``benchmarks/compile_table.py`` renders from the committed
  ``docs/compile/*.json`` (d3pm-compile's reports), one row per report and one report per promised target.
  Mutation: a hand-edited cell, a report dropped, a config's HARDWARE changed without recompiling."""
  import sys
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import compile_table
  reports = compile_table.load_reports()
  assert {(pathlib.Path(r["config"]).stem, r["target"]) for r in reports} == {
      (config, target) for config, chosen in compile_table.hardware().items() for target in chosen}
  assert compile_table.readme_table((ROOT / "README.md").read_text()) == compile_table.render(reports)

"""The README's promises: its test command is the one CI runs, and its Python example runs."""
import pathlib
import re

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

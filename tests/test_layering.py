"""The package's layers, read from its import graph (``d3pm_jax/__init__.py`` lists them).

Every import of ``d3pm_jax`` or ``pallas_kernels`` in the library, at module level or inside a function, is parsed
(not executed) and resolved to the module it loads; each must point to the importer's own layer or a lower one,
and the graph must have no circle. Every module must belong to a layer, so a new file cannot dodge the rule.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("d3pm_jax", "pallas_kernels")

# Lowest first. A module's layer is that of the longest prefix listed here.
LAYERS = {
    "pallas_kernels": 0,
    "d3pm_jax": 1,                # the package itself and the math at its top: schedules, processes, losses, ...
    "d3pm_jax.models": 2,
    "d3pm_jax.runtime": 3,
    "d3pm_jax.config": 4,
    "d3pm_jax.data": 5,
    "d3pm_jax.training": 6,
    "d3pm_jax.evaluation": 7,
    "d3pm_jax.cli": 8,
}
MATH = {"d3pm_jax", "d3pm_jax._checks", "d3pm_jax.schedules", "d3pm_jax.losses", "d3pm_jax.sampling",
        "d3pm_jax.draws", "d3pm_jax.processes", "d3pm_jax.blocks"}
# Packages of the I/O layers that the math and the models must never need.
IO_PACKAGES = ("orbax", "grain", "absl", "tensorboardX", "matplotlib", "tensorflow_datasets", "sentencepiece",
               "ml_collections", "tokenizers")


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def library_sources() -> dict[str, str]:
  return {module_name(p): p.read_text() for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def layer_of(module: str) -> int | None:
  for prefix in sorted(LAYERS, key=len, reverse=True):
    if module == prefix or module.startswith(prefix + "."):
      if prefix == "d3pm_jax" and not any(module == m or m != "d3pm_jax" and module.startswith(m + ".")
                                          for m in MATH):
        return None  # a new top-level module: it must be placed in a layer (here or in a folder)
      return LAYERS[prefix]
  return None


def imports(source: str, modules) -> list[tuple[str, int]]:
  """``(module, line)`` for every import of a library module in ``source``: ``from a.b import c`` loads ``a.b.c``
  when that is a module, else ``a.b``."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] in PACKAGES]
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
      for alias in node.names:
        target = f"{node.module}.{alias.name}"
        found.append((target if target in modules else node.module, node.lineno))
  return found


def violations(sources: dict[str, str]) -> list[str]:
  """Every import that points up the layers, every module outside the layers, and every circle."""
  problems, graph = [], {}
  for module, source in sources.items():
    layer = layer_of(module)
    if layer is None:
      problems.append(f"{module} belongs to no layer: move it into a layer's folder or list it in LAYERS/MATH")
      continue
    graph[module] = set()
    for target, line in imports(source, sources):
      graph[module].add(target)
      target_layer = layer_of(target)
      if target_layer is not None and target_layer > layer:
        problems.append(f"{module}:{line} (layer {layer}) imports {target} (layer {target_layer}), a higher layer")
    if layer in (LAYERS["d3pm_jax"], LAYERS["d3pm_jax.models"]):  # the math (processes/ too) and the models
      for node in ast.walk(ast.parse(source)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        problems += [f"{module}:{node.lineno} imports {n}, an I/O package the math and models must not need"
                     for n in names if n.split(".")[0] in IO_PACKAGES]
  state = {}

  def visit(module, path):
    state[module] = "open"
    for target in sorted(graph.get(module, ())):
      if state.get(target) == "open":
        problems.append("import circle: " + " -> ".join(path[path.index(target):] + [target]))
      elif target not in state and target in graph:
        visit(target, path + [target])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  return problems


def test_library_imports_point_down_the_layers():
  assert violations(library_sources()) == []


@pytest.mark.parametrize("module, source, expected", [
    ("d3pm_jax.losses", "from d3pm_jax.training import state\n", "imports d3pm_jax.training.state (layer 6)"),
    ("d3pm_jax.data.pipeline", "def f():\n  from d3pm_jax.evaluation import evaluate\n", "a higher layer"),
    ("d3pm_jax.models.transformer", "import d3pm_jax.cli.common\n", "imports d3pm_jax.cli.common (layer 8)"),
    ("pallas_kernels.attention", "from d3pm_jax import sampling\n", "imports d3pm_jax.sampling (layer 1)"),
    ("d3pm_jax.sampling", "import orbax.checkpoint as ocp\n", "an I/O package"),
    ("d3pm_jax.helpers", "import jax\n", "belongs to no layer"),
])
def test_checker_reports_an_upward_import(module, source, expected):
  """The checker itself, on one planted violation each: a lower layer importing a higher one at module level, inside
  a function, by ``import a.b``, from the kernels; the math importing an I/O package; an unplaced module."""
  sources = library_sources()
  sources[module] = sources.get(module, "") + source
  found = violations(sources)  # an upward import may close a circle too, reported after it
  assert found and expected in found[0] and all(module in f for f in found), found


def test_checker_reports_a_circle():
  sources = library_sources()
  sources["d3pm_jax.draws"] += "from d3pm_jax import sampling\n"  # sampling imports draws: a circle in one layer
  found = violations(sources)  # the longer circles through the new edge are reported too
  assert found[0] == "import circle: d3pm_jax.draws -> d3pm_jax.sampling -> d3pm_jax.draws", found
  assert all(f.startswith("import circle") and "d3pm_jax.draws -> d3pm_jax.sampling" in f for f in found), found


def module_file(module: str) -> pathlib.Path | None:
  base = ROOT.joinpath(*module.split("."))
  for path in (base.with_suffix(".py"), base / "__init__.py"):
    if path.exists():
      return path
  return None


def defined_names(path: pathlib.Path) -> set[str]:
  """The names a module defines at its top level (read, not imported: the commands' flags cannot all be defined
  in one process)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.col_offset == 0:
      names.add(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.col_offset == 0:
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      names |= {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}
    elif isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset == 0:
      names |= {(a.asname or a.name).split(".")[0] for a in node.names}
  return names


@pytest.mark.parametrize("folder", ["d3pm_jax", "pallas_kernels", "tests", "benchmarks", "configs"])
def test_every_library_import_resolves(folder):
  """Every import of ``d3pm_jax...`` anywhere in the repository names a module, or a name its module defines,
  including imports inside functions that no import-time check would reach (a stale path after a move)."""
  missing = []
  for path in sorted((ROOT / folder).rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
        module = module_file(node.module)
        missing += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                    if module is None or (a.name not in defined_names(module)
                                          and module_file(f"{node.module}.{a.name}") is None)]
      elif isinstance(node, ast.Import):
        missing += [f"{path.relative_to(ROOT)}:{node.lineno}: {a.name}" for a in node.names
                    if a.name.split(".")[0] in PACKAGES and module_file(a.name) is None]
  assert missing == []


def test_folders_say_what_they_hold_and_may_import():
  """Each layer folder's ``__init__`` docstring names its layer and what it may import, and imports nothing
  itself (so loading one command does not load every layer)."""
  for folder in ("models", "runtime", "data", "training", "evaluation", "cli"):
    init = ROOT / "d3pm_jax" / folder / "__init__.py"
    tree = ast.parse(init.read_text())
    doc = ast.get_docstring(tree) or ""
    assert f"Layer {LAYERS['d3pm_jax.' + folder]}" in doc and "import" in doc, (folder, doc)
    assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], folder


def test_readme_layout_lists_the_layers_this_test_enforces():
  """The README's layout table and ``LAYERS`` agree: each folder (or module) at the rank the checker gives it."""
  readme = (ROOT / "README.md").read_text()
  section = readme.split("## Layout: the package in layers")[1].split("\n## ")[0]
  listed = {}
  for line in section.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if len(cells) == 3 and cells[0].isdigit():
      first = cells[1].split(",")[0].strip().strip("`").removesuffix("/").removesuffix(".py")
      listed[first if first.startswith(PACKAGES) else "d3pm_jax/" + first] = int(cells[0])
  assert {path.replace("/", "."): rank for path, rank in listed.items()} == {
      "d3pm_jax.schedules" if prefix == "d3pm_jax" else prefix: rank for prefix, rank in LAYERS.items()}

"""The package's import graph: no cycles, and every module imports only modules below it.

Every module of `segresearch_jax` is parsed with `ast` (imports inside functions count:
a function-local import is still a dependency, it only runs later). The layers, bottom
to top; a module may import its own layer and the layers below, never one above:

  0. protocol: the shared vocabulary (tags, templates, stop reasons, image kinds).
  1. models, search, data: the policy, the retrieval backends, the datasets
     (`data/mask_tables.py` is the mask-cache format the pipeline reads).
  2. sharding, checkpoint, segmentation, agent: the mesh and the memory plan of a
     model, its checkpoints, the segmenters and mask-cache builder, the rollout.
  3. rl: GRPO math and the rows an update trains on.
  4. rewards: the official reward, the mask reward, scoring a rollout batch.
  5. eval: metrics, predictions, reports, training curves.
  6. metrics: the run's metrics.jsonl writer (reads it back with `eval/curves.py`).
  7. components, runtime, config_checks, steps, warm_start: what a run is built from,
     process setup, config validation, the jitted update, the supervised warm start.
  8. evaluate: the evaluation entry point.
  9. train, notebook: the trainer and the notebooks' helpers.
  10. tools: command lines over the package; nothing in the package imports them.

A module belongs to the layer of its longest listed prefix (`agent.rollout` is `agent`).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = "segresearch_jax"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE

LAYERS = (
  ("protocol",),
  ("models", "search", "data"),
  ("sharding", "checkpoint", "segmentation", "agent"),
  ("rl",),
  ("rewards",),
  ("eval",),
  ("metrics",),
  ("components", "runtime", "config_checks", "steps", "warm_start"),
  ("evaluate",),
  ("train", "notebook"),
  ("tools",),
)


def package_modules(root: pathlib.Path = ROOT, package: str = PACKAGE) -> dict[str, pathlib.Path]:
  """Module name relative to the package ("agent.rollout"; "" for the package) -> file."""
  out = {}
  for path in sorted(root.rglob("*.py")):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def imported_modules(
  name: str, path: pathlib.Path, modules: dict[str, pathlib.Path], package: str = PACKAGE
) -> set[str]:
  """The package modules `name` imports anywhere in its file (relative names, no self).

  `from segresearch_jax.agent import rollout` is `agent.rollout` when that is a module,
  else (a name inside the module) `agent`.
  """
  tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
  is_package = path.name == "__init__.py"
  here = [package] + (name.split(".") if name else [])
  if not is_package:
    here = here[:-1]  # A module's relative imports start at its package.
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = here[: len(here) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
      # `from pkg import module` names the module; `from module import name` names module.
      targets = [t for t in targets[:-1] if _relative(t, package) in modules] or [base]
    else:
      continue
    for target in targets:
      rel = _relative(target, package)
      if rel is None:
        continue
      while rel and rel not in modules:  # `import segresearch_jax.a.b.Name` -> a.b
        rel = rel.rpartition(".")[0]
      if rel != name:
        found.add(rel)
  return found


def _relative(dotted: str, package: str) -> str | None:
  if dotted == package:
    return ""
  if dotted.startswith(package + "."):
    return dotted[len(package) + 1 :]
  return None


def import_graph() -> dict[str, set[str]]:
  modules = package_modules()
  return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def layer_of(module: str, layers=LAYERS) -> int | None:
  """Index of the layer of `module`'s longest listed prefix; None when none is listed."""
  best, best_len = None, -1
  for index, prefixes in enumerate(layers):
    for prefix in prefixes:
      if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
        best, best_len = index, len(prefix)
  return best


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def upward_edges(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
  """'a -> b' for every import of a module in a higher layer than the importer's."""
  bad = []
  for a in sorted(graph):
    for b in sorted(graph[a]):
      la, lb = layer_of(a, layers), layer_of(b, layers)
      if la is not None and lb is not None and lb > la:
        bad.append(f"{a} (layer {la}) -> {b} (layer {lb})")
  return bad


@pytest.fixture(scope="module")
def graph():
  return import_graph()


def test_the_graph_sees_every_kind_of_import(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  for name in ("__init__.py", "low.py", "sub/__init__.py", "sub/mod.py", "sub/other.py"):
    (pkg / name).write_text("")
  (pkg / "top.py").write_text(
    "import pkg.low\n"
    "from pkg.sub import mod\n"
    "def f():\n"
    "  from pkg.sub.other import thing\n"
    "  from . import low\n"
  )
  (pkg / "sub" / "mod.py").write_text("from .other import x\nfrom .. import low as l\n")
  modules = package_modules(pkg, "pkg")
  assert imported_modules("top", pkg / "top.py", modules, "pkg") == {"low", "sub.mod", "sub.other"}
  assert imported_modules("sub.mod", pkg / "sub" / "mod.py", modules, "pkg") == {"sub.other", "low"}
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert find_cycles(graph) == [["a", "b", "c"]]
  layers = (("low",), ("sub",), ("top",))
  assert upward_edges({"sub.mod": {"top", "low"}, "top": {"sub.mod"}}, layers) == [
    "sub.mod (layer 1) -> top (layer 2)"
  ]


def test_every_module_has_a_layer(graph):
  unplaced = [m for m in graph if m and layer_of(m) is None]
  assert not unplaced, f"Add these modules to LAYERS in {__file__}: {unplaced}"
  assert not graph[""], "The package's __init__ imports nothing of the package."


def test_no_import_cycles(graph):
  assert find_cycles(graph) == []


def test_modules_import_only_layers_below_them(graph):
  assert upward_edges(graph) == []


def test_nothing_imports_the_command_line_tools(graph):
  users = sorted(
    f"{a} -> {b}" for a, targets in graph.items() for b in targets if b.startswith("tools.")
  )
  assert users == [], "tools/ are entry points; move what others need into the package."

"""The package's shape: no import circles, stages that do not import each other, layers that import
downward only, and no private name used outside its module. Read from the source with `ast`."""

import ast
import os

import lmtrain

ROOT = os.path.dirname(lmtrain.__file__)


def modules() -> dict[str, str]:
  """Module name -> path of every module of lmtrain."""
  out = {}
  for folder, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


MODULES = modules()


def imports(path: str) -> list[tuple[str, str | None]]:
  """(imported lmtrain module, name taken from it or None) of every import in the file, those in
  functions included."""
  out = []
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out += [(a.name, None) for a in node.names if a.name.startswith("lmtrain")]
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmtrain"):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        out.append((full, None) if full in MODULES else (node.module, alias.name))
  return out


def graph() -> dict[str, set[str]]:
  """Module -> the lmtrain modules it imports (a package's __init__ counts as its own module)."""
  return {name: {m for m, _ in imports(path) if m in MODULES and m != name}
          for name, path in MODULES.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Import circles of a module graph. A submodule importing its own package (whose __init__
  runs first anyway) is no circle."""
  done, found = set(), []

  def visit(node, stack):
    if node in stack:
      found.append(stack[stack.index(node):] + [node])
      return
    if node in done:
      return
    for nxt in sorted(edges.get(node, ())):
      if not node.startswith(nxt + "."):
        visit(nxt, stack + [node])
    done.add(node)

  for module in sorted(edges):
    visit(module, [])
  return found


def test_the_package_has_no_import_circle():
  assert not cycles(graph()), cycles(graph())[:3]


def test_no_stage_module_imports_another():
  stages = {m for m in MODULES if m.startswith("lmtrain.stages.") and m != "lmtrain.stages.common"}
  found = [(m, d) for m in stages for d in graph()[m] if d in stages]
  assert not found, found


def test_layers_import_downward():
  """model and data are the bottom layers: they import neither training, stages nor rl."""
  upper = ("lmtrain.train", "lmtrain.stages", "lmtrain.rl", "lmtrain.cli", "lmtrain.config")
  found = [(m, d) for m, deps in graph().items()
           if m.startswith(("lmtrain.model", "lmtrain.data"))
           for d in deps if d.startswith(upper)]
  assert not found, found


def private_uses(path: str) -> list[str]:
  """`module._name` of every private name of another lmtrain module that the file uses."""
  tree = ast.parse(open(path).read())
  found, aliases = [], {}  # aliases: local name -> lmtrain module, for attribute uses
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmtrain"):
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        if full in MODULES:
          aliases[alias.asname or alias.name] = full
        elif alias.name.startswith("_") and not alias.name.startswith("__"):  # not __version__
          found.append(full)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("lmtrain") and alias.asname:
          aliases[alias.asname] = alias.name
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and node.attr.startswith("_")
        and not node.attr.startswith("__")):
      found.append(f"{aliases[node.value.id]}.{node.attr}")
  return found


def test_no_private_name_is_used_outside_its_module():
  found = {name: private_uses(path) for name, path in MODULES.items()}
  assert not {k: v for k, v in found.items() if v}


def test_the_walker_sees_imports_and_private_uses(tmp_path):
  # The checks above pass only if the walker finds what it looks for: prove it on known files.
  path = tmp_path / "probe.py"
  path.write_text("from lmtrain.stages import ppo\nfrom lmtrain.train.loop import LoopConfig\n"
                  "def f():\n  from lmtrain.rl import core\n")
  assert set(imports(str(path))) == {("lmtrain.stages.ppo", None),
                                     ("lmtrain.train.loop", "LoopConfig"),
                                     ("lmtrain.rl.core", None)}
  assert "lmtrain.rl.stage" in graph()["lmtrain.stages.ppo"]
  assert "lmtrain.train.loop" in graph()["lmtrain.rl.stage"]
  path.write_text("from lmtrain.model import transformer\nfrom lmtrain.train.evaluation import _close\n"
                  "transformer._secret(1)\n")
  assert private_uses(str(path)) == ["lmtrain.train.evaluation._close",
                                     "lmtrain.model.transformer._secret"]
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
  assert cycles({"p.x": {"p"}, "p": {"p.x"}}) == []  # a package and its own submodule

"""Dependencies run one way: ki/ is the library; data_prep/, experiments/, benchmarks/ and launch/
sit on top of it and import ki and themselves, never each other, and ki imports none of them.

Every import statement counts, including those inside functions. An import of a name that is not
one of these packages (the standard library, third-party packages) is not checked; neither is a
relative import (it stays inside its own package). launch/xm_launch.py imports its sibling
launch/xm_jobs.py as a top-level module (xmanager runs it as a script): such an import of a file
next to the importing one counts as an import of its own package.
"""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Package -> the packages it may import.
ALLOWED = {
  "ki": {"ki"},
  "data_prep": {"ki", "data_prep"},
  "experiments": {"ki", "experiments"},
  "benchmarks": {"ki", "benchmarks"},
  "launch": {"ki", "launch"},
}


def _python_files(root: str, package: str):
  for folder, _, names in os.walk(os.path.join(root, package)):
    for name in sorted(names):
      if name.endswith(".py"):
        yield os.path.join(folder, name)


def _imported_modules(tree: ast.AST):
  """(line, dotted module name) of every absolute import in the tree, at any depth."""
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
      yield node.lineno, node.module


def wrong_way_imports(package: str, root: str = REPO) -> list[str]:
  """'path:line imports X' for each import in root/`package` that runs the wrong way."""
  problems = []
  for path in _python_files(root, package):
    with open(path) as f:
      tree = ast.parse(f.read(), filename=path)
    siblings = {name[:-3] for name in os.listdir(os.path.dirname(path)) if name.endswith(".py")}
    for line, module in _imported_modules(tree):
      top = module.split(".")[0]
      target = package if top in siblings else top
      if target in ALLOWED and target not in ALLOWED[package]:
        problems.append(f"{os.path.relpath(path, root)}:{line} imports {module}")
  return problems


def test_checker_sees_function_level_and_from_imports(tmp_path):
  """The checker itself: a wrong-way import inside a function is found, with its line."""
  package = tmp_path / "ki"
  package.mkdir()
  (package / "bad.py").write_text(
    "import os\nfrom ki import fine\n\n\ndef f():\n"
    "  from data_prep import job\n"
    "  import benchmarks\n"
  )
  assert wrong_way_imports("ki", str(tmp_path)) == [
    "ki/bad.py:6 imports data_prep",
    "ki/bad.py:7 imports benchmarks",
  ]


def test_dependencies_run_one_way():
  problems = [problem for package in ALLOWED for problem in wrong_way_imports(package)]
  assert not problems, "imports that run the wrong way (see GUIDE practice 15):\n" + "\n".join(
    problems
  )

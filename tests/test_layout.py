"""Package layout: the method modules of hdb_jax never import the mini world
(hdb_jax/mini/); entry points pick its parts by config and pass them in."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "hdb_jax")


def _imports(path):
  tree = ast.parse(open(path).read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_method_modules_do_not_import_the_mini_world():
  entry_points = {os.path.join(PACKAGE, "cli.py")}
  checked = 0
  for folder, _, names in os.walk(PACKAGE):
    if os.path.join(PACKAGE, "mini") in os.path.join(folder, ""):
      continue
    for name in names:
      path = os.path.join(folder, name)
      if not name.endswith(".py") or path in entry_points:
        continue
      checked += 1
      bad = [m for m in _imports(path) if m.startswith("hdb_jax.mini")]
      assert not bad, f"{os.path.relpath(path, REPO)} imports {bad}"
  assert checked >= 15


def test_mini_world_modules_live_in_the_subpackage():
  for name in ("render", "synthetic_faces", "captions", "recognizer", "pretrain",
               "base_eval", "tokenizer", "dataset"):
    assert os.path.exists(os.path.join(PACKAGE, "mini", f"{name}.py")), name
    assert not os.path.exists(os.path.join(PACKAGE, f"{name}.py")), name


def test_only_the_model_modules_import_upstream_flax_classes():
  """The Flax classes diffusers 0.40 and transformers 5 dropped stay in two files
  (README, "Why these pins")."""
  allowed = {os.path.join(PACKAGE, "models.py"), os.path.join(PACKAGE, "models_eval.py")}
  for folder, _, names in os.walk(PACKAGE):
    for name in names:
      path = os.path.join(folder, name)
      if not name.endswith(".py") or path in allowed:
        continue
      bad = [m for m in _imports(path) if m.split(".")[0] in ("diffusers", "transformers")
             and ("flax" in m.lower())]
      assert not bad, f"{os.path.relpath(path, REPO)} imports {bad}"

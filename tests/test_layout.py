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
  # the fronts: the command line, the personalization API they share, the web demo
  entry_points = {os.path.join(PACKAGE, name) for name in ("cli.py", "api.py", "demo.py")}
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


# Where PyTorch and its model libraries may be imported: the benchmarks that time the
# PyTorch route against ours. The tests import them as references (the [test] extra).
PYTORCH_SIDE = {os.path.join(REPO, "benchmarks", name)
                for name in ("personalize_torch.py", "finetune_step.py", "finetune_torch.py")}
UPSTREAM = ("diffusers", "transformers", "torch", "peft")


def test_no_module_imports_diffusers_transformers_or_torch():
  """The model code is our own (hdb_jax/nn): the library, its entry points and configs
  import none of the PyTorch libraries, except torch for reading a pickle when the user
  allows it (models._read_pickle)."""
  checked = 0
  for top in ("hdb_jax", "train", "configs", "benchmarks", "scripts"):
    for folder, _, names in os.walk(os.path.join(REPO, top)):
      for name in names:
        path = os.path.join(folder, name)
        if not name.endswith(".py") or path in PYTORCH_SIDE:
          continue
        checked += 1
        bad = [m for m in _imports(path) if m.split(".")[0] in UPSTREAM]
        if path == os.path.join(PACKAGE, "models.py"):
          bad = [m for m in bad if m != "torch"]
        assert not bad, f"{os.path.relpath(path, REPO)} imports {bad}"
  assert checked >= 60

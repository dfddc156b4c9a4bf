r"""The numbers in the docs, from the JSON files they come from.

    python -m train.update_docs           # rewrite every generated number, table and file
    python -m train.update_docs --check   # change nothing; exit 1 naming what is stale

Run it after a committed result changes (e.g. rows of docs/mini_results.json rerun): the
tables and every marked number follow; a claim that stopped holding is named and must be
rewritten by hand. `tests/test_docs_numbers.py` runs the check, so a stale number fails CI.

What a markdown file (README.md, docs/**/*.md) can hold, all inside HTML comments so
that nothing shows when the page is rendered:

- `<!-- numbers: name=path[:key.key] ... -->`: the sources its expressions read, by name
  (a JSON file, or a .jsonl file as a list of its lines), optionally one subtree.
- `0.516<!--=t.full.identity_plain-->`: a number written from the expression after it.
  The written form keeps its style: the number of decimals, a sign when it had one
  (`+0.195`, `-0.057`), thousands commas.
- `<!--? expr -->`: a claim the text beside it makes; it must hold (e.g. that an interval
  holds 0: "a tie").
- `<!-- table: docs/x.md -->` ... `<!-- end table -->`: a copy of a generated file
  (GENERATED), or `<!-- table: NAME -->` a table made from results (BLOCKS).

Expressions are Python on the sources: dict keys read as attributes
(`t.lora_dreambooth_400.minus_full.background.mean`), with abs, min, max, round, len,
sum, mean, all, any.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SECONDS = "benchmarks/results/method_seconds.json"  # one run for every mini method


def _table(summary_path: str) -> str:
  from train import evaluate_report
  with open(os.path.join(REPO, summary_path)) as f:
    summary = json.load(f)
  seconds = None
  if os.path.exists(os.path.join(REPO, SECONDS)):
    with open(os.path.join(REPO, SECONDS)) as f:
      seconds = {k: v["seconds"] for k, v in json.load(f)["methods"].items()}
  return evaluate_report.markdown_table(summary, seconds) + "\n"


# Generated files: path -> function making their text (train/evaluate.py writes the same
# as table.md of its workdir).
GENERATED = {
    "docs/mini_results_table.md": lambda: _table("docs/mini_results.json"),
    "docs/mini_frontier/table.md": lambda: _table("docs/mini_frontier/summary.json"),
    "docs/mini_levers/table.md": lambda: _table("docs/mini_levers/summary.json"),
    "docs/mini_hypernet_levers/table.md": lambda: _table("docs/mini_hypernet_levers/summary.json"),
}

def _hypernet_table(rows: list[tuple[str, str, str]], bold=()) -> str:
  """A table of train/eval_hypernet.py rows: (label, JSON file, key path of the row);
  the first row is the base the others' gains and drops are against."""
  def row_of(path, keys):
    value = load_source(f"{path}:{keys}")
    return value
  base = row_of(*rows[0][1:])
  lines = ["| row | identity, plain prompt | identity, all prompts | background acc. (drop) "
           "| style acc. (drop) | face validity |", "|---|---|---|---|---|---|"]
  for label, path, keys in rows:
    r = row_of(path, keys)
    plain = f"{r.identity_accuracy_plain:.3f}"
    if r is not base and keys != rows[0][2]:
      plain += f" ({r.identity_accuracy_plain - base.identity_accuracy_plain:+.3f})"
    context = [f"{r[k]:.3f}" + (f" ({base[k] - r[k]:.3f})" if keys != rows[0][2] else "")
               for k in ("background_accuracy", "style_accuracy")]
    cells = [label, plain, f"{r.identity_accuracy_all_prompts:.3f}", *context,
             f"{r.face_validity:.3f}"]
    if label in bold:
      cells = [f"**{c}**" for c in cells[:3]] + cells[3:]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


_EVAL = "docs/mini_hypernet_eval.json"
_EVAL_5K = "docs/mini_hypernet_5k_eval.json"
_VARIANTS = "docs/mini_hypernet_variants.json"
_STANDARD = "docs/mini_hypernet_standard_eval.json"
# Tables that live only inside a page: name -> function making their text.
def _iterations_table(path: str) -> str:
  """The base and each s of one train/eval_hypernet.py run."""
  return _hypernet_table(
      [("base model", path, "rows.base")]
      + [(f"hypernetwork s = {s}" + (" (as trained)" if s == 4 else ""), path,
          f"rows.hypernet_s{s}") for s in (1, 2, 3, 4, 5, 6, 8)],
      bold=("hypernetwork s = 4 (as trained)", "hypernetwork s = 6"))


BLOCKS = {
    "hypernet_eval": lambda: _iterations_table(_EVAL),
    "hypernet_eval_5k": lambda: _iterations_table(_EVAL_5K),
    "hypernet_earlier": lambda: _hypernet_table(
        [("base model", _STANDARD, "rows.base")]
        + [(f"hypernetwork s = {s}" + (" (as trained)" if s == 4 else ""), _STANDARD,
            f"rows.hypernet_s{s}") for s in (1, 2, 4, 8)]
        + [("beta = 0, s = 4 (2,000 steps)", _VARIANTS, "beta0.rows.hypernet_s4"),
           ("learnable aux, beta = 0, s = 4 (2,000 steps)", _VARIANTS,
            "learnable_aux.rows.hypernet_s4")],
        bold=("hypernetwork s = 4 (as trained)",)),
    "hypernet_masked": lambda: _hypernet_table(
        [("base model", _VARIANTS, "standard_2000.rows.base"),
         ("standard (alpha = beta = 1), 2,000 steps", _VARIANTS, "standard_2000.rows.hypernet_s4"),
         ("face-masked, 2,000 steps", _VARIANTS, "face_masked_2000.rows.hypernet_s4"),
         ("face-masked, 5,000 steps", _VARIANTS, "face_masked_5000.rows.hypernet_s4")],
        bold=("face-masked, 2,000 steps", "face-masked, 5,000 steps")),
}

SOURCES = re.compile(r"<!--\s*numbers:(.*?)-->", re.S)
NUMBER = re.compile(r"(?<![\w>.])([+\-\u2212]?)(\d[\d,]*(?:\.\d+)?)<!--=(.+?)-->", re.S)
CLAIM = re.compile(r"<!--\?(.+?)-->", re.S)
BLOCK = re.compile(r"(<!-- table: (\S+) -->\n)(.*?)(<!-- end table -->)", re.S)


class Tree(dict):
  """A JSON object whose keys read as attributes."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(f"no key {name!r} (keys: {sorted(self)[:12]})") from None


def _wrap(value):
  if isinstance(value, dict):
    return Tree((k, _wrap(v)) for k, v in value.items())
  if isinstance(value, list):
    return [_wrap(v) for v in value]
  return value


def load_source(spec: str):
  """'path[:key.key]' -> the file's JSON (a .jsonl: the list of its lines), or a subtree."""
  path, _, keys = spec.partition(":")
  with open(os.path.join(REPO, path)) as f:
    if path.endswith(".jsonl"):
      value = [json.loads(line) for line in f if line.strip()]
    else:
      value = json.load(f)
  for key in filter(None, keys.split(".")):
    value = value[key]
  return _wrap(value)


HELPERS = {"abs": abs, "min": min, "max": max, "round": round, "len": len, "sum": sum,
           "all": all, "any": any, "mean": lambda xs: float(np.mean(list(xs)))}


def namespace(text: str, where: str) -> dict:
  """The sources a markdown text declares, loaded, with the helpers."""
  names = dict(HELPERS)
  for block in SOURCES.findall(text):
    for item in block.split():
      name, _, spec = item.partition("=")
      if not spec:
        raise ValueError(f"{where}: numbers: {item!r} is not name=path")
      names[name] = load_source(spec)
  return names


def evaluate(expr: str, names: dict, where: str):
  try:
    return eval(expr, {"__builtins__": {}, **names})  # the repository's own docs only
  except Exception as e:
    raise ValueError(f"{where}: cannot evaluate {expr.strip()!r}: {e}") from e


def written(value, sign: str, digits: str) -> str:
  """`value` in the style of the text it replaces (sign, decimals, thousands commas)."""
  decimals = len(digits.partition(".")[2])
  commas = "," if "," in digits else ""
  spec = ("+" if sign else "") + commas + f".{decimals}f"
  out = format(float(value), spec)
  return out.replace("-", "\u2212") if sign == "\u2212" else out


def render(text: str, where: str) -> tuple[str, list[str]]:
  """-> (the text with every marked number and table block rewritten, the problems: claims
  that do not hold)."""
  names = namespace(text, where)
  line_of = lambda pos: text.count("\n", 0, pos) + 1

  def number(match):
    sign, digits, expr = match.groups()
    value = evaluate(expr, names, f"{where}:{line_of(match.start())}")
    return written(value, sign, digits) + f"<!--={expr}-->"

  problems = []
  for match in CLAIM.finditer(text):
    if not evaluate(match.group(1), names, f"{where}:{line_of(match.start())}"):
      problems.append(f"{where}:{line_of(match.start())}: claim does not hold: "
                      f"{match.group(1).strip()}")
  out = NUMBER.sub(number, text)

  def block(match):
    head, path, _, tail = match.groups()
    make = GENERATED.get(path) or BLOCKS.get(path)
    if make is None:
      raise ValueError(f"{where}: table {path} is neither a generated file nor a block "
                       f"({sorted(GENERATED) + sorted(BLOCKS)})")
    return head + make() + tail

  return BLOCK.sub(block, out), problems


def marked_files() -> list[str]:
  paths = [os.path.join(REPO, "README.md")] + sorted(
      glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))
  return [p for p in paths if os.path.relpath(p, REPO) not in GENERATED]


def stale() -> tuple[dict, list[str]]:
  """-> ({relative path: its up-to-date text} for every file that differs, problems)."""
  changed, problems = {}, []
  for path, make in GENERATED.items():
    with open(os.path.join(REPO, path)) as f:
      old = f.read()
    if make() != old:
      changed[path] = make()
  for path in marked_files():
    where = os.path.relpath(path, REPO)
    with open(path) as f:
      old = f.read()
    new, found = render(old, where)
    problems += found
    if new != old:
      changed[where] = new
  return changed, problems


def differences(old: str, new: str) -> list[str]:
  import difflib
  return [l for l in difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="",
                                          n=0) if l[:1] in "+-" and l[:3] not in ("+++", "---")]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
  args = parser.parse_args(argv)
  from hdb_jax import files
  changed, problems = stale()
  for path, new in changed.items():
    if args.check:
      with open(os.path.join(REPO, path)) as f:
        print(f"{path}: stale\n  " + "\n  ".join(differences(f.read(), new)[:20]))
    else:
      with files.atomic_path(os.path.join(REPO, path)) as tmp, open(tmp, "w") as f:
        f.write(new)
      print(f"{path}: rewritten")
  for problem in problems:
    print(problem)
  return 1 if problems or (args.check and changed) else 0


if __name__ == "__main__":
  sys.exit(main())

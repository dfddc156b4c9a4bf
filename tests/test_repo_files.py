"""What the repository ships is portable: every committed JSON file is valid strict JSON
(no NaN or Infinity, which Python writes by default and other readers refuse) with no
machine paths in it, and nothing tracked sends readers to files outside the repository."""

import json
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTSIDE = ".." + "/shared"  # spelled apart so that this file does not match itself
MACHINE_PATH = re.compile(r"(^|[\s\"'=])(/work/|/tmp/|/home/|/root/|/Users/|[A-Z]:\\\\)")


def _tracked(*patterns):
  try:
    listed = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("not a git checkout")
  return [os.path.join(REPO, name) for name in listed]


def _refuse_constant(name):
  raise ValueError(f"non-standard JSON constant {name}")


def test_committed_json_is_strict_and_has_no_machine_paths():
  paths = _tracked("*.json", "*.jsonl")
  assert paths
  for path in paths:
    with open(path) as f:
      text = f.read()
    lines = [l for l in text.splitlines() if l.strip()] if path.endswith(".jsonl") else [text]
    for line in lines:
      json.loads(line, parse_constant=_refuse_constant)  # raises on NaN / Infinity
    match = MACHINE_PATH.search(text)
    assert match is None, f"{path}: machine path {text[match.start():match.start() + 60]!r}"


def test_nothing_tracked_points_outside_the_repository():
  for path in _tracked("*.py", "*.md", "*.cfg", "*.toml", "*.txt", ".ci/*"):
    with open(path, errors="replace") as f:
      text = f.read()
    assert OUTSIDE not in text, path

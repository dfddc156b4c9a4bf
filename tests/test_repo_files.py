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
# Absolute paths of someone's machine: this one's work and temporary folders, home
# folders, macOS temporary folders, removable and mount points, Windows user folders.
# Allowed on purpose: the placeholder roots the docs' SD1.5 and pod commands use for the
# reader's own folders (/data/..., /shared/..., /mnt/shared/...: a shared mount).
MACHINE_PATH = re.compile(
    r"(^|[\s\"'=(`])(/work/|/tmp/|/home/|/root/|/Users/|/var/folders/|/private/var/|"
    r"/media/|/mnt/(?!shared\b)|[A-Z]:\\{1,2}Users\\)")


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


def test_the_machine_path_check_catches_what_it_names():
  for path in ("/home/alice/hdb", "/root/.cache/x", "/tmp/run", "/work/main/docs",
               "/Users/bob/sd", "/var/folders/xy/T/z", "/private/var/tmp", "/media/usb/x",
               "/mnt/data/sd15", "C:\\Users\\bob", "C:\\\\Users\\\\bob"):
    for text in (path, f"--out {path}", f'"{path}"', f"dir={path}", f"`{path}`"):
      assert MACHINE_PATH.search(text), text
  for text in ("/mnt/shared/tfds", "--config.model.path=/data/sd15", "/shared/run",
               "workdir/tmp/x", "https://host/tmp/x", "~/.cache/hdb-jax",
               "/usr/lib/chromium/chromium", "assets/mini_base"):
    assert not MACHINE_PATH.search(text), text


def test_nothing_tracked_points_outside_the_repository_or_at_a_machine():
  """No tracked text sends readers outside the repository (OUTSIDE) or names a machine's
  own folders (the JSON is checked above)."""
  for path in _tracked("*.py", "*.md", "*.cfg", "*.toml", "*.txt", "*.sh", ".ci/*"):
    with open(path, errors="replace") as f:
      text = f.read()
    assert OUTSIDE not in text, path
    if os.path.basename(path) != "test_repo_files.py":  # its examples above
      match = MACHINE_PATH.search(text)
      assert match is None, f"{path}: machine path {text[match.start():match.start() + 60]!r}"

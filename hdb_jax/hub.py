"""Models where users keep them: a local folder, or a Hugging Face repo id ("owner/name",
"owner/name@revision") found in the local Hugging Face cache.

    config = config_file.load("configs/sd15.py", {"model.path": "someone/sd15-flax"})
    # config.model.path is now that repo's snapshot folder in ~/.cache/huggingface/hub

`resolve` leaves an existing local path as it is. Anything else shaped like a repo id is
looked up with `huggingface_hub.snapshot_download(local_files_only=True)`: nothing goes
to the network unless `allow_download` is set (`--allow-download`). An id that is not in
the cache is an error saying where it looked and how to fetch it.
"""

from __future__ import annotations

import os
import re

# The config keys that name a model folder (where a config has them).
CONFIG_PATHS = ("model.path", "personalize.hypernet", "metrics.clip_path", "metrics.dino_path")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def cache_folder() -> str:
  """Where huggingface_hub keeps models: $HF_HUB_CACHE, else $HF_HOME/hub, else
  ~/.cache/huggingface/hub (read now, so a changed environment is honoured)."""
  if os.environ.get("HF_HUB_CACHE"):
    return os.path.expanduser(os.environ["HF_HUB_CACHE"])
  home = os.environ.get("HF_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
  return os.path.join(os.path.expanduser(home), "hub")


def is_repo_id(text: str) -> bool:
  return bool(_REPO_ID.fullmatch(text)) and ".." not in text


def resolve(path: str, what: str = "model", allow_download: bool = False,
            cache_dir: str | None = None) -> str:
  """`path` if it is empty or exists locally; else, for a repo id, the folder of its
  snapshot in the Hugging Face cache (`cache_dir`, default `cache_folder()`), fetched
  first if `allow_download`. FileNotFoundError (naming `what`, the id, the cache folder
  and the command that fetches it) when it is in neither place."""
  if not path or os.path.exists(os.path.expanduser(path)) or not is_repo_id(path):
    return path
  from huggingface_hub import snapshot_download
  from huggingface_hub.errors import LocalEntryNotFoundError
  repo_id, _, revision = path.partition("@")
  cache = cache_dir or cache_folder()
  try:
    return snapshot_download(repo_id, revision=revision or None, cache_dir=cache,
                             local_files_only=not allow_download)
  except LocalEntryNotFoundError:
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    raise FileNotFoundError(
        f"{what} {path!r}: no such local folder, and not in the Hugging Face cache "
        f"({cache}, looked for {os.path.join(cache, 'models--' + repo_id.replace('/', '--'))}"
        f"). Fetch it with `{fetch}` (huggingface_hub's command; --cache-dir to put it "
        "elsewhere, then set $HF_HUB_CACHE), or pass --allow-download") from None
  except Exception as e:  # a download asked for and refused: no network, no such repo
    raise FileNotFoundError(f"{what} {path!r}: cannot fetch it from the Hugging Face Hub "
                            f"({type(e).__name__}: {e})") from e


def resolve_config(config, allow_download: bool = False) -> None:
  """Every model folder key of `config` (`CONFIG_PATHS`, where present), resolved in place."""
  for key in CONFIG_PATHS:
    section, name = key.split(".")
    if section in config and name in config[section] and config[section][name]:
      config[section][name] = resolve(str(config[section][name]), f"config.{key}",
                                      allow_download)

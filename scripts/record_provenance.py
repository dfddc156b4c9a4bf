r"""provenance.json for the artefacts committed before the training entry points wrote one.

    python scripts/record_provenance.py            # writes assets/*/provenance.json

What is known, and only that: the commit that added the artefact (git history), the
documented command, today's configs resolved for it and a check of every setting the
artefact recorded itself against them, the steps it recorded, its data (identities, and
a fingerprint of what the documented command reads today with the writers' own
functions, with whether the data code changed since), its weights' fingerprint. What was
not recorded (the run's exact code state, settings the artefact does not store, data
that is not committed) is listed under "unknown". New runs write their own
(hdb_jax/provenance.py).
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from hdb_jax import config_file, files, provenance  # noqa: E402

DATA_CODE = ["hdb_jax/mini/render.py", "hdb_jax/mini/synthetic_faces.py"]  # what the data is
# The commit that added the 5,000-step network as assets/mini_hypernet (now
# assets/mini_hypernet_5k)
HYPERNET_5K_COMMIT = "edf259882452576a515a273dcfdb5c34653fbe51"
WRITTEN = ("after the fact by scripts/record_provenance.py, from git history and the "
           "artefact's own files: the run that made it recorded no provenance")


def git(*args) -> str:
  return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                        check=True).stdout.strip()


def committed_in(path: str, rev: str = "HEAD") -> dict:
  """The commit that last added or changed `path` up to `rev` (the artefact as committed;
  not the one that removed it) and its parent."""
  commit = git("log", "-1", "--diff-filter=AM", "--format=%H", rev, "--", path)
  return {"commit": commit, "date": git("log", "-1", "--format=%cI", commit),
          "parent": git("rev-parse", commit + "^"),
          "subject": git("log", "-1", "--format=%s", commit)[:200]}


def data_code_changed_since(commit: str) -> list[str]:
  """Commits after `commit` that touched the code making the mini world's data (whether
  they change the rendered data is not checked: their subjects say)."""
  out = git("log", "--format=%h %s", f"{commit}..HEAD", "--", *DATA_CODE)
  return [line[:120] for line in out.splitlines()]


def check(recorded: dict, today: dict) -> dict:
  """{setting: equal?} for each setting the artefact recorded."""
  return {key: recorded[key] == today.get(key) for key in recorded}


def base_record(folder="assets/mini_base"):
  from hdb_jax.mini import dataset
  config = config_file.load(os.path.join(REPO, "configs", "mini.py"))
  made = committed_in(os.path.join(folder, "unet", "diffusion_flax_model.msgpack"))
  records = dataset.source(config.data.config, "train", config.data.data_dir or None)
  rows = records.__getitems__(range(len(records)))
  images = np.stack([r["image"] for r in rows]).astype(np.float32) / 127.5 - 1.0
  captions = [r["caption"] for r in rows]
  recorded, today = {}, {}
  for component in ("unet", "text_encoder"):
    with open(os.path.join(REPO, folder, component, "config.json")) as f:
      saved = json.load(f)
    wanted = config.model[component].to_dict()
    for key in wanted:
      if key in saved:
        recorded[f"model.{component}.{key}"] = _plain(saved[key])
        today[f"model.{component}.{key}"] = _plain(wanted[key])
  return {
      "artefact": folder, "written": WRITTEN, "committed_in": made,
      "command": ["python -m train.pretrain_base --config configs/mini.py "
                  "--workdir workdir/mini_base", "rm -r assets/mini_base && cp -r workdir/mini_base/base assets/mini_base"],
      "config_today": _portable(config.to_dict()),
      "recorded_settings_equal_today": check(recorded, today),
      "steps": {"vae": config.pretrain.vae.steps, "diffusion": config.pretrain.diffusion.steps,
                "source": "the commit message (10,000 UNet steps) and configs/mini.py; the "
                          "folder records no steps"},
      "data": provenance.data_record(
          f"synthetic_faces/{config.data.config}:train", arrays=[images], texts=captions,
          images=len(images), computed="today, with train/pretrain_base.load_dataset's "
          "reading", data_code_changed_since=data_code_changed_since(made["commit"])),
      "code": {"commit": None, "nearest_known": made["parent"]},
      "unknown": ["the run's code state (uncommitted changes, if any)",
                  "training settings beyond the components' config.json (learning rates, "
                  "batch sizes, caption variants: configs/mini.py today is assumed)",
                  "the training log (not committed)"]}


def recognizer_record(folder="assets/recognizer"):
  from hdb_jax.mini import recognizer
  config = config_file.load(os.path.join(REPO, "configs", "recognizer.py"))
  with open(os.path.join(REPO, folder, "recognizer.json")) as f:
    info = json.load(f)
  made = committed_in(os.path.join(folder, "recognizer.safetensors"))
  recorded = {f"train.{k}": v for k, v in info["train"].items() if k != "minutes"}
  recorded["model"] = info["model"]
  today = {f"train.{k}": v for k, v in config.train.to_dict().items()}
  today["model"] = {"widths": [list(w) for w in config.model.widths],
                    "hidden": config.model.hidden}
  holdout = recognizer.holdout_identities(config.eval.dataset_config)
  return {
      "artefact": folder, "written": WRITTEN, "committed_in": made,
      "command": ["python -m train.train_recognizer --config configs/recognizer.py "
                  "--workdir workdir/recognizer --config.out=assets/recognizer"],
      "config_today": _portable(config.to_dict()),
      "recorded_settings_equal_today": check(recorded, today),
      "steps": info["train"]["steps"],
      "data": provenance.data_record(
          "procedural renders (hdb_jax/mini/render.py) from config.train.seed, faces of "
          f"every identity but the {len(holdout)} of the holdout split of "
          f"synthetic_faces/{config.eval.dataset_config}, and non-faces",
          arrays=[np.asarray(holdout)], excluded_identities=len(holdout),
          data_code_changed_since=data_code_changed_since(made["commit"])),
      "code": {"commit": made["commit"], "note": "trained code and weights were committed "
               "together; whether the run used exactly this tree is not recorded"},
      "unknown": ["the run's exact code state", "the training log (not committed)"]}


def preopt_record(folder="assets/mini_preopt"):
  from hdb_jax import weights_dataset
  from train import preoptimize
  overrides = {"data.max_identities": 1200}
  config = config_file.load(os.path.join(REPO, "configs", "preopt_mini.py"), overrides)
  targets = weights_dataset.open_dataset(os.path.join(REPO, folder, "weights"))
  meta = targets.metadata
  made = committed_in(os.path.join(folder, "weights", "index.json"))
  recorded = {"data": json.loads(meta["data"]), "preopt.steps": int(meta["steps"]),
              "preopt.learning_rate": float(meta["learning_rate"]),
              "preopt.seed": int(meta["seed"]), "prompt": meta["prompt"]}
  if "optimization" in meta:
    recorded.update({f"preopt.{k}": v for k, v in json.loads(meta["optimization"]).items()})
  today = {"data": config.data.to_dict(),
           "prompt": config.prompt.format(token=config.token, class_name=config.class_name),
           **{f"preopt.{k}": v for k, v in config.preopt.to_dict().items()}}
  from hdb_jax import models
  sd, _ = models.load_or_build(config.model)
  identities, read_examples = preoptimize.open_identities(config.data, sd.image_size)
  if sorted(identities.tolist()) != sorted(np.asarray(targets.identities).tolist()):
    raise SystemExit(f"{folder}: its identities are not those configs/preopt_mini.py reads")
  return {
      "artefact": folder, "written": WRITTEN, "committed_in": made,
      "command": ["XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m "
                  "train.preoptimize --config configs/preopt_mini.py --workdir "
                  "workdir/preopt_mini --config.data.max_identities=1200"],
      "config_today": _portable(config.to_dict()),
      "recorded_settings_equal_today": check(recorded, today),
      "steps": int(meta["steps"]), "base_fingerprint": meta["base_fingerprint"],
      "data": provenance.data_record(
          preoptimize.data_source(config.data), identities,
          preoptimize.examples_read(read_examples, len(identities)),
          computed="today, with train/preoptimize's reading",
          data_code_changed_since=data_code_changed_since(made["commit"])),
      "code": {"commit": None, "nearest_known": made["parent"]},
      "unknown": ["the run's code state (uncommitted changes, if any)",
                  "settings the weights do not record (the mesh, blocks, checkpointing: "
                  "they do not change the weights)"]}


def hypernet_record(folder, variant, identities_note, command, weights_unknown,
                    first_committed_as=None, first_committed_by="HEAD"):
  from hdb_jax import hypernet
  from train import train_hypernet
  config = config_file.load(os.path.join(REPO, "configs", "hypernet_mini.py" +
                                         (f":{variant}" if variant else "")))
  with open(os.path.join(REPO, folder, "hypernet.json")) as f:
    info = json.load(f)
  # a network restored or moved: the commit that made it, under its old folder (up to
  # `first_committed_by` when another network took that folder later)
  made = committed_in(os.path.join(first_committed_as or folder, "hypernet.safetensors"),
                      first_committed_by)
  recorded = {"hypernet": info["hypernet"], "train.steps": info["steps"],
              "prompt": info["prompt"]}
  today = {"hypernet": config.hypernet.to_dict(), "train.steps": config.train.steps,
           "prompt": config.prompt.format(token=config.token, class_name=config.class_name)}
  from hdb_jax import data as data_lib
  from hdb_jax.mini import dataset
  records = dataset.source(config.data.config, config.data.split, config.data.data_dir or None)
  ids = [i for i, _, _ in data_lib.identity_ranges(records)][:identities_note["count"]]
  photos, _, _ = train_hypernet.data_parts(config.data, 32)
  read = photos(config.data.split, np.asarray(ids, np.int64))
  arrays = [read["images"], read.get("face_masks", np.zeros(0, np.uint8))]
  with open(os.path.join(REPO, folder, "train_log.jsonl")) as f:
    logged = [json.loads(line) for line in f if line.strip()]
  return {
      "artefact": folder, "written": WRITTEN, "committed_in": made,
      "fingerprint": hypernet.weights_fingerprint(os.path.join(REPO, folder)),
      "command": command,
      "config_today": _portable(config.to_dict()),
      "recorded_settings_equal_today": check(recorded, today),
      "steps": info["steps"], "last_logged_step": logged[-1]["step"] if logged else None,
      "base_fingerprint": info["base_fingerprint"],
      "data": provenance.data_record(
          train_hypernet.data_source(config.data), ids, arrays,
          computed="today: the reference photos (and face masks) the documented command "
                   "reads, with train/train_hypernet's reading",
          targets=identities_note["targets"],
          data_code_changed_since=data_code_changed_since(made["commit"])),
      "code": {"commit": None, "nearest_known": made["parent"]},
      "unknown": ["the run's code state (uncommitted changes, if any)",
                  "training settings hypernet.json does not record (learning rate, batch "
                  "size, loss weights, face mask): configs/hypernet_mini.py"
                  + (f":{variant}" if variant else "") + " today is assumed, as "
                  "docs/hypernet.md states", *weights_unknown]}


def _plain(value):
  return json.loads(json.dumps(value))


def _portable(value):
  if isinstance(value, dict):
    return {k: _portable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_portable(v) for v in value]
  if isinstance(value, str) and os.path.isabs(value):
    return files.portable_path(value, REPO)
  return value


def main():
  two_devices = "XLA_FLAGS=--xla_force_host_platform_device_count=2 "
  records = {  # folder -> the function making its record
      "assets/mini_base": base_record,
      "assets/recognizer": recognizer_record,
      "assets/mini_preopt": preopt_record,
      # the committed network until the 10,000-step one (which recorded its own run)
      # replaced it; the comparison table's network
      "assets/mini_hypernet_5k": lambda: hypernet_record(
          "assets/mini_hypernet_5k", "steps5k", {"count": 2400, "targets": (
              "workdir/preopt_all/weights: assets/mini_preopt's 1,200 identities extended "
              "to all 2,400 (not committed)")},
          [two_devices + "python -m train.preoptimize --config configs/preopt_mini.py "
           "--workdir workdir/preopt_all --config.preopt.extend=assets/mini_preopt/weights",
           two_devices + "python -m train.train_hypernet --config configs/hypernet_mini.py:steps5k "
           "--workdir workdir/hypernet --config.data.weights=workdir/preopt_all/weights"],
          ["the fingerprint of its 2,400-identity targets (that weights dataset is not "
           "committed)", "it was launched as configs/hypernet_mini.py when 5,000 steps were "
           "that config's default (what the steps5k variant sets)"],
          first_committed_as="assets/mini_hypernet", first_committed_by=HYPERNET_5K_COMMIT),
      "assets/mini_hypernet_aux": lambda: hypernet_record(
          "assets/mini_hypernet_aux", "learnable_aux", {"count": 1200, "targets": (
              "assets/mini_preopt/weights (identity list and LiDB spec only: beta = 0)")},
          [two_devices + "python -m train.train_hypernet --config "
           "configs/hypernet_mini.py:learnable_aux --workdir workdir/hypernet_aux"],
          ["which weights dataset the run read: the documented command reads "
           "assets/mini_preopt (1,200 identities); none is recorded"]),
      "assets/mini_hypernet_1200": lambda: hypernet_record(
          "assets/mini_hypernet_1200", "steps5k", {"count": 1200, "targets": (
              "assets/mini_preopt/weights (1,200 identities)")},
          [two_devices + "python -m train.train_hypernet --config configs/hypernet_mini.py:steps5k "
           "--workdir workdir/hypernet_1200"],
          ["committed as assets/mini_hypernet_masked (removed when the 2,400-identity "
           "network replaced it) and restored from that commit for the k = 1 ablation's "
           "pair", "it was launched as configs/hypernet_mini.py when 5,000 steps were that "
           "config's default (what the steps5k variant sets)"],
          first_committed_as="assets/mini_hypernet_masked"),
      "assets/mini_hypernet_k1": lambda: hypernet_record(
          "assets/mini_hypernet_k1", "k1", {"count": 1200, "targets": (
              "assets/mini_preopt/weights (1,200 identities)")},
          [two_devices + "python -m train.train_hypernet --config configs/hypernet_mini.py:k1 "
           "--workdir workdir/hypernet_k1"],
          ["the run was launched as configs/hypernet_mini.py with "
           "--config.hypernet.iterations=1 --config.train.eval_every=0 (what the k1 variant "
           "sets) from a checkout before trainers wrote provenance.json, and resumed twice "
           "(checkpoints at steps 2,807 and 3,446)"]),
  }
  only = sys.argv[1:]  # folders to write (default: all)
  for folder, make in records.items():
    if only and folder not in only:
      continue
    record = make()
    record = {"format": provenance.FORMAT, "version": "1", **record}
    provenance.write(os.path.join(REPO, folder), record)
    differ = [k for k, same in record["recorded_settings_equal_today"].items() if not same]
    print(f"{folder}: settings differing from today's config: {differ or 'none'}; "
          f"data code changed since: {record['data'].get('data_code_changed_since')}")


if __name__ == "__main__":
  main()

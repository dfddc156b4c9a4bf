r"""The comparison table: personalize held-out identities with every method, score samples.

    python -m train.evaluate --config configs/evaluate_mini.py --workdir workdir/evaluate

`configs/evaluate_mini.py` documents the methods and settings; `configs/evaluate_sd15.py`
runs SD1.5 on your photos, scored by Face Rec, CLIP-I, CLIP-T and DINO (`config.scoring`,
`train/evaluate_methods.py`: the methods and the scorers; `train/evaluate_report.py`: the
summary, tables and figures). In --workdir:
  results/<method>.jsonl   one line per identity: its seconds and every sample's scores
  summary.json             the table: mean and 95% bootstrap CI over identities per metric
  table.md                 the same for docs (columns by scoring: hdb_jax/evaluate.py SCORINGS)
  samples.png              per method (rows): a few identities' photo, then their samples
Rerunning resumes (per method and chunk of identities); SIGTERM or Ctrl-C stops after the
chunk in hand is saved; --methods runs a subset. Methods
share compiled programs where they can (the personalize ones through hdb personalize's
program store, the sampler for all).

Single host by design: every method runs on this process's devices, one identity chunk
after the other. A multi-process launch (jax.process_count() > 1, e.g. `--worker=all` on
a TPU pod slice) is refused before anything is read or written; run it on one host
(docs/pods.md).
"""

import os
import time

from absl import app, flags, logging
import jax
import numpy as np
from ml_collections import config_flags
from tqdm import tqdm

from hdb_jax import (checkpoint, diffusion, dreambooth, evaluate, files, hub, logs, models,
                     personalize)
from train import evaluate_methods, evaluate_report

FLAGS = flags.FLAGS
SHOWN_IDENTITIES, SHOWN_PROMPTS = 4, (0, 1, 7)  # figure: plain, a background, a style


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Evaluation config (configs/evaluate_*.py).")
  flags.DEFINE_string("workdir", None, "Output folder; rerunning resumes from it.")
  flags.DEFINE_list("methods", [], "Methods to run (default: all of config.methods).")
  flags.DEFINE_string("cache_dir", None, "Program cache of hdb personalize (default "
                      "$HDB_CACHE or ~/.cache/hdb-jax).")
  flags.DEFINE_bool("allow_download", False, "Fetch model folders given as Hugging Face "
                    "repo ids that are not in the local cache (default: the cache only).")
  flags.mark_flags_as_required(["config", "workdir"])


def refuse_multi_process() -> None:
  """Exit with a message when launched as one of several processes (see the docstring)."""
  if jax.process_count() > 1:
    raise SystemExit(
        f"train/evaluate.py runs on one host (every method on this process's devices), "
        f"but this is process {jax.process_index()} of {jax.process_count()} of a "
        f"multi-process launch: run it on one host, e.g. one GPU node or a single-host "
        f"TPU VM reading the trained hypernetwork from the shared path (docs/pods.md)")


def main(argv):
  del argv
  refuse_multi_process()  # before anything is read or written
  logs.quiet_libraries()
  config, workdir = FLAGS.config, FLAGS.workdir
  hub.resolve_config(config, FLAGS.allow_download)  # repo ids -> local cache folders
  results_dir = os.path.join(workdir, "results")
  os.makedirs(results_dir, exist_ok=True)
  os.makedirs(os.path.join(workdir, "shown"), exist_ok=True)
  cache = personalize.cache_dirs(FLAGS.cache_dir)
  sd, frozen = models.load_or_build(config.model)
  identities, photos = evaluate_methods.held_out(config, sd.image_size)
  words = dict(token=config.token, class_name=config.class_name)
  prompts = [p.format(**words) for p in config.prompts]
  class_prompt = config.class_prompt.format(**words)
  rows = (len(prompts) + 1) * config.seeds                     # samples per identity
  shown_prompts = [p for p in SHOWN_PROMPTS if p < len(prompts)]
  chunk = config.chunk
  cond_one = np.repeat(sd.tokenize(prompts + [class_prompt]), config.seeds, 0)  # [rows, L]
  uncond_one = np.repeat(sd.tokenize([""]), rows, 0)
  cond, uncond = np.tile(cond_one, (chunk, 1)), np.tile(uncond_one, (chunk, 1))
  generate_base = dreambooth.make_generate(sd, config.sample_steps)
  generate = dreambooth.make_generate_per_identity_lora(sd, config.sample_steps)
  # Every sample's starting noise follows (seed, identity position, row) alone: the same
  # for every method, however its samples are batched or resumed.
  seed_key = jax.random.key(config.seed)
  noise_of = jax.jit(lambda position: diffusion.noise_for(sd, jax.vmap(
      lambda row: jax.random.fold_in(jax.random.fold_in(seed_key, position), row))(
          np.arange(rows))))
  score = evaluate_methods.make_scorer(config, identities, photos, prompts, class_prompt)
  names = list(FLAGS.methods) or list(config.methods)
  unknown = [n for n in names if n not in config.methods]
  if unknown:
    raise app.UsageError(f"--methods: {unknown} not in config.methods "
                         f"({sorted(config.methods)})")

  stop = checkpoint.StopFlag()  # SIGTERM / Ctrl-C: the chunk in hand is finished and saved
  for name in names:
    method = config.methods[name]
    store = evaluate.ResultsFile(results_dir, name)
    todo = [k for k, i in enumerate(identities) if int(i) not in store.done()]
    if not todo:
      continue
    logging.info("%s: %d of %d identities to do", name, len(todo), len(identities))
    train = evaluate_methods.make_trainer(config, name, method, sd, frozen, generate_base,
                                          cache)
    for start in tqdm(range(0, len(todo), chunk), desc=name, unit="chunk"):
      picked = todo[start:start + chunk]
      seconds, trained = [], []
      for k in picked:
        began = time.perf_counter()
        if train is not None:
          kind, tree = train(photos[k].astype(np.float32) / 127.5 - 1.0)
          trained.append((kind, jax.tree_util.tree_map(np.asarray, tree)))
        seconds.append(time.perf_counter() - began if train is not None else None)
      noise = [noise_of(k) for k in picked]
      key = jax.random.key(config.seed)  # unused: the noise is given
      if train is None:
        padded = noise + [noise[0]] * (chunk - len(noise))
        images = generate_base(frozen, None, None, cond, uncond, key, config.guidance_scale,
                               np.concatenate(padded))
      elif trained[0][0] == "lora":  # all identities in one batch, through the side path
        loras = [tree for _, tree in trained]
        padded = loras + [loras[0]] * (chunk - len(loras))   # one compiled shape
        stacked = jax.tree_util.tree_map(lambda *x: np.stack(x), *padded)
        images = generate(frozen, stacked, cond, uncond, key, config.guidance_scale,
                          np.concatenate(noise + [noise[0]] * (chunk - len(noise))))
      else:  # whole components changed: one identity at a time
        images = np.concatenate([
            generate_base({**frozen, **tree}, None, None, cond_one, uncond_one, key,
                          config.guidance_scale, noise[j])
            for j, (_, tree) in enumerate(trained)])
      images = np.asarray(images)
      lines = []
      for j, k in enumerate(picked):
        own = images[j * rows:(j + 1) * rows]
        lines.append({"identity": int(identities[k]), "seconds": seconds[j],
                      "scores": score(k, own)})
        if k < SHOWN_IDENTITIES:
          files.save_grid(np.concatenate([photos[k:k + 1].astype(np.float32) / 127.5 - 1.0,
                                          own[[p * config.seeds for p in shown_prompts]]]),
                          os.path.join(workdir, "shown", f"{name}_{int(identities[k])}.png"),
                          rows=1, upscale=2)
      store.append(lines)
      if stop.requested:
        logging.warning("stopped after a chunk of %s (results saved): rerun the same "
                        "command to continue", name)
        return

  summary = evaluate_report.write_summary(config, workdir, prompts)
  with files.atomic_path(os.path.join(workdir, "table.md")) as tmp, open(tmp, "w") as f:
    f.write(evaluate_report.markdown_table(summary) + "\n")
  evaluate_report.write_figure(config, workdir, identities[:SHOWN_IDENTITIES],
                               [prompts[p] for p in shown_prompts])
  evaluate_report.write_plot(summary, os.path.join(workdir, "plot.png"))
  print(evaluate_report.json_table(summary))


if __name__ == "__main__":
  define_flags()
  app.run(main)

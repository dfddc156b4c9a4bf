"""`hdb`: command-line tools of hdb-jax.

    hdb info --config configs/sd15.py      sizes of the model and of its LiDB, as JSON
"""

from __future__ import annotations

import argparse
import json
import sys


def _parse_overrides(pairs: list[str]) -> dict:
  overrides = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep:
      raise SystemExit(f"hdb: override {pair!r} is not KEY=VALUE")
    try:
      overrides[key] = json.loads(value)
    except json.JSONDecodeError:
      overrides[key] = value
  return overrides


def info(args) -> dict:
  """Parameter counts of the base components and of the LiDB residual (jax.eval_shape)."""
  from hdb_jax import config_file, lidb, models
  from hdb_jax import params as params_lib
  config = config_file.load(args.config, _parse_overrides(args.set))
  _, abstract = models.from_config(config.model, tokenizer=None)
  spec = lidb.make_spec(abstract, seed=config.lidb.seed, a=config.lidb.a, b=config.lidb.b,
                        rank=config.lidb.rank, targets=dict(config.lidb.targets))
  return {
      "config": args.config,
      "lidb_layers": spec.num_layers,
      "lidb_layers_per_component": {c: len(v) for c, v in spec.layers.items()},
      "lidb_trainable_params": spec.num_trainable,
      "lidb_bytes_fp32": 4 * spec.num_trainable,
      "lidb": {"a": spec.a, "b": spec.b, "rank": spec.rank, "seed": spec.seed},
      "base_params": {c: params_lib.count(v) for c, v in abstract.items()},
      "base_params_total": params_lib.count(abstract),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="hdb", description="hdb-jax: HyperDreamBooth in JAX.")
  commands = parser.add_subparsers(dest="command", required=True)
  p = commands.add_parser("info", help="model and LiDB sizes as JSON (no weights allocated)",
                          description=info.__doc__)
  p.add_argument("--config", required=True, help="config file, e.g. configs/sd15.py")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, e.g. --set lidb.a=64 (repeatable)")
  args = parser.parse_args(argv)
  try:
    if args.command == "info":
      print(json.dumps(info(args), indent=2))
  except (FileNotFoundError, ValueError) as e:
    print(f"hdb {args.command}: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The mini world: a stand-in for SD1.5 and a face dataset on a 2-core CPU.

Procedurally rendered 32x32 faces whose identity is known exactly (`render`), their TFDS
dataset (`synthetic_faces`, `dataset`), varied pretraining captions with rare words
(`captions`), the offline tokenizer (`tokenizer`), a recognizer that reads identity and
context back from any image (`recognizer`), and the pretraining and quality evaluation of
the tiny SD-like base (`pretrain`, `base_eval`). docs/mini_world.md has the numbers.

The method modules of `hdb_jax` never import this package; entry points (`train/`,
`hdb_jax/cli.py`) pick its parts by config and pass them in.
"""

"""Offline CLIP-format tokenizers for small worlds (no model hub).

`build_clip_tokenizer(words, out_dir)` trains a byte-level BPE with HF `tokenizers` on a
word list until every word is a single token, then writes `vocab.json` + `merges.txt` in
the layout of OpenAI's CLIP tokenizer, so that the CLIP tokenizer SD1.5 uses
(`hdb_jax/nn/tokenizer.py`, and transformers' `CLIPTokenizer`) loads it: one loading
path for SD1.5 and the mini world.

Rare words in the list that never appear in captions make good `[V]` identifiers.
"""

from __future__ import annotations

import argparse
import json
import os

from hdb_jax import files

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SUFFIX = "</w>"


def _bytes_to_unicode() -> list[str]:
  """CLIP/GPT-2 byte alphabet: 256 printable characters standing for the 256 bytes."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = [], 0
  for byte in range(256):
    if byte in printable:
      chars.append(chr(byte))
    else:
      chars.append(chr(256 + extra))
      extra += 1
  return chars


def train_merges(words: list[str]) -> list[tuple[str, str]]:
  """BPE merges that turn each (lower-case ASCII) word into one token."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  for word in words:
    if not word.isascii() or not word.isalnum() or word != word.lower():
      raise ValueError(f"tokenizer words must be lower-case ASCII letters/digits: {word!r}")
  tokenizer = Tokenizer(models.BPE(end_of_word_suffix=SUFFIX))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  # A vocabulary larger than all possible merges: training stops when no pair is left,
  # i.e. when every word is a single token.
  max_vocab = 512 + sum(len(w) for w in words) + 16
  trainer = trainers.BpeTrainer(vocab_size=max_vocab, min_frequency=1, show_progress=False,
                                end_of_word_suffix=SUFFIX, special_tokens=[])
  tokenizer.train_from_iterator(sorted(set(words)), trainer=trainer)
  merges = json.loads(tokenizer.to_str())["model"]["merges"]
  return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def build_clip_tokenizer(words: list[str], out_dir: str, max_length: int = 77) -> str:
  """Write a CLIPTokenizer folder for `words`, atomically. Returns `out_dir`."""
  merges = train_merges(words)
  alphabet = _bytes_to_unicode()
  vocab_tokens = alphabet + [c + SUFFIX for c in alphabet]
  seen = set(vocab_tokens)
  for left, right in merges:
    if left + right not in seen:
      vocab_tokens.append(left + right)
      seen.add(left + right)
  vocab_tokens += [BOS, EOS]
  vocab = {token: i for i, token in enumerate(vocab_tokens)}
  config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
            "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
            "do_lower_case": True, "clean_up_tokenization_spaces": False}
  with files.atomic_dir(out_dir) as tmp:
    with open(os.path.join(tmp, "vocab.json"), "w") as f:
      json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(tmp, "merges.txt"), "w") as f:
      f.write("#version: 0.2\n" + "".join(f"{l} {r}\n" for l, r in merges))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    with open(os.path.join(tmp, "special_tokens_map.json"), "w") as f:
      json.dump({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f)
  return out_dir


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--words", required=True, help="text file: the words, whitespace separated")
  parser.add_argument("--out", required=True, help="output tokenizer folder")
  parser.add_argument("--max_length", type=int, default=77, help="tokens per prompt")
  args = parser.parse_args(argv)
  with open(args.words) as f:
    words = f.read().split()
  build_clip_tokenizer(words, args.out, args.max_length)
  print(f"wrote {args.out} ({len(set(words))} words)")


if __name__ == "__main__":
  main()

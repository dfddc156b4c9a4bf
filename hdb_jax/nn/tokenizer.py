"""CLIP's byte-level BPE tokenizer, read from and written to a CLIP tokenizer folder.

    tokenizer = CLIPTokenizer.from_folder("sd15/tokenizer")
    tokenizer(["a photo of a dog"], max_length=77)
        -> {"input_ids": int32 [B, 77], "attention_mask": int32 [B, 77]}

A folder holds `vocab.json` and `merges.txt` (OpenAI's CLIP layout: the 256 byte
characters, the same with the end-of-word suffix `</w>`, one token per merge, then
`<|startoftext|>` and `<|endoftext|>`), and optionally `tokenizer_config.json`
(model_max_length, special tokens) and `special_tokens_map.json`. The BPE itself is the
`tokenizers` library's; the pipeline around it is CLIP's, as transformers' CLIPTokenizer
builds it: NFC, runs of whitespace to one space, lower case; CLIP's split pattern
(contractions, letter runs, single digits, runs of other symbols); bytes to CLIP's byte
characters; BPE with `</w>` after each word. Special tokens in the text stay special.

Each prompt becomes `<|startoftext|> tokens <|endoftext|>`, its tokens cut so that this
fits `max_length`, then padded with the pad token (CLIP: `<|endoftext|>`; SD2's
tokenizer: `!`) to `max_length`. Ids equal transformers' `CLIPTokenizer(prompts,
padding="max_length", truncation=True, max_length=...)`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SUFFIX = "</w>"
DEFAULT_MAX_LENGTH = 77  # CLIP's context; used when tokenizer_config.json does not say
# CLIP's pre-tokenization: special tokens, contractions, letter runs, one digit, symbol runs.
SPLIT_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                 r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")
DEFAULT_TOKENS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}


class CLIPTokenizer:
  """Prompts -> padded, truncated CLIP token ids. See the module docstring."""

  def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *,
               model_max_length: int = DEFAULT_MAX_LENGTH,
               special_tokens: Mapping[str, str] | None = None,
               normalized_tokens: Iterable[str] = ()):
    """`special_tokens`: {role: token} for the ROLES (CLIP's by default), each in `vocab`;
    `normalized_tokens`: the special tokens also found in the lower-cased text (as the
    folder's `"normalized": true` says), the others only as written."""
    self.vocab = {str(token): int(i) for token, i in vocab.items()}
    self.merges = [tuple(merge) for merge in merges]
    self.special_tokens = dict(DEFAULT_TOKENS, **(special_tokens or {}))
    self.normalized_tokens = frozenset(normalized_tokens)
    self._model_max_length = int(model_max_length)
    for role, token in self.special_tokens.items():
      if token not in self.vocab:
        raise ValueError(f"CLIPTokenizer: {role} {token!r} is not in the vocabulary")
    self.bos_id = self.vocab[self.special_tokens["bos_token"]]
    self.eos_id = self.vocab[self.special_tokens["eos_token"]]
    self.pad_id = self.vocab[self.special_tokens["pad_token"]]
    self._backend = _backend(self.vocab, self.merges, self.special_tokens["unk_token"],
                             self.special_tokens.values(), self.normalized_tokens)

  @property
  def model_max_length(self) -> int:
    """Tokens per prompt (with BOS and EOS) unless told otherwise: 77 for SD and CLIP."""
    return self._model_max_length

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def encode(self, prompt: str) -> list[int]:
    """One prompt -> its ids with BOS and EOS, neither truncated nor padded."""
    return [self.bos_id, *self._backend.encode(prompt, add_special_tokens=False).ids,
            self.eos_id]

  def __call__(self, prompts: Sequence[str], max_length: int | None = None) -> dict:
    """Prompts -> {"input_ids", "attention_mask"}: int32 [B, max_length] each (default
    `model_max_length`); mask 1 on BOS, the tokens and EOS, 0 on the padding."""
    if isinstance(prompts, str):
      prompts = [prompts]
    length = self.model_max_length if max_length is None else int(max_length)
    if length < 2:
      raise ValueError(f"max_length={length}: needs room for BOS and EOS")
    input_ids = np.full((len(prompts), length), self.pad_id, np.int32)   # [B, L]
    attention_mask = np.zeros((len(prompts), length), np.int32)           # [B, L]
    for row, prompt in enumerate(prompts):
      # one at a time: encode_batch's thread pool would make a later fork warn
      tokens = self._backend.encode(prompt, add_special_tokens=False).ids
      ids = [self.bos_id, *tokens[:length - 2], self.eos_id]
      input_ids[row, :len(ids)] = ids
      attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}

  # ----------------------------------------------------------------------------------
  # Folders

  @classmethod
  def from_folder(cls, folder: str) -> CLIPTokenizer:
    """Read `vocab.json`, `merges.txt` and, when present, `tokenizer_config.json` and
    `special_tokens_map.json`, with transformers' precedence: the config's
    `added_tokens_decoder` (if any) says how special tokens are matched, else the special
    tokens map overrides the config's tokens."""
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
      vocab = json.load(f)
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
      merges = [tuple(line.split()) for line in f.read().splitlines()
                if line.strip() and not line.startswith("#version")]
    bad = [merge for merge in merges if len(merge) != 2]
    if bad:
      raise ValueError(f"{folder}/merges.txt: lines that are not two tokens, e.g. {bad[0]}")
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    token_map = _read_json(os.path.join(folder, "special_tokens_map.json"))
    for key in ("padding_side", "truncation_side"):
      if config.get(key, "right") != "right":
        raise ValueError(f"{folder}/tokenizer_config.json: {key}={config[key]!r} is not "
                         "supported (right only)")

    entries = {role: config[role] for role in ROLES if config.get(role) is not None}
    normalized = {}  # special token -> matched in the normalized (lower-cased) text
    added = config.get("added_tokens_decoder")
    if added:
      for index, entry in added.items():
        content = entry["content"]
        if vocab.get(content) != int(index):
          raise ValueError(f"{folder}/tokenizer_config.json: added token {content!r} "
                           f"(id {index}) is not in vocab.json with that id: not supported")
        normalized[content] = bool(entry.get("normalized", False))
    else:
      entries.update({role: token_map[role] for role in ROLES if token_map.get(role) is not None})
    special_tokens = {}
    for role, entry in entries.items():
      content = entry["content"] if isinstance(entry, Mapping) else str(entry)
      special_tokens[role] = content
      if isinstance(entry, Mapping):
        normalized.setdefault(content, bool(entry.get("normalized", False)))
    return cls(vocab, merges,
               model_max_length=int(config.get("model_max_length", DEFAULT_MAX_LENGTH)),
               special_tokens=special_tokens,
               normalized_tokens=[token for token, flag in normalized.items() if flag])

  def save(self, folder: str) -> None:
    """Write `vocab.json`, `merges.txt`, `tokenizer_config.json` and
    `special_tokens_map.json` (the folder is created), as transformers'
    CLIPTokenizer.from_pretrained and `from_folder` read them."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
      json.dump(self.vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
      f.write("#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in self.merges))
    added = {str(self.vocab[token]): _added_token(token, token in self.normalized_tokens)
             for token in sorted(set(self.special_tokens.values()), key=self.vocab.get)}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length,
              **self.special_tokens, "added_tokens_decoder": added, "do_lower_case": True,
              "clean_up_tokenization_spaces": False, "errors": "replace"}
    _write_json(os.path.join(folder, "tokenizer_config.json"), config)
    token_map = {}
    for role, token in self.special_tokens.items():
      token_map[role] = _added_token(token, token in self.normalized_tokens)
      del token_map[role]["special"]
    _write_json(os.path.join(folder, "special_tokens_map.json"), token_map)


def _backend(vocab: dict[str, int], merges: list[tuple[str, str]], unk_token: str,
             special_tokens: Iterable[str], normalized_tokens: frozenset[str]) -> Tokenizer:
  """The `tokenizers` pipeline of CLIP (as transformers' CLIPTokenizer builds it)."""
  try:
    bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                     end_of_word_suffix=SUFFIX, fuse_unk=False, unk_token=unk_token)
  except Exception as e:  # the library raises a plain Exception
    raise ValueError(f"CLIPTokenizer: the merges do not fit the vocabulary ({e})") from e
  backend = Tokenizer(bpe)
  backend.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  backend.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  backend.add_special_tokens([
      AddedToken(token, special=True, normalized=token in normalized_tokens)
      for token in sorted(set(special_tokens), key=vocab.get)])
  return backend


def _added_token(content: str, normalized: bool) -> dict[str, Any]:
  return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
          "single_word": False, "special": True}


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_json(path: str, value) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True, ensure_ascii=False)
    f.write("\n")

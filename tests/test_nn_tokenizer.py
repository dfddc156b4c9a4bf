"""hdb_jax/nn/tokenizer.py against transformers' CLIPTokenizer: the same ids and
attention masks (padding="max_length", truncation=True) on a corpus of prompts, for the
mini world's tokenizer folders and a bigger byte-level BPE trained here (no real CLIP
vocabulary offline), also with SD2's pad token "!"; folders written by `save` load in
transformers with the same ids."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer as ReferenceTokenizer

from hdb_jax.nn.tokenizer import CLIPTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(REPO, "assets")
with open(os.path.join(ASSETS, "mini_words.txt")) as f:
  MINI_WORDS = f.read().split()

PROMPTS = [
    "a photo of sks person", "A Photo Of A MAN, Smiling", "", " ", "\t\n",
    "hello,world! it's 3:45pm.", "don't stop, it's fine; they're here & we've 2 dogs",
    "DON'T IT'S WE'RE I'M YOU'LL HE'D", "o'clock 'quoted' rock'n'roll",
    "café naïve résumé Über Straße ÉCOLE", "e\u0301 combining accent (NFC)",
    "東京 日本語の文章 你好世界", "Привет мир ελληνικά", "emoji 🙂🐶 👍🏽 👨\u200d👩\u200d👧 ❤️",
    "multiple   spaces\tand\ttabs\nand\nnewlines\r\n end", "   leading and trailing   ",
    "numbers 1234567890 and 3.14159 and 1,000,000", "punctuation!!! ??? ... --- ''' \"\" ``",
    "x!y!!z", "a <|endoftext|> b", "a<|startoftext|>b", "a <|ENDOFTEXT|> b",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ", "\u00a0nbsp\u2003emspace", "zero\u200bwidth", "control\x07char",
    " ".join(["a very long prompt with many words"] * 20),
    "sks zwx qlv vrt in the style of watercolor, bright red background",
    "SKS Zwx QLV", "sksdog zwxcat qlvvrt",  # rare words glued: split into pieces
]
SYLLABLES = "ka to ri mu sen dor lin qua ble ght str ing tion pre ex é ü ñ ß 東 京 語 я ты ω".split()
TRAINING_WORDS = MINI_WORDS + ("café naïve über 東京 日本語 你好 привет мир 🙂 🐶 👍🏽 don't it's "
                               "we're 1990s 42 3.14 #tag @user e-mail ... !? (x) \"q\"").split()


def _pseudo_words(rng, count: int) -> list[str]:
  return ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 5))) for _ in range(count)]


def _corpus() -> list[str]:
  rng = np.random.default_rng(2)
  sentences = [" ".join(rng.choice(MINI_WORDS, size=rng.integers(2, 9))) for _ in range(20)]
  return PROMPTS + MINI_WORDS + sentences + _pseudo_words(rng, 40)


def _bytes_to_unicode() -> list[str]:
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  extra = iter(range(256, 512))
  return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _train_clip_vocabulary(folder: str, special_tokens_map: dict | None = None) -> int:
  """A CLIP-format vocab.json + merges.txt from a byte-level BPE trained with the
  `tokenizers` trainer on generated text (CLIP's normalization and split). -> merges."""
  rng = np.random.default_rng(0)
  words = TRAINING_WORDS + _pseudo_words(rng, 600)
  text = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(3000)]
  bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
  bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
  bpe.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
                           behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  bpe.train_from_iterator(text, trainers.BpeTrainer(
      vocab_size=2500, min_frequency=2, show_progress=False, end_of_word_suffix="</w>",
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
            for m in json.loads(bpe.to_str())["model"]["merges"]]
  alphabet = _bytes_to_unicode()
  tokens = alphabet + [c + "</w>" for c in alphabet]
  tokens += list(dict.fromkeys(l + r for l, r in merges if l + r not in set(tokens)))
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(folder)
  with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump({token: i for i, token in enumerate(tokens)}, f, ensure_ascii=False)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{l} {r}\n" for l, r in merges))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
               "pad_token": "<|endoftext|>"}, f)
  if special_tokens_map:
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
      json.dump(special_tokens_map, f)
  return len(merges)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
  root = tmp_path_factory.mktemp("tokenizers")
  trained = str(root / "bpe")
  assert _train_clip_vocabulary(trained) > 500
  sd2 = str(root / "bpe_sd2")  # SD2's tokenizer: pad "!", an AddedToken dict for BOS
  _train_clip_vocabulary(sd2, {"pad_token": "!", "bos_token": {
      "content": "<|startoftext|>", "normalized": True, "lstrip": False, "rstrip": False}})
  return {"mini_base": os.path.join(ASSETS, "mini_base", "tokenizer"),
          "mini_tokenizer": os.path.join(ASSETS, "mini_tokenizer"),
          "bpe": trained, "bpe_sd2": sd2}


def _assert_same(ours: CLIPTokenizer, reference, prompts: list[str], max_length: int):
  expected = reference(prompts, padding="max_length", truncation=True, max_length=max_length,
                       return_tensors="np")
  got = ours(prompts, max_length=max_length)
  assert got["input_ids"].dtype == np.int32 and got["attention_mask"].dtype == np.int32
  assert got["input_ids"].shape == (len(prompts), max_length)
  for i, prompt in enumerate(prompts):
    assert got["input_ids"][i].tolist() == expected.input_ids[i].tolist(), prompt
    assert got["attention_mask"][i].tolist() == expected.attention_mask[i].tolist(), prompt


@pytest.mark.parametrize("name", ["mini_base", "mini_tokenizer", "bpe", "bpe_sd2"])
def test_ids_equal_transformers(folders, name):
  ours = CLIPTokenizer.from_folder(folders[name])
  reference = ReferenceTokenizer.from_pretrained(folders[name])
  assert ours.model_max_length == reference.model_max_length
  assert ours.pad_id == reference.pad_token_id
  corpus = _corpus()
  for max_length in (ours.model_max_length, 8):  # 8: most prompts truncated
    _assert_same(ours, reference, corpus, max_length)
  for prompt in corpus:  # untruncated, unpadded
    assert ours.encode(prompt) == reference(prompt).input_ids, prompt


def test_the_corpus_exercises_merges_and_special_tokens(folders):
  ours = CLIPTokenizer.from_folder(folders["bpe"])
  lengths = [len(ours.encode(word)) - 2 for word in _corpus()[-40:]]  # pseudo-words
  assert min(lengths) == 1 and max(lengths) >= 3  # whole-word tokens and split words
  assert ours.encode("!!")[1:-1] != ours.encode("! !")[1:-1]  # "!!" is one BPE token
  sd2 = CLIPTokenizer.from_folder(folders["bpe_sd2"])
  assert sd2.pad_id == sd2.vocab["!"] and sd2.encode("x!!")[2:-1] == [sd2.pad_id] * 2
  mini = CLIPTokenizer.from_folder(folders["mini_tokenizer"])
  for word in MINI_WORDS:  # every word of the mini world is one token
    assert len(mini.encode(word)) == 3, word


@pytest.mark.parametrize("name", ["mini_base", "bpe_sd2"])
def test_saved_folders_load_in_transformers(folders, name, tmp_path):
  ours = CLIPTokenizer.from_folder(folders[name])
  ours.save(str(tmp_path / "saved"))
  reference = ReferenceTokenizer.from_pretrained(str(tmp_path / "saved"))
  assert reference.model_max_length == ours.model_max_length
  _assert_same(ours, reference, _corpus(), ours.model_max_length)
  again = CLIPTokenizer.from_folder(str(tmp_path / "saved"))
  assert again.vocab == ours.vocab and again.merges == ours.merges
  assert again.special_tokens == ours.special_tokens
  assert again.normalized_tokens == ours.normalized_tokens


def test_a_folder_without_configs(folders, tmp_path):
  for name in ("vocab.json", "merges.txt"):
    with open(os.path.join(folders["bpe"], name), encoding="utf-8") as f:
      (tmp_path / name).write_text(f.read(), encoding="utf-8")
  ours = CLIPTokenizer.from_folder(str(tmp_path))
  assert ours.model_max_length == 77  # CLIP's context
  _assert_same(ours, ReferenceTokenizer.from_pretrained(str(tmp_path)), _corpus(), 20)


def test_unsupported_folders_raise(folders, tmp_path):
  with open(os.path.join(folders["mini_tokenizer"], "vocab.json")) as f:
    vocab = json.load(f)
  merges = [("a", "b")]
  with pytest.raises(ValueError, match="out of vocabulary"):  # "ab" is not a token
    CLIPTokenizer(vocab, merges)
  merges = []
  with pytest.raises(ValueError, match="pad_token"):
    CLIPTokenizer(vocab, merges, special_tokens={"pad_token": "<pad>"})
  for name in ("vocab.json", "merges.txt"):
    with open(os.path.join(folders["mini_tokenizer"], name)) as f:
      (tmp_path / name).write_text(f.read())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"padding_side": "left"}))
  with pytest.raises(ValueError, match="padding_side"):
    CLIPTokenizer.from_folder(str(tmp_path))
  with pytest.raises(ValueError, match="max_length"):
    CLIPTokenizer(vocab, merges)(["a"], max_length=1)

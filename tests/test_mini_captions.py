"""Pretraining captions of the mini world (hdb_jax/mini/captions.py): same content as the
dataset caption, context words at many positions, rare words at the stated rate before
"face" only, control words never, every caption within the text encoder's positions."""

import collections
import os

import numpy as np
import pytest
from hdb_jax.nn.tokenizer import CLIPTokenizer

from hdb_jax.mini import captions, render

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def variants():
  """20 variants of every caption form of the dataset (2,000 samples per form)."""
  dataset_captions = [render.caption(b, s, nb, ns) for b in range(5) for s in range(4)
                      for nb in (False, True) for ns in (False, True)] * 100
  return dataset_captions, captions.caption_variants(dataset_captions, 20, seed=0)


def test_variants_keep_the_content(variants):
  dataset_captions, rows = variants
  for text, row in zip(dataset_captions, rows):
    for variant in row:
      assert render.parse_caption(variant) == render.parse_caption(text), (text, variant)
      assert variant.replace(",", " ,").split().count("face") == 1


def test_rare_words_rate_place_and_controls(variants):
  _, rows = variants
  flat = [v for row in rows for v in row]
  inserted = collections.Counter()
  with_rare = 0
  for text in flat:
    words = text.replace(",", " ,").split()
    rare = [w for w in words if w in captions.RARE_WORDS]
    assert len(rare) <= 1
    if rare:
      with_rare += 1
      inserted[rare[0]] += 1
      assert words[words.index(rare[0]) + 1] == "face"  # right before the class word
  rate = with_rare / len(flat)
  assert abs(rate - captions.RARE_WORD_RATE) < 0.01, rate
  assert not set(inserted) & set(captions.CONTROL_WORDS)
  assert set(inserted) == set(captions.INSERTED_WORDS)  # every pool word gets used
  assert captions.RARE_WORDS[0] == "sks" and "sks" in captions.INSERTED_WORDS


def test_context_words_move(variants):
  """The background colour appears at several word positions (not one fixed slot)."""
  _, rows = variants
  positions = collections.Counter()
  for text in (v for row in rows for v in row):
    words = text.replace(",", " ,").split()
    for i, word in enumerate(words):
      if word in render.BACKGROUNDS:
        positions[i] += 1
  assert len([p for p, n in positions.items() if n >= 100]) >= 5, positions


def test_every_caption_fits_the_text_encoder(variants):
  tokenizer = CLIPTokenizer.from_folder(os.path.join(REPO, "assets", "mini_tokenizer"))
  _, rows = variants
  distinct = sorted({v for row in rows for v in row})
  lengths = [len(tokenizer.encode(text)) for text in distinct]  # with BOS and EOS
  assert max(lengths) <= tokenizer.model_max_length
  for word in captions.RARE_WORDS:  # each rare word is one token
    assert len(tokenizer.encode(word)) == 3, word


def test_variants_are_deterministic():
  first = captions.caption_variants(["a sketch of a face on a blue background"], 8, seed=3)
  assert first == captions.caption_variants(["a sketch of a face on a blue background"], 8,
                                            seed=3)
  assert first != captions.caption_variants(["a sketch of a face on a blue background"], 8,
                                             seed=4)
  assert np.unique(first[0]).size > 1

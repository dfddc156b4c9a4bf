"""Varied captions for pretraining the mini-world base: read by content, not position.

The dataset stores one caption per image in a single rigid grammar
(`render.caption`: "a sketch of a face on a blue background"). A text encoder trained
on that grammar alone reads the context words by their *position*: on the first mini
base, one extra token before "face" (the identifier in "a sketch of a sks face on a blue
background", or just a second "a") moved "blue" to a position it was never seen at, and
background accuracy fell from 0.94 to 0.12-0.16; with the identifier but "blue" back at
its usual position ("... sks face on blue background") it was 0.91 again.

SD1.5's identifier is a rare word that *was* seen in web captions, with no consistent
meaning. `sample_caption` gives the mini world the same: for each image and epoch it
draws a caption of the same content (background, style) in one of several grammars
(context words at many positions, optional fillers, prefix and suffix orders), and in
`RARE_WORD_RATE` of captions puts a rare word from `INSERTED_WORDS` before "face",
drawn independently of identity and context. `CONTROL_WORDS` belong to the same pool
and the tokenizer but are never inserted: the base's behaviour with an identifier it
never saw in pretraining, for comparison.
"""

from __future__ import annotations

import numpy as np

from hdb_jax.mini import render

# The pool of rare words: 4 reserved identifiers (sks first: the default [V]) and 60
# more three-letter non-words, each one token of the mini tokenizer.
RARE_WORDS = (
    "sks", "zwx", "qlv", "vrt",
    "bqx", "cvz", "dzk", "fjq", "gqv", "hxz", "jkw", "kzt", "lqz", "mxv",
    "nqj", "pzv", "qdk", "rzx", "tqg", "vzb", "wqf", "xjd", "ykz", "zqm",
    "bvk", "cqx", "dxw", "fzn", "gvj", "hqz", "jzr", "kqv", "lxb", "mzq",
    "nxk", "pqj", "qzs", "rvq", "sxz", "tzv", "vqn", "wzk", "xqb", "yzv",
    "zkd", "bjz", "cxq", "djv", "fqk", "gzx", "hvq", "jxp", "kvz", "lzj",
    "mqk", "nvz", "pxr", "qvt", "rqz", "szk", "txq", "vxj", "wvq", "xzn",
)
NUM_CONTROL_WORDS = 8
INSERTED_WORDS = RARE_WORDS[:-NUM_CONTROL_WORDS]  # seen in pretraining captions
CONTROL_WORDS = RARE_WORDS[-NUM_CONTROL_WORDS:]   # never seen: a control
RARE_WORD_RATE = 0.2

# Grammars and their probabilities. The first of each is the dataset's own form.
_STYLE_FORMS = (("{style_det} {style} of {face}", 0.6), ("{face} in {style} style", 0.2),
                ("{face}, {style}", 0.2))
_BACKGROUND_FORMS = (("{main} on a {colour} background", 0.5),
                     ("{main} with a {colour} background", 0.2),
                     ("{main}, {colour} background", 0.15),
                     ("a {colour} background, {main}", 0.15))


def _choose(rng: np.random.Generator, forms) -> str:
  texts, weights = zip(*forms)
  return texts[rng.choice(len(texts), p=np.asarray(weights) / sum(weights))]


def sample_caption(rng: np.random.Generator, background: int, style: int,
                   name_background: bool, name_style: bool,
                   rare_word_rate: float = RARE_WORD_RATE) -> str:
  """One caption naming the same context as `render.caption(background, style,
  name_background, name_style)`, in a randomly drawn grammar; `rng` decides everything.

  `render.parse_caption` reads every caption back to the same (background, style)."""
  face = render.CLASS_WORD
  if rng.uniform() < rare_word_rate:
    face = f"{INSERTED_WORDS[rng.integers(len(INSERTED_WORDS))]} {face}"
  face = f"{'the' if rng.uniform() < 0.2 else 'a'} {face}"
  main = face
  if name_style or style != 0:
    main = _choose(rng, _STYLE_FORMS).format(
        style_det="a" if rng.uniform() < 0.8 else "the", style=render.STYLES[style], face=face)
  if name_background:
    main = _choose(rng, _BACKGROUND_FORMS).format(main=main,
                                                  colour=render.BACKGROUNDS[background])
  return main


def caption_variants(captions: list[str], variants: int, seed: int) -> list[list[str]]:
  """`variants` captions per dataset caption, of the same content: [N][variants].

  Deterministic in (seed, record index, variant); the context is read back from the
  dataset caption (`render.parse_caption`; a style word means the style was named)."""
  out = []
  for index, text in enumerate(captions):
    background, style = render.parse_caption(text)
    name_style = any(word in render.STYLES for word in text.split())
    rows = []
    for variant in range(variants):
      rng = np.random.default_rng([seed, index, variant, 0xCA])
      rows.append(sample_caption(rng, max(background, 0), style, background >= 0, name_style))
    out.append(rows)
  return out

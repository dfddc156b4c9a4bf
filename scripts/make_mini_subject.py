"""Render the mini world's example subject (assets/mini_subject/): a holdout identity.

Three photos of one identity that the base model never saw in pretraining (the first
identity of the `default` config's holdout split with glasses, a beard and hair that is
not black: easy to tell apart in samples), on different backgrounds: the subject
of the README's first command. Its attributes are written to attributes.json, so that
personalization can be scored with the recognizer.

    python scripts/make_mini_subject.py
"""

import json
import os

import numpy as np
from PIL import Image

from hdb_jax.mini import render, synthetic_faces

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "assets", "mini_subject")


def main():
  config = next(c for c in synthetic_faces.CONFIGS if c.name == "default")
  names = render.ATTRIBUTE_NAMES
  identity = next(int(code) for code in synthetic_faces.split_codes(config)["holdout"]
                  if (lambda a: a[names.index("glasses")] == 1 and a[names.index("beard")] == 1
                      and a[names.index("hair_colour")] != 0)(render.identity_attributes(code)))
  attributes = render.identity_attributes([identity])  # [1, A]
  views = render.sample_views([render.view_seed(12345, identity, i) for i in range(3)])
  views["style"][:] = 0                                 # photos
  views["background"][:] = [0, 1, 4]                    # blue, green, gray
  images = render.render(np.repeat(attributes, 3, 0), views)
  os.makedirs(OUT, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image).save(os.path.join(OUT, f"photo_{i}.png"))
  names = {name: values[a] for (name, values), a in zip(render.ATTRIBUTES, attributes[0])}
  with open(os.path.join(OUT, "attributes.json"), "w") as f:
    json.dump({"identity": identity, "attributes": attributes[0].tolist(), "names": names}, f,
              indent=2)
  print(f"wrote {len(images)} photos of holdout identity {identity} ({names}) to {OUT}")


if __name__ == "__main__":
  main()

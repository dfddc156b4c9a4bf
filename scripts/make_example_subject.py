"""Draw the example subject of the README's first command (assets/example_subject/).

A cartoon face with a distinctive look (red hair, green eyes, round glasses) in three
poses, so that the default run has a real subject without any download.

    python scripts/make_example_subject.py
"""

import os

from PIL import Image, ImageDraw

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "assets", "example_subject")


def draw_face(shift: tuple[int, int], background: tuple[int, int, int]) -> Image.Image:
  size = 64
  im = Image.new("RGB", (size, size), background)
  d = ImageDraw.Draw(im)
  dx, dy = shift
  box = lambda x0, y0, x1, y1: (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
  d.ellipse(box(12, 6, 52, 30), fill=(200, 40, 30))            # hair
  d.ellipse(box(16, 12, 48, 54), fill=(235, 190, 150))         # face
  for x in (22, 36):
    d.ellipse(box(x, 26, x + 6, 32), fill=(30, 160, 60))       # green eyes
    d.ellipse(box(x - 2, 24, x + 8, 34), outline=(20, 20, 20))  # glasses
  d.line(box(30, 29, 34, 29), fill=(20, 20, 20))
  d.arc(box(24, 36, 40, 48), 20, 160, fill=(150, 40, 60), width=2)  # smile
  return im


def main():
  os.makedirs(OUT, exist_ok=True)
  poses = [((0, 0), (230, 230, 230)), ((-3, 2), (200, 215, 240)), ((3, -1), (235, 225, 200))]
  for i, (shift, background) in enumerate(poses):
    draw_face(shift, background).save(os.path.join(OUT, f"subject_{i}.png"))
  print(f"wrote {len(poses)} images to {OUT}")


if __name__ == "__main__":
  main()

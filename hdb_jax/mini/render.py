"""Procedural faces for the mini world: identities, views, captions, a NumPy renderer.

An identity is a tuple of attribute values (`ATTRIBUTES`: face shape, skin tone, eye
colour, hair colour, hair style, mouth, glasses, beard), coded as one mixed-radix int
(`identity_code`). A view is one picture of an identity: nuisance (shift, scale,
rotation, lighting) and context (background colour, rendering style). Captions name the
context only, never an identity attribute.

Every feature is large and of contrasting colour so that it stays visible at 32x32 in
every style; the recognizer (hdb_jax/mini/recognizer.py) is trained on this ground truth.
Rendering is vectorized over a batch at 2x resolution and box-downsampled (anti-aliasing);
per-image randomness comes from per-image seeds, so a picture does not depend on the
batch it was rendered in.
"""

from __future__ import annotations

import numpy as np

ATTRIBUTES = (
    ("face_shape", ("round", "long", "square")),
    ("skin_tone", ("pale", "tan", "brown", "dark")),
    ("eye_colour", ("blue", "green", "brown")),
    ("hair_colour", ("black", "blonde", "red", "white")),
    ("hair_style", ("short", "long", "mohawk", "afro")),
    ("mouth", ("smile", "open", "flat")),
    ("glasses", ("none", "glasses")),
    ("beard", ("none", "beard")),
)
ATTRIBUTE_NAMES = tuple(name for name, _ in ATTRIBUTES)
NUM_CLASSES = tuple(len(values) for _, values in ATTRIBUTES)  # per attribute
NUM_ATTRIBUTES = len(ATTRIBUTES)
NUM_IDENTITIES = int(np.prod(NUM_CLASSES))  # 6912 distinct attribute tuples

BACKGROUNDS = ("blue", "green", "purple", "pink", "gray")  # caption words
STYLES = ("photo", "sketch", "painting", "cartoon")  # caption words; 0 = plain photo
CLASS_WORD = "face"

# RGB in [0, 1]. Chosen pairwise distinct where they touch (hair vs background, skin vs
# hair, iris vs sclera) so that every attribute survives styles and colour jitter.
_SKIN = np.array([[245, 215, 195], [215, 160, 115], [160, 105, 65], [95, 62, 42]]) / 255.
_EYES = np.array([[40, 100, 240], [30, 175, 50], [125, 65, 20]]) / 255.
_HAIR = np.array([[28, 24, 24], [240, 205, 55], [190, 55, 25], [238, 238, 238]]) / 255.
_BACKGROUND = np.array([[60, 90, 215], [70, 165, 80], [135, 65, 180], [240, 130, 185],
                        [128, 128, 128]]) / 255.
_SCLERA = np.array([246, 246, 246]) / 255.
_LIPS = np.array([[225, 35, 60], [45, 8, 18], [225, 35, 60]]) / 255.  # per mouth value
_FRAME = np.array([18, 18, 18]) / 255.
_LINE = np.array([20, 20, 20]) / 255.

# Layer labels (drawing order), used for outlines.
BG, HAIR_BACK, SKIN, BEARD, MOUTH, HAIR_FRONT, SCLERA, IRIS, FRAME = range(9)


def identity_code(attributes) -> np.ndarray:
  """Attributes int [..., A] -> identity int64 [...] (mixed radix, unique per tuple)."""
  attributes = np.asarray(attributes, np.int64)
  code = np.zeros(attributes.shape[:-1], np.int64)
  for i, n in enumerate(NUM_CLASSES):
    code = code * n + attributes[..., i]
  return code


def identity_attributes(code) -> np.ndarray:
  """Identity int [...] -> attributes int32 [..., A] (inverse of `identity_code`)."""
  code = np.asarray(code, np.int64)
  values = []
  for n in reversed(NUM_CLASSES):
    values.append(code % n)
    code = code // n
  return np.stack(values[::-1], axis=-1).astype(np.int32)


def split_identities(seed: int, num_train: int, num_holdout: int):
  """Disjoint identity sets (sorted int64 arrays): a seeded permutation of all tuples."""
  if num_train + num_holdout > NUM_IDENTITIES:
    raise ValueError(f"{num_train} + {num_holdout} identities asked, {NUM_IDENTITIES} exist")
  order = np.random.default_rng([seed, 0x1D]).permutation(NUM_IDENTITIES)
  return np.sort(order[:num_train]), np.sort(order[num_train:num_train + num_holdout])


def caption(background: int, style: int, name_background: bool, name_style: bool) -> str:
  """'a face', 'a sketch of a face on a blue background', ... Non-photo styles are
  always named, so a caption without a style word means a photo."""
  text = f"a {CLASS_WORD}"
  if name_style or style != 0:
    text = f"a {STYLES[style]} of {text}"
  if name_background:
    text += f" on a {BACKGROUNDS[background]} background"
  return text


def identifier_prompts(token: str, class_name: str) -> list[str]:
  """The evaluation prompts with the identifier: plain, every background, every style,
  two style + background pairs (12)."""
  subject = f"{token} {class_name}"
  return ([f"a {subject}"]
          + [f"a {subject} on a {colour} background" for colour in BACKGROUNDS]
          + [f"a {style} of a {subject}" for style in STYLES]
          + [f"a sketch of a {subject} on a blue background",
             f"a cartoon of a {subject} on a pink background"])


def parse_caption(text: str) -> tuple[int, int]:
  """Caption/prompt -> (background, style); -1 where the text leaves it open.

  A text without a style word asks for a photo (style 0), like the captions."""
  words = text.lower().replace(",", " ").split()
  background = next((BACKGROUNDS.index(w) for w in words if w in BACKGROUNDS), -1)
  style = next((STYLES.index(w) for w in words if w in STYLES), 0)
  return background, style


def view_seed(seed: int, identity: int, index: int) -> int:
  """Seed of image `index` of `identity` in a dataset built with `seed`."""
  return int(np.random.SeedSequence([seed, identity, index]).generate_state(1)[0])


def sample_views(seeds) -> dict:
  """Per-image view parameters, one image per seed (int sequence [N]).

  Returns dict of arrays [N]: shift_x, shift_y (image units, 1 = half the image),
  scale, angle (radians), light (brightness gain), light_angle, light_strength,
  background, style (int32), name_background, name_style (bool), seed (uint32).
  """
  rows = []
  for seed in seeds:
    rng = np.random.default_rng([0x7E, int(seed)])
    rows.append((rng.uniform(-0.1, 0.1), rng.uniform(-0.08, 0.08), rng.uniform(0.92, 1.08),
                 rng.uniform(-0.17, 0.17), rng.uniform(0.85, 1.15), rng.uniform(0, 2 * np.pi),
                 rng.uniform(0.0, 0.3), rng.integers(len(BACKGROUNDS)), rng.integers(len(STYLES)),
                 rng.uniform() < 0.75, rng.uniform() < 0.5, rng.integers(2**32)))
  columns = list(zip(*rows)) if rows else [()] * 12
  names = ("shift_x", "shift_y", "scale", "angle", "light", "light_angle", "light_strength",
           "background", "style", "name_background", "name_style", "seed")
  dtypes = (np.float32,) * 7 + (np.int32, np.int32, bool, bool, np.uint32)
  return {k: np.array(c, dt) for k, c, dt in zip(names, columns, dtypes)}


def _ellipse(x, y, cx, cy, rx, ry):
  return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def _box_down(images, factor):
  n, h, w, c = images.shape
  return images.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def _edges(labels, width):
  """Pixels where the label changes within `width` pixels: bool [N, H, W]. The iris has
  no outline of its own (at 32x32 an outline would cover it)."""
  labels = np.where(labels == IRIS, np.int8(SCLERA), labels)
  edge = np.zeros(labels.shape, bool)
  edge[:, 1:, :] |= labels[:, 1:, :] != labels[:, :-1, :]
  edge[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
  grown = edge.copy()
  for _ in range(width - 1):
    grown[:, 1:, :] |= edge[:, :-1, :]
    grown[:, :, 1:] |= edge[:, :, :-1]
    edge = grown.copy()
  return grown


def _per_image_noise(seeds, shape, salt):
  return np.stack([np.random.default_rng([salt, int(s)]).standard_normal(shape)
                   for s in seeds]).astype(np.float32)


def upsample(noise, size):
  """Noise [N, h, w, C] -> [N, size, size, C], bilinear-ish (separable linear interp)."""
  n, h, w, c = noise.shape
  grid_y, grid_x = np.linspace(0, h - 1, size), np.linspace(0, w - 1, size)
  y0, x0 = np.floor(grid_y).astype(int), np.floor(grid_x).astype(int)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  fy, fx = (grid_y - y0)[None, :, None, None], (grid_x - x0)[None, None, :, None]
  rows = noise[:, y0] * (1 - fy) + noise[:, y1] * fy
  return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


def _layers(attributes, x, y):
  """Layer labels int8 [N, H, W] of the flat drawing (face coordinates x, y [N, H, W])."""
  a = {name: attributes[:, i] for i, name in enumerate(ATTRIBUTE_NAMES)}
  def col(v):  # [N] -> [N, 1, 1]
    return np.asarray(v, np.float32)[:, None, None]
  shape = a["face_shape"]
  rx = np.select([shape == 0, shape == 1], [0.52, 0.44], 0.53)
  ry = np.select([shape == 0, shape == 1], [0.56, 0.70], 0.60)
  cy = 0.1
  u2, v2 = (x / col(rx)) ** 2, ((y - cy) / col(ry)) ** 2
  face = np.where((shape == 2)[:, None, None], u2 * u2 + v2 * v2, u2 + v2) <= 1.0
  top = cy - col(ry)  # y of the top of the head, [N, 1, 1]

  style = a["hair_style"][:, None, None]
  hair_back = ((style == 1) & (_ellipse(x, y, 0.0, 0.05, col(rx) + 0.17, col(ry) + 0.16)
                               & (y < 0.72))
               | (style == 1) & (np.abs(x) < col(rx) + 0.17) & (y > 0.05) & (y < 0.72)
               | (style == 3) & _ellipse(x, y, 0.0, top + 0.28, col(rx) + 0.32, 0.62))
  cap = _ellipse(x, y, 0.0, cy - 0.02, col(rx) + 0.07, col(ry) + 0.12) & (y < top + 0.26)
  hair_front = (((style == 0) | (style == 1)) & cap
                | (style == 2) & (np.abs(x) < 0.15) & (y > top - 0.34) & (y < top + 0.3))
  beard = (a["beard"][:, None, None] == 1) & face & (y > 0.24) & ~_ellipse(x, y, 0.0, 0.38, 0.32, 0.17)

  mouth_kind = a["mouth"][:, None, None]
  arc = np.hypot(x, y - 0.16)
  mouth = ((mouth_kind == 0) & (arc > 0.2) & (arc < 0.28) & (y > 0.26) & (np.abs(x) < 0.22)
           | (mouth_kind == 1) & _ellipse(x, y, 0.0, 0.41, 0.12, 0.1)
           | (mouth_kind == 2) & (np.abs(x) < 0.2) & (np.abs(y - 0.42) < 0.045))

  eye_x, eye_y = 0.21, 0.0
  sclera = _ellipse(x, y, -eye_x, eye_y, 0.155, 0.11) | _ellipse(x, y, eye_x, eye_y, 0.155, 0.11)
  iris = ((np.hypot(x + eye_x, y - eye_y) < 0.095) | (np.hypot(x - eye_x, y - eye_y) < 0.095))
  ring = lambda cx: (_ellipse(x, y, cx, eye_y, 0.235, 0.19)
                     & ~_ellipse(x, y, cx, eye_y, 0.17, 0.125))
  frame = (a["glasses"][:, None, None] == 1) & (ring(-eye_x) | ring(eye_x)
                                      | (np.abs(x) < 0.07) & (np.abs(y - eye_y + 0.03) < 0.03))

  labels = np.zeros(x.shape, np.int8)
  for label, mask in ((HAIR_BACK, hair_back), (SKIN, face), (BEARD, beard), (MOUTH, mouth),
                      (HAIR_FRONT, hair_front), (SCLERA, sclera), (IRIS, iris), (FRAME, frame)):
    labels[mask] = label
  return labels


def palette(attributes, background) -> np.ndarray:
  """Colour of each layer label per image: float32 [N, 9, 3] in [0, 1]."""
  a = {name: attributes[:, i] for i, name in enumerate(ATTRIBUTE_NAMES)}
  n = attributes.shape[0]
  fixed = lambda rgb: np.broadcast_to(rgb, (n, 3))
  hair = _HAIR[a["hair_colour"]]
  colours = (_BACKGROUND[background], hair, _SKIN[a["skin_tone"]], hair, _LIPS[a["mouth"]],
             hair, fixed(_SCLERA), _EYES[a["eye_colour"]], fixed(_FRAME))
  return np.stack(colours, axis=1).astype(np.float32)


def _photo(colour, labels, views, x, y):
  """Soft shading of the head, directional light over the whole picture."""
  radial = np.clip(1.0 - 0.22 * (x * x + (y - 0.1) ** 2), 0.7, 1.0)
  ang = views["light_angle"][:, None, None]
  gradient = (np.cos(ang) * x + np.sin(ang) * y) * views["light_strength"][:, None, None]
  gain = np.where(labels != BG, radial, 1.0) * (1.0 + gradient)
  return colour * (gain * views["light"][:, None, None])[..., None]


def _sketch(colour, labels, views, x, y):
  """Coloured pencil on paper tinted by the background, hatching, dark outlines."""
  head = (labels != BG)[..., None]
  paper = 0.5 + 0.5 * _BACKGROUND[views["background"]][:, None, None, :]
  hatch_angle = (views["seed"] % 4).astype(np.float32)[:, None, None] * (np.pi / 4) + 0.4
  hatch = np.sin((np.cos(hatch_angle) * x + np.sin(hatch_angle) * y) * 40.0) > 0.3
  pencil = np.where(head, 0.75 * colour + 0.25, paper)
  pencil *= np.where(hatch[..., None], np.where(head, 0.87, 0.88), 1.0).astype(np.float32)
  return np.where(_edges(labels, 1)[..., None], np.float32(0.2), pencil)


def _painting(colour, labels, views, x, y):
  """Saturated colours, soft edges, streaky brush-stroke texture."""
  del labels, x, y
  seeds, size = views["seed"], colour.shape[1]
  streaks = upsample(_per_image_noise(seeds, (16, 4, 3), 0xB1), size)
  streaks = np.where((seeds % 2 == 0)[:, None, None, None], streaks,
                     streaks.transpose(0, 2, 1, 3))
  blotch = upsample(_per_image_noise(seeds, (6, 6, 3), 0xB2), size)
  mean = colour.mean(axis=-1, keepdims=True)
  paint = (mean + 1.35 * (colour - mean)) * (1.0 + 0.1 * streaks + 0.06 * blotch)
  return 0.5 * paint + 0.125 * (np.roll(paint, 1, 1) + np.roll(paint, -1, 1)
                                + np.roll(paint, 1, 2) + np.roll(paint, -1, 2))


def _cartoon(colour, labels, views, x, y):
  """Flat, brighter colours with thick black outlines."""
  del views, x, y
  return np.where(_edges(labels, 2)[..., None], _LINE.astype(np.float32),
                  np.clip(colour * 1.08 + 0.03, 0, 1))


_STYLE_FNS = (_photo, _sketch, _painting, _cartoon)  # index = style


def render(attributes, views: dict, size: int = 32, supersample: int = 2,
           features: np.ndarray | None = None, return_face_mask: bool = False):
  """Identities in views -> images uint8 [N, size, size, 3].

  attributes: int [N, A] (see `ATTRIBUTES`); views: `sample_views(...)` output for N
  images. `features` (bool [N], default all True): False draws a head without eyes,
  mouth and glasses (a non-face for the recognizer's face-validity head).
  `return_face_mask`: also return the face mask uint8 [N, size, size], the fraction of
  each pixel covered by the person (head, hair, beard; not the background) x 255.
  """
  attributes = np.asarray(attributes, np.int32)
  n = attributes.shape[0]
  if attributes.shape != (n, NUM_ATTRIBUTES):
    raise ValueError(f"attributes must be [N, {NUM_ATTRIBUTES}], got {attributes.shape}")
  if n == 0:
    empty = np.zeros((0, size, size, 3), np.uint8)
    return (empty, empty[..., 0]) if return_face_mask else empty
  res = size * supersample
  grid = (np.arange(res, dtype=np.float32) + 0.5) / res * 2.0 - 1.0  # [-1, 1]
  gy, gx = np.meshgrid(grid, grid, indexing="ij")  # [res, res]
  # Inverse of shift / scale / rotation: image coordinates -> face coordinates.
  angle = views["angle"].astype(np.float32)
  c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
  px = gx[None] - views["shift_x"][:, None, None]
  py = gy[None] - views["shift_y"][:, None, None]
  scale = views["scale"][:, None, None]
  x, y = (c * px + s * py) / scale, (-s * px + c * py) / scale  # [N, res, res]
  labels = _layers(attributes, x, y)
  if features is not None:  # a head without eyes, mouth and glasses
    plain = ~np.asarray(features, bool)[:, None, None]
    labels[plain & np.isin(labels, (MOUTH, SCLERA, IRIS, FRAME))] = SKIN
  colours = palette(attributes, views["background"])  # [N, 9, 3]
  colour = colours[np.arange(n)[:, None, None], labels]  # [N, res, res, 3]
  image = np.zeros((n, size, size, 3), np.float32)
  for style, style_fn in enumerate(_STYLE_FNS):
    idx = np.flatnonzero(views["style"] == style)
    if len(idx):
      sub = {k: v[idx] for k, v in views.items()}
      styled = style_fn(colour[idx], labels[idx], sub, x[idx], y[idx])
      if style != 0:  # lighting acts on all styles, most on photos
        styled = styled * (0.5 + 0.5 * sub["light"])[:, None, None, None]
      image[idx] = _box_down(np.clip(styled, 0.0, 1.0), supersample)
  grain = _per_image_noise(views["seed"], (size, size, 3), 0xB3)
  image += np.where(views["style"] == 0, 0.012, 0.0).astype(np.float32)[:, None, None, None] * grain
  image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
  if not return_face_mask:
    return image
  person = (labels != BG).astype(np.float32)[..., None]                # [N, res, res, 1]
  mask = np.round(_box_down(person, supersample)[..., 0] * 255.0).astype(np.uint8)
  return image, mask

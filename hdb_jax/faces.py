"""Faces in real photos: find the face, and cut an aligned square around it.

    rgb = files.read_rgb("me.jpg")                  # uint8 [H, W, 3], upright
    face = faces.find_face(rgb, "me.jpg")           # the best face; ValueError if none
    crop = faces.aligned_crop(rgb, face, size=512)  # uint8 [512, 512, 3], eyes level

The detector is dlib's HOG frontal-face detector, which is compiled into the `dlib-bin`
wheel, and the eye positions come from dlib's 5-point landmark model, which ships in the
`face-recognition-models` wheel: nothing is downloaded (`pip install -e '.[faces]'`).
Used by `hdb personalize` for Stable Diffusion configs (`personalize.face_check =
"dlib"`); the mini world checks its synthetic faces with its own recognizer instead.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os

import numpy as np
from PIL import Image

LANDMARKS_FILE = os.path.join("models", "shape_predictor_5_face_landmarks.dat")
RECOGNITION_FILE = os.path.join("models", "dlib_face_recognition_resnet_model_v1.dat")
# dlib's face descriptors: two photos of one person are usually closer than this (its
# documentation's threshold, 99.38% on LFW).
SAME_PERSON_DISTANCE = 0.6
# Detection runs on a copy whose longer side is at most this (HOG cost grows with the
# pixel count; faces in a portrait are far larger than the detector's 80 px window).
DETECT_MAX_SIDE = 800


@dataclasses.dataclass(frozen=True)
class Face:
  box: tuple[float, float, float, float]   # left, top, right, bottom, in pixels
  score: float                             # the detector's confidence (> 0: a detection)
  left_eye: tuple[float, float]            # x, y of the eye on the image's left
  right_eye: tuple[float, float]
  nose: tuple[float, float]


def _dlib():
  try:
    import dlib
  except ImportError:
    raise ImportError("the face detector needs dlib: pip install -e '.[faces]' "
                      "(dlib-bin and face-recognition-models)") from None
  return dlib


def _model_file(name: str) -> str:
  """A model file of face_recognition_models, located without importing the package (its
  __init__ imports pkg_resources, which new setuptools no longer has)."""
  spec = importlib.util.find_spec("face_recognition_models")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("the face models need face-recognition-models: "
                      "pip install -e '.[faces]'")
  return os.path.join(list(spec.submodule_search_locations)[0], name)


@functools.lru_cache(maxsize=1)
def _models():
  """(detector, 5-point landmark predictor), loaded once per process."""
  dlib = _dlib()
  return dlib.get_frontal_face_detector(), dlib.shape_predictor(_model_file(LANDMARKS_FILE))


@functools.lru_cache(maxsize=1)
def _recognizer():
  return _dlib().face_recognition_model_v1(_model_file(RECOGNITION_FILE))


def detect(rgb: np.ndarray) -> list[Face]:
  """Every frontal face in `rgb` (uint8 [H, W, 3]), best first."""
  detector, landmarks = _models()
  dlib = _dlib()
  rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
  height, width = rgb.shape[:2]
  scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
  small = rgb if scale == 1.0 else np.asarray(Image.fromarray(rgb).resize(
      (max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR))
  # Upsample small photos once so that faces down to ~40 px are found.
  upsample = 1 if max(small.shape[:2]) < 400 else 0
  boxes, scores, _ = detector.run(small, upsample, 0.0)
  found = []
  for box, score in zip(boxes, scores):
    left, top, right, bottom = (v / scale for v in (box.left(), box.top(), box.right(),
                                                     box.bottom()))
    shape = landmarks(rgb, dlib.rectangle(round(left), round(top), round(right),
                                          round(bottom)))
    points = [(float(p.x), float(p.y)) for p in shape.parts()]  # 2 + 2 eye corners, nose
    eyes = sorted([np.mean(points[0:2], 0), np.mean(points[2:4], 0)], key=lambda p: p[0])
    found.append(Face(box=(left, top, right, bottom), score=float(score),
                      left_eye=tuple(map(float, eyes[0])),
                      right_eye=tuple(map(float, eyes[1])), nose=points[4]))
  return sorted(found, key=lambda f: -f.score)


def find_face(rgb: np.ndarray, path: str) -> Face:
  """The most confident face in the photo at `path`; ValueError naming it if none."""
  found = detect(rgb)
  if not found:
    raise ValueError(f"{path}: no face found (dlib's frontal face detector; a face should "
                     "look roughly at the camera and fill a good part of the photo)")
  return found[0]


def aligned_crop(rgb: np.ndarray, face: Face, size: int, margin: float = 0.6) -> np.ndarray:
  """A square uint8 [size, size, 3] around `face`, rotated so the eyes are level.

  The square is centred a little below the eyes (between them and the mouth) and its
  side is the face box's side times (1 + 2 * margin): margin 0.6 keeps the hair and the
  chin, the framing of a portrait. Parts of it outside the photo are filled with the
  photo's mean colour."""
  (lx, ly), (rx, ry) = face.left_eye, face.right_eye
  angle = math.atan2(ry - ly, rx - lx)                       # the eye line's tilt
  cos, sin = math.cos(angle), math.sin(angle)
  eye_mid = np.array([(lx + rx) / 2, (ly + ry) / 2])
  eye_distance = math.hypot(rx - lx, ry - ly)
  down = np.array([-sin, cos])                               # the face's "down", in pixels
  centre = eye_mid + 0.6 * eye_distance * down
  left, top, right, bottom = face.box
  side = max(right - left, bottom - top) * (1.0 + 2.0 * margin)
  # Cut at the photo's own resolution (side x side), then resize with antialiasing:
  # PIL's affine transform samples without it.
  cut = max(1, round(side))
  step = side / cut
  # output (u, v) -> input: centre + (u - cut/2) * step * x_axis + (v - cut/2) * step * down
  x_axis = np.array([cos, sin])
  origin = centre - (cut / 2) * step * x_axis - (cut / 2) * step * down
  coefficients = (step * x_axis[0], step * down[0], origin[0],
                  step * x_axis[1], step * down[1], origin[1])
  fill = tuple(int(c) for c in np.asarray(rgb, np.float64).reshape(-1, 3).mean(0))
  square = Image.fromarray(np.asarray(rgb, np.uint8)).transform(
      (cut, cut), Image.AFFINE, coefficients, resample=Image.BICUBIC, fillcolor=fill)
  return np.asarray(square.resize((size, size), Image.LANCZOS))


def descriptor(rgb: np.ndarray, face: Face | None = None) -> np.ndarray | None:
  """dlib's 128-d face descriptor (a ResNet trained for face recognition) of `face` in
  `rgb` (default: the most confident face), or None when no face is found. Two photos of
  one person are usually within `SAME_PERSON_DISTANCE` (Euclidean) of each other."""
  dlib = _dlib()
  if face is None:
    found = detect(rgb)
    if not found:
      return None
    face = found[0]
  _, landmarks = _models()
  rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
  shape = landmarks(rgb, dlib.rectangle(*(round(v) for v in face.box)))
  return np.asarray(_recognizer().compute_face_descriptor(rgb, shape), np.float32)


def identity_similarity(reference: np.ndarray, samples) -> tuple[np.ndarray, np.ndarray]:
  """The face metric for real photos (the paper's "Face Rec"): per sample, 1 - the
  descriptor distance to the reference photo's face (higher: more alike), and whether a
  face was found in it (samples without one score NaN). reference: uint8 [H, W, 3];
  samples: uint8 [N, H, W, 3] -> (similarity float [N], found bool [N])."""
  anchor = descriptor(reference)
  if anchor is None:
    raise ValueError("identity_similarity: no face in the reference photo")
  similarity, found = [], []
  for sample in samples:
    own = descriptor(sample)
    found.append(own is not None)
    similarity.append(np.nan if own is None else 1.0 - float(np.linalg.norm(own - anchor)))
  return np.asarray(similarity, np.float32), np.asarray(found)

"""The face detector and the aligned crop on real photos that ship offline (scikit-image's
sample images): the astronaut's face is found, the crop of a tilted photo comes out with
level eyes, and the cat, the coffee cup and a flat image are refused by name."""

import math
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image
import skimage.data

from hdb_jax import cli, faces, files, personalize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(REPO, "configs", "mini.py")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  folder = tmp_path_factory.mktemp("photos")
  paths = {}
  for name in ("astronaut", "chelsea", "coffee"):
    paths[name] = str(folder / f"{name}.png")
    Image.fromarray(getattr(skimage.data, name)()).save(paths[name])
  # the astronaut turned by 25 degrees, on a larger canvas
  tilted = Image.fromarray(skimage.data.astronaut()).rotate(25, expand=True,
                                                            resample=Image.BICUBIC)
  paths["tilted"] = str(folder / "tilted.jpg")
  tilted.save(paths["tilted"], quality=95)
  return paths


def _eye_tilt_degrees(face: faces.Face) -> float:
  (lx, ly), (rx, ry) = face.left_eye, face.right_eye
  return math.degrees(math.atan2(ry - ly, rx - lx))


def test_the_face_in_a_portrait_is_found(photos):
  rgb = files.read_rgb(photos["astronaut"])
  face = faces.find_face(rgb, photos["astronaut"])
  left, top, right, bottom = face.box
  # Eileen Collins' face in the 512 x 512 image: upper middle, ~90 px wide
  assert 150 < left < right < 300 and 50 < top < bottom < 200, face.box
  for x, y in (face.left_eye, face.right_eye, face.nose):
    assert left <= x <= right and top <= y <= bottom
  assert face.left_eye[0] < face.nose[0] < face.right_eye[0]
  assert face.nose[1] > max(face.left_eye[1], face.right_eye[1])


def test_the_crop_of_a_tilted_photo_has_level_eyes(photos):
  rgb = files.read_rgb(photos["tilted"])
  face = faces.find_face(rgb, photos["tilted"])
  assert abs(_eye_tilt_degrees(face)) > 15  # the photo is tilted...
  crop = faces.aligned_crop(rgb, face, size=256)
  assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
  again = faces.find_face(crop, "crop")
  assert abs(_eye_tilt_degrees(again)) < 4  # ...its crop is not
  left, top, right, bottom = again.box
  assert 40 < left and right < 216 and 20 < top and bottom < 236  # the face fills the middle


@pytest.mark.parametrize("name", ["chelsea", "coffee"])
def test_photos_without_a_face_are_refused_by_name(photos, name):
  with pytest.raises(ValueError, match=f"{name}.png: no face found"):
    faces.find_face(files.read_rgb(photos[name]), photos[name])


def test_read_photo_crops_to_the_face_unless_told_not_to(photos):
  cfg = ml_collections.ConfigDict(dict(face_check="dlib", min_side=64, crop_margin=0.6))
  cropped, seconds = personalize.read_photo(photos["astronaut"], cfg, 64)
  whole, _ = personalize.read_photo(photos["astronaut"], cfg, 64, crop=False)
  assert cropped.shape == whole.shape == (64, 64, 3) and set(seconds) == {"read", "detect"}
  assert -1.0 <= cropped.min() and cropped.max() <= 1.0
  assert np.abs(cropped - whole).mean() > 0.1  # the crop is not the whole photo
  np.testing.assert_allclose(whole, files.read_image(photos["astronaut"], 64))
  with pytest.raises(ValueError, match="face_check must be one of"):
    personalize.read_photo(photos["astronaut"], ml_collections.ConfigDict(
        dict(face_check="opencv", min_side=1)), 64)


def test_personalize_refuses_a_cat_with_nothing_written(photos, tmp_path, capsys):
  out = tmp_path / "cat"
  code = cli.main(["personalize", "--config", MINI, "--image", photos["chelsea"],
                   "--out", str(out), "--set", "personalize.face_check=dlib"])
  assert code == 1
  assert f"{photos['chelsea']}: no face found" in capsys.readouterr().err
  assert not out.exists() or not os.listdir(out)


def test_the_face_metric_knows_the_same_face_from_another(photos):
  """dlib's face descriptors: the astronaut mirrored, turned and brightened stays closer to
  herself than Grace Hopper (matplotlib's sample photo) is; a cup has no face."""
  import matplotlib.cbook
  astronaut = files.read_rgb(photos["astronaut"])
  changed = np.asarray(Image.fromarray(astronaut[:, ::-1]).rotate(10, resample=Image.BICUBIC)
                       .point(lambda v: min(255, int(v * 1.15))))
  hopper = files.read_rgb(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
  similarity, found = faces.identity_similarity(
      astronaut, [changed, hopper, files.read_rgb(photos["coffee"])])
  assert found.tolist() == [True, True, False] and np.isnan(similarity[2])
  assert similarity[0] > 1.0 - faces.SAME_PERSON_DISTANCE > similarity[1]
  with pytest.raises(ValueError, match="no face in the reference"):
    faces.identity_similarity(files.read_rgb(photos["coffee"]), [astronaut])

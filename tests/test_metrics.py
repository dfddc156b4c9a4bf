"""The SD1.5 metrics (hdb_jax/metrics.py, hdb_jax/models_eval.py) on tiny random CLIP and
DINO ViT models saved as PyTorch safetensors (by transformers' PyTorch classes) and as
Flax msgpack (the layout transformers' Flax classes saved): both load to the same
weights, the embeddings match the PyTorch models' own, identical images score 1, the
image metrics are symmetric; and train/evaluate.py with configs/evaluate_sd15.py on the
tiny model (2 photos x 2 prompts x 2 methods, scored against the reference photos)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image

import safetensors.numpy

from hdb_jax import evaluate, faces, metrics, models, models_eval
from hdb_jax.nn import torch_keys
from hdb_jax import params as params_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "assets", "mini_tokenizer")
TINY_TEXT = dict(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, max_position_embeddings=16, bos_token_id=785,
                 eos_token_id=786, pad_token_id=786)  # the mini tokenizer's ids
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, image_size=16, patch_size=8)


def _photo(name, size=64):
  if name == "hopper":
    import matplotlib.cbook
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    image = np.asarray(Image.open(path).convert("RGB"))
  else:
    image = getattr(skimage.data, name)()
  side = min(image.shape[:2])
  image = image[:side, :side] if image.ndim == 3 else np.stack([image[:side, :side]] * 3, -1)
  return np.asarray(Image.fromarray(image).resize((size, size), Image.LANCZOS))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """{"clip_torch", "clip_flax", "dino_torch", "dino_flax": folder} and the PyTorch models."""
  import flax
  import torch
  from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel
  root = tmp_path_factory.mktemp("encoders")
  out = {name: str(root / name) for name in ("clip_torch", "clip_flax", "dino_torch", "dino_flax")}
  torch.manual_seed(0)
  clip = CLIPModel(CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION,
                              projection_dim=16)).eval()
  dino = ViTModel(ViTConfig(**TINY_VISION)).eval()  # with its pooler, which is not read
  clip.save_pretrained(out["clip_torch"], safe_serialization=True)
  dino.save_pretrained(out["dino_torch"], safe_serialization=True)
  # Flax folders as transformers' Flax classes saved them: config.json and the params
  # tree as msgpack (converted here by our key map; the PyTorch outputs check both).
  for kind, module, component in (("clip", models_eval.clip, "clip"),
                                  ("dino", models_eval.vit, "vit")):
    config = (module.CLIPConfig if kind == "clip" else module.ViTConfig).from_dict(
        json.load(open(os.path.join(out[f"{kind}_torch"], "config.json"))))
    model = module.CLIPModel(config) if kind == "clip" else module.ViTModel(config)
    state = safetensors.numpy.load_file(os.path.join(out[f"{kind}_torch"], "model.safetensors"))
    params = torch_keys.torch_to_flax(component, state, module.param_shapes(model))
    os.makedirs(out[f"{kind}_flax"])
    shutil.copy(os.path.join(out[f"{kind}_torch"], "config.json"), out[f"{kind}_flax"])
    with open(os.path.join(out[f"{kind}_flax"], "flax_model.msgpack"), "wb") as f:
      f.write(flax.serialization.msgpack_serialize(params))
  for name in ("clip_torch", "clip_flax"):
    for file in os.listdir(TOKENIZER):
      shutil.copy(os.path.join(TOKENIZER, file), out[name])
  return out, {"clip": clip, "dino": dino}


@pytest.fixture(scope="module")
def encoders(folders):
  paths, _ = folders
  return {kind: metrics.load_encoders(paths[f"clip_{kind}"], paths[f"dino_{kind}"], batch_size=4)
          for kind in ("torch", "flax")}


def test_torch_and_flax_folders_load_the_same_weights_and_match_pytorch(folders, encoders):
  import torch
  _, torch_models = folders
  from_torch, from_flax = encoders["torch"], encoders["flax"]
  assert os.path.exists(os.path.join(folders[0]["dino_torch"], "model.safetensors"))
  for name in ("clip_params", "dino_params"):
    a = params_lib.flatten(getattr(from_torch, name))
    b = params_lib.flatten(getattr(from_flax, name))
    assert a.keys() == b.keys() and not any("pooler" in k for k in a)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
  images = np.stack([_photo("astronaut"), _photo("coffee"), _photo("chelsea")])
  prompts = ["a sks person", "a sketch of a person", "a red face"]
  tokens = from_flax.clip.tokenize(prompts)
  with torch.no_grad():
    clip_pixels = np.asarray(metrics.preprocess(images, from_flax.clip.preprocessing))
    # transformers 5: the projected features are the outputs' pooler_output
    want_images = torch_models["clip"].get_image_features(
        torch.from_numpy(clip_pixels.transpose(0, 3, 1, 2).copy())).pooler_output.numpy()
    want_texts = torch_models["clip"].get_text_features(
        torch.from_numpy(tokens["input_ids"]).long(),
        torch.from_numpy(tokens["attention_mask"]).long()).pooler_output.numpy()
    dino_pixels = np.asarray(metrics.preprocess(images, from_flax.dino.preprocessing))
    want_cls = torch_models["dino"](torch.from_numpy(dino_pixels.transpose(0, 3, 1, 2).copy())
                                    ).last_hidden_state[:, 0].numpy()
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  for got in (from_torch, from_flax):
    np.testing.assert_allclose(metrics.clip_image_embeddings(got, images), unit(want_images),
                               atol=2e-5)
    np.testing.assert_allclose(metrics.clip_text_embeddings(got, prompts), unit(want_texts),
                               atol=2e-5)
    np.testing.assert_allclose(metrics.dino_embeddings(got, images), unit(want_cls), atol=2e-5)


def test_identical_images_score_one_and_image_metrics_are_symmetric(encoders):
  got = encoders["flax"]
  astronaut, coffee, chelsea = _photo("astronaut"), _photo("coffee"), _photo("chelsea", 48)
  samples = np.stack([astronaut, coffee])
  for similarity in (metrics.clip_image_similarity, metrics.dino_similarity):
    same, other = similarity(got, astronaut, samples)
    assert abs(same - 1.0) < 1e-5 and other < 1.0 - 1e-3, similarity.__name__
    # symmetric, and other sizes are cropped / resized to the encoder's
    np.testing.assert_allclose(similarity(got, coffee, astronaut[None]), other, atol=1e-6)
    np.testing.assert_allclose(similarity(got, astronaut, chelsea[None]),
                               similarity(got, chelsea, astronaut[None]), atol=1e-6)
    # uint8 in [0, 255] and floats in [-1, 1] are the same image
    as_float = samples.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(similarity(got, astronaut, as_float), [same, other], atol=1e-5)
    # several references: the mean over them
    np.testing.assert_allclose(similarity(got, samples, samples), [(1 + other) / 2] * 2,
                               atol=1e-5)


def test_batches_padded_to_one_shape_change_nothing(encoders):
  got = encoders["flax"]
  images = np.stack([_photo(n) for n in ("astronaut", "coffee", "chelsea", "hopper", "rocket")])
  one_at_a_time = metrics.Encoders(got.clip, got.clip_params, got.dino, got.dino_params, 1)
  for embed in (metrics.clip_image_embeddings, metrics.dino_embeddings):
    batched = embed(got, images)  # chunks of 4, the last one padded
    assert batched.shape == (5, 32 if embed is metrics.dino_embeddings else 16)
    np.testing.assert_allclose(batched, embed(one_at_a_time, images), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_clip_t_drops_the_identifier(encoders):
  got = encoders["flax"]
  samples = np.stack([_photo("astronaut"), _photo("coffee")])
  assert metrics.remove_identifier("a photo of sks person, sks.", "sks") == "a photo of person,"
  with_token = metrics.clip_text_similarity(got, samples, ["a sks person", "a sks face"], "sks")
  without = metrics.clip_text_similarity(got, samples, ["a person", "a face"])
  kept = metrics.clip_text_similarity(got, samples, ["a sks person", "a sks face"])
  np.testing.assert_allclose(with_token, without, atol=1e-6)
  assert np.abs(kept - without).max() > 1e-4  # the identifier does change the embedding
  assert np.all(np.abs(without) <= 1.0 + 1e-6)
  with pytest.raises(ValueError, match="2 samples, 1 prompts"):
    metrics.clip_text_similarity(got, samples, ["a person"])


def test_preprocessor_config_is_read(folders, tmp_path):
  folder = str(tmp_path / "dino")
  shutil.copytree(folders[0]["dino_flax"], folder)
  assert models_eval.load_dino(folder)[0].preprocessing == models_eval.ImagePreprocessing(
      16, models_eval.IMAGENET_MEAN, models_eval.IMAGENET_STD, "bilinear")
  with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
    json.dump({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "resample": 3,
               "size": 224}, f)
  dino, _ = models_eval.load_dino(folder)
  assert dino.preprocessing == models_eval.ImagePreprocessing(
      16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic")  # the model's size, not 224


def test_missing_and_wrong_folders_are_named(folders, tmp_path):
  paths, _ = folders
  with pytest.raises(models.ModelLoadError, match=r"nowhere: not a folder.*CLIP"):
    models_eval.load_clip(str(tmp_path / "nowhere"))
  with pytest.raises(models.ModelLoadError, match=r"nothing: not a folder.*DINO"):
    metrics.load_encoders("", str(tmp_path / "nothing"))
  no_weights = tmp_path / "no_weights"
  shutil.copytree(paths["clip_flax"], no_weights)
  os.remove(no_weights / "flax_model.msgpack")
  with pytest.raises(models.ModelLoadError,
                     match=r"no_weights: no weights \(flax_model.msgpack or model.safetensors"):
    models_eval.load_clip(str(no_weights))
  no_tokenizer = tmp_path / "no_tokenizer"
  shutil.copytree(paths["clip_torch"], no_tokenizer)
  os.remove(no_tokenizer / "vocab.json")
  with pytest.raises(models.ModelLoadError, match=r"no_tokenizer/vocab.json: missing"):
    models_eval.load_clip(str(no_tokenizer))
  with pytest.raises(models.ModelLoadError,
                     match=r"config.json: model_type 'clip', expected 'vit'"):
    models_eval.load_dino(paths["clip_torch"])
  wider = tmp_path / "wider"
  shutil.copytree(paths["dino_torch"], wider)
  with open(wider / "config.json") as f:
    config = json.load(f)
  config["intermediate_size"] = 48
  with open(wider / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(models.ModelLoadError,
                     match=r"wider(/model.safetensors)?: weights do not fit the DINO ViT.*wrong shape"):
    models_eval.load_dino(str(wider))
  corrupt = tmp_path / "corrupt"
  shutil.copytree(paths["dino_torch"], corrupt)
  (corrupt / "model.safetensors").write_bytes(b"garbage")
  with pytest.raises(models.ModelLoadError, match=r"model.safetensors: not a readable safetensors"):
    models_eval.load_dino(str(corrupt))


def test_reference_scores_and_their_summary(encoders):
  """One identity's line: P = 2 prompts x S = 1 seed + the class prompt; the face metric
  (dlib) tells the reference's mirror image from another person."""
  reference = _photo("astronaut", 256)
  images = np.stack([reference[:, ::-1], _photo("hopper", 256), _photo("coffee", 256)])
  images = images.astype(np.float32) / 127.5 - 1.0
  line = evaluate.reference_scores(encoders["flax"], reference, images,
                                   ["a sks person", "a sketch of a sks person"], 1, "sks")
  assert sorted(line) == ["class_dino", "class_face", "clip_i", "clip_t", "dino", "diversity",
                          "face", "face_found"]
  assert line["face_found"] == [1.0, 1.0] and line["class_face"] == [None]  # a cup
  assert line["face"][0] > 1.0 - faces.SAME_PERSON_DISTANCE > line["face"][1]
  assert line["dino"][0] > line["dino"][1] and line["diversity"] == [0.0, 0.0]
  assert all(-1.0 <= x <= 1.0 for x in line["clip_i"] + line["clip_t"] + line["class_dino"])
  lines = [{"identity": i, "seconds": 1.0, "scores": line} for i in range(3)]
  row = evaluate.summarize(lines, seeds=1)
  assert evaluate.scoring_of(row) == "reference" and "identity" not in row
  assert row["face_plain"] == pytest.approx(line["face"][0])
  assert row["face"] == pytest.approx(np.mean(line["face"])) and row["class_face"] is None
  assert row["clip_i_ci95"] == pytest.approx([row["clip_i"]] * 2)


@pytest.fixture(scope="module")
def tiny_folder(tiny_model, tmp_path_factory):
  sd, params = tiny_model
  folder = str(tmp_path_factory.mktemp("tiny") / "model")
  models.save(sd, params, folder)
  return folder


@pytest.mark.slow  # ~50 s: a whole evaluation run with the reference encoders
def test_evaluate_with_reference_scoring_on_the_tiny_model(folders, tiny_folder, tmp_path):
  paths, _ = folders
  photos = tmp_path / "photos"
  os.makedirs(photos / "hopper")
  Image.fromarray(_photo("astronaut", 128)).save(photos / "astronaut.png")
  Image.fromarray(_photo("hopper", 128)).save(photos / "hopper" / "1.png")
  workdir = tmp_path / "eval"
  command = [sys.executable, "-m", "train.evaluate", "--config", "configs/evaluate_sd15.py",
             "--workdir", str(workdir), "--cache_dir", str(tmp_path / "cache"),
             f"--config.model.path={tiny_folder}", f"--config.data.folder={photos}",
             "--config.model.remat=none",  # the SD1.5 config's remat: compile time only
             f"--config.data.data_dir={tmp_path / 'data'}",
             f"--config.metrics.clip_path={paths['clip_flax']}",
             f"--config.metrics.dino_path={paths['dino_torch']}",
             "--methods", "base,lidb_dreambooth_400",
             "--config.methods.lidb_dreambooth_400.steps=2", "--config.identities=2",
             "--config.seeds=2", "--config.chunk=2", "--config.sample_steps=2",
             "--config.reference_method=base",
             "--config.prompts=('a {token} {class_name}', 'a sketch of a {token} {class_name}')"]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  assert summary["scoring"] == "reference"
  assert summary["prompts"] == ["a sks person", "a sketch of a sks person"]
  table = summary["table"]
  assert sorted(table) == ["base", "lidb_dreambooth_400"]
  for row in table.values():
    assert row["identities"] == 2 and "identity" not in row
    for name in ("clip_i", "clip_t", "dino", "class_dino"):
      lo, hi = row[name + "_ci95"]
      assert -1.0 <= lo <= row[name] <= hi <= 1.0, name
    # 32 px photos and samples: dlib finds no face, so no Face Rec score, and says so
    assert row["face_found"] == 0.0 and row["face"] is None and row["face_plain"] is None
  trained = evaluate.ResultsFile(str(workdir / "results"), "lidb_dreambooth_400").read()
  assert table["lidb_dreambooth_400"]["seconds_median"] == np.median(
      [line["seconds"] for line in trained])
  assert table["base"]["seconds_median"] is None  # the base trains nothing
  paired = table["lidb_dreambooth_400"]["minus_base"]
  assert sorted(paired) == ["clip_i", "clip_t", "dino", "face", "face_plain"]
  assert paired["dino"]["identities"] == 2
  line = evaluate.ResultsFile(str(workdir / "results"), "base").read()[0]
  assert len(line["scores"]["clip_t"]) == 2 * 2 and len(line["scores"]["class_dino"]) == 2
  table_md = (workdir / "table.md").read_text()
  assert "| CLIP-I | CLIP-T | DINO |" in table_md and "identity, plain prompt" not in table_md
  assert "Paired against base" in table_md
  assert "clip-i" in done.stdout and (workdir / "samples.png").exists()

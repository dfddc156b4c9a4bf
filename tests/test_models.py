"""Model folders: save with Flax weights and with PyTorch weights, load both, errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdb_jax import models, torch_export
from hdb_jax import params as params_lib


@pytest.fixture(scope="module")
def saved_folders(tiny_model, tmp_path_factory):
  sd, params = tiny_model
  root = tmp_path_factory.mktemp("models")
  flax_dir, torch_dir = str(root / "flax"), str(root / "torch")
  models.save(sd, params, flax_dir)
  torch_export.export_base(sd, params, torch_dir)
  return flax_dir, torch_dir


def _outputs(sd, params):
  """Text encoder, UNet and VAE outputs on fixed inputs."""
  ids = sd.tokenize(["a sketch of a sks face"])
  latents = jax.random.normal(jax.random.key(0), (1, sd.latent_channels, sd.latent_size, sd.latent_size))
  images = jax.random.uniform(jax.random.key(1), (1, sd.image_size, sd.image_size, 3), minval=-1)
  context = sd.encode_text(params["text_encoder"], ids)
  return {"context": context,
          "unet": sd.predict(params["unet"], latents, jnp.array([321]), context),
          "vae_mean": sd.encode_images(params["vae"], images)[0],
          "decoded": sd.decode_latents(params["vae"], latents)}


def test_folder_layout(saved_folders):
  flax_dir, torch_dir = saved_folders
  for folder, weights in ((flax_dir, models.FLAX_WEIGHTS), (torch_dir, models.TORCH_WEIGHTS)):
    assert os.path.exists(os.path.join(folder, "model_index.json"))
    for component, name in weights.items():
      assert os.path.exists(os.path.join(folder, component, name)), (folder, component)
    assert os.path.exists(os.path.join(folder, "tokenizer", "vocab.json"))
    assert os.path.exists(os.path.join(folder, "scheduler", "scheduler_config.json"))


def test_flax_and_torch_folders_load_to_same_outputs(tiny_model, saved_folders):
  sd, params = tiny_model
  reference = _outputs(sd, params)
  for folder in saved_folders:
    loaded_sd, loaded = models.load(folder)
    assert loaded_sd.tokenizer.model_max_length == sd.tokenizer.model_max_length
    assert loaded_sd.prediction_type == sd.prediction_type
    # Same weights, bit for bit, and so the same outputs.
    flat, flat_loaded = params_lib.flatten(params), params_lib.flatten(loaded)
    assert flat.keys() == flat_loaded.keys()
    for key in flat:
      np.testing.assert_array_equal(flat[key], flat_loaded[key], err_msg=f"{folder}: {key}")
    got = _outputs(loaded_sd, loaded)
    for name in reference:
      np.testing.assert_allclose(got[name], reference[name], atol=1e-6, err_msg=f"{folder}: {name}")


def test_missing_folder_and_subfolder(tmp_path, saved_folders):
  with pytest.raises(models.ModelLoadError, match="not a folder.*hub ids are not supported"):
    models.load(str(tmp_path / "nowhere"))
  broken = str(tmp_path / "no_vae")
  shutil.copytree(saved_folders[0], broken)
  shutil.rmtree(os.path.join(broken, "vae"))
  with pytest.raises(models.ModelLoadError, match=r"no_vae/vae: missing subfolder 'vae'"):
    models.load(broken)


def test_missing_and_corrupt_weights(tmp_path, saved_folders):
  folder = str(tmp_path / "corrupt")
  shutil.copytree(saved_folders[0], folder)
  weights = os.path.join(folder, "unet", models.FLAX_WEIGHTS["unet"])
  with open(weights, "wb") as f:
    f.write(b"\x00garbage")
  with pytest.raises(models.ModelLoadError, match="diffusion_flax_model.msgpack: not a readable"):
    models.load(folder)
  os.remove(weights)
  with pytest.raises(models.ModelLoadError, match=r"unet: no weights"):
    models.load(folder)

  folder = str(tmp_path / "corrupt_torch")
  shutil.copytree(saved_folders[1], folder)
  with open(os.path.join(folder, "text_encoder", "model.safetensors"), "wb") as f:
    f.write(b"garbage")
  with pytest.raises(models.ModelLoadError, match="model.safetensors: not a readable safetensors"):
    models.load(folder)


def test_weights_that_do_not_fit_the_config(tmp_path, saved_folders):
  for source in saved_folders:
    folder = str(tmp_path / os.path.basename(source))
    shutil.copytree(source, folder)
    config_path = os.path.join(folder, "unet", "config.json")
    with open(config_path) as f:
      config = json.load(f)
    config["cross_attention_dim"] = 48  # the saved attn2 to_k/to_v kernels are [32, ...]
    with open(config_path, "w") as f:
      json.dump(config, f)
    with pytest.raises(models.ModelLoadError, match=r"unet.*do not fit the unet.*wrong shape"):
      models.load(folder)


def test_bad_config_file(tmp_path, saved_folders):
  folder = str(tmp_path / "badjson")
  shutil.copytree(saved_folders[0], folder)
  with open(os.path.join(folder, "text_encoder", "config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(models.ModelLoadError, match=r"text_encoder/config.json: not a readable JSON"):
    models.load(folder)


def _folder_with(tmp_path, torch_dir, name, rewrite):
  """A copy of the PyTorch folder whose weight files are replaced by `rewrite(state,
  path_without_extension)` outputs (fp16 variants, pickles)."""
  import safetensors.numpy
  folder = str(tmp_path / name)
  shutil.copytree(torch_dir, folder)
  for component, file in models.TORCH_WEIGHTS.items():
    path = os.path.join(folder, component, file)
    state = safetensors.numpy.load_file(path)
    os.remove(path)
    rewrite(component, state, path[:-len(".safetensors")])
  return folder


def test_fp16_variant_files_only_are_read_and_cast(tiny_model, tmp_path, saved_folders):
  """A folder downloaded with variant="fp16" has only *.fp16.safetensors: read, cast to
  float32; the weights are the fp16-rounded originals."""
  import safetensors.numpy
  sd, params = tiny_model
  folder = _folder_with(tmp_path, saved_folders[1], "fp16", lambda component, state, stem:
                        safetensors.numpy.save_file(
                            {k: v.astype(np.float16) for k, v in state.items()},
                            stem + ".fp16.safetensors"))
  _, loaded = models.load(folder)
  flat, flat_loaded = params_lib.flatten(params), params_lib.flatten(loaded)
  for key in flat:
    assert flat_loaded[key].dtype == jnp.float32, key
    np.testing.assert_array_equal(np.asarray(flat[key]).astype(np.float16).astype(np.float32),
                                  flat_loaded[key], err_msg=str(key))


def test_pytorch_pickles_are_read_only_when_allowed(tiny_model, tmp_path, saved_folders):
  """.bin pickles can run code when unpickled: refused by name, with the reason and the
  switch; with allow_pickle they load (torch's weights_only reader) to the same weights."""
  import torch
  sd, params = tiny_model
  names = {"unet": "diffusion_pytorch_model.bin", "vae": "diffusion_pytorch_model.bin",
           "text_encoder": "pytorch_model.bin"}
  folder = _folder_with(tmp_path, saved_folders[1], "pickles", lambda component, state, stem:
                        torch.save({k: torch.from_numpy(v) for k, v in state.items()},
                                   os.path.join(os.path.dirname(stem), names[component])))
  with pytest.raises(models.ModelLoadError, match=r"pytorch_model\.bin: a PyTorch pickle.*"
                     r"can run code.*allow_pickle"):
    models.load(folder)
  _, loaded = models.load(folder, allow_pickle=True)
  flat, flat_loaded = params_lib.flatten(params), params_lib.flatten(loaded)
  for key in flat:
    np.testing.assert_array_equal(flat[key], flat_loaded[key], err_msg=str(key))

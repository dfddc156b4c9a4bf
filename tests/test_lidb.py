"""LiDB: aux matrices, merge, counts, files."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdb_jax import cli, lidb
from hdb_jax import params as params_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_train(spec, seed=1, scale=0.1):
  """A train pytree with both factors nonzero."""
  train = lidb.init(spec, jax.random.key(seed))
  return jax.tree_util.tree_map(
      lambda x: x + scale * jax.random.normal(jax.random.key(seed + 1), x.shape), train)


def test_aux_orthonormal():
  for in_dim, out_dim, a, b in [(320, 640, 100, 50), (32, 32, 32, 32), (768, 40, 100, 40)]:
    aux = lidb.layer_aux(0, "unet", "x/attn1/to_q", in_dim, out_dim, a, b)
    down, up = aux["D_aux"], aux["U_aux"]
    assert down.shape == (in_dim, a) and up.shape == (b, out_dim)
    np.testing.assert_allclose(down.T @ down, np.eye(a), atol=2e-6)
    np.testing.assert_allclose(up @ up.T, np.eye(b), atol=2e-6)


def test_aux_depends_on_seed_and_path():
  base = lidb.layer_aux(0, "unet", "p/attn1/to_q", 64, 64, 8, 8)["D_aux"]
  assert not np.array_equal(base, lidb.layer_aux(1, "unet", "p/attn1/to_q", 64, 64, 8, 8)["D_aux"])
  assert not np.array_equal(base, lidb.layer_aux(0, "unet", "p/attn1/to_k", 64, 64, 8, 8)["D_aux"])
  np.testing.assert_array_equal(base, lidb.layer_aux(0, "unet", "p/attn1/to_q", 64, 64, 8, 8)["D_aux"])


_AUX_DIGEST = """
import hashlib, sys
from hdb_jax import lidb
aux = lidb.layer_aux(7, "text_encoder", "text_model/encoder/layers/3/self_attn/q_proj", 768, 768, 100, 50)
print(hashlib.sha256(aux["D_aux"].tobytes() + aux["U_aux"].tobytes()).hexdigest())
"""


def test_aux_bit_identical_across_processes():
  """Two fresh interpreters (different PYTHONHASHSEED) give the same aux bytes as this one."""
  aux = lidb.layer_aux(7, "text_encoder", "text_model/encoder/layers/3/self_attn/q_proj",
                       768, 768, 100, 50)
  here = hashlib.sha256(aux["D_aux"].tobytes() + aux["U_aux"].tobytes()).hexdigest()
  for hash_seed in ("1", "2"):
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _AUX_DIGEST], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == here


def test_merge_matches_dense_reference(tiny_model, tiny_lidb):
  _, params = tiny_model
  spec, aux = tiny_lidb
  train = _random_train(spec)
  merged = jax.jit(lidb.merge)(params, train, aux)
  for component, layers in spec.layers.items():
    flat_base = params_lib.flatten(params[component])
    flat_merged = params_lib.flatten(merged[component])
    for layer in layers:
      w, x = train[component][layer], aux[component][layer]
      reference = (np.asarray(flat_base[layer + "/kernel"], np.float64)
                   + np.asarray(x["D_aux"], np.float64) @ np.asarray(w["D_train"], np.float64)
                   @ np.asarray(w["U_train"], np.float64) @ np.asarray(x["U_aux"], np.float64))
      np.testing.assert_allclose(flat_merged[layer + "/kernel"], reference, atol=1e-5)
    # Everything that is not a target is untouched.
    for path, value in flat_base.items():
      if path[: -len("/kernel")] not in layers:
        assert flat_merged[path] is value or np.array_equal(flat_merged[path], value)
  assert not np.allclose(params_lib.flatten(merged["unet"])[next(iter(spec.layers["unet"])) + "/kernel"],
                         params_lib.flatten(params["unet"])[next(iter(spec.layers["unet"])) + "/kernel"])


def test_zero_residual_reproduces_base_exactly(tiny_model, tiny_lidb):
  sd, params = tiny_model
  spec, aux = tiny_lidb
  train = lidb.init(spec, jax.random.key(0))  # U_train = 0
  ids = sd.tokenize(["a sks face on a blue background"])
  latents = jax.random.normal(jax.random.key(1), (1, 4, 8, 8))

  @jax.jit
  def outputs(p):
    context = sd.encode_text(p["text_encoder"], ids)
    return context, sd.predict(p["unet"], latents, jnp.array([500]), context)

  base_context, base_out = outputs(params)
  merged_context, merged_out = outputs(lidb.merge(params, train, aux))
  np.testing.assert_array_equal(base_context, merged_context)
  np.testing.assert_array_equal(base_out, merged_out)


def test_sd15_counts_with_eval_shape(capsys):
  assert cli.main(["info", "--config", os.path.join(REPO, "configs", "sd15.py")]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["lidb_layers"] == 176
  assert info["lidb_layers_per_component"] == {"unet": 128, "text_encoder": 48}
  assert info["lidb_trainable_params"] == 26400
  assert info["lidb_bytes_fp32"] == 105600
  # A personalization's bytes per rank on these layers: ~10x fewer inside the subspace
  # (a rank-16 personalization.safetensors: 1.7 MB, against 17.5 MB as a LoRA).
  assert info["bytes_fp32_per_rank"] == {"lidb_subspace": 105600, "lora": 4 * 273024}
  assert info["base_params"]["unet"] == 859520964
  assert info["base_params"]["text_encoder"] == 123060480


def test_file_roundtrip_regenerates_aux(tmp_path, tiny_model, tiny_lidb):
  _, params = tiny_model
  spec, aux = tiny_lidb
  train = _random_train(spec)
  path = str(tmp_path / "lidb.safetensors")
  lidb.save(path, train, spec, params_lib.fingerprint(params, spec.layers))
  loaded, loaded_spec, metadata = lidb.load(path)
  assert loaded_spec == spec
  assert metadata["base_fingerprint"] == params_lib.fingerprint(params, spec.layers)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, jax.tree_util.tree_map(np.asarray, train))
  jax.tree_util.tree_map(np.testing.assert_array_equal, lidb.make_aux(loaded_spec), aux)
  lidb.check_base(loaded_spec, params, path)
  assert os.path.getsize(path) < 4 * spec.num_trainable + 20_000


def test_file_errors(tmp_path, tiny_lidb):
  spec, _ = tiny_lidb
  train = _random_train(spec)
  with pytest.raises(FileNotFoundError, match="no such LiDB file"):
    lidb.load(str(tmp_path / "missing.safetensors"))
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="garbage.safetensors"):
    lidb.load(str(garbage))
  component, layer = "unet", next(iter(spec.layers["unet"]))
  train[component][layer]["U_train"] = train[component][layer]["U_train"].at[0, 0].set(jnp.nan)
  bad = str(tmp_path / "nan.safetensors")
  lidb.save(bad, train, spec)
  with pytest.raises(ValueError, match="NaN or Inf"):
    lidb.load(bad)


def test_file_with_stored_aux(tmp_path, tiny_lidb):
  """Learned aux matrices travel in the file; `load` refuses such a file (the seed would
  give other matrices), `load_with_aux` returns them, a bad aux tag is an error."""
  import safetensors.numpy
  spec, seed_aux = tiny_lidb
  train = jax.tree_util.tree_map(np.asarray, lidb.init(spec, jax.random.key(1)))
  aux = jax.tree_util.tree_map(lambda x: 2.0 * np.asarray(x), seed_aux)
  path = str(tmp_path / "learned.safetensors")
  lidb.save(path, train, spec, "fp", aux=aux)
  with pytest.raises(ValueError, match="learned aux"):
    lidb.load(path)
  loaded_train, loaded_aux, loaded_spec, metadata = lidb.load_with_aux(path)
  assert loaded_spec == spec and metadata["aux"] == "stored"
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded_aux, aux)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded_train, train)
  seeded = str(tmp_path / "seeded.safetensors")
  lidb.save(seeded, train, spec, "fp")
  _, seeded_aux, _, _ = lidb.load_with_aux(seeded)
  jax.tree_util.tree_map(np.testing.assert_array_equal, seeded_aux, seed_aux)
  tensors = safetensors.numpy.load_file(seeded)
  with safetensors.safe_open(seeded, framework="numpy") as f:
    metadata = dict(f.metadata(), aux="guessed")
  bad = str(tmp_path / "bad.safetensors")
  safetensors.numpy.save_file(tensors, bad, metadata=metadata)
  with pytest.raises(ValueError, match="aux='guessed'"):
    lidb.load_with_aux(bad)


def test_aux_kept_in_the_programs_cache(tmp_path, tiny_lidb, monkeypatch):
  """`hdb personalize` keeps the aux matrices beside its stored programs: the first call
  makes and writes them, the next reads the same bits without making them; a damaged
  file is made again."""
  from hdb_jax import personalize_programs
  spec, seed_aux = tiny_lidb
  cache = {"programs": str(tmp_path)}
  first = personalize_programs.stored_aux(spec, cache)
  jax.tree_util.tree_map(np.testing.assert_array_equal, first, seed_aux)
  (stored,) = tmp_path.glob("aux-*.npz")
  monkeypatch.setattr(lidb, "make_aux", lambda spec: pytest.fail("made again"))
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         personalize_programs.stored_aux(spec, cache), seed_aux)
  stored.write_bytes(b"damaged")
  monkeypatch.setattr(lidb, "make_aux", lambda spec: seed_aux)
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         personalize_programs.stored_aux(spec, cache), seed_aux)
  with np.load(stored) as written:  # written again, readable
    assert len(written.files) == 2 * sum(len(layers) for layers in spec.layers.values())

"""PyTorch LoRA export/import, checked numerically in PyTorch (diffusers + peft) on CPU.

A tiny base with random nonzero residuals; exported with `hdb export-base` and
`hdb export`; loaded with diffusers' `load_lora_weights` (PEFT and kohya files) and
`load_lora_adapter`; PyTorch outputs compared with the hdb-jax merged outputs.

Run with `-s` to see the measured max abs differences.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

from hdb_jax import cli, convert, convert_import, lidb, models
from hdb_jax import lora as lora_lib
from hdb_jax import params as params_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
ATOL = 1e-5          # PyTorch vs JAX, fp32
MIN_EFFECT = 1e-2    # the residuals must change the outputs by far more than ATOL
CASES = ("lidb", "mixed")
FORMATS = ("peft", "kohya")


def _run(capsys, *argv):
  """`hdb argv...` in-process -> (exit code, stdout, stderr)."""
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def _assert_lora_equal(got, want, rtol=0.0):
  assert lora_lib.layer_shapes(got) == lora_lib.layer_shapes(want)
  for component, layers in want.items():
    for layer, factors in layers.items():
      for name in ("down", "up"):
        if rtol:
          np.testing.assert_allclose(got[component][layer][name], factors[name], rtol=rtol, atol=0)
        else:
          np.testing.assert_array_equal(got[component][layer][name], factors[name])


# ------------------------------------------------------------------------------------
# Fixtures: built once per module.

@pytest.fixture(scope="module")
def work(tmp_path_factory):
  return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def abstract(tiny_model):
  return jax.eval_shape(lambda p: p, tiny_model[1])


@pytest.fixture(scope="module")
def sources(tiny_model, tiny_lidb, work):
  """{case: (hdb-jax file, LoRA pytree)}: a LiDB file (rank 1, nonzero D_train and U_train
  on the default targets) and an hdb-lora file with ranks 1-3 on every dense layer."""
  spec, _ = tiny_lidb
  train = lidb.init(spec, jax.random.key(3))
  train = jax.tree_util.tree_map(
      lambda x: np.asarray(x + 0.3 * jax.random.normal(jax.random.key(4), x.shape)), train)
  lidb_file = str(work / "lidb.safetensors")
  lidb.save(lidb_file, train, spec, base_fingerprint="test")

  _, params = tiny_model
  rng = np.random.default_rng(0)
  mixed = {}
  for component in ("unet", "text_encoder"):
    for i, (layer, (in_dim, out_dim)) in enumerate(
        params_lib.find_kernels(params[component], ".*").items()):
      rank = 1 + i % 3
      mixed.setdefault(component, {})[layer] = {
          "down": (rng.standard_normal((in_dim, rank)) / np.sqrt(in_dim)).astype(np.float32),
          "up": (0.1 * rng.standard_normal((rank, out_dim))).astype(np.float32)}
  mixed_file = str(work / "mixed.safetensors")
  lora_lib.save(mixed_file, mixed, {"source": "test"})
  return {"lidb": (lidb_file, lora_lib.from_lidb(train, spec)), "mixed": (mixed_file, mixed)}


@pytest.fixture(scope="module")
def exported(sources, work):
  """{(case, format): PyTorch LoRA file}, written by `hdb export`."""
  files = {}
  for case, (source, _) in sources.items():
    for fmt in FORMATS:
      out = str(work / f"{case}_{fmt}.safetensors")
      assert cli.main(["export", "--weights", source, "--format", fmt, "--out", out]) == 0
      files[(case, fmt)] = out
  return files


@pytest.fixture(scope="module")
def pt_dir(work):
  """The tiny base as a diffusers PyTorch folder, written by `hdb export-base`."""
  out = str(work / "pt_base")
  assert cli.main(["export-base", "--config", TINY, "--out", out]) == 0
  with open(os.path.join(out, "unet", "config.json")) as f:
    unet_config = json.load(f)
  # Flax-only keys would make diffusers warn on every load of the exported folder
  assert not {"split_head_dim", "use_memory_efficient_attention"} & set(unet_config)
  return out


@pytest.fixture(scope="module")
def inputs(tiny_model):
  sd, _ = tiny_model
  rng = np.random.default_rng(1)
  return {"ids": sd.tokenize(["a sks face", "a photo of a dog"]),
          "latents": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
          "timesteps": np.array([10, 500], np.int32),
          "context": rng.standard_normal((2, sd.max_length, 32)).astype(np.float32)}


@pytest.fixture(scope="module")
def forward(tiny_model, inputs):
  """params -> (text encoder out [B, L, D], UNet out [B, C, h, w]) in hdb-jax (jitted once)."""
  sd, _ = tiny_model
  encode, predict = jax.jit(sd.encode_text), jax.jit(sd.predict)

  def run(p):
    return (np.asarray(encode(p["text_encoder"], jnp.asarray(inputs["ids"]))),
            np.asarray(predict(p["unet"], jnp.asarray(inputs["latents"]),
                               jnp.asarray(inputs["timesteps"]), jnp.asarray(inputs["context"]))))
  return run


@pytest.fixture(scope="module")
def jax_outputs(tiny_model, sources, forward):
  """{"base" | case: (text encoder out [B, L, D], UNet out [B, C, h, w])} in hdb-jax."""
  _, params = tiny_model
  outputs = {"base": forward(params)}
  for case, (_, lora) in sources.items():
    outputs[case] = forward(lora_lib.merge(params, lora))
  return outputs


def _torch_outputs(text_encoder, unet, inputs):
  with torch.no_grad():
    text = text_encoder(torch.from_numpy(inputs["ids"])).last_hidden_state.numpy()
    eps = unet(torch.from_numpy(inputs["latents"]), torch.from_numpy(inputs["timesteps"]).long(),
               encoder_hidden_states=torch.from_numpy(inputs["context"])).sample.numpy()
  return text, eps


def _pipeline(pt_dir):
  from diffusers import StableDiffusionPipeline
  return StableDiffusionPipeline.from_pretrained(pt_dir, safety_checker=None)


# ------------------------------------------------------------------------------------
# PyTorch numbers

def test_base_export_runs_in_pytorch(pt_dir, jax_outputs, inputs, tiny_model):
  pipe = _pipeline(pt_dir)
  got = _torch_outputs(pipe.text_encoder, pipe.unet, inputs)
  diffs = [float(np.abs(g - w).max()) for g, w in zip(got, jax_outputs["base"])]
  print(f"\nbase: max |PyTorch - JAX| text encoder {diffs[0]:.2e}, UNet {diffs[1]:.2e}")
  assert max(diffs) < ATOL
  # The folder holds PyTorch weights only, and loads back into hdb-jax exactly.
  assert os.path.exists(os.path.join(pt_dir, "unet", "diffusion_pytorch_model.safetensors"))
  assert not os.path.exists(os.path.join(pt_dir, "unet", "diffusion_flax_model.msgpack"))
  _, loaded = models.load(pt_dir)
  for component in ("unet", "text_encoder"):
    for (path, a), b in zip(params_lib.flatten(loaded[component]).items(),
                            params_lib.flatten(tiny_model[1][component]).values()):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", CASES)
def test_pipeline_load_lora_weights_matches_jax(case, fmt, pt_dir, exported,
                                                jax_outputs, inputs):
  pipe = _pipeline(pt_dir)
  pipe.load_lora_weights(exported[(case, fmt)])
  got = _torch_outputs(pipe.text_encoder, pipe.unet, inputs)
  want = jax_outputs[case]
  diffs = [float(np.abs(g - w).max()) for g, w in zip(got, want)]
  effects = [float(np.abs(w - b).max()) for w, b in zip(want, jax_outputs["base"])]
  print(f"\n{case}/{fmt}: max |PyTorch - JAX| text encoder {diffs[0]:.2e}, UNet {diffs[1]:.2e} "
        f"(LoRA changes them by {effects[0]:.2f}, {effects[1]:.2f})")
  assert min(effects) > MIN_EFFECT
  assert max(diffs) < ATOL


@pytest.mark.parametrize("kwargs", [{"use_safetensors": True}, {}])
def test_unet_load_lora_adapter_matches_jax(kwargs, pt_dir, exported, jax_outputs, inputs):
  """The UNet alone, through `load_lora_adapter` (PEFT file with per-layer ranks 1-3).

  diffusers reads the file's lora_adapter_metadata here only with use_safetensors=True (or
  weight_name). Without it, diffusers 0.42 takes alpha = r for every module (scale 1, as
  the file means); diffusers 0.39 took one alpha for all and scaled such files wrongly.
  docs/pytorch.md says so."""
  from diffusers import UNet2DConditionModel
  from transformers import CLIPTextModel
  unet = UNet2DConditionModel.from_pretrained(os.path.join(pt_dir, "unet"))
  unet.load_lora_adapter(exported[("mixed", "peft")], prefix="unet", **kwargs)
  text_encoder = CLIPTextModel.from_pretrained(os.path.join(pt_dir, "text_encoder"))
  _, eps = _torch_outputs(text_encoder, unet, inputs)
  diff = float(np.abs(eps - jax_outputs["mixed"][1]).max())
  print(f"\nmixed/peft via unet.load_lora_adapter({kwargs}): max |PyTorch - JAX| UNet {diff:.2e}")
  assert diff < ATOL


def _metadata(path):
  with safetensors.safe_open(path, "np") as f:
    return dict(f.metadata())


def _respell(tensors, old, new):
  """`tensors` with `old` replaced by `new` at the start of every key that has it."""
  return {new + key[len(old):] if key.startswith(old) else key: value
          for key, value in tensors.items()}


def test_exports_carry_the_base_their_file_was_made_for(exported):
  """`hdb export` takes no base to check against: the LiDB file's base fingerprint goes
  into every exported file's metadata, for the tool that loads it."""
  for fmt in FORMATS:
    assert _metadata(exported[("lidb", fmt)])["hdb_base_fingerprint"] == "test"
    assert _metadata(exported[("mixed", fmt)])["hdb_base_fingerprint"] == ""  # none recorded


def _rooted_adapter_metadata(metadata):
  """The text encoder's target_modules / rank_pattern / alpha_pattern as a tool working on
  transformers 4's module tree writes them: `text_model.encoder.layers...`."""
  adapter = json.loads(metadata["lora_adapter_metadata"])
  adapter["text_encoder.target_modules"] = [
      "text_model." + m for m in adapter["text_encoder.target_modules"]]
  for key in ("text_encoder.rank_pattern", "text_encoder.alpha_pattern"):
    adapter[key] = {r"text_model\." + pattern: v for pattern, v in adapter[key].items()}
  return {**metadata, "lora_adapter_metadata": json.dumps(adapter)}


def test_text_encoder_names_with_and_without_the_text_model_root(
    exported, sources, abstract, work, pt_dir, jax_outputs, inputs):
  """`hdb export` writes the text encoder's keys with the `text_model.` root (checkpoint
  names; transformers 4 loads only these) and its PEFT targets without it (transformers 5's
  modules). Imports read both spellings alike: PEFT `text_encoder.encoder.layers...` (what
  diffusers / PEFT save with transformers 5), kohya `lora_te_encoder_...`, and metadata
  patterns written for transformers 4's tree (`text_model\\.encoder...`); diffusers 0.42
  loads the unrooted files to the same numbers."""
  want = sources["mixed"][1]   # ranks 1-3: the text encoder has rank / alpha patterns
  peft_file, kohya_file = exported[("mixed", "peft")], exported[("mixed", "kohya")]
  peft, kohya = (safetensors.numpy.load_file(path) for path in (peft_file, kohya_file))
  text_keys = [k for k in peft if k.startswith("text_encoder.")]
  assert text_keys and all(k.startswith("text_encoder.text_model.encoder.layers.")
                           for k in text_keys)
  adapter = json.loads(_metadata(peft_file)["lora_adapter_metadata"])
  assert adapter["text_encoder.alpha_pattern"] and all(
      m.startswith("encoder.layers.") for m in adapter["text_encoder.target_modules"])

  variants = {  # name: (tensors, metadata, loads in diffusers 0.42)
      "peft_unrooted": (_respell(peft, "text_encoder.text_model.", "text_encoder."),
                        _metadata(peft_file), True),
      "peft_rooted_patterns": (peft, _rooted_adapter_metadata(_metadata(peft_file)), False),
      "kohya_unrooted": (_respell(kohya, "lora_te_text_model_", "lora_te_"),
                         _metadata(kohya_file), True)}
  for name, (tensors, metadata, in_diffusers) in variants.items():
    path = str(work / f"spelling_{name}.safetensors")
    safetensors.numpy.save_file(tensors, path, metadata=metadata)
    imported = convert_import.load(path, abstract)
    assert imported.format == name.partition("_")[0]
    _assert_lora_equal(imported.lora, want, rtol=1e-6 if name.startswith("kohya") else 0)
    if in_diffusers:
      pipe = _pipeline(pt_dir)
      pipe.load_lora_weights(path)
      got = _torch_outputs(pipe.text_encoder, pipe.unet, inputs)
      diffs = [float(np.abs(g - w).max()) for g, w in zip(got, jax_outputs["mixed"])]
      print(f"\n{name}: max |PyTorch - JAX| text encoder {diffs[0]:.2e}, UNet {diffs[1]:.2e}")
      assert max(diffs) < ATOL


# ------------------------------------------------------------------------------------
# Files that users have: diffusers' training-script format, its old attention-processor
# format, and LoRAs on layers hdb-jax cannot apply (LoCon). Each file is made the way its
# users make it, loaded with diffusers, and compared with the hdb-jax import merged in JAX.

# diffusers' UNet / CLIP attention projections under their old attention-processor names.
_OLD_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out",
              "q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
_DIFFUSERS_ATTENTION_KEY = re.compile(
    r"^(?P<prefix>unet\.|text_encoder\.|)(?P<parent>.+)\.(?P<projection>to_q|to_k|to_v|to_out\.0|"
    r"q_proj|k_proj|v_proj|out_proj)\.(?:lora|lora_linear_layer)\.(?P<factor>down|up)\.weight$")


def _randomize_lora_(model, seed):
  """PEFT initializes B = 0; give every LoRA factor random values instead (in place)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ".lora_A." in name:
        p.copy_(torch.randn(p.shape, generator=generator) / np.sqrt(p[0].numel()))
      elif ".lora_B." in name:
        p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def _old_format(tensors, prefixed=True):
  """diffusers-format attention LoRAs -> the old attention-processor keys (UNet:
  `<attention>.processor.to_q_lora.down.weight`, text encoder: `<self_attn>.to_q_lora…`);
  other layers are dropped (that format had none). Unprefixed: the UNet alone, as
  `unet.save_attn_procs` wrote it."""
  old = {}
  for key, value in tensors.items():
    match = _DIFFUSERS_ATTENTION_KEY.match(key)
    if match is None or (not prefixed and match.group("prefix") != "unet."):
      continue
    processor = ".processor" if match.group("prefix") == "unet." else ""
    prefix = match.group("prefix") if prefixed else ""
    old[f"{prefix}{match.group('parent')}{processor}.{_OLD_NAMES[match.group('projection')]}"
        f"_lora.{match.group('factor')}.weight"] = value
  return old


@pytest.fixture(scope="module")
def user_files(pt_dir, work):
  """{name: PyTorch LoRA file} as users have them (each loads in diffusers):

  "diffusers": a PEFT LoRA on the tiny pipeline's UNet (attention + ff.net.2, r 2,
  lora_alpha 4 and 1 for ff.net.2) and text encoder (attention + fc1, r 4, lora_alpha 6,
  rsLoRA), saved like diffusers' training scripts: `convert_state_dict_to_diffusers(
  get_peft_model_state_dict(model))`, `save_lora_weights`, no adapter metadata (diffusers
  then takes lora_alpha = r); with transformers 5 the text encoder's keys have no
  `text_model.` root (`text_encoder.encoder.layers.0...`). "diffusers_alpha": the same
  with the adapters' configs as metadata (`<model>_lora_adapter_metadata`), so diffusers
  scales by lora_alpha / r (UNet, ff.net.2 by its alpha_pattern) and lora_alpha / sqrt(r)
  (text encoder).
  "diffusers-old": the attention LoRAs written by hand with the old attention-processor
  keys; "diffusers-old-unet": the UNet part without prefix (`unet.save_attn_procs`).
  """
  from diffusers.utils import convert_state_dict_to_diffusers
  from peft import LoraConfig, get_peft_model_state_dict
  pipe = _pipeline(pt_dir)
  pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, alpha_pattern={"ff.net.2": 1},
                                   target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]))
  pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=[
      "q_proj", "k_proj", "v_proj", "out_proj", "fc1"]))
  _randomize_lora_(pipe.unet, 0)
  _randomize_lora_(pipe.text_encoder, 1)
  layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
            for name, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))}
  configs = {f"{name}_lora_adapter_metadata": model.peft_config["default"].to_dict()
             for name, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))}
  pipe.save_lora_weights(str(work), weight_name="diffusers.safetensors", **layers)
  pipe.save_lora_weights(str(work), weight_name="diffusers_alpha.safetensors", **layers, **configs)
  files = {name: str(work / f"{name}.safetensors") for name in ("diffusers", "diffusers_alpha")}
  tensors = safetensors.numpy.load_file(files["diffusers"])
  for name, prefixed in (("diffusers-old", True), ("diffusers-old-unet", False)):
    files[name] = str(work / f"{name}.safetensors")
    safetensors.numpy.save_file(_old_format(tensors, prefixed), files[name])
  return files


def _compare(name, got, want, base):
  """max |PyTorch - JAX| per output (and the LoRA's effect), printed and checked."""
  diffs = [float(np.abs(g - w).max()) for g, w in zip(got, want)]
  effects = [float(np.abs(w - b).max()) for w, b in zip(want, base)]
  print(f"\n{name}: max |PyTorch - JAX| " + ", ".join(
      f"{part} {d:.2e} (LoRA changes it by {e:.2f})"
      for part, d, e in zip(("text encoder", "UNet"), diffs, effects)))
  assert min(effects) > MIN_EFFECT
  assert max(diffs) < ATOL


@pytest.mark.parametrize("name", ["diffusers", "diffusers_alpha", "diffusers-old"])
def test_import_of_diffusers_files_matches_load_lora_weights(name, user_files, pt_dir, abstract,
                                                             tiny_model, forward, jax_outputs,
                                                             inputs):
  tensors = safetensors.numpy.load_file(user_files[name])
  if name != "diffusers-old":   # both spellings of diffusers
    assert any(k.endswith(".lora.down.weight") for k in tensors)
    assert any(".lora_linear_layer." in k for k in tensors)
  imported = convert_import.load(user_files[name], abstract)
  assert imported.format == name.partition("_")[0] and imported.skipped == ()
  assert sum(len(layers) for layers in imported.lora.values()) == len(tensors) // 2

  pipe = _pipeline(pt_dir)
  pipe.load_lora_weights(user_files[name])
  got = _torch_outputs(pipe.text_encoder, pipe.unet, inputs)
  want = forward(lora_lib.merge(tiny_model[1], imported.lora))
  _compare(name, got, want, jax_outputs["base"])


def test_import_of_attention_processor_files_matches_load_lora_adapter(
    user_files, pt_dir, abstract, tiny_model, forward, jax_outputs, inputs):
  """The unprefixed UNet file of `unet.save_attn_procs`. diffusers 0.42's `load_attn_procs`
  reads Custom Diffusion files only; `unet.load_lora_adapter(file, prefix=None)` converts
  this format (`convert_unet_state_dict_to_peft`)."""
  from diffusers import UNet2DConditionModel
  imported = convert_import.load(user_files["diffusers-old-unet"], abstract)
  assert imported.format == "diffusers-old" and set(imported.lora) == {"unet"}
  unet = UNet2DConditionModel.from_pretrained(os.path.join(pt_dir, "unet"))
  unet.load_lora_adapter(user_files["diffusers-old-unet"], prefix=None)
  _, eps = _torch_outputs(_pipeline(pt_dir).text_encoder, unet, inputs)
  _, want = forward(lora_lib.merge(tiny_model[1], imported.lora))
  diff = float(np.abs(eps - want).max())
  print(f"\ndiffusers-old, UNet only, via unet.load_lora_adapter: max |PyTorch - JAX| UNet "
        f"{diff:.2e}")
  assert float(np.abs(want - jax_outputs["base"][1]).max()) > MIN_EFFECT
  assert diff < ATOL


def _with_convolutions(tensors, fmt):
  """`tensors` plus rank-2 LoRAs on a 3x3 and a 1x1 convolution of the tiny UNet, in the
  file's format (kohya: LoCon keys, with alpha 1) -> (tensors, name of the 3x3 module as
  the refusal lists it, the 1x1 module's (Flax layer, down [r, in, 1, 1], up [out, r, 1, 1]))."""
  rng = np.random.default_rng(5)
  tensors = dict(tensors)
  for module, kernel in (("down_blocks.0.resnets.0.conv1", 3),
                         ("down_blocks.0.attentions.0.proj_in", 1)):
    down = rng.standard_normal((2, 32, kernel, kernel)).astype(np.float32)   # [r, in, kh, kw]
    up = rng.standard_normal((32, 2, 1, 1)).astype(np.float32)               # [out, r, 1, 1]
    if fmt == "kohya":
      name = "lora_unet_" + module.replace(".", "_")
      tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                      f"{name}.alpha": np.asarray(1.0, np.float32)})
    else:
      name = "unet." + module
      tensors.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
    if kernel == 3:
      refused = f"{name} (3x3 convolution)"
    else:
      conv_1x1 = ("down_blocks_0/attentions_0/proj_in", down, up)
  return tensors, refused, conv_1x1


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_3x3_convolution_loras_are_refused_by_name_or_skipped(fmt, exported, user_files,
                                                              abstract, work, capsys, caplog):
  """A LoCon file: its 3x3 convolution is refused (or skipped), its 1x1 one imported."""
  source = exported[("lidb", "kohya")] if fmt == "kohya" else user_files["diffusers"]
  tensors, refused, (conv_layer, down, up) = _with_convolutions(
      safetensors.numpy.load_file(source), fmt)
  path = str(work / f"locon_{fmt}.safetensors")
  safetensors.numpy.save_file(tensors, path)

  with pytest.raises(ValueError) as info:
    convert_import.load(path, abstract)
  message = str(info.value)
  assert path in message and "1 LoRA module(s) on layers hdb-jax cannot apply" in message
  assert refused in message and "--skip-unsupported" in message and "proj_in" not in message

  # Skipped: the rest is exactly the file without the 3x3 LoRA (the 1x1 one imported,
  # kohya's alpha 1 / r 2 folded into `up`).
  imported = convert_import.load(path, abstract, skip_unsupported=True)
  assert imported.skipped == (refused,) and imported.format == fmt
  want = convert_import.load(source, abstract).lora
  scale = 0.5 if fmt == "kohya" else 1.0
  want["unet"][conv_layer] = {"down": down.transpose(2, 3, 1, 0),             # [1, 1, in, r]
                              "up": scale * up.transpose(2, 3, 1, 0)}         # [1, 1, r, out]
  _assert_lora_equal(imported.lora, want)
  with caplog.at_level("WARNING"):
    lora, _ = convert.load(path, abstract, skip_unsupported=True)
  assert f"{path}: skipped 1 LoRA module(s)" in caplog.text
  _assert_lora_equal(lora, imported.lora)

  out = str(work / f"locon_{fmt}_hdb.safetensors")
  code, _, err = _run(capsys, "import", "--lora", path, "--config", TINY, "--out", out)
  assert code == 1 and path in err and refused in err and not os.path.exists(out)
  code, stdout, err = _run(capsys, "import", "--lora", path, "--config", TINY, "--out", out,
                           "--skip-unsupported")
  assert code == 0, err
  assert "hdb import: skipped 1 LoRA module(s)" in err and refused in err
  assert json.loads(stdout)["skipped_unsupported"] == [refused]
  assert lora_lib.load(out)[1]["skipped_unsupported"] == "1"
  _assert_lora_equal(lora_lib.load(out)[0], imported.lora)


# kohya's default SD1.x LoRA also trains the 1x1 convolutions proj_in / proj_out of every
# transformer block (LoCon adds the resnets' 1x1 conv_shortcut): dense layers on the channels.
_CONV_1X1 = ("proj_in", "proj_out", "conv_shortcut")


def _kohya_from_peft(state, prefix, alpha_of):
  """A PEFT state dict ({"<module>.lora_A.weight": [r, in(, 1, 1)], ...}, torch) -> kohya
  tensors as kohya sd-scripts names them (`lora_unet_<module, dots as _>.lora_down.weight`,
  `.lora_up.weight`, `.alpha` = `alpha_of(module)`)."""
  tensors = {}
  for key, value in state.items():
    module, _, factor = key.rpartition(".lora_")
    name = prefix + module.replace(".", "_")
    part = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[factor]
    tensors[f"{name}.{part}"] = value.detach().numpy().astype(np.float32)
    tensors[f"{name}.alpha"] = np.asarray(alpha_of(module), np.float32)
  return tensors


@pytest.fixture(scope="module")
def conv_files(pt_dir, work):
  """{"kohya" | "peft": file} of one LoRA with 1x1 convolutions, as users have them.

  PEFT adapters on the tiny pipeline with random factors: UNet attention at r 2 and its
  1x1 convolutions (every proj_in / proj_out at r 3 by rank_pattern, conv_shortcut at r 2),
  text encoder attention at r 2; so the convolution factors are [r, in, 1, 1] and
  [out, r, 1, 1]. "kohya": saved in kohya's names with per-module alphas (1 for the
  attention, kohya's default network_alpha; 2 for the convolutions). "peft": saved with
  `save_lora_weights` and the adapters' configs as metadata (UNet lora_alpha 4).
  """
  from peft import LoraConfig, get_peft_model_state_dict
  pipe = _pipeline(pt_dir)
  pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, rank_pattern={"proj_in": 3, "proj_out": 3},
                                   target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                   *_CONV_1X1]))
  pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=[
      "q_proj", "k_proj", "v_proj", "out_proj"]))
  _randomize_lora_(pipe.unet, 6)
  _randomize_lora_(pipe.text_encoder, 7)
  states = {name: get_peft_model_state_dict(model)
            for name, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))}
  assert states["unet"]["down_blocks.0.attentions.0.proj_in.lora_A.weight"].shape == (3, 32, 1, 1)
  files = {fmt: str(work / f"conv_{fmt}.safetensors") for fmt in ("kohya", "peft")}
  kohya = {}
  for name, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
    kohya.update(_kohya_from_peft(states[name], prefix,
                                  lambda module: 2.0 if module.endswith(_CONV_1X1) else 1.0))
  safetensors.numpy.save_file(kohya, files["kohya"])
  pipe.save_lora_weights(str(work), weight_name=os.path.basename(files["peft"]),
                         unet_lora_layers=states["unet"],
                         text_encoder_lora_layers=states["text_encoder"],
                         unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
                         text_encoder_lora_adapter_metadata=(
                             pipe.text_encoder.peft_config["default"].to_dict()))
  return files


def _dense_part(lora):
  """The LoRA without its 1x1 convolutions."""
  return {component: {layer: f for layer, f in layers.items() if np.ndim(f["down"]) == 2}
          for component, layers in lora.items()}


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_import_of_1x1_convolution_loras_matches_load_lora_weights(
    fmt, conv_files, pt_dir, abstract, tiny_model, forward, jax_outputs, inputs):
  imported = convert_import.load(conv_files[fmt], abstract)
  assert imported.format == fmt and imported.skipped == ()
  conv_layers = {layer: shape for layer, shape in lora_lib.layer_shapes(imported.lora)["unet"].items()
                 if len(shape) == 4}
  # Every 1x1 convolution of the tiny UNet (4 transformer blocks' proj_in / proj_out and
  # 5 conv_shortcut), with its kernel's shape.
  assert conv_layers == {layer: shape for layer, shape in
                         lora_lib.changeable_kernels(abstract["unet"]).items() if len(shape) == 4}
  assert len(conv_layers) == 13 and all(layer.endswith(_CONV_1X1) for layer in conv_layers)
  proj_in = imported.lora["unet"]["down_blocks_0/attentions_0/proj_in"]
  assert proj_in["down"].shape == (1, 1, 32, 3) and proj_in["up"].shape == (1, 1, 3, 32)

  pipe = _pipeline(pt_dir)
  pipe.load_lora_weights(conv_files[fmt])
  got = _torch_outputs(pipe.text_encoder, pipe.unet, inputs)
  want = forward(lora_lib.merge(tiny_model[1], imported.lora))
  _compare(f"{fmt} with 1x1 convolution LoRAs", got, want, jax_outputs["base"])
  # The convolutions' part matters: without it the UNet's output is far from diffusers'.
  _, without = forward(lora_lib.merge(tiny_model[1], _dense_part(imported.lora)))
  conv_effect = float(np.abs(want[1] - without).max())
  print(f"{fmt}: the 1x1 convolution LoRAs alone change the UNet output by {conv_effect:.2f}")
  assert conv_effect > MIN_EFFECT


def test_1x1_convolution_loras_round_trip_through_hdb_import_and_export(
    conv_files, pt_dir, abstract, tiny_model, forward, jax_outputs, inputs, capsys, work):
  """kohya file -> `hdb import` -> `hdb export` (kohya, peft): 4-D PyTorch factors, the same
  LoRA when imported again, and diffusers' outputs equal the JAX merge."""
  imported = str(work / "conv_imported.safetensors")
  code, out, err = _run(capsys, "import", "--lora", conv_files["kohya"], "--config", TINY,
                        "--out", imported)
  assert code == 0 and json.loads(out)["skipped_unsupported"] == [], err
  lora, _ = lora_lib.load(imported)
  _assert_lora_equal(lora, convert_import.load(conv_files["kohya"], abstract).lora)
  want = forward(lora_lib.merge(tiny_model[1], lora))

  module = "down_blocks.0.attentions.0.proj_in"
  for fmt in FORMATS:
    again = str(work / f"conv_again_{fmt}.safetensors")
    assert _run(capsys, "export", "--weights", imported, "--format", fmt, "--out", again)[0] == 0
    tensors = safetensors.numpy.load_file(again)
    down, up = ((f"unet.{module}.lora_A.weight", f"unet.{module}.lora_B.weight") if fmt == "peft"
                else tuple(f"lora_unet_{module.replace('.', '_')}.lora_{f}.weight"
                           for f in ("down", "up")))
    assert tensors[down].shape == (3, 32, 1, 1) and tensors[up].shape == (32, 3, 1, 1)
    got, detected = convert.load(again, abstract)
    assert detected == fmt
    # kohya: one alpha (2, the most common rank) for the file; rank-3 layers carry 3 / 2.
    _assert_lora_equal(got, lora, rtol=1e-6 if fmt == "kohya" else 0)

    pipe = _pipeline(pt_dir)
    pipe.load_lora_weights(again)
    with capsys.disabled():   # the measured differences, not read by the next `_run`
      _compare(f"kohya with 1x1 convolutions -> hdb import -> hdb export {fmt}",
               _torch_outputs(pipe.text_encoder, pipe.unet, inputs), want, jax_outputs["base"])


def test_the_side_path_refuses_loras_on_convolutions(tiny_model, inputs):
  """Training's low-rank side path applies residuals to nn.Dense layers only: a LoRA with a
  1x1 convolution is refused by name, not silently left out (`lora.merge` applies it)."""
  from hdb_jax import preopt
  sd, params = tiny_model
  layer = "down_blocks_0/attentions_0/proj_in"
  conv = {"unet": {layer: {"down": np.ones((1, 1, 32, 1), np.float32),
                           "up": np.ones((1, 1, 1, 32), np.float32)}}}
  with pytest.raises(ValueError, match=f"layer '{layer}' is a Conv, not an nn.Dense.*lora.merge"):
    with preopt.low_rank_side_path(conv):
      # A new function: traced here, with the interceptor (not a cached trace of sd.predict).
      jax.eval_shape(lambda *args: sd.predict(*args), params["unet"], inputs["latents"],
                     inputs["timesteps"], inputs["context"])


def test_lora_on_a_1x1_convolution_merges_into_its_kernel(tiny_model, abstract, work):
  _, params = tiny_model
  layer = "mid_block/attentions_0/proj_out"                          # kernel [1, 1, 64, 64]
  rng = np.random.default_rng(8)
  down = rng.standard_normal((1, 1, 64, 2)).astype(np.float32)
  up = rng.standard_normal((1, 1, 2, 64)).astype(np.float32)
  conv = {"unet": {layer: {"down": down, "up": up}}}
  lora_lib.check(conv)
  lora_lib.check_base(conv, abstract)
  assert lora_lib.layer_shapes(conv) == {"unet": {layer: (1, 1, 64, 64)}}
  assert lora_lib.ranks(conv) == {"unet": {layer: 2}}

  kernel = np.asarray(params_lib.flatten(params["unet"])[layer + "/kernel"])
  want = kernel + 0.5 * (down[0, 0] @ up[0, 0])[None, None]
  merged = jax.jit(lora_lib.merge, static_argnums=2)(params, conv, 0.5)
  np.testing.assert_allclose(params_lib.flatten(merged["unet"])[layer + "/kernel"], want,
                             atol=1e-6)
  stacked = lora_lib.concat([conv, conv], [1.0, -0.5])
  assert lora_lib.ranks(stacked)["unet"][layer] == 4
  np.testing.assert_allclose(params_lib.flatten(lora_lib.merge(params, stacked)["unet"])[
      layer + "/kernel"], want, atol=1e-6)
  path = str(work / "conv_1x1.safetensors")
  lora_lib.save(path, stacked)
  _assert_lora_equal(lora_lib.load(path)[0], stacked)

  # Dense factors never land on a convolution, nor the other way round.
  dense = "mid_block/attentions_0/transformer_blocks_0/attn1/to_q"  # kernel [64, 64]
  for wrong, message in (
      ({layer: {"down": down[0, 0], "up": up[0, 0]}},
       r"changes a \[64, 64\] kernel; the base model's is \[1, 1, 64, 64\]"),
      ({dense: {"down": down, "up": up}},
       r"changes a \[1, 1, 64, 64\] kernel; the base model's is \[64, 64\]"),
      ({"down_blocks_0/resnets_0/conv1": {"down": np.zeros((1, 1, 32, 2), np.float32),
                                          "up": np.zeros((1, 1, 2, 32), np.float32)}},
       "is not a dense layer or 1x1 convolution")):
    with pytest.raises(ValueError, match=message):
      lora_lib.check_base({"unet": wrong}, abstract)
  for down_shape, up_shape in (((1, 1, 64, 2), (2, 64)), ((3, 3, 64, 2), (3, 3, 2, 64))):
    with pytest.raises(ValueError, match=r"or \[1, 1, in, r\] and \[1, 1, r, out\]"):
      lora_lib.check({"unet": {layer: {"down": np.zeros(down_shape), "up": np.zeros(up_shape)}}})


def test_detect_format():
  detect = convert_import.detect_format
  assert detect({"unet.a.to_q.lora_A.weight": 0}, {}) == "peft"
  assert detect({"unet.a.to_q.lora.down.weight": 0, "unet.b.lora_A.weight": 0}, {}) == "diffusers"
  assert detect({"text_encoder.a.q_proj.lora_linear_layer.up.weight": 0}, {}) == "diffusers"
  assert detect({"a.attn1.processor.to_out_lora.up.weight": 0}, {}) == "diffusers-old"
  assert detect({"lora_unet_a.lora_down.weight": 0, "lora_te_b.alpha": 0}, {}) == "kohya"
  assert detect({"x": 0}, {"format": "hdb-lora"}) == "hdb-lora"
  with pytest.raises(ValueError, match="not a LoRA file of a known format"):
    detect({"model.diffusion_model.input_blocks.0.0.weight": 0}, {})


# ------------------------------------------------------------------------------------
# Files and names

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", CASES)
def test_import_of_export_is_identity(case, fmt, sources, exported, abstract):
  got, detected = convert.load(exported[(case, fmt)], abstract)
  assert detected == fmt
  # kohya has one alpha per file: layers of another rank carry r / alpha in `up`.
  _assert_lora_equal(got, sources[case][1], rtol=1e-6 if (case, fmt) == ("mixed", "kohya") else 0)


def test_file_contents(exported):
  tensors = safetensors.numpy.load_file(exported[("lidb", "peft")])
  with open(exported[("lidb", "peft")], "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
  key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
  assert tensors[key + ".lora_A.weight"].shape == (1, 32)    # [r, in]
  assert tensors[key + ".lora_B.weight"].shape == (32, 1)    # [out, r]
  assert "text_encoder.text_model.encoder.layers.1.self_attn.v_proj.lora_A.weight" in tensors
  adapter = json.loads(header["lora_adapter_metadata"])
  assert adapter["unet.r"] == adapter["unet.lora_alpha"] == 1
  assert key[len("unet."):] in adapter["unet.target_modules"]
  # Targets are module names of transformers 5 (no `text_model.`); PEFT matches them as
  # suffixes of transformers 4's names too.
  assert "encoder.layers.1.self_attn.v_proj" in adapter["text_encoder.target_modules"]
  assert not any(m.startswith("text_model.") for m in adapter["text_encoder.target_modules"])
  assert header["format"] == "pt" and header["hdb_source"] == "lidb.safetensors"

  tensors = safetensors.numpy.load_file(exported[("mixed", "kohya")])
  name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
  assert {name + ".lora_down.weight", name + ".lora_up.weight", name + ".alpha"} <= set(tensors)
  assert "lora_unet_time_embedding_linear_1.lora_down.weight" in tensors
  assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj.alpha" in tensors
  alphas = {float(v) for k, v in tensors.items() if k.endswith(".alpha")}
  assert len(alphas) == 1


def test_cli_roundtrip(capsys, sources, exported, pt_dir, work):
  """kohya -> `hdb import` -> hdb-lora == the LiDB's LoRA; `hdb export` of it == export of the LiDB."""
  imported = str(work / "imported.safetensors")
  code, out, err = _run(capsys, "import", "--lora", exported[("lidb", "kohya")],
                        "--config", TINY, "--out", imported)
  assert code == 0, err
  assert json.loads(out)["source_format"] == "kohya"
  got, metadata = lora_lib.load(imported)
  assert metadata["format"] == "hdb-lora" and metadata["source_format"] == "kohya"
  _assert_lora_equal(got, sources["lidb"][1])

  again = str(work / "again_peft.safetensors")
  assert _run(capsys, "export", "--weights", imported, "--format", "peft", "--out", again)[0] == 0
  first, second = (safetensors.numpy.load_file(p) for p in (exported[("lidb", "peft")], again))
  assert first.keys() == second.keys()
  for key in first:
    np.testing.assert_array_equal(first[key], second[key])

  # hdb-jax files import too (checked against the base).
  from_lidb_file = str(work / "imported_lidb.safetensors")
  code, out, err = _run(capsys, "import", "--lora", sources["lidb"][0], "--config", TINY,
                        "--out", from_lidb_file)
  assert code == 0 and json.loads(out)["source_format"] == "hdb-lidb", err
  _assert_lora_equal(lora_lib.load(from_lidb_file)[0], sources["lidb"][1])

  # The base from a model folder (its config files; no weights read).
  from_folder = str(work / "imported_from_folder.safetensors")
  code, _, err = _run(capsys, "import", "--lora", exported[("mixed", "peft")], "--config", TINY,
                      "--set", f"model.path={pt_dir}", "--out", from_folder)
  assert code == 0, err
  _assert_lora_equal(lora_lib.load(from_folder)[0], sources["mixed"][1])


def test_torch_names():
  assert (convert.torch_module("unet", "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_out_0")
          == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0")
  assert convert.torch_module("unet", "time_embedding/linear_1") == "time_embedding.linear_1"
  assert (convert.torch_module("text_encoder", "text_model/encoder/layers/0/self_attn/q_proj")
          == "text_model.encoder.layers.0.self_attn.q_proj")
  for spelling in ("text_model.encoder.layers.0.mlp.fc1", "encoder.layers.0.mlp.fc1"):
    assert convert.module_name("text_encoder", spelling) == "encoder.layers.0.mlp.fc1"
  assert convert.file_spellings("text_encoder", "encoder.layers.0.mlp.fc1") == (
      "text_model.encoder.layers.0.mlp.fc1", "encoder.layers.0.mlp.fc1")
  assert convert.module_name("unet", "mid_block.attentions.0.proj_in") == \
      "mid_block.attentions.0.proj_in"
  assert convert.file_spellings("unet", "conv_in") == ("conv_in",)
  assert (convert.kohya_name("unet", "mid_block/attentions_0/transformer_blocks_0/attn2/to_k")
          == "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k")


@pytest.mark.parametrize("config", ["tiny.py", "sd15.py"])
def test_torch_names_are_the_pytorch_linear_layers(config):
  """Every dense layer's name is a torch.nn.Linear of the PyTorch model and back (SD1.5: 184
  UNet + 72 CLIP layers), every other layer's a Conv2d; LoRAs apply to the Linear layers and
  the 1x1 Conv2d (SD1.5: 16 proj_in, 16 proj_out, 14 conv_shortcut) (architecture only,
  PyTorch modules on the meta device). Names are those of current diffusers / transformers'
  `named_modules()`, which PEFT targets (transformers 5: no `text_model.` root)."""
  from diffusers import UNet2DConditionModel
  from transformers import CLIPTextConfig, CLIPTextModel
  from hdb_jax import config_file
  model_cfg = config_file.load(os.path.join(REPO, "configs", config)).model
  _, abstract_params = models.from_config(model_cfg, tokenizer=None)
  names = convert.torch_names(abstract_params)  # checks each name with hdb_jax/nn/torch_keys.py
  with torch.device("meta"):
    torch_models = {"unet": UNet2DConditionModel(**dict(model_cfg.unet)),
                    "text_encoder": CLIPTextModel(CLIPTextConfig(**dict(model_cfg.text_encoder)))}
  for component, model in torch_models.items():
    linear = {n: tuple(m.weight.shape) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    assert {n: (out_dim, in_dim) for n, (_, (in_dim, out_dim)) in names[component].items()} == linear
    # Imports apply LoRAs to the Linear layers and the 1x1 convolutions (all of stride 1:
    # dense layers on the channels), with their Flax kernel shapes; they refuse (or skip)
    # exactly the other convolutions.
    conv = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    conv_1x1 = {n: (1, 1, m.in_channels, m.out_channels) for n, m in conv.items()
                if m.kernel_size == (1, 1)}
    assert all(conv[n].stride == (1, 1) and conv[n].padding == (0, 0) for n in conv_1x1)
    assert {n: shape for n, (_, shape) in convert_import.lora_layers(abstract_params)[
        component].items()} == {**{n: (in_dim, out_dim) for n, (out_dim, in_dim) in linear.items()},
                                **conv_1x1}
    assert convert_import.unsupported_layers(abstract_params)[component] == {
        n: f"{m.kernel_size[0]}x{m.kernel_size[1]} convolution" for n, m in conv.items()
        if n not in conv_1x1}
    if component == "unet":   # SD1.x: use_linear_projection=False, proj_in / proj_out are convs
      assert {n.rpartition(".")[2] for n in conv_1x1} == set(_CONV_1X1)
      assert len(conv_1x1) == {"tiny.py": 13, "sd15.py": 46}[config]


def test_lora_merge_concat_and_file(tiny_model, tiny_lidb, sources, work):
  _, params = tiny_model
  spec, aux = tiny_lidb
  train, _, _ = lidb.load(sources["lidb"][0])
  lora = sources["lidb"][1]
  by_lidb = lidb.merge(params, train, aux)
  by_lora = lora_lib.merge(params, lora)
  layer = "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_v"
  np.testing.assert_allclose(params_lib.flatten(by_lora["unet"])[layer + "/kernel"],
                             params_lib.flatten(by_lidb["unet"])[layer + "/kernel"], atol=1e-6)
  assert by_lora["vae"] is params["vae"]

  mixed = sources["mixed"][1]
  stacked = lora_lib.concat([lora, mixed], [1.0, -0.5])
  assert lora_lib.ranks(stacked)["unet"][layer] == 1 + lora_lib.ranks(mixed)["unet"][layer]
  want = lora_lib.merge(lora_lib.merge(params, lora), mixed, scale=-0.5)
  got = lora_lib.merge(params, stacked)
  np.testing.assert_allclose(params_lib.flatten(got["unet"])[layer + "/kernel"],
                             params_lib.flatten(want["unet"])[layer + "/kernel"], atol=1e-6)

  path = str(work / "stacked.safetensors")
  lora_lib.save(path, stacked, {"note": "x"})
  got, metadata = lora_lib.load(path)
  _assert_lora_equal(got, stacked)
  assert metadata["note"] == "x" and metadata["format"] == "hdb-lora"


# ------------------------------------------------------------------------------------
# Errors

def _edit(tensors, edit):
  tensors = dict(tensors)
  edit(tensors)
  return tensors


_Q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
_P = "lora_unet_down_blocks_0_attentions_0_proj_in"   # a 1x1 convolution


def _put(key, *shape, value=0.0):
  return lambda t: t.update({key: np.full(shape, value, np.float32)})


def _both(*edits):
  return lambda t: [edit(t) for edit in edits]


def _poke(key, value):
  return lambda t: t[key].__setitem__((0, 0), value)


# problem -> (file format, edit of the exported tensors, expected message)
BAD = {
    "peft_unknown_key": ("peft", _put("vae.encoder.conv_in.lora_A.weight", 1, 3),
                         "unknown key 'vae.encoder.conv_in.lora_A.weight'"),
    "peft_unknown_layer": ("peft", _put("unet.foo.lora_A.weight", 1, 3), "no layer 'foo'"),
    "peft_wrong_shape": ("peft", _put(_Q + ".lora_A.weight", 1, 33),
                         r"shape \(1, 33\), which does not fit"),
    "peft_nan": ("peft", _poke(_Q + ".lora_B.weight", np.nan), "NaN or Inf"),
    "peft_missing_b": ("peft", lambda t: t.pop(_Q + ".lora_B.weight"),
                       r"up factor \(lora_B / lora.up / lora_up\) is missing"),
    "peft_two_spellings": ("peft", _put(_Q + ".lora_linear_layer.up.weight", 32, 1),
                           "are the same factor"),
    "peft_rooted_and_unrooted": ("peft", _put(_Q.replace(".text_model.", ".") + ".lora_B.weight",
                                              32, 1), "are the same factor"),
    "kohya_unknown_key": ("kohya", _put(_K + ".dora_scale", 1), "unknown key"),
    "kohya_unknown_layer": ("kohya", _put("lora_unet_foo_conv.lora_down.weight", 1, 4, 3, 3),
                            "no layer named 'lora_unet_foo_conv'"),
    "kohya_loha": ("kohya", _put(_K + ".hada_w1_a", 32, 1), "LoHa"),
    "kohya_wrong_shape": ("kohya", _put(_K + ".lora_up.weight", 64, 1),
                          r"shape \(64, 1\), which does not fit"),
    "kohya_conv": ("kohya", _put(_K + ".lora_down.weight", 1, 32, 1, 1), "only 2-D"),
    "kohya_dense_on_1x1": ("kohya", _both(_put(_P + ".lora_down.weight", 1, 32),
                                          _put(_P + ".lora_up.weight", 32, 1)),
                           r"is a 1x1 convolution: only \[r, in, 1, 1\] / \[out, r, 1, 1\]"),
    "kohya_3x3_on_1x1": ("kohya", _both(_put(_P + ".lora_down.weight", 1, 32, 3, 3),
                                        _put(_P + ".lora_up.weight", 32, 1, 1, 1)),
                         r"shape \(1, 32, 3, 3\); the base model's layer is a 1x1 convolution"),
    "kohya_inf": ("kohya", _poke(_K + ".lora_down.weight", np.inf), "NaN or Inf"),
    "kohya_rooted_and_unrooted": ("kohya", _put("lora_te_encoder_layers_0_self_attn_q_proj.alpha",
                                                value=1.0), "are the same alpha"),
    "kohya_inf_alpha": ("kohya", _put(_K + ".alpha", value=np.inf), "not finite"),
}


@pytest.mark.parametrize("problem", sorted(BAD))
def test_import_errors(problem, exported, abstract, work):
  fmt, edit, message = BAD[problem]
  tensors = _edit(safetensors.numpy.load_file(exported[("lidb", fmt)]), edit)
  path = str(work / f"bad_{problem}.safetensors")
  safetensors.numpy.save_file(tensors, path)
  with pytest.raises(ValueError, match=message) as info:
    convert.load(path, abstract)
  assert path in str(info.value)


def test_cli_errors(capsys, exported, work):
  out = str(work / "never.safetensors")
  bad = str(work / "bad_peft_nan.safetensors")
  safetensors.numpy.save_file(_edit(safetensors.numpy.load_file(exported[("lidb", "peft")]),
                                    BAD["peft_nan"][1]), bad)
  code, _, err = _run(capsys, "import", "--lora", bad, "--config", TINY, "--out", out)
  assert code == 1 and bad in err and "NaN or Inf" in err
  code, _, err = _run(capsys, "export", "--weights", exported[("lidb", "kohya")], "--format",
                      "peft", "--out", out)
  assert code == 1 and "not an hdb-jax LiDB or LoRA file" in err
  code, _, err = _run(capsys, "export", "--weights", str(work / "missing.safetensors"),
                      "--format", "kohya", "--out", out)
  assert code == 1 and "missing.safetensors: no such file" in err
  code, _, err = _run(capsys, "export-base", "--model", str(work / "no_model"), "--out",
                      str(work / "never_dir"))
  assert code == 1 and "no_model" in err
  assert not os.path.exists(out) and not os.path.exists(str(work / "never_dir"))


def test_export_rejects_non_finite_and_unknown_components(sources, work):
  lora = sources["lidb"][1]
  broken = {c: {layer: dict(f) for layer, f in layers.items()} for c, layers in lora.items()}
  layer = next(iter(broken["unet"]))
  broken["unet"][layer]["up"] = np.full_like(broken["unet"][layer]["up"], np.nan)
  for fmt in FORMATS:
    with pytest.raises(ValueError, match="NaN or Inf"):
      convert.export(broken, str(work / "x.safetensors"), fmt)
  with pytest.raises(ValueError, match="component 'vae'"):
    convert.export({"vae": {"a/b": lora["unet"][layer]}}, str(work / "x.safetensors"), "peft")
  assert not os.path.exists(str(work / "x.safetensors"))

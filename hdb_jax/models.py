"""Stable Diffusion components: build from a config, load from a local folder, save.

The modules are hdb-jax's own (`hdb_jax/nn/`: UNet, VAE, CLIP text and vision, the DDIM
schedule, the CLIP tokenizer); their parameter trees are those of the Flax classes
diffusers (<= 0.39) and transformers (< 5) had, so folders written by either load
unchanged. Everything else works with `StableDiffusion` (stateless modules, tokenizer
and schedule) and a params dict `{"unet": ..., "vae": ..., "text_encoder": ...}`.

Folder layout (diffusers): `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`.
Weights are read as Flax msgpack (`diffusion_flax_model.msgpack`, `flax_model.msgpack`)
or as PyTorch safetensors (`diffusion_pytorch_model.safetensors`, `model.safetensors`, or
their `.fp16` variants, cast on load), converted on load by our key map
(`hdb_jax/nn/torch_keys.py`); PyTorch pickles (`.bin`) only with `allow_pickle` (and
torch installed). Only local paths are accepted: no model hub.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from hdb_jax import params as params_lib
from hdb_jax.model_folder import COMPONENTS, FLAX_WEIGHTS, SUBFOLDERS, TORCH_WEIGHTS  # noqa: F401
from hdb_jax.model_folder import FP16_TORCH_WEIGHTS, PICKLE_WEIGHTS
from hdb_jax.nn import attention as attention_lib
from hdb_jax.nn import blocks, clip, ddim, torch_keys, unet, vae
from hdb_jax.nn.tokenizer import CLIPTokenizer

# A CLIP vision model folder (the hypernetwork's pretrained encoder), not an SD component.
VISION_WEIGHTS = {"flax": "flax_model.msgpack", "torch": "model.safetensors"}


class ModelLoadError(ValueError):
  """A model folder or weights file is missing, unreadable or does not fit the config."""


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
  """Stateless SD components. Params live outside, in a dict keyed by `COMPONENTS`."""
  unet: unet.UNet2DConditionModel
  vae: vae.AutoencoderKL
  text_encoder: clip.CLIPTextModel
  tokenizer: CLIPTokenizer | None
  scheduler: ddim.DDIMConfig

  @property
  def latent_channels(self) -> int:
    return self.unet.config.in_channels

  @property
  def latent_size(self) -> int:
    return self.unet.config.sample_size

  @property
  def image_size(self) -> int:
    return self.latent_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

  @property
  def max_length(self) -> int:
    return self.tokenizer.model_max_length

  @property
  def prediction_type(self) -> str:
    return self.scheduler.prediction_type

  def tokenize(self, prompts: list[str]) -> np.ndarray:
    """Prompts -> token ids int32 [B, max_length] (padded, truncated), on the host."""
    return self.tokenizer(list(prompts), max_length=self.max_length)["input_ids"]

  def encode_text(self, text_params, input_ids):
    """Token ids [B, L] -> hidden states [B, L, D] (last layer, as SD1.5)."""
    hidden, _ = self.text_encoder.apply({"params": text_params}, input_ids)
    return hidden

  def predict(self, unet_params, latents, timesteps, context):
    """UNet output [B, C, h, w] for noisy latents [B, C, h, w], timesteps [B], context [B, L, D]."""
    return self.unet.apply({"params": unet_params}, latents, timesteps, context)

  def encode_images(self, vae_params, images):
    """Images [B, H, W, 3] in [-1, 1] -> (latent mean, latent std), each [B, C, h, w], scaled."""
    mean, std = self.vae.apply({"params": vae_params}, images, method=self.vae.encode)
    scale = self.vae.config.scaling_factor
    to_nchw = lambda x: jnp.transpose(x, (0, 3, 1, 2)) * scale  # the UNet takes NCHW
    return to_nchw(mean), to_nchw(std)

  def decode_latents(self, vae_params, latents):
    """Scaled latents [B, C, h, w] -> images [B, H, W, 3] in [-1, 1]."""
    latents = jnp.transpose(latents / self.vae.config.scaling_factor, (0, 2, 3, 1))
    images = self.vae.apply({"params": vae_params}, latents, method=self.vae.decode)
    return jnp.clip(images, -1.0, 1.0)


# ------------------------------------------------------------------------------------
# Construction

def _as_dict(cfg) -> dict:
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """How the components compute, from the model config; none changes the parameters.

  compute_dtype  dtype of the convolutions, dense layers and attention ("float32", or
                 "bfloat16" on accelerators); norms and the loss stay float32.
                 (`model.compute_dtype`; older configs: `model.dtype`.)
  param_dtype    dtype the frozen base is stored in ("float32"; "bfloat16" halves it).
                 LiDB / LoRA / hypernetwork params and optimizer state are float32
                 whatever it is. A base stored in bf16 has other values, so another
                 fingerprint (hdb_jax/params.py): train and use a hypernetwork with the
                 same setting.
  attention      the attention kernel of the UNet and the text encoder
                 (hdb_jax/nn/attention.py IMPLEMENTATIONS: "xla", "auto", ...).
  remat          per-block rematerialization of the UNet's ResNet blocks and spatial
                 transformers and the text encoder's layers (hdb_jax/nn/blocks.py REMAT).
  """
  compute_dtype: str = "float32"
  param_dtype: str = "float32"
  attention: str = "xla"
  remat: str = "none"

  def __post_init__(self):
    attention_lib.check_implementation(self.attention)
    blocks.check_remat(self.remat)
    for key in ("compute_dtype", "param_dtype"):
      if getattr(self, key) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"model.{key}={getattr(self, key)!r} is not supported "
                         "(float32, bfloat16 or float16)")

  @classmethod
  def of(cls, model_cfg) -> RunOptions:
    """From a model config (ConfigDict or dict); missing keys take the defaults."""
    get = model_cfg.get
    return cls(compute_dtype=str(get("compute_dtype", None) or get("dtype", "float32")),
               param_dtype=str(get("param_dtype", "float32")),
               attention=str(get("attention", "xla")), remat=str(get("remat", "none")))


def cast_base(params, param_dtype: str):
  """The frozen base's floating leaves in `param_dtype` (the others as they are)."""
  dtype = jnp.dtype(param_dtype)
  return jax.tree_util.tree_map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _make(unet_cfg, vae_cfg, text_cfg, scheduler_cfg, tokenizer,
          options: RunOptions) -> StableDiffusion:
  """Components from config dicts (as in the folder's config.json files)."""
  dtype = jnp.dtype(options.compute_dtype)
  return StableDiffusion(
      unet=unet.UNet2DConditionModel(unet.UNetConfig.from_dict(_as_dict(unet_cfg)), dtype,
                                     options.attention, options.remat),
      vae=vae.AutoencoderKL(vae.VAEConfig.from_dict(_as_dict(vae_cfg)), dtype),
      text_encoder=clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(_as_dict(text_cfg)), dtype,
                                      options.attention, options.remat),
      tokenizer=tokenizer,
      scheduler=ddim.DDIMConfig.from_dict(_as_dict(scheduler_cfg)))


def abstract_params(sd: StableDiffusion) -> dict:
  """Parameter shapes of every component via jax.eval_shape (nothing allocated)."""
  return {"unet": unet.param_shapes(sd.unet), "vae": vae.param_shapes(sd.vae),
          "text_encoder": clip.param_shapes(sd.text_encoder)}


def from_config(model_cfg, tokenizer: CLIPTokenizer | None = None):
  """Components and their abstract params from a config's architecture (no weights).

  `model_cfg` has `unet`, `vae`, `text_encoder`, `scheduler` (as in the diffusers
  `config.json` files), optionally the RunOptions keys and `tokenizer_path`. The
  abstract params are in `param_dtype`.
  """
  options = RunOptions.of(model_cfg)
  if tokenizer is None and model_cfg.get("tokenizer_path"):
    tokenizer = _load_tokenizer(model_cfg.tokenizer_path)
  sd = _make(model_cfg.unet, model_cfg.vae, model_cfg.text_encoder, model_cfg.scheduler,
             tokenizer, options)
  abstract = abstract_params(sd)
  if options.param_dtype != "float32":
    abstract = jax.eval_shape(lambda p: cast_base(p, options.param_dtype), abstract)
  return sd, abstract


def init_random(sd: StableDiffusion, seed: int) -> dict:
  """Random params of every component, from the abstract shapes (no forward pass).

  Flax's `init` traces and compiles the whole model (tens of seconds for the tiny UNet
  on this CPU); a model built from a config is trained anyway, so each leaf is drawn
  directly, by name: kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 0.02^2), norm scales 1,
  biases 0. Seeded per (seed, path) with NumPy: identical on every platform.
  """
  params = {}
  for component, tree in abstract_params(sd).items():
    flat = {}
    for path, leaf in params_lib.flatten(tree).items():
      rng = np.random.default_rng([seed, params_lib.stable_hash32(f"{component}/{path}")])
      name = path.rsplit(params_lib.SEP, 1)[-1]
      if name == "kernel":
        fan_in = int(np.prod(leaf.shape[:-1]))
        value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
      elif name == "embedding":
        value = 0.02 * rng.standard_normal(leaf.shape)
      elif name == "scale":
        value = np.ones(leaf.shape)
      else:
        value = np.zeros(leaf.shape)
      flat[path] = jnp.asarray(value, leaf.dtype)
    params[component] = params_lib.unflatten(flat)
  return params


# ------------------------------------------------------------------------------------
# Loading

def _require(path: str, what: str) -> str:
  if not os.path.exists(path):
    raise ModelLoadError(f"{path}: missing ({what})")
  return path


def _read_json(path: str) -> dict:
  _require(path, "config file")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ModelLoadError(f"{path}: not a readable JSON config ({e})") from e


def _load_tokenizer(folder: str) -> CLIPTokenizer:
  for name in ("vocab.json", "merges.txt"):
    _require(os.path.join(folder, name), "CLIP tokenizer file")
  try:
    return CLIPTokenizer.from_folder(folder)
  except Exception as e:  # the tokenizer files can be broken in many ways
    raise ModelLoadError(f"{folder}: cannot load the CLIP tokenizer ({e})") from e


def _read_safetensors(path: str) -> dict:
  import safetensors.numpy
  try:
    return safetensors.numpy.load_file(path)
  except Exception as e:
    raise ModelLoadError(f"{path}: not a readable safetensors file ({e})") from e


def _read_pickle(path: str, allow_pickle: bool) -> dict:
  """A PyTorch pickle (`.bin`) state dict as numpy arrays, only when `allow_pickle`:
  unpickling a file can run any code it carries. Read with torch's weights_only loader."""
  if not allow_pickle:
    raise ModelLoadError(
        f"{path}: a PyTorch pickle, not read by default: loading a pickle can run code "
        "hidden in the file. Convert it to safetensors, or, if you trust where it came "
        "from, allow it with model.allow_pickle=True")
  try:
    import torch
  except ImportError as e:
    raise ModelLoadError(f"{path}: reading a PyTorch pickle needs torch (pip install torch, "
                         "or the [test] extra); safetensors files need nothing more") from e
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise ModelLoadError(f"{path}: not a readable PyTorch state dict ({e})") from e
  return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")}


def _read_weights(component: str, folder: str, expected, allow_pickle: bool = False,
                  names: Mapping[str, str] | None = None) -> dict:
  """Weights of one component from `folder`, the first found of: Flax msgpack, PyTorch
  safetensors, its fp16 variant (cast on load), a PyTorch pickle (only if allowed).
  `names`: {"flax": file, "torch": file} for a component outside the SD folder layout."""
  flax_name = (names or FLAX_WEIGHTS)["flax" if names else component]
  torch_name = (names or TORCH_WEIGHTS)["torch" if names else component]
  flax_file, torch_file = os.path.join(folder, flax_name), os.path.join(folder, torch_name)
  if os.path.exists(flax_file):
    try:
      with open(flax_file, "rb") as f:
        return flax.serialization.msgpack_restore(f.read())
    except Exception as e:
      raise ModelLoadError(f"{flax_file}: not a readable Flax msgpack file ({e})") from e
  candidates = [(torch_file, _read_safetensors)]
  if component in FP16_TORCH_WEIGHTS:
    candidates.append((os.path.join(folder, FP16_TORCH_WEIGHTS[component]), _read_safetensors))
  candidates += [(os.path.join(folder, name), lambda p: _read_pickle(p, allow_pickle))
                 for name in PICKLE_WEIGHTS.get(component, ())]
  for path, read in candidates:
    if not os.path.exists(path):
      continue
    try:
      return torch_keys.torch_to_flax(component, read(path), expected)
    except ModelLoadError:
      raise
    except Exception as e:
      raise ModelLoadError(f"{path}: cannot convert PyTorch weights ({e})") from e
  raise ModelLoadError(
      f"{folder}: no weights ({flax_name}, {torch_name} or its .fp16 variant)")


def _check_fits(component: str, folder: str, loaded: dict, expected: dict) -> dict:
  """Loaded params must have exactly the expected paths and shapes; cast to its dtype."""
  got = params_lib.flatten(loaded)
  want = params_lib.flatten(expected)
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  wrong = [f"{k}: {tuple(np.shape(got[k]))} != {tuple(want[k].shape)}"
           for k in sorted(set(got) & set(want)) if tuple(np.shape(got[k])) != tuple(want[k].shape)]
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
  if wrong:
    problems.append(f"{len(wrong)} with wrong shape (e.g. {wrong[:3]})")
  if problems:
    raise ModelLoadError(f"{folder}: weights do not fit the {component} config: "
                         + "; ".join(problems))
  return params_lib.unflatten(
      {k: jnp.asarray(v, dtype=want[k].dtype) for k, v in got.items()})


def load(path: str, dtype: str = "float32", allow_pickle: bool = False,
         options: RunOptions | None = None):
  """Load `(StableDiffusion, params)` from a local diffusers-format folder. The modules
  compute in `dtype` (or `options`, RunOptions, when given); the params are float32, or
  options.param_dtype (fp16 variant files are cast on load); PyTorch pickles (`.bin`)
  are read only with `allow_pickle` (unpickling can run code)."""
  options = options or RunOptions(compute_dtype=str(jnp.dtype(dtype)))
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise ModelLoadError(f"{path}: not a folder (expected a local diffusers-format "
                         "Stable Diffusion folder; model hub ids are not supported)")
  for sub in SUBFOLDERS:
    if not os.path.isdir(os.path.join(path, sub)):
      raise ModelLoadError(f"{os.path.join(path, sub)}: missing subfolder '{sub}'")
  cfg = {
      "unet": _read_json(os.path.join(path, "unet", "config.json")),
      "vae": _read_json(os.path.join(path, "vae", "config.json")),
      "text_encoder": _read_json(os.path.join(path, "text_encoder", "config.json")),
      "scheduler": _read_json(os.path.join(path, "scheduler", "scheduler_config.json")),
  }
  tokenizer = _load_tokenizer(os.path.join(path, "tokenizer"))
  try:
    sd = _make(cfg["unet"], cfg["vae"], cfg["text_encoder"], cfg["scheduler"], tokenizer,
               options)
  except Exception as e:
    raise ModelLoadError(f"{path}: config files do not describe a supported model ({e})") from e
  expected = abstract_params(sd)
  params = {}
  for component in COMPONENTS:
    folder = os.path.join(path, component)
    loaded = _read_weights(component, folder, expected[component], allow_pickle)
    params[component] = _check_fits(component, folder, loaded, expected[component])
  if options.param_dtype != "float32":
    params = cast_base(params, options.param_dtype)
  return sd, params


def load_or_build(model_cfg):
  """`model_cfg.path` set: load that folder. Else build from the config, random init."""
  options = RunOptions.of(model_cfg)
  if model_cfg.get("path"):
    return load(model_cfg.path, allow_pickle=model_cfg.get("allow_pickle", False),
                options=options)
  sd, _ = from_config(model_cfg)
  if sd.tokenizer is None:
    raise ModelLoadError("model.tokenizer_path is empty: a model built from a config "
                         "needs a CLIP-format tokenizer folder")
  return sd, cast_base(init_random(sd, model_cfg.get("init_seed", 0)), options.param_dtype)


# ------------------------------------------------------------------------------------
# Saving

def config_dicts(sd: StableDiffusion) -> dict[str, dict]:
  """{subfolder: config.json dict} of every component, as PyTorch diffusers and
  transformers read them (and `load` does)."""
  return {"unet": sd.unet.config.to_dict(), "vae": sd.vae.config.to_dict(),
          "text_encoder": sd.text_encoder.config.to_dict(),
          "scheduler": sd.scheduler.to_dict()}


def _write_json(path: str, value) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")


def save(sd: StableDiffusion, params: Mapping[str, Any], path: str) -> None:
  """Write a diffusers-format folder with Flax weights, atomically (temp dir + rename)."""
  from hdb_jax import files
  configs = config_dicts(sd)
  with files.atomic_dir(path) as tmp:
    for component in COMPONENTS:
      folder = os.path.join(tmp, component)
      os.makedirs(folder)
      _write_json(os.path.join(folder, "config.json"), configs[component])
      state = jax.tree_util.tree_map(np.asarray, dict(params[component]))
      with open(os.path.join(folder, FLAX_WEIGHTS[component]), "wb") as f:
        f.write(flax.serialization.msgpack_serialize(state))
    sd.tokenizer.save(os.path.join(tmp, "tokenizer"))
    os.makedirs(os.path.join(tmp, "scheduler"))
    _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), configs["scheduler"])
    _write_json(os.path.join(tmp, "model_index.json"), MODEL_INDEX)


# What PyTorch tools (diffusers StableDiffusionPipeline) expect at the folder root.
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.39.0",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


# ------------------------------------------------------------------------------------
# A pretrained CLIP vision tower, as the hypernetwork's image encoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipVisionTokens(flax.linen.Module):
  """Images [B, H, W, 3] in [-1, 1] -> the CLIP vision tower's last hidden states
  [B, 1 + patches, D]: resized to its image size (bicubic) and CLIP-normalized first."""
  config: clip.CLIPVisionConfig
  dtype: Any = jnp.float32

  @flax.linen.compact
  def __call__(self, images):
    size = self.config.image_size
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    if x.shape[1:3] != (size, size):
      x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bicubic")
    x = (x - jnp.array(CLIP_MEAN)) / jnp.array(CLIP_STD)
    hidden, _ = clip.CLIPVisionModel(self.config, self.dtype, name="clip")(x.astype(self.dtype))
    return hidden


def vision_encoder_from_config(config: Mapping, dtype: str = "float32") -> ClipVisionTokens:
  """The encoder module of a CLIP vision config (dict of its config.json)."""
  vision = dict(config.get("vision_config", config))  # a full CLIP config holds it inside
  return ClipVisionTokens(clip.CLIPVisionConfig.from_dict(vision), jnp.dtype(dtype))


def load_vision_encoder(path: str, dtype: str = "float32"):
  """A local CLIP vision folder (config.json + flax_model.msgpack or model.safetensors of
  a CLIPVisionModel) -> (ClipVisionTokens, its params {"clip": ...}, config dict)."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise ModelLoadError(f"{path}: not a folder (expected a local CLIP vision model folder; "
                         "model hub ids are not supported)")
  config = _read_json(os.path.join(path, "config.json"))
  try:
    module = vision_encoder_from_config(config, dtype)
  except Exception as e:
    raise ModelLoadError(f"{path}/config.json: not a CLIP vision config ({e})") from e
  size = module.config.image_size
  expected = jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3))))["params"]["clip"]
  loaded = _read_weights("vision_encoder", path, expected, names=VISION_WEIGHTS)
  params = _check_fits("vision_encoder", path, loaded, expected)
  return module, {"clip": params}, dict(config.get("vision_config", config))

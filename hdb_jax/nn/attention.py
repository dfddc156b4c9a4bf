"""Multi-head scaled dot-product attention, shared by the UNet, the VAE and CLIP.

Arrays are [B, L, H, D] (batch, positions, heads, head dim). The kernel is chosen in one
place, `dot_product_attention(..., implementation=)`, from the model config's
`model.attention` (IMPLEMENTATIONS):

  "xla"     softmax(q k^T / sqrt(D)) v as XLA ops (jax.nn.dot_product_attention's "xla"):
            every platform; materializes the [B, H, L, S] logits. The default.
  "cudnn"   cuDNN's fused flash attention (GPU, fp16/bf16, head dim a multiple of 8 and
            <= 128, or <= 256 on Hopper); raises where cuDNN cannot take the call.
  "pallas"  JAX's Pallas flash-attention kernel for TPU
            (jax.experimental.pallas.ops.tpu.flash_attention); runs off TPU only inside
            `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` (the tests).
  "chunked" XLA ops over chunks of CHUNK queries, each chunk's maps recomputed in the
            backward pass (jax.checkpoint in a lax.map): memory-efficient attention on
            every platform, slower than a fused kernel; sequences of at most CHUNK
            queries (or not a multiple of it), and masked calls, run as "xla".
  "auto"    per call, from the platform and the shapes: on GPU "cudnn" where `cudnn_fits`,
            on TPU "pallas" where `pallas_fits`; otherwise "chunked" for long
            self-attention (both lengths > CHUNK: e.g. float32 on GPU) and "xla" for the
            rest (the 77-token cross-attention, the text encoder, CPU).

The flash kernels never hold the [L, S] maps: at SD1.5's 64x64 latents (L = S = 4096) a
self-attention's maps are 8 heads x 4096^2 per example, 512 MB in float32.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "auto", "cudnn", "pallas", "chunked")
PALLAS_BLOCK = 128  # the TPU kernel's tile along both sequence axes
CHUNK = 1024        # queries per chunk of "chunked" (SD1.5 at 512 px: 4 chunks of 4096)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[B, L, H * D] -> [B, L, H, D]."""
  return x.reshape(x.shape[:-1] + (num_heads, x.shape[-1] // num_heads))


def merge_heads(x: jax.Array) -> jax.Array:
  """[B, L, H, D] -> [B, L, H * D]."""
  return x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))


def check_implementation(implementation: str) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={implementation!r} is not supported "
                     f"(supported: {', '.join(IMPLEMENTATIONS)})")
  return implementation


def cudnn_fits(query: jax.Array, key: jax.Array, mask, head_dim_max: int = 128) -> bool:
  """Shapes and dtypes cuDNN's flash attention takes (jax's own check raises
  otherwise): half-precision inputs, head dim a multiple of 8 up to `head_dim_max`
  (256 on Hopper and later), no arbitrary mask."""
  head_dim = query.shape[-1]
  return (query.dtype in (jnp.bfloat16, jnp.float16) and key.dtype == query.dtype
          and head_dim % 8 == 0 and head_dim <= head_dim_max and mask is None)


def pallas_fits(query: jax.Array, key: jax.Array, mask) -> bool:
  """Shapes the TPU flash kernel takes at its default tiles: both sequence lengths
  multiples of 128, no mask (the text encoder's causal + padding mask stays on XLA)."""
  return (mask is None and query.shape[1] % PALLAS_BLOCK == 0
          and key.shape[1] % PALLAS_BLOCK == 0)


def _hopper_or_later() -> bool:
  capability = getattr(jax.devices()[0], "compute_capability", "0")
  try:
    return float(capability) >= 9.0
  except ValueError:
    return False


def resolve(implementation: str, query, key, mask) -> str:
  """The kernel one call runs: `implementation`, or for "auto" the platform's choice."""
  check_implementation(implementation)
  if implementation != "auto":
    return implementation
  platform = jax.default_backend()
  if platform == "gpu":
    head_dim_max = 256 if _hopper_or_later() else 128
    if cudnn_fits(query, key, mask, head_dim_max):
      return "cudnn"
  elif platform == "tpu" and pallas_fits(query, key, mask):
    return "pallas"
  if platform in ("gpu", "tpu") and chunked_fits(query, mask) and key.shape[1] > CHUNK:
    return "chunked"
  return "xla"


def chunked_fits(query: jax.Array, mask) -> bool:
  """More than one chunk of CHUNK queries, whole chunks, no mask."""
  length = query.shape[1]
  return mask is None and length > CHUNK and length % CHUNK == 0


def _chunked_attention(query, key, value):
  """XLA attention of CHUNK queries at a time, each chunk recomputed in the backward
  pass: the [B, H, CHUNK, S] maps of one chunk live at a time, not [B, H, L, S]."""
  batch, length, heads, dim = query.shape
  chunks = query.reshape(batch, length // CHUNK, CHUNK, heads, dim).swapaxes(0, 1)

  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
  def one(chunk):  # [B, CHUNK, H, D]
    return jax.nn.dot_product_attention(chunk, key, value, implementation="xla")
  out = jax.lax.map(one, chunks)  # [L / CHUNK, B, CHUNK, H, D]
  return out.swapaxes(0, 1).reshape(batch, length, heads, dim)


def _pallas_attention(query, key, value):
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
  to_bhld = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # [B, H, L, D], the kernel's layout
  out = tpu_flash.flash_attention(to_bhld(query), to_bhld(key), to_bhld(value),
                                  sm_scale=1.0 / math.sqrt(query.shape[-1]))
  return jnp.transpose(out, (0, 2, 1, 3))


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: jax.Array | None = None,
                          implementation: str = "xla") -> jax.Array:
  """softmax(q k^T / sqrt(D)) v per head.

  query [B, L, H, D], key and value [B, S, H, D] -> [B, L, H, D] in query's dtype.
  `mask`: boolean, broadcastable to [B, H, L, S], True where a query may attend a key.
  Logits and softmax are float32 whatever the input dtype. `implementation`: see
  IMPLEMENTATIONS; the same values up to the kernels' float rounding.
  """
  if mask is not None:
    mask = jnp.asarray(mask, jnp.bool_)
  kernel = resolve(implementation, query, key, mask)
  if kernel == "pallas":
    if not pallas_fits(query, key, mask):
      raise ValueError(f"attention 'pallas': query {query.shape}, key {key.shape}"
                       f"{', with a mask' if mask is not None else ''} do not fit the TPU "
                       f"flash kernel (lengths multiples of {PALLAS_BLOCK}, no mask); "
                       "use model.attention='auto'")
    return _pallas_attention(query, key, value).astype(query.dtype)
  if kernel == "chunked":
    if chunked_fits(query, mask):
      return _chunked_attention(query, key, value)
    kernel = "xla"
  return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=kernel)


# Fused projections: the projections of an attention layer that read the same input (q,
# k, v of a self-attention; k, v of a cross-attention) run as one matmul against their
# kernels side by side, in the forward and the backward pass: fewer, larger GEMMs, what
# accelerators run closest to peak. (On the 2-core CPU the mini step's time did not
# change measurably: docs/benchmarks.md "Speed on the embedded default".) The parameters
# stay one nn.Dense each (`to_q/kernel`, ...), so files, LoRA paths and `lora.merge` see
# the same trees.
_SEPARATE = contextvars.ContextVar("separate_projections", default=False)


@contextlib.contextmanager
def separate_projections():
  """Trace inside this block to run each projection as its own `nn.Dense` call: method
  interceptors that act per projection (`preopt.low_rank_side_path`) need it, and the
  benchmarks use it as the baseline. The same values either way."""
  token = _SEPARATE.set(True)
  try:
    yield
  finally:
    _SEPARATE.reset(token)


def projections(module: nn.Module, inputs: dict, features: int, use_bias: bool,
                dtype) -> dict:
  """{name: input [..., in]} -> {name: nn.Dense(features, name=name) of it, [..., features]}
  for Dense submodules of `module` (call from its compact `__call__`). Projections whose
  input is the same array run as one matmul against their concatenated kernels (and
  biases), unless initializing or inside `separate_projections()`."""
  dense = {name: nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name)
           for name in inputs}
  if module.is_initializing() or _SEPARATE.get():
    return {name: dense[name](x) for name, x in inputs.items()}
  groups = {}                                        # id(input) -> names, in call order
  for name, x in inputs.items():
    groups.setdefault(id(x), []).append(name)
  params = module.variables["params"]
  out = {}
  for names in groups.values():
    x = inputs[names[0]]
    if len(names) == 1:
      out[names[0]] = dense[names[0]](x)
      continue
    kernel = jnp.concatenate([params[n]["kernel"] for n in names], axis=1)  # [in, k * features]
    bias = (jnp.concatenate([params[n]["bias"] for n in names]) if use_bias else None)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=dtype)
    y = jnp.dot(x, kernel)                                                # [..., k * features]
    if bias is not None:
      y = y + bias
    out.update(zip(names, jnp.split(y, len(names), axis=-1)))
  return out

"""The switches that make SD1.5 fit an accelerator (hdb_jax/models.py RunOptions) change
how the model computes, not what: the attention kernels equal plain einsum attention,
per-block rematerialization gives the same values and gradients (LiDB's side path
included), and bf16 compute keeps the trained params, the optimizer state and the loss
in float32. On the tiny model (configs/tiny.py), CPU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdb_jax import dreambooth, finetune, lidb, models, preopt
from hdb_jax.nn import attention


def einsum_attention(query, key, value, mask=None):
  """softmax(q k^T / sqrt(D)) v written out: [B, L, H, D], [B, S, H, D] -> [B, L, H, D]."""
  logits = jnp.einsum("blhd,bshd->bhls", query, key) / np.sqrt(query.shape[-1])
  if mask is not None:
    logits = jnp.where(mask, logits, -1e30)
  return jnp.einsum("bhls,bshd->blhd", jax.nn.softmax(logits, axis=-1), value)


def qkv(length, keys, heads=2, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  shape = lambda n: (2, n, heads, dim)
  return (rng.normal(size=shape(length)).astype(np.float32),
          rng.normal(size=shape(keys)).astype(np.float32),
          rng.normal(size=shape(keys)).astype(np.float32))


def values_and_grads(fn, q, k, v, mask=None):
  """fn's output and the gradients of <output, a fixed cotangent> w.r.t. q, k, v."""
  cotangent = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, mask) * cotangent)
  return fn(q, k, v, mask), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def assert_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree_util.tree_map(
      lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32),
                                              np.asarray(y, np.float32), rtol=rtol, atol=atol),
      a, b)


@pytest.mark.parametrize("implementation", ["xla", "auto"])
def test_attention_equals_einsum_attention(implementation):
  """Self- and cross-attention, with and without a causal mask: values and gradients."""
  for length, keys, masked in ((12, 12, True), (12, 7, False)):
    q, k, v = qkv(length, keys)
    mask = jnp.tril(jnp.ones((length, keys), bool))[None, None] if masked else None
    kernel = lambda q, k, v, m: attention.dot_product_attention(q, k, v, m, implementation)
    assert_close(values_and_grads(kernel, q, k, v, mask),
                 values_and_grads(einsum_attention, q, k, v, mask))


def test_chunked_attention_equals_einsum_attention(monkeypatch):
  """3 chunks of 4 queries (CHUNK made small), each recomputed in the backward pass;
  a masked call runs whole."""
  monkeypatch.setattr(attention, "CHUNK", 4)
  q, k, v = qkv(12, 9)
  kernel = lambda q, k, v, m: attention.dot_product_attention(q, k, v, m, "chunked")
  assert attention.chunked_fits(q, None) and not attention.chunked_fits(q[:, :10], None)
  assert_close(values_and_grads(kernel, q, k, v), values_and_grads(einsum_attention, q, k, v))
  mask = jnp.tril(jnp.ones((12, 9), bool))[None, None]
  assert_close(values_and_grads(kernel, q, k, v, mask),
               values_and_grads(einsum_attention, q, k, v, mask))


def test_pallas_flash_attention_equals_einsum_attention():
  """The TPU flash kernel, run by Pallas's TPU interpreter on the CPU."""
  from jax.experimental.pallas import tpu as pltpu
  q, k, v = qkv(128, 256, heads=1, dim=8)
  kernel = lambda q, k, v, m: attention.dot_product_attention(q, k, v, m, "pallas")
  with pltpu.force_tpu_interpret_mode():
    got = values_and_grads(kernel, q, k, v)
  assert_close(got, values_and_grads(einsum_attention, q, k, v), rtol=2e-4, atol=2e-5)
  with pytest.raises(ValueError, match="do not fit the TPU flash kernel"):
    attention.dot_product_attention(*qkv(12, 77), implementation="pallas")


def test_auto_attention_picks_the_platform_kernel_where_shapes_allow(monkeypatch):
  bf16 = lambda length, dim: jnp.zeros((1, length, 8, dim), jnp.bfloat16)
  causal = jnp.ones((1, 1, 77, 77), bool)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert attention.resolve("auto", bf16(4096, 40), bf16(77, 40), None) == "cudnn"
  assert attention.resolve("auto", bf16(256, 160), bf16(256, 160), None) == "xla"  # pre-Hopper
  assert attention.resolve("auto", bf16(4096, 40).astype(jnp.float32),
                           bf16(77, 40).astype(jnp.float32), None) == "xla"
  assert attention.resolve("auto", bf16(77, 64), bf16(77, 64), causal) == "xla"
  assert attention.resolve("auto", bf16(4096, 160), bf16(4096, 160), None) == "chunked"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert attention.resolve("auto", bf16(4096, 160), bf16(4096, 160), None) == "pallas"
  assert attention.resolve("auto", bf16(4096, 40), bf16(77, 40), None) == "xla"
  assert attention.resolve("auto", bf16(128, 64), bf16(128, 64), causal[..., :128, :128]) == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert attention.resolve("auto", bf16(4096, 40), bf16(4096, 40), None) == "xla"
  assert attention.resolve("cudnn", bf16(8, 8), bf16(8, 8), None) == "cudnn"  # as asked
  with pytest.raises(ValueError, match="model.attention='flash' is not supported"):
    attention.resolve("flash", bf16(8, 8), bf16(8, 8), None)


def test_fused_projections_equal_separate_dense_calls():
  """q, k, v that read the same input run as one matmul (hdb_jax/nn/attention.py
  `projections`): UNet self- and cross-attention and CLIP's (with biases) give the values
  and gradients (w.r.t. params and inputs) of one nn.Dense call each, with one param tree."""
  from hdb_jax.nn import blocks, clip
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 16)).astype(np.float32)
  context = rng.normal(size=(2, 5, 24)).astype(np.float32)
  text = clip.CLIPTextConfig.from_dict(dict(hidden_size=16, num_attention_heads=2,
                                            intermediate_size=32, num_hidden_layers=1))
  cases = ((blocks.Attention(heads=2, head_dim=8), (x,)),
           (blocks.Attention(heads=2, head_dim=8), (x, context)),
           (clip.CLIPAttention(text), (x,)))
  for module, inputs in cases:
    params = module.init(jax.random.key(0), *inputs)["params"]
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * rng.normal(size=p.shape), params)
    cotangent = rng.normal(size=x.shape).astype(np.float32)

    def loss(params, inputs):
      return jnp.sum(module.apply({"params": params}, *inputs) * cotangent)
    # A new function each time: the switch acts at trace time, and jit caches traces.
    grads = lambda: jax.jit(jax.value_and_grad(lambda p, i: loss(p, i), argnums=(0, 1)))(
        params, inputs)
    dots = lambda: jax.jit(lambda p, i: loss(p, i)).lower(params, inputs).as_text().count(
        "dot_general")
    fused, fused_dots = grads(), dots()
    with attention.separate_projections():
      separate, separate_dots = grads(), dots()
    assert_close(fused, separate, rtol=1e-5, atol=1e-5)
    assert fused_dots == separate_dots - (2 if len(inputs) == 1 else 1)


def with_options(sd, **options):
  """`sd` with its UNet and text encoder computing under other RunOptions fields."""
  return dataclasses.replace(sd, unet=sd.unet.clone(**options),
                             text_encoder=sd.text_encoder.clone(**options))


def test_run_options_from_config(tiny_config):
  options = models.RunOptions.of(tiny_config.model)
  assert options == models.RunOptions()  # the tiny and mini defaults: fp32, xla, no remat
  assert models.RunOptions.of({"dtype": "bfloat16"}).compute_dtype == "bfloat16"  # old key
  for key, value in (("remat", "dots"), ("attention", "flash"), ("param_dtype", "int8")):
    with pytest.raises(ValueError, match=f"model.{key}={value!r} is not supported"):
      models.RunOptions.of({key: value})
  config = tiny_config.model.copy_and_resolve_references()
  config.remat, config.attention, config.param_dtype = "blocks", "auto", "bfloat16"
  sd, abstract = models.from_config(config)
  assert (sd.unet.remat, sd.text_encoder.remat, sd.unet.attention) == ("blocks", "blocks", "auto")
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(abstract)} == {jnp.dtype("bfloat16")}


@pytest.mark.slow  # ~45 s each: the loss compiled with and without remat (SD1.5 configs use it)
@pytest.mark.parametrize("remat", ["blocks", "blocks_min"])
def test_block_remat_has_the_same_values_and_gradients(tiny_model, tiny_lidb, remat):
  """The pre-optimization loss of a block of 2 identities (the LiDB side path
  intercepting the attention projections inside the rematerialized blocks, the text
  encoder's layers too): equal losses and gradients w.r.t. the identities' weights, which
  flow  through every block (rounding aside: the recomputed blocks fuse differently)."""
  sd, params = tiny_model
  spec, aux = tiny_lidb
  keys = jax.random.split(jax.random.key(1), 2)
  train = jax.vmap(lambda k: jax.tree_util.tree_map(
      lambda x: x + 0.3 * jax.random.normal(k, x.shape), lidb.init(spec, k)))(keys)
  rng = np.random.default_rng(0)
  pool = {"mean": rng.normal(size=(2, 2, 4, 8, 8)).astype(np.float32),
          "std": np.full((2, 2, 4, 8, 8), 0.1, np.float32),
          "input_ids": np.broadcast_to(sd.tokenize(["a sks face"])[None], (2, 2, sd.max_length))}
  rngs = jax.random.split(jax.random.key(3), 2)

  def grads(sd):
    loss = lambda t: preopt.block_losses(sd, t, params, aux, pool, rngs, 2).sum()
    return jax.jit(jax.value_and_grad(loss))(train)
  plain, rematerialized = grads(sd), grads(with_options(sd, remat=remat))
  assert_close(rematerialized, plain, rtol=1e-4, atol=1e-6)
  assert min(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(plain[1])) > 1e-4


@pytest.mark.slow  # ~1 min of CPU: the fast-finetuning step compiled in float32 and bf16
def test_bf16_compute_keeps_trained_params_optimizer_state_and_loss_float32(tiny_model,
                                                                              tiny_lidb):
  """Fast finetuning with the base stored and computed in bf16: the LoRA, Adam's moments
  and the loss stay float32 after a step, and the UNet's output and the loss are close to
  float32's."""
  sd, params = tiny_model
  spec, aux = tiny_lidb
  sd_bf16 = dataclasses.replace(
      with_options(sd), unet=sd.unet.clone(dtype=jnp.bfloat16),
      text_encoder=sd.text_encoder.clone(dtype=jnp.bfloat16))
  frozen_bf16 = models.cast_base(params, "bfloat16")
  rng = np.random.default_rng(0)
  latents = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
  ids = sd.tokenize(["a sks face", "a sketch of a sks face"])
  outputs = {}
  for name, (model, frozen) in {"fp32": (sd, params), "bf16": (sd_bf16, frozen_bf16)}.items():
    context = model.encode_text(frozen["text_encoder"], ids)
    outputs[name] = np.asarray(model.predict(frozen["unet"], latents, jnp.array([10, 500]),
                                             context), np.float32)
  error = np.abs(outputs["bf16"] - outputs["fp32"]).mean() / np.abs(outputs["fp32"]).mean()
  assert error < 0.05, error

  lora_init = finetune.initial_lora(lidb.init(spec, jax.random.key(0)), aux, 2)
  pool = dreambooth.make_pool({"mean": latents[:1], "std": np.full_like(latents[:1], 0.1)},
                              ids[:1], 1.0)
  tx = finetune.optimizer(1e-3)
  losses = {}
  for name, (model, frozen) in {"fp32": (sd, params), "bf16": (sd_bf16, frozen_bf16)}.items():
    trained, fixed = finetune.split(jax.tree_util.tree_map(jnp.array, lora_init), True)
    opt_state = tx.init(trained)
    trained, opt_state, loss = finetune.make_step(model, tx, 2)(
        trained, opt_state, fixed, frozen, (pool,), jax.random.key(0))
    floats = [x for x in jax.tree_util.tree_leaves((trained, opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats), name
    assert loss.dtype == jnp.float32
    losses[name] = float(loss)
  assert abs(losses["bf16"] - losses["fp32"]) < 0.05 * losses["fp32"], losses

r"""The PyTorch route of `hdb personalize`: what a user of the public ports runs instead.

Run by `benchmarks/personalize.py` (row "torch") as a new process, timed from start to
exit, on the same base (exported to a diffusers folder by `hdb export-base`), the same
photo and the same LoRA init (the hypernetwork's prediction relaxed to rank 4 by hdb-jax,
exported with `hdb export --format peft`):

  diffusers StableDiffusionPipeline + `load_lora_weights` (peft adapters on the same
  layers), the photo and its mirror image encoded once by the VAE, `--steps` AdamW steps
  of batch `--batch-size` on the LoRA values (text encoder included, as hdb-jax's
  default), prompt "a sks face"; then the same prompts x `--per-prompt` samples with DDIM
  (`--sample-steps`, guidance `--guidance-scale`) in one batch; the LoRA written to a
  safetensors file and the samples to a PNG.

PyTorch has no compilation to cache: a first and a second process differ only by the
operating system's file cache.
"""

import argparse
import json
import os
import time

BEGAN = time.perf_counter()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--folder", required=True, help="diffusers folder (hdb export-base)")
  parser.add_argument("--lora", required=True, help="PEFT LoRA file: the relaxed init")
  parser.add_argument("--image", required=True)
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--prompts", required=True, help="JSON list of sampling prompts")
  parser.add_argument("--prompt", default="a sks face")
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--learning-rate", type=float, default=5e-3)
  parser.add_argument("--per-prompt", type=int, default=4)
  parser.add_argument("--sample-steps", type=int, default=25)
  parser.add_argument("--guidance-scale", type=float, default=4.0)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  args = parser.parse_args()

  import numpy as np
  import torch
  from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
  from PIL import Image, ImageOps
  from safetensors.torch import save_file
  seconds = {"import": time.perf_counter() - BEGAN}
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)

  tick = time.perf_counter()
  pipe = StableDiffusionPipeline.from_pretrained(args.folder, safety_checker=None,
                                                 requires_safety_checker=False)
  pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
  pipe.load_lora_weights(args.lora)
  noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
  lora_values = [p for model in (pipe.unet, pipe.text_encoder)
                 for name, p in model.named_parameters() if "lora_" in name]
  for model in (pipe.unet, pipe.text_encoder, pipe.vae):
    model.requires_grad_(False)
  for p in lora_values:
    p.requires_grad_(True)
  optimizer = torch.optim.AdamW(lora_values, lr=args.learning_rate, weight_decay=0.0)
  seconds["load"] = time.perf_counter() - tick

  tick = time.perf_counter()
  size = pipe.unet.config.sample_size * pipe.vae_scale_factor
  with Image.open(args.image) as im:
    im = ImageOps.exif_transpose(im).convert("RGB")
    side = min(im.size)
    left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
  photo = torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1.0).permute(2, 0, 1)
  views = torch.stack([photo, photo.flip(-1)])                     # [2, 3, H, W]
  with torch.no_grad():
    latent_dist = pipe.vae.encode(views).latent_dist
  mean, std = latent_dist.mean, latent_dist.std
  scale = pipe.vae.config.scaling_factor
  ids = pipe.tokenizer([args.prompt], padding="max_length",
                       max_length=pipe.tokenizer.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
  pipe.unet.train()
  pipe.text_encoder.train()
  losses = []
  for _ in range(args.steps):
    index = torch.randint(0, len(views), (args.batch_size,))
    latents = (mean[index] + std[index] * torch.randn_like(mean[index])) * scale
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                              (args.batch_size,))
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    context = pipe.text_encoder(ids.expand(args.batch_size, -1))[0]
    prediction = pipe.unet(noisy, timesteps, context).sample
    loss = torch.nn.functional.mse_loss(prediction, noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(float(loss))
  seconds["finetune"] = time.perf_counter() - tick

  tick = time.perf_counter()
  pipe.unet.eval()
  pipe.text_encoder.eval()
  prompts = json.loads(args.prompts)
  with torch.no_grad():
    images = pipe([p for p in prompts for _ in range(args.per_prompt)],
                  num_inference_steps=args.sample_steps, guidance_scale=args.guidance_scale,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
  seconds["sample"] = time.perf_counter() - tick

  os.makedirs(args.out, exist_ok=True)
  save_file({f"{prefix}.{name}": v for prefix, model in
             (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))
             for name, v in model.state_dict().items() if "lora_" in name},
            os.path.join(args.out, "lora.safetensors"))
  rows = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
  Image.fromarray(np.concatenate(list(rows), axis=1)).save(os.path.join(args.out, "samples.png"))
  seconds["total"] = time.perf_counter() - BEGAN
  with open(os.path.join(args.out, "timings.json"), "w") as f:
    json.dump({"seconds": {k: round(v, 3) for k, v in seconds.items()},
               "final_loss": losses[-1] if losses else None}, f)


if __name__ == "__main__":
  main()

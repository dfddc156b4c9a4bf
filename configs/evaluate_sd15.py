"""The comparison table for Stable Diffusion 1.5 on real photos, scored as the paper does.

    pip install -e '.[cuda,faces]'
    python -m train.evaluate --config configs/evaluate_sd15.py --workdir /data/evaluate_sd15 \
        --config.model.path=/data/stable-diffusion-v1-5 \
        --config.data.folder=/data/holdout_faces \
        --config.personalize.hypernet=/data/hypernet_sd15/hypernet \
        --config.metrics.clip_path=/data/clip-vit-large-patch14 \
        --config.metrics.dino_path=/data/dino-vits16

Every method personalizes each of `identities` held-out people (a face folder: one
subfolder or one photo per person, never seen by the pre-optimization or the
hypernetwork; each person's first photo, center-cropped to a square and resized to 512
px, is the one reference photo: crop it to the face beforehand) and samples the same
prompts on the same noise. Scores (`config.scoring = "reference"`, hdb_jax/evaluate.py):
Face Rec (dlib's face descriptor, from the `faces` extra), CLIP-I, CLIP-T (identifier
removed from the prompt) and DINO, against the reference photo; the encoders are read
from local folders (a CLIPModel with its tokenizer, a ViTModel such as
facebook/dino-vits16; Flax msgpack or PyTorch safetensors), nothing is downloaded.
Methods and resuming as in configs/evaluate_mini.py; the personalize kinds need a
hypernetwork trained for this base (configs/hypernet_sd15_gpu.py), the others need
nothing trained (`--methods base,lidb_dreambooth_400,dreambooth_400` runs without one).
Learning rates are the common SD1.5 choices, not tuned here. Not run here (no GPU, no
SD1.5, CLIP or DINO weights); tests/test_metrics.py runs it on the tiny model.
"""

import ml_collections

from hdb_jax import config_file


def get_config() -> ml_collections.ConfigDict:
  config = config_file.sibling(__file__, "sd15").get_config()  # model, token, personalize
  config.data = dict(source="face_folder", folder="", data_dir="")  # folder: required
  config.identities = 25          # spread evenly over the folder's identities
  config.prompts = (              # [0] is the plain prompt; [1] a place, [7] a style (figure)
      "a photo of {token} {class_name}",
      "a photo of {token} {class_name} on a beach",
      "a photo of {token} {class_name} in a forest",
      "a photo of {token} {class_name} in a city at night",
      "a photo of {token} {class_name} wearing a red hat",
      "a pop art portrait of {token} {class_name}",
      "a watercolor painting of {token} {class_name}",
      "a pencil sketch of {token} {class_name}")
  config.class_prompt = "a photo of a {class_name}"
  config.seeds = 2
  config.chunk = 4
  config.sample_steps = 50
  config.guidance_scale = 7.5
  config.seed = 0
  config.reference_method = "full"
  config.scoring = "reference"    # "recognizer" is the mini world's
  config.metrics = dict(clip_path="", dino_path="", batch_size=16)  # paths: required
  config.methods = {
      "base": dict(kind="base"),
      "hypernet_only": dict(kind="personalize", steps=0),
      "full": dict(kind="personalize"),
      "no_hypernet": dict(kind="personalize", from_zero=True),
      "lidb_dreambooth_400": dict(kind="lidb_dreambooth", steps=400, learning_rate=5e-4,
                                  batch_size=1, hflip=True),
      "lora_dreambooth_400": dict(kind="personalize", from_zero=True, steps=400),
      "dreambooth_400": dict(kind="dreambooth", steps=400, learning_rate=5e-6, batch_size=1,
                             hflip=True, prior_images=16, prior_weight=1.0),
      "textual_inversion": dict(kind="textual_inversion", steps=400, learning_rate=5e-3,
                                batch_size=1, hflip=True),
  }
  return config

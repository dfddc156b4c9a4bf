"""hdb-jax: HyperDreamBooth in JAX/Flax.

Core modules: `models` (SD components: build, load, save), `lidb` (LiDB residuals and
their pure merge), `diffusion` (loss and sampler), `dreambooth` (one-subject training).
"""

__version__ = "0.1.0"

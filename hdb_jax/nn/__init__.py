"""hdb-jax's own Flax (linen) model code: the SD UNet and VAE, CLIP, the DDIM schedule.

Parameter trees equal those of the Flax classes diffusers (<= 0.39) and transformers (< 5)
had, so their saved weights load unchanged; outputs equal the PyTorch models' in fp32.
"""

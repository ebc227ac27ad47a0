"""ldm: train and sample latent diffusion models from one command line."""

__version__ = "0.2.1"

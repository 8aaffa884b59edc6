"""voldit: Ray-distributed training and batch synthesis for VolDiT, a 3D latent diffusion transformer for CT."""

__version__ = "0.1.0"

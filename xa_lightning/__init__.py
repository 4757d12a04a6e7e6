"""xa-lightning: train, evaluate and compare adapters between diffusion models."""

__version__ = "0.1.0"

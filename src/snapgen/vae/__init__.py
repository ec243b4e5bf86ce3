"""Autoencoders: snapgen's small trained VAE, and an adapter for real diffusers VAEs (AutoencoderKL,
AutoencoderKLQwenImage, AutoencoderKLWan: ``DIFFUSERS_CLASSES``)."""

from .autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian
from .diffusers_adapter import DIFFUSERS_CLASSES, DiffusersAutoencoder, load_autoencoder

__all__ = ["Autoencoder", "AutoencoderConfig", "DIFFUSERS_CLASSES", "DiagonalGaussian", "DiffusersAutoencoder",
           "load_autoencoder"]

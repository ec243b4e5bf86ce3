"""Autoencoders: snapgen's small trained VAE, and an adapter for diffusers' AutoencoderKL (real weights)."""

from .autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian
from .diffusers_adapter import DiffusersAutoencoder, load_autoencoder

__all__ = ["Autoencoder", "AutoencoderConfig", "DiagonalGaussian", "DiffusersAutoencoder", "load_autoencoder"]

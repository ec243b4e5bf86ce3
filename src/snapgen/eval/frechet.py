"""Frechet distance between feature sets (FID's formula, on any encoder's features).

``FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` with sample means / covariances. The matrix
square root uses ``scipy.linalg.sqrtm``; as in pytorch-fid, a non-finite result is retried with ``eps * I``
added to both covariances, and tiny imaginary parts from numerical error are dropped (large ones raise).

:func:`fd_images` computes it on the pooled features of :class:`snapgen.eval.alignment.ImageEncoder`.
FD on ~200 images per set is biased upwards (it is not comparable with Inception FID numbers); compare
values computed with the same encoder and the same set sizes only.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from scipy import linalg

__all__ = ["frechet_distance", "feature_statistics", "frechet_distance_from_stats", "fd_images"]


def _as_features(x, name: str) -> np.ndarray:
    try:
        import torch
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, F] feature array, got shape {a.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows to estimate a covariance, got {a.shape[0]}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a


def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """[N, F] features -> (mean [F], covariance [F, F]) (unbiased, like numpy.cov)."""
    a = _as_features(feats, "features")
    return a.mean(axis=0), np.atleast_2d(np.cov(a, rowvar=False))


def _sqrtm(m: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # singular products warn; the caller checks finiteness and retries
        warnings.simplefilter("ignore")
        try:
            return np.asarray(linalg.sqrtm(m))
        except (ValueError, np.linalg.LinAlgError):
            return np.full_like(m, np.nan)


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: means {mu1.shape} vs {mu2.shape}, "
                         f"covariances {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has a large imaginary component "
                             f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are ill-conditioned")
        covmean = covmean.real
    fd = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    return fd  # may be a tiny negative number from round-off when the sets are identical


def frechet_distance(feats_a, feats_b, eps: float = 1e-6) -> float:
    """Frechet distance between two [N, F] feature sets (numpy arrays or torch tensors)."""
    a = _as_features(feats_a, "feats_a")
    b = _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    mu1, s1 = a.mean(0), np.atleast_2d(np.cov(a, rowvar=False))
    mu2, s2 = b.mean(0), np.atleast_2d(np.cov(b, rowvar=False))
    return frechet_distance_from_stats(mu1, s1, mu2, s2, eps=eps)


def fd_images(encoder, images_a: Sequence, images_b: Sequence) -> float:
    """Frechet distance between two image lists on ``encoder.features`` (pooled penultimate features).

    ``encoder``: an :class:`~snapgen.eval.alignment.ImageEncoder`, or None for the shipped one."""
    if encoder is None:
        from .alignment import load_image_encoder
        encoder = load_image_encoder()
    for name, imgs in (("images_a", images_a), ("images_b", images_b)):
        if len(imgs) < 2:
            raise ValueError(f"{name} needs at least 2 images, got {len(imgs)}")
    return frechet_distance(encoder.features(images_a), encoder.features(images_b))

"""Quality metrics: fidelity of a compressed model's outputs to the uncompressed model's.

numpy only, so the runtime side of a benchmark can use them without torch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["latent_rel_err", "psnr"]

# PSNR of identical images is infinite; report this ceiling instead so results stay JSON.
PSNR_CEILING_DB = 100.0


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (or batches) of one shape."""
    if image.shape != reference.shape:
        raise ValueError(f"image shapes differ: {image.shape} vs {reference.shape}")
    diff = image.astype(np.float64) - reference.astype(np.float64)
    mse = float(np.mean(diff * diff))
    if mse <= 0.0:
        return PSNR_CEILING_DB
    return min(PSNR_CEILING_DB, 10.0 * np.log10(255.0**2 / mse))


def latent_rel_err(latents: np.ndarray, reference: np.ndarray) -> float:
    """||latents - reference|| / ||reference|| (Frobenius norms over the whole array)."""
    if latents.shape != reference.shape:
        raise ValueError(f"latent shapes differ: {latents.shape} vs {reference.shape}")
    ref = reference.astype(np.float64)
    return float(np.linalg.norm(latents.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))

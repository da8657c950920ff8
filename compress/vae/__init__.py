"""`vae.replace`: swap in another VAE, such as a tiny decoder (compress/vae/replace.py)."""

from slimdiff.compress.vae.replace import ReplaceVaePass

__all__ = ["ReplaceVaePass"]

"""A pipeline loads some graphs after the bundle was verified (low memory: every call; the
VAE encoder: at the first image-to-image call). A file changed since the bundle was opened
(the folder exported again, a graph rewritten) is refused at that load, not run unverified."""

from __future__ import annotations

import os
import shutil

import pytest
from slimdiff.runtime import Text2ImagePipeline
from slimdiff.runtime.manifest import BundleError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rewrite(path, change: bool = True):
    """The file replaced under a new inode, as an export writes it: with one byte of its
    raw tensor data changed (`change`), or the same bytes."""
    tmp = path.with_name(path.name + ".new")
    data = bytearray(path.read_bytes())
    if change:
        data[-1] ^= 0x01  # another file: refused by its hash before anything parses it
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)


def test_a_graph_replaced_after_open_is_refused_at_its_next_load(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("sd15")[1], bundle)
    pipe = Text2ImagePipeline.from_bundle(bundle, low_memory=True)
    pipe("a red circle", steps=1, output="latent")
    _rewrite(bundle / "unet" / "model.onnx")
    with pytest.raises(BundleError, match=r"unet/model\.onnx changed since the bundle was "
                       r"opened and verified .* open the bundle again"):  # fmt: skip
        pipe("a red circle", steps=1, output="latent")
    # a new pipeline verifies what the folder holds now: here refused, the bytes changed
    with pytest.raises(BundleError, match=r"unet/model\.onnx does not match its SHA-256"):
        Text2ImagePipeline.from_bundle(bundle, low_memory=True)


def test_a_graph_touched_or_copied_back_unchanged_loads(tiny_bundle, tmp_path):
    """Inode, size or mtime moved but not the bytes (a `touch`, a restore from backup):
    hashed again at the load, and run."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("sd15")[1], bundle)
    pipe = Text2ImagePipeline.from_bundle(bundle, low_memory=True)
    first = pipe("a red circle", steps=1, output="latent").latents
    _rewrite(bundle / "unet" / "model.onnx", change=False)
    os.utime(bundle / "text_encoder" / "model.onnx")
    assert (pipe("a red circle", steps=1, output="latent").latents == first).all()


def test_a_resident_pipeline_never_reloads_and_keeps_running(tiny_bundle, tmp_path):
    """Loaded at open, the graphs are in memory: a later change on disk does not touch
    them, and the pipeline runs on as verified."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("sd15")[1], bundle)
    pipe = Text2ImagePipeline.from_bundle(bundle)
    first = pipe("a red circle", steps=1, output="latent").latents
    _rewrite(bundle / "unet" / "model.onnx")
    assert (pipe("a red circle", steps=1, output="latent").latents == first).all()


def test_the_vae_encoder_loaded_at_the_first_image_call_is_checked(tiny_bundle, tmp_path):
    """The encoder loads on demand even in the resident mode (text-to-image never pays for
    it): one swapped before the first image-to-image call is refused."""
    import numpy as np

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("sd15")[1], bundle)
    assert (bundle / "vae_encoder" / "model.onnx").is_file()
    pipe = Text2ImagePipeline.from_bundle(bundle)
    _rewrite(bundle / "vae_encoder" / "model.onnx")
    image = np.full((64, 64, 3), 128, np.uint8)
    with pytest.raises(BundleError, match=r"vae_encoder/model\.onnx changed since"):
        pipe("a red circle", steps=2, image=image, output="latent")

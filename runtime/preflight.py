"""What a run checks before it samples, for `slimdiff verify`: beyond the files' hashes
(runtime/bundle_files.py), the bundle's scheduler config builds a scheduler the runtime
has, its tokenizer files parse, and (with a backend) every graph loads and takes and
returns what the manifest declares.

Example:
    >>> bundle = open_bundle("out/bundle")                        # doctest: +SKIP
    >>> check_parts(bundle)                                       # doctest: +SKIP
    >>> check_graphs(bundle, get_backend("ort-cpu"))              # doctest: +SKIP
    ['text_encoder', 'unet', 'vae_decoder']
"""

from __future__ import annotations

import logging

from slimdiff.runtime.backends import Backend
from slimdiff.runtime.bundle_files import Bundle
from slimdiff.runtime.scheduler_choice import check_scheduler
from slimdiff.runtime.sessions import check_backend_fits, load_component
from slimdiff.runtime.text_encoder import bundle_tokenizer

__all__ = ["check_graphs", "check_parts"]

log = logging.getLogger(__name__)


def check_parts(bundle: Bundle) -> None:
    """The in-process parts a run reads before any graph loads: the scheduler config (built
    and set to the bundle's default schedule) and each text encoder's tokenizer. Raises
    BundleError naming the file."""
    config = bundle.manifest.pipeline
    check_scheduler(bundle.root, config, bundle.read_json(config.scheduler, infinities=True))
    for record in config.text_encoders:
        bundle_tokenizer(bundle, record)


def check_graphs(bundle: Bundle, runner: Backend) -> list[str]:
    """Load each graph on `runner`, one at a time (the peak is the largest one's), and check
    its inputs and outputs against the manifest, as a run's load does; the names checked."""
    check_backend_fits(runner, bundle)
    names = list(bundle.manifest.components)
    for name in names:
        log.info("loading %s to check it", name)
        session = load_component(runner, bundle, name)
        del session  # freed before the next one loads
    return names

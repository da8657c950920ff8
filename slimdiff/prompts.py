"""Built-in prompt sets: calibration and bench defaults (no data set download)."""

from __future__ import annotations

import logging
from pathlib import Path

from slimdiff.errors import UserError
from slimdiff.textfile import read_text_file

__all__ = ["BENCH_PROMPTS", "CALIBRATION_PROMPTS", "read_prompts"]

log = logging.getLogger(__name__)

# A prompt list of 100,000 captions is a few MiB; more is a wrong path.
PROMPT_FILE_BYTES = 64 << 20

# Short, varied captions in the style of COCO / Conceptual Captions.
CALIBRATION_PROMPTS = [
    "a photo of a red car parked on a city street at night",
    "a watercolor painting of a mountain lake at sunrise",
    "a small dog sitting on a wooden floor next to a window",
    "a bowl of fresh fruit on a kitchen table, high quality photo",
    "an old man with a white beard wearing a blue hat, portrait",
    "a futuristic city skyline with tall glass buildings, digital art",
    "a cat sleeping on a pile of books",
    "a sailing boat on a calm sea under a cloudy sky",
    "a forest path covered with autumn leaves",
    "a plate of pasta with tomato sauce and basil",
    "a yellow flower in a field of green grass",
    "a snowy village with small houses and a church",
    "a close-up photo of a bird on a branch",
    "a child flying a kite on a beach",
    "a vintage bicycle leaning against a brick wall",
    "a bright star in a dark night sky over the desert",
    "a horse running across a field at sunset",
    "an oil painting of a bridge over a river",
    "a cup of coffee on a table in a cafe",
    "a green circle and a red square on a white background",
    "a woman reading a book in a park",
    "a lighthouse on a rocky coast",
    "a bowl of soup with bread, studio lighting",
    "a large tree with pink flowers in spring",
    "a black and white photo of a train station",
    "a blue triangle on the left and a yellow cross on the right",
    "a mountain road through a pine forest",
    "a plate of cookies next to a glass of milk",
    "a sketch of a house with a garden",
    "a fish swimming in clear water near rocks",
    "a street market with colorful umbrellas",
    "a modern living room with a gray sofa",
]

# Fidelity is measured on prompts no calibration (hence no distillation) has seen.
BENCH_PROMPTS = [
    "a red bicycle leaning against a blue door",
    "a bowl of oranges on a wooden table by a window",
    "a snowy mountain peak under a clear blue sky, photo",
    "an astronaut reading a newspaper in a cafe, digital art",
]


def read_prompts(source: str | list[str], limit: int | None = None) -> list[str]:
    """Prompts from "builtin", a text file (one per line, # comments) or a list."""
    if isinstance(source, list):
        prompts = source
    elif source == "builtin":
        prompts = CALIBRATION_PROMPTS
    else:
        path = Path(source)
        if not path.exists():
            raise UserError(f"prompt file {path} not found; pass 'builtin' or a text file")
        # a size limit, UTF-8 and a regular file checked, each refused in one line
        text = read_text_file(path, "prompt list", "text file", PROMPT_FILE_BYTES)
        prompts = [s.strip() for s in text.splitlines()]
        prompts = [s for s in prompts if s and not s.startswith("#")]
    if not prompts:
        raise UserError(f"no prompts in {source!r}")
    if limit and len(prompts) < limit:
        where = "the list" if isinstance(source, list) else repr(source)
        log.warning(
            "calibration.num_prompts is %d, but %s holds %d prompts: calibrating on %d; give "
            "calibration.prompts a text file of %d or more (EcoDiff's SDXL masks: 100)",
            limit,
            where,
            len(prompts),
            len(prompts),
            limit,
        )
    return list(prompts[:limit] if limit else prompts)

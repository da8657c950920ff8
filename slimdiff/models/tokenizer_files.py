"""Real tokenizer files for the built-in models, generated locally (no hub download).

CLIP: a byte-level BPE in CLIP's own format (byte alphabet, the same alphabet with the
"</w>" end-of-word suffix, merges, then <|startoftext|> and <|endoftext|>), built from a
fixed word list so common prompt words are single tokens. T5: a SentencePiece-style
Unigram vocabulary. Both load with transformers' CLIPTokenizer / T5Tokenizer and save the
`tokenizer.json` that the torch-free runtime reads with the `tokenizers` library.
"""

from __future__ import annotations

from functools import cache

__all__ = ["WORDS", "make_clip_tokenizer", "make_t5_tokenizer"]

# Words a user or the toy model is likely to prompt with; everything else still tokenizes
# (byte fallback), just into more pieces.
WORDS = [
    "a",
    "an",
    "the",
    "of",
    "and",
    "or",
    "with",
    "in",
    "on",
    "at",
    "to",
    "from",
    "by",
    "for",
    "is",
    "are",
    "this",
    "that",
    "it",
    "its",
    "over",
    "under",
    "near",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "centre",
    "middle",
    "above",
    "below",
    "beside",
    "between",
    "behind",
    "front",
    "back",
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "gray",
    "grey",
    "cyan",
    "magenta",
    "gold",
    "silver",
    "dark",
    "light",
    "bright",
    "pale",
    "small",
    "large",
    "big",
    "tiny",
    "huge",
    "little",
    "tall",
    "short",
    "wide",
    "round",
    "circle",
    "square",
    "triangle",
    "cross",
    "star",
    "heart",
    "ring",
    "dot",
    "line",
    "box",
    "shape",
    "shapes",
    "object",
    "objects",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "many",
    "several",
    "some",
    "pair",
    "photo",
    "photograph",
    "picture",
    "image",
    "painting",
    "drawing",
    "sketch",
    "render",
    "illustration",
    "portrait",
    "cat",
    "dog",
    "bird",
    "horse",
    "fish",
    "car",
    "house",
    "tree",
    "flower",
    "mountain",
    "river",
    "sea",
    "sky",
    "cloud",
    "sun",
    "moon",
    "city",
    "street",
    "road",
    "forest",
    "field",
    "beach",
    "snow",
    "rain",
    "night",
    "day",
    "morning",
    "evening",
    "sunset",
    "sunrise",
    "light",
    "man",
    "woman",
    "person",
    "child",
    "people",
    "face",
    "hand",
    "eye",
    "hair",
    "smile",
    "dress",
    "shirt",
    "hat",
    "glasses",
    "high",
    "quality",
    "detailed",
    "realistic",
    "cinematic",
    "style",
    "art",
    "digital",
    "oil",
    "watercolor",
    "vintage",
    "modern",
    "blurry",
    "lowres",
    "ugly",
    "bad",
    "worst",
    "jpeg",
    "artifacts",
    "noise",
    "noisy",
    "background",
    "plain",
    "textured",
    "pattern",
]


def _byte_alphabet() -> list[str]:
    # GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest to 256+.
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@cache
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    seen = set(tokens)
    for word in dict.fromkeys(WORDS):  # ordered, de-duplicated
        symbols = [*word[:-1], word[-1] + "</w>"]
        # Chain merges left to right: ("r","e") -> "re", ("re","d</w>") -> "red</w>".
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in seen:
                merges.append((left, right))
                tokens.append(merged)
                seen.add(merged)
            left = merged
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def make_clip_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer with a generated vocabulary (SDXL's second tokenizer pads with "!")."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token)
    tok.model_max_length = max_length
    return tok


def clip_vocab_size() -> int:
    return len(_clip_vocab_and_merges()[0])


@cache
def _t5_vocab() -> list[tuple[str, float]]:
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    seen = {p for p, _ in pieces}
    # Whole words first (likelier, so Unigram prefers them), then letters and digits.
    for i, word in enumerate(dict.fromkeys(WORDS)):
        piece = "\u2581" + word
        if piece not in seen:
            pieces.append((piece, -2.0 - i * 1e-3))
            seen.add(piece)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()\u2581"
    for c in chars:
        if c not in seen:
            pieces.append((c, -8.0))
            seen.add(c)
    return pieces


def make_t5_tokenizer(max_length: int = 256):
    """A T5Tokenizer (Unigram) with a generated vocabulary."""
    from transformers import T5Tokenizer

    tok = T5Tokenizer(vocab=list(_t5_vocab()), extra_ids=0)
    tok.model_max_length = max_length
    return tok


def t5_vocab_size() -> int:
    return len(_t5_vocab())

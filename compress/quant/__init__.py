"""`quant.quest`: QuEST low-bit quantization with selective finetuning (compress/quant/quest.py).

Importing this package registers the pass and its edit type only (config.py and edits.py
are pure data): torch loads when the pass runs or an artifact is restored.
"""

from slimdiff.compress.quant.quest import QuestPass

__all__ = ["QuestPass", "apply_quest"]


def apply_quest(p, pipe, calib):
    from slimdiff.compress.quant.run import apply_quest as run

    return run(p, pipe, calib)

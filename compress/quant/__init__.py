"""`quant.quest`: QuEST low-bit quantization with selective finetuning (compress/quant/quest.py).

Importing this package registers the pass and its edit type only (config.py and edits.py
are pure data): torch loads when the pass runs or an artifact is restored.
"""

from slimdiff.compress.quant.quest import QuestPass

__all__ = ["QuestPass"]

"""`text.drop`: remove text encoders a family's pipeline runs without (compress/text/drop.py)."""

from slimdiff.compress.text.drop import DropTextPass

__all__ = ["DropTextPass"]

"""The application layer: what the CLI drives, built on the stages below it.

`flow` (recipe -> compress -> export, cached) and `bench` (per recipe: latency, size and
quality side by side) drive slimdiff.compress, slimdiff.export and slimdiff.runtime; the
core (recipe schema, models, calibration, artifact) imports none of them.
"""

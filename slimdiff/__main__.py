"""`python -m slimdiff` is the `slimdiff` command."""

from slimdiff.cli import main

main()

"""Command-line tools that work on run folders and checkpoints (``python -m hydrahead.tools.NAME``)."""

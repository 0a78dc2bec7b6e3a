"""``python -m edgedx``: the same as the ``edgedx`` command."""

from .cli import main

main()

"""``python -m murajax``: the ``murajax`` command (murajax/cli.py)."""

from murajax.cli import main

main()

"""``python -m cli ...``: the same as the ``pixelmill`` command."""

from cli.main import main

main()

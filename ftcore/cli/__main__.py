"""``python -m ftcore.cli``: what launched ranks run (the same command as ``ftcore``)."""

from ftcore.cli import main

main()

"""`python -m jarvis` is the `jarvis` CLI."""

from jarvis.cli import main

main()

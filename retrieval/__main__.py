"""`python -m retrieval` runs the CLI, like the `retrieve` console script."""

from retrieval.cli import main

main()

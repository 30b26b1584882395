"""`python -m ionet ...` runs the `ionet` command."""

from ionet._cli import main

main()

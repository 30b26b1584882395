"""The `ionet` command (start, status, stop, ...), run by the native module."""

import sys

from ionet import _ionet


def main() -> None:
    sys.exit(_ionet.cli_main(sys.argv[1:]))

"""The ``billing`` console script's first code: quiet on Ctrl-C and SIGTERM from the first instant.

Importing the CLI (pydantic, psycopg, Temporal) takes a noticeable part of a second; a Ctrl-C in that
time would print a KeyboardInterrupt traceback from the middle of an import. Nothing has been started
yet then, so leaving at once (130 / 143, the shell's convention) is the whole clean-up.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from types import FrameType


def _leave(signum: int, frame: FrameType | None) -> None:
    os._exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``billing`` script: import the CLI under quiet signal handlers, then run it."""
    previous_sigint = signal.signal(signal.SIGINT, _leave)
    signal.signal(signal.SIGTERM, _leave)
    from billing.cli.main import main as cli_main

    # From here a Ctrl-C is a KeyboardInterrupt the CLI ends quietly (130). SIGTERM keeps leaving at
    # once until a long-running command (dev, worker, api) installs its own handler for a clean stop.
    signal.signal(signal.SIGINT, previous_sigint)
    return cli_main(argv)

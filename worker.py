"""``python worker.py`` runs a worker against the configured PostgreSQL and Temporal (same as
``billing worker``). Scale out by starting more of them on the same task queue.

The wiring (which workflows and activities run) is billing/cli/wiring.py; its names are re-exported
here for callers that import them from ``worker``.
"""

from __future__ import annotations

import sys

from billing.cli.wiring import WORKFLOWS, activities, build_worker

__all__ = ["WORKFLOWS", "activities", "build_worker"]

if __name__ == "__main__":
    from billing.cli.main import main

    sys.exit(main(["worker", *sys.argv[1:]]))

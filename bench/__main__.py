"""``python -m bench`` (``make bench``): run every benchmark of the project."""

from __future__ import annotations

import asyncio
import sys

from bench import sync


def main() -> int:
    """Run the benchmarks one after the other; the exit status is the first failure's."""
    return asyncio.run(sync.main([]))


if __name__ == "__main__":
    sys.exit(main())

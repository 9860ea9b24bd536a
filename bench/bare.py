"""The ceiling of ``bench.quota``: a bare Starlette endpoint answering the quota check's JSON.

    python -m bench.bare --port N

No auth, no database, no middleware: one route returning ``{"msg": "ok"}``, served with the very
uvicorn set-up the API uses (billing.cli.services.uvicorn_config) on the same event loop (uvloop).
"""

from __future__ import annotations

import argparse
import sys

import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from billing.cli.services import uvicorn_config


async def quota(request: Request) -> JSONResponse:
    """What the API answers for an unflagged project."""
    return JSONResponse({"msg": "ok"})


def main(argv: list[str] | None = None) -> int:
    """Serve until killed."""
    parser = argparse.ArgumentParser(prog="python -m bench.bare")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    app = Starlette(routes=[Route("/v1/projects/{project_id}/quota", quota, methods=["GET"])])
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", args.port))
    uvloop.run(server.serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())

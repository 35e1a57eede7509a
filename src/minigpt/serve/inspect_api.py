"""The server's inspect view: `GET /inspect` (the page) and `POST /v1/inspect` (the arrays).

POST /v1/inspect takes {"text": "...", "top_k": 5} and answers `Inspection.to_dict()`: tokens,
pieces, prob, surprise (bits), top_ids/top_pieces/top_probs, attention (n_layer, n_head, T, T)
and segments; see docs/inspect.md. It sits behind the same API key as the other /v1 routes. The
page is the one `minigpt inspect` writes, here without data: it asks this endpoint instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse

from ..engine import Engine
from ..errors import MiniGPTError
from . import openai_api as oa
from .openai_api import APIError

MAX_TOP_K = 20


def parse_inspect_request(data: Any) -> tuple[str, int]:
    """-> (text, top_k), or a 400 naming the field that is wrong."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    text, top_k = data.get("text"), data.get("top_k", 5)
    if not isinstance(text, str):
        raise APIError(400, "'text' must be a string", param="text")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise APIError(400, f"'top_k' must be an integer from 1 to {MAX_TOP_K}", param="top_k")
    return text, top_k


def register_inspect(app: FastAPI, engine: Engine, auth: Callable[[Request], None],
                     read_body: Callable[[Request], Awaitable[bytes]]) -> None:
    """Add the page and the endpoint to `app`; `auth` and `read_body` are the server's own."""
    page = resources.files("minigpt.serve").joinpath("static/inspect.html").read_text("utf-8")

    @app.get("/inspect", include_in_schema=False)
    async def inspect_page() -> HTMLResponse:
        return HTMLResponse(page)

    router = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @router.post("/inspect")
    async def inspect(request: Request) -> dict[str, Any]:
        text, top_k = parse_inspect_request(oa.parse_json(await read_body(request)))

        def run() -> dict[str, Any]:
            return engine.inspect(text, top_k=top_k).to_dict()

        try:  # one forward pass, but not on the event loop: other requests keep streaming
            return await asyncio.to_thread(run)
        except MiniGPTError as e:  # empty, too long, unknown characters: the user's text
            raise APIError(400, str(e), param="text") from None

    app.include_router(router)

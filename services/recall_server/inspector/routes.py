"""The inspector's addresses on the recall server: the pages (/ui/, /ui/users/{id}, /ui/items/{id}; one HTML shell,
rendered by static/inspector.js from the address), the static files (/ui/static/) and the JSON they read
(/ui/api/...). docs/inspector.md lists them."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Request
from fastapi import Path as FPath
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from services.openapi import error, id_schema, invalid, text
from services.recall_server.app import RecallService
from services.recall_server.inspector.views import Inspector, InspectorError
from services.recall_server.schemas import ClickAnswer, ItemPage, Overview, UserPage

log = logging.getLogger("recall_server.inspector")

STATIC = Path(__file__).resolve().parent / "static"
NO_CACHE = {"cache-control": "no-cache"}
CREDENTIALS = ("x-api-key", "authorization")  # passed on with a click, for the feature server to judge


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS),
                    status_code=status, media_type="application/json", headers=NO_CACHE)


async def _answer(make: Callable[[], Awaitable[Any]]) -> Response:
    """The JSON of `make()`; an InspectorError as its status and {"detail"}; anything else a 500 naming the
    inspector (kept out of the /recall error counters)."""
    try:
        return _json(await make())
    except InspectorError as exc:
        return _json({"detail": exc.detail}, exc.status)
    except Exception as exc:  # must be unreachable by any input
        log.exception("inspector: internal error")
        return _json({"detail": f"internal error in the inspector: {type(exc).__name__}: {exc}"[:300]}, 500)


def mount_inspector(app: FastAPI, service: RecallService, default_k: int, max_k: int) -> None:
    """Add the inspector's pages, static files and JSON endpoints under /ui to the recall server's app."""
    inspector = Inspector(service, default_k, max_k)
    page = (STATIC / "index.html").read_bytes()

    def shell() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=NO_CACHE)

    @app.get("/ui", include_in_schema=False)
    async def ui_root() -> Response:
        return RedirectResponse("/ui/")

    @app.get("/ui/", include_in_schema=False)
    async def ui_overview() -> Response:
        return shell()

    @app.get("/ui/users/{user_id:path}", include_in_schema=False)
    async def ui_user(user_id: str) -> Response:
        return shell()

    @app.get("/ui/items/{item_id:path}", include_in_schema=False)
    async def ui_item(item_id: str) -> Response:
        return shell()

    app.mount("/ui/static", StaticFiles(directory=STATIC), name="inspector-static")

    tags = ["inspector (/ui/)"]

    @app.get("/ui/api/overview", tags=tags, response_model=Overview,
             summary="Every channel: versions, artifacts, last nightly, serving health; the latest evaluation report")
    async def api_overview() -> Response:
        return await _answer(inspector.overview)

    @app.get("/ui/api/users/{user_id:path}", tags=tags, response_model=UserPage,
             summary="A user's features and recent clicks, the traced /recall answer and every channel's own list",
             openapi_extra={"parameters": [{"name": "k", "in": "query", "schema": {
                                               "type": "integer", "minimum": 1, "maximum": max_k,
                                               "default": default_k}}]},
             responses={404: error("Not Found: an id with a line break (the route does not match it)"),
                        422: invalid("a bad user id or k"), 503: error("Redis unavailable")})
    async def api_user(user_id: Annotated[str, FPath(json_schema_extra=id_schema("external user id"))],
                       request: Request) -> Response:
        return await _answer(lambda: inspector.user(user_id, request.query_params.get("k")))

    @app.get("/ui/api/items/{item_id:path}", tags=tags, response_model=ItemPage,
             summary="An item's features, popularity and neighbours in every i2i channel",
             responses={404: error("an item unknown to the id map, the features, the events and the registrations"),
                        422: invalid("a bad item id"), 503: error("Redis unavailable")})
    async def api_item(item_id: Annotated[str, FPath(json_schema_extra=id_schema("external item id"))]) -> Response:
        return await _answer(lambda: inspector.item(item_id))

    @app.post("/ui/api/clicks", tags=tags, response_model=ClickAnswer,
              summary="Post a click {\"user_id\", \"item_id\"} to the feature server's POST /events (the page's "
                      "button; the browser cannot reach the feature server itself)",
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "type": "object", "required": ["user_id", "item_id"],
                  "properties": {"user_id": id_schema("external user id"), "item_id": id_schema("external item id")},
                  }}}}},
              responses={**{s: {"model": ClickAnswer, "description": f"the feature server's {s} answer"}
                            for s in (401, 403, 413, 422, 503)},
                         502: error("the feature server is unreachable")})
    async def api_click(request: Request) -> Response:
        try:
            creds = {k: v for k, v in request.headers.items() if k in CREDENTIALS}
            status, body = await inspector.post_click(await request.body(), creds)
        except InspectorError as exc:
            return _json({"detail": exc.detail}, exc.status)
        return _json(body, status)

    @app.get("/ui/api/evaluation/recall_at_k.png", tags=tags, summary="HR@K plot of the latest evaluation report",
             response_class=FileResponse, responses={200: text("the plot", "image/png"),
                                                     404: error("no evaluation plot under EVAL_DIR")})
    async def api_eval_plot() -> Response:
        plot = inspector.evaluation_plot()
        if plot is None:
            return _json({"detail": f"no evaluation plot under EVAL_DIR={service.settings.eval_dir}"}, 404)
        return FileResponse(plot, media_type="image/png", headers=NO_CACHE)

"""The server's routes are module-level functions of `llava_ft.serve.app` (one per route, readable and
importable on their own), sharing one `ServerState` on `app.state.server` instead of closures."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from fastapi.routing import APIRoute  # noqa: E402

from llava_ft.serve import app as serve_app  # noqa: E402


class _NoModel:
    supports_images = False
    context_length = 64


def test_every_route_is_a_module_level_function():
    app = serve_app.create_app(_NoModel(), "tiny", api_key="k")
    # FastAPI 0.165+ keeps included routers whole (`original_router`); older versions copy their routes.
    routers = [getattr(r, "original_router", None) for r in app.routes]
    flat = [r for r in app.routes if isinstance(r, APIRoute)] + [
        r for router in routers if router is not None for r in router.routes if isinstance(r, APIRoute)]
    routes = {r.path: r.endpoint for r in flat}
    assert set(routes) == {"/health", "/v1/models", "/v1/models/{model_id:path}", "/v1/chat/completions", "/"}
    for path, endpoint in routes.items():
        assert "<locals>" not in endpoint.__qualname__, path
        assert getattr(serve_app, endpoint.__name__) is endpoint, path
    state = app.state.server
    assert (state.model_name, state.api_key, state.context_length) == ("tiny", "k", 64)

"""The Starlette application: routes, the API key, OpenAI-shaped errors, the chat page.

Owns `create_app(state)`. Routes: `GET /` (the chat page, `assets/chat.html`), `GET /health`,
`GET /v1/models` (and `/v1/models/{id}`), `POST /v1/chat/completions`, `POST /v1/completions`
(generate_routes), `POST /v1/embeddings`, `POST /v1/classify`. Every failure of a request is
answered with OpenAI's error body and a 4xx (a 500 only for a bug), and the server goes on.
With an API key, every /v1 route wants `Authorization: Bearer KEY`; the page asks for the key.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from lmforge.inference.classifier import class_probabilities
from lmforge.inference.embedder import embed
from lmforge.serve.errors import APIError, bad_request
from lmforge.serve.generate_routes import chat_completions, completions
from lmforge.serve.params import Fields
from lmforge.serve.served import ServedModel
from lmforge.serve.state import ServerState

log = logging.getLogger("lmforge.serve")
Handler = Callable[[Request, ServerState], Awaitable[object]]


def _texts(value: object, param: str = "input") -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad_request(f"'{param}' must be a string or a non-empty list of strings", param=param)
    if len(texts) > 2048:
        raise bad_request(f"'{param}' holds {len(texts)} texts; at most 2048 per request", param=param)
    return texts


def _model_card(served: ServedModel) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "lmforge",
            "kind": served.kind, "abilities": list(served.abilities), "context": served.context,
            "path": str(served.loaded.path)}


async def list_models(request: Request, state: ServerState) -> object:
    return JSONResponse({"object": "list", "data": [_model_card(m) for m in state.models.values()]})


async def get_model(request: Request, state: ServerState) -> object:
    name = request.path_params["name"]
    if name not in state.models:
        raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
    return JSONResponse(_model_card(state.models[name]))


async def embeddings(request: Request, state: ServerState) -> object:
    f = Fields(await state.read_body(request))
    served = state.model_for(f, "embeddings")
    texts = _texts(f.required("input"))
    encoding = f.string("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad_request("'encoding_format' must be \"float\" or \"base64\"", param="encoding_format")
    if f.raw("dimensions") is not None:
        raise bad_request("'dimensions' is not supported: the vectors have the model's width", param="dimensions")
    f.done()

    def run():
        with served.lock:
            return embed(served.loaded, texts)

    result = await asyncio.to_thread(run)
    vectors = result.mean.astype(np.float32)  # (N, C): mean over the tokens, as sentence-transformers pools
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if encoding == "base64" else v.tolist()}
            for i, v in enumerate(vectors)]
    tokens = sum(len(t) for t in result.tokens)
    return JSONResponse({"object": "list", "data": data, "model": served.name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def classify(request: Request, state: ServerState) -> object:
    f = Fields(await state.read_body(request))
    served = state.model_for(f, "classify")
    texts = _texts(f.required("input"))
    f.done()

    def run():
        with served.lock:
            return class_probabilities(served.loaded, texts)

    probs = await asyncio.to_thread(run)  # (N, labels)
    labels = served.labels
    data = [{"object": "classification", "index": i, "label": labels[int(row.argmax())],
             "probabilities": {name: float(p) for name, p in zip(labels, row.tolist())}}
            for i, row in enumerate(probs)]
    tokens = sum(len(e.ids) for e in served.loaded.tokenizer.encode_batch(texts, add_special_tokens=False))
    return JSONResponse({"object": "list", "data": data, "model": served.name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def health(request: Request, state: ServerState) -> object:
    return JSONResponse({"status": "ok", "models": list(state.models),
                         "busy": {m.name: m.scheduler.busy for m in state.models.values() if m.scheduler}})


async def page(request: Request, state: ServerState) -> object:
    html = resources.files("lmforge").joinpath("assets/chat.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"cache-control": "no-cache"})


def _endpoint(handler: Handler, state: ServerState, authorized: bool = True):
    """The route's function: checks the key, turns every failure into OpenAI's error body."""

    async def endpoint(request: Request) -> object:
        try:
            if authorized and state.api_key is not None:
                _check_key(request, state.api_key)
            return await handler(request, state)
        except APIError as err:
            return err.response()
        except ValueError as err:  # a user's input the library refused (its message names it)
            return bad_request(str(err)).response()
        except Exception as err:
            log.exception("request failed")
            return APIError(500, f"internal error: {type(err).__name__}: {err}", code="server_error").response()

    return endpoint


def _check_key(request: Request, key: str) -> None:
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer KEY' with the server's "
                       "--api-key", code="invalid_api_key")


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return APIError(exc.status_code, message, code=code).response()


def create_app(state: ServerState) -> Starlette:
    """The application over `state`; its shutdown finishes the running requests' schedulers."""
    routes = [
        Route("/", _endpoint(page, state, authorized=False), methods=["GET"]),
        Route("/health", _endpoint(health, state, authorized=False), methods=["GET"]),
        Route("/v1/models", _endpoint(list_models, state), methods=["GET"]),
        Route("/v1/models/{name:path}", _endpoint(get_model, state), methods=["GET"]),
        Route("/v1/chat/completions", _endpoint(chat_completions, state), methods=["POST"]),
        Route("/v1/completions", _endpoint(completions, state), methods=["POST"]),
        Route("/v1/embeddings", _endpoint(embeddings, state), methods=["POST"]),
        Route("/v1/classify", _endpoint(classify, state), methods=["POST"]),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await asyncio.to_thread(state.close)

    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error}, lifespan=lifespan)

"""What every request handler reads: the served models, the limits, the API key.

Owns `ServerState`: `model_for` finds the request's model (its `model` field, or the only
model that can do the task when the field is left out) and refuses an unknown name (404) or a
model that cannot do the task (400); `read_body` reads the body within the size limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from lmforge.serve.errors import APIError, bad_request
from lmforge.serve.params import MAX_BODY_BYTES, Fields, read_json
from lmforge.serve.served import ServedModel


@dataclass
class ServerState:
    models: dict[str, ServedModel]
    max_tokens: int
    """The most new tokens one request may ask for."""
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES

    async def read_body(self, request: Request) -> dict:
        return await read_json(request, self.max_body_bytes)

    def model_for(self, fields: Fields, ability: str) -> ServedModel:
        name = fields.string("model", None)
        if name is None:
            able = [m for m in self.models.values() if ability in m.abilities]
            if len(able) != 1:
                raise bad_request(f"'model' is required: name one of {', '.join(self.models)}", param="model",
                                  code="missing_required_parameter")
            return able[0]
        served = self.models.get(name)
        if served is None:
            raise APIError(404, f"the model '{name}' does not exist; this server has {', '.join(self.models)}",
                           param="model", code="model_not_found")
        if ability not in served.abilities:
            raise bad_request(f"the model '{name}' (a {served.kind} checkpoint) cannot do {ability}; it does "
                              f"{', '.join(served.abilities)}", param="model", code="model_not_supported")
        return served

    def close(self) -> None:
        for served in self.models.values():
            served.close()

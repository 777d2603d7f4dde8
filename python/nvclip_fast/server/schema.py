"""The HTTP API's requests, responses and errors, declared once: validation, OpenAPI docs and tests.

``POST /v1/embeddings`` follows NVIDIA's NV-CLIP NIM schema, itself OpenAI's embeddings API with
images as data URLs. Errors carry both shapes clients look for: OpenAI's
``{"error": {"message", "type", "param", "code"}}`` (the official client reads ``body["error"]``)
and RFC 9457 problem details ``{"type", "title", "status", "detail"}`` (NIM's clients).
"""

from __future__ import annotations

import http
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

ENCODING_FORMATS = ("float", "base64")
PROBLEM_TYPE = "about:blank"  # RFC 9457: the status code says it all; title = the status phrase

# OpenAI's error types.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable"


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", dict: "an object", list: "an array"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``. Each input is a text or a ``data:image/<type>;base64,<data>`` URL;
    texts and images may be mixed in one request. Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    input: str | list[str] = Field(
        description="a string or an array of strings: texts and/or data:image/<type>;base64,<data> URLs",
        examples=[["a photo of a cat", "data:image/png;base64,iVBORw0KGgo..."]],
    )
    model: str | None = Field(None, description="the served model's name (GET /v1/models); optional")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: arrays of numbers; base64: little-endian float32 bytes, base64-encoded"
    )
    dimensions: int | None = Field(
        None, description="accepted only when equal to the model's embedding size (no truncation)"
    )
    user: str | None = Field(None, description="ignored (OpenAI's end-user id)")

    @field_validator("input", mode="before")
    @classmethod
    def _strings(cls, value: Any) -> Any:
        # One clear message per wrong type (pydantic's union errors would list both members).
        if isinstance(value, list):
            if not value:
                raise PydanticCustomError("empty_input", "input is empty: give at least one text or image")
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise PydanticCustomError(
                        "input_item_type",
                        "input[{index}] must be a string (a text or a data:image URL), got {got}",
                        {"index": i, "got": _json_type(item)},
                    )
        elif not isinstance(value, str):
            raise PydanticCustomError(
                "input_type",
                "input must be a string or an array of strings, got {got}",
                {"got": _json_type(value)},
            )
        return value

    def items(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class Usage(BaseModel):
    num_images: int
    prompt_tokens: int = Field(description="text tokens, padding excluded")
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding] = Field(description="one row per input, in input order")
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="when the server loaded it (Unix seconds)")
    owned_by: str = "nvclip-fast"
    dimensions: int
    image_size: int
    text: bool = Field(description="whether texts can be embedded (the model has a text tower)")
    random_weights: bool = False
    warning: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    object: Literal["health.response"] = "health.response"
    status: Literal["live", "ready", "loading", "failed", "stopping"]
    message: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error: OpenAI's ``error`` object and RFC 9457 problem details side by side."""

    error: ErrorDetail
    type: str = PROBLEM_TYPE
    title: str
    status: int
    detail: str


def _error_type(status: int) -> str:
    if status == http.HTTPStatus.UNAUTHORIZED:
        return AUTHENTICATION
    if status == http.HTTPStatus.SERVICE_UNAVAILABLE:
        return UNAVAILABLE
    return SERVER_ERROR if status >= http.HTTPStatus.INTERNAL_SERVER_ERROR else INVALID_REQUEST


class ApiError(Exception):
    """An error answered to the client as :class:`ErrorResponse` (raised anywhere under a route)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _error_type(status)
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code),
            title=http.HTTPStatus(self.status).phrase,
            status=self.status,
            detail=self.message,
        )


# The error responses every route may give, for the OpenAPI docs.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": http.HTTPStatus(status).phrase}
    for status in (400, 401, 404, 413, 422, 500, 503)
}

"""Request bodies of dq-serve and their checks: every bad input becomes one ApiError line.

Checked before a request is queued, so a bad request never costs a slot or the worker's time.
Bodies are parsed by hand (not by FastAPI's body injection) so that malformed JSON, a wrong
content type and a bad field each get their own status and a one-line message.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deploy.feature_cache import parse_cache
from deploy.pipeline import MAX_GUIDANCE
from deploy.schedulers import scheduler_name
from dq_export.errors import UserError

MAX_STEPS = 150
MAX_SEED = 2**32 - 1
SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class ApiError(Exception):
    """An HTTP error answered as ``{"error": {"message": ..., "type": ...}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind}}


class GenerateRequest(BaseModel):
    """POST /generate: one prompt, one PNG."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    negative_prompt: str | None = None
    size: str | None = None  # "WIDTHxHEIGHT"; only the export's size is compiled
    steps: int = Field(50, ge=1, le=MAX_STEPS)
    guidance: float = Field(7.5, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)  # None: the server draws one
    scheduler: str = "pndm"
    cache: str | int | None = None  # feature cache: "auto", "off" or an interval N (None: auto)


class ImagesRequest(GenerateRequest):
    """POST /v1/images/generations: the OpenAI images request, plus GenerateRequest's fields."""

    n: int = Field(1, ge=1)
    response_format: Literal["b64_json"] = "b64_json"
    model: str | None = None  # accepted for client compatibility; the server has one model
    user: str | None = None


def parse(raw: bytes, content_type: str | None, model: type[GenerateRequest], *,
          image_size: tuple[int, int], max_prompt_chars: int, max_n: int) -> GenerateRequest:
    """Body bytes -> a checked request, or ApiError (415, 400)."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(415, f"content type must be application/json, got {media_type or 'none'}")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
    try:
        request = model.model_validate(data)
    except ValidationError as e:
        raise ApiError(400, "; ".join(_describe(err) for err in e.errors()[:3])) from None
    _check(request, image_size, max_prompt_chars, max_n)
    return request


def _describe(error: dict) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "body"
    if error["type"] == "extra_forbidden":
        return f"unknown field {field!r}"
    if error["type"] == "missing":
        return f"{field} is required"
    got = repr(error.get("input"))
    got = got if len(got) <= 40 else got[:37] + "..."
    return f"{field}: {error['msg'][0].lower()}{error['msg'][1:]}, got {got}"


def _check(request: GenerateRequest, image_size: tuple[int, int], max_prompt_chars: int,
           max_n: int) -> None:
    for name in ("prompt", "negative_prompt"):
        text = getattr(request, name)
        if name == "prompt" and not text.strip():
            raise ApiError(400, "prompt must not be empty")
        if text is not None and len(text) > max_prompt_chars:
            raise ApiError(400, f"{name} is {len(text)} characters, the limit is "
                                f"{max_prompt_chars}")
    if getattr(request, "n", 1) > max_n:
        raise ApiError(400, f"n must be at most {max_n} images per request, got {request.n}")
    height, width = image_size
    compiled = f"{width}x{height}"
    if request.size is not None:
        match = SIZE.match(request.size)
        if not match:
            raise ApiError(400, f"size must look like {compiled!r} (width x height), got "
                                f"{request.size[:20]!r}")
        if request.size != compiled:
            raise ApiError(400, f"size {request.size} is not available: this export was "
                                f"compiled for {compiled}")
    try:
        scheduler_name(request.scheduler)
        parse_cache(request.cache)
    except UserError as e:
        raise ApiError(400, str(e)) from None

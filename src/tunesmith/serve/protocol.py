"""The OpenAI API's request and response bodies, as pydantic models.

Only what tunesmith serves is modelled; unknown request fields are ignored (as OpenAI
and vLLM do), so SDKs that send newer fields keep working. Ranges are checked here, so
a bad value is a 400 naming the field before anything reaches the model.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator


class ContentPart(BaseModel):
    """One part of a message's content list (only text parts are served)."""

    type: Literal["text"]
    """The part's kind; images and audio are not served by a text model."""
    text: str
    """The text."""


class ChatMessage(BaseModel):
    """One turn of a conversation."""

    role: Literal["system", "developer", "user", "assistant"]
    """Who speaks; ``developer`` is OpenAI's newer name for ``system``."""
    content: str | list[ContentPart] | None = None
    """The text, or a list of text parts (joined)."""

    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    """``stream_options``: OpenAI's switch for a final usage chunk."""

    include_usage: bool = False
    """Send one last chunk with ``usage`` and no choices before ``[DONE]``."""


class SamplingFields(BaseModel):
    """The generation fields shared by chat and text completions."""

    model: str
    """A name from ``GET /v1/models`` (the base, or an adapter)."""
    max_tokens: int | None = Field(None, ge=1)
    """Most tokens to generate (none: the server's ``--max_new_tokens``)."""
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for ``max_tokens``; wins when both are given."""
    temperature: float | None = Field(None, ge=0, le=2)
    """0 is greedy; none: the model's generation config, else 1."""
    top_p: float | None = Field(None, gt=0, le=1)
    """Nucleus sampling mass; none: the model's generation config, else 1."""
    stop: str | list[str] | None = None
    """Up to 4 strings that end the answer (not included in it)."""
    seed: int | None = None
    """Makes sampling repeatable: the same request gives the same answer."""
    n: int = Field(1, ge=1, le=1)
    """Answers per request; only 1 is served."""
    stream: bool = False
    """Send the answer as server-sent events while it is generated."""
    stream_options: StreamOptions | None = None
    """With ``stream``: ``{"include_usage": true}`` adds a final usage chunk."""
    user: str | None = None
    """Ignored (OpenAI's end-user id)."""

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return v

    def stops(self) -> list[str]:
        """``stop`` as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def wanted_tokens(self) -> int | None:
        """The requested answer length, if any."""
        return self.max_completion_tokens or self.max_tokens


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    """The conversation so far, ending with the user's turn."""


class CompletionRequest(SamplingFields):
    """``POST /v1/completions`` (raw text continuation, no chat template)."""

    prompt: str | list[str]
    """The text to continue (a list of one string is accepted)."""
    echo: bool = False
    """Prepend the prompt to the answer."""

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("only one prompt per request is served")
        return v

    def text(self) -> str:
        """The prompt as one string."""
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    """Tokens of the templated prompt."""
    completion_tokens: int
    """Tokens generated (the end-of-turn token included when one was made)."""
    total_tokens: int
    """Their sum."""


def usage(prompt: int, completion: int) -> Usage:
    """A Usage from the two counts."""
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def new_id(prefix: str) -> str:
    """A response id like OpenAI's (``chatcmpl-…``, ``cmpl-…``)."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_response(rid: str, model: str, text: str, finish: str, use: Usage) -> dict[str, Any]:
    """A complete ``chat.completion`` object."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "logprobs": None, "finish_reason": finish}  # fmt: skip
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": use.model_dump()}  # fmt: skip


def chat_chunk(
    rid: str, created: int, model: str, delta: dict[str, Any], finish: str | None
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` of a stream."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [choice]}  # fmt: skip


def completion_response(
    rid: str, created: int, model: str, text: str, finish: str | None, use: Usage | None
) -> dict[str, Any]:
    """A ``text_completion`` object (also each chunk of a stream, with ``use`` None)."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    out: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created,
                           "model": model, "choices": [choice]}  # fmt: skip
    if use is not None:
        out["usage"] = use.model_dump()
    return out


def usage_chunk(rid: str, created: int, model: str, obj: str, use: Usage) -> dict[str, Any]:
    """The final ``include_usage`` chunk: no choices, the request's usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": use.model_dump()}  # fmt: skip


ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
    413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
    503: "server_error", 504: "timeout_error",
}  # fmt: skip


def error_body(status: int, message: str, param: str | None = None, code: str | None = None):
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = ERROR_TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

"""The OpenAI API's request and response bodies that the server speaks (the subset llmmo implements).

Requests are strict (a string is not a number, `false` is not an integer) and their limits are in the schema,
so that /openapi.json states exactly what is accepted; unknown fields are ignored, as OpenAI's API does, but
OpenAI's fields that llmmo does not implement (logprobs, tools, ...) are refused with 400 unless they ask for
nothing (null, false).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

MAX_STOP = 4  # OpenAI's limit on stop sequences


def _integer(value: Any) -> Any:
    """JSON Schema's integers include 3.0; a boolean is not one (strict mode refuses it, and other floats)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _utf8(value: str) -> str:
    """JSON may escape lone surrogates (\\ud800), which are not text: no tokenizer can read them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (\\ud800-\\udfff); send valid Unicode text") from None
    return value


def _stop(value: Any) -> Any:
    """Checked before the union of its forms, whose errors would name pydantic's branches, not the problem."""
    if value is None:
        return value
    if isinstance(value, str):
        return _utf8(value)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return [_utf8(s) for s in value]
    raise PydanticCustomError("stop_type", "must be a string or a list of strings")


UNSUPPORTED = "unsupported"  # the error type of a field this server does not implement (answered 400, not 422)


def unsupported(*inert: Any) -> Any:
    """A field of OpenAI's API that llmmo does not implement: accepted only at a value that asks for nothing
    (null, or `inert`: false, 1, ...), so that a client relying on it hears so instead of having it ignored."""

    def check(value: Any) -> Any:
        value = _integer(value)  # 1.0 is 1, as for the other integers
        # bool apart: false is not 0 and true is not 1 here
        if value is None or any(type(value) is type(v) and value == v for v in inert):
            return value
        shown = " or ".join(json.dumps(v) for v in (None, *inert))
        raise PydanticCustomError(UNSUPPORTED, f"not supported by this server; leave it out (or send {shown})")

    return Annotated[Any, BeforeValidator(check), WithJsonSchema({"enum": [*inert, None]})]


Text = Annotated[str, AfterValidator(_utf8)]
Integer = Annotated[int, BeforeValidator(_integer)]
# the bound before the validator: so the schema states it as JSON Schema's "minimum", also under an Optional
Positive = Annotated[int, Field(ge=1), BeforeValidator(_integer)]
# within what torch's generators take, and exact as a JSON float too (a bound of 2**64 - 1 reads as 2**64)
Seed = Annotated[int, Field(ge=-(2**53), le=2**53), BeforeValidator(_integer)]
# fields of OpenAI's API that llmmo does not implement, accepted at null and the values that ask for nothing
OnlyNull = unsupported()
OnlyFalse = unsupported(False)
OnlyZero = unsupported(0)
OnlyOne = unsupported(1)
OnlyEmpty = unsupported([])
OnlyText = unsupported({"type": "text"})
OnlyNone = unsupported("none")  # tool_choice, function_call: "none" calls no tool
OnlyNoBias = unsupported({})  # logit_bias


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Sampling(Strict):
    """Settings both endpoints share."""

    model: Text = Field(description="the served model's name (GET /v1/models)")
    max_tokens: Positive | None = Field(None, description="new tokens at most (default 256, up to the context)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Integer = Field(0, ge=0, description="llmmo's extension: sample among the k most likely tokens; 0 is off")
    n: Integer = Field(1, ge=1, le=1, description="completions per prompt (only 1)")
    stream: bool = False
    stop: Annotated[str | list[str] | None, BeforeValidator(_stop)] = Field(
        None, description=f"up to {MAX_STOP} stop strings"
    )
    seed: Seed | None = None
    user: Text | None = None
    presence_penalty: OnlyZero = Field(None, description="not supported (only 0)")
    frequency_penalty: OnlyZero = Field(None, description="not supported (only 0)")
    logit_bias: OnlyNoBias = Field(None, description="not supported (only {})")


class CompletionRequest(Sampling):
    prompt: Text = Field(description="the text to continue")
    logprobs: OnlyNull = Field(None, description="not supported")  # here 0 asks for the chosen tokens' logprobs
    echo: OnlyFalse = Field(None, description="not supported")
    best_of: OnlyOne = Field(None, description="not supported (only 1)")
    suffix: OnlyNull = Field(None, description="not supported")


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Positive | None = Field(None, description="the newer name of max_tokens")
    tools: OnlyEmpty = Field(None, description="not supported")
    tool_choice: OnlyNone = Field(None, description='not supported (only "none")')
    functions: OnlyEmpty = Field(None, description="not supported")
    function_call: OnlyNone = Field(None, description='not supported (only "none")')
    response_format: OnlyText = Field(None, description="not supported (only text)")
    logprobs: OnlyFalse = Field(None, description="not supported")
    top_logprobs: OnlyZero = Field(None, description="not supported")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ReplyMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ReplyMessage
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmmo"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail

"""The OpenAI API's request and response bodies that the server speaks (the subset llmmo implements).

Requests are strict (a string is not a number, `false` is not an integer) and their limits are in the schema,
so that /openapi.json states exactly what is accepted; unknown fields are ignored, as OpenAI's API does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

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


Text = Annotated[str, AfterValidator(_utf8)]
Integer = Annotated[int, BeforeValidator(_integer)]
# the bound before the validator: so the schema states it as JSON Schema's "minimum", also under an Optional
Positive = Annotated[int, Field(ge=1), BeforeValidator(_integer)]
# within what torch's generators take, and exact as a JSON float too (a bound of 2**64 - 1 reads as 2**64)
Seed = Annotated[int, Field(ge=-(2**53), le=2**53), BeforeValidator(_integer)]


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
    stop: Text | list[Text] | None = Field(None, description=f"up to {MAX_STOP} stop strings")
    seed: Seed | None = None
    user: Text | None = None


class CompletionRequest(Sampling):
    prompt: Text = Field(description="the text to continue")


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Positive | None = Field(None, description="the newer name of max_tokens")


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

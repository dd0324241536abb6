"""The public OpenAI-compatible request bodies (`/v1/completions`, `/v1/chat/completions`) and their
translation into the worker's stateless request.

Unknown parameters are rejected (400, the parameter named), never silently ignored. A few that
clients commonly send are accepted only with the value that changes nothing (`n: 1`,
`logprobs: false`, zero penalties); any other value is a 400 too.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from services.common.schemas import (MAX_STOP_SEQUENCES, ChatMessage, Seed, Temperature, TokenCount, TopP,
                                     WorkerCompletionRequest)
Stop = Annotated[str, Field(min_length=1, max_length=256)]
PromptText = Annotated[str, Field(min_length=1, max_length=4_000_000)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, max_length=256, description="Must name the served model (see /v1/models).")
    max_tokens: TokenCount | None = None
    temperature: Temperature | None = Field(None, description="Default 1; 0 is greedy.")
    top_p: TopP | None = Field(None, description="Default 1.")
    seed: Seed | None = Field(None, description="Makes sampling reproducible.")
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP_SEQUENCES)] | None = Field(
        None, description=f"Up to {MAX_STOP_SEQUENCES} strings; generation ends before the first, which is not returned.")
    stream: StrictBool = False
    stream_options: StreamOptions | None = Field(None, description="Ignored unless stream is true.")
    n: Literal[1] | None = Field(None, description="Only 1 is supported.")
    user: str | None = Field(None, max_length=256, description="Accepted and ignored.")
    presence_penalty: Literal[0] | None = Field(None, description="Only 0 (no penalty) is supported.")
    frequency_penalty: Literal[0] | None = Field(None, description="Only 0 (no penalty) is supported.")
    logprobs: None = Field(None, description="Not supported.")

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def _sampling(self, max_tokens: int | None) -> dict:
        params = {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                  "seed": self.seed, "stop": self.stop_list(), "stream": self.stream}
        return {key: value for key, value in params.items() if value is not None}  # else the worker's defaults


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str = Field(..., max_length=1_000_000)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=1_000_000)] | list[TextPart] = Field(
        ..., description="Text, or a list of text parts (joined).")
    name: str | None = Field(None, max_length=256, description="Accepted and ignored.")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[Message] = Field(..., min_length=1, max_length=1024)
    max_completion_tokens: TokenCount | None = Field(None, description="Takes precedence over max_tokens. Default 16.")
    logprobs: Literal[False] | None = Field(None, description="Only false is supported.")

    def for_worker(self) -> WorkerCompletionRequest:
        messages = [ChatMessage(role=m.role, content=m.text()) for m in self.messages]
        return WorkerCompletionRequest(messages=messages, **self._sampling(self.max_completion_tokens or self.max_tokens))


class CompletionRequest(_OpenAIRequest):
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=1)] = Field(
        ..., description="A string (or a list of exactly one string); token-id prompts are not supported.")
    echo: Literal[False] | None = Field(None, description="Only false is supported.")
    best_of: Literal[1] | None = Field(None, description="Only 1 is supported.")
    suffix: None = Field(None, description="Not supported.")

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def for_worker(self) -> WorkerCompletionRequest:
        return WorkerCompletionRequest(prompt=self.prompt_text(), **self._sampling(self.max_tokens))

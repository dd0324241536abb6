"""The public OpenAI-compatible request bodies (`/v1/completions`, `/v1/chat/completions`) and their
translation into the worker's stateless request.

Unknown parameters are rejected (400, the parameter named), never silently ignored. vLLM's
sampling parameters are implemented (README, "API contract"). The accepted no-ops are listed in
NO_OP_PARAMETERS: a few take any value and change nothing here (`user`, ...), the others only
the value that changes nothing (`best_of: 1`, `use_beam_search: false`, ...); any other value
of those is a 400 too.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from services.common.schemas import (MAX_LOGPROBS, MAX_N, MAX_STOP_SEQUENCES, MAX_STOP_TOKEN_IDS, ChatMessage,
                                     MinP, MinTokens, NumLogprobs, Penalty, RepetitionPenalty, Seed, Temperature,
                                     TokenCount, TokenId, TopK, TopP, WorkerCompletionRequest)

Stop = Annotated[str, Field(min_length=1, max_length=256)]
PromptText = Annotated[str, Field(min_length=1, max_length=4_000_000)]
# Accepted and ignored: (parameter, what it would mean elsewhere). The README lists them.
NO_OP_PARAMETERS = {
    "user": "an end-user id for the provider's abuse monitoring (any string)",
    "store": "OpenAI's stored completions (any boolean: nothing is stored)",
    "service_tier": "OpenAI's processing tier (\"auto\" or \"default\")",
    "metadata": "OpenAI's stored-completion tags (any object of strings)",
    "best_of": "vLLM's/OpenAI's best-of sampling (only 1)",
    "use_beam_search": "vLLM's beam search (only false)",
    "length_penalty": "vLLM's beam-search length penalty (only 1)",
    "logit_bias": "per-token biases (only null or {})",
    "priority": "vLLM's priority scheduling (only 0)",
    "suffix": "completions: text after the insertion (only null)",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = Field(False, description="With include_usage: every chunk carries the usage so far.")


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, max_length=256, description="Must name the served model (see /v1/models).")
    max_tokens: TokenCount | None = None
    temperature: Temperature | None = Field(None, description="Default 1; 0 is greedy.")
    top_p: TopP | None = Field(None, description="Default 1.")
    seed: Seed | None = Field(None, description="Makes sampling reproducible (choice i of n samples with seed + i).")
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP_SEQUENCES)] | None = Field(
        None, description=f"Up to {MAX_STOP_SEQUENCES} strings; generation ends before the first, which is not "
                          "returned (unless include_stop_str_in_output).")
    stream: StrictBool = False
    stream_options: StreamOptions | None = Field(None, description="Ignored unless stream is true.")
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = Field(None, description="Choices; they share the prompt's KV.")
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # vLLM's sampling parameters (the openai SDK sends them in extra_body)
    top_k: TopK | None = Field(None, description="0 or -1: all tokens.")
    min_p: MinP | None = None
    min_tokens: MinTokens | None = None
    ignore_eos: StrictBool | None = None
    repetition_penalty: RepetitionPenalty | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    include_stop_str_in_output: StrictBool | None = None
    skip_special_tokens: StrictBool | None = None
    spaces_between_special_tokens: StrictBool | None = None
    # NO_OP_PARAMETERS
    user: str | None = Field(None, max_length=256, description="Accepted and ignored.")
    store: StrictBool | None = Field(None, description="Accepted and ignored.")
    service_tier: Literal["auto", "default"] | None = Field(None, description="Accepted and ignored.")
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = Field(
        None, description="Accepted and ignored.")
    use_beam_search: Literal[False] | None = Field(None, description="Only false.")
    length_penalty: Literal[1] | None = Field(None, description="Only 1.")
    logit_bias: Annotated[dict[str, Any], Field(max_length=0)] | None = Field(None, description="Only empty.")
    priority: Literal[0] | None = Field(None, description="Only 0.")

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def continuous_usage(self) -> bool:
        """vLLM's: only with include_usage."""
        return self.include_usage() and self.stream_options.continuous_usage_stats

    def num_choices(self) -> int:
        return self.n or 1

    def _sampling(self, max_tokens: int | None) -> dict:
        params = {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                  "seed": self.seed, "stop": self.stop_list(), "stream": self.stream, "n": self.n}
        params |= self.model_dump(include=_VLLM_SAMPLING, exclude_none=True)
        return {key: value for key, value in params.items() if value is not None}  # else the worker's defaults


_VLLM_SAMPLING = {"presence_penalty", "frequency_penalty", "top_k", "min_p", "min_tokens", "ignore_eos",
                  "repetition_penalty", "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens",
                  "spaces_between_special_tokens"}


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
    logprobs: StrictBool | None = Field(None, description="Each output token's log-probability (the model's raw output).")
    top_logprobs: NumLogprobs | None = Field(None, description=f"With logprobs: up to {MAX_LOGPROBS} most likely "
                                                               "alternatives per token.")

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def for_worker(self) -> WorkerCompletionRequest:
        messages = [ChatMessage(role=m.role, content=m.text()) for m in self.messages]
        return WorkerCompletionRequest(messages=messages, logprobs=self.num_logprobs(),
                                       **self._sampling(self.max_completion_tokens or self.max_tokens))


class CompletionRequest(_OpenAIRequest):
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=1)] = Field(
        ..., description="A string (or a list of exactly one string); token-id prompts are not supported.")
    logprobs: NumLogprobs | None = Field(None, description=f"Each token's log-probability and up to {MAX_LOGPROBS} "
                                                           "most likely alternatives (the model's raw output).")
    echo: StrictBool | None = Field(None, description="The prompt is returned before the completion (with logprobs: "
                                                      "the prompt's too).")
    best_of: Literal[1] | None = Field(None, description="Only 1 is supported.")
    suffix: None = Field(None, description="Not supported.")

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def for_worker(self) -> WorkerCompletionRequest:
        prompt_logprobs = self.logprobs if self.echo else None
        return WorkerCompletionRequest(prompt=self.prompt_text(), logprobs=self.logprobs,
                                       prompt_logprobs=prompt_logprobs, **self._sampling(self.max_tokens))

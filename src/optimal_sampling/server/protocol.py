"""Request schemas: the OpenAI API (completions, chat) and SGLang's native /generate, plus ours.

Field names and defaults are those of the schemas clients already speak (OpenAI; vLLM's
extensions `top_k`, `min_p`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens`; SGLang's
`sampling_params`). Our additions are extra fields a client that does not know them never sends:
a teacher prompt (`teacher_prompt`, `teacher_messages`, `teacher_text`, `teacher_input_ids`) and
`collect_diagnostics` (per-token alpha, ESS ratio and KLs in the response). Unknown fields are
ignored; known options that would change the distribution and that we do not implement
(penalties, logit bias, structured output, ...) are refused by `unsupported` when set.
Pydantic checks the types; `inputs.py` checks the values against the models.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

Prompt = str | list[str] | list[int] | list[list[int]]
TokenIds = list[int] | list[list[int]]


class Schema(BaseModel):
    # strict: JSON types as declared (true is not the token id 1, "2" is not the integer 2)
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(Schema):
    include_usage: bool = False


class OpenAISampling(Schema):
    """What completions and chat share."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    top_k: int = -1
    min_p: float = 0.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    collect_diagnostics: bool = False
    # set to anything but their defaults, these are refused (not implemented)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None


class CompletionRequest(OpenAISampling):
    prompt: Prompt
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    teacher_prompt: Prompt | None = None


class ContentPart(Schema):
    type: str
    text: str | None = None


class ChatMessage(Schema):
    # other keys (name, tool_call_id, ...) go to the chat template as given
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(OpenAISampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    teacher_messages: list[ChatMessage] | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class SGLangSampling(Schema):
    max_new_tokens: int | None = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    seed: int | None = None
    sampling_seed: int | None = None  # SGLang's name of the seed
    # set to anything but their defaults, these are refused (not implemented)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None


class GenerateRequest(Schema):
    text: str | list[str] | None = None
    input_ids: TokenIds | None = None
    sampling_params: SGLangSampling | list[SGLangSampling] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] = False
    return_text_in_logprobs: bool = False
    stream: bool = False
    teacher_text: str | list[str] | None = None
    teacher_input_ids: TokenIds | None = None
    collect_diagnostics: bool = False


class ScoreRequest(Schema):
    """Teacher-forced scoring: prompt (+ teacher prompt) and completion -> the per-token fields."""

    text: str | list[str] | None = None
    input_ids: TokenIds | None = None
    teacher_text: str | list[str] | None = None
    teacher_input_ids: TokenIds | None = None
    output_ids: TokenIds | None = None
    output_text: str | list[str] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    collect_diagnostics: bool = True


class UpdateWeightsFromDiskRequest(Schema):
    model_path: str
    model: str = "base"  # ours: which model of the pair
    abort_all_requests: bool = False
    weight_version: int | None = None


class InitWeightsUpdateGroupRequest(Schema):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "gloo"


class UpdateWeightsFromDistributedRequest(Schema):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    model: str = "base"  # ours: which model of the pair
    abort_all_requests: bool = False
    weight_version: int | None = None


class AbortRequest(Schema):
    rid: str = ""
    abort_all: bool = False


OPENAI_REFUSED = {
    "presence_penalty": (None, 0.0),
    "frequency_penalty": (None, 0.0),
    "repetition_penalty": (None, 1.0),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "echo": (False,),
    "suffix": (None, ""),
    "tools": (None, []),
}
SGLANG_REFUSED = {
    "frequency_penalty": (0.0,),
    "presence_penalty": (0.0,),
    "repetition_penalty": (1.0,),
    "min_new_tokens": (0,),
    "regex": (None,),
    "json_schema": (None,),
    "ebnf": (None,),
}


def unsupported(request: BaseModel, refused: dict[str, tuple], prefix: str = "") -> str | None:
    """The first refused option set to something other than its harmless values, or None."""
    for name, harmless in refused.items():
        if hasattr(request, name) and getattr(request, name) not in harmless:
            return prefix + name
    return None

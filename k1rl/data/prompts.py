"""What the rollout engine is given for a problem: its raw prompt text, or its messages
through the tokenizer's chat template (``data.prompt``).

A chat prompt goes to the engine as token ids from ``apply_chat_template`` itself, so the
engine decodes from exactly the ids transformers produces (no second tokenization of
rendered text, which can add a BOS twice or split a special token differently).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from k1rl.data.problem import Problem
from k1rl.yaml_config import Section


class PromptConfig(Section):
    template: Literal["raw", "chat"] = Field(
        "raw", description="raw: the prompt text as written (chat messages are refused); "
        "chat: the tokenizer's chat template over the messages (a raw prompt becomes one "
        "user message), with the generation prompt added.")
    system_prompt: str | None = Field(
        None, description="chat: a system message put first when the problem has none.")
    template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="chat: extra variables for the template "
        "(e.g. enable_thinking: false).")


class PromptRenderer:
    """Renders problems for the engine; the tokenizer is loaded only for chat prompts."""

    def __init__(self, cfg: PromptConfig, tokenizer_path: str | Path | None) -> None:
        self.cfg = cfg
        self.tokenizer = None
        if cfg.template == "chat":
            from transformers import AutoTokenizer

            if tokenizer_path is None:
                raise ValueError("data.prompt.template: chat needs model.path (its tokenizer)")
            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
            if not self.tokenizer.chat_template:
                raise ValueError(f"data.prompt.template is chat, but the tokenizer in "
                                 f"{tokenizer_path} has no chat template: add one "
                                 "(chat_template.jinja) or set data.prompt.template: raw")

    def messages(self, problem: Problem) -> list[dict]:
        return conversation(self.cfg, problem)

    def token_ids(self, problem: Problem, prefill: str = "") -> list[int]:
        ids = list(self.tokenizer.apply_chat_template(
            self.messages(problem), add_generation_prompt=True, tokenize=True,
            return_dict=False, **self.cfg.template_kwargs))
        if prefill:
            ids += self.tokenizer.encode(prefill, add_special_tokens=False)
        return ids

    def request_fields(self, problems: Sequence[Problem], prefill: str = "") -> dict:
        """``prompts`` (raw) or ``prompt_token_ids`` (chat) of a GenerateRequest;
        ``prefill``: the start of every response, written for the model (after the chat
        template's generation prompt)."""
        if self.tokenizer is not None:
            return {"prompt_token_ids": [self.token_ids(p, prefill) for p in problems]}
        chat = [p.id for p in problems if p.messages]
        if chat:
            raise ValueError(f"problem {chat[0]} has chat messages but data.prompt.template "
                             "is raw: set data.prompt.template: chat")
        return {"prompts": [p.prompt + prefill for p in problems]}


def conversation(cfg: PromptConfig, problem: Problem) -> list[dict]:
    """The problem's chat turns as the template gets them: its messages (a raw prompt is
    one user turn), after ``cfg.system_prompt`` when it has no system turn of its own."""
    turns = [m.model_dump() for m in problem.messages] or [
        {"role": "user", "content": problem.prompt}]
    if cfg.system_prompt is not None and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": cfg.system_prompt})
    return turns

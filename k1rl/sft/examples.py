"""Problems as SFT examples: token ids split into context and learned part, with a mask
over the learned part when a conversation has several assistant turns.

Raw prompts (``data.prompt.template: raw``) are tokenized as the rollout engine tokenizes
them (no special tokens added), the response after them with the EOS token appended. Chat prompts are rendered with
the tokenizer's own chat template: the whole conversation once, and each assistant turn
located by rendering the conversation up to it (with the generation prompt) and through
it; a template that renders earlier turns differently once later ones follow (some strip
reasoning from past turns) cannot be masked that way and is refused for ``loss_on:
assistant``.
"""

from __future__ import annotations

from typing import Any, Literal

from k1rl.data.problem import Problem
from k1rl.data.prompts import PromptConfig, conversation
from k1rl.protocol import SFTExample


class SFTEncoder:
    def __init__(self, prompt: PromptConfig, tokenizer: Any,
                 loss_on: Literal["assistant", "all"] = "assistant") -> None:
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.loss_on = loss_on
        if prompt.template == "chat" and not tokenizer.chat_template:
            raise ValueError("data.prompt.template is chat, but the tokenizer has no chat "
                             "template: add chat_template.jinja or set template: raw")
        if prompt.template == "raw" and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token to end raw responses with: set "
                             "eos_token in its tokenizer_config.json")

    def encode(self, problem: Problem) -> SFTExample:
        if self.prompt.template == "chat":
            ids, learned = self._chat(problem)
        else:
            ids, learned = self._raw(problem)
        if self.loss_on == "all":
            learned = [True] * len(ids)
        # the first token is never learned: nothing before it predicts it
        first = max(1, learned.index(True))
        mask = learned[first:]
        if not any(mask):
            raise ValueError(f"problem {problem.id}: nothing to learn after its first token")
        return SFTExample(prompt_token_ids=ids[:first], response_token_ids=ids[first:],
                          response_mask=None if all(mask) else mask)

    def _raw(self, problem: Problem) -> tuple[list[int], list[bool]]:
        if problem.messages:
            raise ValueError(f"problem {problem.id} has chat messages but data.prompt."
                             "template is raw: set template: chat")
        if not problem.response:
            raise ValueError(f"problem {problem.id}: no response to learn from")
        # no special tokens: the engine gets raw prompts the same way (no BOS added), and a
        # BOS in the middle of a response must not be learned
        prompt = self.tokenizer.encode(problem.prompt, add_special_tokens=False)
        response = [*self.tokenizer.encode(problem.response, add_special_tokens=False),
                    self.tokenizer.eos_token_id]
        return prompt + response, [False] * len(prompt) + [True] * len(response)

    def _chat(self, problem: Problem) -> tuple[list[int], list[bool]]:
        turns = self._turns(problem)
        ids = self._render(turns, generation_prompt=False)
        if self.loss_on == "all":  # every token is learned: no turn needs locating
            return ids, []
        learned = [False] * len(ids)
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            start = self._render(turns[:i], generation_prompt=True)
            through = self._render(turns[:i + 1], generation_prompt=False)
            if ids[:len(start)] != start or ids[:len(through)] != through:
                raise ValueError(
                    f"problem {problem.id}: the chat template renders turn {i} differently "
                    "once later turns follow, so its assistant tokens cannot be located: "
                    "set sft.loss_on: all, or train on single-turn rows")
            learned[len(start):len(through)] = [True] * (len(through) - len(start))
        if not any(learned):
            raise ValueError(f"problem {problem.id}: the assistant turn renders to no tokens")
        return ids, learned

    def _turns(self, problem: Problem) -> list[dict]:
        turns = conversation(self.prompt, problem)
        if problem.response:
            turns.append({"role": "assistant", "content": problem.response})
        if turns[-1]["role"] != "assistant":
            raise ValueError(f"problem {problem.id}: no response to learn from (a response "
                             "field, or messages ending with an assistant turn)")
        return turns

    def _render(self, turns: list[dict], generation_prompt: bool) -> list[int]:
        if not turns:
            return []
        return list(self.tokenizer.apply_chat_template(
            turns, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False,
            **self.prompt.template_kwargs))

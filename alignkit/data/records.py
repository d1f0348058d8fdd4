"""The data contracts: every reader normalises its input into one of these records.

A prompt is either plain text or a conversation (a tuple of `Message`s ending with a user
turn). Responses are always plain text: the assistant turn that is learned or compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    content: str


Prompt = Union[str, tuple[Message, ...]]


def prompt_text(prompt: Prompt) -> str:
    """A readable plain-text rendering of a prompt (for judges, logs and lint)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.role}: {m.content}" for m in prompt)


@dataclass(frozen=True)
class SFTExample:
    """A demonstration: learn `response` given `prompt`."""

    prompt: Prompt
    response: str
    category: str | None = None


@dataclass(frozen=True)
class PreferencePair:
    """Two responses to one prompt, `chosen` judged better than `rejected`.

    margin: optional strength of the preference (Llama 2 style margin loss).
    soft_label: optional probability that `chosen` is better (AI feedback); None means 1.
    """

    prompt: Prompt
    chosen: str
    rejected: str
    margin: float | None = None
    soft_label: float | None = None
    category: str | None = None


@dataclass(frozen=True)
class UnpairedExample:
    """One completion with a thumbs up or down (KTO-style feedback)."""

    prompt: Prompt
    completion: str
    desirable: bool
    category: str | None = None


@dataclass(frozen=True)
class PromptOnly:
    """A prompt to sample from (RL rollouts, evaluation)."""

    prompt: Prompt
    category: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)


Record = Union[SFTExample, PreferencePair, UnpairedExample, PromptOnly]

KINDS = {
    "sft": SFTExample,
    "preference": PreferencePair,
    "unpaired": UnpairedExample,
    "prompt": PromptOnly,
}

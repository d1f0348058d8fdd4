"""Constitutions: the principles Constitutional AI critiques, revises and labels by.

    c = load_constitution("harmless")                 # the built-in default
    c = load_constitution("my_rules.yaml")            # or a YAML / JSON file of your own
    c.principles[0].critique_request
    c.sample(random.Random(0), 3)                     # three distinct principles

A file is a mapping with `principles`, a non-empty list of mappings, each with four strings:

    name                 short id, unique in the file (shown in chains.jsonl)
    critique_request     asked after the model's reply: what to criticise
    revision_request     asked after the critique: how to rewrite the reply
    preference_question  the multiple-choice question of preference labelling ("Which reply is
                         less harmful?"); the two replies are shown as (A) and (B) above it

and optionally `name` (the constitution's) and `choices` (the two option labels, default A, B).
A bad file is a `ConstitutionError` naming the file, the entry (index and name) and the key.
"""

from __future__ import annotations

import difflib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.data.records import Message, Prompt

BUILTIN_DIR = Path(__file__).resolve().parent / "constitutions"
DEFAULT = "harmless"

PRINCIPLE_KEYS = ("name", "critique_request", "revision_request", "preference_question")
TOP_KEYS = ("name", "choices", "principles", "description")


class ConstitutionError(ValueError):
    """A constitution file that cannot be used; the message names the file, entry and key."""


@dataclass(frozen=True)
class Principle:
    """One principle of a constitution."""

    name: str
    critique_request: str
    revision_request: str
    preference_question: str


@dataclass(frozen=True)
class Constitution:
    """An ordered set of principles and the two option labels used when labelling pairs."""

    name: str
    principles: tuple[Principle, ...]
    choices: tuple[str, str] = ("A", "B")
    source: str = ""

    def __len__(self) -> int:
        return len(self.principles)

    def get(self, name: str) -> Principle:
        for p in self.principles:
            if p.name == name:
                return p
        raise KeyError(f"constitution {self.name!r} has no principle {name!r}")

    def sample(self, rng: random.Random, k: int) -> list[Principle]:
        """`k` distinct principles (all of them, shuffled, when k <= 0 or k >= len)."""
        if k <= 0 or k >= len(self.principles):
            k = len(self.principles)
        return rng.sample(list(self.principles), k)


def builtin_names() -> list[str]:
    """Names accepted by `load_constitution` besides file paths."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def _closest(key: str, valid: tuple[str, ...]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(valid)})"


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse_principle(entry: Any, index: int, where: str) -> Principle:
    label = f"{where}: principles[{index}]"
    if isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry["name"].strip():
        label += f" ({entry['name'].strip()!r})"
    if not isinstance(entry, dict):
        raise ConstitutionError(f"{label}: expected a mapping with keys {', '.join(PRINCIPLE_KEYS)}, "
                                f"got {_type(entry)}")  # fmt: skip
    for key in entry:
        if key not in PRINCIPLE_KEYS:
            raise ConstitutionError(f"{label}: unknown key '{key}'{_closest(str(key), PRINCIPLE_KEYS)}")
    values = {}
    for key in PRINCIPLE_KEYS:
        if key not in entry or entry[key] is None:
            raise ConstitutionError(f"{label}: missing key '{key}'")
        value = entry[key]
        if not isinstance(value, str):
            raise ConstitutionError(f"{label}: key '{key}' must be a string, got {_type(value)}")
        if not value.strip():
            raise ConstitutionError(f"{label}: key '{key}' is empty")
        values[key] = " ".join(value.split())
    return Principle(**values)


def _parse_choices(value: Any, where: str) -> tuple[str, str]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, str) and v.strip() and v == v.strip() and " " not in v for v in value)
        or value[0] == value[1]
    ):
        raise ConstitutionError(
            f"{where}: 'choices' must be two different labels without spaces, like [A, B]; got {value!r}"
        )
    return (value[0], value[1])


def parse_constitution(data: Any, source: str = "<constitution>") -> Constitution:
    """Check a loaded YAML / JSON document and build the Constitution it describes."""
    if not isinstance(data, dict):
        raise ConstitutionError(f"{source}: expected a mapping with a 'principles' list, got {_type(data)}")
    for key in data:
        if key not in TOP_KEYS:
            raise ConstitutionError(f"{source}: unknown top-level key '{key}'{_closest(str(key), TOP_KEYS)}")
    entries = data.get("principles")
    if not isinstance(entries, list) or not entries:
        got = (
            "it is missing"
            if entries is None
            else "it is empty"
            if entries == []
            else f"got {_type(entries)}"
        )
        raise ConstitutionError(f"{source}: 'principles' must be a non-empty list of principles ({got})")
    principles = tuple(_parse_principle(e, i, source) for i, e in enumerate(entries))
    seen: dict[str, int] = {}
    for i, p in enumerate(principles):
        if p.name in seen:
            raise ConstitutionError(
                f"{source}: principles[{i}] ({p.name!r}): name already used by principles[{seen[p.name]}]"
            )
        seen[p.name] = i
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str) or not name.strip():
        raise ConstitutionError(f"{source}: 'name' must be a non-empty string, got {name!r}")
    choices = _parse_choices(data["choices"], source) if "choices" in data else ("A", "B")
    return Constitution(name.strip(), principles, choices, source)


def load_constitution(spec: str | Path | None = None) -> Constitution:
    """A built-in constitution by name (None: the default, 'harmless'), or a .yaml / .yml / .json file."""
    if spec is None or str(spec) == "":
        spec = DEFAULT
    path = Path(spec)
    if not path.suffix and not path.exists():
        builtin = BUILTIN_DIR / f"{spec}.yaml"
        if not builtin.is_file():
            raise ConstitutionError(
                f"no constitution file {str(spec)!r} and no built-in one of that name "
                f"(built-in: {', '.join(builtin_names())})"
            )
        path = builtin
    if not path.is_file():
        raise ConstitutionError(f"constitution file not found: {path}")
    import yaml

    text = path.read_text(encoding="utf-8")
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConstitutionError(f"{path}: not valid {kind}: {' '.join(str(e).split())}") from None
    return parse_constitution(data, str(path))


# --- the fixed prompt formats -------------------------------------------------------------------
# Every step is a conversation (a tuple of Messages): a local model renders it with its
# tokenizer's chat template (or the HH-style fallback of alignkit.data.tokenize), an endpoint
# receives it as chat messages. The world's critique/revision demonstrations are written with
# these same functions, so a model trained on them sees exactly the prompts `cai revise` builds.

PREFERENCE_FORMAT = (
    "Here is a request and two possible replies.\n"
    "Request: {request}\n"
    "({a}) {first}\n"
    "({b}) {second}\n"
    "{question} Answer {a} or {b}."
)
"""The user message of a preference question; {request}, {first}, {second}, {question}, {a}, {b}."""

_TURN = re.compile(r"(?:^|\n+)\s*(Human|Assistant|System):")
_ROLE = {"Human": "user", "Assistant": "assistant", "System": "system"}


def as_conversation(prompt: Prompt) -> tuple[Message, ...]:
    """A prompt as a conversation ending with a user turn.

    A conversation is returned as it is. A string in the "Human: ... Assistant:" dialogue form
    (the built-in world's prompts, HH-RLHF) is split into its turns, the trailing empty
    "Assistant:" dropped; any other string is one user message.
    """
    if not isinstance(prompt, str):
        return tuple(prompt)
    marks = list(_TURN.finditer(prompt))
    if marks and not prompt[: marks[0].start()].strip():
        turns = []
        for m, nxt in zip(marks, marks[1:] + [None]):
            content = prompt[m.end() : nxt.start() if nxt else len(prompt)].strip()
            turns.append(Message(_ROLE[m.group(1)], content))
        if turns and turns[-1].role == "assistant" and not turns[-1].content:
            turns.pop()
        if turns and turns[-1].role == "user" and all(t.content for t in turns):
            return tuple(turns)
    return (Message("user", prompt.strip()),)


def _reply(conversation: tuple[Message, ...], response: str) -> tuple[Message, ...]:
    return conversation + (Message("assistant", response.strip()),)


def critique_prompt(prompt: Prompt, response: str, principle: Principle) -> tuple[Message, ...]:
    """[prompt turns] + assistant: response + user: critique request -> the model writes a critique."""
    return _reply(as_conversation(prompt), response) + (Message("user", principle.critique_request),)


def revision_prompt(
    prompt: Prompt, response: str, principle: Principle, critique: str
) -> tuple[Message, ...]:
    """The critique conversation + assistant: critique + user: revision request -> a revision."""
    return _reply(critique_prompt(prompt, response, principle), critique) + (
        Message("user", principle.revision_request),
    )


def request_text(prompt: Prompt) -> str:
    """The request a preference question quotes: the user's text, or the dialogue for several turns."""
    turns = as_conversation(prompt)
    if len(turns) == 1:
        return turns[0].content
    return " ".join(f"{m.role}: {m.content}" for m in turns)


def preference_prompt(
    prompt: Prompt, first: str, second: str, principle: Principle, choices: tuple[str, str] = ("A", "B")
) -> tuple[Message, ...]:
    """One user message asking `principle.preference_question` about two replies; the answer is
    the label of the better one, choices[0] for `first`."""
    text = PREFERENCE_FORMAT.format(
        request=request_text(prompt),
        first=" ".join(first.split()),
        second=" ".join(second.split()),
        question=principle.preference_question,
        a=choices[0],
        b=choices[1],
    )
    return (Message("user", text),)

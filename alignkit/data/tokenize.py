"""Prompt/response tokenisation with a safe boundary, chat templates and truncation.

The boundary: the prompt's ids are the rendered prompt encoded alone (what the model sees at
generation time), and the response's ids are the tail of the JOINT encoding of prompt +
response (`continuation_ids`): the tokens the model produces after exactly those prompt ids.
A SentencePiece (Metaspace) tokenizer prepends "▁" to each text it encodes, so encoding the
response alone would turn " A" into ['▁', '▁A'] where the joint text has '▁A'. When a merge
crosses the boundary (prompt "... a" + response "b..." as one token "ab"), the prompt's ids are
not a prefix of the joint ids and no position splits prompt from response; then, and only
then, the response is encoded alone, so the label mask never teaches a prompt token. The
end-of-turn/EOS ids follow the response.

Special tokens: BOS (when the tokenizer adds one) goes only at the start of the prompt, never in
front of the response; EOS is always appended to the response so the model learns to stop.

Truncation (`TruncationLimits`): a prompt that is too long keeps its LAST `max_prompt_len`
tokens (the question nearest the answer matters most; a leading BOS is kept), then the response
is cut so that prompt + response <= `max_len` (a cut response loses its EOS). A record whose
response would be empty is dropped. Every cut and drop is counted in `TruncationStats`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from alignkit.data.records import (
    Message,
    PreferencePair,
    Prompt,
    PromptOnly,
    SFTExample,
    UnpairedExample,
)

_SENTINEL = "ALIGNKITRESPONSESENTINEL"


def _fallback_render(messages: tuple[Message, ...]) -> str:
    """Render a conversation without a chat template, Anthropic HH style.

    A system turn (only the first message may be one) comes first as bare text, then each turn
    as "\\n\\nHuman: ..." or "\\n\\nAssistant: ...", ending with the generation prompt
    "\\n\\nAssistant:". The response is appended after that as the user wrote it.
    """
    parts = []
    for i, m in enumerate(messages):
        if m.role == "system":
            if i != 0:
                raise ValueError("a system message may only be the first turn of a conversation")
            parts.append(m.content)
        elif m.role == "user":
            parts.append(f"\n\nHuman: {m.content}")
        elif m.role == "assistant":
            parts.append(f"\n\nAssistant: {m.content}")
        else:
            raise ValueError(f"unknown role {m.role!r} in conversation")
    parts.append("\n\nAssistant:")
    return "".join(parts)


def _as_dicts(messages: tuple[Message, ...]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The text the model sees before its response.

    A plain `str` prompt is used as-is: the user controls its format. A conversation goes
    through `tokenizer.apply_chat_template(..., add_generation_prompt=True)` when the tokenizer
    has a `chat_template`, otherwise through the documented HH-style fallback
    (`"{system}\\n\\nHuman: {user}\\n\\nAssistant:"`).
    """
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(_as_dicts(prompt), tokenize=False, add_generation_prompt=True)
    return _fallback_render(prompt)


def end_of_turn_ids(tokenizer, prompt: Prompt) -> list[int]:
    """Ids that close the assistant's turn, EOS last.

    Always ends with `eos_token_id`. When a chat template closes the assistant turn with its
    own single special token that is not EOS (ChatML's `<|im_end|>` under a base tokenizer whose
    EOS is `<|endoftext|>`), that token comes first, so the learned text matches what the
    template renders and generation still stops on EOS.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: set one so responses can end")
    if isinstance(prompt, str) or not getattr(tokenizer, "chat_template", None):
        return [eos]
    try:
        full = tokenizer.apply_chat_template(
            _as_dicts(prompt) + [{"role": "assistant", "content": _SENTINEL}], tokenize=False
        )
    except Exception:  # a template that refuses this conversation shape: EOS alone is safe
        return [eos]
    if _SENTINEL not in full:
        return [eos]
    suffix = full.split(_SENTINEL, 1)[1].strip()
    if not suffix:
        return [eos]
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    if len(ids) == 1 and ids[0] != eos and ids[0] in special:
        return [ids[0], eos]
    return [eos]


@dataclass(frozen=True)
class TruncationLimits:
    """Length limits, in tokens. None means unlimited.

    max_prompt_len: longest prompt kept (left-truncated, BOS preserved).
    max_len: longest prompt + response (the response is cut from the right).
    """

    max_prompt_len: int | None = None
    max_len: int | None = None

    def __post_init__(self):
        for name in ("max_prompt_len", "max_len"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"TruncationLimits.{name} must be >= 1, got {v}")
        if self.max_prompt_len is not None and self.max_len is not None:
            if self.max_prompt_len >= self.max_len:
                raise ValueError(
                    f"TruncationLimits.max_prompt_len ({self.max_prompt_len}) must be smaller than "
                    f"max_len ({self.max_len}) to leave room for a response"
                )


@dataclass
class TruncationStats:
    """Counts of what truncation did to a data set.

    total: records seen. dropped: records removed because a response would be empty.
    prompts_truncated: prompts left-truncated. responses_truncated: responses cut (a preference
    pair can contribute two).
    """

    total: int = 0
    dropped: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0

    def report(self) -> dict[str, float]:
        """Counts plus fractions of the records seen, for logs."""
        n = max(self.total, 1)
        return {
            "total": self.total,
            "kept": self.total - self.dropped,
            "dropped": self.dropped,
            "prompts_truncated": self.prompts_truncated,
            "responses_truncated": self.responses_truncated,
            "dropped_frac": self.dropped / n,
            "prompts_truncated_frac": self.prompts_truncated / n,
        }

    def warnings(self, limits: TruncationLimits, source: str, threshold: float = 0.05) -> list[str]:
        """One line per kind of cut that hit more than `threshold` of the records of `source`,
        naming the config key to raise (the stage prints them before training)."""
        n = max(self.total, 1)
        out = []
        if self.prompts_truncated / n > threshold:
            out.append(f"{source}: data.max_prompt_len={limits.max_prompt_len} cuts {self.prompts_truncated} of "
                       f"{self.total} prompts ({self.prompts_truncated / n:.0%}); raise it "
                       "(`alignkit data inspect FILE --tokenizer DIR` shows the token lengths)")
        if self.responses_truncated / n > threshold:
            out.append(f"{source}: data.max_len={limits.max_len} cuts {self.responses_truncated} responses "
                       f"of {self.total} records; raise it if the ends of answers matter")
        if self.dropped / n > threshold:
            out.append(f"{source}: {self.dropped} of {self.total} records dropped: no response token left "
                       "after truncation")
        return out


@dataclass(frozen=True)
class Encoded:
    """One prompt/response after tokenisation and truncation.

    prompt_ids: BOS (if the tokenizer adds one) + prompt tokens.
    response_ids: response tokens + end-of-turn/EOS (EOS absent if the response was cut).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    prompt_truncated: bool = False
    response_truncated: bool = False

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def encode_prompt(
    tokenizer, prompt: Prompt, limits: TruncationLimits | None = None
) -> tuple[list[int], bool]:
    """Prompt ids (BOS first when the tokenizer adds one) and whether they were left-truncated.

    Special tokens are added by hand rather than by `add_special_tokens=True`, because some
    post-processors also append EOS, and a chat template may already render BOS as text.
    """
    ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    has_bos = bool(ids) and ids[0] == bos
    if not has_bos and _adds_bos(tokenizer):
        ids = [bos] + ids
        has_bos = True
    limit = limits.max_prompt_len if limits is not None else None
    if limit is None or len(ids) <= limit:
        return ids, False
    if has_bos and limit > 1:
        return [ids[0]] + ids[len(ids) - (limit - 1) :], True
    return ids[len(ids) - limit :], True


def continuation_ids(tokenizer, context: str, continuation: str) -> list[int]:
    """The ids `continuation` gets when it follows `context`: the tail of the joint encoding of
    context + continuation, whenever the context's own ids are a prefix of it.

    A SentencePiece (Metaspace) tokenizer prepends "▁" to every text it encodes, so " A" alone
    becomes ['▁', '▁A'] although "Answer: A" ends in '▁A': separate encoding would train and score
    a token the model never produces after the prompt. Only when a merge crosses the boundary
    (the context's ids are not a prefix) are the continuation's own ids used.
    """
    if not context:
        return tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    joint = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if len(joint) > len(ctx) and joint[: len(ctx)] == ctx:
        return joint[len(ctx):]
    return tokenizer(continuation, add_special_tokens=False)["input_ids"]


def encode_response(
    tokenizer, response: str, prompt: Prompt | None = None, eot: list[int] | None = None
) -> list[int]:
    """Response ids as they follow the rendered `prompt` (`continuation_ids`; alone when no
    prompt is given), then `end_of_turn_ids(tokenizer, prompt)` (EOS last). No BOS.

    `eot` short-cuts the end-of-turn lookup when the caller already has it.
    """
    context = render_prompt(tokenizer, prompt) if prompt is not None else ""
    ids = continuation_ids(tokenizer, context, response)
    return ids + (eot if eot is not None else end_of_turn_ids(tokenizer, prompt if prompt is not None else ""))


def _cut_response(ids: list[int], prompt_len: int, limits: TruncationLimits | None) -> tuple[list[int], bool]:
    if limits is None or limits.max_len is None:
        return ids, False
    room = max(limits.max_len - prompt_len, 0)
    if len(ids) <= room:
        return ids, False
    return ids[:room], True


def encode_pair(tokenizer, prompt: Prompt, response: str, limits: TruncationLimits | None = None) -> Encoded:
    """Tokenise prompt and response separately (the safe boundary) and apply `limits`.

    The result may have empty `response_ids` when the prompt leaves no room; callers drop it.
    """
    prompt_ids, p_cut = encode_prompt(tokenizer, prompt, limits)
    response_ids, r_cut = _cut_response(encode_response(tokenizer, response, prompt), len(prompt_ids), limits)
    return Encoded(prompt_ids, response_ids, p_cut, r_cut)


@dataclass(frozen=True)
class TokenizedSFT:
    """An SFT example as ids: learn `response_ids` after `prompt_ids`."""

    prompt_ids: list[int]
    response_ids: list[int]
    category: str | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class TokenizedPair:
    """A preference pair as ids: both responses share `prompt_ids`.

    margin / soft_label: carried from the record (None when absent).
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None = None
    soft_label: float | None = None
    category: str | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass(frozen=True)
class TokenizedUnpaired:
    """One completion with a thumbs up (`desirable`) or down, as ids."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    category: str | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt to generate from, as ids (BOS first when the tokenizer adds one)."""

    prompt_ids: list[int]
    category: str | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)


def tokenize_sft(
    tokenizer, examples: Iterable[SFTExample], limits: TruncationLimits | None = None
) -> tuple[list[TokenizedSFT], TruncationStats]:
    """Tokenise SFT examples; records whose response would be empty are dropped and counted."""
    stats = TruncationStats()
    out = []
    for ex in examples:
        stats.total += 1
        enc = encode_pair(tokenizer, ex.prompt, ex.response, limits)
        stats.prompts_truncated += enc.prompt_truncated
        stats.responses_truncated += enc.response_truncated
        if not enc.response_ids:
            stats.dropped += 1
            continue
        out.append(TokenizedSFT(enc.prompt_ids, enc.response_ids, ex.category))
    return out, stats


def tokenize_preference(
    tokenizer, pairs: Iterable[PreferencePair], limits: TruncationLimits | None = None
) -> tuple[list[TokenizedPair], TruncationStats]:
    """Tokenise preference pairs: one prompt encoding, each response cut against the same limits.

    A pair is dropped (and counted) when either response would be empty.
    """
    stats = TruncationStats()
    out = []
    for p in pairs:
        stats.total += 1
        prompt_ids, p_cut = encode_prompt(tokenizer, p.prompt, limits)
        eot = end_of_turn_ids(tokenizer, p.prompt)
        n = len(prompt_ids)
        chosen, c_cut = _cut_response(encode_response(tokenizer, p.chosen, p.prompt, eot=eot), n, limits)
        rejected, r_cut = _cut_response(encode_response(tokenizer, p.rejected, p.prompt, eot=eot), n, limits)
        stats.prompts_truncated += p_cut
        stats.responses_truncated += c_cut + r_cut
        if not chosen or not rejected:
            stats.dropped += 1
            continue
        out.append(TokenizedPair(prompt_ids, chosen, rejected, p.margin, p.soft_label, p.category))
    return out, stats


def tokenize_unpaired(
    tokenizer, examples: Iterable[UnpairedExample], limits: TruncationLimits | None = None
) -> tuple[list[TokenizedUnpaired], TruncationStats]:
    """Tokenise unpaired (KTO-style) examples, with the same truncation policy as SFT."""
    stats = TruncationStats()
    out = []
    for ex in examples:
        stats.total += 1
        enc = encode_pair(tokenizer, ex.prompt, ex.completion, limits)
        stats.prompts_truncated += enc.prompt_truncated
        stats.responses_truncated += enc.response_truncated
        if not enc.response_ids:
            stats.dropped += 1
            continue
        out.append(TokenizedUnpaired(enc.prompt_ids, enc.response_ids, ex.desirable, ex.category))
    return out, stats


def tokenize_prompts(
    tokenizer, prompts: Iterable[PromptOnly], limits: TruncationLimits | None = None
) -> tuple[list[TokenizedPrompt], TruncationStats]:
    """Tokenise prompts for generation; only `max_prompt_len` applies (left-truncation)."""
    stats = TruncationStats()
    out = []
    for p in prompts:
        stats.total += 1
        ids, cut = encode_prompt(tokenizer, p.prompt, limits)
        stats.prompts_truncated += cut
        out.append(TokenizedPrompt(ids, p.category))
    return out, stats

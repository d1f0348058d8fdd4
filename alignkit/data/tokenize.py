"""Prompt/response tokenisation with a safe boundary, chat templates and truncation.

The boundary rule: the response's tokens are the tokens that follow the prompt in the JOINT
encoding of "prompt text + response text", i.e. the tokens a model produces after the prompt, and
the prompt's tokens are the prompt's own encoding. When the prompt's ids are not a prefix of the
joint ids (a BPE merge crosses the boundary: prompt "... a" + response "b..." can become one token
"ab", or the prompt ends in whitespace that the joint text glues to the next word), no position
splits prompt from response; only then is the response tokenised on its own
(`tokenizer(response, add_special_tokens=False)`), and the case is counted
(`TruncationStats.boundary_fallbacks`).

Why joint: a SentencePiece-layout tokenizer (Llama-2 / Mistral: a Metaspace pre-tokenizer or a
normaliser that prepends "▁" and turns spaces into "▁") encodes " A" alone as ['▁', '▁A'] while
"Answer: A" ends in '▁A'; encoding the response alone would train (and score) a token the model
never produces there. With a byte-level (GPT-2-style) tokenizer and a response that starts a new
word (" Paris" after "Answer:"), the joint split and the separate encoding are the same ids.

Chat templates: the response is appended to the rendered prompt as the template would render the
assistant's turn. A template that puts text between the generation prompt and the content (the
"lead": Llama-2's " " after "[/INST]", a "\n" after a role header) gets it in front of a response
that does not already start with it. The end of the turn (`end_of_turn_ids`) is appended as ids.

Special tokens: BOS (when the tokenizer adds one) goes only at the start of the prompt, never in
front of the response; EOS is always appended to the response so the model learns to stop.

Truncation (`TruncationLimits`): the split is made on the full texts, then a prompt that is too
long keeps its LAST `max_prompt_len` tokens (the question nearest the answer matters most; a
leading BOS is kept), then the response is cut so that prompt + response <= `max_len` (a cut
response loses its EOS). A record whose response would be empty is dropped. Every cut and drop is
counted in `TruncationStats`.

Generated responses go the other way through `decode_response`: the text of the response as it
continues the prompt (a leading "▁" decodes to a space), so that encoding prompt + that text again
gives back the generated ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
    return _assistant_turn(tokenizer, prompt)[1]


def response_lead(tokenizer, prompt: Prompt) -> str:
    """Text a chat template renders between the generation prompt and the assistant's content
    ("" for a plain-string prompt, no template, or a template whose generation prompt is not a
    prefix of the rendered turn)."""
    return _assistant_turn(tokenizer, prompt)[0]


def _assistant_turn(tokenizer, prompt: Prompt) -> tuple[str, list[int]]:
    """(lead, end-of-turn ids) of the assistant's turn, from one render with a sentinel answer."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: set one so responses can end")
    if isinstance(prompt, str) or not getattr(tokenizer, "chat_template", None):
        return "", [eos]
    try:
        full = tokenizer.apply_chat_template(
            _as_dicts(prompt) + [{"role": "assistant", "content": _SENTINEL}], tokenize=False
        )
    except Exception:  # a template that refuses this conversation shape: EOS alone is safe
        return "", [eos]
    if _SENTINEL not in full:
        return "", [eos]
    head, suffix = full.split(_SENTINEL, 1)
    rendered = render_prompt(tokenizer, prompt)
    lead = head[len(rendered) :] if head.startswith(rendered) else ""
    suffix = suffix.strip()
    if not suffix:
        return lead, [eos]
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    if len(ids) == 1 and ids[0] != eos and ids[0] in special:
        return lead, [ids[0], eos]
    return lead, [eos]


def continuation_ids(tokenizer, context: str, continuation: str, context_ids: list[int] | None = None) -> tuple[list[int], bool]:
    """Ids of `continuation` as they follow `context` in the joint encoding, and whether the joint
    split held.

    context_ids: `tokenizer(context, add_special_tokens=False)` when the caller has it (no BOS).
    When those ids are not a prefix of the joint ids, the continuation is tokenised alone and the
    second value is False.
    """
    if context_ids is None:
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    joint = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n = len(context_ids)
    if joint[:n] == context_ids:
        return joint[n:], True
    return tokenizer(continuation, add_special_tokens=False)["input_ids"], False


def decode_response(tokenizer, prompt_ids: list[int], response_ids: list[int]) -> str:
    """Text of generated `response_ids` as it continues the prompt, special tokens removed.

    A SentencePiece decoder drops the "▁" (space) that starts a sequence, so decoding a response
    alone turns '▁Paris' into "Paris", and encoding prompt + "Paris" again would not give '▁Paris'.
    Decoding prompt + response and cutting the decoded prompt keeps it; when the decoded prompt is
    not a prefix of that text (a tokenizer that cleans up spaces across the boundary), the
    response is decoded alone. Byte-level tokenizers give the same text either way.
    """
    alone = tokenizer.decode(response_ids, skip_special_tokens=True)
    if not prompt_ids or not alone:
        return alone
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(list(prompt_ids) + list(response_ids), skip_special_tokens=True)
    return full[len(head) :] if full.startswith(head) else alone


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
    pair can contribute two). boundary_fallbacks: responses tokenised alone because the prompt's
    ids were not a prefix of the joint encoding (see the module docstring).
    """

    total: int = 0
    dropped: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    boundary_fallbacks: int = 0

    def report(self) -> dict[str, float]:
        """Counts plus fractions of the records seen, for logs."""
        n = max(self.total, 1)
        return {
            "total": self.total,
            "kept": self.total - self.dropped,
            "dropped": self.dropped,
            "prompts_truncated": self.prompts_truncated,
            "responses_truncated": self.responses_truncated,
            "boundary_fallbacks": self.boundary_fallbacks,
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
    joint: bool = True
    """False when the response was tokenised alone (the joint split did not hold)."""

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    """`ids` with BOS in front when the tokenizer adds one and they do not start with it."""
    bos = tokenizer.bos_token_id
    if (not ids or ids[0] != bos) and _adds_bos(tokenizer):
        return [bos] + ids
    return ids


def _left_truncate(tokenizer, ids: list[int], limits: TruncationLimits | None) -> tuple[list[int], bool]:
    """The last `max_prompt_len` ids (a leading BOS kept) and whether any were cut."""
    limit = limits.max_prompt_len if limits is not None else None
    if limit is None or len(ids) <= limit:
        return ids, False
    if ids and ids[0] == tokenizer.bos_token_id and limit > 1:
        return [ids[0]] + ids[len(ids) - (limit - 1) :], True
    return ids[len(ids) - limit :], True


def encode_prompt(
    tokenizer, prompt: Prompt, limits: TruncationLimits | None = None
) -> tuple[list[int], bool]:
    """Prompt ids (BOS first when the tokenizer adds one) and whether they were left-truncated.

    Special tokens are added by hand rather than by `add_special_tokens=True`, because some
    post-processors also append EOS, and a chat template may already render BOS as text.
    """
    ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    return _left_truncate(tokenizer, _with_bos(tokenizer, ids), limits)


def encode_response(tokenizer, response: str, prompt: Prompt = "", eot: list[int] | None = None) -> list[int]:
    """Response ids (no BOS) as they follow the rendered `prompt` (the boundary rule of the module
    docstring), followed by `end_of_turn_ids(tokenizer, prompt)` (EOS last).

    `eot` short-cuts the end-of-turn lookup when the caller already has it. With the default
    empty prompt the response is tokenised as it starts a text.
    """
    return _PromptText(tokenizer, prompt, [response]).response(0, eot)[0]


class _PromptText:
    """A prompt rendered and tokenised once, with the joint encodings of its responses (one
    tokenizer call for all of them)."""

    def __init__(self, tokenizer, prompt: Prompt, responses: Sequence[str]):
        self.tokenizer = tokenizer
        self.text = render_prompt(tokenizer, prompt)
        self.lead, self.eot = _assistant_turn(tokenizer, prompt)
        lead = self.lead
        self.responses = [lead + r if lead and not r.startswith(lead) else r for r in responses]
        batch = tokenizer([self.text] + [self.text + r for r in self.responses], add_special_tokens=False)
        self.text_ids, self._joint = batch["input_ids"][0], batch["input_ids"][1:]

    def ids(self, limits: TruncationLimits | None) -> tuple[list[int], bool]:
        """As `encode_prompt`."""
        return _left_truncate(self.tokenizer, _with_bos(self.tokenizer, list(self.text_ids)), limits)

    def response(self, i: int, eot: list[int] | None = None) -> tuple[list[int], bool]:
        """(response i's ids + end of turn, whether the joint split held)."""
        n, joint = len(self.text_ids), self._joint[i]
        if joint[:n] == self.text_ids:
            ids, ok = joint[n:], True
        else:
            ids, ok = self.tokenizer(self.responses[i], add_special_tokens=False)["input_ids"], False
        return ids + (eot if eot is not None else self.eot), ok


def _cut_response(ids: list[int], prompt_len: int, limits: TruncationLimits | None) -> tuple[list[int], bool]:
    if limits is None or limits.max_len is None:
        return ids, False
    room = max(limits.max_len - prompt_len, 0)
    if len(ids) <= room:
        return ids, False
    return ids[:room], True


def encode_pair(tokenizer, prompt: Prompt, response: str, limits: TruncationLimits | None = None) -> Encoded:
    """Tokenise prompt and response by the boundary rule and apply `limits`.

    The result may have empty `response_ids` when the prompt leaves no room; callers drop it.
    """
    text = _PromptText(tokenizer, prompt, [response])
    prompt_ids, p_cut = text.ids(limits)
    full, joint = text.response(0)
    response_ids, r_cut = _cut_response(full, len(prompt_ids), limits)
    return Encoded(prompt_ids, response_ids, p_cut, r_cut, joint)


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
        stats.boundary_fallbacks += not enc.joint
        if not enc.response_ids:
            stats.dropped += 1
            continue
        out.append(TokenizedSFT(enc.prompt_ids, enc.response_ids, ex.category))
    return out, stats


def tokenize_preference(
    tokenizer, pairs: Iterable[PreferencePair], limits: TruncationLimits | None = None
) -> tuple[list[TokenizedPair], TruncationStats]:
    """Tokenise preference pairs: one prompt encoding shared by both responses (each split from its
    own joint encoding), each response cut against the same limits.

    A pair is dropped (and counted) when either response would be empty.
    """
    stats = TruncationStats()
    out = []
    for p in pairs:
        stats.total += 1
        text = _PromptText(tokenizer, p.prompt, [p.chosen, p.rejected])
        prompt_ids, p_cut = text.ids(limits)
        n = len(prompt_ids)
        (chosen, c_joint), (rejected, r_joint) = text.response(0), text.response(1)
        chosen, c_cut = _cut_response(chosen, n, limits)
        rejected, r_cut = _cut_response(rejected, n, limits)
        stats.prompts_truncated += p_cut
        stats.responses_truncated += c_cut + r_cut
        stats.boundary_fallbacks += (not c_joint) + (not r_joint)
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
        stats.boundary_fallbacks += not enc.joint
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

"""Read SFT, preference, feedback and prompt data from files into records.

Containers: `.jsonl` (also `.ndjson`), `.json` (a list of objects, an object holding one such
list, or JSON Lines saved under a `.json` name as `datasets` does), either gzipped, and
`.parquet` (needs pyarrow). The format is detected once, from the first record's keys; every
later record must follow it. Anything wrong is a `DataError` naming the file and the line (JSON
Lines), record (JSON list, 1-based) or row (parquet, 1-based).

Formats, by kind (name: keys):

    sft         prompt_response: prompt, response      prompt_completion: prompt, completion
                messages: messages                     alpaca: instruction, [input], output
                sharegpt: conversations (from/value)
    preference  sharegpt_preference: conversations, chosen, rejected  (LLaMA-Factory)
                prompt_chosen_rejected: prompt, chosen, rejected  (strings or message lists)
                hh_rlhf: chosen, rejected  (whole "\\n\\nHuman: ... \\n\\nAssistant: ..." dialogues)
                chosen_rejected_messages: chosen, rejected  (whole message lists)
    unpaired    prompt_completion_label: prompt, completion, label
                messages_label: messages, label  (LLaMA-Factory KTO)
    prompt      prompt: prompt      messages: messages      alpaca: instruction, [input]
                question: question

Decisions worth knowing:
- A conversational prompt must end with a user turn; an SFT or KTO conversation must end with
  the assistant turn that is learned (a trailing user turn is an error, never dropped).
- Alpaca `system` and `history` ([[query, answer], ...]) are folded into a conversation prompt.
- ShareGPT roles human/gpt map to user/assistant; a top-level `system` string becomes the first turn.
- Unpaired labels may be a bool, 0/1, or the strings "true"/"false" (any case).
- Preference pairs may carry `margin` (number) and `soft_label` or `label_prob` (0..1).
- HH-RLHF responses keep their leading space: the prompt ends exactly at "Assistant:".
- A null value counts as a missing field (parquet fills absent columns with nulls).
- Identical chosen and rejected are accepted here; flagging them is lint's job.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import statistics
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from alignkit.data.records import (
    KINDS,
    Message,
    PreferencePair,
    Prompt,
    PromptOnly,
    Record,
    SFTExample,
    UnpairedExample,
    prompt_text,
)

HH_MARKER = "\n\nAssistant:"
ON_ERROR = ("raise", "skip")


class DataError(ValueError):
    """A problem with a data file; the message is one line: `file:line: problem`."""

    def __init__(
        self,
        path: str | os.PathLike,
        problem: str,
        line: int | None = None,
        unit: str = "line",
        reason: str | None = None,
    ):
        self.path = str(path)
        self.line = line
        self.unit = unit
        self.reason = reason or problem
        problem = problem.replace("\n", "\\n")
        if line is None:
            where = self.path
        elif unit == "line":
            where = f"{self.path}:{line}"
        else:
            where = f"{self.path}: {unit} {line}"
        super().__init__(f"{where}: {problem}")


class RecordError(ValueError):
    """A problem with one record. `reason` is a short category used for counting skips."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason} ({detail})" if detail else reason)


@dataclass(frozen=True)
class Skip:
    """A record left out in skip mode: where it was and why."""

    line: int
    reason: str
    detail: str = ""


@dataclass
class LoadResult:
    """Records read from one file.

    unit: what `Skip.line` counts: "line" (JSON Lines), "record" (JSON list) or "row" (parquet).
    """

    records: list[Record]
    format: str
    path: str
    skipped: list[Skip] = field(default_factory=list)
    kind: str = ""
    unit: str = "line"

    def skip_reasons(self) -> dict[str, int]:
        """Reason category -> number of skipped records, most common first."""
        return dict(Counter(s.reason for s in self.skipped).most_common())


def _type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "bool", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _short(value: Any, n: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _text(rec: dict, key: str) -> str:
    value = rec.get(key)
    if value is None:
        raise RecordError(f"missing field '{key}'")
    if not isinstance(value, str):
        raise RecordError(f"mistyped field '{key}'", f"expected a string, got {_type(value)}")
    return value


def _nonempty(value: str, name: str) -> str:
    if not value.strip():
        raise RecordError(f"empty {name}")
    return value


def _optional_text(rec: dict, key: str) -> str | None:
    value = rec.get(key)
    if value is not None and not isinstance(value, str):
        raise RecordError(f"mistyped field '{key}'", f"expected a string, got {_type(value)}")
    return value


_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


def _messages(
    value: Any, key: str, role_key: str = "role", content_key: str = "content"
) -> tuple[Message, ...]:
    if not isinstance(value, list):
        raise RecordError(f"mistyped field '{key}'", f"expected a list of messages, got {_type(value)}")
    return tuple(_message(m, f"{key}[{i}]", role_key, content_key) for i, m in enumerate(value))


def _message(m: Any, where: str, role_key: str = "role", content_key: str = "content") -> Message:
    if not isinstance(m, dict):
        raise RecordError(f"mistyped message in '{where.split('[')[0]}'", f"{where} is a {_type(m)}")
    for k in (role_key, content_key):
        if m.get(k) is None:
            raise RecordError(f"missing field '{k}'", f"in {where}")
    role, content = m[role_key], m[content_key]
    if not isinstance(content, str):
        raise RecordError(
            f"mistyped field '{content_key}'", f"{where}: expected a string, got {_type(content)}"
        )
    if not isinstance(role, str) or role.lower() not in _ROLES:
        raise RecordError(
            "unknown role", f"{where} has {role_key}={_short(role)}; expected one of {sorted(_ROLES)}"
        )
    return Message(_ROLES[role.lower()], content)


def _check_prompt(turns: tuple[Message, ...]) -> tuple[Message, ...]:
    if not turns:
        raise RecordError("empty prompt")
    if turns[-1].role != "user":
        raise RecordError("prompt does not end with a user turn", f"last turn is {turns[-1].role!r}")
    return turns


def _split_dialogue(turns: tuple[Message, ...], key: str, name: str) -> tuple[tuple[Message, ...], str]:
    """(prompt turns, last assistant content) of a conversation that ends with the assistant."""
    if not turns or turns[-1].role != "assistant":
        last = turns[-1].role if turns else "nothing"
        raise RecordError("no final assistant turn", f"'{key}' ends with {last}")
    return _check_prompt(turns[:-1]), _nonempty(turns[-1].content, name)


def _with_system(rec: dict, turns: tuple[Message, ...]) -> tuple[Message, ...]:
    system = _optional_text(rec, "system")
    if system and not (turns and turns[0].role == "system"):
        return (Message("system", system), *turns)
    return turns


def _prompt(rec: dict, key: str = "prompt", drop_reply: bool = False) -> Prompt:
    """A string or message-list prompt; `drop_reply` drops a trailing assistant turn."""
    value = rec.get(key)
    if isinstance(value, str):
        return _nonempty(value, "prompt")
    if isinstance(value, list):
        turns = _messages(value, key)
        if drop_reply and turns and turns[-1].role == "assistant":
            turns = turns[:-1]
        return _check_prompt(turns)
    raise RecordError(
        f"mistyped field '{key}'", f"expected a string or a list of messages, got {_type(value)}"
    )


def _alpaca_prompt(rec: dict) -> Prompt:
    query = _text(rec, "instruction")
    extra = _optional_text(rec, "input") or ""
    if extra.strip():
        query = f"{query}\n\n{extra}"
    _nonempty(query, "prompt")
    system = _optional_text(rec, "system")
    history = rec.get("history") or []
    if not system and not history:
        return query
    if not isinstance(history, list):
        raise RecordError(
            "mistyped field 'history'", f"expected a list of [query, answer] pairs, got {_type(history)}"
        )
    turns = [Message("system", system)] if system else []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise RecordError(
                "mistyped field 'history'", f"history[{i}] is not a [query, answer] pair of strings"
            )
        turns += [Message("user", pair[0]), Message("assistant", pair[1])]
    return (*turns, Message("user", query))


def _reply(rec: dict, key: str, role_key: str = "role", content_key: str = "content") -> str:
    """A response given as a string, one assistant message, or a list holding one."""
    value = rec.get(key)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        message = _message(value, key, role_key, content_key)
        if message.role != "assistant":
            raise RecordError(
                f"mistyped field '{key}'", f"expected an assistant message, got role {message.role!r}"
            )
        value = message.content
    if not isinstance(value, str):
        got = f"a list of {len(value)} messages" if isinstance(value, list) else _type(value)
        raise RecordError(f"mistyped field '{key}'", f"expected a string or one assistant message, got {got}")
    return _nonempty(value, key)


def _category(rec: dict) -> str | None:
    return _optional_text(rec, "category")


def _number(rec: dict, key: str) -> float | None:
    value = rec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(f"mistyped field '{key}'", f"expected a finite number, got {_short(value)}")
    return float(value)


def _soft_label(rec: dict) -> float | None:
    key = "soft_label" if rec.get("soft_label") is not None else "label_prob"
    value = _number(rec, key)
    if value is not None and not 0.0 <= value <= 1.0:
        raise RecordError(f"invalid {key}", f"expected a probability in [0, 1], got {value}")
    return value


def _label(rec: dict) -> bool:
    value = rec.get("label")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RecordError("invalid label", f"expected true/false, got {_short(value)}")


def split_hh_dialogue(chosen: str, rejected: str, marker: str = HH_MARKER) -> tuple[str, str, str]:
    """Split two whole HH-RLHF dialogues into (prompt, chosen response, rejected response).

    The prompt is the shared prefix up to and including its last `marker`; responses may
    themselves contain the marker (the model sometimes rambled on), so the split point is
    taken from the shared part, never from either dialogue alone.
    """
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(marker)
    if cut < 0:
        raise RecordError(
            "no shared Assistant turn", f"chosen and rejected share no {marker.strip()!r} marker"
        )
    cut += len(marker)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _pair(rec: dict, prompt: Prompt, chosen: str, rejected: str) -> PreferencePair:
    return PreferencePair(prompt, chosen, rejected, _number(rec, "margin"), _soft_label(rec), _category(rec))


def _parse_hh(rec: dict) -> PreferencePair:
    chosen, rejected = _text(rec, "chosen"), _text(rec, "rejected")
    prompt, chosen, rejected = split_hh_dialogue(chosen, rejected)
    return _pair(rec, prompt, _nonempty(chosen, "chosen"), _nonempty(rejected, "rejected"))


def _parse_implicit_messages(rec: dict) -> PreferencePair:
    chosen, rejected = _messages(rec["chosen"], "chosen"), _messages(rec["rejected"], "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise RecordError(
            "chosen and rejected differ before the last turn",
            "expected the same conversation with a different final assistant turn",
        )
    prompt, chosen_text = _split_dialogue(chosen, "chosen", "chosen")
    _, rejected_text = _split_dialogue(rejected, "rejected", "rejected")
    return _pair(rec, prompt, chosen_text, rejected_text)


def _parse_explicit(rec: dict) -> PreferencePair:
    return _pair(rec, _prompt(rec), _reply(rec, "chosen"), _reply(rec, "rejected"))


def _parse_sharegpt_preference(rec: dict) -> PreferencePair:
    turns = _with_system(rec, _messages(rec["conversations"], "conversations", "from", "value"))
    chosen, rejected = _reply(rec, "chosen", "from", "value"), _reply(rec, "rejected", "from", "value")
    return _pair(rec, _check_prompt(turns), chosen, rejected)


def _parse_sft_messages(rec: dict) -> SFTExample:
    prompt, response = _split_dialogue(
        _with_system(rec, _messages(rec["messages"], "messages")), "messages", "response"
    )
    return SFTExample(prompt, response, _category(rec))


def _parse_sharegpt(rec: dict) -> SFTExample:
    turns = _with_system(rec, _messages(rec["conversations"], "conversations", "from", "value"))
    prompt, response = _split_dialogue(turns, "conversations", "response")
    return SFTExample(prompt, response, _category(rec))


def _parse_kto_messages(rec: dict) -> UnpairedExample:
    prompt, completion = _split_dialogue(
        _with_system(rec, _messages(rec["messages"], "messages")), "messages", "completion"
    )
    return UnpairedExample(prompt, completion, _label(rec), _category(rec))


def _parse_prompt_response(rec: dict) -> SFTExample:
    return SFTExample(_prompt(rec), _nonempty(_text(rec, "response"), "response"), _category(rec))


def _parse_prompt_completion(rec: dict) -> SFTExample:
    return SFTExample(_prompt(rec), _nonempty(_text(rec, "completion"), "completion"), _category(rec))


def _parse_alpaca(rec: dict) -> SFTExample:
    return SFTExample(_alpaca_prompt(rec), _nonempty(_text(rec, "output"), "response"), _category(rec))


def _parse_prompt_completion_label(rec: dict) -> UnpairedExample:
    completion = _nonempty(_text(rec, "completion"), "completion")
    return UnpairedExample(_prompt(rec), completion, _label(rec), _category(rec))


def _prompt_only(prompt: Prompt, rec: dict, used: tuple[str, ...]) -> PromptOnly:
    # Extra fields (a reference answer, an id) ride along in `meta` for evaluation.
    meta = {k: v for k, v in rec.items() if k not in used and k != "category"}
    return PromptOnly(prompt, _category(rec), meta)


def _parse_prompt(rec: dict) -> PromptOnly:
    return _prompt_only(_prompt(rec, drop_reply=True), rec, ("prompt",))


def _parse_prompt_messages(rec: dict) -> PromptOnly:
    return _prompt_only(_prompt(rec, "messages", drop_reply=True), rec, ("messages",))


def _parse_prompt_alpaca(rec: dict) -> PromptOnly:
    return _prompt_only(_alpaca_prompt(rec), rec, ("instruction", "input", "system", "history"))


def _parse_question(rec: dict) -> PromptOnly:
    return _prompt_only(_nonempty(_text(rec, "question"), "prompt"), rec, ("question",))


def _chosen_is(kind: type) -> Callable[[dict], bool]:
    return lambda rec: isinstance(rec["chosen"], kind)


def _ends_with_assistant(rec: dict) -> bool:
    turns = rec["messages"]
    if not (isinstance(turns, list) and turns and isinstance(turns[-1], dict)):
        return False
    return _ROLES.get(str(turns[-1].get("role")).lower()) == "assistant"


@dataclass(frozen=True)
class Format:
    """A known input format.

    keys: fields that must be present (and non-null); they identify the format.
    when: an extra test on the first record, to choose between formats with the same keys.
    """

    name: str
    kind: str
    keys: tuple[str, ...]
    parse: Callable[[dict], Record]
    when: Callable[[dict], bool] | None = None

    def describe(self) -> str:
        return f"{self.name} ({', '.join(self.keys)})"


# Order matters: when several formats' keys are present, the first one wins, so the more
# specific formats come first and, with no kind given, preference > unpaired > sft > prompt.
# fmt: off
FORMATS: tuple[Format, ...] = (
    Format("sharegpt_preference", "preference", ("conversations", "chosen", "rejected"),
           _parse_sharegpt_preference),
    Format("prompt_chosen_rejected", "preference", ("prompt", "chosen", "rejected"), _parse_explicit),
    Format("hh_rlhf", "preference", ("chosen", "rejected"), _parse_hh, _chosen_is(str)),
    Format("chosen_rejected_messages", "preference", ("chosen", "rejected"), _parse_implicit_messages,
           _chosen_is(list)),
    Format("prompt_completion_label", "unpaired", ("prompt", "completion", "label"),
           _parse_prompt_completion_label),
    Format("messages_label", "unpaired", ("messages", "label"), _parse_kto_messages),
    Format("prompt_response", "sft", ("prompt", "response"), _parse_prompt_response),
    Format("prompt_completion", "sft", ("prompt", "completion"), _parse_prompt_completion),
    Format("messages", "sft", ("messages",), _parse_sft_messages, _ends_with_assistant),
    Format("alpaca", "sft", ("instruction", "output"), _parse_alpaca),
    Format("sharegpt", "sft", ("conversations",), _parse_sharegpt),
    Format("prompt", "prompt", ("prompt",), _parse_prompt),
    Format("messages", "prompt", ("messages",), _parse_prompt_messages),
    Format("alpaca", "prompt", ("instruction",), _parse_prompt_alpaca),
    Format("question", "prompt", ("question",), _parse_question),
)
# fmt: on


def detect_format(rec: dict, kind: str | None = None) -> Format:
    """The format of `rec` (the first record of a file), among those of `kind` if given.

    Formats whose `when` test holds are preferred; otherwise the first whose keys match is
    used, so that a malformed first record gets a precise error rather than "unknown format".
    """
    matching = [
        f for f in FORMATS if (kind is None or f.kind == kind) and all(rec.get(k) is not None for k in f.keys)
    ]
    half = [k for k in ("chosen", "rejected") if rec.get(k) is not None]
    if kind in (None, "preference") and len(half) == 1:
        # a pair with one side missing would otherwise pass as a prompt-only or SFT file
        other = "rejected" if half[0] == "chosen" else "chosen"
        raise RecordError(f"missing field '{other}'", f"a preference record needs both 'chosen' and 'rejected'; "
                          f"keys {sorted(rec)}")
    for fmt in matching:
        if fmt.when is None or fmt.when(rec):
            return fmt
    if matching:
        return matching[0]
    expected = "; ".join(f.describe() for f in FORMATS if kind is None or f.kind == kind)
    raise RecordError(
        "unknown format", f"keys {sorted(rec)} match no {kind or 'known'} format; expected one of: {expected}"
    )


def parse_record(rec: dict, fmt: Format) -> Record:
    """Normalise one raw record of format `fmt`; raises RecordError."""
    for key in fmt.keys:
        if rec.get(key) is None:
            raise RecordError(f"missing field '{key}'", f"format {fmt.describe()}")
    return fmt.parse(rec)


_Item = tuple[int, Any]  # (1-based position, parsed JSON value or a RecordError)


def _open(path: Path, gz: bool):
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _jsonl_items(path: Path, gz: bool) -> Iterator[_Item]:
    try:
        with _open(path, gz) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield lineno, RecordError("invalid UTF-8", str(e))
                    continue
                if not text.strip():
                    continue
                try:
                    yield lineno, json.loads(text)
                except json.JSONDecodeError as e:
                    yield lineno, RecordError("invalid JSON", f"{e.msg} at column {e.colno}")
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(path, f"cannot read file: {e}") from None


def _json_items(path: Path, gz: bool) -> tuple[str, Iterable[_Item]]:
    try:
        with _open(path, gz) as f:
            data = f.read()
        text = data.decode("utf-8-sig")
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(path, f"cannot read file: {e}") from None
    except UnicodeDecodeError as e:
        raise DataError(path, f"not valid UTF-8: {e}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return "line", _jsonl_items(path, gz)  # JSON Lines under a .json name
        raise DataError(
            path, f"invalid JSON: {e.msg} at column {e.colno}", e.lineno, reason="invalid JSON"
        ) from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            keys = sorted(value)[:10]
            problem = "expected a JSON list of records or an object holding one list"
            raise DataError(path, f"{problem}; got an object with keys {keys}")
        value = lists[0]
    if not isinstance(value, list):
        raise DataError(path, f"expected a JSON list of records, got a {_type(value)}")
    return "record", enumerate(value, 1)


def _parquet_items(path: Path) -> Iterable[_Item]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(path, "reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as e:
        raise DataError(path, f"cannot read parquet file: {e}") from None

    def rows() -> Iterator[_Item]:
        n = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield n, row

    return rows()


def read_raw(path: str | os.PathLike) -> tuple[str, Iterable[_Item]]:
    """(unit, items) for a data file: unit is "line", "record" or "row"; items are
    (1-based position, JSON value) pairs, or a RecordError for an unreadable line."""
    p = Path(path)
    if not p.exists():
        raise DataError(path, "file not found")
    if p.is_dir():
        raise DataError(path, "is a directory; expected a data file")
    name = p.name.lower()
    gz = name.endswith(".gz")
    base = name[:-3] if gz else name
    if base.endswith((".jsonl", ".ndjson")):
        return "line", _jsonl_items(p, gz)
    if base.endswith(".json"):
        return _json_items(p, gz)
    if base.endswith(".parquet") and not gz:
        return "row", _parquet_items(p)
    raise DataError(path, "unsupported file type; expected .jsonl, .json (either may be .gz) or .parquet")


def parse_rows(
    items: Iterable[_Item],
    kind: str | None = None,
    on_error: str = "raise",
    limit: int = 0,
    path: str = "<rows>",
    unit: str = "line",
) -> LoadResult:
    """Normalise (position, raw record) pairs into records; see `load_records`.

    Also the way in for in-memory rows, e.g. `enumerate(dataset, 1)` for a `datasets.Dataset`.
    """
    if kind is not None and kind not in KINDS:
        raise DataError(path, f"unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    if on_error not in ON_ERROR:
        raise DataError(path, f"unknown on_error {on_error!r}; expected one of {ON_ERROR}")
    fmt: Format | None = None
    records: list[Record] = []
    skipped: list[Skip] = []
    for pos, raw in items:
        try:
            if isinstance(raw, RecordError):
                raise raw
            if not isinstance(raw, dict):
                raise RecordError("not a JSON object", f"got a {_type(raw)}")
            if fmt is None:
                try:
                    fmt = detect_format(raw, kind)
                except RecordError as e:
                    # The format is a property of the whole file: never skippable.
                    raise DataError(path, str(e), pos, unit, e.reason) from None
            records.append(parse_record(raw, fmt))
        except RecordError as e:
            if on_error == "raise":
                hint = " (data.on_error=skip skips such records and reports them)"
                raise DataError(path, str(e) + hint, pos, unit, e.reason) from None
            skipped.append(Skip(pos, e.reason, e.detail))
        if limit and len(records) >= limit:
            break
    if not records:
        if not skipped:
            raise DataError(path, "no records: the file is empty")
        first = skipped[0]
        common = Counter(s.reason for s in skipped).most_common(1)[0]
        raise DataError(
            path,
            f"no usable records: all {len(skipped)} were skipped "
            f"(most often: {common[0]}, {common[1]}x; first at {unit} {first.line})",
        )
    assert fmt is not None
    return LoadResult(records, fmt.name, path, skipped, fmt.kind, unit)


def load_records(
    path: str | os.PathLike, kind: str | None = None, on_error: str = "raise", limit: int = 0
) -> LoadResult:
    """Read a data file into records of one kind ("sft", "preference", "unpaired", "prompt").

    kind: None infers it from the first record's keys.
    on_error: "raise" stops at the first bad record with a DataError naming file and line;
        "skip" leaves it out and lists it in `LoadResult.skipped`.
    limit: stop after this many records (0: all).
    A file with no usable records is always a DataError.
    """
    unit, items = read_raw(path)
    return parse_rows(items, kind, on_error, limit, str(path), unit)


_LENGTH_FIELDS = {
    "sft": ("prompt", "response"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion"),
    "prompt": ("prompt",),
}


def _render(record: Record) -> dict:
    out: dict[str, Any] = {}
    for f in fields(record):
        value = getattr(record, f.name)
        if value is None or value == {}:
            continue
        if isinstance(value, tuple):
            value = [{"role": m.role, "content": m.content} for m in value]
        out[f.name] = value
    return out


def _length_stats(lengths: list[int]) -> dict[str, float]:
    ordered = sorted(lengths)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]  # nearest rank
    return {
        "min": ordered[0],
        "mean": round(statistics.fmean(ordered), 1),
        "median": statistics.median(ordered),
        "p95": p95,
        "max": ordered[-1],
    }


def _token_stats(records: list[Record], kind: str, tokenizer: Any) -> dict[str, dict[str, float]]:
    stats = {}
    for name in _LENGTH_FIELDS[kind]:
        texts = [prompt_text(r.prompt) if name == "prompt" else getattr(r, name) for r in records]
        lengths: list[int] = []
        for i in range(0, len(texts), 512):
            ids = tokenizer(texts[i : i + 512], add_special_tokens=False, verbose=False)["input_ids"]
            lengths += [len(x) for x in ids]
        stats[name] = _length_stats(lengths)
    return stats


def inspect_file(
    path: str | os.PathLike,
    kind: str | None = None,
    tokenizer: Any = None,
    on_error: str = "skip",
    examples: int = 2,
) -> dict:
    """A JSON-ready summary of a data file: format, counts, skips, examples, token lengths.

    tokenizer: an optional Hugging Face tokenizer; token lengths are of the plain text
    (prompt_text() for conversations, no chat template, no special tokens).
    """
    result = load_records(path, kind=kind, on_error=on_error)
    report: dict[str, Any] = {
        "path": result.path,
        "format": result.format,
        "kind": result.kind,
        "unit": result.unit,
        "records": len(result.records),
        "skipped": len(result.skipped),
        "skip_reasons": result.skip_reasons(),
        "skipped_lines": [
            {"line": s.line, "reason": s.reason, "detail": s.detail} for s in result.skipped[:20]
        ],
        "examples": [_render(r) for r in result.records[:examples]],
    }
    if tokenizer is not None:
        report["tokens"] = _token_stats(result.records, result.kind, tokenizer)
    return report


def _clip(text: str, limit: int = 600) -> str:
    # Keep both ends: in a dialogue prompt the last turn matters most.
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters ...]\n{text[-half:]}"


def _indent(text: str, prefix: str = "      ") -> str:
    return "\n".join(prefix + line for line in text.splitlines() or [""])


def format_inspect(report: dict) -> str:
    """A readable multi-line text version of an `inspect_file` report."""
    unit = report.get("unit", "line")
    out = [
        f"file     {report['path']}",
        f"format   {report['format']} (kind: {report['kind']})",
        f"records  {report['records']}",
        f"skipped  {report['skipped']}",
    ]
    for reason, count in report["skip_reasons"].items():
        out.append(f"  {count:>6}  {reason}")
    if report["skipped_lines"]:
        out.append(f"  first skipped ({unit}):")
        for s in report["skipped_lines"]:
            detail = f" ({s['detail']})" if s["detail"] else ""
            out.append(f"    {unit} {s['line']}: {s['reason']}{detail}")
    if "tokens" in report:
        out.append("tokens (no special tokens, no chat template)")
        out.append(f"  {'':<12}{'min':>8}{'mean':>10}{'median':>10}{'p95':>8}{'max':>8}")
        for name, s in report["tokens"].items():
            out.append(f"  {name:<12}{s['min']:>8}{s['mean']:>10}{s['median']:>10}{s['p95']:>8}{s['max']:>8}")
    for i, example in enumerate(report["examples"], 1):
        out.append(f"example {i}")
        for name, value in example.items():
            if isinstance(value, list):
                value = "\n".join(f"[{m['role']}] {m['content']}" for m in value)
            elif not isinstance(value, str):
                value = json.dumps(value, ensure_ascii=False)
            out.append(f"  {name}:")
            out.append(_indent(_clip(value)))
    return "\n".join(out)

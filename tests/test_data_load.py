"""Reading data files into records: every format, every container, every error names file:line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from alignkit.data.load import (
    DataError,
    format_inspect,
    inspect_file,
    load_records,
    split_hh_dialogue,
)
from alignkit.data.records import Message, PreferencePair, PromptOnly, SFTExample, UnpairedExample

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (dumped) or raw strings (written as they are, for broken lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load_one(tmp_path: Path, row: dict, kind: str | None = None):
    result = load_records(write_jsonl(tmp_path / "d.jsonl", [row]), kind=kind)
    assert len(result.records) == 1
    return result.format, result.records[0]


U = lambda text: Message("user", text)  # noqa: E731
A = lambda text: Message("assistant", text)  # noqa: E731
S = lambda text: Message("system", text)  # noqa: E731


@pytest.mark.parametrize(
    "row, fmt, expected",
    [
        ({"prompt": "2+2?", "response": "4"}, "prompt_response", SFTExample("2+2?", "4")),
        (
            {"prompt": "2+2?", "completion": "4", "category": "math"},
            "prompt_completion",
            SFTExample("2+2?", "4", "math"),
        ),
        (
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"},
                ]
            },
            "messages",
            SFTExample((S("Be brief."), U("Hi"), A("Hello"), U("2+2?")), "4"),
        ),
        (
            {"instruction": "Add.", "input": "2 and 2", "output": "4"},
            "alpaca",
            SFTExample("Add.\n\n2 and 2", "4"),
        ),
        ({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca", SFTExample("Say hi.", "hi")),
        (
            {"instruction": "Again.", "output": "hi", "system": "Be kind.", "history": [["Say hi.", "hi"]]},
            "alpaca",
            SFTExample((S("Be kind."), U("Say hi."), A("hi"), U("Again.")), "hi"),
        ),
        (
            {
                "conversations": [
                    {"from": "system", "value": "Sys"},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello"},
                ]
            },
            "sharegpt",
            SFTExample((S("Sys"), U("Hi")), "Hello"),
        ),
    ],
)
def test_sft_formats(tmp_path, row, fmt, expected):
    assert load_one(tmp_path, row) == (fmt, expected)
    assert load_one(tmp_path, row, kind="sft") == (fmt, expected)


@pytest.mark.parametrize(
    "row, fmt, expected",
    [
        (
            {"prompt": "Q", "chosen": "good", "rejected": "bad", "margin": 2, "soft_label": 0.8},
            "prompt_chosen_rejected",
            PreferencePair("Q", "good", "bad", margin=2.0, soft_label=0.8),
        ),
        (
            {
                "prompt": [{"role": "user", "content": "Q"}],
                "chosen": [{"role": "assistant", "content": "good"}],
                "rejected": [{"role": "assistant", "content": "bad"}],
                "label_prob": 0.6,
                "category": "c",
            },
            "prompt_chosen_rejected",
            PreferencePair((U("Q"),), "good", "bad", soft_label=0.6, category="c"),
        ),
        (
            {
                "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
                "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}],
            },
            "chosen_rejected_messages",
            PreferencePair((U("Q"),), "good", "bad"),
        ),
        (
            {
                "conversations": [{"from": "human", "value": "Q"}],
                "system": "Sys",
                "chosen": {"from": "gpt", "value": "good"},
                "rejected": {"from": "gpt", "value": "bad"},
            },
            "sharegpt_preference",
            PreferencePair((S("Sys"), U("Q")), "good", "bad"),
        ),
        (
            {"chosen": "\n\nHuman: Q\n\nAssistant: good", "rejected": "\n\nHuman: Q\n\nAssistant: bad"},
            "hh_rlhf",
            PreferencePair("\n\nHuman: Q\n\nAssistant:", " good", " bad"),
        ),
    ],
)
def test_preference_formats(tmp_path, row, fmt, expected):
    assert load_one(tmp_path, row) == (fmt, expected)
    assert load_one(tmp_path, row, kind="preference") == (fmt, expected)


def test_hh_split_by_hand():
    """Multi-turn HH dialogues, worked out by hand.

    The two dialogues share "...Name a colour.\\n\\nAssistant: B" (both answers start with B),
    so the shared prefix runs past the marker; the prompt still ends at the last shared
    "\\n\\nAssistant:", and each response keeps its leading space.
    """
    context = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant:"
    assert split_hh_dialogue(context + " Blue.", context + " Bread.") == (context, " Blue.", " Bread.")

    # A response that rambles on into invented turns keeps them: the split comes from the shared part.
    ramble = " Red.\n\nHuman: thanks\n\nAssistant: welcome"
    assert split_hh_dialogue(context + ramble, context + " No.") == (context, ramble, " No.")


def test_unpaired_formats_and_labels(tmp_path):
    rows = [
        {"prompt": "Q", "completion": "good", "label": True},
        {"prompt": "Q", "completion": "bad", "label": "False"},
        {"prompt": "Q", "completion": "ok", "label": 1},
    ]
    result = load_records(write_jsonl(tmp_path / "u.jsonl", rows))
    assert (result.format, result.kind) == ("prompt_completion_label", "unpaired")
    assert [r.desirable for r in result.records] == [True, False, True]

    kto = {
        "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        "label": False,
    }
    assert load_one(tmp_path, kto) == ("messages_label", UnpairedExample((U("Q"),), "A", False))

    path = write_jsonl(
        tmp_path / "bad.jsonl", [rows[0], {"prompt": "Q", "completion": "x", "label": "maybe"}]
    )
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid label"):
        load_records(path)


def test_prompt_formats(tmp_path):
    chat = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Q2"},
    ]
    assert load_one(tmp_path, {"prompt": "Q", "category": "c"}) == ("prompt", PromptOnly("Q", "c"))
    # With no kind, a conversation ending on the user is a prompt, not an SFT example.
    assert load_one(tmp_path, {"messages": chat}) == ("messages", PromptOnly((U("Q"), A("A"), U("Q2"))))
    # As prompts, a final assistant turn is dropped.
    assert load_one(tmp_path, {"messages": chat[:2]}, kind="prompt") == ("messages", PromptOnly((U("Q"),)))
    assert (
        load_one(tmp_path, {"instruction": "Do", "input": "it", "output": "x"}, kind="prompt")[1].prompt
        == "Do\n\nit"
    )
    fmt, record = load_one(tmp_path, {"question": "2+2?", "answer": "#### 4"})
    assert (fmt, record.prompt, record.meta) == ("question", "2+2?", {"answer": "#### 4"})


ROWS = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(3)]
EXPECTED = [SFTExample(f"q{i}", f"a{i}") for i in range(3)]


def test_json_list_and_wrapped_list(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS, indent=2))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    for name in ("a.json", "b.json"):
        result = load_records(tmp_path / name)
        assert (result.records, result.unit) == (EXPECTED, "record")


def test_json_lines_under_json_name(tmp_path):
    result = load_records(write_jsonl(tmp_path / "rows.json", ROWS))
    assert (result.records, result.unit) == (EXPECTED, "line")


def test_gzip(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in ROWS))
    with gzip.open(tmp_path / "b.json.gz", "wt") as f:
        json.dump(ROWS, f)
    assert load_records(tmp_path / "a.jsonl.gz").records == EXPECTED
    assert load_records(tmp_path / "b.json.gz").records == EXPECTED


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [*ROWS, {"prompt": "q3", "response": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    result = load_records(tmp_path / "d.parquet", on_error="skip")
    assert result.records == EXPECTED
    assert [(s.line, s.reason) for s in result.skipped] == [(4, "missing field 'response'")]
    with pytest.raises(DataError, match=r"d\.parquet: row 4: missing field 'response'"):
        load_records(tmp_path / "d.parquet")


def test_limit(tmp_path):
    assert load_records(write_jsonl(tmp_path / "d.jsonl", ROWS), limit=2).records == EXPECTED[:2]


def error_of(path: Path, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_records(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "bad, expected",
    [
        ('{"prompt": "q", "response": ', "d.jsonl:4: invalid JSON"),
        ('["prompt", "response"]', "d.jsonl:4: not a JSON object"),
        ({"prompt": "q"}, "d.jsonl:4: missing field 'response' (format prompt_response (prompt, response))"),
        ({"prompt": "q", "response": 7}, "d.jsonl:4: mistyped field 'response' (expected a string, got int)"),
        (
            {"prompt": "q", "response": ["a"]},
            "d.jsonl:4: mistyped field 'response' (expected a string, got list)",
        ),
        ({"prompt": "q", "response": "  \n"}, "d.jsonl:4: empty response"),
        ({"prompt": "", "response": "a"}, "d.jsonl:4: empty prompt"),
        ({"prompt": "q", "response": "a", "category": 3}, "d.jsonl:4: mistyped field 'category'"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, bad, expected):
    """Line 3 is blank: blank lines are not records but still count as lines."""
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[1], "", bad, ROWS[2]])
    assert expected in error_of(path)

    result = load_records(path, on_error="skip")
    assert result.records == EXPECTED
    assert [s.line for s in result.skipped] == [4]


@pytest.mark.parametrize(
    "bad, expected",
    [
        ({"prompt": "q", "chosen": "a", "rejected": ""}, "empty rejected"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "soft_label": 1.5}, "invalid soft_label"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "mistyped field 'margin'"),
        (
            {"prompt": [{"role": "assistant", "content": "q"}], "chosen": "a", "rejected": "b"},
            "prompt does not end with a user turn",
        ),
        ({"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"}, "unknown role"),
        (
            {
                "prompt": "q",
                "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
                "rejected": "b",
            },
            "mistyped field 'chosen' (expected a string or one assistant message, got a list of 2",
        ),
    ],
)
def test_bad_preference_record(tmp_path, bad, expected):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "p.jsonl", [good, bad])
    assert error_of(path).startswith(f"{path}:2: {expected}")


def test_hh_errors(tmp_path):
    good = {"chosen": "\n\nHuman: Q\n\nAssistant: a", "rejected": "\n\nHuman: Q\n\nAssistant: b"}
    empty = {"chosen": "\n\nHuman: Q\n\nAssistant: ", "rejected": "\n\nHuman: Q\n\nAssistant: b"}
    unmarked = {"chosen": "hello", "rejected": "help"}
    path = write_jsonl(tmp_path / "hh.jsonl", [good, empty, unmarked])
    assert f"{path}:2: empty chosen" in error_of(path)
    result = load_records(path, on_error="skip")
    assert [(s.line, s.reason) for s in result.skipped] == [
        (2, "empty chosen"),
        (3, "no shared Assistant turn"),
    ]


def test_identical_pair_is_not_an_error(tmp_path):
    """Identical chosen/rejected are lint's business, not the reader's."""
    row = {"prompt": "q", "chosen": "same", "rejected": "same"}
    assert load_one(tmp_path, row)[1] == PreferencePair("q", "same", "same")


def test_sft_conversation_must_end_with_assistant(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"},
            {"role": "user", "content": "more?"},
        ]
    }
    assert "d.jsonl:1: no final assistant turn ('messages' ends with user)" in error_of(
        write_jsonl(tmp_path / "d.jsonl", [row]), kind="sft"
    )


def test_json_list_errors_name_the_record(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ROWS[0], ROWS[1], {"prompt": "q"}]))
    assert error_of(path).startswith(f"{path}: record 3: missing field 'response'")

    path.write_text('[\n  {"prompt": "q",\n   "response": }\n]')
    assert error_of(path).startswith(f"{path}:3: invalid JSON")


def test_unknown_format_lists_keys_and_formats(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["", {"foo": 1, "bar": 2}])
    message = error_of(path, on_error="skip")  # a file-level problem: never skipped
    assert message.startswith(f"{path}:2: unknown format")
    assert "['bar', 'foo']" in message and "prompt_response (prompt, response)" in message

    message = error_of(write_jsonl(tmp_path / "e.jsonl", ROWS), kind="preference")
    assert "match no preference format" in message and "hh_rlhf (chosen, rejected)" in message


def test_skip_mode_counts_and_reports(tmp_path):
    rows = [
        ROWS[0],
        "{oops",
        {"prompt": "q"},
        ROWS[1],
        {"prompt": "q", "response": ""},
        {"prompt": "q"},
        ROWS[2],
    ]
    result = load_records(write_jsonl(tmp_path / "d.jsonl", rows), on_error="skip")
    assert result.records == EXPECTED
    assert [(s.line, s.reason) for s in result.skipped] == [
        (2, "invalid JSON"),
        (3, "missing field 'response'"),
        (5, "empty response"),
        (6, "missing field 'response'"),
    ]
    assert result.skip_reasons() == {"missing field 'response'": 2, "invalid JSON": 1, "empty response": 1}


def test_file_level_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert error_of(tmp_path / "empty.jsonl") == f"{tmp_path / 'empty.jsonl'}: no records: the file is empty"
    all_bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "response": ""}, {"prompt": "r"}])
    assert "all 2 were skipped" in error_of(all_bad, on_error="skip")
    assert "file not found" in error_of(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    assert "unsupported file type" in error_of(tmp_path / "d.csv")
    (tmp_path / "x.jsonl.gz").write_bytes(b"not gzip")
    assert "cannot read file" in error_of(tmp_path / "x.jsonl.gz")


def word_tokenizer():
    """A tokenizer with one token per word or punctuation run, so lengths can be counted by eye."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_inspect_file(tmp_path):
    rows = [
        {"prompt": "one two", "chosen": "a b c", "rejected": "x"},
        "not json",
        {"prompt": "one two three four", "chosen": "a", "rejected": "x y"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    report = inspect_file(path, tokenizer=word_tokenizer())
    json.dumps(report)
    assert (report["format"], report["kind"], report["records"], report["skipped"]) == (
        "prompt_chosen_rejected",
        "preference",
        2,
        1,
    )
    assert report["skip_reasons"] == {"invalid JSON": 1}
    assert report["skipped_lines"][0]["line"] == 2
    assert report["examples"][0] == {"prompt": "one two", "chosen": "a b c", "rejected": "x"}
    assert report["tokens"]["prompt"] == {"min": 2, "mean": 3.0, "median": 3.0, "p95": 4, "max": 4}
    assert report["tokens"]["chosen"]["max"] == 3

    text = format_inspect(report)
    for needle in ("prompt_chosen_rejected", "line 2: invalid JSON", "chosen", "one two three"):
        assert needle in text

    with pytest.raises(DataError, match=r"p\.jsonl:2: invalid JSON"):
        inspect_file(path, on_error="raise")


real_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")


@real_data
def test_hh_rlhf_real():
    """2,312 pairs; four have an empty chosen reply (the assistant said nothing) and are skipped."""
    result = load_records(SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz", on_error="skip")
    assert (result.format, len(result.records) + len(result.skipped)) == ("hh_rlhf", 2312)
    assert [(s.line, s.reason) for s in result.skipped] == [(n, "empty chosen") for n in (87, 517, 926, 1104)]
    for pair in result.records:
        assert pair.prompt.startswith("\n\nHuman:") and pair.prompt.endswith("\n\nAssistant:")
    first = result.records[0]
    assert first.prompt.endswith("okay some of these do not have anything to do with pens\n\nAssistant:")
    assert first.chosen.startswith(" No, sorry!")


@real_data
@pytest.mark.parametrize(
    "name, fmt, kind, count",
    [
        ("alpaca_en_demo.json", "alpaca", "sft", 999),
        ("dpo_en_demo.json", "sharegpt_preference", "preference", 300),
        ("kto_en_demo.json", "messages_label", "unpaired", 300),
    ],
)
def test_llama_factory_real(name, fmt, kind, count):
    result = load_records(SHARED_DATA / "llama_factory" / name)
    assert (result.format, result.kind, len(result.records), result.skipped) == (fmt, kind, count, [])
    assert load_records(SHARED_DATA / "llama_factory" / name, kind=kind).format == fmt

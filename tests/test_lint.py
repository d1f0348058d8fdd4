"""Preference-data lint: each check on hand-made pairs, the cleaned/flagged files, real data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from alignkit.data.lint import (
    format_lint,
    lint_file,
    lint_preferences,
    near_identical,
    similarity,
)
from alignkit.data.load import load_records
from alignkit.data.records import Message, PreferencePair
from alignkit.data.tokenize import TruncationLimits, tokenize_preference

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

P = PreferencePair
GOOD = P("Write a poem about summer", "Golden rays dance on waves so bright...", "summer is hot lol")
BAD = P("What is 2+2?", "2+2 equals 4.", "2+2 is 4.")
PHOTO = P(
    "What is photosynthesis?",
    "Photosynthesis is the process where plants convert light energy into chemical energy.",
    "idk google it",
)


def reasons(report, i: int) -> list[str]:
    return [f.reason for f in report.flags.get(i, [])]


def test_similarity_by_hand():
    """Tokens 2 + 2 equals 4 . vs 2 + 2 is 4 . : 5 of 6 match on each side, 2*5/(6+6) = 0.833."""
    assert similarity("2+2 equals 4.", "2+2 is 4.") == pytest.approx(10 / 12)
    assert similarity("idk google it", PHOTO.chosen) == 0.0
    assert similarity("", "") == 1.0


def test_brief_examples():
    report = lint_preferences([GOOD, BAD, PHOTO])
    assert reasons(report, 0) == []
    assert reasons(report, 1) == ["near_identical"]
    assert reasons(report, 2) == []
    assert report.flags[1][0].detail == "similarity 0.83"
    assert report.removed() == [1]
    assert report.kept() == [0, 2]


@pytest.mark.parametrize(
    "a, b",
    [
        ("7 plus 5 is 12.", "7 plus 5 is 13."),  # a number differs
        ("The capital of Kitimor is Nudoburg.", "The capital of Kitimor is Tozuvik."),  # a name
        ("The flag of Fisaland is white.", "The flag of Fisaland is red."),  # a content word
        ("I can help.", "I can't help."),  # a negation
        ("I can help with that.", "I cannot help with that."),
        ("Use a knife.", "Use a knife. Obviously."),  # extra words
        ("The word apple in uppercase is APPLE.", "The word apple in uppercase is apple."),  # case
    ],
)
def test_minimal_pairs_are_not_near_identical(a, b):
    """Similar surfaces whose difference is the content: good training signal, kept."""
    assert similarity(a, b) >= 0.75
    assert near_identical(a, b) is None


@pytest.mark.parametrize(
    "a, b, score",
    [
        ("2+2 equals 4.", "2+2 is 4.", 10 / 12),
        ("You’re welcome.", "You're welcome!", 8 / 10),  # curly and straight apostrophes agree
        ("Paris", "Paris.", 2 / 3),  # punctuation only: flagged below the threshold too
        ("I don't know that.", "I do not know that", None),  # 0.67 < 0.8
    ],
)
def test_near_identical_scores(a, b, score):
    result = near_identical(a, b)
    assert (result is None) if score is None else result == pytest.approx(score)


def test_near_threshold():
    assert reasons(lint_preferences([BAD], near_threshold=0.9), 0) == []
    assert reasons(lint_preferences([BAD], near_threshold=0.8), 0) == ["near_identical"]
    with pytest.raises(ValueError, match="near_threshold"):
        lint_preferences([BAD], near_threshold=0.0)


def test_identical_and_empty():
    pairs = [
        P("q", "Paris is big.", " Paris  is\nbig. "),  # identical after whitespace normalisation
        P("q", "   ", "fine"),
        P("q", "fine", ""),
        P("q", "\n", " "),
    ]
    report = lint_preferences(pairs)
    assert reasons(report, 0) == ["identical"]
    assert [(f.reason, f.detail) for f in report.flags[1]] == [("empty", "chosen")]
    assert [(f.reason, f.detail) for f in report.flags[2]] == [("empty", "rejected")]
    assert [(f.reason, f.detail) for f in report.flags[3]] == [("empty", "chosen and rejected")]
    assert report.kept() == []


def test_duplicates_keep_the_first():
    pairs = [
        P("Name a fruit.", "An apple.", "Rocks."),
        P("Name a fruit.", "A pear.", "Rocks."),
        P("Name  a fruit.", " An apple.", "Rocks.\n"),  # same pair, other whitespace
        P("Name a fruit.", "An apple.", "Rocks."),
    ]
    report = lint_preferences(pairs)
    assert reasons(report, 0) == [] and reasons(report, 1) == []
    assert [(f.reason, report.describe(f)) for f in report.flags[2]] == [("duplicate", "of pair 0")]
    assert [(f.reason, report.describe(f)) for f in report.flags[3]] == [("duplicate", "of pair 0")]
    assert report.kept() == [0, 1]
    assert report.counts()["duplicate"] == 2


def test_contradictory_labels():
    pairs = [
        P("Best pet?", "A dog.", "A rock."),
        P("Best pet?", "A cat.", "A rock."),
        P("Best pet?", "A rock.", "A dog."),  # pair 0 the other way round
        P("Other question?", "A rock.", "A cat."),  # another prompt: no contradiction
        P("Best pet?", "A dog.", "A rock."),  # duplicate of 0, and contradicts 2 too
    ]
    report = lint_preferences(pairs)
    assert [(f.reason, report.describe(f)) for f in report.flags[0]] == [
        ("contradictory", "reversed in pair 2")
    ]
    assert reasons(report, 1) == [] and reasons(report, 3) == []
    assert [(f.reason, report.describe(f)) for f in report.flags[2]] == [
        ("contradictory", "reversed in pair 0")
    ]
    assert reasons(report, 4) == ["duplicate", "contradictory"]
    assert report.kept() == [1, 3]


def test_conversational_prompts_compare_by_text():
    conv = (Message("user", "Hi"),)
    report = lint_preferences([P(conv, "Hello!", "Go away."), P(conv, "Go away.", "Hello!")])
    assert reasons(report, 0) == ["contradictory"] and reasons(report, 1) == ["contradictory"]


def test_length_bias_by_hand():
    """12 pairs: chosen longer in 9, shorter in 2, tied in 1; ties are left out, so the
    fraction is 9 / 11 = 0.818 > 0.7: a warning. Chosen lengths: 9 x 10 + 2 x 2 + 3 = 97,
    mean 97/12; rejected: 9 x 4 + 2 x 6 + 3 = 51, mean 51/12 = 4.25."""
    pairs = [P(f"q{i}", "x" * 10, f"y{i:03d}") for i in range(9)]
    pairs += [P("r1", "ab", "cdefgh"), P("r2", "ab", "cdefgh"), P("t", "abc", "def")]
    report = lint_preferences(pairs)
    (chars,) = report.length
    assert (chars.unit, chars.pairs) == ("chars", 12)
    assert (chars.chosen_longer, chars.rejected_longer, chars.ties) == (9, 2, 1)
    assert chars.chosen_longer_frac == pytest.approx(9 / 11)
    assert chars.mean_chosen == pytest.approx(97 / 12)
    assert chars.mean_rejected == pytest.approx(51 / 12)
    (warning,) = report.warnings()
    assert "chosen is the longer response in 82% of pairs" in warning
    assert report.kept() == list(range(12))  # length bias removes nothing

    flipped = lint_preferences([P(p.prompt, p.rejected, p.chosen) for p in pairs])
    assert "chosen is the shorter response in 82%" in flipped.warnings()[0]
    balanced = lint_preferences(pairs[:5] + [P(f"s{i}", "ab", "cdefgh") for i in range(5)])
    assert balanced.length[0].chosen_longer_frac == 0.5 and balanced.warnings() == []
    assert lint_preferences(pairs[:9]).warnings() == []  # too few pairs to judge


def test_length_bias_all_ties_is_nan():
    report = lint_preferences([P("q", "ab", "cd")])
    assert math.isnan(report.length[0].chosen_longer_frac)
    assert report.to_dict()["length"]["chars"]["chosen_longer_frac"] is None


WORDS = "a b c d e f g h x y z".split()


@pytest.fixture(scope="module")
def word_tokenizer():
    """One token per space-separated word, EOS appended by the data tokeniser, no BOS."""
    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


def test_truncation_counts_match_tokenize(word_tokenizer):
    """Limits 4 / 8; a response costs its words + 1 (EOS).
    pair 0: prompt 3, chosen 3+1 -> 7, rejected 4+1 -> 8: nothing cut.
    pair 1: prompt 6 > 4 (cut to 4); chosen 2+1 -> 7 fits; rejected 5+1 -> 10 > 8: cut.
    pair 2: prompt 2; both responses 7+1 -> 10 > 8: cut.
    So 2 pairs, 1 prompt, 3 responses, none dropped."""
    pairs = [
        P("a b c", "x y z", "x y z h"),
        P("a b c d e f", "x y", "x y z a b"),
        P("a b", "a b c d e f g", "g f e d c b a"),
    ]
    limits = TruncationLimits(max_prompt_len=4, max_len=8)
    report = lint_preferences(pairs, word_tokenizer, limits)
    t = report.truncation
    assert (t["pairs"], t["prompts_truncated"], t["responses_truncated"], t["would_drop"]) == (2, 1, 3, 0)
    _, stats = tokenize_preference(word_tokenizer, pairs, limits)
    assert (stats.prompts_truncated, stats.responses_truncated, stats.dropped) == (1, 3, 0)
    assert reasons(report, 0) == [] and reasons(report, 1) == ["truncated"]
    assert report.flags[1][0].detail == "prompt 6 > 4 tokens; prompt + rejected 10 > 8 tokens"
    assert report.kept() == [0, 1, 2]  # truncation warns, it removes nothing
    tokens = report.length[1]
    assert tokens.unit == "tokens"
    assert (tokens.chosen_longer, tokens.rejected_longer, tokens.ties) == (0, 2, 1)
    assert tokens.mean_chosen == pytest.approx((3 + 2 + 7) / 3)


def test_truncation_would_drop(word_tokenizer):
    pairs = [P("a b c d e", "x", "y"), P("a", "x", "y z")]
    limits = TruncationLimits(max_len=4)
    report = lint_preferences(pairs, word_tokenizer, limits)
    _, stats = tokenize_preference(word_tokenizer, pairs, limits)
    assert report.truncation["would_drop"] == stats.dropped == 1
    assert report.truncation["responses_truncated"] == stats.responses_truncated == 2
    assert lint_preferences(pairs, word_tokenizer).truncation is None  # no limits, no check
    assert "truncated" not in lint_preferences(pairs).counts()


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(p: PreferencePair) -> dict:
    return {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}


def test_lint_file_writes_cleaned_and_flagged(tmp_path):
    conv = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    rows = [
        row(GOOD),  # line 1
        row(BAD),  # line 2
        "",  # line 3: blank, not a record
        {"prompt": "q", "chosen": "   ", "rejected": "x"},  # line 4: the loader skips it
        {**row(PHOTO), "margin": 2.0, "category": "science"},  # line 5
        row(GOOD),  # line 6: duplicate
        {"prompt": conv, "chosen": "Hello!", "rejected": "What."},  # line 7
    ]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "out"
    summary = lint_file(path, out_dir=out)
    json.dumps(summary)  # JSON-ready

    assert (summary["records"], summary["skipped"], summary["skipped_at"]) == (5, 1, [4])
    assert summary["skip_reasons"] == {"empty chosen": 1}
    assert summary["counts"] == {
        "empty": 0,
        "identical": 0,
        "near_identical": 1,
        "duplicate": 1,
        "contradictory": 0,
    }
    assert (summary["flagged"], summary["removed"], summary["kept"]) == (2, 2, 3)
    assert summary["removed_frac"] == pytest.approx(0.4)
    assert [e["line"] for e in summary["examples"]["near_identical"]] == [2]
    assert [e["line"] for e in summary["examples"]["duplicate"]] == [6]

    cleaned = [json.loads(x) for x in (out / "cleaned.jsonl").read_text().splitlines()]
    flagged = [json.loads(x) for x in (out / "flagged.jsonl").read_text().splitlines()]
    assert len(cleaned) + sum(f["removed"] for f in flagged) == summary["records"]
    assert [(f["line"], f["reasons"]) for f in flagged] == [(2, ["near_identical"]), (6, ["duplicate"])]
    assert flagged[0]["details"] == {"near_identical": "similarity 0.83"}
    assert flagged[1]["details"] == {"duplicate": "of line 1"}  # positions, not indices
    assert flagged[0]["chosen"] == BAD.chosen
    assert cleaned[1] == {**row(PHOTO), "margin": 2.0, "category": "science"}
    assert cleaned[2]["prompt"] == conv  # a conversation stays a message list
    assert json.loads((out / "lint.json").read_text())["counts"] == summary["counts"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    original = load_records(path, on_error="skip").records
    assert load_records(out / "cleaned.jsonl").records == [original[i] for i in (0, 2, 4)]


def test_format_lint(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [row(GOOD), row(BAD)])
    text = format_lint(lint_file(path))
    assert "near_identical" in text and "similarity 0.83" in text and "line 2" in text
    assert "removed   1 (50.0%); kept 1" in text
    assert format_lint(lint_preferences([GOOD, BAD]).to_dict()).startswith("records   2")


def test_positions_in_a_json_list(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([row(GOOD), row(GOOD), row(PHOTO)]), encoding="utf-8")
    summary = lint_file(path)
    assert summary["unit"] == "record"
    (example,) = summary["examples"]["duplicate"]
    assert (example["record"], example["detail"]) == (2, "of record 1")


real_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")


@real_data
def test_real_hh_rlhf(tmp_path):
    summary = lint_file(SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz", out_dir=tmp_path)
    assert (summary["records"], summary["skipped"]) == (2308, 4)
    assert summary["counts"]["near_identical"] == 4
    assert summary["counts"]["duplicate"] == 0 and summary["counts"]["contradictory"] == 0
    assert summary["length"]["chars"]["chosen_longer_frac"] == pytest.approx(0.446, abs=1e-3)
    assert summary["warnings"] == []
    assert sum(1 for _ in open(tmp_path / "cleaned.jsonl")) == 2304


@real_data
def test_real_llama_factory_dpo():
    summary = lint_file(SHARED_DATA / "llama_factory" / "dpo_en_demo.json")
    assert summary["records"] == 300 and summary["unit"] == "record"
    assert summary["counts"]["duplicate"] == 5 and summary["counts"]["near_identical"] == 0
    assert summary["length"]["chars"]["chosen_longer_frac"] == pytest.approx(0.438, abs=1e-3)

"""Data errors that tell the user what to do next."""

import pytest

from alignkit.data.load import DataError, inspect_file, load_records


def test_a_pair_without_rejected_is_not_taken_for_a_prompt_file(tmp_path):
    f = tmp_path / "half.jsonl"
    f.write_text('{"prompt": "p", "chosen": "c"}\n{"prompt": "q", "chosen": "d"}\n')
    with pytest.raises(DataError) as e:
        inspect_file(f)
    assert f"{f}:1:" in str(e.value) and "'rejected'" in str(e.value)


def test_a_bad_record_names_the_skip_option(tmp_path):
    """HH-RLHF has a few pairs with an empty side; `data inspect` skips them, a stage stops at
    the first: its message says how to skip them instead."""
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "q", "chosen": " ", "rejected": "r"}\n')
    with pytest.raises(DataError) as e:
        load_records(f, kind="preference")
    assert f"{f}:2:" in str(e.value) and "data.on_error=skip" in str(e.value)
    assert len(load_records(f, kind="preference", on_error="skip").records) == 1

"""The iterate loop's human judge through the labelling database (LabelDBJudge, judge=labeldb:DB)."""

from __future__ import annotations

import random
import threading
import time

import pytest

pytest.importorskip("sqlalchemy", reason="alignkit label needs the 'label' extra: pip install -e .[label]")

from alignkit.data.records import PromptOnly  # noqa: E402
from alignkit.feedback.judges import LabelsPending  # noqa: E402
from alignkit.label import db  # noqa: E402
from alignkit.label.judge import LabelDBJudge, parse_spec  # noqa: E402


def test_parse_spec():
    assert parse_spec("labels.sqlite") == ("labels.sqlite", {})
    assert parse_spec("postgresql+psycopg://u@h:5/d#k=3,timeout=60") == (
        "postgresql+psycopg://u@h:5/d", {"k": 3, "timeout_s": 60.0})
    with pytest.raises(ValueError, match="unknown option 'kk'"):
        parse_spec("x.sqlite#kk=3")


def _label(eng, name: str, rule) -> int:
    """A scripted annotator: label every open pair by `rule(prompt, left, right)` -> left|right|tie."""
    a = db.annotator_for(eng, db.add_token(eng, name)).id
    n = 0
    while (it := db.next_item(eng, a)) is not None:
        db.submit(eng, a, it["assignment"], rule(it["prompt"], it["left"], it["right"]))
        n += 1
    return n


def test_pending_then_resume_reads_votes(tmp_path):
    path = str(tmp_path / "j.sqlite")
    judge = LabelDBJudge(path, "round 1", k=2, timeout_s=0.0, poll_s=0.01)
    prompts, a, b = ["p0", "p1", "p2"], ["good0", "good1", "meh2"], ["bad0", "bad1", "good2"]
    with pytest.raises(LabelsPending, match="3 of 3 pairs of task 'round 1'"):
        judge.compare(prompts, a, b)
    eng = db.connect(path)

    def by_word(word_left_wins):
        return lambda p, left, right: "left" if word_left_wins(left) else "right"

    # u prefers "good" everywhere; v prefers "good" except on p1, where it says tie
    assert _label(eng, "u", by_word(lambda s: s.startswith("good"))) == 3
    assert _label(eng, "v", lambda p, left, right: "tie" if p == "p1" else
                  ("left" if left.startswith("good") else "right")) == 3
    with pytest.raises(LabelsPending):  # the same call again does not add the pairs twice
        LabelDBJudge(path, "round 1", k=3, timeout_s=0.0).compare(prompts, a, b)
    v = judge.compare(prompts, a, b)  # a resumed run: the labels are there now
    assert [x.p_a for x in v] == [1.0, 0.75, 0.0] and [x.outcome for x in v] == [1.0, 1.0, 0.0]
    assert len(db.labels(eng)) == 6


def test_iterate_label_pairs_waits_for_people(tmp_path):
    """iterate's label_pairs with the database judge while a scripted annotator (the longer answer
    wins) labels in another thread: rows come back once every pair is labelled."""
    from alignkit.train.iterate import label_pairs

    path = str(tmp_path / "it.sqlite")
    db.connect(path).dispose()
    judge = LabelDBJudge(path, "iterate round 1", k=1, timeout_s=30.0, poll_s=0.05)
    rng = random.Random(0)
    samples = [("x" * rng.randint(1, 9), "y" * rng.randint(10, 19)) if i % 2 else
               ("x" * rng.randint(10, 19), "y" * rng.randint(1, 9)) for i in range(6)]
    records = [PromptOnly(f"prompt {i}") for i in range(6)]
    done = []

    def annotator():
        eng = db.connect(path)
        deadline = time.time() + 20
        with eng.connect() as c:  # wait until the judge has added its pairs
            while not c.execute(db.sa.select(db.sa.func.count()).select_from(db.pairs)).scalar():
                assert time.time() < deadline
                c.rollback()
                time.sleep(0.02)
        done.append(_label(eng, "ann", lambda p, left, right: "left" if len(left) > len(right) else "right"))

    t = threading.Thread(target=annotator)
    t.start()
    rows, counts = label_pairs(judge, records, samples, extra={"round": 1})
    t.join(10)
    assert done == [6] and counts["pairs"] == 6
    assert all(len(r["chosen"]) > len(r["rejected"]) for r in rows) and all(r["round"] == 1 for r in rows)

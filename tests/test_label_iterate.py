"""The iterate loop with people in the labelling app (judge=labeldb:DB).

A first run with nobody labelling adds round 1's pairs and stops as "awaiting labels"; then a
scripted annotator labels through the HTTP API of a real `alignkit label serve`, answering by the
world's gold judge (tie on equal scores), while `resume=true` runs both rounds, waiting for the
labels of each. With label noise 0 the labels through the app must equal the gold judge's, so
both rounds' pairs equal those of the same run with judge=gold, pair for pair."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest

pytest.importorskip("sqlalchemy", reason="alignkit label needs the 'label' extra: pip install -e .[label]")
pytest.importorskip("starlette", reason="alignkit label needs the 'label' extra: pip install -e .[label]")
httpx = pytest.importorskip("httpx", reason="the scripted annotator needs httpx (the 'label' extra)")

from _label_server import Server  # noqa: E402
from test_iterate import _cfg, tiny  # noqa: E402, F401  (the tiny world + SFT model fixture)

from alignkit.label import db  # noqa: E402
from alignkit.train import iterate  # noqa: E402
from alignkit.world import load_world  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _pairs(out, k: int) -> list[tuple[str, str]]:
    return [(r["chosen"], r["rejected"]) for r in map(json.loads, (out / f"round_{k}" / "pairs.jsonl").read_text().splitlines())]


def test_two_rounds_with_a_scripted_annotator_equal_the_gold_judge(tiny, tmp_path):  # noqa: F811
    gold_out, out, dbp = tmp_path / "gold", tmp_path / "people", str(tmp_path / "labels.sqlite")
    assert iterate.run(_cfg(tiny, f"out={gold_out}"))["status"] == "done"

    cfg = _cfg(tiny, f"out={out}", f"judge=labeldb:{dbp}#timeout=0")
    first = iterate.run(cfg)
    assert first["status"] == "awaiting_labels" and first["round"] == 1
    eng = db.connect(dbp)
    token = db.add_token(eng, "scripted")
    eng.dispose()
    world, stop, given, errors = load_world(tiny / "world"), threading.Event(), [], []
    srv = Server(dbp, log=tmp_path / "server.log").start()

    def annotate():
        try:
            with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
                while not stop.is_set():
                    item = c.get("/api/next").json()["item"]
                    while item is not None:
                        sl, sr = world.score(item["prompt"], item["left"]), world.score(item["prompt"], item["right"])
                        label = "left" if sl > sr else "right" if sr > sl else "tie"
                        r = c.post("/api/label", json={"assignment": item["assignment"], "label": label})
                        r.raise_for_status()
                        given.append(label)
                        item = r.json()["item"]
                    time.sleep(0.05)
        except Exception as e:  # surfaced below
            errors.append(repr(e))

    th = threading.Thread(target=annotate)
    th.start()
    try:
        done = iterate.run(dataclasses.replace(cfg, resume=True, judge=f"labeldb:{dbp}#timeout=120,poll=0.1"))
    finally:
        stop.set()
        th.join(30)
        srv.stop()
    assert not errors and done["status"] == "done"
    rows = json.loads((out / "summary.json").read_text())["rounds"][1:]
    shown = sum(r["pairs_sampled"] - r["pairs_empty"] - r["pairs_identical"] for r in rows)
    assert len(given) == shown > 0  # every pair shown to people was labelled once (k=1)
    for k in (1, 2):
        assert _pairs(out, k) == _pairs(gold_out, k) and _pairs(out, k)

"""The iterate loop with people in the labelling app (judge=labeldb:DB): a round adds its pairs and,
with nobody labelling, stops as "awaiting labels"; a scripted annotator then labels every pair
through the HTTP API by the world's gold judge; resume=true finishes the round with those labels."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("sqlalchemy", reason="alignkit label needs the 'label' extra: pip install -e .[label]")
pytest.importorskip("starlette", reason="alignkit label needs the 'label' extra: pip install -e .[label]")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx (the 'label' extra)")

from starlette.testclient import TestClient  # noqa: E402
from test_iterate import _cfg, tiny  # noqa: E402, F401  (the tiny world + SFT model fixture)

from alignkit.label import db  # noqa: E402
from alignkit.label.app import build_app  # noqa: E402
from alignkit.train import iterate  # noqa: E402
from alignkit.world import load_world  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_iterate_round_with_people_in_the_app(tiny):  # noqa: F811
    out, dbp = tiny / "labeldb", str(tiny / "labels.sqlite")
    cfg = _cfg(tiny, f"out={out}", f"judge=labeldb:{dbp}#timeout=0", "rounds=1")
    first = iterate.run(cfg)
    assert first["status"] == "awaiting_labels" and first["round"] == 1
    world = load_world(tiny / "world")
    app = build_app(dbp)
    token = db.add_token(app.app.state.engine, "gold-annotator")
    seen = []
    with TestClient(app, base_url="http://127.0.0.1:8700", headers={"Authorization": f"Bearer {token}"}) as c:
        item = c.get("/api/next").json()["item"]
        while item is not None:
            left, right = world.score(item["prompt"], item["left"]), world.score(item["prompt"], item["right"])
            label = "left" if left > right else "right" if right > left else "tie"
            seen.append((item["prompt"], item["left"], item["right"], label))
            r = c.post("/api/label", json={"assignment": item["assignment"], "label": label})
            assert r.status_code == 200, r.text
            item = r.json()["item"]
    assert seen
    done = iterate.run(dataclasses.replace(cfg, resume=True))
    assert done["status"] == "done"
    pairs = [json.loads(x) for x in (out / "round_1" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == sum(s[3] != "tie" for s in seen) > 0  # ties dropped by the loop
    for p in pairs:  # label_noise=0: every label is the gold judge's, whatever side it was shown on
        assert world.score(p["prompt"], p["chosen"]) > world.score(p["prompt"], p["rejected"])

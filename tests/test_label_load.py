"""Load: 20 annotators at once, 50 labels each, against a real `alignkit label serve`; the server is
SIGKILLed half way and restarted. Every label is stored exactly once, no 5xx, and no label the
server acknowledged is lost. Prints median and p99 latency of a label request."""

from __future__ import annotations

import json
import random
import statistics
import threading
import time

import pytest

pytest.importorskip("sqlalchemy", reason="alignkit label needs the 'label' extra: pip install -e .[label]")
pytest.importorskip("starlette", reason="alignkit label needs the 'label' extra: pip install -e .[label]")
httpx = pytest.importorskip("httpx", reason="the load test needs httpx (the 'label' extra)")

from _label_server import Server  # noqa: E402

from alignkit.label import db  # noqa: E402

pytestmark = pytest.mark.slow

N_ANNOTATORS, N_LABELS, K = 20, 50, 2


def _annotate(url: str, token: str, rng: random.Random, out: dict, n_labels: int) -> None:
    """One annotator: GET the first item, then 50 POSTs (each answer carries the next item).
    A dropped connection (the server was killed) is retried with the same request."""
    h = {"Authorization": f"Bearer {token}"}
    acked, lat, codes = out["acked"], out["latency"], out["codes"]
    with httpx.Client(base_url=url, headers=h, timeout=30) as c:

        def call(method: str, path: str, body: dict | None = None) -> dict:
            while True:
                t0 = time.perf_counter()
                try:
                    r = c.request(method, path, json=body)
                except httpx.TransportError:
                    time.sleep(0.05)
                    continue
                codes.append(r.status_code)
                if r.status_code >= 500:
                    time.sleep(0.05)
                    continue
                r.raise_for_status()
                if method == "POST":
                    lat.append((t0, time.perf_counter() - t0))
                return r.json()

        item = call("GET", "/api/next")["item"]
        for _ in range(n_labels):
            aid = item["assignment"]
            r = call("POST", "/api/label", {"assignment": aid, "label": rng.choice(["left", "right", "tie"])})
            assert r["status"] in ("stored", "duplicate")  # duplicate: a retry after the label was stored
            acked.append(aid)
            item = r["item"]


def test_twenty_annotators_with_a_crash(tmp_path):
    run_load(str(tmp_path / "load.sqlite"), tmp_path)


def run_load(path: str, tmp_path, n_labels: int = N_LABELS) -> None:
    """The load test on database `path` (a file or a URL), `n_labels` per annotator."""
    eng = db.connect(path)
    n_pairs = 12 * n_labels  # 20% spare slots: nobody runs out of pairs they have not seen
    db.add_pairs(eng, [db.parse_pair({"id": f"p{i}", "prompt": f"q{i}", "a": f"a{i}", "b": f"b{i}"}, "t")
                       for i in range(n_pairs)], "load", k=K)
    tokens = [db.add_token(eng, f"ann{i:02d}") for i in range(N_ANNOTATORS)]
    eng.dispose()
    srv = Server(path, log=tmp_path / "server.log").start()
    outs = [{"acked": [], "latency": [], "codes": []} for _ in tokens]
    errors = []

    def run(i: int) -> None:
        try:
            _annotate(srv.url, tokens[i], random.Random(i), outs[i], n_labels)
        except Exception as e:  # surfaced below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(N_ANNOTATORS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    acked_before_kill = 0
    try:
        while sum(len(o["acked"]) for o in outs) < N_ANNOTATORS * n_labels // 2:
            time.sleep(0.02)
        t_kill = time.perf_counter()
        srv.kill()
        acked_before_kill = sum(len(o["acked"]) for o in outs)
        time.sleep(0.3)
        srv.start()
        for t in threads:
            t.join(120)
    finally:
        srv.stop()
    wall = time.perf_counter() - t0
    assert not errors, errors[:3]
    eng = db.connect(path)
    rows = db.labels(eng)
    stored = {(r["annotator"], r["pair_id"]) for r in rows}
    assert len(rows) == len(stored) == N_ANNOTATORS * n_labels  # each exactly once
    with eng.connect() as c:
        import sqlalchemy as sa

        labelled = set(c.execute(sa.select(db.assignments.c.id).where(db.assignments.c.choice.is_not(None))).scalars())
    acked = [a for o in outs for a in o["acked"]]
    assert len(acked) == len(set(acked)) == N_ANNOTATORS * n_labels and set(acked) <= labelled
    per_pair = {}
    for r in rows:
        per_pair[r["pair_id"]] = per_pair.get(r["pair_id"], 0) + 1
    assert max(per_pair.values()) <= K and len(per_pair) >= N_ANNOTATORS * n_labels // K
    codes = [x for o in outs for x in o["codes"]]
    assert not [x for x in codes if x >= 500]
    lat = [x for o in outs for x in o["latency"]]

    def pct(xs: list[float]) -> dict:
        xs = sorted(xs)
        return {"p50": round(1000 * statistics.median(xs), 1), "p99": round(1000 * xs[int(0.99 * (len(xs) - 1))], 1)}

    print(json.dumps({"labels": len(rows), "acked_before_kill": acked_before_kill, "wall_s": round(wall, 2),
                      "label_latency_ms": pct([d for _, d in lat]),
                      "before_kill_ms": pct([d for t, d in lat if t + d < t_kill])}))

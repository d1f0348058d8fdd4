"""The labelling app: schema, assignment, export, QC math (by hand), HTTP security (fast, no browser)."""

from __future__ import annotations

import json
import random

import pytest

sa = pytest.importorskip("sqlalchemy", reason="alignkit label needs the 'label' extra: pip install -e .[label]")
pytest.importorskip("starlette", reason="alignkit label needs the 'label' extra: pip install -e .[label]")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx (the 'label' extra)")

from starlette.testclient import TestClient  # noqa: E402

from alignkit.label import db, qc  # noqa: E402
from alignkit.label.app import build_app, csrf_token  # noqa: E402


def _pairs(n: int, prefix: str = "p") -> list[dict]:
    return [db.parse_pair({"id": f"{prefix}{i}", "prompt": f"q{i}", "a": f"a{i}", "b": f"b{i}", "round": 1}, "t")
            for i in range(n)]


@pytest.fixture
def eng(tmp_path, label_db_url):
    return db.connect(label_db_url or str(tmp_path / "l.sqlite"))


@pytest.fixture
def label_db_url():
    return None


def test_token_stored_as_hash_only(eng):
    tok = db.add_token(eng, "ann")
    with eng.connect() as c:
        stored = c.execute(sa.select(db.annotators.c.token_hash)).scalar()
    assert tok not in stored and stored == db.hash_token(tok)
    assert db.annotator_for(eng, tok).name == "ann"
    assert db.annotator_for(eng, tok + "x") is None and db.annotator_for(eng, "") is None
    with pytest.raises(db.LabelDBError, match="exists"):
        db.add_token(eng, "ann")


def test_sqlite_pragmas(tmp_path):
    eng = db.connect(str(tmp_path / "x.sqlite"))
    with eng.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        with pytest.raises(sa.exc.IntegrityError):  # foreign keys enforced
            c.execute(db.assignments.insert().values(pair_id=99, annotator_id=99, swapped=False, shown_at=0.0))


def test_k_labels_per_pair_never_twice_spread_evenly(eng):
    db.add_pairs(eng, _pairs(7), "t", k=2)
    ids = [db.annotator_for(eng, db.add_token(eng, f"a{i}")).id for i in range(3)]
    rng = random.Random(0)
    active = list(ids)
    while active:  # round-robin, as people working at the same time
        for a in list(active):
            item = db.next_item(eng, a, rng)
            if item is None:
                active.remove(a)
                continue
            assert db.submit(eng, a, item["assignment"], rng.choice(["left", "right", "tie"])) == "stored"
    rows = db.labels(eng)
    per_pair = {}
    for r in rows:
        per_pair.setdefault(r["pair_id"], []).append(r["annotator"])
    assert len(per_pair) == 7 and all(len(v) == 2 and len(set(v)) == 2 for v in per_pair.values())
    counts = sorted(sum(r["annotator"] == f"a{i}" for r in rows) for i in range(3))
    assert counts == [4, 5, 5]  # 14 labels over 3 people, at most one apart
    assert db.progress(eng, ids[0])["remaining"] == 0


def test_reload_shows_same_item_and_side_mapping(eng):
    db.add_pairs(eng, _pairs(1), "t", k=1)
    a = db.annotator_for(eng, db.add_token(eng, "x")).id
    first = db.next_item(eng, a)
    assert db.next_item(eng, a) == first  # a reload: same pair, same order
    with eng.connect() as c:
        swapped = c.execute(sa.select(db.assignments.c.swapped)).scalar()
    assert (first["left"], first["right"]) == (("b0", "a0") if swapped else ("a0", "b0"))
    assert db.submit(eng, a, first["assignment"], "left") == "stored"
    assert db.submit(eng, a, first["assignment"], "right") == "duplicate"  # a retry changes nothing
    assert db.labels(eng)[0]["choice"] == ("b" if swapped else "a")
    assert db.to_choice("left", True) == "b" and db.to_choice("right", False) == "b"
    assert db.to_choice("tie", True) == "tie"


def test_undo_reopens_last_label(eng):
    db.add_pairs(eng, _pairs(3), "t", k=1)
    a = db.annotator_for(eng, db.add_token(eng, "x")).id
    it1 = db.next_item(eng, a)
    db.submit(eng, a, it1["assignment"], "left")
    it2 = db.next_item(eng, a)
    db.submit(eng, a, it2["assignment"], "tie", "same")
    assert db.progress(eng, a) == {"done": 2, "remaining": 1}
    assert db.undo(eng, a) == it2["assignment"]
    assert db.next_item(eng, a) == it2 and db.progress(eng, a)["done"] == 1
    assert len(db.labels(eng)) == 1


def test_other_annotators_assignment_refused(eng):
    db.add_pairs(eng, _pairs(1), "t")
    a, b = (db.annotator_for(eng, db.add_token(eng, n)).id for n in "ab")
    it = db.next_item(eng, a)
    with pytest.raises(LookupError):
        db.submit(eng, b, it["assignment"], "left")


def _label_as(eng, who: dict[str, int], pair_ext: str, votes: dict[str, str]) -> None:
    """Label pair `pair_ext` with votes in a/b terms, whatever order each person was shown."""
    with eng.begin() as c:
        pid = c.execute(sa.select(db.pairs.c.id).where(db.pairs.c.ext_id == pair_ext)).scalar()
        for name, choice in votes.items():
            c.execute(db.assignments.insert().values(pair_id=pid, annotator_id=who[name], swapped=False,
                                                     shown_at=0.0, choice=choice, labelled_at=1.0))


def test_export_hard_and_soft_labels_read_by_loader(eng, tmp_path):
    from alignkit.data.load import load_records

    db.add_pairs(eng, _pairs(5), "t", k=3)
    who = {n: db.annotator_for(eng, db.add_token(eng, n)).id for n in ("u", "v", "w")}
    _label_as(eng, who, "p0", {"u": "a", "v": "a", "w": "b"})  # p = 2/3 -> a chosen, soft 2/3
    _label_as(eng, who, "p1", {"u": "a", "v": "tie"})  # p = 0.75
    _label_as(eng, who, "p2", {"u": "b"})  # hard label, b chosen
    _label_as(eng, who, "p3", {"u": "a", "v": "b"})  # balanced: left out
    _label_as(eng, who, "p4", {"u": "skip"})  # no label
    rows, counts = db.export_rows(eng)
    assert counts == {"pairs": 3, "balanced": 1, "gold_left_out": 0}
    by = {r["id"]: r for r in rows}
    assert (by["p0"]["chosen"], by["p0"]["rejected"]) == ("a0", "b0") and by["p0"]["soft_label"] == pytest.approx(2 / 3)
    assert by["p1"]["soft_label"] == pytest.approx(0.75)
    assert (by["p2"]["chosen"], by["p2"]["rejected"]) == ("b2", "a2") and "soft_label" not in by["p2"]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = load_records(str(path), kind="preference").records
    assert [(r.prompt, r.chosen, r.soft_label) for r in recs] == [
        ("q0", "a0", pytest.approx(2 / 3)), ("q1", "a1", 0.75), ("q2", "b2", None)]


def test_gold_mixed_at_rate_and_not_exported(eng):
    db.add_pairs(eng, _pairs(40), "t", k=1, gold_rate=0.25)
    db.add_pairs(eng, [{**p, "gold": "a"} for p in _pairs(20, "g")], "t")
    a = db.annotator_for(eng, db.add_token(eng, "x")).id
    rng = random.Random(1)
    while (it := db.next_item(eng, a, rng)) is not None:
        db.submit(eng, a, it["assignment"], "left")
    rows = db.labels(eng)
    n_gold = sum(r["gold"] is not None for r in rows)
    assert sum(r["gold"] is None for r in rows) == 40
    assert 5 <= n_gold <= 20  # 40 regular at rate 0.25: about 13 gold
    assert db.export_rows(eng)[1]["gold_left_out"] == n_gold
    rep = qc.annotator_report(rows)["annotators"]["x"]
    agree = sum(r["choice"] == "a" for r in rows if r["gold"] is not None) / n_gold
    assert rep["gold_agreement"] == pytest.approx(agree) and rep["left_share"] == 1.0


def test_cohens_kappa_by_hand():
    """20 items: both a on 9, x=a/y=b on 3, x=b/y=a on 2, both b on 6. p_o = 15/20 = 0.75;
    x says a 12/20, y 11/20: p_e = 0.6*0.55 + 0.4*0.45 = 0.51; kappa = 0.24/0.49 = 0.4898."""
    x = ["a"] * 9 + ["a"] * 3 + ["b"] * 2 + ["b"] * 6
    y = ["a"] * 9 + ["b"] * 3 + ["a"] * 2 + ["b"] * 6
    assert qc.cohens_kappa(x, y) == pytest.approx(0.24 / 0.49)
    assert qc.cohens_kappa(["a", "b"], ["a", "b"]) == 1.0
    assert qc.cohens_kappa(["a", "a"], ["a", "a"]) is None


def test_fleiss_kappa_by_hand():
    """3 items x 3 raters over (a, tie, b): [3,0,0], [0,0,3], [1,1,1]. P_i = 1, 1, 0 -> P_bar = 2/3;
    p = (4/9, 1/9, 4/9) -> P_e = 33/81; kappa = (54/81 - 33/81) / (48/81) = 21/48 = 0.4375."""
    assert qc.fleiss_kappa([[3, 0, 0], [0, 0, 3], [1, 1, 1]]) == pytest.approx(21 / 48)
    # two raters: Fleiss' kappa is Scott's pi; [2,0],[0,2],[1,1]: P_bar = 2/3, p = (1/2, 1/2), P_e = 1/2 -> 1/3
    assert qc.fleiss_kappa([[2, 0], [0, 2], [1, 1], [1, 0]]) == pytest.approx(1 / 3)


def test_report_pairwise_kappa_and_position_bias(eng):
    db.add_pairs(eng, _pairs(4), "t", k=2)
    who = {n: db.annotator_for(eng, db.add_token(eng, n)).id for n in ("u", "v")}
    for i, (cu, cv) in enumerate([("a", "a"), ("b", "b"), ("a", "b"), ("tie", "tie")]):
        _label_as(eng, who, f"p{i}", {"u": cu, "v": cv})
    rep = qc.annotator_report(db.labels(eng))
    # u: a,b,a,tie  v: a,b,b,tie; p_o = 3/4; p_e = (2*1 + 1*2 + 1*1)/16 = 5/16; kappa = (12/16-5/16)/(11/16)
    assert rep["pairwise"]["u / v"]["kappa"] == pytest.approx(7 / 11)
    assert rep["annotators"]["u"]["kappa_mean"] == pytest.approx(7 / 11)
    assert rep["annotators"]["u"]["left_share"] == pytest.approx(2 / 3)  # swapped=False: a is left
    assert rep["fleiss_kappa"] is not None


def test_parse_pair_errors_name_line(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"prompt": "q", "a": "x", "b": "y"}\n{"prompt": "q", "a": "x"}\n')
    with pytest.raises(db.LabelDBError, match=r"pairs.jsonl:2: expected keys prompt and a, b"):
        db.read_pairs_file(p)
    p.write_text('{"prompt": [{"role": "user", "content": "hi"}], "chosen": "x", "rejected": "y"}\n')
    (row,) = db.read_pairs_file(p, gold=True)
    assert row["prompt"] == "user: hi" and row["gold"] == "a"


# ---- HTTP -------------------------------------------------------------------------------------


@pytest.fixture
def client(tmp_path, label_db_url):
    spec = label_db_url or str(tmp_path / "app.sqlite")
    app = build_app(spec)
    eng = app.app.state.engine
    db.add_pairs(eng, _pairs(3), "t", k=1)
    toks = {"ann": db.add_token(eng, "ann"), "boss": db.add_token(eng, "boss", admin=True)}
    with TestClient(app, base_url="http://127.0.0.1:8700") as c:
        c.toks, c.engine = toks, eng
        yield c


def _login(c, name="ann"):
    r = c.get(f"/login?token={c.toks[name]}", follow_redirects=False)
    assert r.status_code == 303 and "httponly" in r.headers["set-cookie"].lower()
    assert "samesite=strict" in r.headers["set-cookie"].lower()
    return {"X-CSRF-Token": csrf_token(c.toks[name])}


def test_every_request_needs_a_token(client):
    r = client.get("/api/next")
    assert r.status_code == 401 and r.json()["error"].startswith("no token")
    r = client.get("/")
    assert r.status_code == 401 and r.headers["content-type"].startswith("text/html") and "<h1>401</h1>" in r.text
    assert client.get("/static/app.js").status_code == 401
    assert client.get("/login?token=nope").status_code == 401
    assert client.get("/api/next", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_page_headers_and_flow(client):
    h = _login(client)
    page = client.get("/")
    assert page.status_code == 200 and csrf_token(client.toks["ann"]) in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff" and "<script>" not in page.text.replace(
        '<script src="/static/app.js"></script>', "")
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    item = client.get("/api/next").json()
    assert item["progress"] == {"done": 0, "remaining": 3}
    r = client.post("/api/label", json={"assignment": item["item"]["assignment"], "label": "left"}, headers=h)
    assert r.status_code == 200 and r.json()["status"] == "stored" and r.json()["progress"]["done"] == 1
    r = client.post("/api/undo", json={}, headers=h)
    assert r.json()["undone"] == item["item"]["assignment"] and r.json()["item"] == item["item"]


def test_csrf_origin_size_and_bad_input(client):
    h = _login(client)
    a = client.get("/api/next").json()["item"]["assignment"]
    r = client.post("/api/label", json={"assignment": a, "label": "left"})
    assert r.status_code == 403 and "CSRF" in r.json()["error"]
    r = client.post("/api/label", json={"assignment": a, "label": "left"}, headers={**h, "Origin": "http://evil.test"})
    assert r.status_code == 403 and "cross-origin" in r.json()["error"]
    r = client.post("/api/label", content="x" * 20000, headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 413
    r = client.post("/api/label", content="{bad", headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 400
    r = client.post("/api/label", data={"assignment": a}, headers=h)
    assert r.status_code == 415
    assert client.post("/api/label", json={"assignment": a, "label": "up"}, headers=h).status_code == 400
    assert client.post("/api/label", json={"assignment": 10**6, "label": "left"}, headers=h).status_code == 404
    assert client.get("/nowhere").status_code == 404 and "<h1>404</h1>" in client.get("/nowhere").text
    assert client.get("/api/nowhere").json()["status"] == 404
    assert client.get("/static/../db.py").status_code == 404
    # a bearer token is not ambient authority: no CSRF header needed
    client.cookies.clear()
    r = client.post("/api/label", json={"assignment": a, "label": "tie"},
                    headers={"Authorization": f"Bearer {client.toks['ann']}"})
    assert r.status_code == 200 and r.json()["status"] == "stored"


def test_admin_page_needs_admin(client):
    _login(client)
    assert client.get("/admin").status_code == 403 and client.get("/api/stats").status_code == 403
    _login(client, "boss")
    r = client.get("/admin")
    assert r.status_code == 200 and "Annotators" in r.text and "Fleiss" in r.text
    s = client.get("/api/stats").json()
    assert s["tasks"][0]["pairs"] == 3
    # names are shown escaped
    evil = db.annotator_for(client.engine, db.add_token(client.engine, "<script>alert(1)</script>")).id
    db.submit(client.engine, evil, db.next_item(client.engine, evil)["assignment"], "left")
    page = client.get("/admin").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page


def test_cli_add_token_export(tmp_path, capsys):
    from alignkit.cli import main

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"p{i}", "prompt": "q", "a": f"x{i}", "b": "y"}) + "\n" for i in range(2)))
    dbp = str(tmp_path / "c.sqlite")
    assert main(["label", "add", str(pairs), "--db", dbp, "--task", "r1", "--k", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 2
    assert main(["label", "add", str(pairs), "--db", dbp, "--task", "r1"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 2
    assert main(["label", "token", "add", "ann", "--db", dbp]) == 0
    tok = json.loads(capsys.readouterr().out)["token"]
    eng = db.connect(dbp)
    a = db.annotator_for(eng, tok).id
    db.submit(eng, a, db.next_item(eng, a)["assignment"], "tie")
    db.submit(eng, a, db.next_item(eng, a)["assignment"], "left")
    out = tmp_path / "prefs.jsonl"
    assert main(["label", "export", "--db", dbp, "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 1 and len(out.read_text().splitlines()) == 1
    assert main(["label", "add", str(tmp_path / "none.jsonl"), "--db", dbp]) == 2

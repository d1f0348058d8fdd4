"""End to end in a real browser: Playwright drives headless Chromium against `alignkit label serve`.

Labels with the mouse and the keyboard, undoes, reloads mid-task, and checks the database and the
export; hostile answers (script tags, onerror images, javascript: links, very long unbroken
strings) must show as text: no dialog, no injected element, no horizontal overflow.
Set LABEL_SCREENSHOTS=DIR to keep screenshots of the annotator and admin pages.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy", reason="alignkit label needs the 'label' extra: pip install -e .[label]")
pytest.importorskip("starlette", reason="alignkit label needs the 'label' extra: pip install -e .[label]")
sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need playwright: pip install playwright")

from _label_server import Server  # noqa: E402

from alignkit.label import db  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium); browser tests skipped"),
]

XSS = [
    '<script>window.__xss = 1; alert("script")</script>',
    '<img src=x onerror="window.__xss = 2; alert(\'img\')">',
    '<a href="javascript:alert(\'link\')" id="evil">click me</a>',
    '"><svg onload=alert(4)><iframe src="javascript:alert(5)"></iframe>',
    "x" * 5000,
    "</div><style>body{display:none}</style><b id=injected>bold?</b>",
]


def _pairs() -> list[dict]:
    rows = [{"id": f"x{i}", "prompt": f"Hostile answer #{i}: <b>bold?</b>", "a": XSS[i], "b": XSS[-1 - i]}
            for i in range(len(XSS))]
    rows += [{"id": f"p{i}", "prompt": f"What is {i} + {i}?", "a": f"It is {2 * i}.",
              "b": f"I think it is {2 * i + 1}, but I am not sure." + (" More words." * 20 if i == 0 else "")}
             for i in range(4)]
    return [db.parse_pair(r, "test") for r in rows]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        try:
            b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        except Exception as e:  # a broken browser install: say so, do not fail CI
            pytest.skip(f"chromium at {CHROMIUM} did not start: {e}")
        yield b
        b.close()


@pytest.fixture
def label_db_url():
    return None  # SQLite; tests/test_label_pg.py points it at PostgreSQL


@pytest.fixture
def served(tmp_path, label_db_url):
    path = label_db_url or str(tmp_path / "labels.sqlite")
    eng = db.connect(path)
    db.add_pairs(eng, _pairs(), "round1", k=1)
    db.add_pairs(eng, [{**p, "gold": "a"} for p in [db.parse_pair(
        {"id": "g0", "prompt": "Say hello politely.", "a": "Hello! How can I help?", "b": "idk google it"}, "t")]],
        "round1")
    toks = {"ann": db.add_token(eng, "ann"), "boss": db.add_token(eng, "boss", admin=True)}
    srv = Server(path, log=tmp_path / "server.log").start()
    yield srv, eng, toks, path
    srv.stop()


def _shown(page) -> tuple[str, str, str]:
    return page.locator("body").get_attribute("data-assignment"), page.text_content("#left"), page.text_content("#right")


def _wait_done(page, n: int) -> None:
    sync_api.expect(page.locator("#done")).to_have_text(str(n), timeout=10000)


def test_label_with_mouse_keyboard_undo_reload_and_xss(browser, served, tmp_path):
    srv, eng, toks, path = served
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    page = ctx.new_page()
    dialogs, errors = [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{srv.url}/login?token={toks['ann']}")
    page.wait_for_selector("#task:not([hidden])")
    answers = {}  # assignment -> (left, right, action)
    n = 0

    def check_safe():
        for sel in ("#prompt", "#left", "#right"):
            assert page.locator(f"{sel} *").count() == 0, f"{sel} holds an element"
        assert page.evaluate("document.querySelectorAll('script').length") == 1
        assert page.evaluate("window.__xss === undefined && !document.getElementById('injected')"
                             " && !document.getElementById('evil')")
        assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")

    def act(how: str, key_or_btn: str, label: str):
        nonlocal n
        check_safe()
        aid, left, right = _shown(page)
        answers[aid] = (left, right, label)
        if how == "click":
            page.click(key_or_btn)
        else:
            page.keyboard.press(key_or_btn)
        n += 1
        _wait_done(page, n)

    act("click", "#btn-left", "left")
    act("key", "b", "right")
    page.fill("#reason", "both fine; A shorter")
    page.keyboard.press("Escape")
    aid_tie = _shown(page)[0]
    act("key", "t", "tie")
    page.keyboard.press("u")  # undo the tie
    n -= 1
    _wait_done(page, n)
    assert _shown(page)[0] == aid_tie
    del answers[aid_tie]
    before = _shown(page)
    page.reload()
    page.wait_for_selector("#task:not([hidden])")
    assert _shown(page) == before  # same pair, same sides after a reload
    if os.environ.get("LABEL_SCREENSHOTS"):
        Path(os.environ["LABEL_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=os.path.join(os.environ["LABEL_SCREENSHOTS"], "annotator.png"))
    act("click", "#btn-tie", "tie")
    act("key", "s", "skip")
    keys = ["a", "ArrowRight", "2", "1", "3", "b", "a"]
    while page.locator("#finished").is_hidden():
        k = keys[n % len(keys)]
        act("key", k, {"a": "left", "1": "left", "b": "right", "2": "right", "ArrowRight": "right", "3": "tie"}[k])
    assert dialogs == [] and errors == []
    ctx.close()

    rows = {str(r["assignment"]): r for r in _db_rows(eng)}
    assert len(rows) == len(answers) == n
    for aid, (left, right, label) in answers.items():
        r = rows[aid]
        if label in ("tie", "skip"):
            assert r["choice"] == label
        else:
            picked = left if label == "left" else right
            assert picked == (r["answer_a"] if r["choice"] == "a" else r["answer_b"])
    out = tmp_path / "prefs.jsonl"
    from alignkit.cli import main

    assert main(["label", "export", "--db", path, "--out", str(out)]) == 0
    exported = [json.loads(x) for x in out.read_text().splitlines()]
    decided = [r for r in rows.values() if r["choice"] in ("a", "b") and r["gold"] is None]
    assert len(exported) == len(decided)
    xss_rows = [e for e in exported if e["id"].startswith("x")]
    assert all(e["chosen"] in XSS for e in xss_rows)  # stored byte for byte, not escaped twice


def _db_rows(eng) -> list[dict]:
    import sqlalchemy as sa

    q = (sa.select(db.assignments.c.id.label("assignment"), db.assignments.c.choice, db.assignments.c.reason,
                   db.pairs.c.answer_a, db.pairs.c.answer_b, db.pairs.c.gold)
         .select_from(db.assignments.join(db.pairs)).where(db.assignments.c.choice.is_not(None)))
    with eng.connect() as c:
        return [dict(r._mapping) for r in c.execute(q)]


def test_admin_page_and_bad_token_page(browser, served):
    srv, eng, toks, _ = served
    ann = db.annotator_for(eng, toks["ann"]).id
    import random

    rng = random.Random(0)
    while (it := db.next_item(eng, ann, rng)) is not None:
        db.submit(eng, ann, it["assignment"], rng.choice(["left", "left", "right", "tie"]), "ok")
    ctx = browser.new_context(viewport={"width": 1280, "height": 760})
    page = ctx.new_page()
    resp = page.goto(f"{srv.url}/login?token=not-a-token")
    assert resp.status == 401 and page.locator("h1").text_content() == "401"
    page.goto(f"{srv.url}/login?token={toks['boss']}&to=admin")
    assert page.url.endswith("/admin")
    assert page.locator("table").count() == 3 and "ann" in page.text_content("main")
    if os.environ.get("LABEL_SCREENSHOTS"):
        page.screenshot(path=os.path.join(os.environ["LABEL_SCREENSHOTS"], "admin.png"), full_page=True)
    ctx.close()

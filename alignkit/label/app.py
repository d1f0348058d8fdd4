"""The labelling web app (Starlette, served by uvicorn).

Pages for people: /login?token=T (sets an HttpOnly, SameSite=Strict cookie, then redirects), /
(the annotator's page), /admin (QC figures, admin token). JSON API: GET /api/next, POST
/api/label, POST /api/undo, GET /api/stats (admin). Every request needs a valid token (the cookie
or `Authorization: Bearer T`); a POST authorised by the cookie also needs the X-CSRF-Token header
the page carries (derived from the token, so another site cannot know it). Answers are untrusted:
the page puts them in the DOM as text (never HTML), and a strict Content-Security-Policy allows no
inline script and no other origin.
"""

from __future__ import annotations

import hashlib
import html
import json
import random
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from alignkit.label import db, qc

STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
COOKIE = "alignkit_label"
MAX_BODY = 16 * 1024
MAX_REASON = 2000
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"), (b"cache-control", b"no-store"),
]


def csrf_token(token: str) -> str:
    return hashlib.sha256(b"alignkit-label-csrf:" + token.encode("utf-8")).hexdigest()


class SecurityHeaders:
    """ASGI middleware: security headers on every response, bodies over MAX_BODY refused (413)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    h for h in SECURITY_HEADERS if h[0] not in names]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _page(title: str, body: str, status: int = 200, css: str = "app.css") -> HTMLResponse:
    return HTMLResponse(
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
        f'content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
        f'<link rel="stylesheet" href="/static/{css}"></head><body>{body}</body></html>', status_code=status)


def _error_page(status: int, detail: str) -> HTMLResponse:
    return _page(f"{status} · alignkit label", f'<main class="message"><h1>{status}</h1><p>{html.escape(detail)}'
                 '</p><p class="hint">Open the link you were given (it looks like /login?token=...).</p></main>',
                 status)


async def http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "error")
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": detail, "status": status}, status_code=status)
    return _error_page(status, detail)


def _token(request: Request) -> tuple[str | None, bool]:
    """(token, from_cookie)."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip(), False
    return request.cookies.get(COOKIE), True


async def _who(request: Request, admin: bool = False) -> tuple[db.Annotator, str]:
    token, from_cookie = _token(request)
    who = await run_in_threadpool(db.annotator_for, request.app.state.engine, token)
    if who is None:
        raise HTTPException(401, "a valid token is needed" if token else "no token: open your annotator link")
    if admin and not who.is_admin:
        raise HTTPException(403, "this page needs an admin token")
    if request.method == "POST" and from_cookie:
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
            raise HTTPException(403, "cross-origin request refused")
        if request.headers.get("x-csrf-token") != csrf_token(token):
            raise HTTPException(403, "missing or wrong CSRF token (reload the page)")
    return who, token


async def _json_body(request: Request) -> dict:
    if not request.headers.get("content-type", "").startswith("application/json"):
        raise HTTPException(415, "send application/json")
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
        raise HTTPException(413, f"request body over {MAX_BODY} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise HTTPException(413, f"request body over {MAX_BODY} bytes")
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise HTTPException(400, "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "body must be a JSON object")
    return data


async def login(request: Request) -> Response:
    token = request.query_params.get("token", "")
    who = await run_in_threadpool(db.annotator_for, request.app.state.engine, token)
    if who is None:
        raise HTTPException(401, "this link's token is not valid")
    resp = RedirectResponse("/admin" if who.is_admin and request.query_params.get("to") == "admin" else "/",
                            status_code=303)
    resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https",
                    max_age=30 * 24 * 3600)
    return resp


async def static(request: Request) -> Response:
    await _who(request)
    name = request.path_params["name"]
    if name not in STATIC_TYPES:
        raise HTTPException(404, "no such file")
    return Response((STATIC / name).read_bytes(), media_type=STATIC_TYPES[name])


async def annotate(request: Request) -> Response:
    who, token = await _who(request)
    admin_link = '<a class="link" href="/admin">admin</a>' if who.is_admin else ""
    body = (ANNOTATOR_HTML.replace("{csrf}", csrf_token(token))
            .replace("{name}", html.escape(who.name)).replace("{admin}", admin_link))
    return _page("alignkit label", body)


def _progress_and_item(engine: sa.Engine, who: db.Annotator, rng: random.Random) -> dict:
    item = db.next_item(engine, who.id, rng)
    return {"item": item, "progress": db.progress(engine, who.id)}


async def api_next(request: Request) -> Response:
    who, _ = await _who(request)
    return JSONResponse(await run_in_threadpool(_progress_and_item, request.app.state.engine, who, random.Random()))


async def api_label(request: Request) -> Response:
    who, _ = await _who(request)
    data = await _json_body(request)
    assignment, label, reason = data.get("assignment"), data.get("label"), data.get("reason") or ""
    if not isinstance(assignment, int) or isinstance(assignment, bool):
        raise HTTPException(400, "assignment must be an integer")
    if label not in ("left", "right", "tie", "skip"):
        raise HTTPException(400, "label must be left, right, tie or skip")
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise HTTPException(400, f"reason must be a string of at most {MAX_REASON} characters")
    engine = request.app.state.engine
    try:
        status = await run_in_threadpool(db.submit, engine, who.id, assignment, label, reason.strip())
    except LookupError as e:
        raise HTTPException(404, str(e)) from None
    out = await run_in_threadpool(_progress_and_item, engine, who, random.Random())
    return JSONResponse({"status": status, **out})


async def api_undo(request: Request) -> Response:
    who, _ = await _who(request)
    await _json_body(request)
    engine = request.app.state.engine
    undone = await run_in_threadpool(db.undo, engine, who.id)
    out = await run_in_threadpool(_progress_and_item, engine, who, random.Random())
    return JSONResponse({"undone": undone, **out})


def stats(engine: sa.Engine) -> dict:
    """QC report plus per-task counts (what the admin page shows)."""
    rows = db.labels(engine)
    report = qc.annotator_report(rows)
    with engine.connect() as c:
        task_rows = c.execute(sa.select(db.tasks.c.name, db.tasks.c.k, db.tasks.c.gold_rate,
                                        sa.func.count(db.pairs.c.id).label("pairs"),
                                        sa.func.count(db.pairs.c.gold).label("gold"))
                              .select_from(db.tasks.outerjoin(db.pairs)).group_by(db.tasks.c.id)
                              .order_by(db.tasks.c.id)).all()
    labelled: dict[str, dict] = {}
    for _pid, d in db.aggregate(rows).items():
        t = labelled.setdefault(d["row"]["task"], {"labels": 0, "complete": 0})
        t["labels"] += len(d["outcomes"])
    ks = {t.name: t.k for t in task_rows}
    for _pid, d in db.aggregate(rows).items():
        if d["row"]["gold"] is None and len(d["outcomes"]) >= ks.get(d["row"]["task"], 1):
            labelled[d["row"]["task"]]["complete"] += 1
    report["tasks"] = [{"name": t.name, "k": t.k, "gold_rate": t.gold_rate, "pairs": t.pairs - t.gold,
                        "gold": t.gold, **labelled.get(t.name, {"labels": 0, "complete": 0})} for t in task_rows]
    return report


async def api_stats(request: Request) -> Response:
    await _who(request, admin=True)
    return JSONResponse(await run_in_threadpool(stats, request.app.state.engine))


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return '<span class="na">–</span>'
    if isinstance(v, float):
        return f"{100 * v:.0f}%" if pct else f"{v:.2f}"
    return html.escape(str(v))


def _flag(v: float | None, low: float, high: float) -> str:
    if v is None:
        return ""
    return ' class="bad"' if v < low or v > high else ""


def admin_html(s: dict) -> str:
    e = html.escape
    tasks = "".join(
        f"<tr><td>{e(t['name'])}</td><td>{t['pairs']}</td><td>{t['gold']}</td><td>{t['k']}</td>"
        f"<td>{_fmt(t['gold_rate'], True)}</td><td>{t['labels']}</td><td>{t['complete']}</td>"
        f"<td><progress max=\"{max(t['pairs'], 1)}\" value=\"{t['complete']}\"></progress></td></tr>"
        for t in s["tasks"]) or '<tr><td colspan="8" class="na">no tasks yet: alignkit label add</td></tr>'
    people = "".join(
        f"<tr><td>{e(n)}</td><td>{a['labels']}</td><td>{a['skips']}</td><td>{a['ties']}</td>"
        f"<td{_flag(a['gold_agreement'], 0.7, 1.1)}>{_fmt(a['gold_agreement'], True)} "
        f"<small>({a['gold_n']})</small></td><td{_flag(a['kappa_mean'], 0.2, 1.1)}>{_fmt(a['kappa_mean'])}</td>"
        f"<td{_flag(a['left_share'], 0.35, 0.65)}>{_fmt(a['left_share'], True)} <small>({a['sided']})</small></td>"
        f"<td>{a['reasons']}</td></tr>"
        for n, a in sorted(s["annotators"].items())) or '<tr><td colspan="8" class="na">no labels yet</td></tr>'
    pairs = "".join(f"<tr><td>{e(k)}</td><td>{v['n']}</td><td>{_fmt(v['kappa'])}</td></tr>"
                    for k, v in sorted(s["pairwise"].items())) or '<tr><td colspan="3" class="na">none yet</td></tr>'
    return (
        '<header class="bar"><span class="brand">alignkit label</span><span class="who">admin</span>'
        '<a class="link" href="/">label</a></header><main class="admin">'
        f'<section class="cards"><div class="card stat"><b>{_fmt(s["fleiss_kappa"])}</b><span>Fleiss\' kappa'
        f'</span></div><div class="card stat"><b>{s["pairs_multi"]}</b><span>pairs with 2+ labels</span></div>'
        f'<div class="card stat"><b>{len(s["annotators"])}</b><span>annotators</span></div></section>'
        '<h2>Tasks</h2><table><thead><tr><th>task</th><th>pairs</th><th>gold</th><th>k</th><th>gold rate</th>'
        f'<th>labels</th><th>complete</th><th></th></tr></thead><tbody>{tasks}</tbody></table>'
        '<h2>Annotators</h2><table><thead><tr><th>name</th><th>labels</th><th>skips</th><th>ties</th>'
        '<th>gold agreement</th><th>mean Cohen\'s &kappa;</th><th>left answer chosen</th><th>reasons</th></tr>'
        f'</thead><tbody>{people}</tbody></table><p class="hint">Red: gold agreement under 70%, mean kappa under '
        '0.2, or the left answer chosen outside 35&ndash;65% (position bias). Counts in brackets.</p>'
        '<h2>Pairs of annotators</h2><table><thead><tr><th>annotators</th><th>shared pairs</th>'
        f'<th>Cohen\'s &kappa;</th></tr></thead><tbody>{pairs}</tbody></table></main>')


async def admin(request: Request) -> Response:
    await _who(request, admin=True)
    s = await run_in_threadpool(stats, request.app.state.engine)
    return _page("admin · alignkit label", admin_html(s))


ANNOTATOR_HTML = """<meta name="csrf-token" content="{csrf}">
<header class="bar"><span class="brand">alignkit label</span>
<span class="progress"><span id="done">0</span> done · <span id="remaining">0</span> left
<span class="meter"><span id="meter"></span></span></span>
<span class="who">{name}</span>{admin}
<button id="undo" class="ghost" title="Undo the last label (U)">&#8630; Undo <kbd>U</kbd></button></header>
<main id="task" hidden>
<section class="prompt card"><h2>Prompt</h2><div id="prompt" class="text"></div></section>
<section class="answers">
<article class="card answer" id="card-left"><h2>Answer A</h2><div id="left" class="text"></div></article>
<article class="card answer" id="card-right"><h2>Answer B</h2><div id="right" class="text"></div></article>
</section>
<section class="actions">
<button id="btn-left" class="choice" data-label="left">A is better <kbd>A</kbd></button>
<button id="btn-tie" class="choice" data-label="tie">About the same <kbd>T</kbd></button>
<button id="btn-right" class="choice" data-label="right">B is better <kbd>B</kbd></button>
<button id="btn-skip" class="choice ghost" data-label="skip">Skip <kbd>S</kbd></button>
</section>
<p class="hint keys">Keys: <kbd>A</kbd> or <kbd>&larr;</kbd> &middot; <kbd>B</kbd> or <kbd>&rarr;</kbd> &middot;
<kbd>T</kbd> about the same &middot; <kbd>S</kbd> skip &middot; <kbd>U</kbd> undo &middot; <kbd>R</kbd> write a reason</p>
<section class="reason"><label for="reason">Reason (optional)</label>
<textarea id="reason" maxlength="2000" rows="2" placeholder="Why? (Esc leaves the box, then use the keys)"></textarea>
</section>
</main>
<main id="finished" class="message" hidden><h1>All done</h1><p>Nothing left to label right now. Thank you!</p>
<p class="hint">New pairs appear here when they are added; reload the page later.</p></main>
<div id="toast" role="status" aria-live="polite"></div>
<script src="/static/app.js"></script>"""


def build_app(db_spec: str) -> Starlette:
    """The Starlette app over the database `db_spec` (path or URL)."""
    app = Starlette(
        routes=[
            Route("/login", login), Route("/", annotate), Route("/admin", admin),
            Route("/static/{name}", static), Route("/api/next", api_next),
            Route("/api/label", api_label, methods=["POST"]), Route("/api/undo", api_undo, methods=["POST"]),
            Route("/api/stats", api_stats),
        ],
        exception_handlers={HTTPException: http_error, 500: http_error},
    )
    app.state.engine = db.connect(db_spec)
    return SecurityHeaders(app)


def serve(db_spec: str, host: str = "127.0.0.1", port: int = 8700) -> None:
    """Serve the app with uvicorn (blocks)."""
    import uvicorn

    app = build_app(db_spec)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"alignkit label: listening on {host}: reachable from other machines, over plain HTTP; "
              "put it behind an HTTPS reverse proxy", file=sys.stderr, flush=True)
    print(f"alignkit label: http://{host}:{port}/login?token=YOUR_TOKEN  (Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", limit_concurrency=256, timeout_keep_alive=30,
                h11_max_incomplete_event_size=16 * 1024)

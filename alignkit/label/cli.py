"""`alignkit label ...`: serve, add, token add, export, stats (argument parsing for the label app)."""

from __future__ import annotations

import argparse
import json
import sys

DB_HELP = "database: a file path (SQLite) or a SQLAlchemy URL such as postgresql+psycopg://user@host/db"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("label", help="preference-labelling web app: serve, add pairs, tokens, export",
                       description="Preference-labelling web app (docs/labelling.md).")
    ls = p.add_subparsers(dest="label_command", required=True)
    q = ls.add_parser("serve", help="serve the annotator and admin pages")
    q.add_argument("--db", required=True, help=DB_HELP)
    q.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    q.add_argument("--port", type=int, default=8700)
    q = ls.add_parser("add", help="load comparison pairs from a JSONL file")
    q.add_argument("pairs_file")
    q.add_argument("--db", required=True, help=DB_HELP)
    q.add_argument("--task", default="default", help="task name (pairs are grouped by task)")
    q.add_argument("--k", type=int, default=1, help="labels wanted per pair (a new task only)")
    q.add_argument("--gold-rate", type=float, default=0.0, help="share of gold pairs mixed in (a new task only)")
    q.add_argument("--gold", action="store_true", help="the file holds gold pairs: chosen/rejected rows are a > b")
    q = ls.add_parser("token", help="annotator tokens")
    ts = q.add_subparsers(dest="token_command", required=True)
    t = ts.add_parser("add", help="create an annotator and print their link (the token is shown only once)")
    t.add_argument("name")
    t.add_argument("--db", required=True, help=DB_HELP)
    t.add_argument("--admin", action="store_true", help="may open /admin")
    t.add_argument("--url", default="http://127.0.0.1:8700", help="base URL printed in the link")
    q = ls.add_parser("export", help="write labelled pairs as preference data (JSONL)")
    q.add_argument("--db", required=True, help=DB_HELP)
    q.add_argument("--out", required=True)
    q.add_argument("--task", help="only this task")
    q.add_argument("--include-gold", action="store_true", help="export labelled gold pairs too")
    q = ls.add_parser("stats", help="print the QC figures (what /admin shows) as JSON")
    q.add_argument("--db", required=True, help=DB_HELP)


def run(args: argparse.Namespace) -> int:
    from alignkit.label import db

    try:
        return _run(args, db)
    except db.LabelDBError as e:
        print(f"alignkit: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, db) -> int:
    cmd = args.label_command
    if cmd == "serve":
        from alignkit.label.app import serve

        serve(args.db, args.host, args.port)
        return 0
    eng = db.connect(args.db)
    if cmd == "add":
        rows = db.read_pairs_file(args.pairs_file, gold=args.gold)
        print(json.dumps(db.add_pairs(eng, rows, args.task, args.k, args.gold_rate)))
    elif cmd == "token":
        token = db.add_token(eng, args.name, admin=args.admin)
        print(json.dumps({"name": args.name, "admin": args.admin, "token": token,
                          "link": f"{args.url.rstrip('/')}/login?token={token}"}))
    elif cmd == "export":
        from alignkit.atomic import write_text_atomic

        rows, counts = db.export_rows(eng, args.task, args.include_gold)
        write_text_atomic(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(json.dumps({"out": args.out, **counts}))
    elif cmd == "stats":
        from alignkit.label.app import stats

        print(json.dumps(stats(eng), indent=2))
    return 0

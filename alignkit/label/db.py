"""The labelling database: one schema (SQLAlchemy Core) for SQLite and PostgreSQL.

Tables
    tasks        a named batch of pairs: k (labels wanted per pair) and the gold mixing rate
    pairs        prompt + answers a and b + metadata; `gold` (a | b | tie) marks a known-answer pair
    annotators   a name and the SHA-256 of the access token (the token itself is never stored)
    assignments  one row per (pair, annotator), unique: the side order shown (`swapped`), then the
                 label (`choice`: a | b | tie | skip, in the original a/b terms) once given

A label is one UPDATE in one transaction; an assignment is created before the pair is shown, so a
reload shows the same pair in the same order, and the unique key means an annotator never sees a
pair twice and a label can never be stored twice.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

CHOICES = ("a", "b", "tie", "skip")
GOLD = ("a", "b", "tie")

meta = sa.MetaData()
tasks = sa.Table(
    "tasks", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("k", sa.Integer, nullable=False),
    sa.Column("gold_rate", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
pairs = sa.Table(
    "pairs", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("task_id", sa.Integer, sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    sa.Column("ext_id", sa.String(200), nullable=False),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("answer_a", sa.Text, nullable=False),
    sa.Column("answer_b", sa.Text, nullable=False),
    sa.Column("meta", sa.Text, nullable=False, default="{}"),
    sa.Column("gold", sa.String(8), nullable=True),
    sa.UniqueConstraint("task_id", "ext_id"),
    sa.CheckConstraint("gold IS NULL OR gold IN ('a', 'b', 'tie')", name="gold_value"),
)
annotators = sa.Table(
    "annotators", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("is_admin", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
assignments = sa.Table(
    "assignments", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("pair_id", sa.Integer, sa.ForeignKey("pairs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("annotator_id", sa.Integer, sa.ForeignKey("annotators.id", ondelete="CASCADE"), nullable=False),
    sa.Column("swapped", sa.Boolean, nullable=False),
    sa.Column("shown_at", sa.Float, nullable=False),
    sa.Column("choice", sa.String(8), nullable=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("labelled_at", sa.Float, nullable=True),
    sa.UniqueConstraint("pair_id", "annotator_id"),
    sa.CheckConstraint("choice IS NULL OR choice IN ('a', 'b', 'tie', 'skip')", name="choice_value"),
    sa.Index("ix_assign_annotator", "annotator_id", "labelled_at"),
)


class LabelDBError(ValueError):
    """Bad input to the labelling database (unknown task, malformed pairs file line, ...)."""


def db_url(db: str) -> str:
    """A path (`labels.sqlite`) or a SQLAlchemy URL (`postgresql+psycopg://...`) -> a URL."""
    return db if "://" in db else f"sqlite:///{Path(db).resolve()}"


def _sqlite_pragmas(conn: Any, _record: Any) -> None:
    cur = conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=FULL")  # an acknowledged label survives a crash of the server
    cur.execute("PRAGMA busy_timeout=15000")
    cur.close()


def _sqlite_driver_autocommit(conn: Any, _record: Any) -> None:
    conn.isolation_level = None  # SQLAlchemy's begin listener below issues BEGIN itself


def _sqlite_begin(conn: sa.Connection) -> None:
    # A write takes the write lock at BEGIN (IMMEDIATE), so it waits its turn (busy_timeout)
    # instead of failing when another writer commits between its read and its write.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")


@contextmanager
def write(eng: sa.Engine) -> Iterator[sa.Connection]:
    """One write transaction (committed on exit, rolled back on an exception)."""
    with eng.connect() as c:
        c = c.execution_options(write=True)
        with c.begin():
            yield c


def connect(db: str, create: bool = True) -> sa.Engine:
    """An engine for `db` (path or URL); creates the tables when missing."""
    url = db_url(db)
    if url.startswith("sqlite"):
        eng = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 15})
        sa.event.listen(eng, "connect", _sqlite_pragmas)
        sa.event.listen(eng, "connect", _sqlite_driver_autocommit)
        sa.event.listen(eng, "begin", _sqlite_begin)
    else:
        eng = sa.create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
    if create:
        meta.create_all(eng)
    return eng


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def add_token(eng: sa.Engine, name: str, admin: bool = False) -> str:
    """Create annotator `name`; returns the token (shown once, only its hash is stored)."""
    token = secrets.token_urlsafe(24)
    with write(eng) as c:
        if c.execute(sa.select(annotators.c.id).where(annotators.c.name == name)).first():
            raise LabelDBError(f"annotator {name!r} exists already")
        c.execute(annotators.insert().values(name=name, token_hash=hash_token(token), is_admin=admin,
                                             created_at=time.time()))
    return token


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    is_admin: bool


def annotator_for(eng: sa.Engine, token: str | None) -> Annotator | None:
    if not token or len(token) > 200:
        return None
    with eng.connect() as c:
        row = c.execute(sa.select(annotators.c.id, annotators.c.name, annotators.c.is_admin)
                        .where(annotators.c.token_hash == hash_token(token))).first()
    return Annotator(row.id, row.name, bool(row.is_admin)) if row else None


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list):  # a conversation: [{"role", "content"}, ...]
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in v if isinstance(m, dict))
    raise TypeError


def parse_pair(row: Any, where: str, gold_from_chosen: bool = False) -> dict:
    """One pairs-file record -> a pairs row. Accepts {prompt, a, b} (or answer_a/answer_b,
    response_a/response_b) or {prompt, chosen, rejected}; optional id, gold, meta, and any other
    keys (models, round, ...) kept as metadata."""
    if not isinstance(row, dict):
        raise LabelDBError(f"{where}: expected a JSON object")
    keys = next((ks for ks in (("a", "b"), ("answer_a", "answer_b"), ("response_a", "response_b"),
                               ("chosen", "rejected")) if ks[0] in row and ks[1] in row), None)
    if keys is None or "prompt" not in row:
        raise LabelDBError(f"{where}: expected keys prompt and a, b (or answer_a/answer_b, chosen/rejected); "
                           f"got {sorted(row)}")
    try:
        prompt, a, b = _text(row["prompt"]), _text(row[keys[0]]), _text(row[keys[1]])
    except TypeError:
        raise LabelDBError(f"{where}: prompt and answers must be strings (or message lists)") from None
    gold = row.get("gold")
    if gold_from_chosen and keys == ("chosen", "rejected"):
        gold = "a"
    if gold is not None and gold not in GOLD:
        raise LabelDBError(f"{where}: gold must be one of a, b, tie; got {gold!r}")
    skip = {"prompt", "id", "gold", "meta", *keys}
    extra = dict(row.get("meta") or {}) if isinstance(row.get("meta"), dict) else {}
    extra.update({k: v for k, v in row.items() if k not in skip})
    return {"ext_id": str(row["id"]) if row.get("id") is not None else None, "prompt": prompt,
            "answer_a": a, "answer_b": b, "gold": gold, "meta": json.dumps(extra, ensure_ascii=False)}


def read_pairs_file(path: str | Path, gold: bool = False) -> list[dict]:
    """The rows of a JSONL pairs file (errors name file:line)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise LabelDBError(f"{path}:{n}: not valid JSON") from None
            out.append(parse_pair(row, f"{path}:{n}", gold_from_chosen=gold))
    return out


def add_pairs(eng: sa.Engine, rows: list[dict], task: str = "default", k: int = 1,
              gold_rate: float = 0.0) -> dict:
    """Add pairs to `task` (created with k and gold_rate when new). Pairs whose id is already in
    the task are left alone, so adding the same file twice is harmless. Returns counts."""
    if k < 1:
        raise LabelDBError(f"k must be >= 1, got {k}")
    if not 0.0 <= gold_rate < 1.0:
        raise LabelDBError(f"gold_rate must be in [0, 1), got {gold_rate}")
    with write(eng) as c:
        t = c.execute(sa.select(tasks.c.id).where(tasks.c.name == task)).first()
        if t is None:
            tid = c.execute(tasks.insert().values(name=task, k=k, gold_rate=gold_rate, created_at=time.time())
                            ).inserted_primary_key[0]
        else:
            tid = t.id
        have = set(c.execute(sa.select(pairs.c.ext_id).where(pairs.c.task_id == tid)).scalars())
        new = []
        for r in rows:
            ext = r["ext_id"] or hashlib.sha256(
                json.dumps([r["prompt"], r["answer_a"], r["answer_b"]]).encode()).hexdigest()[:16]
            if ext in have:
                continue
            have.add(ext)
            new.append({**r, "ext_id": ext, "task_id": tid})
        if new:
            c.execute(pairs.insert(), new)
    return {"task": task, "added": len(new), "skipped": len(rows) - len(new)}


def _open_assignment(c: sa.Connection, annotator_id: int) -> Any:
    return c.execute(sa.select(assignments.c.id, assignments.c.pair_id, assignments.c.swapped)
                     .where(assignments.c.annotator_id == annotator_id, assignments.c.choice.is_(None))
                     .order_by(assignments.c.id).limit(1)).first()


def _pick(c: sa.Connection, annotator_id: int, rng: random.Random) -> int | None:
    """The next pair for an annotator: a gold pair at the task's gold rate, else the pair with the
    fewest live assignments (below k), ties broken at random so annotators spread out."""
    mine = sa.select(assignments.c.pair_id).where(assignments.c.annotator_id == annotator_id)
    live = (sa.select(sa.func.count()).where(assignments.c.pair_id == pairs.c.id,
                                             sa.or_(assignments.c.choice.is_(None), assignments.c.choice != "skip"))
            .scalar_subquery())
    base = sa.select(pairs.c.id, tasks.c.gold_rate, live.label("n")).join(tasks, tasks.c.id == pairs.c.task_id).where(
        pairs.c.id.not_in(mine))
    regular = c.execute(base.where(pairs.c.gold.is_(None), live < tasks.c.k)
                        .order_by(live, pairs.c.id).limit(50)).all()
    gold = c.execute(base.where(pairs.c.gold.is_not(None)).order_by(pairs.c.id).limit(200)).all()
    if not regular:
        return None
    if gold and rng.random() < regular[0].gold_rate:
        return rng.choice(gold).id
    return rng.choice([r.id for r in regular if r.n == regular[0].n])


def _has_slot(c: sa.Connection, pair_id: int) -> bool:
    """Lock the pair row (PostgreSQL: FOR UPDATE; SQLite's write lock is already held), then check
    that it still wants a label, so concurrent annotators never push a pair past k."""
    c.execute(sa.select(pairs.c.id).where(pairs.c.id == pair_id).with_for_update())
    live = c.execute(sa.select(sa.func.count()).where(
        assignments.c.pair_id == pair_id,
        sa.or_(assignments.c.choice.is_(None), assignments.c.choice != "skip"))).scalar()
    row = c.execute(sa.select(pairs.c.gold, tasks.c.k).join(tasks).where(pairs.c.id == pair_id)).first()
    return row.gold is not None or live < row.k


def next_item(eng: sa.Engine, annotator_id: int, rng: random.Random | None = None) -> dict | None:
    """The annotator's current item (an open assignment, or a new one); None when nothing is left."""
    rng = rng or random.Random()
    for _ in range(20):  # a concurrent annotator may take the same pair: pick again
        try:
            with write(eng) as c:
                row = _open_assignment(c, annotator_id)
                if row is None:
                    pid = _pick(c, annotator_id, rng)
                    if pid is None:
                        return None
                    if not _has_slot(c, pid):  # taken meanwhile by someone else (PostgreSQL)
                        continue
                    c.execute(assignments.insert().values(pair_id=pid, annotator_id=annotator_id,
                                                          swapped=rng.random() < 0.5, shown_at=time.time()))
                    row = _open_assignment(c, annotator_id)
                p = c.execute(sa.select(pairs).where(pairs.c.id == row.pair_id)).first()
        except sa.exc.IntegrityError:
            continue
        left, right = (p.answer_b, p.answer_a) if row.swapped else (p.answer_a, p.answer_b)
        return {"assignment": row.id, "prompt": p.prompt, "left": left, "right": right}
    raise RuntimeError("could not assign a pair after 20 tries (heavy contention)")


SHOWN = {"left": 0, "right": 1}


def to_choice(shown: str, swapped: bool) -> str:
    """A click (left | right | tie | skip) -> the label in a/b terms."""
    if shown in ("tie", "skip"):
        return shown
    if shown not in SHOWN:
        raise LabelDBError(f"label must be left, right, tie or skip; got {shown!r}")
    left_is_a = not swapped
    return "a" if (shown == "left") == left_is_a else "b"


def submit(eng: sa.Engine, annotator_id: int, assignment_id: int, shown: str, reason: str = "") -> str:
    """Store one label in one transaction. Returns 'stored', or 'duplicate' when this assignment
    was labelled already (a retried request); raises LookupError for someone else's assignment."""
    with write(eng) as c:
        row = c.execute(sa.select(assignments.c.swapped, assignments.c.choice).where(
            assignments.c.id == assignment_id, assignments.c.annotator_id == annotator_id)).first()
        if row is None:
            raise LookupError(f"no assignment {assignment_id} for this annotator")
        choice = to_choice(shown, bool(row.swapped))
        n = c.execute(assignments.update().where(assignments.c.id == assignment_id,
                                                 assignments.c.choice.is_(None))
                      .values(choice=choice, reason=reason or None, labelled_at=time.time())).rowcount
    return "stored" if n == 1 else "duplicate"


def undo(eng: sa.Engine, annotator_id: int) -> int | None:
    """Clear the annotator's newest label; that pair is shown again next. Returns its assignment."""
    with write(eng) as c:
        last = c.execute(sa.select(assignments.c.id).where(assignments.c.annotator_id == annotator_id,
                                                            assignments.c.choice.is_not(None))
                         .order_by(assignments.c.labelled_at.desc(), assignments.c.id.desc()).limit(1)).first()
        if last is None:
            return None
        # the open assignment goes back to the pool so the undone pair comes first
        c.execute(assignments.delete().where(assignments.c.annotator_id == annotator_id,
                                             assignments.c.choice.is_(None)))
        c.execute(assignments.update().where(assignments.c.id == last.id)
                  .values(choice=None, reason=None, labelled_at=None))
    return last.id


def progress(eng: sa.Engine, annotator_id: int) -> dict:
    """done: labels this annotator gave; remaining: pairs still open to them (an upper bound
    when other annotators are working at the same time)."""
    with eng.connect() as c:
        done = c.execute(sa.select(sa.func.count()).where(assignments.c.annotator_id == annotator_id,
                                                          assignments.c.choice.is_not(None))).scalar()
        live = (sa.select(sa.func.count()).where(assignments.c.pair_id == pairs.c.id,
                                                 sa.or_(assignments.c.choice.is_(None),
                                                        assignments.c.choice != "skip")).scalar_subquery())
        mine = sa.select(assignments.c.pair_id).where(assignments.c.annotator_id == annotator_id,
                                                      assignments.c.choice.is_not(None))
        mine_open = sa.select(assignments.c.pair_id).where(assignments.c.annotator_id == annotator_id,
                                                           assignments.c.choice.is_(None))
        remaining = c.execute(sa.select(sa.func.count()).select_from(pairs.join(tasks)).where(
            pairs.c.gold.is_(None), pairs.c.id.not_in(mine),
            sa.or_(live < tasks.c.k, pairs.c.id.in_(mine_open)))).scalar()
    return {"done": int(done), "remaining": int(remaining)}


def labels(eng: sa.Engine, task: str | None = None) -> list[dict]:
    """Every label given: pair fields + annotator + choice (a/b/tie/skip) + swapped + reason."""
    q = (sa.select(pairs.c.id.label("pair_id"), pairs.c.ext_id, tasks.c.name.label("task"), pairs.c.prompt,
                   pairs.c.answer_a, pairs.c.answer_b, pairs.c.meta, pairs.c.gold,
                   annotators.c.name.label("annotator"), assignments.c.choice, assignments.c.swapped,
                   assignments.c.reason, assignments.c.labelled_at)
         .select_from(assignments.join(pairs).join(tasks).join(annotators))
         .where(assignments.c.choice.is_not(None)).order_by(pairs.c.id, assignments.c.id))
    if task is not None:
        q = q.where(tasks.c.name == task)
    with eng.connect() as c:
        return [dict(r._mapping) for r in c.execute(q)]


OUTCOME = {"a": 1.0, "tie": 0.5, "b": 0.0}


def aggregate(rows: list[dict]) -> dict[int, dict]:
    """Per pair: the mean outcome p (1: a better) over its non-skip labels, and their count."""
    out: dict[int, dict] = {}
    for r in rows:
        if r["choice"] == "skip":
            continue
        d = out.setdefault(r["pair_id"], {"row": r, "outcomes": []})
        d["outcomes"].append(OUTCOME[r["choice"]])
    for d in out.values():
        d["p_a"] = sum(d["outcomes"]) / len(d["outcomes"])
    return out


def export_rows(eng: sa.Engine, task: str | None = None, include_gold: bool = False) -> tuple[list[dict], dict]:
    """Preference rows {prompt, chosen, rejected, soft_label?, ...} that alignkit's loaders read.

    The side more annotators preferred is `chosen`; with one label it is a hard label (no
    soft_label); with n >= 2, soft_label = the share of votes for `chosen` (a tie counts half).
    Pairs whose votes balance exactly (p = 0.5) are left out and counted."""
    agg = aggregate(labels(eng, task))
    rows, counts = [], {"pairs": 0, "balanced": 0, "gold_left_out": 0}
    for d in agg.values():
        r = d["row"]
        if r["gold"] is not None and not include_gold:
            counts["gold_left_out"] += 1
            continue
        p, n = d["p_a"], len(d["outcomes"])
        if p == 0.5:
            counts["balanced"] += 1
            continue
        a_wins = p > 0.5
        row = {"prompt": r["prompt"], "chosen": r["answer_a"] if a_wins else r["answer_b"],
               "rejected": r["answer_b"] if a_wins else r["answer_a"]}
        if n >= 2:
            row["soft_label"] = max(p, 1 - p)
        row.update({"id": r["ext_id"], "task": r["task"], "n_labels": n, "chosen_is_a": a_wins,
                    "meta": json.loads(r["meta"] or "{}")})
        rows.append(row)
    counts["pairs"] = len(rows)
    return rows, counts

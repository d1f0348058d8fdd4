"""Preference labelling by people: a web app (alignkit label), its database, and QC statistics.

    db.py    the schema (SQLAlchemy Core: SQLite or PostgreSQL), assignment, labels, export
    qc.py    agreement with gold and between annotators (Cohen's / Fleiss' kappa), position bias
    app.py   the Starlette app: annotator page, admin page, JSON API
    cli.py   `alignkit label serve | add | token add | export | stats`
    judge.py a judge for the iterate loop that asks people through the database
"""

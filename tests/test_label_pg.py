"""The label tests again, against a real PostgreSQL server started here (initdb/pg_ctl from Debian's
`postgresql` package): the unit/API tests and the load test (20 x 20 labels). The browser tests
exercise the page, not the database, and run on SQLite only. Skipped, with the reason, when the
server or psycopg is missing."""

from __future__ import annotations

import pytest

pytest.importorskip("sqlalchemy", reason="alignkit label needs the 'label' extra: pip install -e .[label]")
pytest.importorskip("starlette", reason="alignkit label needs the 'label' extra: pip install -e .[label]")
pytest.importorskip("httpx", reason="the label tests need httpx (the 'label' extra)")
pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg: pip install 'psycopg[binary]'")

from _label_pg import Postgres, find_bin  # noqa: E402
from test_label import *  # noqa: E402, F403  (the same tests, with label_db_url pointing at PostgreSQL)
from test_label import test_cli_add_token_export, test_sqlite_pragmas  # noqa: E402
from test_label_load import run_load  # noqa: E402

del test_sqlite_pragmas, test_cli_add_token_export  # SQLite-only


pytestmark = pytest.mark.skipif(find_bin("initdb") is None or find_bin("pg_ctl") is None,
                                reason="no initdb/pg_ctl (apt-get install postgresql); PostgreSQL tests skipped")


@pytest.fixture(scope="module")
def postgres():
    try:
        pg = Postgres().start()
    except Exception as e:  # noqa: BLE001  (a server that will not start is a skip, with its reason)
        pytest.skip(f"PostgreSQL did not start: {e}")
    yield pg
    pg.stop()


@pytest.fixture
def label_db_url(postgres):
    return postgres.new_database()


@pytest.mark.slow
def test_load_with_a_crash_on_postgres(label_db_url, tmp_path):
    run_load(label_db_url, tmp_path, n_labels=20)  # 20 x 20 here, to keep the suite's time down

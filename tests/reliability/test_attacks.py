"""Attacks on the input paths, each a case that got through before (issue 29), run as a user
or an attacker runs them: the real `tracebank` command in a DVC project on real ELPV cells."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from tests.integration.test_pipeline import BIN, run


@pytest.fixture
def line(tmp_path):
    root = tmp_path / "line"
    root.mkdir()
    run(root, "git", "init", "-q")
    run(root, str(BIN / "dvc"), "init", "-q")
    run(root, str(BIN / "dvc"), "config", "core.analytics", "false")
    run(root, str(BIN / "tracebank"), "import", "elpv:mono", "--limit-train", "8", "--limit-test", "4")
    return root


def _every_file(*roots: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for root in roots if root.exists() for p in root.rglob("*")
            if p.is_file() and not p.is_symlink()}


def test_add_never_follows_a_symlink_and_never_widens_a_files_mode(line, tmp_path, elpv_mono):
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secret-hash:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    outside = Path(elpv_mono.train[-1].path)  # an image the user did not mean to add
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "shadow.png").symlink_to(secret)
    (drop / "cell.png").symlink_to(outside)
    (drop / "folder").symlink_to(tmp_path, target_is_directory=True)
    truncated = drop / "truncated.png"  # fails validation: goes to quarantine, and stays private
    truncated.write_bytes(Path(elpv_mono.train[-2].path).read_bytes()[:400])
    truncated.chmod(0o600)
    good = drop / "new_good.png"
    shutil.copy(elpv_mono.train[-3].path, good)
    direct = tmp_path / "direct.png"
    direct.symlink_to(outside)

    result = json.loads(run(line, str(BIN / "tracebank"), "add", str(drop), str(direct), "--json").stdout)
    refused = {Path(r["source"]).name for r in result["refused"]}
    assert refused == {"shadow.png", "cell.png", "folder", "direct.png"}
    assert [Path(a["source"]).name for a in result["added"]] == ["new_good.png"]
    assert [Path(q["source"]).name for q in result["quarantined"]] == ["truncated.png"]
    written = _every_file(line / "data", line / "quarantine")
    assert secret.read_bytes() not in written.values() and outside.read_bytes() not in written.values()
    copy = line / result["quarantined"][0]["path"]  # relative to the project
    assert copy.read_bytes() == truncated.read_bytes()
    assert stat.S_IMODE(os.stat(copy).st_mode) & 0o077 == 0  # no more readable than its source
    assert not any(p.is_symlink() for p in (line / "data").rglob("*"))


def test_audit_takes_any_since_and_never_creates_the_database_it_reads(tmp_path):
    import datetime as dt

    from pipeline.lifecycle.audit import AuditLog, Decision

    db = tmp_path / "decisions.sqlite"
    log = AuditLog(db)
    log.record(Decision("r1", dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.UTC), "part-7", "0" * 64, 64, 64, 1.5,
                        "anomalous", 1.0, "b" * 16, 3.0))
    log.dispose()
    common = ["--db", str(db), "--registry", str(tmp_path / "banks"), "--json"]
    for since in ("99999999999999d", "0001-01-01T00:00+01:00"):  # before anything: every row
        got = run(tmp_path, str(BIN / "tracebank"), "audit", "--since", since, *common)
        assert [json.loads(line)["request_id"] for line in got.stdout.splitlines()] == ["r1"], since
        assert "Traceback" not in got.stderr
    for missing in (str(tmp_path / "new.sqlite"), f"sqlite:///{tmp_path / 'new.sqlite'}"):
        refused = run(tmp_path, str(BIN / "tracebank"), "audit", "--db", missing, check=False)
        assert refused.returncode == 2 and "does not exist" in refused.stderr
        assert not (tmp_path / "new.sqlite").exists()  # reading never creates a database

"""Registry statuses through promotions and rollbacks, as `tracebank banks` shows them."""

import json

import pytest

from pipeline.cli import main
from pipeline.lifecycle.registry import Registry, RegistryError
from pipeline.patchcore.bank import save_bank


@pytest.fixture()
def registry(tmp_path, small_mtd_model):
    reg = Registry(tmp_path / "banks")
    ids = []
    for name in ("a", "b", "c"):
        training = {"spec": name, "files": [{"path": name, "sha256": name * 64}], "skipped": []}
        save_bank(tmp_path / name, small_mtd_model, training=training)
        ids.append(reg.register(tmp_path / name, {"gates": {"passed": True, "failures": []}}))
    return reg, ids


def statuses(reg):
    return {row["bank_id"]: row["status"] for row in reg.list()}


def test_promote_rollback_promote_keeps_each_bank_status_true(registry, capsys):
    reg, (a, b, c) = registry
    assert set(statuses(reg).values()) == {"candidate"}
    reg.promote(a)
    reg.promote(b)
    assert statuses(reg) == {a: "retired", b: "production", c: "candidate"}
    reg.rollback()
    assert statuses(reg) == {a: "production", b: "rolled back", c: "candidate"}
    reg.promote(c)
    assert statuses(reg) == {a: "retired", b: "rolled back", c: "production"}
    reg.promote(b)  # promoted again after a fix: no longer "rolled back"
    assert statuses(reg) == {a: "retired", b: "production", c: "retired"}

    assert main(["banks", "--registry", str(reg.root)]) == 0
    shown = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert shown == {a: "retired", b: "production", c: "retired"}
    assert main(["rollback", "--registry", str(reg.root)]) == 0
    assert capsys.readouterr().out.strip() == f"rolled back to {c}: now production (previous: {a})"
    assert main(["rollback", "--registry", str(reg.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bank_id"] == a


def test_a_bank_that_failed_its_gates_is_not_promoted(registry, tmp_path, small_mtd_model):
    reg, _ = registry
    training = {"spec": "d", "files": [{"path": "d", "sha256": "d" * 64}], "skipped": []}
    save_bank(tmp_path / "d", small_mtd_model, training=training)
    rejected = reg.register(tmp_path / "d", {"gates": {"passed": False, "failures": ["pro >= 0.6 failed (got 0.5)"]},
                                             "status": "rejected"})
    with pytest.raises(RegistryError, match=r"cannot be promoted: pro >= 0.6 failed \(got 0.5\)"):
        reg.promote(rejected)
    assert reg.production() is None and statuses(reg)[rejected] == "rejected"

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


def tree_sha256(folder):
    """sha256 of every file under ``folder``, by relative path."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_promoting_production_again_is_a_no_op_and_rollback_returns_to_the_previous_different_bank(registry,
                                                                                                   capsys):
    reg, (a, b, _) = registry
    reg.promote(a)
    reg.promote(b)
    for _ in range(2):
        assert main(["promote", b, "--registry", str(reg.root)]) == 0
        assert capsys.readouterr().out.startswith(f"{b} is already the production bank (since ")
    assert [(e["from"], e["to"], e["reason"]) for e in reg.history()] == [(None, a, "manual"), (a, b, "manual")]
    assert main(["rollback", "--registry", str(reg.root)]) == 0
    assert reg.production()["bank_id"] == a
    assert main(["rollback", "--registry", str(reg.root)]) == 1  # a was the first: nothing before it
    err = capsys.readouterr().err
    assert f"there is no previous production bank to roll back to: {a} is the only bank" in err
    assert reg.production()["bank_id"] == a and len(reg.history()) == 3
    assert main(["history", "--registry", str(reg.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2:6] for line in lines[:3]] == [["-", "->", a, "manual"], [a, "->", b, "manual"],
                                                         [b, "->", a, "rollback"]]
    assert lines[3] == f"production: {a}"


def test_a_rollback_with_no_production_bank_exits_1(registry, capsys):
    reg, _ = registry
    assert main(["rollback", "--registry", str(reg.root)]) == 1
    assert "there is no production bank to roll back from" in capsys.readouterr().err


def test_registering_a_bank_again_records_an_evaluation_and_leaves_its_record_byte_for_byte(registry, tmp_path,
                                                                                           small_mtd_model):
    reg, (a, _, _) = registry
    reg.promote(a)
    before = tree_sha256(reg.root / a)
    # the same bank again (same training data and params), judged by a stricter gate this time
    training = {"spec": "a", "files": [{"path": "a", "sha256": "a" * 64}], "skipped": []}
    save_bank(tmp_path / "again", small_mtd_model, training=training)
    stricter = {"gates": {"passed": False, "failures": ["image_auroc >= 0.99 failed (got 0.95)"]},
                "data_hash": "other.dir", "metrics": {"image_auroc": 0.95}}
    assert reg.register(tmp_path / "again", stricter) == a
    assert tree_sha256(reg.root / a) == before
    lineage = reg.lineage("production")
    assert lineage["bank_id"] == a and lineage["status"] == "production"
    assert lineage["gates"] == {"passed": True, "failures": []}  # as registered
    [evaluation] = lineage["evaluations"]
    assert evaluation["gates_passed"] is False and evaluation["data_hash"] == "other.dir"
    assert [e["event"] for e in lineage["history"]] == ["registered", "promoted", "evaluated"]
    # its latest gates failed: it may not be promoted again after a rollback...
    assert reg.verdict(a)["passed"] is False


def _promote_at_the_barrier(root, bank, barrier, rounds):
    from pipeline.lifecycle.registry import Registry

    for i in range(rounds):
        barrier.wait()
        Registry(root / f"round-{i}").promote(bank, by=f"worker-{bank[:4]}")


def test_two_promotions_at_the_same_moment_both_reach_the_log_in_40_rounds(registry, tmp_path):
    import multiprocessing
    import shutil

    reg, (a, b, c) = registry
    reg.promote(a)
    rounds = 40
    for i in range(rounds):
        shutil.copytree(reg.root, tmp_path / f"round-{i}", symlinks=True)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_promote_at_the_barrier, args=(tmp_path, bank, barrier, rounds))
               for bank in (b, c)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    for i in range(rounds):
        round_ = Registry(tmp_path / f"round-{i}")
        log = round_.history()
        assert [e["seq"] for e in log] == [1, 2, 3]
        first, second = log[1]["to"], log[2]["to"]
        assert {first, second} == {b, c}
        assert log[1]["from"] == a and log[2]["from"] == first  # each saw the other's promotion
        pointer = round_.production()
        assert pointer["bank_id"] == second and pointer["history"] == [first, a]
        assert round_.rollback()["bank_id"] == first
        assert round_.rollback()["bank_id"] == a
        with pytest.raises(RegistryError, match="no previous production bank"):
            round_.rollback()


def test_a_second_training_run_is_refused_while_one_holds_the_registry(registry):
    import subprocess
    import sys

    from pipeline.lifecycle.registry import RegistryBusy

    reg, _ = registry
    with reg.exclusive_run("first run"):
        other = subprocess.run([sys.executable, "-c", (
            "import sys; from pipeline.lifecycle.registry import Registry, RegistryBusy\n"
            f"try:\n    Registry({str(reg.root)!r}).exclusive_run('second').__enter__()\n"
            "except RegistryBusy as exc:\n    print(exc); sys.exit(7)\n")], capture_output=True, text=True)
        assert other.returncode == 7 and "is held by pid" in other.stdout
    # released when the holder lets go (a killed holder's flock goes with its process)
    with reg.exclusive_run("third run"):
        pass
    killed = subprocess.Popen([sys.executable, "-c", (
        "import time; from pipeline.lifecycle.registry import Registry\n"
        f"hold = Registry({str(reg.root)!r}).exclusive_run('doomed'); hold.__enter__(); print('held', flush=True); "
        "time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline().strip() == "held"
    with pytest.raises(RegistryBusy):
        with reg.exclusive_run("while it holds"):
            pass
    killed.kill()
    killed.wait()
    with reg.exclusive_run("after the kill", wait_s=5):
        pass

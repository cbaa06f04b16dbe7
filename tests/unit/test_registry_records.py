"""The registry's records and logs against hand-worked cases, on banks written by hand.

Each bank here is a manifest and one small file whose hashes and id are computed the way a
real bank's are (:func:`pipeline.patchcore.bank.bank_id_of`), so no backbone is loaded and
every test runs in milliseconds: they are the tests `make mutate` runs for the registry and
its log/lock helpers (docs/mutation.md). The expected promotion stacks, statuses and
timelines are worked out by hand in the comments.
"""

import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import stat
import tempfile
import threading

import pytest

from pipeline.lifecycle import ledger
from pipeline.lifecycle.integrity import bank_problem, verified_manifest
from pipeline.lifecycle.ledger import Busy, FileLock, LedgerError, append_jsonl, read_jsonl, replay, to_time, user_name
from pipeline.lifecycle.registry import NoEarlierBank, Registry, RegistryBusy, RegistryError
from pipeline.patchcore.bank import FORMAT, BankError, bank_id_of

OLD = "2020-01-01T00:00:00+00:00"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bank(folder, name, created_at=OLD):
    """A bank directory as `save_bank` lays it out, for a made-up one-file bank; its id."""
    folder.mkdir(parents=True)
    content = f"memory bank of {name}".encode()
    (folder / "memory_bank.npy").write_bytes(content)
    manifest = {"format": FORMAT, "backbone": {"name": "none", "weights_sha256": "0" * 64}, "params": {"features": {}},
                "training": {"spec": name, "files": [{"path": name, "sha256": sha(name.encode())}], "skipped": []},
                "files": {"memory_bank.npy": sha(content)}, "created_at": created_at}
    manifest["bank_id"] = bank_id_of(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest["bank_id"]


PASSED = {"passed": True, "failures": []}
FAILED = {"passed": False, "failures": ["pro >= 0.7 failed (got 0.5)"]}


@pytest.fixture()
def reg(tmp_path):
    return Registry(tmp_path / "banks")


@pytest.fixture()
def new(reg, tmp_path):
    """``new(name, **lineage)`` registers a made-up bank (gates passed unless told) and returns its id."""
    def register(name, created_at=OLD, **lineage):
        write_bank(tmp_path / "incoming" / name, name, created_at)
        return reg.register(tmp_path / "incoming" / name, {"gates": PASSED} | lineage)
    return register


def log_of(reg):
    return [(e["from"], e["to"], e["reason"]) for e in reg.history()]


def write_log(reg, moves):
    """A promotion log written by hand: ``moves`` of (from, to, reason), a second apart."""
    reg.root.mkdir(parents=True, exist_ok=True)
    for seq, (from_, to, reason) in enumerate(moves, 1):
        append_jsonl(reg.root / "promotions.jsonl", {"seq": seq, "time": f"2021-01-01T00:00:{seq:02d}+00:00",
                                                     "user": "ann", "from": from_, "to": to, "reason": reason})


def holder_fd(path):
    """Another open file on ``path`` that holds its flock (as another process would)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def is_locked(path):
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# -- the log's small helpers ----------------------------------------------------------------
def test_now_is_utc_with_microseconds_and_to_time_reads_it_back():
    before = dt.datetime.now(dt.UTC)
    stamp = ledger.now()
    after = dt.datetime.now(dt.UTC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", stamp)
    assert before <= to_time(stamp) <= after
    # a time without a zone is read as UTC; one with a zone keeps it; a datetime passes through
    assert to_time("2026-01-01T12:00:00") == dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)
    assert to_time("2026-01-01T12:00:00+02:00") == dt.datetime(2026, 1, 1, 10, tzinfo=dt.UTC)
    assert to_time("2026-01-01T12:00:00+02:00").utcoffset() == dt.timedelta(hours=2)
    naive = dt.datetime(2026, 1, 1, 12)
    assert to_time(naive) == dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)


def test_user_name_is_the_given_one_else_the_login_else_the_uid(monkeypatch):
    assert user_name("ann") == "ann"
    monkeypatch.setattr(ledger.getpass, "getuser", lambda: "login-name")
    assert user_name(None) == "login-name" and user_name("") == "login-name"
    for error in (KeyError, OSError):
        def no_login(error=error):
            raise error("no such user")
        monkeypatch.setattr(ledger.getpass, "getuser", no_login)
        assert user_name(None) == f"uid {os.getuid()}"


def test_read_jsonl_skips_blank_lines_and_names_the_bad_line(tmp_path):
    path = tmp_path / "log.jsonl"
    assert read_jsonl(path) == []
    path.write_text('{"a": 1}\n\n   \n{"b": 2}\n')
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}]
    path.write_text('{"a": 1}\n{"b": \n')
    with pytest.raises(LedgerError, match=r"log.jsonl: line 2 is not JSON \(.+\); the log was edited by hand or the "
                                          r"disk is damaged: restore it from a backup$"):
        read_jsonl(path)
    path.write_text('{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(LedgerError, match=r"line 3 is not a JSON object"):
        read_jsonl(path)


def test_append_jsonl_adds_one_sorted_line_and_mends_a_missing_newline(tmp_path):
    path = tmp_path / "deep" / "er" / "log.jsonl"
    append_jsonl(path, {"b": 1, "a": 2})
    assert path.read_text() == '{"a": 2, "b": 1}\n'
    path.write_text(path.read_text() + '{"c": 3}')  # a last line without its newline
    append_jsonl(path, {"d": 4})
    assert path.read_text() == '{"a": 2, "b": 1}\n{"c": 3}\n{"d": 4}\n'
    assert sorted(p.name for p in path.parent.iterdir()) == ["log.jsonl"]  # no temporary file left


def test_a_log_holds_one_line_per_record_however_many_are_appended(tmp_path):
    path = tmp_path / "log.jsonl"
    for n in range(3):
        append_jsonl(path, {"seq": n})
    assert path.read_text() == '{"seq": 0}\n{"seq": 1}\n{"seq": 2}\n'  # `wc -l` counts the records


def test_a_log_is_written_beside_itself_not_in_the_system_temporary_folder(tmp_path, monkeypatch):
    # The new file is renamed over the log, which only works on one file system: a registry on
    # its own disk must not depend on where TMPDIR points (here: a folder that does not exist).
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"a": 1})
    append_jsonl(path, {"b": 2})
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]


def test_append_jsonl_that_fails_leaves_the_old_log_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"a": 1})

    def refuse(*args):
        raise OSError("disk full")
    monkeypatch.setattr(ledger.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        append_jsonl(path, {"b": 2})
    monkeypatch.undo()
    assert path.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["log.jsonl"]


def move(to, reason="manual", from_=None, time="t"):
    return {"time": time, "user": "ann", "from": from_, "to": to, "reason": reason}


def test_replay_of_no_entries_is_no_pointer():
    assert replay([]) is None


def test_replay_pushes_promotions_and_pops_rollbacks_as_worked_by_hand():
    log = [move("a", time="t1"), move("b", from_="a", time="t2"), move("c", from_="b", time="t3")]
    # stack a b c: production c, history b a, nothing rolled back
    pointer = replay(log)
    assert pointer == {"bank_id": "c", "promoted_at": "t3", "promoted_by": "ann", "reason": "manual",
                       "previous": "b", "history": ["b", "a"], "rolled_back": [], "seq": None}
    log += [move("b", "rollback", "c", "t4"), move("a", "rollback", "b", "t5")]
    # pop c (top b is the target: not pushed again), pop b: stack a; rolled back b then c
    pointer = replay(log)
    assert (pointer["bank_id"], pointer["previous"], pointer["history"]) == ("a", None, [])
    assert pointer["rolled_back"] == ["b", "c"] and pointer["reason"] == "rollback" and pointer["promoted_at"] == "t5"
    log.append(move("c", from_="a", time="t6") | {"seq": 6})
    # c promoted again after a fix: stack a c, c is no longer rolled back
    pointer = replay(log)
    assert (pointer["bank_id"], pointer["history"], pointer["rolled_back"]) == ("c", ["a"], ["b"])
    assert pointer["seq"] == 6 and pointer["previous"] == "a"


def test_replay_of_a_rollback_from_a_bank_not_on_top_pops_nothing():
    # stack a b; a rollback recorded "from x" (not b): b stays, x counts as rolled back, a is pushed
    pointer = replay([move("a"), move("b", from_="a"), move("a", "rollback", "x")])
    assert (pointer["bank_id"], pointer["history"], pointer["rolled_back"]) == ("a", ["b", "a"], ["x"])
    # a rollback with no "from" onto an empty stack: its target alone, nothing rolled back
    pointer = replay([move("a", "rollback")])
    assert (pointer["bank_id"], pointer["history"], pointer["rolled_back"]) == ("a", [], [])


# -- the lock ---------------------------------------------------------------------------------
def test_a_held_lock_is_held_for_other_files_and_released_after(tmp_path):
    path = tmp_path / "sub" / ".lock"  # its folder is made when needed
    path.parent.mkdir()
    path.write_text("a much longer line left by an earlier holder of this lock file\n")
    lock = FileLock(path)
    with lock.hold(wait_s=0, what="it"):
        assert is_locked(path)
        assert path.read_text() == f"pid {os.getpid()} since " + path.read_text().split(" since ")[1]
        assert re.fullmatch(rf"pid {os.getpid()} since \S+\n", path.read_text())
        with lock.hold(wait_s=0, what="it"):  # nested in the same thread: no wait for itself
            assert is_locked(path)
        assert is_locked(path)  # the outer hold still has it
    assert not is_locked(path)
    assert os.stat(path).st_mode & 0o777 == 0o644 & ~_umask()
    with lock.hold(wait_s=0, what="it"):  # and it can be taken again
        assert is_locked(path)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_lock_folder_is_created_and_a_symlinked_lock_file_is_refused(tmp_path):
    path = tmp_path / "not" / "yet" / ".lock"
    with FileLock(path).hold(wait_s=0, what="it"):
        assert is_locked(path)
    (tmp_path / "target").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(OSError):
        with FileLock(tmp_path / "link").hold(wait_s=0, what="it"):
            pass


def test_a_lock_another_file_holds_raises_busy_naming_the_holder(tmp_path):
    path = tmp_path / ".lock"
    fd = holder_fd(path)
    try:
        os.write(fd, b"pid 4711 since yesterday\n")
        with pytest.raises(Busy, match=r"^the registry is held by pid 4711 since yesterday; try again when"):
            with FileLock(path).hold(wait_s=0.05, what="the registry"):
                pass
        os.ftruncate(fd, 0)
        with pytest.raises(Busy, match=r"^it is held by another process; try again"):
            with FileLock(path).hold(wait_s=0, what="it"):
                pass
    finally:
        os.close(fd)
    with FileLock(path).hold(wait_s=0, what="it"):  # the failed tries left nothing held
        assert is_locked(path)


def test_a_lock_file_with_bytes_that_are_not_text_still_says_busy(tmp_path):
    path = tmp_path / ".lock"
    fd = holder_fd(path)
    try:
        os.write(fd, b"pid 4711 \xff\xfe since\n")  # written by something else, or a damaged disk
        with pytest.raises(Busy, match=r"^it is held by pid 4711 \ufffd\ufffd since; try again"):
            with FileLock(path).hold(wait_s=0, what="it"):
                pass
    finally:
        os.close(fd)


def test_the_lock_file_is_made_readable_and_never_executable_or_writable_by_others(tmp_path):
    path = tmp_path / "banks" / ".lock"
    with FileLock(path).hold(wait_s=0, what="it"):
        pass
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & 0o600 == 0o600 and mode & 0o133 == 0  # rw for its owner; no x, no write for group/others


def test_a_waiting_writer_gets_the_lock_when_the_other_file_lets_go(tmp_path):
    path = tmp_path / ".lock"
    fd = holder_fd(path)
    threading.Timer(0.2, os.close, [fd]).start()
    with FileLock(path).hold(wait_s=30, what="it"):
        assert is_locked(path)


def run_in_thread(fn):
    result = {}

    def target():
        try:
            result["value"] = fn()
        except (Busy, OSError) as exc:
            result["error"] = exc
    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def test_threads_of_one_process_take_turns_unless_they_share(tmp_path):
    lock = FileLock(tmp_path / ".lock")
    inside, leave = threading.Event(), threading.Event()

    def hold_until_told():
        with lock.hold(wait_s=0, what="it"):
            inside.set()
            leave.wait(10)
    thread, _ = run_in_thread(hold_until_told)
    assert inside.wait(10)

    def try_now():
        with lock.hold(wait_s=0, what="it"):
            return "got it"
    other, result = run_in_thread(try_now)
    other.join()
    assert isinstance(result["error"], Busy)
    assert "it is in use by another thread of this process" in str(result["error"])
    threading.Timer(0.2, leave.set).start()

    def wait_for_it():
        with lock.hold(wait_s=30, what="it"):
            return "got it"
    waiter, result = run_in_thread(wait_for_it)
    waiter.join()
    thread.join()
    assert result == {"value": "got it"}


def test_threads_that_share_a_hold_are_inside_together_and_the_last_one_out_releases(tmp_path):
    path = tmp_path / ".lock"
    lock = FileLock(path)
    both_inside = threading.Barrier(3, timeout=10)
    first_may_leave, second_may_leave, first_left = threading.Event(), threading.Event(), threading.Event()

    def share(may_leave, left=None):
        with lock.hold(wait_s=0, what="run", threads_share=True):
            both_inside.wait()
            may_leave.wait(10)
        if left is not None:
            left.set()
        return "done"
    first, first_result = run_in_thread(lambda: share(first_may_leave, first_left))
    second, second_result = run_in_thread(lambda: share(second_may_leave))
    both_inside.wait()
    assert is_locked(path)
    first_may_leave.set()
    assert first_left.wait(10)
    assert is_locked(path)  # the second is still inside
    second_may_leave.set()
    first.join()
    second.join()
    assert first_result == second_result == {"value": "done"}
    assert not is_locked(path)


def test_a_shared_hold_of_a_lock_another_file_holds_is_busy(tmp_path):
    path = tmp_path / ".lock"
    fd = holder_fd(path)
    try:
        with pytest.raises(Busy, match="is held by"):
            with FileLock(path).hold(wait_s=0, what="run", threads_share=True):
                pass
    finally:
        os.close(fd)
    with FileLock(path).hold(wait_s=0, what="run", threads_share=True):
        assert is_locked(path)


def test_one_lock_per_file_however_it_is_named(tmp_path):
    (tmp_path / "sub").mkdir()
    assert FileLock.of(tmp_path / ".lock") is FileLock.of(tmp_path / "sub" / ".." / ".lock")
    assert FileLock.of(tmp_path / ".lock") is not FileLock.of(tmp_path / "sub" / ".lock")
    assert FileLock.of(tmp_path / ".lock").path == tmp_path / ".lock"


def test_the_registry_lock_and_the_run_lock_are_refused_while_another_file_holds_them(reg):
    fd = holder_fd(reg.root / ".lock")
    try:
        with pytest.raises(RegistryBusy, match=rf"^registry {re.escape(str(reg.root))} is held by"):
            with reg.locked(wait_s=0):
                pass
    finally:
        os.close(fd)
    with reg.locked(wait_s=0):
        assert is_locked(reg.root / ".lock") and not (reg.root / ".run.lock").exists()
    fd = holder_fd(reg.root / ".run.lock")
    threading.Timer(0.3, os.close, [fd]).start()
    # a second training run does not wait unless told: refused although the first ends soon
    with pytest.raises(RegistryBusy, match=rf"^a training run on {re.escape(str(reg.root))} \(nightly\) is held"):
        with reg.exclusive_run("nightly"):
            pass
    with reg.exclusive_run("nightly", wait_s=30):
        assert is_locked(reg.root / ".run.lock")
    assert not is_locked(reg.root / ".run.lock")


def test_a_registry_writer_waits_for_the_other_one_by_default(reg, new):
    a = new("a")
    fd = holder_fd(reg.root / ".lock")
    threading.Timer(0.3, os.close, [fd]).start()
    assert reg.promote(a)["bank_id"] == a


# -- registering ------------------------------------------------------------------------------
def test_a_registered_bank_is_moved_in_whole_with_its_record(reg, tmp_path):
    source = tmp_path / "fitted"
    bank_id = write_bank(source, "a")
    lineage = {"gates": PASSED, "data_hash": "d1", "params": {"k": [1, 2]}, "promoted_at": "yesterday"}
    assert reg.register(source, lineage) == bank_id
    assert not source.exists()
    assert sorted(p.name for p in reg.root.iterdir()) == [".lock", bank_id]  # no staging folder left
    assert sorted(p.name for p in (reg.root / bank_id).iterdir()) == ["lineage.json", "manifest.json",
                                                                       "memory_bank.npy"]
    record = json.loads((reg.root / bank_id / "lineage.json").read_text())
    assert record == {"gates": PASSED, "data_hash": "d1", "params": {"k": [1, 2]}, "bank_id": bank_id,
                      "created_at": OLD, "status_at_registration": "candidate"}
    assert reg.record(bank_id) == record and reg.exists(bank_id) and reg.bank_dir(bank_id) == reg.root / bank_id
    assert reg.status(bank_id) == "candidate" and reg.events(bank_id) == []


def test_a_bank_is_registered_as_rejected_when_its_gates_failed_or_when_told(reg, new, tmp_path):
    assert reg.record(new("a", gates=FAILED))["status_at_registration"] == "rejected"
    assert reg.record(new("b", status="rejected"))["status_at_registration"] == "rejected"
    assert reg.record(new("c", gates=None))["status_at_registration"] == "rejected"
    write_bank(tmp_path / "d", "d")
    d = reg.register(tmp_path / "d", {"gates": PASSED, "created_at": "2022-02-02T00:00:00+00:00"})
    assert reg.record(d)["created_at"] == "2022-02-02T00:00:00+00:00"  # the run's time wins over the manifest's
    write_bank(tmp_path / "e", "e")
    assert reg.record(reg.register(tmp_path / "e", {"gates": PASSED, "created_at": None}))["created_at"] == OLD
    assert reg.status(new("f", status="candidate", gates=FAILED)) == "rejected"  # its gates decide later


def test_a_bank_cannot_be_registered_as_production(reg, tmp_path):
    write_bank(tmp_path / "a", "a")
    with pytest.raises(RegistryError, match=r"registered as candidate or rejected, not 'production'"):
        reg.register(tmp_path / "a", {"gates": PASSED, "status": "production"})
    assert (tmp_path / "a" / "manifest.json").is_file() and reg.list() == []


def test_a_copied_bank_keeps_its_source_and_its_links(reg, tmp_path):
    source = tmp_path / "fitted"
    bank_id = write_bank(source, "a")
    (source / "alias.npy").symlink_to("memory_bank.npy")
    assert reg.register(source, {"gates": PASSED}, move=False) == bank_id
    assert (source / "manifest.json").is_file()
    assert (reg.root / bank_id / "alias.npy").is_symlink()
    # registered again, copied: an evaluation, and the source is still left alone
    assert reg.register(source, {"gates": FAILED}, move=False) == bank_id
    assert (source / "manifest.json").is_file() and [e["gates_passed"] for e in reg.events(bank_id)] == [False]


def test_the_default_registry_is_banks_in_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_bank(tmp_path / "fitted", "a")
    bank_id = Registry().register(tmp_path / "fitted", {"gates": PASSED})
    assert (tmp_path / "banks" / bank_id / "lineage.json").is_file()
    assert Registry(tmp_path / "banks").status(bank_id) == "candidate"
    deep = Registry(tmp_path / "not" / "yet" / "banks")  # the first registration makes it, parents too
    write_bank(tmp_path / "b", "b")
    assert deep.exists(deep.register(tmp_path / "b", {"gates": PASSED}))


def test_a_bank_is_staged_and_logged_inside_the_registry_wherever_tmpdir_points(reg, tmp_path, monkeypatch):
    # The staged bank is renamed into place, which only works on one file system: a registry on
    # its own disk must not depend on the system temporary folder (here: one that does not exist).
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))
    write_bank(tmp_path / "a", "a")
    write_bank(tmp_path / "b", "b")
    a = reg.register(tmp_path / "a", {"gates": PASSED})
    b = reg.register(tmp_path / "b", {"gates": PASSED}, move=False)
    reg.promote(a)
    reg.record_packaged(b, "tracebank:b")
    assert reg.production()["bank_id"] == a and reg.lineage(b)["model_tag"] == "tracebank:b"
    assert sorted(p.name for p in reg.root.iterdir()) == sorted([".lock", "PRODUCTION.json", "events",
                                                                 "promotions.jsonl", a, b])


def test_a_registration_that_fails_half_way_leaves_no_bank_and_no_staging(reg, tmp_path, monkeypatch):
    import pipeline.lifecycle.registry as registry_module

    write_bank(tmp_path / "a", "a")

    def refuse(path, obj):
        raise OSError("disk full")
    monkeypatch.setattr(registry_module, "write_json_atomic", refuse)
    with pytest.raises(OSError, match="disk full"):
        reg.register(tmp_path / "a", {"gates": PASSED}, move=False)
    assert [p.name for p in reg.root.iterdir()] == [".lock"]


def test_registering_a_bank_again_appends_an_evaluation_and_leaves_the_record(reg, tmp_path, new, monkeypatch):
    a = new("a", data_hash="d1", metrics={"pro": 0.8})
    record = (reg.root / a / "lineage.json").read_bytes()
    monkeypatch.setattr(ledger.getpass, "getuser", lambda: "ann")
    write_bank(tmp_path / "again", "a")
    run = {"gates": FAILED, "data_hash": "d2", "data_hash_kind": "dvc", "data_spec": "mtd:x", "git_commit": "c0",
           "git_dirty": False, "params": {"k": 1}, "metrics": {"pro": 0.5}, "threshold": {"value": 1.0},
           "operating_point": {"f1": 0.9}, "timings": {"fit_s": 1}, "evaluation_set": "test", "report": "r",
           "eval_files": 3, "fit": "full", "added_files": [], "status": "rejected", "unrelated": "dropped"}
    assert reg.register(tmp_path / "again", run) == a
    assert not (tmp_path / "again").exists()
    assert (reg.root / a / "lineage.json").read_bytes() == record
    [event] = reg.events(a)
    kept = {k: v for k, v in run.items() if k not in ("status", "unrelated")}
    assert {k: v for k, v in event.items() if k != "time"} == {"event": "evaluated", "user": "ann", "bank_id": a,
                                                                "gates_passed": False, **kept}
    assert before_or_now(event["time"])
    assert reg.verdict(a) == FAILED and reg.status(a) == "rejected"
    assert reg.record(a)["metrics"] == {"pro": 0.8}  # as registered
    event = reg.record_evaluation(a, {"metrics": {"pro": 0.9}})
    assert event["gates_passed"] is False and "gates" not in event
    assert reg.verdict(a) == FAILED  # an evaluation without gate results keeps the last ones
    assert reg.record_evaluation(a, {"gates": PASSED})["gates_passed"] is True
    assert reg.verdict(a) == PASSED and reg.status(a) == "candidate"
    assert [e["gates_passed"] for e in reg.events(a)] == [False, False, True]


def before_or_now(stamp):
    return to_time(stamp) <= dt.datetime.now(dt.UTC)


def test_the_events_file_of_a_bank_is_named_by_its_id_and_a_damaged_one_is_reported(reg, new):
    a = new("a")
    reg.record_packaged(a[:6], "tracebank:one")
    assert [e["model_tag"] for e in read_jsonl(reg.root / "events" / f"{a}.jsonl")] == ["tracebank:one"]
    (reg.root / "events" / f"{a}.jsonl").write_text("not json\n")
    with pytest.raises(RegistryError, match=r"line 1 is not JSON"):
        reg.events(a)


def test_a_damaged_record_is_reported(reg, new):
    a = new("a")
    (reg.root / a / "lineage.json").write_text("{")
    with pytest.raises(RegistryError, match=r"lineage.json is not JSON .*the bank's record is damaged"):
        reg.record(a)


# -- finding a bank ---------------------------------------------------------------------------
def test_a_bank_is_named_by_its_id_a_unique_prefix_or_production(reg, tmp_path):
    ids = {}
    for n in range(17):  # 17 ids: two share their first hex digit
        ids[write_bank(tmp_path / "in" / str(n), str(n))] = n
    first = sorted(ids)
    shared = next(x[0] for x, y in zip(first, first[1:], strict=False) if x[0] == y[0])
    for n in ids.values():
        reg.register(tmp_path / "in" / str(n), {"gates": PASSED})
    some = first[0]
    assert reg.resolve(some) == some and reg.resolve(some[:12]) == some
    pair = sorted(b for b in ids if b.startswith(shared))
    with pytest.raises(RegistryError, match=rf"bank prefix '{shared}' is ambiguous: {', '.join(pair)}"):
        reg.resolve(shared)
    with pytest.raises(RegistryError, match=r"no bank 'zzz' in .*`tracebank banks` lists them"):
        reg.resolve("zzz")
    with pytest.raises(RegistryError, match=r"no bank '' in"):
        reg.resolve("")
    with pytest.raises(RegistryError, match=r"no bank has been promoted to production yet"):
        reg.resolve("production")
    reg.promote(some)
    assert reg.resolve("production") == some and reg.bank_dir("production") == reg.root / some


def test_names_that_leave_the_registry_are_not_banks(reg, tmp_path, new):
    new("a")
    (reg.root.parent / "lineage.json").write_text("{}")  # a record one folder up
    (reg.root / "sub" / "x").mkdir(parents=True)
    (reg.root / "sub" / "x" / "lineage.json").write_text("{}")  # and one folder down
    for name in ("..", "sub/x", "."):
        with pytest.raises(RegistryError, match="no bank"):
            reg.resolve(name)


def test_only_bank_folders_are_listed(reg, new, tmp_path):
    a = new("a")
    (reg.root / "notes").mkdir()  # no record: not a bank
    (reg.root / "alias").symlink_to(reg.root / a)  # a link to a bank: not a second bank
    (reg.root / "stray.txt").write_text("")
    assert [row["bank_id"] for row in reg.list()] == [a]
    assert Registry(tmp_path / "nowhere").list() == []


def test_the_list_is_newest_first_with_each_banks_figures(reg, new):
    a = new("a", created_at="2021-01-01T00:00:00+00:00", metrics={"image_auroc": 0.9, "pro": 0.7}, data_hash="d1")
    b = new("b", created_at="2023-01-01T00:00:00+00:00", gates=FAILED)
    c = new("c", created_at="2022-01-01T00:00:00+00:00")
    reg.promote(a)
    reg.record_evaluation(c, {"gates": PASSED})
    rows = reg.list()
    assert [r["bank_id"] for r in rows] == [b, c, a]
    by_id = {r["bank_id"]: r for r in rows}
    assert by_id[a] == {"bank_id": a, "status": "production", "created_at": "2021-01-01T00:00:00+00:00",
                        "data_hash": "d1", "image_auroc": 0.9, "pro": 0.7,
                        "promoted_at": reg.production()["promoted_at"], "evaluations": 0}
    assert by_id[b] | {"bank_id": None} == {"bank_id": None, "status": "rejected", "created_at":
                                            "2023-01-01T00:00:00+00:00", "data_hash": None, "image_auroc": None,
                                            "pro": None, "promoted_at": None, "evaluations": 0}
    assert by_id[c]["evaluations"] == 1


def test_find_is_the_newest_bank_with_that_data_and_those_params(reg, new):
    params = {"coreset": {"ratio": 0.1}, "levels": (2, 3)}  # a tuple: compared as JSON, as stored
    assert reg.find("d1", params) is None
    a = new("a", created_at="2021-01-01T00:00:00+00:00", data_hash="d1", params=params)
    b = new("b", created_at="2022-01-01T00:00:00+00:00", data_hash="d1", params=params)
    new("c", created_at="2023-01-01T00:00:00+00:00", data_hash="d1", params={"coreset": {"ratio": 0.2}})
    new("d", created_at="2024-01-01T00:00:00+00:00", data_hash="d2", params=params)
    assert reg.find("d1", params) == b
    assert reg.find("d1", {"coreset": {"ratio": 0.1}, "levels": (2, 3, 4)}) is None
    assert reg.find(None, params) is None
    assert new("e", data_hash=None, params=params) and reg.find(None, params) is None
    # a later evaluation of a on new data: the newest run with that data is a's
    reg.record_evaluation(a, {"data_hash": "d3", "params": params})
    assert reg.find("d3", params) == a
    reg.record_evaluation(a, {"data_hash": "d1", "params": params})
    assert reg.find("d1", params) == a
    reg.record_packaged(b, "tag")  # not an evaluation: no run
    assert reg.find("d1", params) == a



def test_find_goes_by_registration_time_not_by_bank_id(reg, new):
    """Of two banks made from the same data and params, the one registered later is found,
    whichever id sorts first."""
    params = {"coreset": {"ratio": 0.1}}
    x = new("x", created_at="2021-01-01T00:00:00+00:00", data_hash="d1", params=params)
    y = new("y", created_at="2021-01-01T00:00:00+00:00", data_hash="d1", params=params)
    first, second = sorted([x, y])
    for bank, when in ((first, "2022-06-01T00:00:00+00:00"), (second, "2022-01-01T00:00:00+00:00")):
        path = reg.root / bank / "lineage.json"
        path.chmod(0o644)
        path.write_text(json.dumps(json.loads(path.read_text()) | {"created_at": when}))
    assert reg.find("d1", params) == first


# -- promotions -------------------------------------------------------------------------------
def test_promotions_are_logged_in_order_with_user_and_reason(reg, new, monkeypatch):
    a, b = new("a"), new("b")
    monkeypatch.setattr(ledger.getpass, "getuser", lambda: "login")
    pointer = reg.promote(a, reason="gates")
    assert (pointer["bank_id"], pointer["previous"], pointer["promoted_by"], pointer["reason"]) == (a, None, "login",
                                                                                                   "gates")
    assert pointer["seq"] == 1
    pointer = reg.promote(b[:5], by="ann")
    assert (pointer["bank_id"], pointer["previous"], pointer["history"], pointer["seq"]) == (b, a, [a], 2)
    log = reg.history()
    assert [(e["seq"], e["user"], e["from"], e["to"], e["reason"]) for e in log] == [
        (1, "login", None, a, "gates"), (2, "ann", a, b, "manual")]
    assert to_time(log[0]["time"]) <= to_time(log[1]["time"])
    assert json.loads((reg.root / "PRODUCTION.json").read_text()) == reg.production() == pointer
    assert reg.history(a) == log and reg.history(b) == log[1:]


def test_promoting_the_production_bank_changes_nothing(reg, new):
    a = new("a")
    pointer = reg.promote(a)
    log = (reg.root / "promotions.jsonl").read_bytes()
    again = reg.promote(a)
    assert again == pointer | {"unchanged": True}
    assert (reg.root / "promotions.jsonl").read_bytes() == log


def test_a_bank_whose_latest_gates_failed_is_promoted_only_by_force(reg, new):
    a, b = new("a", gates=FAILED), new("b", gates={"passed": False})
    with pytest.raises(RegistryError, match=rf"^bank {a} cannot be promoted: pro >= 0.7 failed \(got 0.5\)$"):
        reg.promote(a)
    with pytest.raises(RegistryError, match=r"cannot be promoted: it has no passing gate results"):
        reg.promote(b)
    c = new("c", gates={})
    with pytest.raises(RegistryError, match=r"cannot be promoted: it has no passing gate results"):
        reg.promote(c)
    two = new("two", gates={"passed": False, "failures": ["pro >= 0.7 failed (got 0.5)",
                                                         "image_auroc >= 0.9 failed (got 0.8)"]})
    with pytest.raises(RegistryError, match=rf"^bank {two} cannot be promoted: pro >= 0.7 failed \(got 0.5\); "
                                            r"image_auroc >= 0.9 failed \(got 0.8\)$"):
        reg.promote(two)
    assert reg.production() is None
    assert reg.promote(a, force=True, by="ann")["reason"] == "forced"
    assert reg.promote(new("d"), force=True)["reason"] == "manual"  # its gates passed: nothing forced
    with pytest.raises(ValueError, match=r"promotion reason must be one of gates, manual, rollback, forced, got 'x'"):
        reg.promote(a, reason="x")
    for reason in ("gates", "rollback", "forced"):
        assert reg.promote(new(reason), reason=reason)["reason"] == reason


def test_a_bank_with_a_changed_file_is_not_promoted_nor_rolled_back_to(reg, new):
    a, b = new("a"), new("b")
    (reg.root / a / "memory_bank.npy").write_bytes(b"changed")
    with pytest.raises(RegistryError, match=rf"bank {a} is corrupt and cannot be promoted: memory_bank.npy sha256 "
                                            "mismatch; restore "):
        reg.promote(a)
    (reg.root / a / "memory_bank.npy").write_bytes(b"memory bank of a")
    reg.promote(a)
    reg.promote(b)
    (reg.root / a / "memory_bank.npy").write_bytes(b"changed")
    with pytest.raises(RegistryError, match=rf"previous production bank {a} is corrupt, not rolled back: "
                                            "memory_bank.npy sha256 mismatch"):
        reg.rollback()
    assert reg.production()["bank_id"] == b and len(reg.history()) == 2


def test_rollback_returns_to_the_previous_different_bank_and_says_when_there_is_none(reg, new):
    with pytest.raises(NoEarlierBank, match=r"^there is no production bank to roll back from$"):
        reg.rollback()
    a, b, c = new("a"), new("b"), new("c")
    reg.promote(a)
    with pytest.raises(NoEarlierBank, match=rf"no previous production bank to roll back to: {a} is the only bank"):
        reg.rollback()
    reg.promote(b)
    reg.promote(c)
    pointer = reg.rollback(by="ann")
    assert (pointer["bank_id"], pointer["history"], pointer["rolled_back"], pointer["promoted_by"]) == (b, [a], [c],
                                                                                                       "ann")
    assert log_of(reg)[-1] == (c, b, "rollback")
    assert reg.rollback()["bank_id"] == a
    with pytest.raises(NoEarlierBank):
        reg.rollback()


def test_rollback_skips_earlier_entries_of_the_production_bank_itself(reg, new, tmp_path):
    a, b = new("a"), new("b")
    # an old log where b was promoted over itself: stack a b b, history b a
    write_log(reg, [(None, a, "manual"), (a, b, "manual"), (b, b, "manual")])
    assert reg.rollback()["bank_id"] == a
    solo = Registry(tmp_path / "solo")
    write_bank(tmp_path / "in-solo", "a")
    solo.register(tmp_path / "in-solo", {"gates": PASSED})
    write_log(solo, [(None, a, "manual"), (a, a, "manual")])  # a over a: no different bank before it
    with pytest.raises(NoEarlierBank, match=f"{a} is the only bank"):
        solo.rollback()


def test_production_at_a_time_is_the_pointer_as_it_was_then(reg, new):
    a, b = new("a"), new("b")
    write_log(reg, [(None, a, "manual"), (a, b, "manual"), (b, a, "rollback")])
    assert reg.production("2021-01-01T00:00:00+00:00") is None
    assert reg.production("2021-01-01T00:00:01+00:00")["bank_id"] == a  # at the moment it was promoted
    assert reg.production("2021-01-01T00:00:02")["bank_id"] == b
    assert reg.production(dt.datetime(2021, 1, 1, 0, 0, 2, 500000, tzinfo=dt.UTC))["bank_id"] == b
    assert reg.production()["bank_id"] == a
    assert reg.status(b, "2021-01-01T00:00:02+00:00") == "production"
    assert reg.status(b, "2021-01-01T00:00:01+00:00") == "candidate"
    assert reg.status(a, "2021-01-01T00:00:02+00:00") == "retired"
    assert reg.status(b) == "rolled back" and reg.status(a) == "production"


def test_status_and_lineage_at_a_time_use_only_what_had_happened(reg, new, monkeypatch):
    stamps = iter(f"2021-01-01T00:00:{s:02d}+00:00" for s in range(1, 60))
    import pipeline.lifecycle.registry as registry_module

    monkeypatch.setattr(registry_module, "now", lambda: next(stamps))
    monkeypatch.setattr(ledger.getpass, "getuser", lambda: "ann")
    a, b = new("a"), new("b")
    reg.promote(a)  # :01
    reg.record_evaluation(a, {"gates": FAILED, "data_hash": "d2"})  # :02
    reg.promote(b)  # :03
    reg.record_packaged(a, "tag:1")  # :04
    reg.rollback(by="bob")  # :05, back to a
    reg.record_packaged(a, "tag:2")  # :06
    reg.record_evaluation(b, {"gates": FAILED})  # :07
    assert reg.status(a) == "production" and reg.status(b) == "rolled back"
    assert reg.status(b, "2021-01-01T00:00:02+00:00") == "candidate"
    assert reg.status(a, "2021-01-01T00:00:03+00:00") == "retired"
    c = new("c")
    reg.record_evaluation(c, {"gates": FAILED})  # :08
    assert reg.status(c, "2021-01-01T00:00:07+00:00") == "candidate"  # before its failing evaluation
    assert reg.status(c, "2021-01-01T00:00:08+00:00") == "rejected"

    now = reg.lineage(a)
    assert now["status"] == "production" and now["status_at_registration"] == "candidate"
    assert now["promoted_at"] == "2021-01-01T00:00:05+00:00" and now["promoted_by"] == "bob"
    assert now["model_tag"] == "tag:2" and [e["data_hash"] for e in now["evaluations"]] == ["d2"]
    assert now["gates"] == PASSED  # the record as registered
    assert [(e["time"][-8:-6], e["event"]) for e in now["history"]] == [
        ("00", "registered"), ("01", "promoted"), ("02", "evaluated"), ("03", "retired"), ("04", "packaged"),
        ("05", "returned by rollback"), ("06", "packaged")]
    assert now["history"][0] == {"time": OLD, "event": "registered", "status": "candidate"}
    assert now["history"][2] == {"time": "2021-01-01T00:00:02+00:00", "event": "evaluated", "gates_passed": False,
                                 "data_hash": "d2"}
    assert now["history"][3] == {"time": "2021-01-01T00:00:03+00:00", "event": "retired", "by": "ann",
                                 "reason": "manual", "from": a, "to": b}
    assert now["history"][4] == {"time": "2021-01-01T00:00:04+00:00", "event": "packaged", "model_tag": "tag:1"}
    assert now["history"][5] | {"time": None} == {"time": None, "event": "returned by rollback", "by": "bob",
                                                  "reason": "rollback", "from": b, "to": a}

    then = reg.lineage(a, "2021-01-01T00:00:04+00:00")
    assert then["status"] == "retired" and "promoted_at" not in then and then["model_tag"] == "tag:1"
    assert [e["event"] for e in then["history"]] == ["registered", "promoted", "evaluated", "retired", "packaged"]
    assert len(then["evaluations"]) == 1
    early = reg.lineage(a, "2021-01-01T00:00:01+00:00")
    assert early["promoted_at"] == "2021-01-01T00:00:01+00:00" and early["evaluations"] == []
    assert [e["event"] for e in early["history"]] == ["registered", "promoted"]  # at that moment, included
    assert "model_tag" not in early
    of_b = reg.lineage(b)
    assert [e["event"] for e in of_b["history"]] == ["registered", "promoted", "rolled back", "evaluated"]
    assert of_b["status"] == "rolled back" and "promoted_at" not in of_b


def test_a_bank_registered_with_no_gate_results_keeps_its_recorded_status(reg, tmp_path):
    write_bank(tmp_path / "a", "a")
    a = reg.register(tmp_path / "a", {"status": "candidate"})
    (reg.root / a / "lineage.json").write_text(json.dumps({"bank_id": a, "status": "retired-by-hand"}))
    assert reg.status(a) == "retired-by-hand"
    (reg.root / a / "lineage.json").write_text(json.dumps({"bank_id": a}))
    assert reg.status(a) == "candidate"


def test_a_record_written_without_its_registration_status_or_time(reg, new):
    # Records from before `status_at_registration` and `created_at` were written: the status
    # recorded is the one at registration, and a record without a time counts as the oldest.
    a, b, c = new("a"), new("b", created_at="2022-01-01T00:00:00+00:00", data_hash="d1", params={"k": 1}), new("c")
    (reg.root / a / "lineage.json").write_text(json.dumps({"bank_id": a, "status": "rejected", "data_hash": "d1",
                                                           "params": {"k": 1}}))
    (reg.root / c / "lineage.json").write_text(json.dumps({"bank_id": c}))
    reg.record_evaluation(a, {"gates": PASSED})  # re-evaluated since, and passed
    lineage = reg.lineage(a)
    assert (lineage["status"], lineage["status_at_registration"]) == ("candidate", "rejected")
    assert [(e["event"], e.get("status")) for e in lineage["history"]] == [("registered", "rejected"),
                                                                          ("evaluated", None)]
    assert lineage["history"][0] == {"time": None, "event": "registered", "status": "rejected"}
    # no status recorded at all: registered as what it is, a candidate with no gate results
    assert reg.lineage(c)["history"] == [{"time": None, "event": "registered", "status": "candidate"}]
    assert reg.list()[0]["bank_id"] == b and {r["bank_id"] for r in reg.list()[1:]} == {a, c}  # undated last
    assert reg.find("d1", {"k": 1}) == b  # the dated bank is the newer one


# -- a registry from before the promotion log ---------------------------------------------------
def test_a_pointer_without_a_log_is_read_as_its_history_and_kept_by_the_next_promotion(reg, new):
    a, b, c = new("a"), new("b"), new("c")
    (reg.root / "PRODUCTION.json").write_text(json.dumps({"bank_id": b, "history": [a], "promoted_at": "2021-05-05",
                                                          "promoted_by": "ann"}))
    log = reg.promotions()
    assert [(e["seq"], e["time"], e["user"], e["from"], e["to"], e["reason"]) for e in log] == [
        (1, "1970-01-01T00:00:00+00:00", None, None, a, "manual"), (2, "2021-05-05", "ann", a, b, "manual")]
    assert log[0]["note"] == "from PRODUCTION.json (written before promotions.jsonl)"
    assert not (reg.root / "promotions.jsonl").exists()
    assert reg.production()["bank_id"] == b and reg.status(a) == "retired"
    pointer = reg.promote(c)
    assert (pointer["bank_id"], pointer["history"], pointer["seq"]) == (c, [b, a], 3)
    assert [e["to"] for e in read_jsonl(reg.root / "promotions.jsonl")] == [a, b, c]


def test_a_rollback_on_a_pointer_without_a_log_keeps_the_pointers_history(reg, new):
    a, b = new("a"), new("b")
    (reg.root / "PRODUCTION.json").write_text(json.dumps({"bank_id": b, "history": [a], "promoted_at": "2021-05-05",
                                                          "promoted_by": "ann"}))
    pointer = reg.rollback(by="bob")
    assert (pointer["bank_id"], pointer["rolled_back"], pointer["seq"]) == (a, [b], 3)
    assert [(e["from"], e["to"], e["reason"]) for e in read_jsonl(reg.root / "promotions.jsonl")] == [
        (None, a, "manual"), (a, b, "manual"), (b, a, "rollback")]
    assert reg.status(b) == "rolled back"


def test_a_pointer_without_history_or_time(reg, new):
    a = new("a")
    (reg.root / "PRODUCTION.json").write_text(json.dumps({"bank_id": a}))
    [entry] = reg.promotions()
    assert (entry["time"], entry["user"], entry["from"], entry["to"]) == ("1970-01-01T00:00:00+00:00", None, None, a)


@pytest.mark.parametrize("text", ["{", '{"history": []}', '{"bank_id": "x", "history": 3}', "[1]"])
def test_a_damaged_pointer_is_reported_and_force_starts_a_new_log(reg, new, text):
    a = new("a")
    (reg.root / "PRODUCTION.json").write_text(text)
    with pytest.raises(RegistryError, match=r"PRODUCTION.json is not a production pointer .*`tracebank promote "
                                            r"--force BANK` writes a new one"):
        reg.production()
    with pytest.raises(RegistryError, match="is not a production pointer"):
        reg.promote(a)
    pointer = reg.promote(a, force=True)
    assert (pointer["bank_id"], pointer["history"], pointer["seq"]) == (a, [], 1)
    assert [e["to"] for e in read_jsonl(reg.root / "promotions.jsonl")] == [a]


# -- a damaged pointer beside a whole log (issue 29, finding 5) ---------------------------------
def pointer_of(reg):
    return json.loads((reg.root / "PRODUCTION.json").read_text())


def test_a_pointer_the_log_replays_or_one_left_behind_by_a_kill_is_trusted(reg, new):
    a, b = new("a"), new("b")
    reg.promote(a)
    assert reg.pointer_problem() is None
    behind = pointer_of(reg)
    reg.promote(b)
    (reg.root / "PRODUCTION.json").write_text(json.dumps(behind))  # killed between the log and the pointer
    assert reg.pointer_problem() is None and reg.production()["bank_id"] == b  # the log wins
    (reg.root / "PRODUCTION.json").write_text(json.dumps({"bank_id": b}))  # no seq: only the latest
    assert reg.pointer_problem() is None
    (reg.root / "PRODUCTION.json").write_text(json.dumps({"bank_id": a}))
    assert "names bank" in reg.pointer_problem()
    (reg.root / "PRODUCTION.json").unlink()  # the first promotion killed before the pointer: the log says
    assert reg.pointer_problem() is None and reg.production()["bank_id"] == b


@pytest.mark.parametrize(("text", "why"), [
    ('{"bank_id": "ab', "is damaged: not JSON (Unterminated string"),
    ("[]", "is damaged: not a production pointer (no bank id)"),
    ('{"history": []}', "is damaged: not a production pointer (no bank id)"),
    ('{"bank_id": 7, "seq": 1}', "is damaged: not a production pointer (no bank id)"),
    (b"\xff\xfe", "is damaged: not JSON"),
    ("BANK_A 2", "is damaged: it names bank BANK_A (entry 2), which the promotion log did not make production "
                 "there, so it was edited by hand"),
    ("BANK_B 1", "is damaged: it names bank BANK_B (entry 1), which the promotion log did not make production"),
    ("BANK_X 5", "is damaged: it names bank BANK_X (entry 5)"),
])
def test_a_damaged_pointer_beside_a_whole_log_is_refused_naming_the_file_and_the_repair(reg, new, text, why):
    a, b = new("a"), new("b")
    reg.promote(a)
    reg.promote(b)
    if isinstance(text, str) and text.startswith("BANK_"):
        name, seq = text.split()
        text = json.dumps({"bank_id": {"BANK_A": a, "BANK_B": b, "BANK_X": "x" * 16}[name], "seq": int(seq)})
        why = why.replace("BANK_A", a).replace("BANK_B", b).replace("BANK_X", "x" * 16)
    path = reg.root / "PRODUCTION.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    fix = f"; the promotion log makes {b} production: `tracebank promote --force {b}` rewrites the pointer from it"
    assert reg.pointer_problem().startswith(f"{path} {why}") and fix in reg.pointer_problem()
    for refused in (reg.production, reg.rollback, lambda: reg.promote(a), lambda: reg.resolve("production")):
        with pytest.raises(RegistryError, match=re.escape(f"{path} is damaged")):
            refused()
    # the records still read from the log: the statuses, the lineage, the past
    assert (reg.from_log()["bank_id"], reg.status(b), reg.status(a)) == (b, "production", "retired")
    assert reg.lineage(b)["promoted_at"] == reg.history()[-1]["time"] and reg.production(at=dt.datetime.now(dt.UTC))
    assert path.read_bytes() == (text if isinstance(text, bytes) else text.encode())  # reading changes nothing


def test_promote_force_of_the_production_bank_rewrites_a_damaged_pointer_as_a_repair_entry(reg, new):
    a, b = new("a"), new("b")
    reg.promote(a)
    before = reg.promote(b)
    (reg.root / "PRODUCTION.json").write_text("[]")
    repaired = reg.promote(b, force=True, by="ann")
    assert repaired.pop("repaired") is True and repaired == before  # no bank moved: the same pointer as before
    assert pointer_of(reg) == before and reg.pointer_problem() is None
    entry = reg.history()[-1]
    assert (entry["seq"], entry["user"], entry["from"], entry["to"], entry["reason"]) == (3, "ann", b, b, "repair")
    assert entry["note"] == f"over a damaged PRODUCTION.json: {reg.root / 'PRODUCTION.json'} is damaged: not a " \
        f"production pointer (no bank id); the promotion log makes {b} production: `tracebank promote --force " \
        f"{b}` rewrites the pointer from it (a repair entry in the log)"
    assert [e["event"] for e in reg.lineage(b)["history"]][-2:] == ["promoted", "pointer repaired"]
    assert reg.promote(b) == before | {"unchanged": True}  # whole again: nothing to repair
    assert reg.rollback()["bank_id"] == a  # the repair is no step of the stack: back to a, not to b
    assert reg.status(b) == "rolled back"


def test_promote_force_of_another_bank_over_a_damaged_pointer_continues_the_log(reg, new):
    a, b, c = new("a"), new("b"), new("c", gates=FAILED)
    reg.promote(a)
    (reg.root / "PRODUCTION.json").write_text("{")
    with pytest.raises(RegistryError, match="is damaged"):
        reg.promote(b)  # without --force the damage is reported, nothing is written
    assert len(reg.history()) == 1
    pointer = reg.promote(b, force=True)
    assert (pointer["bank_id"], pointer["previous"], pointer["seq"], pointer["reason"]) == (b, a, 2, "manual")
    assert reg.history()[-1]["note"].startswith("over a damaged PRODUCTION.json: ")
    (reg.root / "PRODUCTION.json").write_text("{")
    assert reg.promote(c, force=True)["reason"] == "forced"  # its gates failed: forced, as ever
    assert "note" not in reg.promote(a, force=True) and "note" not in reg.history()[-1]  # a whole pointer


def test_a_corrupt_bank_is_not_repaired_to_and_a_damaged_log_is_not_repaired(reg, new):
    a = new("a")
    reg.promote(a)
    (reg.root / "PRODUCTION.json").write_text("{")
    (reg.root / a / "memory_bank.npy").write_bytes(b"changed")
    with pytest.raises(RegistryError, match=f"bank {a} is corrupt and cannot be promoted: memory_bank.npy sha256"):
        reg.promote(a, force=True)
    assert len(reg.history()) == 1
    (reg.root / "promotions.jsonl").write_text('{"seq": 1, "time": "2021-01-01T00:00:00+00:00"}\n')
    with pytest.raises(RegistryError, match=r"promotions.jsonl: entry 1 is not a promotion \(no bank it promoted"):
        reg.promote(a, force=True)


@pytest.mark.parametrize(("entry", "why"), [
    ({"seq": 2, "time": "2021-01-01T00:00:02+00:00"}, "no bank it promoted ('to')"),
    ({"seq": 2, "time": "2021-01-01T00:00:02+00:00", "to": ""}, "no bank it promoted ('to')"),
    ({"seq": 2, "time": "2021-01-01T00:00:02+00:00", "to": 5}, "no bank it promoted ('to')"),
    ({"seq": 2, "to": "b"}, "'time'"),
    ({"seq": 2, "to": "b", "time": "yesterday"}, "Invalid isoformat string"),
    ({"seq": 2, "to": "b", "time": 5}, ""),  # TypeError, worded by Python
])
def test_a_promotion_log_entry_without_its_bank_or_time_is_refused(reg, entry, why):
    write_log(reg, [(None, "a", "manual")])
    append_jsonl(reg.root / "promotions.jsonl", entry)
    with pytest.raises(RegistryError, match=rf"promotions.jsonl: entry 2 is not a promotion \({re.escape(why)}.*\); "
                                            "the log was edited by hand or the disk is damaged: restore it"):
        reg.history()


def test_a_record_that_is_not_an_object_is_refused(reg, new):
    a = new("a")
    (reg.root / a / "lineage.json").write_text("[]")
    with pytest.raises(RegistryError, match=r"lineage.json is not a JSON object: the bank's record is damaged"):
        reg.record(a)
    (reg.root / a / "lineage.json").write_bytes(b"\xff")
    with pytest.raises(RegistryError, match=r"lineage.json is not JSON \(.*\): the bank's record is damaged"):
        reg.record(a)


# -- a bank's files against its manifest (issue 29, finding 7) -----------------------------------
def edited(folder, **changes):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del manifest[key]
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(("damage", "why"), [
    (lambda f: (f / "manifest.json").unlink(), "manifest.json missing"),
    (lambda f: (f / "manifest.json").write_text("{"), "manifest.json is not JSON"),
    (lambda f: (f / "manifest.json").write_bytes(b"\xff"), "manifest.json is not JSON"),
    (lambda f: (f / "manifest.json").write_text("[]"), "manifest.json is not a JSON object"),
    (lambda f: edited(f, format="tracebank-bank/9"), "manifest.json has format 'tracebank-bank/9', not one this "
                                                     "version reads"),
    (lambda f: edited(f, files=None), "manifest.json lists no files with their sha256"),
    (lambda f: edited(f, files={}), "manifest.json lists no files with their sha256"),
    (lambda f: edited(f, files=["memory_bank.npy"]), "manifest.json lists no files with their sha256"),
    (lambda f: edited(f, files={"memory_bank.npy": 5}), "manifest.json lists no files with their sha256"),
    (lambda f: edited(f, files={"../lineage.json": "0" * 64}), "manifest.json names '../lineage.json', not a file "
                                                               "of the bank"),
    (lambda f: edited(f, files={"..": "0" * 64}), "manifest.json names '..', not a file of the bank"),
    (lambda f: (f / "memory_bank.npy").unlink(), "memory_bank.npy missing"),
    (lambda f: (f / "memory_bank.npy").write_bytes(b"memory bank of b"), "memory_bank.npy sha256 mismatch"),
    (lambda f: edited(f, backbone=None), "manifest.json is incomplete (no 'backbone')"),
    (lambda f: edited(f, created_at="2030"), None),  # outside the bank's identity: still whole
    (lambda f: edited(f, params={"features": {"x": 1}}), "manifest.json was edited: its contents do not match bank "
                                                          "id BANK"),
])
def test_bank_problem_names_what_is_wrong_in_a_few_words(tmp_path, damage, why):
    folder = tmp_path / "bank"
    bank_id = write_bank(folder, "a")
    assert bank_problem(folder) is None and verified_manifest(folder, "bank a")["bank_id"] == bank_id
    damage(folder)
    why = why and why.replace("BANK", bank_id)
    assert bank_problem(folder) == why
    if why is not None:
        with pytest.raises(BankError, match=re.escape(f"production copy in {folder} is corrupt: {why}; do not use "
                                                      "it: restore the folder from a backup, or promote another")):
            verified_manifest(folder, "production copy")


def test_the_list_says_which_bank_is_corrupt_when_asked_to_verify(reg, new):
    a, b = new("a"), new("b")
    reg.promote(a)
    (reg.root / a / "memory_bank.npy").write_bytes(b"changed")
    rows = {r["bank_id"]: r for r in reg.list(verify=True)}
    assert (rows[a]["problem"], rows[a]["status"], rows[b]["problem"]) == ("memory_bank.npy sha256 mismatch",
                                                                           "production", None)
    assert all("problem" not in r for r in reg.list())  # not hashed unless asked

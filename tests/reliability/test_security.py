"""What a user can hand us is never unpickled or executed, and imports stay in their root."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.data.datasets import DatasetError
from pipeline.data.importer import safe_join
from tests.conftest import REPO

SHIPPED = [p for d in ("pipeline", "serving", "flows") for p in sorted((REPO / d).rglob("*.py"))]
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return ast.literal_eval(kw.value) if isinstance(kw.value, ast.Constant) else "not a constant"
    return None


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_no_pickle_no_eval_and_torch_load_only_with_weights_only(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & UNSAFE_MODULES, ast.unparse(node)
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in UNSAFE_MODULES, ast.unparse(node)
    for call, name in _calls(tree):
        where = f"{path.name}:{call.lineno}"
        assert name not in ("eval", "exec"), where
        if name.endswith("torch.load"):
            assert _keyword(call, "weights_only") is True, f"{where}: torch.load without weights_only=True"
        if name in ("np.load", "numpy.load"):
            assert _keyword(call, "allow_pickle") in (None, False), f"{where}: np.load with allow_pickle"


def test_the_scan_sees_every_shipped_module():
    names = {p.relative_to(REPO).as_posix() for p in SHIPPED}
    expected = {"pipeline/patchcore/bank.py", "pipeline/patchcore/backbone.py", "serving/service.py", "flows/train.py"}
    assert expected <= names


def test_import_refuses_paths_that_escape_the_data_root(tmp_path):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert safe_join(root, "train", "good", "a.png") == (root / "train" / "good" / "a.png").resolve()
    with pytest.raises(DatasetError, match="outside the data root"):
        safe_join(root, "..", "elsewhere", "a.png")
    with pytest.raises(DatasetError, match="outside the data root"):
        safe_join(root, "/etc/passwd")
    (root / "test").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DatasetError, match="outside the data root"):
        safe_join(root, "test", "good", "a.png")

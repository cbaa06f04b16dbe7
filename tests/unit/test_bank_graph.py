"""A bank carries the ONNX graph of its embedding: scoring it needs no torch, and scores as
the eager model it was fitted with, on real MTD tiles (pipeline/patchcore/bank.py, runtime.py)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pipeline.data.datasets import load_images
from pipeline.patchcore.bank import BankError, bank_id_of, load_bank, read_manifest, save_bank
from pipeline.patchcore.runtime import GRAPH_FILE, GraphExtractor
from tests.conftest import REPO

#: The bank's graph against the eager model it was fitted with: image scores and map values
#: agree to this relative tolerance (observed ~1e-6: float rounding of fused convolutions).
SCORE_RTOL = 1e-3

#: Makes ``import torch`` (and timm, torchvision) fail in a subprocess, as in an environment
#: without them (tests/integration/test_deployment.py runs one for real).
NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "timm", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
"""


@pytest.fixture(scope="module")
def bank(tmp_path_factory, small_mtd_model):
    path = tmp_path_factory.mktemp("graph") / "bank"
    save_bank(path, small_mtd_model, training={"spec": "mtd", "files": []}, threshold={"value": 2.0, "method": "t"})
    return path


@pytest.fixture(scope="module")
def tiles(mtd_dataset):
    """16 real test tiles, good and defective."""
    return [img for _, img, _ in load_images(mtd_dataset.subset(None, 16, seed=3).test)]


def test_the_banks_graph_scores_as_the_eager_model_it_was_fitted_with(bank, small_mtd_model, tiles):
    model, manifest = load_bank(bank)
    assert isinstance(model.extractor, GraphExtractor) and manifest["format"] == "tracebank-bank/3"
    assert small_mtd_model.features.runtime == "torch"  # the fit ran eagerly
    got, ref = model.predict(tiles), small_mtd_model.predict(tiles)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=SCORE_RTOL)
    np.testing.assert_array_equal(np.argsort(got.scores), np.argsort(ref.scores))
    for a, b in zip(got.maps, ref.maps, strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() <= SCORE_RTOL * np.abs(b).max()
    eager, _ = load_bank(bank, runtime="torch")  # the backbone rebuilt, as fitting does
    assert eager.extractor.onnx is None
    np.testing.assert_allclose(eager.predict(tiles, maps=False).scores, ref.scores, rtol=1e-6)


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", NO_TORCH + code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_loading_and_scoring_a_bank_import_no_torch(bank, tiles, tmp_path):
    np.savez(tmp_path / "tiles.npz", *tiles[:4])
    proc = _run(
        "import json, sys\n"
        "import numpy as np\n"
        "import pipeline.cli, pipeline.lifecycle.inspection\n"
        "from pipeline.patchcore.bank import load_bank\n"
        "model, _ = load_bank(sys.argv[1])\n"
        "with np.load(sys.argv[2]) as saved:\n"
        "    scores = model.predict([saved[k] for k in sorted(saved.files, key=lambda k: int(k[4:]))]).scores\n"
        "print(json.dumps({'scores': scores.tolist(), 'loaded': sorted(m for m in ('torch', 'timm', 'onnx') "
        "if m in sys.modules)}))\n",
        str(bank), str(tmp_path / "tiles.npz"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["loaded"] == []
    model, _ = load_bank(bank)
    np.testing.assert_allclose(out["scores"], model.predict(tiles[:4], maps=False).scores, rtol=1e-5)


def test_a_changed_graph_is_refused_naming_the_file(bank, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bank, copy)
    data = bytearray((copy / GRAPH_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights
    (copy / GRAPH_FILE).write_bytes(bytes(data))
    with pytest.raises(BankError, match=r"embedding\.onnx has sha256 .* but the manifest records"):
        load_bank(copy)
    manifest = json.loads((copy / "manifest.json").read_text())  # the graph's hash is part of the bank id
    manifest["files"][GRAPH_FILE] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert bank_id_of(manifest) != manifest["bank_id"]
    (copy / GRAPH_FILE).unlink()
    with pytest.raises(BankError, match=r"embedding\.onnx is missing"):
        read_manifest(copy)


def test_saving_the_same_model_twice_gives_the_same_graph_and_id(bank, small_mtd_model, tmp_path):
    again = save_bank(tmp_path / "again", small_mtd_model, training={"spec": "mtd", "files": []})
    assert again["files"][GRAPH_FILE] == read_manifest(bank)["files"][GRAPH_FILE]
    assert again["bank_id"] == read_manifest(bank)["bank_id"]


@pytest.fixture(scope="module")
def old_bank(bank, tmp_path_factory):
    """The bank as written before banks carried their graph (format /2, no embedding.onnx)."""
    path = tmp_path_factory.mktemp("old") / "bank"
    shutil.copytree(bank, path)
    (path / GRAPH_FILE).unlink()
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"][GRAPH_FILE]
    manifest["format"] = "tracebank-bank/2"
    manifest["bank_id"] = bank_id_of(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_an_old_bank_without_a_graph_runs_from_its_backbone_where_torch_is(old_bank, small_mtd_model, tiles):
    model, _ = load_bank(old_bank)
    assert not isinstance(model.extractor, GraphExtractor)
    np.testing.assert_allclose(model.predict(tiles[:4], maps=False).scores,
                               small_mtd_model.predict(tiles[:4], maps=False).scores, rtol=1e-6)


def test_an_old_bank_without_a_graph_is_refused_clearly_without_torch(old_bank):
    proc = _run("import sys\nfrom pipeline.patchcore.bank import BankError, load_bank\n"
                "try:\n    load_bank(sys.argv[1])\nexcept BankError as exc:\n    print(exc)\n", str(old_bank))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "needs torch and timm, which are not installed" in proc.stdout
    assert "tracebank-bank/2 bank, written before banks carried the ONNX graph" in proc.stdout
    assert "tracebank fit --extend" in proc.stdout


def test_the_commands_that_do_not_fit_run_without_torch(bank, tiles, tmp_path):
    """`banks`, `lineage`, `promote`, `history`, `rollback`, `predict` and `audit` work where
    torch and timm cannot be imported, and load neither."""
    from PIL import Image

    from pipeline.lifecycle.audit import AuditLog
    from pipeline.lifecycle.registry import Registry

    registry = Registry(tmp_path / "banks")
    shutil.copytree(bank, tmp_path / "incoming")
    bank_id = registry.register(tmp_path / "incoming", {"gates": {"passed": True, "failures": []}})
    image = tmp_path / "tile.png"
    Image.fromarray(tiles[0]).save(image)
    db = tmp_path / "decisions.sqlite"
    assert AuditLog(db).count() == 0
    runs = {
        "banks": ["banks"], "lineage": ["lineage", bank_id], "promote": ["promote", bank_id],
        "history": ["history"], "rollback": ["rollback"], "predict": ["predict", "production", str(image)],
        "audit": ["audit", "--db", str(db)],
    }
    code = (  # one process, as the import is what costs: each command's exit code and output
        "import contextlib, io, json, sys\nfrom pipeline.cli import main\nout = {}\n"
        "for name, argv in json.loads(sys.argv[1]).items():\n"
        "    printed = io.StringIO()\n"
        "    with contextlib.redirect_stdout(printed):\n"
        "        rc = main(argv)\n"
        "    out[name] = [rc, printed.getvalue()]\n"
        "print(json.dumps({'runs': out, 'loaded': sorted(m for m in ('torch', 'timm') if m in sys.modules)}))\n")
    argvs = {name: [*argv, *([] if name == "audit" else ["--registry", str(registry.root)]), "--json"]
             for name, argv in runs.items()}
    proc = _run(code, json.dumps(argvs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    for name, (rc, printed) in result["runs"].items():
        expected = 1 if name == "rollback" else 0  # no earlier production bank to go back to
        assert rc == expected, f"{name}: {printed[-1500:]}"
    outputs = {name: printed.splitlines() for name, (_, printed) in result["runs"].items()}
    assert json.loads(outputs["promote"][0])["bank_id"] == bank_id
    (answer,) = json.loads(outputs["predict"][0])["results"]
    model, _ = load_bank(registry.root / bank_id)
    assert answer["score"] == pytest.approx(float(model.predict([tiles[0]], maps=False).scores[0]), rel=1e-5)

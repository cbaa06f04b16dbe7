"""serving/requirements.txt, what the Bento installs, is derived from pyproject.toml's serving extra."""

import subprocess
import sys

from tests.conftest import REPO


def test_the_bentos_requirements_are_the_serving_extra():
    proc = subprocess.run([sys.executable, "tools/serving_requirements.py", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in (REPO / "serving" / "requirements.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert "onnxruntime==1.32.0" in lines and not any(line.startswith(("torch", "timm")) for line in lines)
    assert 'requirements_txt: "./serving/requirements.txt"' in (REPO / "bentofile.yaml").read_text()

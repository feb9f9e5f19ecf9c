"""`corolla verify-model` on every tiny family, and its exit status when a span is wrong."""

import subprocess
import sys

import pytest

from corolla.verify import verify_model
from shared.models.families.llama import LlamaFamily
from tests import tiny


@pytest.mark.parametrize("family", list(tiny.configs()))
def test_verify_model_passes_on_every_family(tiny_dir, family):
    report = verify_model(tiny_dir(family), spans=3, steps=20, dtype="float32")
    assert report.ok, report.render()
    assert report.max_abs_diff <= 1e-4 and report.agreement == 1.0


def test_verify_model_fails_when_the_split_model_is_wrong(tiny_dir, monkeypatch):
    monkeypatch.setattr(LlamaFamily, "window", lambda self, config, index: None)  # drop the windows
    report = verify_model(tiny_dir("mistral"), spans=2, steps=20, dtype="float32")
    assert not report.ok
    assert "FAIL" in report.render()


def test_verify_model_command_exit_status(tiny_dir):
    ok = subprocess.run([sys.executable, "-m", "corolla", "verify-model", str(tiny_dir("falcon-new")),
                         "--spans", "3", "--steps", "20"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "PASS" in ok.stdout and "max |Δlogit|" in ok.stdout
    missing = subprocess.run([sys.executable, "-m", "corolla", "verify-model", "/nonexistent/model"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "not a directory" in missing.stderr

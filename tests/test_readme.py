"""The README's Python examples run as written (the SDK one boots a real VM)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _run(code: str) -> None:
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


def test_core_api_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    (code,) = [c for c in _examples() if "VmFactory" in c]
    _run(code)
    out = capsys.readouterr().out
    assert "0 b'hi\\n'" in out and "b'payload'" in out


@pytest.mark.vm
def test_sdk_quick_start_runs(guestkit: object, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    (code,) = [c for c in _examples() if "Sandbox.create" in c]
    monkeypatch.setenv("KELPIE_STATE_DIR", str(tmp_path / "state"))
    layout = tmp_path / "layout"
    subprocess.run([sys.executable, str(ROOT / "scripts/demo-image.py"), str(layout)],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "kelpie", "image", "import", str(layout),
                    "--reference", "kelpie/demo:latest"], check=True, capture_output=True)
    _run(code)
    out = capsys.readouterr().out.splitlines()
    assert out == ["0 b'hi from Linux\\n'", "b'payload' ['data']", "b'payload'",
                   "b'streamed'"]

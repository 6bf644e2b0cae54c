"""The promises of the README: the test command is the one CI runs; conf/ ships in the wheel."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if "pip install" in line]


def test_ci_runs_the_readme_test_command_exactly():
    commands = _readme_commands()
    test_cmd = [c for c in commands if "pytest" in c]
    assert len(test_cmd) == 1
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd[0] in ci.splitlines()
    assert all("-c constraints.txt" in c for c in commands)
    assert any("python -m kdbench" in c for c in commands)


def test_constraints_pin_the_cpu_torch():
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in pins
    assert not any(p.startswith(("torchvision", "nvidia-")) for p in pins)


def test_wheel_contains_the_configs(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("kdbench-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    yaml_in_repo = {str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert {f"kdbench/conf/{p}" for p in yaml_in_repo} <= names
    assert "kdbench/cli.py" in names

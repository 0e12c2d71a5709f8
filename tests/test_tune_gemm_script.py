"""scripts/tune_gemm.py's refusals, without a GPU: a malformed problem and a disabled cache end with exit status 2
and one line saying why, before any GPU work."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tune_gemm.py"


def run(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_bad_problem():
    r = run("4608x9216")
    assert r.returncode == 2
    assert "MxNxK" in r.stderr and "Traceback" not in r.stderr


def test_cache_turned_off():
    r = run("--list", env={"FASTDM_GEMM_TUNING": "off"})
    assert r.returncode == 2
    assert "FASTDM_GEMM_TUNING=off" in r.stderr and "Traceback" not in r.stderr


def test_nothing_to_do():
    r = run()
    assert r.returncode == 2 and "at least one problem" in r.stderr

"""The programmatic-dependent-launch switch (kernels/pdl.cuh): on unless FASTDM_PDL=0 when the library loads, and
fdm_pdl_set turns it on or off and returns the previous setting. Host code: runs wherever the library is built."""

import os
import subprocess
import sys

import pytest

from fastdm import kernels

PROBE = ("from fastdm import kernels; lib = kernels.library(); "
         "print(lib.fdm_pdl_set(0), lib.fdm_pdl_set(1), lib.fdm_pdl_set(1))")


def probe(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "FASTDM_PDL"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_switch():
    if not kernels.available():
        pytest.skip("the kernel library is not built")
    assert probe() == "1 0 1"
    assert probe(FASTDM_PDL="0") == "0 0 1"
    assert probe(FASTDM_PDL="1") == "1 0 1"

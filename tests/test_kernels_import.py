"""The kernel loader package (kernels/) as a top-level module.

With a source checkout's root on sys.path (bench/device_env.sh, or `python -m ...` run from the root), kernels/ is
also importable as a plain `kernels`, and transformers imports any top-level `kernels` it finds while probing for the
Hugging Face package of that name (transformers.integrations.hub_kernels, reached from every model's from_pretrained,
diffusers' included). That import must succeed and report no version, or loading any diffusers/transformers model
in such a process fails ("attempted relative import beyond top-level package")."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastdm

ROOT = Path(fastdm.__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "kernels" / "__init__.py").is_file(), reason="fastdm is not a source checkout here")
def test_kernels_folder_imports_as_a_top_level_module(tmp_path):
    code = ("import kernels\n"
            "assert not hasattr(kernels, '__version__'), 'a version would make transformers treat it as HF kernels'\n"
            "assert 'fdm_group_norm_nhwc' in kernels.SIGNATURES\n"
            "print(kernels.__file__)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()).resolve() == (ROOT / "kernels" / "__init__.py").resolve()

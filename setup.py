"""Build glue: maps the top-level folders into the `fastdm` package and builds the CUDA kernel library.

The kernel library is a plain shared object with a C ABI (loaded with ctypes), built by CMake when nvcc is
found. Without nvcc the package installs with the numpy reference backend only.

Environment:
  FASTDM_CUDA_ARCHS   semicolon list; default: the local GPU's architecture when nvidia-smi sees one, else
                      "80;86;89;90a" (A100, RTX 30xx/A10, RTX 40xx/L40, H100/H200)
  FASTDM_NO_KERNELS=1 skip the kernel build
  CUTLASS_DIR         a CUTLASS source tree (with include/cutlass); default: headers of the nvidia-cutlass package
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SUBPACKAGES = ["runtime", "models", "kernels", "tokenizers_cfg", "scripts"]
CUTLASS_WHEEL = "nvidia-cutlass==4.2.0.0"
LIB_NAME = "libfastdm_kernels.so"


def find_packages_mapped():
    packages, package_dir = ["fastdm"], {"fastdm": "fastdm"}
    for top in SUBPACKAGES:
        package_dir[f"fastdm.{top}"] = top
        for init in sorted((ROOT / top).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT)
            if "__pycache__" not in rel.parts:
                packages.append("fastdm." + ".".join(rel.parts))
    return packages, package_dir


def find_nvcc():
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).exists():
            return cand
    return None


def cutlass_dir(build_root: Path) -> Path:
    """Directory holding include/cutlass and examples/ from the nvidia-cutlass package (fetched once, no deps)."""
    if os.environ.get("CUTLASS_DIR"):
        return Path(os.environ["CUTLASS_DIR"])
    try:
        import cutlass_library  # noqa: F401  (present when nvidia-cutlass is installed)

        src = Path(cutlass_library.__file__).parent / "source"
        if (src / "include" / "cutlass").is_dir():
            return src
    except ImportError:
        pass
    deps = build_root / "_deps"
    src = deps / "cutlass_library" / "source"
    if (src / "include" / "cutlass").is_dir():
        return src
    deps.mkdir(parents=True, exist_ok=True)
    print(f"fastdm: fetching CUTLASS headers ({CUTLASS_WHEEL})", flush=True)
    # pip's build isolation leaves PIP_* and PYTHON* variables that would confine a nested pip; drop them
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    subprocess.check_call(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(deps), CUTLASS_WHEEL],
        env=env,
    )
    wheel = next(deps.glob("nvidia_cutlass-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith("cutlass_library/source/")]
        zf.extractall(deps, members)
    return src


def default_archs() -> str:
    """The visible GPUs' architectures (a fast build for this machine), else every supported one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        caps = sorted({line.strip() for line in out.stdout.splitlines() if line.strip()})
    except (OSError, subprocess.SubprocessError):
        caps = []
    archs = []
    for cap in caps:
        major, _, minor = cap.partition(".")
        if major.isdigit() and minor.isdigit() and int(major) >= 8:
            archs.append(f"{major}{minor}" + ("a" if major == "9" else ""))
    return ";".join(archs) if archs else "80;86;89;90a"


def build_kernel_library(out_dir: Path) -> None:
    if os.environ.get("FASTDM_NO_KERNELS") == "1":
        print("fastdm: FASTDM_NO_KERNELS=1, skipping the CUDA kernel library")
        return
    nvcc = find_nvcc()
    if nvcc is None:
        print("fastdm: nvcc not found; installing the CPU reference backend only (no GPU ops)")
        return
    archs = os.environ.get("FASTDM_CUDA_ARCHS") or default_archs()
    print(f"fastdm: building the CUDA kernel library for {archs} (set FASTDM_CUDA_ARCHS to change)", flush=True)
    build_root = ROOT / "build"
    build_dir = build_root / ("kernels-" + archs.replace(";", "-"))
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.check_call(
        ["cmake", "-S", str(ROOT), "-B", str(build_dir), *gen, "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DFASTDM_CUDA_ARCHS={archs}", f"-DCUTLASS_DIR={cutlass_dir(build_root)}"]
    )
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build_dir / LIB_NAME, out_dir / LIB_NAME)


class BuildKernels(build_ext):
    def run(self):
        out = ROOT / "kernels" if (self.inplace or getattr(self, "editable_mode", False)) else (
            Path(self.build_lib) / "fastdm" / "kernels")
        build_kernel_library(out)


class BinaryDistribution(Distribution):
    def has_ext_modules(self):
        return True


packages, package_dir = find_packages_mapped()
setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"fastdm.tokenizers_cfg": ["*.json"], "fastdm.kernels": ["*.so"]},
    cmdclass={"build_ext": BuildKernels},
    distclass=BinaryDistribution,
)

"""Builds the ``wgan_kernels._C`` extension from ``csrc/`` with ninja.

The CPU sources (OpenMP) are always built. The CUDA sources are built when torch has CUDA
and nvcc is found (a GPU is not needed to compile them). Environment:

* ``WGAN_KERNELS_FORCE_CUDA=1``  build the CUDA half or fail (CI sets it).
* ``WGAN_KERNELS_SKIP_CUDA=1``   build the CPU half only.
* ``WGAN_KERNELS_PORTABLE=1``    no ``-march=native`` (for binaries that move between CPUs).
* ``TORCH_CUDA_ARCH_LIST``       CUDA archs; defaults to the visible GPU, else "8.0;9.0+PTX".
* ``MAX_JOBS``                   parallel compile jobs (honoured by torch's ninja build).

The build imports torch: install with ``pip install --no-build-isolation -e .``.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`, which is wrong when nvcc is a wrapper script
    (here /usr/local/bin/nvcc); prefer a folder that really holds the CUDA headers."""
    if "CUDA_HOME" in os.environ or "CUDA_PATH" in os.environ:
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "include" / "cuda_runtime.h").exists() and (home / "bin" / "nvcc").exists():
            os.environ["CUDA_HOME"] = str(home)
            return


def _extensions():
    _find_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only invocations (e.g. sdist without torch)
        print("wgan_kernels setup: torch not importable, building no extension", file=sys.stderr)
        return [], {}

    def sources(folder, pattern):
        return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / folder).glob(pattern))

    cpu_sources = sources("bindings", "*.cpp") + sources("cpu", "*.cpp")
    cuda_sources = sources("cuda", "*.cu")

    nvcc = None
    if cpp_extension.CUDA_HOME is not None:
        nvcc = shutil.which("nvcc") or str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc")
        if not Path(nvcc).exists():
            nvcc = None
    with_cuda = torch.version.cuda is not None and nvcc is not None and not _flag("WGAN_KERNELS_SKIP_CUDA")
    if _flag("WGAN_KERNELS_FORCE_CUDA") and not with_cuda:
        raise RuntimeError(
            "WGAN_KERNELS_FORCE_CUDA=1 but the CUDA half cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}, nvcc={nvcc!r}"
        )

    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]  # torch adds its -std
    if not _flag("WGAN_KERNELS_PORTABLE"):
        cxx.append("-march=native")
    args = dict(
        name="wgan_kernels._C",
        sources=cpu_sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],  # resolves to the libgomp that torch ships and has loaded
    )
    if with_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        args["sources"] = cpu_sources + cuda_sources
        args["extra_compile_args"]["cxx"].append("-DWGAN_KERNELS_WITH_CUDA")
        args["extra_compile_args"]["nvcc"] = ["-O3", "-DWGAN_KERNELS_WITH_CUDA"]
        ext = cpp_extension.CUDAExtension(**args)
    else:
        ext = cpp_extension.CppExtension(**args)
    print(f"wgan_kernels setup: building _C with the CPU half{' and the CUDA half' if with_cuda else ''}")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

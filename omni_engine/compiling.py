"""What `Omni(compile=...)` needs of the machine, checked when the engine is built: a backend
torch.compile knows, and for inductor a compiler to build its kernels with at run time.

Without the compiler, the denoiser's first call fails, and so does every call after it: a worker
would record every job it takes as failed. At start, the error names what to install.
"""

from __future__ import annotations

import os
import shutil

import torch

# What inductor builds kernels with, by device type: (the variable that names it, else the
# programs looked for). Triton's launchers on a GPU need a C compiler, inductor's CPU kernels C++.
KERNEL_COMPILERS = {"cuda": ("CC", ("gcc", "clang")), "cpu": ("CXX", ("g++",))}


def check_compile_backend(backend: str | None) -> str | None:
    """`backend` if torch.compile knows it (None: no compiling); ValueError naming the known ones."""
    if backend is None:
        return None
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        usual = ", ".join(torch._dynamo.list_backends())
        raise ValueError(f"compile must be None or a torch.compile backend such as {usual}; got {backend!r}")
    return backend


def check_kernel_compiler(backend: str | None, device: torch.device) -> None:
    """ValueError if `backend` is inductor and no compiler it would build kernels with is here."""
    if backend != "inductor" or device.type not in KERNEL_COMPILERS:
        return
    variable, programs = KERNEL_COMPILERS[device.type]
    named = os.environ.get(variable)  # set, even empty, it is the only one looked for
    candidates = programs if named is None else (named,)
    if not any(program and shutil.which(program) for program in candidates):
        language = "C" if device.type == "cuda" else "C++"
        looked = f"{' or '.join(programs)}, or ${variable}" if named is None else f"${variable}={named!r}"
        raise ValueError(
            f"compile='inductor' on {device.type} builds kernels at run time with a {language} compiler, "
            f"and none was found ({looked}): install one, or leave compile off"
        )

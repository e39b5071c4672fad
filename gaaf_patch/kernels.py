"""The fused CPU backward kernel (``csrc/gaaf_cpu.cpp``): built on first use, plain torch ops when it cannot be.

A GAAF site's eager backward in plain ops is 4-6 passes over the tensor, each an operator dispatch and an
allocation (``ops._backward``); on MLP-sized tensors that costs more than the activation itself. The C++ file
fuses them into one vectorised pass with ATen's ``Vectorized`` (the SLEEF transcendentals that ATen's and
Inductor's own CPU kernels use) and registers it as ``torch.ops.gaaf_patch.backward``.

It is compiled with :func:`torch.utils.cpp_extension.load` the first time an eager CPU backward needs it (about
30 s, announced by one line on stderr whenever a build starts; ``gaaf-patch kernels`` does it ahead of time, and
``make`` runs that), and cached under
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) by torch version and installation, CPU
capability and source.
Without a C++ compiler, or when the build fails, one warning is given and the plain ops are used: the results are
the same to float rounding (tests/test_kernels.py), only slower.

``GAAF_KERNELS=off`` (or :func:`set_enabled`) turns it off; ``GAAF_KERNELS=on`` makes a failed build an error.

The kernel's codes are facts of what they stand for: its ``act`` codes (``phi'`` from the input or the output) are
``Activation.kernel_x`` and ``kernel_y`` in :mod:`gaaf_patch.activations`, its ``shape`` codes each family's
``FastPath.kernel`` in :mod:`gaaf_patch.shapes.library`. Only :data:`GIVEN`, "``base`` already holds
``dy phi'``", belongs to no activation.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import GaafError

__all__ = ["available", "enabled", "set_enabled", "build", "KernelBuildError", "GIVEN"]

GIVEN = 3  # the `act` code for "base holds dy phi'(x) (PyTorch's kernel), t = x": only the shape term is added

_SOURCE = Path(__file__).with_name("csrc") / "gaaf_cpu.cpp"

# ATen's CPU capability -> (the macro that selects ATen's vector code, the compiler flags it needs); the same pairs
# as torch._inductor.cpu_vec_isa. Anything else gets ATen's portable vector code.
_ISA = {
    "AVX512": (["-DCPU_CAPABILITY_AVX512"], ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"]),
    "AVX2": (["-DCPU_CAPABILITY_AVX2"], ["-mavx2", "-mfma", "-mf16c"]),
}


class KernelBuildError(GaafError, RuntimeError):
    """The C++ kernel could not be built or loaded (raised by :func:`available` only with ``GAAF_KERNELS=on``)."""


_lock = threading.Lock()
_state: dict[str, bool | None] = {"loaded": None}
_enabled = os.environ.get("GAAF_KERNELS", "auto").lower() not in ("off", "0", "false", "no")


def _name() -> str:
    """One build per torch version, CPU capability, source text, torch installation (its headers and libraries,
    so two virtualenvs with the same torch version do not rebuild each other's) and source location (the build file
    names the source by its path: two checkouts of one source would otherwise rebuild each other's): versions,
    checkouts and environments never rebuild each other's."""
    cap = torch.backends.cpu.get_cpu_capability()
    where = f"{Path(torch.__file__).resolve().parent}|{sys.version}|{_SOURCE.resolve()}".encode()
    digest = hashlib.sha1(_SOURCE.read_bytes() + b"|" + where).hexdigest()[:10]
    tag = re.sub(r"[^0-9A-Za-z]+", "_", f"{torch.__version__}_{cap}_{digest}")
    return f"gaaf_patch_cpu_{tag}"


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its "No CUDA runtime is found" notice on CPU-only machines."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def build(verbose: bool = False) -> Path:
    """Compile (or find in the cache) and load the kernel; returns its build folder.

    Raises :class:`KernelBuildError` when it cannot be built or loaded.
    """
    cpp_extension = _cpp_extension()

    cap = torch.backends.cpu.get_cpu_capability()
    macros, arch = _ISA.get(cap, ([], []))
    if sys.platform == "win32":
        raise KernelBuildError("gaaf_patch's CPU kernel is built on Linux and macOS only; plain torch ops are used")
    if shutil.which("ninja") is None:  # pip's ninja lives in the environment's bin/, which may not be on PATH
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []  # Apple's clang has no OpenMP: one thread
    try:
        name = _name()
        folder = Path(cpp_extension._get_build_directory(name, verbose=False))
        with _announced(cpp_extension, folder / f"{name}.so"):
            cpp_extension.load(
                name=name,
                sources=[str(_SOURCE)],
                extra_cflags=["-O3", *openmp, *macros, *arch],
                extra_ldflags=openmp,
                is_python_module=False,
                verbose=verbose,
            )
    except Exception as e:  # noqa: BLE001 - compiler missing, build error, load error: all mean "no kernel"
        detail = str(e).strip().splitlines()
        raise KernelBuildError(
            f"could not build gaaf_patch's CPU kernel ({type(e).__name__}: {detail[-1] if detail else ''}); "
            "install a C++ compiler and ninja, or set GAAF_KERNELS=off to use plain torch ops"
        ) from e
    return folder


def _notice(folder: Path) -> None:
    print(
        f"gaaf_patch: compiling the CPU backward kernel (about 30 s; GAAF_KERNELS=off skips it) in {folder}",
        file=sys.stderr,
        flush=True,
    )


@contextlib.contextmanager
def _announced(cpp_extension, library: Path) -> Iterator[None]:
    """Print one line before every build, not only the first: torch rebuilds a library that exists when its build
    file changed or a build was cut short, and without a word a training script seems to hang on its first batch.

    torch runs ninja on every load (a no-op when nothing changed), so the line is printed only when a dry run of
    ninja in the build folder has work to do. Should torch's private ``_run_ninja_build`` be gone, the notice falls
    back to "the library file does not exist yet".
    """
    run = getattr(cpp_extension, "_run_ninja_build", None)
    if run is None:
        if not library.exists():
            _notice(library.parent)
        yield
        return

    def announce_then_run(build_directory: str, *args: Any, **kwargs: Any) -> Any:
        if _ninja_has_work(build_directory):
            _notice(Path(build_directory))
        return run(build_directory, *args, **kwargs)

    cpp_extension._run_ninja_build = announce_then_run
    try:
        yield
    finally:
        cpp_extension._run_ninja_build = run


def _ninja_has_work(build_directory: str) -> bool:
    """``ninja -n`` (a dry run): whether building would run any command. When it cannot tell, assume it would."""
    try:
        dry = subprocess.run(["ninja", "-n"], cwd=build_directory, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return True
    return dry.returncode != 0 or "no work to do" not in dry.stdout


def available() -> bool:
    """Whether ``torch.ops.gaaf_patch.backward`` can be used now (builds it on the first call when enabled)."""
    if not _enabled:
        return False
    loaded = _state["loaded"]
    if loaded is not None:
        return bool(loaded)
    with _lock:
        if _state["loaded"] is None:
            try:
                build()
                _state["loaded"] = True
            except KernelBuildError as e:
                if os.environ.get("GAAF_KERNELS", "").lower() == "on":
                    raise
                _state["loaded"] = False
                warnings.warn(f"{e}; falling back to plain torch ops (slower)", RuntimeWarning, stacklevel=2)
    return bool(_state["loaded"])


def enabled() -> bool:
    """Whether the kernel may be used (``GAAF_KERNELS`` / :func:`set_enabled`); it may still be unbuildable."""
    return _enabled


def set_enabled(flag: bool) -> bool:
    """Turn the kernel on or off for this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous

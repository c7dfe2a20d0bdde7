"""WronAI's C kernels: compiled on the user's machine at first use, cached, loaded with ctypes.

PyTorch eager has no kernel for some of a CPU training step's hot spots (attention over many short
examples, ``wronai.kernels.cpu_attention``), and ``torch.compile`` costs tens of seconds at every start.
A C file without PyTorch headers compiles in about a second, so WronAI ships the source
(``wronai/kernels/native/*.c``) and builds it with the system C compiler the first time a run needs it:

- the compiler is ``$CC``, else the first of ``cc``, ``gcc``, ``clang`` on the PATH;
- flags ``-O3 -march=native`` (the CPU the run is on: AVX2, AVX-512, NEON, as it has them), then
  ``-mcpu=native`` and plain ``-O3`` if the compiler refuses that; with ``-fopenmp`` first where the caller
  asks (PyTorch runs libgomp: the library then shares PyTorch's threads), then without;
  ``$WRONAI_NATIVE_FLAGS`` replaces the target flags (``-march=haswell``: an AVX2 build, say, for a cache
  shared by machines of several CPU kinds, or to measure an AVX2-only CPU on a newer one);
- the library is cached under ``$WRONAI_CACHE_DIR`` (default ``$XDG_CACHE_HOME/wronai``, else
  ``~/.cache/wronai``) in ``native/<key>/``, the key a hash of the source, the compiler's version, the flags
  and the CPU's flags, so a new CPU, compiler or WronAI version builds again and every later run loads in
  milliseconds. It is written under a temporary name and renamed, so ranks that build at once never load
  half a file.

Nothing here is required: without a compiler, or if the build fails, ``build`` says why and the caller
uses PyTorch's own operations (``hardware.native_attention: auto``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
BASE_FLAGS = ("-O3", "-fno-trapping-math", "-fPIC", "-shared", "-pthread", "-std=gnu11")
# tried in order: the first set the compiler accepts is used
TARGET_FLAGS = (("-march=native",), ("-mcpu=native",), ())
COMPILE_TIMEOUT_S = 120


class NativeBuildError(RuntimeError):
    """A C kernel could not be built or loaded; the message says why, in one line."""


@dataclass(frozen=True)
class Built:
    """A compiled kernel library: where it is, how it was made, and whether this call compiled it."""

    path: Path
    compiler: str
    flags: tuple[str, ...]
    compiled: bool
    seconds: float


def compiler_command() -> list[str] | None:
    """The command that compiles: ``$CC`` split as a shell would (``ccache gcc`` stays two words), else
    ``cc``, ``gcc`` or ``clang`` from the PATH; None when there is none."""
    env = os.environ.get("CC", "").strip()
    if env:
        words = shlex.split(env)
        found = shutil.which(words[0])
        return [found, *words[1:]] if found else None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def find_compiler() -> str | None:
    """The C compiler a build would use, as one string (``$CC``, else ``cc``, ``gcc`` or ``clang``)."""
    command = compiler_command()
    return " ".join(command) if command else None


def cache_root() -> Path:
    """``$WRONAI_CACHE_DIR``, else ``$XDG_CACHE_HOME/wronai``, else ``~/.cache/wronai``."""
    if os.environ.get("WRONAI_CACHE_DIR"):
        return Path(os.environ["WRONAI_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "wronai"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    parts = [platform.machine(), platform.processor()]
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features", "model name", "CPU part")):
                parts.append(line)
                if len(parts) > 6:
                    break
    except OSError:
        pass
    return "\n".join(parts)


def _compiler_version(command: list[str]) -> str:
    compiler = " ".join(command)
    try:
        out = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        raise NativeBuildError(f"the C compiler {compiler} does not run ({err})") from None
    return out.stdout.strip()


def build(name: str, openmp: bool = False) -> Built:
    """Build (or find already built) ``wronai/kernels/native/<name>.c`` for this CPU; raises
    ``NativeBuildError`` with the reason when there is no compiler or the build fails. ``openmp``: try
    ``-fopenmp`` first (the library then uses the process's already loaded ``libgomp.so.1``)."""
    import time

    start = time.perf_counter()
    source = SOURCE_DIR / f"{name}.c"
    code = source.read_bytes()
    cc = compiler_command()
    if cc is None:
        raise NativeBuildError("no C compiler found ($CC, cc, gcc or clang on the PATH)")
    compiler = " ".join(cc)
    version = _compiler_version(cc)
    suffix = ".dylib" if platform.system() == "Darwin" else ".so"
    errors = []
    override = tuple(os.environ.get("WRONAI_NATIVE_FLAGS", "").split())
    omps = ((("-fopenmp",),) if openmp else ()) + ((),)
    variants = [(*target, *omp) for target in ((override,) if override else TARGET_FLAGS) for omp in omps]
    for extra in variants:
        flags = (*BASE_FLAGS, *extra)
        key = hashlib.sha256(
            b"\0".join(
                [
                    code,
                    compiler.encode(),
                    version.encode(),
                    " ".join(flags).encode(),
                    _cpu_signature().encode(),
                ]
            )
        ).hexdigest()[:20]
        folder = _writable(cache_root() / "native" / key)
        library = folder / f"{name}{suffix}"
        if library.is_file():
            return Built(library, compiler, flags, False, time.perf_counter() - start)
        partial = folder / f".{name}.{os.getpid()}{suffix}"
        command = [*cc, *flags, str(source), "-o", str(partial), "-lm"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as err:
            raise NativeBuildError(f"compiling {source.name} with {compiler} failed ({err})") from None
        if done.returncode == 0 and partial.is_file():
            os.replace(partial, library)
            seconds = time.perf_counter() - start
            logger.info(
                "native kernels: built %s with %s %s in %.1f s", library, compiler, " ".join(flags), seconds
            )
            return Built(library, compiler, flags, True, seconds)
        partial.unlink(missing_ok=True)
        errors.append(
            next(
                (line for line in done.stderr.splitlines() if "error" in line),
                " ".join(done.stderr.split())[:200],
            )
        )
    raise NativeBuildError(
        f"compiling {source.name} with {compiler} failed: {errors[-1] if errors else 'no output'}"
    )


def _writable(folder: Path) -> Path:
    """``folder``, created; a folder in the temporary directory when it cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return folder
    except OSError:
        fallback = Path(tempfile.gettempdir()) / "wronai-native" / folder.name
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def load(name: str, openmp: bool = False) -> tuple[ctypes.CDLL, Built]:
    """``build(name, openmp)`` and the library loaded (``NativeBuildError`` when either fails)."""
    built = build(name, openmp)
    try:
        return ctypes.CDLL(str(built.path)), built
    except OSError as err:
        raise NativeBuildError(f"loading {built.path} failed ({err})") from None


@dataclass(frozen=True)
class NativeKernel:
    """A loaded kernel library and how it was built."""

    library: ctypes.CDLL
    built: Built


def kernel_ready(
    setting: str, key: str, get: Callable[[], NativeKernel], what: str, fallback: str
) -> NativeKernel | None:
    """The kernel ``get`` builds, loads and checks, for ``hardware.<key>`` set to ``setting`` (auto | on): on
    failure None with a note ("<what>: why — <fallback> instead", auto), or a one-line error naming the key
    (on)."""
    from wronai.errors import WronAIError

    try:
        kernel = get()
    except NativeBuildError as err:
        if setting == "on":
            raise WronAIError(
                f"hardware.{key}: on, but the kernel cannot be used: {err} — install a C compiler (gcc) or set "
                f"hardware.{key}: auto"
            ) from None
        logger.warning("%s: %s — %s instead (hardware.%s)", what, err, fallback, key)
        return None
    built = kernel.built
    logger.info(
        "%s kernel: %s (%s %s%s)",
        what,
        built.path,
        built.compiler,
        " ".join(built.flags),
        f", compiled in {built.seconds:.1f} s" if built.compiled else ", cached",
    )
    return kernel

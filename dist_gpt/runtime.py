"""Process-level tuning for CPU training: keep glibc malloc from handing big buffers back every step.

glibc serves requests above its mmap threshold (128 KiB, rising adaptively to at most 32 MiB) with a fresh
mmap and returns them with munmap on free. A training step allocates and frees the same few hundred MB of
activations and gradients every step, so each step the kernel maps new zeroed pages and faults them in one
4 KiB page at a time: on small GPTs on CPU that was 20-38% of the time. Two malloc parameters stop it:

    mmap_max = 0          never mmap: big blocks come from the heap, and a freed block is reused next step
    trim_threshold = huge never give the heap's free top back to the kernel (no re-faulting it next step)

They can be set two ways, both provided here:
- `keep_freed_memory()`: mallopt() through ctypes in the running process. Nothing to restart; only what is
  allocated after the call is affected.
- `GLIBC_TUNABLES` (`malloc_env()`, `reexec_with_tuned_malloc()`): read by glibc at process start, so it
  covers the whole life of the process, but needs the variable set before Python starts.

The cost is memory: the heap stays at its high-water mark instead of shrinking between steps (RSS no longer
drops after backward) and freed holes may fragment. `DIST_GPT_MALLOC=default` turns all of this off.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys

OVERRIDE_ENV_VAR = "DIST_GPT_MALLOC"  # =default: leave malloc as glibc ships it
TRIM_THRESHOLD = 64 << 30  # 64 GiB: "never trim", but still a valid size_t on any 64-bit glibc
GLIBC_TUNABLES = f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"

# mallopt() parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def _glibc() -> ctypes.CDLL | None:
    """This process's C library if it is glibc (musl and macOS have no mallopt with these knobs)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # symbols already loaded into the process: the libc Python itself uses
        libc.gnu_get_libc_version  # only glibc has it
    except (OSError, AttributeError):
        return None
    return libc


def _disabled() -> bool:
    return os.environ.get(OVERRIDE_ENV_VAR, "").lower() == "default"


def keep_freed_memory() -> bool:
    """Tune malloc in this process so large freed blocks are kept for reuse. True if applied.

    A no-op returning False off Linux/glibc or when DIST_GPT_MALLOC=default."""
    if _disabled():
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    # mallopt takes an int: 2**31 - 1 is the largest trim threshold it can express (2 GiB of free heap top)
    ok_mmap = libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return ok_mmap and ok_trim


def malloc_tuned_by_env() -> bool:
    """Whether this process was started with our GLIBC_TUNABLES."""
    return GLIBC_TUNABLES in os.environ.get("GLIBC_TUNABLES", "")


def malloc_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of env (default os.environ) with our settings added to GLIBC_TUNABLES, for a child process."""
    env = dict(os.environ if env is None else env)
    current = env.get("GLIBC_TUNABLES", "")
    if GLIBC_TUNABLES not in current:
        env["GLIBC_TUNABLES"] = f"{current}:{GLIBC_TUNABLES}" if current else GLIBC_TUNABLES
    return env


def reexec_with_tuned_malloc() -> None:
    """Restart this process with GLIBC_TUNABLES set, unless it already is (or glibc is absent, or
    DIST_GPT_MALLOC=default). Call it first thing in main(): everything before the exec is redone.

    exec keeps the pid, so launchers (torchrun, mpirun, a shell's job control) do not notice."""
    if _disabled() or malloc_tuned_by_env() or _glibc() is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv is the command line as typed ("python -m pkg ..."); sys.argv would lose the -m.
    os.execve(sys.executable, list(sys.orig_argv), malloc_env())


def page_faults() -> int:
    """Minor page faults of this process so far (the cost of freshly mapped memory being touched)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

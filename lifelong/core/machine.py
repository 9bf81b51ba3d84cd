"""What this machine is, and how a run uses it: the CPU's model and features, the cores a
run may use, compute threads, and which precision its matmuls run fast in.

Two rules (docs/DESIGN.md §6), both measured here:

- **Threads fit the cores the run has.** Several torch processes that each take every
  core slow each other 20–40× (OpenMP threads spinning against each other). A run's
  default thread count is the cores in its CPU affinity mask, divided among the
  ``lifelong`` runs alive on the machine (each registers itself in :class:`RunRegistry`
  and re-divides between steps). ``--threads N`` / ``LIFELONG_THREADS`` fix it; an
  ``OMP_NUM_THREADS`` already set is respected.
- **Reduced precision only where the hardware runs it natively.** On a CPU without
  AVX512-BF16 or AMX a bfloat16 matmul is emulated, far slower than float32
  (docs/BENCHMARKS.md). ``auto`` picks bfloat16 only where the CPU reports native support
  *and* a micro-benchmark, run once per machine and cached, finds it faster; on CUDA where
  the device supports it.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from streams.errors import UserError

THREADS_ENV = "LIFELONG_THREADS"
# CPU features that decide whether bfloat16/float16 matmuls run natively (x86 and Arm names).
REDUCED_PRECISION_FEATURES = (
    "avx512_bf16",
    "amx_bf16",
    "amx_tile",
    "avx512_fp16",
    "amx_fp16",
    "bf16",
    "fphp",
    "asimdhp",
    "sve",
    "sve2",
)
_REPORTED_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni") + REDUCED_PRECISION_FEATURES
AUTO = "auto"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- the CPU


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_features() -> set[str]:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``), lower-case."""
    info = _cpuinfo()
    return set((info.get("flags") or info.get("Features") or "").lower().split())


def cpu_description() -> dict:
    """The CPU's model, architecture, torch's kernel level and the features that matter here."""
    info = _cpuinfo()
    features = cpu_features()
    return {
        "model": info.get("model name") or info.get("Model") or platform.processor() or "unknown",
        "arch": platform.machine(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "features": [f for f in _REPORTED_FEATURES if f in features],
        "cores": available_cores(),
    }


def describe_cpu_line() -> str:
    """One line for benchmark headers: model, cores, torch's kernel level, relevant features."""
    cpu = cpu_description()
    return (
        f"CPU: {cpu['model']} ({cpu['arch']}, {cpu['cores']} cores usable, torch kernels "
        f"{cpu['torch_capability']}; features: {' '.join(cpu['features']) or 'none of note'})"
    )


# -- cores and threads


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_threads(value: str | int | None, source: str) -> int | None:
    """A thread count from an option or variable (None when unset); refuses anything but n ≥ 1."""
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{source} must be a whole number of threads ≥ 1, got '{value}'") from None
    if n < 1:
        raise UserError(f"{source} must be a whole number of threads ≥ 1, got '{value}'")
    return n


@dataclass(frozen=True)
class ThreadPolicy:
    """How many compute threads a run uses: ``fixed`` (an option or variable said so) or a
    share of ``cores`` among the lifelong runs alive on the machine."""

    fixed: int | None
    cores: int
    source: str  # what decided it, for the manifest and messages

    def threads(self, live_runs: int = 1) -> int:
        if self.fixed is not None:
            return self.fixed
        return max(1, self.cores // max(1, live_runs))


def thread_policy(requested: int | str | None = None) -> ThreadPolicy:
    """The policy for ``requested`` threads (``--threads``), else ``$LIFELONG_THREADS``, else an
    ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` already set, else a share of the usable cores."""
    cores = available_cores()
    n = parse_threads(requested, "--threads")
    if n is not None:
        return ThreadPolicy(n, cores, "--threads")
    n = parse_threads(os.environ.get(THREADS_ENV), THREADS_ENV)
    if n is not None:
        return ThreadPolicy(n, cores, THREADS_ENV)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        try:
            n = parse_threads(os.environ.get(var), var)
        except ValueError:
            n = None  # a value torch itself would ignore: fall back to the cores
        if n is not None:
            return ThreadPolicy(n, cores, var)
    return ThreadPolicy(None, cores, "share of usable cores")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunRegistry:
    """Lifelong processes doing heavy torch work on this machine, one file per process, so
    that each can take its share of the cores. Entries of dead processes are ignored (and
    removed), so a killed run never holds cores."""

    def __init__(self, directory: Path | None = None):
        if directory is None:
            uid = os.getuid() if hasattr(os, "getuid") else 0
            directory = Path(os.environ.get("TMPDIR", "/tmp")) / f"lifelong-runs-{uid}"
        self.directory = directory

    def live(self) -> int:
        """How many registered processes are alive (at least 1: the caller)."""
        count = 0
        for entry in self.directory.glob("*.pid"):
            try:
                pid = int(entry.stem)
            except ValueError:
                continue
            if _alive(pid):
                count += 1
            else:
                entry.unlink(missing_ok=True)
        return max(1, count)

    @contextmanager
    def registered(self) -> Iterator[RunRegistry]:
        self.directory.mkdir(parents=True, exist_ok=True)
        entry = self.directory / f"{os.getpid()}.pid"
        entry.write_text(str(os.getpid()))
        try:
            yield self
        finally:
            entry.unlink(missing_ok=True)


class ComputeThreads:
    """Applies a :class:`ThreadPolicy` to torch for as long as a run lasts: registered in the
    :class:`RunRegistry` on entry, re-divided by :meth:`rebalance` (between steps), and torch's
    previous setting restored on exit."""

    def __init__(self, policy: ThreadPolicy, registry: RunRegistry | None = None):
        self.policy, self.registry = policy, registry or RunRegistry()
        self.current = torch.get_num_threads()
        self._stack: AbstractContextManager[RunRegistry] | None = None  # the registration, while entered

    def __enter__(self) -> ComputeThreads:
        self._previous = torch.get_num_threads()
        self._stack = self.registry.registered()
        self._stack.__enter__()
        self.rebalance()
        return self

    def rebalance(self) -> int:
        threads = self.policy.threads(self.registry.live() if self.policy.fixed is None else 1)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        self.current = threads
        return threads

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self._previous)
        assert self._stack is not None  # __exit__ follows __enter__
        self._stack.__exit__(*exc)

    def describe(self) -> dict:
        return {"threads": self.current, "decided_by": self.policy.source, "usable_cores": self.policy.cores}


# -- precision


@dataclass(frozen=True)
class DtypeChoice:
    """A compute dtype and why it was chosen."""

    setting: str  # what was asked: "auto" or a dtype name
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> dict:
        return {"setting": self.setting, "dtype": self.name, "reason": self.reason}


def check_dtype_setting(name: str, what: str) -> None:
    """Refuse a compute dtype setting other than ``auto`` or a known dtype, naming ``what``."""
    if name != AUTO and name not in DTYPES:
        raise UserError(f"{what} must be one of {', '.join((AUTO, *DTYPES))}, got '{name}'")


def choose_dtype(name: str, device: torch.device | str = "cpu", what: str = "dtype") -> DtypeChoice:
    """The compute dtype for setting ``name`` on ``device``: an explicit dtype as given;
    ``auto`` picks bfloat16 only where the device runs it natively and fast, else float32."""
    check_dtype_setting(name, what)
    if name != AUTO:
        return DtypeChoice(name, DTYPES[name], "set explicitly")
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(AUTO, torch.bfloat16, f"{torch.cuda.get_device_name(device)} runs bfloat16 natively")
        return DtypeChoice(AUTO, torch.float32, f"{torch.cuda.get_device_name(device)} has no native bfloat16")
    if device.type != "cpu":
        return DtypeChoice(AUTO, torch.float32, f"no reduced-precision rule for device '{device.type}'")
    native = sorted(set(REDUCED_PRECISION_FEATURES) & cpu_features())
    if not native and platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        return DtypeChoice(AUTO, torch.float32, "the CPU reports no AVX512-BF16 or AMX: bfloat16 would be emulated")
    speedup = bfloat16_speedup()
    features = f"CPU features {' '.join(native)}" if native else "no native bfloat16 feature reported"
    if speedup >= MIN_SPEEDUP:
        return DtypeChoice(AUTO, torch.bfloat16, f"{features}; bfloat16 matmul measured {speedup:.2f}× float32")
    return DtypeChoice(AUTO, torch.float32, f"{features}; bfloat16 matmul measured only {speedup:.2f}× float32")


MIN_SPEEDUP = 1.15  # bfloat16 must beat float32 by this much to be chosen (its rounding is not free)
# The shape of the upper stack's largest matmuls on the default model: (rows × d) × (d × d_ff).
_BENCH_SHAPE = (64, 576, 1536)


def _matmul_seconds(dtype: torch.dtype, repeats: int = 10) -> float:
    m, k, n = _BENCH_SHAPE
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    a @ b  # warm-up (kernel selection)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 4)
        if best > 0.05 and dtype != torch.float32:  # emulated: clearly slow, stop early
            break
    return best


def measure_bfloat16_speedup() -> float:
    """float32 time / bfloat16 time of one upper-stack-shaped matmul at the current threads."""
    return _matmul_seconds(torch.float32) / _matmul_seconds(torch.bfloat16)


def bfloat16_speedup() -> float:
    """:func:`measure_bfloat16_speedup`, measured once per (CPU, torch version, threads) and
    cached under the project's cache directory."""
    from lifelong.core.models import cache_root

    cpu = cpu_description()
    key = (
        f"{cpu['model']}|{cpu['arch']}|{' '.join(cpu['features'])}|torch {torch.__version__}|"
        f"threads {torch.get_num_threads()}"
    )
    path = cache_root() / "machine" / "bfloat16_speedup.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return float(known[key])
    speedup = measure_bfloat16_speedup()
    known[key] = speedup
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the measurement next time
    return speedup


def runtime_header(device: torch.device | str = "cpu") -> str:
    """Lines for a benchmark's header: torch, threads, the CPU and what ``auto`` precision picks."""
    auto = choose_dtype(AUTO, device)
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n{describe_cpu_line()}\n"
        f"compute precision auto -> {auto.name} ({auto.reason})"
    )


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on other C libraries."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return the C heap's free pages to the operating system (glibc ``malloc_trim``; nothing on
    other C libraries). PyTorch's CPU tensors come from malloc, and glibc keeps freed pages of
    the heap resident: editing the default model in batches of 10, resident memory went from
    1,366 to 2,026 MiB over three steps without this; called after every step, 1,252 then 1,537
    MiB and flat from step 1 (docs/BENCHMARKS.md)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

"""The machine rules: thread counts that fit the cores, reduced precision only where it is fast."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lifelong.core import machine
from lifelong.core.machine import ComputeThreads, RunRegistry, choose_dtype, thread_policy


@pytest.fixture
def clean_thread_env(monkeypatch):
    for var in (machine.THREADS_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)


def test_thread_policy_order(clean_thread_env, monkeypatch):
    cores = machine.available_cores()
    assert thread_policy().threads() == cores
    assert thread_policy().threads(live_runs=cores + 5) == 1  # never below one
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert (thread_policy().fixed, thread_policy().source) == (3, "OMP_NUM_THREADS")
    monkeypatch.setenv(machine.THREADS_ENV, "2")
    assert thread_policy().fixed == 2  # the project's own variable wins over OpenMP's
    assert thread_policy("5").threads(live_runs=4) == 5  # an explicit option wins, and is not shared


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_bad_thread_counts_are_refused(clean_thread_env, monkeypatch, bad):
    with pytest.raises(ValueError, match="--threads must be a whole number"):
        thread_policy(bad)
    monkeypatch.setenv(machine.THREADS_ENV, bad)
    with pytest.raises(ValueError, match=machine.THREADS_ENV):
        thread_policy()


def test_affinity_mask_bounds_the_cores():
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this OS")
    code = "from lifelong.core.machine import available_cores; print(available_cores())"
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("taskset is not available")
    assert out.stdout.strip() == "1"


def test_registry_counts_live_processes_and_forgets_dead_ones(tmp_path):
    registry = RunRegistry(tmp_path)
    assert registry.live() == 1  # nobody registered: the caller alone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"{dead.pid}.pid").write_text("")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / f"{sleeper.pid}.pid").write_text("")
        with registry.registered():
            assert registry.live() == 2  # this process and the sleeper; the dead one is dropped
            assert not (tmp_path / f"{dead.pid}.pid").exists()
        assert registry.live() == 1
    finally:
        sleeper.kill()
        sleeper.wait()


def test_compute_threads_share_rebalance_and_restore(tmp_path, clean_thread_env):
    before = torch.get_num_threads()
    registry = RunRegistry(tmp_path)
    policy = machine.ThreadPolicy(None, cores=4, source="test")
    with ComputeThreads(policy, registry) as compute:
        assert torch.get_num_threads() == 4
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            (tmp_path / f"{other.pid}.pid").write_text("")
            assert compute.rebalance() == 2 and torch.get_num_threads() == 2
        finally:
            other.kill()
            other.wait()
        assert compute.rebalance() == 4
    assert torch.get_num_threads() == before


def test_explicit_dtypes_and_refusals():
    assert choose_dtype("float32").dtype == torch.float32
    assert choose_dtype("bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="rome: v_dtype must be one of auto, float32"):
        choose_dtype("int8", what="rome: v_dtype")


def test_auto_is_float32_on_x86_without_native_bfloat16(monkeypatch):
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(machine, "cpu_features", lambda: {"avx2", "fma", "avx512f"})
    monkeypatch.setattr(machine, "bfloat16_speedup", lambda: pytest.fail("no benchmark is needed here"))
    choice = choose_dtype("auto")
    assert choice.dtype == torch.float32 and "AVX512-BF16" in choice.reason


@pytest.mark.parametrize("speedup, expected", [(2.0, torch.bfloat16), (1.05, torch.float32), (0.03, torch.float32)])
def test_auto_with_native_features_follows_the_measurement(monkeypatch, speedup, expected):
    monkeypatch.setattr(machine, "cpu_features", lambda: {"avx2", "avx512_bf16", "amx_bf16"})
    monkeypatch.setattr(machine, "bfloat16_speedup", lambda: speedup)
    choice = choose_dtype("auto")
    assert choice.dtype == expected and f"{speedup:.2f}" in choice.reason


def test_speedup_is_measured_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(machine, "measure_bfloat16_speedup", lambda: calls.append(1) or 1.7)
    assert machine.bfloat16_speedup() == 1.7
    assert machine.bfloat16_speedup() == 1.7
    assert len(calls) == 1 and (tmp_path / "machine" / "bfloat16_speedup.json").is_file()


def test_measured_speedup_is_a_positive_ratio():
    assert 0 < machine.measure_bfloat16_speedup() < 100


def test_cpu_description_names_model_and_features():
    cpu = machine.cpu_description()
    assert cpu["model"] and cpu["cores"] >= 1 and isinstance(cpu["features"], list)
    assert cpu["model"] in machine.describe_cpu_line()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_free_memory_gives_freed_heap_pages_back():
    """Freed tensors' heap pages stay resident under glibc until trimmed (what made resident memory
    climb over a long replay); release_free_memory, called after every step, hands them back."""
    from lifelong.core.machine import release_free_memory

    def rss_mib() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    chunks = [torch.ones(16 * 1024) for _ in range(2000)]  # 64 KiB each: below mmap's threshold, from the heap
    last = chunks[-1]  # held: the heap's top stays in use, so only a trim inside the heap frees anything
    del chunks
    before = rss_mib()
    release_free_memory()
    assert before - rss_mib() > 60  # of the ~125 MiB freed
    assert last.sum() == 16 * 1024

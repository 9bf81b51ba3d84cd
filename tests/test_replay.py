import dataclasses
import os
import shutil

import polars as pl
import pytest
import torch

from lifelong.core.models import load_model
from lifelong.replay import checkout, replay
from lifelong.run import RunConfig, RunDirError
from streams import EditStream
from streams.errors import UserError
from tests.conftest import TINY_FT, make_edits


def config(stream_file, **kw):
    return RunConfig(model="tiny-llama", stream=str(stream_file), probe_every=2, editor_overrides=dict(TINY_FT), **kw)


def results_without_id(run):
    return run.results().drop("run_id").sort(["step", "probe", "metric", "protocol", "edit_id"])


@pytest.fixture
def full_run(tmp_path, stream_file):
    return replay(config(stream_file), tmp_path / "full", progress=False)


def test_replay_writes_results_and_deltas(full_run):
    run = full_run.run
    assert full_run.total_steps == 6 and run.completed_step() == 6
    results = pl.read_parquet(run.results_path)
    assert results.columns == [
        "run_id",
        "step",
        "timestamp",
        "probe",
        "metric",
        "protocol",
        "edit_id",
        "value",
        "preset",
    ]
    assert set(results["probe"]) == {"edit_quality", "retention"}
    assert sorted(set(results.filter(pl.col("probe") == "retention")["step"])) == [2, 4, 6]
    assert results.filter(pl.col("metric") == "retained_fraction")["value"].is_between(0, 1).all()
    assert len(list(run.deltas_dir.glob("step_*.safetensors"))) == 6
    manifest = run.manifest()
    assert manifest["identity"]["stream_steps"] == 6 and manifest["identity"]["hyperparameters"]["layer"] == 1
    assert not list(run.path.rglob(".*tmp*")), "temporary files left behind"


def test_resume_after_kill_gives_same_results(tmp_path, stream_file, full_run):
    cfg = config(stream_file)
    part = replay(cfg, tmp_path / "resumed", progress=False, stop_after=2)
    assert part.run.completed_step() == 2
    # A kill after the delta and rows of step 3 were written but before the step was marked complete:
    shutil.copy(full_run.run.deltas_dir / "step_000003.safetensors", part.run.deltas_dir / "step_000003.safetensors")
    shutil.copy(full_run.run.part_path(3), part.run.part_path(3))
    replay(cfg, tmp_path / "resumed", progress=False, stop_after=1)
    done = replay(cfg, tmp_path / "resumed", progress=False)
    assert done.steps_run == 3
    assert results_without_id(done.run).equals(results_without_id(full_run.run))
    assert done.run.manifest()["run_id"] == full_run.run.manifest()["run_id"]
    again = replay(cfg, tmp_path / "resumed", progress=False)  # already complete: nothing to do
    assert again.steps_run == 0


def test_checkout_equals_live_model(tmp_path, stream_file):
    lm = load_model("tiny-llama")
    replay(config(stream_file), tmp_path / "r", lm=lm, progress=False, stop_after=4)
    live = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    rebuilt = checkout(tmp_path / "r", 4)
    assert all(torch.equal(p, live[n]) for n, p in rebuilt.model.named_parameters())
    base = checkout(tmp_path / "r", 0)
    fresh = load_model("tiny-llama")
    assert all(torch.equal(p, q) for p, q in zip(base.model.parameters(), fresh.model.parameters()))
    with pytest.raises(ValueError, match="step 9 is not available"):
        checkout(tmp_path / "r", 9)


def test_step_at_time(full_run):
    from datetime import datetime, timezone

    run = full_run.run
    assert run.step_at(datetime(2024, 1, 3, 12, tzinfo=timezone.utc)) == 3
    assert run.step_at(datetime(2023, 1, 1, tzinfo=timezone.utc)) == 0


def test_different_config_in_same_dir_is_refused_and_nothing_lost(tmp_path, stream_file, full_run):
    before = {p: p.read_bytes() for p in full_run.run.path.rglob("*") if p.is_file()}
    with pytest.raises(RunDirError, match="differs in: seed"):
        replay(config(stream_file, seed=1), full_run.run.path, progress=False)
    assert {p: p.read_bytes() for p in full_run.run.path.rglob("*") if p.is_file()} == before


def test_non_run_directory_is_refused(tmp_path, stream_file):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty and is not a run directory"):
        replay(config(stream_file), tmp_path / "busy", progress=False)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_steps_and_batches(tmp_path, stream_file):
    r = replay(config(stream_file, steps=2, batch_size=2), tmp_path / "b", progress=False)
    assert r.total_steps == 2
    own = r.run.results().filter(
        (pl.col("probe") == "edit_quality") & (pl.col("step") > 0) & (pl.col("protocol") == "es")
    )
    assert sorted(own["edit_id"]) == ["e0", "e1", "e2", "e3"]
    with pytest.raises(ValueError, match="has 6 steps; --steps 7 asks for more"):
        replay(config(stream_file, steps=7), tmp_path / "c", progress=False)


def test_gpt2_replay_and_checkout(tmp_path, stream_file):
    cfg = RunConfig(model="tiny-gpt2", stream=str(stream_file), steps=3, editor_overrides=dict(TINY_FT))
    lm = load_model("tiny-gpt2")
    replay(cfg, tmp_path / "g", lm=lm, progress=False)
    rebuilt = checkout(tmp_path / "g", 3)
    assert all(torch.equal(p, q) for p, q in zip(rebuilt.model.parameters(), lm.model.parameters()))


def test_tied_facts_are_probed_not_applied(tmp_path):
    from dataclasses import replace

    from streams import ChainLink, EditStream
    from tests.conftest import make_edits

    edits = make_edits(2)
    edits[0] = replace(edits[0], chain=ChainLink("c1", "tied-fact"))
    EditStream(edits).to_jsonl(tmp_path / "tied.jsonl")
    result = replay(
        RunConfig(model="tiny-llama", stream=str(tmp_path / "tied.jsonl"), editor_overrides=dict(TINY_FT)),
        tmp_path / "r",
        progress=False,
    )
    assert result.total_steps == 1 and result.run.manifest()["identity"]["stream_edits"] == 1
    assert "e0" not in set(result.run.results()["edit_id"].drop_nulls())


def test_manifest_records_each_session_machine_and_precision(tmp_path, stream_file):
    cfg = RunConfig(
        model="tiny-llama",
        stream=str(stream_file),
        editor="rome",
        probe_every=3,
        editor_overrides={"layer": "1", "v_steps": "3", "cov_tokens": "256"},
    )
    replay(cfg, tmp_path / "r", progress=False, stop_after=1)
    done = replay(cfg, tmp_path / "r", progress=False, stop_after=1, threads=1)
    sessions = done.run.manifest()["sessions"]
    assert [s["from_step"] for s in sessions] == [0, 1]
    assert sessions[1]["threads"] == {
        "threads": 1,
        "decided_by": "--threads",
        "usable_cores": sessions[1]["cpu"]["cores"],
    }
    numerics = sessions[0]["numerics"]["v_dtype"]
    assert numerics["setting"] == "auto" and numerics["dtype"] in ("float32", "bfloat16") and numerics["reason"]
    assert sessions[0]["cpu"]["model"]
    assert done.run.manifest()["identity"]["hyperparameters"]["v_dtype"] == "auto"


class _InterruptedPreparation(Exception):
    pass


def test_run_interrupted_while_preparing_resumes_and_is_explained(tmp_path, stream_file, monkeypatch):
    from lifelong.editors.ft import FTEditor
    from lifelong.run import RunDir
    from lifelong.summary import format_summary

    def interrupted(self, lm):
        raise KeyboardInterrupt

    monkeypatch.setattr(FTEditor, "prepare", interrupted)
    with pytest.raises(KeyboardInterrupt):
        replay(config(stream_file), tmp_path / "r", progress=False)
    run_dir = tmp_path / "r"
    assert (run_dir / "manifest.json").is_file()
    text = format_summary(RunDir(run_dir))
    assert "no step is complete yet" in text and "Re-run the same replay command to resume" in text
    monkeypatch.undo()
    done = replay(config(stream_file), run_dir, progress=False)
    assert done.run.completed_step() == 6


def test_kill_during_the_first_manifest_write_resumes(tmp_path, stream_file):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / ".manifest.json.tmp-1").write_text('{"run_id": ')  # all a kill there leaves
    done = replay(config(stream_file), run_dir, progress=False, stop_after=1)
    assert done.run.completed_step() == 1 and not (run_dir / ".manifest.json.tmp-1").exists()


def test_missing_result_part_is_named_not_dropped(tmp_path, stream_file):
    part = replay(config(stream_file), tmp_path / "r", progress=False, stop_after=3)
    part.run.part_path(2).unlink()
    with pytest.raises(RunDirError, match=r"step_000002.parquet: result part of a completed step is missing"):
        replay(config(stream_file), tmp_path / "r", progress=False)


def test_resume_and_checkout_refuse_other_base_weights(tmp_path, stream_file):
    from lifelong.core.models import save_model_dir

    model_dir = tmp_path / "model"
    first = load_model("tiny-llama")
    save_model_dir(first.model, first.tokenizer, model_dir)
    cfg = RunConfig(model=str(model_dir), stream=str(stream_file), probe_every=2, editor_overrides=dict(TINY_FT))
    replay(cfg, tmp_path / "r", progress=False, stop_after=1)
    other = load_model("tiny-llama:1")  # same architecture, other weights, saved over the first
    save_model_dir(other.model, other.tokenizer, model_dir)
    with pytest.raises(RunDirError, match=r"holds a different run \(differs in: base_weights\)"):
        replay(cfg, tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="not the ones this run started from"):
        checkout(tmp_path / "r", 1)


def test_second_writer_is_refused(tmp_path, stream_file):
    import subprocess
    import sys

    run_dir = tmp_path / "r"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from lifelong.run import RunDir\n"
                f"with RunDir({str(run_dir)!r}).writer_lock():\n    print('held', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=rf"another process \(pid {holder.pid}\) is writing to this run"):
            replay(config(stream_file), run_dir, progress=False)
    finally:
        holder.kill()
        holder.wait()
    done = replay(config(stream_file), run_dir, progress=False, stop_after=1)  # a dead holder holds nothing
    assert done.run.completed_step() == 1


def test_stream_file_spelled_differently_is_the_same_run(tmp_path, stream_file, monkeypatch):
    import os

    replay(config(stream_file), tmp_path / "r", progress=False, stop_after=1)
    monkeypatch.chdir(stream_file.parent.parent)
    relative = os.path.join(".", stream_file.parent.name, "..", stream_file.parent.name, stream_file.name)
    done = replay(config(relative), tmp_path / "r", progress=False, stop_after=1)
    assert done.run.completed_step() == 2


def test_a_model_reused_after_releasing_the_editor_keeps_no_hooks(tmp_path, stream_file):
    """Reusing one loaded model for several runs (as benchmarks/reproduce.py does): each run's adaptor
    editor, released after its run, leaves no hook behind (a second GRACE run once met the first
    run's codebook hook and crashed)."""
    from lifelong.editors import make_editor

    lm = load_model("tiny-llama")
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())  # noqa: E731
    before = hooks()
    for seed in (0, 1):
        editor = make_editor("grace")
        try:
            replay(
                RunConfig(model="tiny-llama", editor="grace", stream=str(stream_file), seed=seed),
                tmp_path / f"g{seed}",
                lm=lm,
                editor=editor,
                progress=False,
            )
            assert hooks() > before  # the live model is the edited one until the editor is released
        finally:
            editor.release()
        assert hooks() == before


def test_keep_policy_rules():
    from lifelong.core.delta import KeepPolicy

    assert [k for k in range(1, 11) if KeepPolicy.parse("every:3").keeps(k, 10)] == [3, 6, 9, 10]
    assert [k for k in range(1, 11) if KeepPolicy.parse("last:3").keeps(k, 10)] == [8, 9, 10]
    assert [k for k in range(1, 11) if KeepPolicy.parse("log").keeps(k, 10)] == [1, 2, 4, 8, 10]
    assert all(KeepPolicy.parse(None).keeps(k, 10) for k in range(11))
    assert str(KeepPolicy.parse(" every:05 ")) == "every:5"
    for bad in ("every", "every:0", "last:-1", "log:2", "sometimes"):
        with pytest.raises(ValueError, match="expected all, log, every:K or last:N"):
            KeepPolicy.parse(bad)


@pytest.mark.parametrize("policy", ["every:2", "last:2", "log"])
def test_kept_steps_check_out_bitwise_and_resume_exactly(tmp_path, stream_file, full_run, policy):
    """Under a retention policy, disk holds the kept steps and the latest one; each kept step checks
    out bitwise equal to the run that keeps all; a killed run resumes to the same results."""
    from lifelong.core.delta import DeltaStore, KeepPolicy, StepNotKept

    cfg = config(stream_file, keep_deltas=policy)
    lm = load_model("tiny-llama")
    part = replay(cfg, tmp_path / "kept", lm=lm, progress=False, stop_after=3)
    kept_at_3 = [k for k in range(1, 4) if KeepPolicy.parse(policy).keeps(k, 3)]
    assert DeltaStore(part.run.deltas_dir, {}).kept_steps() == [0, *kept_at_3]
    done = replay(cfg, tmp_path / "kept", progress=False)  # resumed from step 3's snapshot
    assert results_without_id(done.run).equals(results_without_id(full_run.run))
    kept = [k for k in range(1, 7) if KeepPolicy.parse(policy).keeps(k, 6)]
    store = DeltaStore(done.run.deltas_dir, {})
    assert store.kept_steps() == [0, *kept]
    assert {int(p.stem.split("_")[1]) for p in done.run.deltas_dir.glob("*.safetensors")} == set(kept)
    for k in kept:
        ours, theirs = checkout(done.run.path, k), checkout(full_run.run.path, k)
        assert all(torch.equal(p, q) for p, q in zip(ours.model.parameters(), theirs.model.parameters())), k
    lost = next(k for k in range(1, 7) if k not in kept)
    with pytest.raises(
        StepNotKept,
        match=rf"step {lost} was not kept \(this run keeps deltas {policy}\); "
        r"steps that can be checked out: 0, ",
    ):
        checkout(done.run.path, lost)
    with pytest.raises(RunDirError, match="differs in: keep_deltas"):  # the policy a run started with stays
        replay(config(stream_file), done.run.path, progress=False)


def test_keep_policy_refuses_the_chains_probe_before_writing(tmp_path, stream_file):
    with pytest.raises(ValueError, match="chains probe checks out earlier steps"):
        replay(config(stream_file, keep_deltas="every:2", probes=["chains"]), tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_step_log_survives_a_cut_line_and_old_progress_files_still_read(tmp_path):
    """Per-step timings live in steps.jsonl (progress.json stays small); a line cut by a kill is
    ignored and cut off before the next append; a redone step's later line wins; a run written
    before the log, with timings inside progress.json, reads as it did."""
    import json
    from datetime import datetime, timezone

    from lifelong.run import RunDir

    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    day = datetime(2024, 1, 1, tzinfo=timezone.utc)
    for step in (0, 1):
        run.mark_complete(step, day if step else None, {"edit": float(step)}, 3)
    with open(run.step_log_path, "ab") as f:  # step 2's line, cut by a kill before progress.json
        f.write(b'{"step": 2, "timest')
    assert run.progress()["seconds"] == {"0": {"edit": 0.0}, "1": {"edit": 1.0}}
    run.mark_complete(2, day, {"edit": 2.5}, 3)  # the step redone
    assert run.progress()["seconds"]["2"] == {"edit": 2.5} and run.completed_step() == 2
    assert all(json.loads(line) for line in run.step_log_path.read_text().splitlines())
    assert len(json.loads(run.progress_path.read_text())["seconds"]) == 0  # not rewritten per step
    with open(run.step_log_path, "a") as f:  # a line for a step not yet marked complete
        f.write(json.dumps({"step": 3, "timestamp": None, "seconds": {"edit": 9.0}}) + "\n")
    assert "3" not in run.progress()["seconds"]
    lines = run.step_log_path.read_text().splitlines()
    run.step_log_path.write_text("\n".join(["garbage", *lines]) + "\n")
    with pytest.raises(RunDirError, match=r"steps.jsonl:1: damaged line"):
        run.progress()
    old = RunDir(tmp_path / "old")
    old.path.mkdir()
    old.progress_path.write_text(
        json.dumps(
            {
                "completed_step": 1,
                "total_steps": 2,
                "timestamps": {"1": None},
                "seconds": {"0": {"probe": 1.0}, "1": {"edit": 2.0}},
            }
        )
    )
    assert old.progress()["seconds"]["1"] == {"edit": 2.0}
    old.mark_complete(2, None, {"edit": 3.0}, 2)
    assert old.progress()["seconds"] == {"0": {"probe": 1.0}, "1": {"edit": 2.0}, "2": {"edit": 3.0}}


def test_retention_sample_is_in_the_identity_only_where_it_acts(tmp_path, stream_file, full_run):
    """A stream of no more edits than the cap is probed exactly, as before the cap existed: the
    identity leaves it out (older runs keep resuming); a cap that acts is recorded."""
    retention = next(p for p in full_run.run.manifest()["identity"]["probes"] if p["name"] == "retention")
    assert "sample" not in retention["options"]
    capped = replay(
        config(stream_file, probes=["retention:schedule=every:2,sample=3"]),
        tmp_path / "capped",
        progress=False,
        stop_after=1,
    )
    retention = next(p for p in capped.run.manifest()["identity"]["probes"] if p["name"] == "retention")
    assert retention["options"]["sample"] == 3


def test_symlinks_in_a_run_directory_are_refused_and_their_targets_untouched(tmp_path, stream_file, full_run):
    """A `.lock` or log that is a link would have our writes land on its target (a user's file)."""
    from lifelong.core.durable import append_line

    victim = tmp_path / "precious.txt"
    victim.write_text("mine")
    run_dir = full_run.run.path
    for name in (".lock", "steps.jsonl"):
        saved = run_dir / f"{name}.saved"
        (run_dir / name).rename(saved)
        (run_dir / name).symlink_to(victim)
        with pytest.raises(RunDirError, match=rf"{name} is a symbolic link"):
            replay(config(stream_file), run_dir, progress=False)
        assert victim.read_text() == "mine"
        (run_dir / name).unlink()
        saved.rename(run_dir / name)
    link = tmp_path / "log.jsonl"
    link.symlink_to(victim)
    with pytest.raises(OSError):
        append_line(link, "{}")
    assert victim.read_text() == "mine"


def test_resume_and_checkout_refuse_a_changed_model_config_or_tokenizer(tmp_path, stream_file):
    """Same weights, other numbers: rms_norm_eps changed in config.json, or another tokenizer."""
    import json

    from lifelong.core.models import save_model_dir

    model_dir = tmp_path / "model"
    lm = load_model("tiny-llama")
    save_model_dir(lm.model, lm.tokenizer, model_dir)
    cfg = RunConfig(model=str(model_dir), stream=str(stream_file), probe_every=2, editor_overrides=dict(TINY_FT))
    replay(cfg, tmp_path / "r", progress=False, stop_after=1)
    config_path = model_dir / "config.json"
    original = config_path.read_text()
    config_path.write_text(json.dumps({**json.loads(original), "rms_norm_eps": 1e-3}))
    with pytest.raises(RunDirError, match=r"differs in: base_config\)"):
        replay(cfg, tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="configuration of model .* not the ones this run started from"):
        checkout(tmp_path / "r", 1)
    config_path.write_text(original)
    tokenizer_path = model_dir / "tokenizer.json"
    tok = json.loads(tokenizer_path.read_text())
    tok["normalizer"] = {"type": "Lowercase"}
    tokenizer_path.write_text(json.dumps(tok))
    with pytest.raises(RunDirError, match=r"differs in: base_tokenizer\)"):
        replay(cfg, tmp_path / "r", progress=False)


def test_a_run_of_the_first_format_still_resumes(tmp_path, stream_file):
    """A manifest without "format" (written before the config/tokenizer fingerprints) resumes as before."""
    import json

    run_dir = tmp_path / "old"
    replay(config(stream_file), run_dir, progress=False, stop_after=2)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["format"] == 2 and {"base_config", "base_tokenizer"} <= set(manifest["identity"])
    del manifest["format"], manifest["identity"]["base_config"], manifest["identity"]["base_tokenizer"]
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    result = replay(config(stream_file), run_dir, progress=False)
    assert result.run.completed_step() > 2


def test_a_step_of_too_many_edits_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """Edits sharing one timestamp form one step; a step past the limit (300,000 edits once grew past 20 GB)
    is refused in one line that names the way out, and --batch-size splits it."""
    import lifelong.replay as engine

    edits = [dataclasses.replace(e, timestamp=make_edits(1)[0].timestamp) for e in make_edits(5)]
    path = tmp_path / "one-step.jsonl"
    EditStream(edits).to_jsonl(path)
    monkeypatch.setattr(engine, "MAX_EDITS_PER_STEP", 4)
    with pytest.raises(UserError, match=r"step 1 holds 5 edits .* at most 4: give --batch-size"):
        replay(config(path), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    assert replay(config(path, batch_size=4, steps=1), tmp_path / "r2", progress=False).total_steps == 1


def test_a_flipped_bit_in_any_results_file_is_refused_by_name(tmp_path, stream_file, full_run):
    """Every byte of every result part and of the consolidated table: a flip is refused naming the file
    (before: some flips silently changed a value, a column name, or escaped as a parquet-reader panic)."""
    import random

    from lifelong.run import RunDir

    run = RunDir(full_run.run.path)
    files = [run.results_path, run.part_path(0), run.part_path(2)]
    rng = random.Random(0)
    for path in files:
        original = path.read_bytes()
        for offset in sorted(rng.sample(range(len(original)), 12)) + [0, len(original) - 1]:
            damaged = bytearray(original)
            damaged[offset] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(damaged))
            if path == run.results_path:
                run.progress_path.touch()  # results.parquet stays current: os.utime keeps it newer below
                os.utime(run.results_path)
            with pytest.raises(RunDirError, match=rf"{path.name}: damaged results file"):
                run.results() if path == run.results_path else run.joined_parts()
        path.write_bytes(original)
    assert run.results().height == full_run.run.results().height


def test_a_run_that_never_completed_an_edit_step_is_replaced_by_a_corrected_command(tmp_path, stream_file, capsys):
    """AlphaEdit's defaults on a tiny model are refused in prepare, after the manifest is written; the
    corrected command replaces that run instead of being refused as 'a different run'. A run with a
    completed edit step, or a file a run does not write, is never replaced."""
    out = tmp_path / "r"
    base = dict(model="tiny-llama", editor="alphaedit", stream=str(stream_file), steps=1)
    with pytest.raises(UserError, match="no eigenvalue below"):
        replay(RunConfig(**base), out, progress=False)
    assert (out / "manifest.json").is_file()
    fixed = replay(RunConfig(**base, editor_overrides={"nullspace_threshold": "10"}), out, progress=False)
    assert fixed.run.completed_step() == 1 and "never completed an edit step" in capsys.readouterr().err
    with pytest.raises(RunDirError, match="holds a different run"):
        replay(RunConfig(**base, editor_overrides={"nullspace_threshold": "20"}), out, progress=False)

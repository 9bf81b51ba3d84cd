"""benchmarks/run_archive.py: a finished run's figures kept in the repository give the tables the same
rows as the run directory they came from, and say which commit measured them."""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl
import pytest

from lifelong.replay import replay
from lifelong.run import RunConfig, RunDir
from tests.conftest import TINY_FT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import generation_table  # noqa: E402
import lifelong_table  # noqa: E402
import run_archive  # noqa: E402


@pytest.fixture
def finished_run(tmp_path, stream_file):
    config = RunConfig(
        model="tiny-llama",
        stream=str(stream_file),
        editor="ft",
        editor_overrides=dict(TINY_FT),
        probes=["edit_quality", "retention:schedule=every:1,sample=none"],
    )
    return replay(config, tmp_path / "work" / "ft", progress=False).run


def test_an_archive_reads_back_the_kept_rows_manifest_and_timings(tmp_path, finished_run):
    stored = run_archive.archive(finished_run, tmp_path / "store" / "ft", generation_table.kept_rows, {"x": 1.5})
    loaded = run_archive.load(tmp_path / "store" / "ft")
    assert loaded is not None and loaded.results.equals(stored.results)
    kept = generation_table.kept_rows(finished_run.results())
    assert loaded.results.sort(run_archive.COLUMNS[:5]).equals(kept.sort(run_archive.COLUMNS[:5]))
    assert loaded.manifest["identity"] == finished_run.manifest()["identity"]
    assert loaded.progress["completed_step"] == finished_run.progress()["completed_step"]
    assert loaded.progress["seconds"] == finished_run.progress()["seconds"]
    assert loaded.extra == {"x": 1.5}
    assert run_archive.load(tmp_path / "store" / "absent") is None


def test_an_unfinished_run_is_neither_archived_nor_read(tmp_path, stream_file):
    config = RunConfig(model="tiny-llama", stream=str(stream_file), editor="ft", editor_overrides=dict(TINY_FT))
    run = replay(config, tmp_path / "part", progress=False, stop_after=1).run
    with pytest.raises(ValueError, match="not finished"):
        run_archive.archive(run, tmp_path / "store" / "part", generation_table.kept_rows)
    assert run_archive.finished(run, tmp_path / "store" / "part", generation_table.kept_rows) is None


def test_the_generation_table_reads_the_archive_when_the_run_directory_is_gone(tmp_path, finished_run):
    work, store = finished_run.path.parent, tmp_path / "store"
    (work / "ft-3").symlink_to(finished_run.path)  # the table's name for an editor's run of 3 edits
    fresh = generation_table.report(work, ["ft"], 3, "tiny-llama", store)
    assert (store / "ft-3.parquet").is_file() and (store / "ft-3.json").is_file()
    commit = run_archive.load(store / "ft-3").commit
    assert f"Measured at commit {commit}: ft." in fresh
    (work / "ft-3").unlink()
    assert generation_table.report(tmp_path / "elsewhere", ["ft"], 3, "tiny-llama", store) == fresh
    assert "ft (0/3 steps)" in generation_table.report(tmp_path / "elsewhere", ["ft"], 3, "tiny-llama", None)


def test_a_lifelong_arm_from_its_archive_equals_the_arm_from_its_run(tmp_path, finished_run):
    arm = lifelong_table.Arm("ft", "ft")
    work, store = finished_run.path.parent, tmp_path / "store"
    (work / "forward.jsonl").write_text('{"seconds": 0.5}\n{"seconds": 0.7}\n{"seconds": 2.0}\n')
    fresh = lifelong_table.load_arm(work, arm, store)
    assert isinstance(fresh, lifelong_table.ArmResult) and fresh.forward == 0.7
    archived = lifelong_table.load_arm(tmp_path / "elsewhere", arm, store)  # another machine: no run, no yardstick
    assert isinstance(archived, lifelong_table.ArmResult)
    assert archived.results.equals(fresh.results) and archived.forward == 0.7
    same = ("last", "edits", "seconds_per_edit")
    assert [getattr(archived, k) for k in same] == [getattr(fresh, k) for k in same]
    assert archived.commit == fresh.commit == run_archive.load(store / "ft").commit
    assert lifelong_table.load_arm(tmp_path / "elsewhere", arm, None) == "ft (not started)"
    assert RunDir(finished_run.path).exists()  # archiving reads the run, it never changes it


def test_the_lifelong_archive_keeps_only_what_the_table_reads():
    rows = [
        (0, "edit_quality", "efficacy", "es", "e0", 0.0),
        (0, "edit_quality", "efficacy", "exact", "e0", 0.0),  # θ0's other protocols: not read
        (1, "edit_quality", "generalization", "ps", "e0", 1.0),
        (1, "retention", "retention", "es", "e0", 1.0),
        (1, "retention", "retention", "gen_exact@qa", "e0", 1.0),  # not read
        (0, "perplexity", "chunk_tokens", "corpus", "chunk:0", 128.0),
        (1, "perplexity", "chunk_nll", "corpus", "chunk:0", 400.0),
        (0, "perplexity", "chunk_nll", "corpus", "chunk:0", 390.0),  # an earlier step's chunks: not read
        (1, "perplexity", "ratio", "corpus", None, 1.1),
        (1, "weight_drift", "norm_ratio", "max", None, 1.01),
    ]
    frame = pl.DataFrame(rows, schema=list(run_archive.COLUMNS), orient="row")
    kept = lifelong_table.kept_rows(frame)
    assert kept.height == 7
    assert not kept.filter(pl.col("protocol") == "gen_exact@qa").height
    assert kept.filter(pl.col("metric") == "chunk_nll")["step"].to_list() == [1]


def test_a_theta0_kit_stands_for_the_run_it_came_from(tmp_path, stream_file):
    """The archived step 0 alone is borrowed like the whole run: a run that takes θ0 from the kit equals
    one that computes it, row for row (generations and references included)."""
    probes = ["edit_quality:generation=question+qa", "retention:schedule=end,generation=question"]
    config = RunConfig(
        model="tiny-llama", stream=str(stream_file), editor="ft", editor_overrides=dict(TINY_FT), probes=probes
    )
    source = replay(config, tmp_path / "ft", progress=False).run
    kit = run_archive.theta0_kit(source, tmp_path / "store" / run_archive.THETA0)
    assert sorted(p.name for p in kit.iterdir()) == sorted(
        ["manifest.json", "progress.json", "reference.json", "results", "generations", "steps.jsonl"]
    )
    assert RunDir(kit).completed_step() == 0
    grace = RunConfig(
        model="tiny-llama",
        stream=str(stream_file),
        editor="grace",
        editor_overrides={"layer": "2", "eps_init": "1.0", "max_steps": "10"},
        probes=probes,
    )
    computed = replay(grace, tmp_path / "computed", progress=False).run
    borrowed = replay(grace, tmp_path / "borrowed", progress=False, references_from=kit).run
    assert borrowed.manifest()["references_from"]["run_id"] == source.manifest()["run_id"]
    key = ["step", "probe", "metric", "protocol", "edit_id"]
    assert borrowed.results().drop("run_id").sort(key).equals(computed.results().drop("run_id").sort(key))
    assert generation_table.references_source([tmp_path / "absent"], tmp_path / "x", kit) == kit
    assert generation_table.references_source([tmp_path / "absent"], tmp_path / "x", None) is None


def test_an_archived_identity_names_its_stream_by_content_not_by_the_checkouts_path(tmp_path, finished_run):
    stored = run_archive.archive(finished_run, tmp_path / "store" / "ft", generation_table.kept_rows)
    identity = dict(stored.manifest["identity"])
    assert run_archive.identity_differences(stored, identity) == []
    moved = {**identity, "stream": "/elsewhere/checkout/runs/streams/same.jsonl"}  # same file, another place
    assert run_archive.identity_differences(stored, moved) == []
    other = {**moved, "stream_hash": "0" * 16}  # another content
    assert run_archive.identity_differences(stored, other) == ["stream", "stream_hash"]
    assert run_archive.identity_differences(stored, {**identity, "seed": 7}) == ["seed"]


def test_generation_table_rows_put_the_lenient_score_beside_the_strict_one():
    """Hand-worked: four edits scored at their own step (1, 2), with the answers' exact and contains
    scores per context; the cells are each score's share over the edits, with n."""
    rows = []
    for edit, step in (("a", 1), ("b", 1), ("c", 2), ("d", 2)):
        forced = {"es": 1.0, "exact": 1.0}
        exact = {"question": 1.0 if edit == "a" else 0.0, "qa": 0.0, "chat": 0.0}
        contains = {"question": 1.0, "qa": 0.0, "chat": 0.0 if edit == "d" else 1.0}
        scores = {**forced, **{f"gen_exact@{c}": v for c, v in exact.items()}}
        scores |= {f"gen_contains@{c}": v for c, v in contains.items()}
        for protocol, value in scores.items():
            rows.append(("edit_quality", "efficacy", protocol, edit, step, value))
    results = pl.DataFrame(rows, schema=["probe", "metric", "protocol", "edit_id", "step", "value"], orient="row")
    efficacy = generation_table.table_rows(results, "x")[0]
    assert efficacy[:2] == ["x", "efficacy, own step"]
    assert efficacy[4].startswith("0.25 [") and efficacy[4].endswith("n=4")  # gen@question: edit a only
    assert efficacy[6].startswith("0 [")  # gen@chat
    assert efficacy[7].startswith("1 [")  # the gap: forced 1 − the lowest context (qa or chat, 0)
    assert [c.split(" ")[0] for c in efficacy[8:]] == ["1", "0", "0.75"]  # contains@question, @qa, @chat
    ps = [("edit_quality", "generalization", "ps", e, 1, v) for e, v in zip("abcdefgh", (0, 0.5, 1, 0.5, 1, 1, 0, 0.5))]
    with_ps = pl.concat([results, pl.DataFrame(ps, schema=results.schema, orient="row")])
    paraphrase = generation_table.table_rows(with_ps, "x")[1]
    assert paraphrase[2].split(" ")[0] == "0.5625" and "n=8" in paraphrase[2]
    # the seeded bootstrap sees the edits in one order, whatever the rows' order (or polars' hashing) gives
    for step in ("own", "last"):
        for frame in (with_ps, with_ps.reverse()):
            keys = list(generation_table.per_edit(frame, "edit_quality", "generalization", "ps", step))
            assert keys == sorted(keys) == list("abcdefgh")
    header = generation_table.report(Path("/nonexistent"), [], 4, "tiny-llama").splitlines()[2]
    assert header.count("|") == len(efficacy) + 1 and "contains@chat" in header

"""Nothing waited on without a word (#37): each phase of a first run that used to show nothing (the
imports, the model's load, ROME's context templates from θ0, the θ0 references within a probe) says
what it does before its work starts, and its line moves."""

from __future__ import annotations

import time

import pytest

from tests.conftest import make_edits


def test_a_replay_names_each_formerly_silent_phase_before_its_work(tmp_path, stream_file, monkeypatch, capsys):
    """What stderr holds when the model's load, the templates' sampling and the θ0 references begin:
    the phase's own line is already there (stderr taken for a terminal, where status lines show)."""
    import lifelong.core.bars as bars
    import lifelong.replay
    from lifelong.cli import main
    from lifelong.editors import locate
    from probes.edit_quality import EditQualityProbe

    seen: dict[str, str] = {}
    err = []

    def when_called(owner, name: str):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            err.append(capsys.readouterr().err)
            seen.setdefault(name, "".join(err))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    monkeypatch.setattr(bars, "_on_terminal", lambda: True, raising=False)
    when_called(lifelong.replay, "load_model")
    when_called(locate, "sample_continuations")
    when_called(EditQualityProbe, "prepare")
    argv = ["replay", "--model", "tiny-llama", "--editor", "rome", "--stream", str(stream_file), "--steps", "1"]
    code = main([*argv, "--threads", "1", "--set", "v_steps=2", "--out", str(tmp_path / "run")])
    err.append(capsys.readouterr().err)
    assert code == 0, "".join(err)
    assert "starting: importing torch and transformers: " in seen["load_model"]
    assert "loading model tiny-llama: 00:00 elapsed" in seen["load_model"]
    # tiny-llama's 5 start words give 2 samples each at 2 lengths: 20 templates, 9 sampling passes
    assert "rome: generating 20 context templates from θ0:   0%|" in seen["sample_continuations"]
    assert "/9 [" in seen["sample_continuations"]
    assert "θ0 references 1/2: edit_quality: 0 items" in seen["prepare"]
    assert "writing the plots and the summary: " in "".join(err)


def test_the_theta0_references_advance_with_each_scored_batch(monkeypatch):
    """The θ0 bar counts the items each probe has scored, batch by batch (before, it moved once per
    probe: one long probe left it at 0); its count ends at the distinct pairs scored."""
    import lifelong.core.bars as bars
    from lifelong.core.models import load_model
    from lifelong.core.scorer import Scorer
    from probes import EditQualityProbe, ProbeContext, ProbeSuite, RetentionProbe

    class Recording:
        def __init__(self, **kwargs):
            self.desc, self.updates = kwargs.get("desc", ""), []

        def set_description_str(self, desc):
            self.desc = desc

        def update(self, n=1):
            self.updates.append((self.desc, n))

        def close(self):
            pass

    made: list[Recording] = []
    monkeypatch.setattr(bars, "bar", lambda *a, **k: made.append(Recording(**k)) or made[-1])
    lm = load_model("tiny-llama")
    scorer = Scorer(lm.model, lm.tokenizer, max_batch_tokens=32)  # a small budget: several batches
    edits = tuple(make_edits(6))
    ctx = ProbeContext(step=0, timestamp=None, batch=(), history=[], scorer=scorer, upcoming=edits)
    ProbeSuite([EditQualityProbe(), RetentionProbe()]).prepare(ctx)
    (progress,) = made
    # edit_quality at θ0: the neighbours' answers and both targets of each edit
    pairs = len({(n.prompt, n.answer) for e in edits for n in e.neighborhood}) + 2 * len(edits)
    assert len(progress.updates) >= 3 and all(d == "θ0 references 1/2: edit_quality" for d, _ in progress.updates)
    assert sum(n for _, n in progress.updates) == pairs
    assert scorer.progress is None  # the hook is the suite's only while it prepares
    counts: list[int] = []
    with scorer.reporting(counts.append):  # perplexity's and the generation protocols' batches report too
        scorer.rolling_nll([[1, 2, 3, 4], [5, 6, 7], [8, 9]], max_batch_tokens=4)
        assert len(counts) >= 2 and sum(counts) == 3
        scorer.generate_answers(["Where is Paris?", "Who wrote Hamlet?"], "question", [2, 2])
        assert sum(counts) == 5


def test_a_phase_line_moves_until_its_block_ends_and_shows_only_on_a_terminal_unless_quiet(capsys, monkeypatch):
    """A status line on a terminal, redrawn as its time passes; none where stderr is kept (a log, a
    capture: a refusal inside the phase stays one line there), none under --quiet (TQDM_DISABLE)."""
    import lifelong.core.bars as bars
    from lifelong.core.bars import phase

    with phase("loading something", tick_s=0.02) as line:
        time.sleep(0.05)
    assert line is None and capsys.readouterr().err == ""  # pytest's capture is no terminal
    monkeypatch.setattr(bars, "_on_terminal", lambda: True)
    with phase("loading something", tick_s=0.02):
        time.sleep(0.3)
    err = capsys.readouterr().err
    assert err.count("loading something: 00:00 elapsed") >= 2, err  # drawn at once, then redrawn by the ticks
    assert err.endswith("\r"), "the line is cleared when the block ends"
    monkeypatch.setenv("TQDM_DISABLE", "1")
    with phase("loading something", tick_s=0.02) as line:
        time.sleep(0.05)
    assert line is None and capsys.readouterr().err == ""


@pytest.mark.parametrize("length", [5, 10])
def test_the_templates_bar_counts_every_sampling_pass(length):
    import torch

    from lifelong.core.models import load_model
    from lifelong.editors.locate import GENERATION_STARTS, sample_continuations, sampling_passes

    lm = load_model("tiny-llama")
    for starts in (GENERATION_STARTS["easyedit"], (lm.tokenizer.eos_token,)):
        passes = []
        sample_continuations(lm, starts, 1, length, torch.Generator().manual_seed(0), on_pass=lambda: passes.append(1))
        assert len(passes) == sampling_passes(lm, starts, length)

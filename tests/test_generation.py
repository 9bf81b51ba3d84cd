"""Generation-based edit evaluation (issue #38, docs/METRICS.md §6): batched greedy generation with the
authors' stop rules, and the generation protocols of the edit-quality and retention probes."""

from __future__ import annotations

import re
import string

import pytest
import torch

from lifelong.core import model_access
from lifelong.core.model_access import QA_INSTRUCTION, generate_answers, in_context, stop_strings, strip_stop

PROMPTS = [
    "The capital of France is",
    "Q",
    "A much longer prompt, with more positions than any of the others, ends with",
    "abc def",
    "The capital of France is",  # a repeated prompt
]


def one_at_a_time(lm, prompt: str, budget: int, stops) -> list[int]:
    """The authors' call (R evaluate_utils.py:120-129): one prompt, no padding, HF's own stop_strings."""
    tok = lm.tokenizer
    enc = tok(prompt, return_tensors="pt")
    extra = {"stop_strings": list(stops), "tokenizer": tok} if stops else {}
    with torch.no_grad():
        out = lm.model.generate(**enc, max_new_tokens=budget, do_sample=False, pad_token_id=tok.eos_token_id, **extra)
    return out[0, enc.input_ids.shape[1] :].tolist()


def seen_characters(lm, budget: int) -> list[str]:
    """Printable ASCII characters the model writes a few tokens into its answers (stop strings that fire)."""
    texts = [lm.tokenizer.decode(one_at_a_time(lm, p, budget, None)[2:]) for p in PROMPTS[:3]]
    chars = [c for t in texts for c in t if c.isascii() and c.isprintable() and c != " "]
    assert len(chars) >= 2, texts
    return chars[:2]


def test_batched_generation_equals_one_prompt_at_a_time(tiny):
    """Token for token, under the natural stop and under stop strings the random model does write."""
    for stops in (stop_strings(tiny.tokenizer), seen_characters(tiny, 12)):
        got = generate_answers(tiny.model, tiny.tokenizer, PROMPTS, [12] * len(PROMPTS), stops)
        want = [one_at_a_time(tiny, p, 12, stops) for p in PROMPTS]
        assert [list(g.ids) for g in got] == want
    assert any(len(w) < 12 for w in want), "the stop strings never fired: the test shows nothing"
    # a small batch budget splits the prompts over several batches: same answers
    small = model_access.greedy_ids(
        tiny.model, tiny.tokenizer, [tiny.tokenizer(p).input_ids for p in PROMPTS], [12] * 5, max_batch_tokens=40
    )
    assert [list(s) for s in small] == [one_at_a_time(tiny, p, 12, None) for p in PROMPTS]


def test_stop_rules_on_a_hand_built_case(tiny):
    tok = tiny.tokenizer
    free = one_at_a_time(tiny, PROMPTS[0], 12, None)  # the unstopped answer
    pieces = [tok.decode([t]) for t in free]
    k = next(
        j for j in range(2, 12) if pieces[j].isascii() and pieces[j].isalnum() and pieces[j] not in tok.decode(free[:j])
    )
    # A stop string ends the answer at the token that completes it, and the ids keep that token.
    (got,) = generate_answers(tiny.model, tok, PROMPTS[:1], [12], [pieces[k]])
    assert list(got.ids) == free[: k + 1] and got.text == tok.decode(free[: k + 1])
    # Token budgets, one per prompt (the answer-length budget): no stop strings, each row its own length.
    got = generate_answers(tiny.model, tok, PROMPTS[:3], [1, 3, 5], None)
    assert [len(g.ids) for g in got] == [1, 3, 5]
    assert [list(g.ids) for g in got] == [one_at_a_time(tiny, p, n, None) for p, n in zip(PROMPTS[:3], [1, 3, 5])]
    with pytest.raises(ValueError, match="at least 1"):
        generate_answers(tiny.model, tok, PROMPTS[:1], [0], None)


def test_the_authors_suffix_strip():
    """One pass over ".", newline, EOS string, in that order, each at most once (R evaluate_utils.py:138-143)."""
    suffixes = (".", "\n", "</s>")
    assert strip_stop(" Paris.", suffixes) == " Paris"  # the leading space stays
    assert strip_stop("Paris..", suffixes) == "Paris."  # once
    assert strip_stop("Paris.\n", suffixes) == "Paris."  # "." is checked before the newline goes
    assert strip_stop("Paris\n</s>", suffixes) == "Paris\n"
    assert strip_stop("Paris.</s>", suffixes) == "Paris."
    assert strip_stop("St. Louis", suffixes) == "St. Louis"


def test_contexts(tiny):
    tok = tiny.tokenizer
    assert in_context(tok, "question", ["Who?"]) == ["Who?"]
    assert (
        in_context(tok, "qa", ["Who?"])
        == ["Please answer the question:\n\nQ: Who?\nA:"]
        == [QA_INSTRUCTION.format(question="Who?")]
    )
    with pytest.raises(ValueError, match="no chat template"):
        in_context(tok, "chat", ["Who?"])
    with pytest.raises(ValueError, match="unknown context 'poem'"):
        in_context(tok, "poem", ["Who?"])
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    try:
        assert in_context(tok, "chat", ["Who?"]) == ["<user>Who?<assistant>"]
    finally:
        tok.chat_template = None


# ---------------------------------------------------------------------- the probes' generation protocols


def test_normalised_exact_and_contains():
    from probes.generation import gen_contains, gen_exact, normalize

    assert normalize("  The  Eiffel-Tower!") == "eiffeltower"  # punctuation goes before articles and spaces
    assert gen_exact(" Paris", "paris") == gen_exact("The Paris.", "Paris") == 1.0
    assert gen_exact("Paris is nice", "Paris") == 0.0
    assert gen_contains("It is Paris, France", "Paris") == 1.0
    assert gen_contains("Parisian", "Paris") == 0.0  # whole words only
    assert gen_contains("the", "the") == 1.0 and gen_contains("a", "the") == 1.0  # both normalise to ''


@pytest.mark.parametrize(
    "spec, message",
    [
        ("edit_quality:generation=poem", "probe 'edit_quality': generation: unknown context 'poem'"),
        ("edit_quality:generation=qa+qa", "a context is given twice"),
        ("edit_quality:generation=+", "unknown context '+'"),
        ("retention:generation=qa,stop=never", "stop: unknown stop rule 'never': expected natural, tokens, answer"),
        ("edit_quality:generation=qa,max_new_tokens=0", "max_new_tokens must be at least 1"),
        ("edit_quality:generation=qa,answer_margin=-1", "answer_margin must not be negative"),
        ("retention:generation=qa,generation_sample=0", "generation_sample must be at least 1"),
        ("edit_quality:generation_sample=3", "has no option 'generation_sample'"),
        ("edit_quality:generation=question,qa", "(bad item 'qa'; several values of one key are joined with '+')"),
    ],
)
def test_bad_generation_options_are_one_line_errors(spec, message):
    from probes import make_probe
    from streams.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)) as err:
        make_probe(spec)
    assert "\n" not in str(err.value)


def test_generation_is_off_by_default_and_out_of_the_identity():
    """Runs without generation keep their probe configuration, so their identity and run id."""
    from probes import make_probe

    assert make_probe("edit_quality").config() == {"name": "edit_quality", "schedule": "every:1"}
    assert make_probe("retention").config()["options"] == {"fraction": 1.0, "seed": 0, "sample": 500}
    on = make_probe("edit_quality:generation=question+qa,stop=answer,answer_margin=2").config()
    assert on["options"] == {"generation": "question+qa", "stop": "answer", "max_new_tokens": 50, "answer_margin": 2}
    assert [s.name for s in make_probe("edit_quality:generation=question+qa").options.settings()] == ["question", "qa"]
    names = [
        make_probe(f"edit_quality:generation=qa,{o}").options.settings()[0].name
        for o in ("stop=tokens", "max_new_tokens=9")
    ]
    assert names == ["qa/tokens50", "qa/natural9"]


GEN_PROBES = [
    "edit_quality:generation=question+qa+chat",
    "retention:schedule=every:2,generation=question+qa,generation_sample=3",
]


def _replay(path, stream_file, stop_after=None):
    from lifelong.core.models import load_model
    from lifelong.replay import replay
    from lifelong.run import RunConfig
    from tests.conftest import TINY_FT

    config = RunConfig(model="tiny-llama", stream=str(stream_file), editor_overrides=dict(TINY_FT), probes=GEN_PROBES)
    with pytest.warns(UserWarning, match="'chat' skipped: the tokenizer has no chat template"):
        return replay(config, path, lm=load_model("tiny-llama"), progress=False, stop_after=stop_after).run


def test_a_replay_scores_generation_protocols_keeps_the_answers_and_resumes(tmp_path, stream_file):
    import polars as pl

    from probes.generation import rescore

    run = _replay(tmp_path / "run", stream_file)
    results = run.results()
    gen = results.filter(pl.col("protocol").str.starts_with("gen_"))
    got = {(m, p) for m, p in gen.select("metric", "protocol").unique().iter_rows()}
    for setting in ("question", "qa"):  # chat: skipped, the tiny tokenizer has no template
        for metric in ("efficacy", "generalization", "locality"):
            assert (metric, f"gen_exact@{setting}") in got and (metric, f"gen_contains@{setting}") in got
        assert ("locality", f"gen_unchanged@{setting}") in got
        assert ("retained_fraction", f"gen_exact@{setting}") in got
    assert not any("chat" in p for _, p in got)
    from probes.metric_table import out_of_range

    assert out_of_range(gen.select("probe", "metric", "protocol", "edit_id", "step", "value").iter_rows()) == []
    # step 0: θ0's efficacy by generation, like the teacher-forced rows
    assert gen.filter((pl.col("step") == 0) & (pl.col("metric") == "efficacy")).height == 6 * 2 * 2
    # retention generated for a sample of 3 of the edits so far, and says so
    last = results.filter((pl.col("step") == 6) & (pl.col("protocol") == "gen_exact@qa"))
    assert last.filter(pl.col("metric") == "retention").height == 3
    meta = {m: v for m, v in last.filter(pl.col("edit_id").is_null()).select("metric", "value").iter_rows()}
    assert meta["sample_size"] == 3 and meta["sample_population"] == 6

    # The stored answers re-score the run: every per-edit generation row, recomputed without the model.
    answers = run.generations()
    assert answers.height and set(answers["setting"]) == {"question", "qa"}
    assert all(len(i) >= 1 for i in answers["ids"])
    stored = gen.filter(pl.col("edit_id").is_not_null()).select(
        "step", "probe", "metric", "protocol", "edit_id", "value"
    )
    again = rescore(answers)
    assert stored.sort(stored.columns).equals(again.sort(again.columns))

    # show leads with the strictest retained fraction beside ES, naming both
    from lifelong.summary import format_summary, retention_headline, summary_table

    headline = format_summary(run).split("\n\n")[1]
    table = summary_table(run).filter(pl.col("measure") == "retained fraction at last step")
    assert headline.startswith("retained at the last step: ES ") and "strictest, gen_exact@question " in headline
    assert "the greedy answer, normalised, is the new target" in headline
    value = dict(zip(table["protocol"], table["value"]))
    without_default = retention_headline(table.filter(pl.col("protocol") != "gen_exact@question"))
    assert without_default is not None and "strictest, gen_exact@qa " in without_default
    doctored = table.with_columns(
        pl.when(pl.col("protocol") == "gen_exact@question").then(None).otherwise(pl.col("value")).alias("value")
    )
    assert "strictest, gen_exact@qa " in (retention_headline(doctored) or "")  # a figure without a value is passed over
    assert value["es"] is not None
    teacher_forced = retention_headline(table.filter(~pl.col("protocol").str.starts_with("gen_")))
    assert teacher_forced is not None and "strictest, exact " in teacher_forced and "teacher-forced" in teacher_forced
    assert retention_headline(table.filter(pl.col("protocol") != "es")) is None

    # Killed after two steps and resumed: the same rows and answers as the uninterrupted run.
    part = _replay(tmp_path / "part", stream_file, stop_after=2)
    assert part.completed_step() == 2
    resumed = _replay(tmp_path / "part", stream_file)
    key = ["step", "probe", "metric", "protocol", "edit_id"]
    assert resumed.results().sort(key).equals(results.sort(key))
    assert resumed.generations().equals(answers)


def test_a_damaged_generations_part_is_refused(tmp_path, stream_file):
    import polars as pl

    from lifelong.run import GENERATIONS_DIGEST, RunDirError

    run = _replay(tmp_path / "run", stream_file)
    part = run.generation_path(3)
    df = pl.read_parquet(part)
    digest = pl.read_parquet_metadata(part)[GENERATIONS_DIGEST]
    df.with_columns(pl.lit("Rome").alias("text")).write_parquet(part, metadata={GENERATIONS_DIGEST: digest})
    with pytest.raises(RunDirError, match="step_000003.parquet: damaged file"):
        run.generations()


def test_teacher_forcing_passes_where_generation_fails(tiny):
    """A hand-built case on a real (tiny) model: the answer is the first two tokens of the model's own
    greedy answer (e.g. "f!"), so each of its tokens is the argmax given the gold prefix (teacher-forced
    exact = 1), but the model goes on writing the same word (the next token is a letter or digit: "f!w…"),
    so what it says is not the answer: gen_exact = gen_contains = 0. Cut to the answer's length, as truncated
    generation does, it would pass: the length leak the paper names."""
    from datetime import datetime, timezone

    from lifelong.core.scorer import Scorer
    from probes import EditQualityProbe, ProbeContext, make_probe
    from probes.generation import normalize
    from streams import Edit

    tok = tiny.tokenizer
    subjects = [f"Item{i}" for i in range(2000)]
    prompts = [f"The code of {s} is" for s in subjects]
    starts = model_access.greedy_ids(tiny.model, tok, [tok(p).input_ids for p in prompts], [3] * len(prompts))
    printable = set(string.ascii_letters + string.digits + string.punctuation) - {"."}

    def fits(ids) -> bool:  # two printable tokens that name something, and a third that lengthens the word
        chars = [tok.decode([t]) for t in ids]
        head = "".join(chars[:2])
        return len(ids) == 3 and set(chars) <= printable and bool(normalize(head)) and chars[2].isalnum()

    found = [k for k, ids in enumerate(starts) if fits(ids)]
    assert found, "no prompt whose greedy answer fits: pick more subjects"
    k = found[0]
    answer = tok.decode(list(starts[k][:2]))
    edit = Edit(
        id="e",
        timestamp=datetime(2024, 1, 1, tzinfo=timezone.utc),
        subject=subjects[k],
        relation_id="code",
        prompt="The code of {} is",
        target_new=answer,
        target_true="zz",
    )
    assert edit.rendered_prompt == prompts[k]
    scorer = Scorer(tiny.model, tok)

    def rows(probe: EditQualityProbe) -> dict[str, float]:
        ctx = ProbeContext(step=1, timestamp=None, batch=(edit,), history=[(edit,)], scorer=scorer)
        return {r.protocol: r.value for r in probe.measure(ctx) if r.metric == "efficacy"}

    natural = rows(make_probe("edit_quality:generation=question+qa"))
    assert natural["exact"] == 1.0  # teacher forcing: the edit "holds"
    assert natural["gen_exact@question"] == 0.0 and natural["gen_contains@question"] == 0.0
    truncated = rows(make_probe("edit_quality:generation=question,stop=answer"))
    assert truncated["gen_exact@question/answer+0"] == 1.0  # cut to the answer's length, it passes


def test_the_scorer_asks_the_rewritten_question_inside_the_context(tiny):
    """An in-context memory rewrites the question; the context (here the QA instruction) wraps the rewrite."""
    from lifelong.core.scorer import Scorer

    rewrite = lambda prompts: [f"Fact: Paris is in Italy. {p}" for p in prompts]  # noqa: E731
    got = Scorer(tiny.model, tiny.tokenizer, rewrite=rewrite).generate_answers(["Where is Paris?"], "qa", [6])
    want = generate_answers(
        tiny.model,
        tiny.tokenizer,
        [QA_INSTRUCTION.format(question="Fact: Paris is in Italy. Where is Paris?")],
        [6],
        stop_strings(tiny.tokenizer),
    )
    plain = Scorer(tiny.model, tiny.tokenizer).generate_answers(["Where is Paris?"], "qa", [6], natural_stop=False)
    assert got == want and len(plain[0].ids) == 6 and plain != want


def test_retention_generation_needs_the_same_setting_in_edit_quality():
    from lifelong.replay import default_suite
    from lifelong.run import RunConfig
    from streams.errors import UserError

    with pytest.raises(UserError, match=re.escape("generation setting 'question' is not run by edit_quality")) as err:
        default_suite(RunConfig(probes=["retention:generation=question+qa"], steps=1))
    assert "--probe edit_quality:generation=question+qa" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match=re.escape("'question/tokens50' is not run by edit_quality, whose own-step")):
        default_suite(
            RunConfig(probes=["edit_quality:generation=question", "retention:generation=question,stop=tokens"])
        )
    suite = default_suite(RunConfig(probes=["edit_quality:generation=question+qa", "retention:generation=qa"]))
    assert [p.name for p in suite.probes] == ["edit_quality", "retention"]

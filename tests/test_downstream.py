"""Downstream tasks: scorers on hand-made items, readers on small records and the shared files,
the built-in suite, and the probe's drift rows."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lifelong.core.model_access import generate
from lifelong.core.models import load_model
from lifelong.core.options import OptionError
from lifelong.core.scorer import Scorer, Scores
from probes import ProbeContext, make_probe
from probes.tasks import (
    BUILTIN_TASKS,
    DATA_TASKS,
    TASK_DIR,
    Choice,
    Generate,
    TaskDataError,
    choice_predictions,
    conll_entities,
    entity_counts,
    exact_match,
    f1_from_counts,
    last_number,
    load_task,
    normalize_answer,
    number_match,
    read_boolq,
    read_conll03,
    read_gsm8k,
    read_mmlu,
    read_mutual,
    read_nq,
    read_rte,
    read_samsum,
    read_sst2,
    rouge_scores,
    score_generations,
)
from tests.conftest import SHARED_DATA


class TableScorer:
    """A stand-in scorer: each answer string has a fixed per-token NLL and token count."""

    def __init__(self, table: dict[str, tuple[float, int]]):
        self.table = table

    def score(self, pairs):
        nll = np.array([self.table[a][0] for _, a in pairs])
        n = np.array([self.table[a][1] for _, a in pairs])
        return Scores(
            nll=nll,
            logprob=-nll * n,
            exact=np.zeros(len(pairs), bool),
            token_acc=np.zeros(len(pairs)),
            argmax=[()] * len(pairs),
        )


def test_choice_by_mean_or_total_logprob():
    # 'long' has the better per-token NLL but, with 4 tokens, the worse total.
    scorer = TableScorer({"short": (1.0, 1), "long": (0.5, 4), "x": (3.0, 1)})
    items = [Choice("q1", ("short", "long"), 1), Choice("q2", ("x", "short", "long"), 0)]
    pred, gold = choice_predictions(scorer, items, "mean")
    assert pred.tolist() == [1, 2] and gold.tolist() == [-0.5, -3.0]
    pred, _ = choice_predictions(scorer, items, "sum")
    assert pred.tolist() == [0, 1]
    with pytest.raises(ValueError, match="mean or sum"):
        choice_predictions(scorer, items, "max")


def test_probe_accuracy_on_hand_made_items(monkeypatch):
    probe = make_probe("downstream:tasks=sentiment+facts,items=3")
    probe.tasks = {
        "sentiment": [
            Choice("a", ("good", "bad"), 0),
            Choice("b", ("good", "bad"), 1),
            Choice("c", ("bad", "good"), 1),
        ],
        "facts": [Choice("d", ("bad", "good"), 0)],
    }
    ctx = ProbeContext(
        step=0, timestamp=None, batch=(), history=[], scorer=TableScorer({"good": (0.1, 1), "bad": (2.0, 1)})
    )
    reference, rows = probe.prepare(ctx)
    assert reference["sentiment"]["score"] == pytest.approx(2 / 3) and reference["facts"]["score"] == 0.0
    assert reference["mean"]["score"] == pytest.approx(1 / 3)
    by = {(r.metric, r.protocol): r.value for r in rows}
    assert by[("diff", "sentiment")] == 0 and by[("ratio", "sentiment")] == 1 and np.isnan(by[("ratio", "facts")])
    assert by[("gold_logprob", "sentiment")] == pytest.approx(np.mean([-0.1, -2.0, -0.1]))
    # A later step where 'bad' wins everywhere: drift as difference and ratio against θ0.
    ctx.scorer, ctx.reference = TableScorer({"good": (2.0, 1), "bad": (0.1, 1)}), json.loads(json.dumps(reference))
    by = {(r.metric, r.protocol): r.value for r in probe.measure(ctx)}
    assert by[("score", "sentiment")] == pytest.approx(1 / 3) and by[("score", "facts")] == 1.0
    assert by[("diff", "sentiment")] == pytest.approx(-1 / 3) and by[("ratio", "sentiment")] == pytest.approx(0.5)
    assert by[("diff", "facts")] == 1.0 and by[("diff", "mean")] == pytest.approx(1 / 3)
    assert by[("gold_logprob_diff", "sentiment")] == pytest.approx(
        np.mean([-2.0, -0.1, -2.0]) - np.mean([-0.1, -2.0, -0.1])
    )


def test_exact_match_normalisation():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("the Beatles.", ["Beatles"]) == 1.0
    assert exact_match("An apple", ["apple", "pear"]) == 1.0
    assert exact_match("apples", ["apple"]) == 0.0


def test_gsm8k_final_number():
    assert last_number("12 - 5 = 7. The answer is 7.") == "7"
    assert last_number("It costs $1,250.00 in total") == "1250.00"
    assert last_number("no digits") is None
    assert number_match("so 3 * 4 = 12, the answer is 18", ["18"]) == 1.0
    assert number_match("the answer is 18.0", ["18"]) == 1.0
    assert number_match("18 eggs, then 17", ["18"]) == 0.0
    # The few-shot format's answer wins over numbers the model rambles on with.
    assert number_match("5 + 2 = 7. The answer is 7. Then 1. 1. 1.", ["7"]) == 1.0


def test_entity_spans_and_f1():
    tokens = ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", ".", "Peter", "Blackburn"]
    tags = ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O", "B-PER", "I-PER"]
    assert conll_entities(tokens, tags) == [
        ("EU", "ORG"),
        ("German", "MISC"),
        ("British", "MISC"),
        ("Peter Blackburn", "PER"),
    ]
    # IOB1 style: I- after O opens a span; a type change closes one.
    assert conll_entities(["New", "York", "Times"], ["I-LOC", "I-LOC", "I-ORG"]) == [
        ("New York", "LOC"),
        ("Times", "ORG"),
    ]
    gold = ["EU (ORG)", "German (MISC)", "Peter Blackburn (PER)"]
    assert entity_counts("EU (ORG); German (LOC); Peter Blackburn (PER); Bonn (LOC)", gold) == (2, 4, 3)
    assert f1_from_counts(2, 4, 3) == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert f1_from_counts(0, 0, 0) == 1.0 and f1_from_counts(0, 2, 0) == 0.0
    items = [Generate("p", tuple(gold), "entity_f1"), Generate("q", (), "entity_f1")]
    assert score_generations(items, ["EU (ORG); German (MISC); Peter Blackburn (PER)", "none"])["score"] == 1.0


def test_rouge_and_em_scores():
    same = rouge_scores("Amanda baked cookies for Jerry", "Amanda baked cookies for Jerry")
    assert same == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge_scores("totally different words", "Amanda baked cookies")["rouge1"] == 0.0
    half = rouge_scores("Amanda baked", "Amanda baked cookies today")  # P = 1, R = 1/2
    assert half["rouge1"] == pytest.approx(2 / 3)
    items = [Generate("p", ("Amanda baked cookies today",), "rouge")] * 2
    out = score_generations(items, ["Amanda baked", "Amanda baked cookies today"])
    assert out["score"] == out["rougeL"] == pytest.approx((2 / 3 + 1) / 2)
    em = [Generate("q", ("Paris",), "em"), Generate("q", ("1972", "December 1972"), "em")]
    assert score_generations(em, ["paris", "In 1972"])["score"] == 0.5


# ---------------------------------------------------------------------- readers on small records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_readers_on_small_records(tmp_path):
    sst = read_sst2(write_jsonl(tmp_path / "s.jsonl", [{"sentence": "a gem .", "label": 1, "idx": 0}]))
    assert sst == [Choice("Review: a gem .\nIs this review positive or negative? Answer:", ("negative", "positive"), 1)]
    rte = read_rte(
        write_jsonl(
            tmp_path / "r.jsonl",
            [
                {"sentence1": "A b.", "sentence2": "C d.", "label": 0, "idx": 1},
                {"sentence1": "A b.", "sentence2": "E.", "label": 1, "idx": 2},
            ],
        )
    )
    assert [it.choices[it.answer] for it in rte] == ["True", "False"] and "Question: C d. True or False?" in rte[
        0
    ].prompt
    boolq = read_boolq(
        write_jsonl(
            tmp_path / "b.jsonl",
            [{"classification": "False", "query": "is tea a plant", "evidences": [{"text": "Tea is a drink."}]}],
        )
    )
    assert boolq[0].prompt == "Tea is a drink.\nQuestion: Is tea a plant?\nAnswer (yes or no):" and boolq[0].answer == 0
    mmlu = read_mmlu(
        write_jsonl(
            tmp_path / "m.jsonl",
            [{"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}],
        )
    )
    assert mmlu[0].prompt == "2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:" and mmlu[0].choices == ("A", "B", "C", "D")
    assert mmlu[0].answer == 1
    mutual = read_mutual(
        write_jsonl(
            tmp_path / "u.jsonl",
            [{"answers": "C", "options": ["a", "b", "c", "d"], "article": "m : hi . f : hello .", "id": "dev_1"}],
        )
    )
    assert mutual[0] == Choice("m : hi . f : hello .", ("a", "b", "c", "d"), 2)
    nq = read_nq(write_jsonl(tmp_path / "n.jsonl", [{"question": "who wrote hamlet", "answer": ["Shakespeare"]}]))
    assert nq[0] == Generate("Question: who wrote hamlet?\nAnswer:", ("Shakespeare",), "em")
    gsm = read_gsm8k(write_jsonl(tmp_path / "g.jsonl", [{"question": "How many?", "answer": "2 + 2 = 4\n#### 1,004"}]))
    assert gsm[0].references == ("1004",) and gsm[0].prompt.endswith("Question: How many?\nAnswer:")
    (tmp_path / "sam.json").write_text(
        json.dumps([{"instruction": "x", "dialogue": "A: hi\nB: yo", "summary": "A greets B."}])
    )
    sam = read_samsum(tmp_path / "sam.json")
    assert sam[0].references == ("A greets B.",) and sam[0].prompt.startswith("Dialogue:\nA: hi\nB: yo")
    (tmp_path / "c.txt").write_text(
        "SOCCER NN B-NP O\nJAPAN NNP B-NP B-LOC\n\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n"
    )
    conll = read_conll03(tmp_path / "c.txt")
    assert [it.references for it in conll] == [("JAPAN (LOC)",), ("Peter Blackburn (PER)",)]
    assert conll[0].prompt.endswith("Sentence: SOCCER JAPAN\nEntities:")


def test_readers_name_the_bad_record(tmp_path):
    with pytest.raises(TaskDataError, match=r"s.jsonl: record 2: KeyError"):
        read_sst2(write_jsonl(tmp_path / "s.jsonl", [{"sentence": "ok", "label": 1}, {"text": "no", "label": 0}]))
    (tmp_path / "bad.jsonl").write_text('{"sentence": "x", "label": 1}\n{oops\n')
    with pytest.raises(TaskDataError, match=r"bad.jsonl:2: not JSON"):
        read_sst2(tmp_path / "bad.jsonl")
    with pytest.raises(TaskDataError, match="record 1: ValueError: answer 7 outside 2 choices"):
        read_mmlu(write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 7}]))
    (tmp_path / "c.txt").write_text("SOCCER NN O\n")
    with pytest.raises(TaskDataError, match=r"c.txt:1: expected 4 columns"):
        read_conll03(tmp_path / "c.txt")


EXPECTED_COUNTS = {
    "sst2": 500,
    "rte": 262,
    "boolq": 500,
    "mmlu": 500,
    "mutual": 500,
    "nq": 500,
    "gsm8k": 500,
    "samsum": 500,
    "conll03": 500,
}


@pytest.mark.data
@pytest.mark.skipif(not (SHARED_DATA / "downstream").is_dir(), reason="no ../shared/data/downstream")
@pytest.mark.parametrize("task", sorted(DATA_TASKS))
def test_readers_on_the_shared_files(task):
    items = load_task(task, SHARED_DATA)
    assert len(items) == EXPECTED_COUNTS[task]
    if isinstance(items[0], Choice):
        assert all(0 <= it.answer < len(it.choices) for it in items)
        assert len(Counter(it.answer for it in items)) > 1  # not every label the same
    else:
        assert all(it.prompt for it in items)
        if task != "conll03":
            assert all(it.references for it in items)
    if task == "conll03":
        assert sum(len(it.references) for it in items) > 500


def test_missing_shared_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="downstream task 'sst2': .*sst2_dev_500.jsonl not found"):
        make_probe("downstream:tasks=sst2")


# ---------------------------------------------------------------------- the built-in suite and options


def test_builtin_suite_has_five_balanced_tasks_of_forty():
    assert len(BUILTIN_TASKS) >= 5
    for name in BUILTIN_TASKS:
        items = load_task(name)
        assert len(items) >= 40, name
        assert len({it.prompt for it in items}) == len(items), name
        labels = Counter(it.answer for it in items)
        if all(len(it.choices) == 2 for it in items):
            assert min(labels.values()) >= 0.4 * len(items), (name, labels)


def test_builtin_facts_are_not_touched_by_the_builtin_stream():
    from streams import load_stream

    stream = load_stream("builtin")
    subjects = {e.subject.lower() for e in stream}
    relations = {e.relation_id for e in stream}
    facts = [json.loads(line) for line in (TASK_DIR / "facts.jsonl").read_text().splitlines() if line.strip()]
    assert not {f["subject"].lower() for f in facts} & subjects
    assert not {f["relation"] for f in facts} & relations
    edited_prompts = {e.rendered_prompt.lower() for e in stream} | {p.lower() for e in stream for p in e.paraphrases}
    assert not {f["prompt"].lower() for f in facts} & edited_prompts


def test_options_and_list_separator():
    probe = make_probe("downstream:tasks=sentiment+facts;arithmetic,items=5,choice_score=sum")
    assert probe.task_names == ["sentiment", "facts", "arithmetic"]
    assert [len(v) for v in probe.tasks.values()] == [5, 5, 5]
    assert len(make_probe("downstream:items=0").tasks["reading"]) == 40
    with pytest.raises(OptionError, match="unknown downstream task 'nope'"):
        make_probe("downstream:tasks=sentiment+nope")
    with pytest.raises(OptionError, match="choice_score must be mean or sum"):
        make_probe("downstream:choice_score=max")


def test_unchanged_model_has_no_drift():
    lm = load_model("tiny-llama")
    probe = make_probe("downstream:tasks=sentiment+arithmetic,items=8")
    ctx = ProbeContext(step=0, timestamp=None, batch=(), history=[], scorer=Scorer(lm.model, lm.tokenizer))
    reference, _ = probe.prepare(ctx)
    ctx.reference = json.loads(json.dumps(reference))
    rows = probe.measure(ctx)
    assert all(r.value == 0 for r in rows if r.metric in ("diff", "gold_logprob_diff"))
    assert all(r.value == 1 or np.isnan(r.value) for r in rows if r.metric == "ratio")


def test_batched_left_padded_generation_equals_one_at_a_time():
    lm = load_model("tiny-llama")
    prompts = ["Question: a?\nAnswer:", "A much longer question that pads the others?\nAnswer:", "Hi"]
    together = generate(lm.model, lm.tokenizer, prompts, max_new_tokens=6)
    alone = [generate(lm.model, lm.tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone and all("\n" not in t for t in together)


def test_generation_skips_leading_newlines_and_stops_after_the_first_line():
    lm = load_model("tiny-llama")
    ids = lm.tokenizer("\n\nab\ncd").input_ids

    class Scripted(torch.nn.Module):
        """Emits '\n\nab\ncd' then end-of-text, one token per forward pass; counts how many tokens it
        was asked for."""

        def __init__(self):
            super().__init__()
            self.inner = lm.model
            self.calls = 0

        def forward(self, input_ids, **kw):
            token = ids[self.calls] if self.calls < len(ids) else lm.tokenizer.eos_token_id
            self.calls += 1
            logits = torch.zeros((len(input_ids), input_ids.shape[1], len(lm.tokenizer)))
            logits[:, -1, token] = 1.0
            return SimpleNamespace(logits=logits, cache=SimpleNamespace(batch_select_indices=lambda rows: None))

    model = Scripted()
    assert generate(model, lm.tokenizer, ["Q:"], max_new_tokens=10) == ["ab"]
    assert model.calls == 5  # stopped at the newline after 'ab', not at the leading ones


# ---------------------------------------------------------------------- the seed study's protocol


def test_seed_choice_answers_outside_the_options_score_zero():
    from probes.tasks import choice_from_generation, score_choice_generations

    assert choice_from_generation(" Positive.", ("negative", "positive")) == 1
    assert choice_from_generation("B) because", ("A", "B", "C", "D")) == 1
    assert choice_from_generation("a lot of things", ("A", "B")) is None  # 'a' the article is no option
    assert choice_from_generation("neutral", ("negative", "positive")) is None
    assert choice_from_generation("", ("no", "yes")) is None
    assert choice_from_generation("yes indeed", ("yes", "yes indeed")) == 1  # the longest option wins
    items = [
        Choice("a", ("negative", "positive"), 1),
        Choice("b", ("negative", "positive"), 0),
        Choice("c", ("negative", "positive"), 0),
        Choice("d", ("negative", "positive"), 1),
    ]
    # right, wrong, invalid, invalid: accuracy over all four items, half the answers valid
    assert score_choice_generations(items, ["positive", "positive", "maybe", "The"]) == {"score": 0.25, "valid": 0.5}
    assert score_choice_generations(items, ["?"] * 4) == {"score": 0.0, "valid": 0.0}  # a score can reach 0


def test_seed_open_qa_span_match_and_summary_rouge_mean():
    from probes.tasks import rouge_mean_seed, span_match

    assert span_match("I think it is the Eiffel Tower, in Paris", ["Eiffel Tower"]) == 1.0
    assert span_match("Paris.", ["paris"]) == 1.0 and exact_match("Paris.", ["paris"]) == 1.0
    assert span_match("Eiffel", ["Eiffel Tower"]) == 0.0 and span_match("", ["x"]) == 0.0
    # Hand case: prediction "the cat sat", reference "the cat sat down": unigrams 3/3 and 3/4 -> F1 6/7;
    # bigrams 2/2, 2/3 -> F1 4/5; LCS 3 -> F1 6/7; mean (6/7 + 4/5 + 6/7) / 3.
    got = rouge_mean_seed("the cat sat", "the cat sat down")
    assert got["rouge1"] == pytest.approx(6 / 7) and got["rouge2"] == pytest.approx(4 / 5)
    assert got["score"] == pytest.approx((6 / 7 + 4 / 5 + 6 / 7) / 3)
    assert rouge_mean_seed(" ", "the cat sat down")["score"] == 0.0 and rouge_mean_seed("x", "x")["score"] == 0.0
    items = [Generate("q", ("Eiffel Tower",), "em"), Generate("q2", ("Rome",), "em")]
    assert score_generations(items, ["the Eiffel Tower of course", "Rome"], "seed") == {"score": 1.0}
    assert score_generations(items, ["the Eiffel Tower of course", "Rome"]) == {"score": 0.5}  # likelihood: EM
    summ = [Generate("d", ("the cat sat down",), "rouge")]
    assert score_generations(summ, ["the cat sat"], "seed")["score"] == pytest.approx(got["score"])
    assert score_generations(summ, ["the cat sat"])["score"] == pytest.approx(6 / 7)  # likelihood: ROUGE-L


def test_seed_protocol_rows_are_named_and_likelihood_rows_unchanged(monkeypatch):
    import probes.downstream as ds

    answers = {"a": "good", "b": "I'd say good", "c": "bad", "q": "the answer is Rome"}
    monkeypatch.setattr(ds, "load_task", lambda name: [])  # the items are set below: no data files needed
    seed = make_probe("downstream:tasks=sentiment+nq,items=3,protocol=seed")
    tasks = {
        "sentiment": [
            Choice("a", ("good", "bad"), 0),
            Choice("b", ("good", "bad"), 0),
            Choice("c", ("bad", "good"), 1),
        ],
        "nq": [Generate("q", ("Rome",), "em")],
    }
    seed.tasks = tasks

    class Gen(TableScorer):
        def generate(self, prompts, limit):  # the probe generates only through the scorer
            return [answers[p] for p in prompts]

    ctx = ProbeContext(step=0, timestamp=None, batch=(), history=[], scorer=Gen({"good": (0.1, 1), "bad": (2.0, 1)}))
    _, rows = seed.prepare(ctx)
    by = {(r.metric, r.protocol): r.value for r in rows}
    # 'a' right; 'b' gives no option at its start (invalid, 0); 'c' valid but wrong
    assert by[("score", "sentiment;seed")] == pytest.approx(1 / 3)
    assert by[("valid", "sentiment;seed")] == pytest.approx(2 / 3)
    assert by[("score", "nq;seed")] == 1.0 and by[("score", "mean;seed")] == pytest.approx(2 / 3)
    assert {p for _, p in by} == {"sentiment;seed", "nq;seed", "mean;seed"}
    likelihood = make_probe("downstream:tasks=sentiment+nq,items=3")
    likelihood.tasks = tasks
    _, rows = likelihood.prepare(ctx)
    by = {(r.metric, r.protocol): r.value for r in rows}
    assert (
        by[("score", "sentiment")] == 1.0 and by[("score", "nq")] == 0.0
    )  # "good" wins by likelihood; EM of the whole answer
    assert {p for _, p in by} == {"sentiment", "nq", "mean"}
    with pytest.raises(OptionError, match="protocol must be likelihood or seed"):
        make_probe("downstream:protocol=gen")


def test_seed_protocol_on_a_tiny_model_has_no_drift():
    lm = load_model("tiny-llama")
    probe = make_probe("downstream:tasks=sentiment+arithmetic,items=4,protocol=seed")
    ctx = ProbeContext(step=0, timestamp=None, batch=(), history=[], scorer=Scorer(lm.model, lm.tokenizer))
    reference, rows = probe.prepare(ctx)
    assert all(0 <= r.value <= 1 for r in rows if r.metric in ("score", "valid"))
    assert {r.protocol for r in rows} == {"sentiment;seed", "arithmetic;seed", "mean;seed"}
    ctx.reference = json.loads(json.dumps(reference))
    assert all(r.value == 0 for r in probe.measure(ctx) if r.metric == "diff")

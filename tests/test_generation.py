"""Generation-based edit evaluation (issue #38, docs/METRICS.md §6): batched greedy generation with the
authors' stop rules, and the generation protocols of the edit-quality and retention probes."""

from __future__ import annotations

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

import numpy as np
import pytest
import torch

from lifelong.core.scorer import Scorer, answer_token_ids

PAIRS = [
    ("The capital of France is", "Paris"),
    ("The capital of France is", "Rome"),
    ("A much longer prompt that needs more positions than the others, about", "New York City"),
    ("x", "y"),
    ("The capital of France is", "Paris"),
]


def reference_scores(lm, prompt, answer):
    """One prompt at a time, full logits: the slow definition the scorer must match."""
    p = lm.tokenizer(prompt).input_ids
    a = answer_token_ids(lm.tokenizer, answer)
    with torch.no_grad():
        logp = lm.model(torch.tensor([p + a])).logits[0].log_softmax(-1)
    lps = np.array([logp[len(p) - 1 + j, t].item() for j, t in enumerate(a)])
    argmax = tuple(logp[len(p) - 1 + j].argmax().item() for j in range(len(a)))
    return -lps.mean(), lps.sum(), argmax, a


def assert_matches_definition(lm, scores, k, prompt, answer) -> list[bool]:
    """Pair k's scores equal the one-at-a-time definition; returns its per-token hits."""
    nll, logprob, argmax, ids = reference_scores(lm, prompt, answer)
    assert scores.nll[k] == pytest.approx(nll, abs=1e-4)
    assert scores.logprob[k] == pytest.approx(logprob, abs=1e-3)
    assert scores.argmax[k] == argmax
    return [x == y for x, y in zip(argmax, ids)]


@pytest.mark.parametrize("budget", [4096, 40])
def test_scorer_matches_one_at_a_time_definition(tiny, budget):
    scores = Scorer(tiny.model, tiny.tokenizer, max_batch_tokens=budget).score(PAIRS)
    for k, (prompt, answer) in enumerate(PAIRS):
        hits = assert_matches_definition(tiny, scores, k, prompt, answer)
        assert scores.exact[k] == all(hits)
        assert scores.token_acc[k] == pytest.approx(np.mean(hits))
    assert np.allclose(scores.prob, np.exp(-scores.nll))


def test_empty_answer_is_refused(tiny):
    with pytest.raises(ValueError, match="empty answer"):
        Scorer(tiny.model, tiny.tokenizer).score([("prompt", "  ")])


def test_leading_space_piece_is_dropped():
    class SentencePieceLike:
        def encode(self, text, add_special_tokens=False):
            return [29871, 3681] if text.startswith(" ") else [3681]

        def decode(self, ids):
            return {29871: " ", 3681: "Paris"}[ids[0]]

    assert answer_token_ids(SentencePieceLike(), "Paris") == [3681]


def test_empty_input_list(tiny):
    scores = Scorer(tiny.model, tiny.tokenizer).score([])
    assert len(scores.nll) == 0


WORDS = ["the", "cat", "sat", "on", "a", "mat", "Paris", "is", "in", "France", "New", "York", "City", "x"]


@pytest.mark.parametrize("budget", [4096, 24])
def test_shared_prompts_match_the_definition_for_random_pairs(tiny, budget):
    """Many answers of mixed lengths per prompt, prompts of mixed lengths: still the definition."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    phrase = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)
    prompt_answers = st.tuples(phrase, st.lists(phrase, min_size=1, max_size=4))

    @settings(max_examples=8, deadline=None, derandomize=True)
    @given(st.lists(prompt_answers, min_size=1, max_size=5))
    def check(groups):
        pairs = [(p, a) for p, answers in groups for a in answers]
        scores = Scorer(tiny.model, tiny.tokenizer, max_batch_tokens=budget).score(pairs)
        for k, (prompt, answer) in enumerate(pairs):
            assert_matches_definition(tiny, scores, k, prompt, answer)

    check()


def test_padded_prompt_batches_carry_the_padding_mask(tiny):
    # Hooks that pool over a row's tokens (WISE's routing) read the body's attention mask.
    seen = []
    handle = tiny.adapter.body().register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
    )
    prompts = ["A b", "A much longer prompt with more words in it"]
    try:
        Scorer(tiny.model, tiny.tokenizer).score([(p, "x") for p in prompts])
    finally:
        handle.remove()
    mask = seen[0]
    lengths = sorted(len(tiny.tokenizer(p).input_ids) for p in prompts)
    assert mask is not None and sorted(mask.sum(1).tolist()) == lengths


def test_generate_rewrites_and_rolling_nll_reads_the_model(tiny):
    from lifelong.core.model_access import generate, token_nll

    rewrite = lambda prompts: ["Known: " + p for p in prompts]  # noqa: E731
    scorer = Scorer(tiny.model, tiny.tokenizer, rewrite=rewrite)
    prompts = ["The capital of France is", "x"]
    assert scorer.generate(prompts, 5) == generate(tiny.model, tiny.tokenizer, rewrite(prompts), 5)
    rows = [tiny.tokenizer(p).input_ids for p in [PAIRS[2][0], *prompts]]
    # Token rows of a corpus are not prompts: no rewriting, the model's own NLL.
    total, count = scorer.rolling_nll(rows)
    want_total, want_count = token_nll(tiny.model, rows, scorer.pad_id)
    assert np.array_equal(total, want_total) and np.array_equal(count, want_count)
    weights = scorer.weights()
    assert all(weights[n] is p for n, p in tiny.model.named_parameters())
    with pytest.raises(ValueError, match="prompt rewriter returned 1 prompts for 2"):
        Scorer(tiny.model, tiny.tokenizer, rewrite=lambda ps: ps[:1]).generate(prompts, 5)


def test_probes_reach_the_model_only_through_the_scorer():
    """A probe reading ``scorer.model`` (or its tokenizer, body, head) skips the editor's prompt rewriter."""
    import re
    from pathlib import Path

    import probes

    pattern = re.compile(r"scorer\.(model|tokenizer|body|unembed)\b")
    found = [
        f"{path.name}:{n}"
        for path in sorted(Path(probes.__file__).parent.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []

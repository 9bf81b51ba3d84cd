"""Downstream tasks for general-ability drift (docs/METRICS.md §5): items, readers and scorers.

Every task is a list of items of one kind:
- :class:`Choice` — classification and multiple choice, scored by answer log-likelihood:
  the predicted choice is the one with the highest *mean* token log-probability
  (length-normalised; ``sum`` is an option), the task score is accuracy;
- :class:`Generate` — greedy generation, scored by ``em`` (exact match after lowercasing
  and stripping punctuation and articles), ``number`` (GSM8K: the last number), ``rouge``
  (ROUGE-L F1, with ROUGE-1/2 as extra rows) or ``entity_f1`` (CoNLL-03 micro F1 over
  (entity text, type) pairs).

Built-in tasks (``probes/data/tasks``, written for the project): sentiment, entailment,
reading, arithmetic, facts. Shared-data tasks (``shared/data/downstream``): sst2, rte,
boolq, mmlu, mutual (likelihood); nq, gsm8k, samsum, conll03 (generation).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streams.errors import MissingFileError, UserError

TASK_DIR = Path(__file__).resolve().parent / "data" / "tasks"


@dataclass(frozen=True)
class Choice:
    prompt: str
    choices: tuple[str, ...]
    answer: int  # index of the right choice


@dataclass(frozen=True)
class Generate:
    prompt: str
    references: tuple[str, ...]  # acceptable answers (em, number), the reference (rouge) or gold entities
    metric: str  # em, number, rouge, entity_f1


class TaskDataError(UserError):
    """A task file that cannot be read; the message names the file and record."""


# ---------------------------------------------------------------------- prompt formats
# Shared by the built-in tasks and the dataset readers, so both ask the same way.


def sentiment_item(text: str, positive: bool) -> Choice:
    return Choice(
        f"Review: {text.strip()}\nIs this review positive or negative? Answer:", ("negative", "positive"), int(positive)
    )


def entailment_item(premise: str, hypothesis: str, entailed: bool) -> Choice:
    return Choice(
        f"{premise.strip()}\nQuestion: {hypothesis.strip()} True or False?\nAnswer:", ("False", "True"), int(entailed)
    )


def yes_no_item(passage: str, question: str, yes: bool) -> Choice:
    question = question.strip().rstrip("?")
    question = question[:1].upper() + question[1:]
    return Choice(f"{passage.strip()}\nQuestion: {question}?\nAnswer (yes or no):", ("no", "yes"), int(yes))


def letter_item(question: str, options: Sequence[str], answer: int) -> Choice:
    letters = "ABCDEFGH"[: len(options)]
    body = "\n".join(f"{letter}. {opt}" for letter, opt in zip(letters, options))
    return Choice(f"{question.strip()}\n{body}\nAnswer:", tuple(letters), answer)


def qa_prompt(question: str) -> str:
    return f"Question: {question.strip().rstrip('?')}?\nAnswer:"


# ---------------------------------------------------------------------- file readers


def _records(path: Path) -> list[dict]:
    """JSONL records, or a JSON list; errors name the file and line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise TaskDataError(f"{path}: expected a JSON list of records")
        return data
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise TaskDataError(f"{path}:{n}: not JSON ({err.msg})") from None
    return out


def _read(path: Path, make: Callable[[dict], object]) -> list:
    items = []
    for n, rec in enumerate(_records(path), 1):
        try:
            items.append(make(rec))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise TaskDataError(f"{path}: record {n}: {type(err).__name__}: {err}") from None
    return items


def read_sst2(path: Path) -> list[Choice]:
    return _read(path, lambda r: sentiment_item(r["sentence"], r["label"] == 1))


def read_rte(path: Path) -> list[Choice]:  # label 0 = entailment
    return _read(path, lambda r: entailment_item(r["sentence1"], r["sentence2"], r["label"] == 0))


def read_boolq(path: Path) -> list[Choice]:  # ERASER format: evidence spans stand in for the passage
    def make(r):
        passage = " ".join(e["text"] for e in r["evidences"] if isinstance(e, dict)) if r.get("evidences") else ""
        if r["classification"] not in ("True", "False"):
            raise ValueError(f"classification {r['classification']!r} is not True/False")
        return yes_no_item(passage or r.get("passage", ""), r["query"], r["classification"] == "True")

    return _read(path, make)


def read_mmlu(path: Path) -> list[Choice]:
    def make(r):
        if not 0 <= int(r["answer"]) < len(r["choices"]):
            raise ValueError(f"answer {r['answer']} outside {len(r['choices'])} choices")
        return letter_item(r["question"], r["choices"], int(r["answer"]))

    return _read(path, make)


def read_mutual(path: Path) -> list[Choice]:
    """MuTual: the dialogue is the prompt and each option (the next turn) a choice."""

    def make(r):
        answer = "ABCD".index(r["answers"])
        return Choice(r["article"].strip(), tuple(o.strip() for o in r["options"]), answer)

    return _read(path, make)


def read_nq(path: Path) -> list[Generate]:
    return _read(path, lambda r: Generate(qa_prompt(r["question"]), tuple(r["answer"]), "em"))


GSM8K_SHOT = (
    "Question: Tom has 3 boxes with 4 pencils in each box. He gives away 5 pencils. How many pencils "
    "does he have left?\nAnswer: He has 3 * 4 = 12 pencils. 12 - 5 = 7. The answer is 7.\n\n"
)


def read_gsm8k(path: Path) -> list[Generate]:
    def make(r):
        final = r["answer"].rsplit("####", 1)
        if len(final) != 2:
            raise ValueError("answer has no '#### N' line")
        return Generate(
            f"{GSM8K_SHOT}Question: {r['question'].strip()}\nAnswer:", (final[1].strip().replace(",", ""),), "number"
        )

    return _read(path, make)


def read_samsum(path: Path) -> list[Generate]:
    return _read(
        path,
        lambda r: Generate(
            f"Dialogue:\n{r['dialogue'].strip()}\n\nSummary in one sentence:", (r["summary"].strip(),), "rouge"
        ),
    )


CONLL_SHOT = (
    "List the named entities in the sentence as text (TYPE), separated by ';'. "
    "Types: PER, LOC, ORG, MISC. Write none if there are none.\n"
    "Sentence: John Smith flew from Paris to meet Google engineers .\n"
    "Entities: John Smith (PER); Paris (LOC); Google (ORG)\n"
)


def conll_entities(tokens: Sequence[str], tags: Sequence[str]) -> list[tuple[str, str]]:
    """(text, type) spans from BIO (or IOB1) tags: a span starts at B-X, or at I-X after a different type."""
    spans: list[tuple[str, str]] = []
    current: list[str] = []  # the open span's tokens; non-empty only while kind is a label
    kind: str | None = None
    for tok, tag in zip(tokens, tags):
        prefix, _, label = tag.partition("-")
        if prefix == "I" and kind == label:
            current.append(tok)
            continue
        if current:
            assert kind is not None
            spans.append((" ".join(current), kind))
        current, kind = ([tok], label) if prefix in ("B", "I") else ([], None)
    if current:
        assert kind is not None
        spans.append((" ".join(current), kind))
    return spans


def read_conll03(path: Path) -> list[Generate]:
    """CoNLL-03 4-column lines (token POS chunk NER), sentences split by blank lines."""
    items: list[Generate] = []
    tokens: list[str] = []
    tags: list[str] = []
    lines = path.read_text(encoding="utf-8").splitlines() + [""]
    for n, line in enumerate(lines, 1):
        if not line.strip():
            if tokens:
                gold = conll_entities(tokens, tags)
                refs = tuple(f"{t} ({k})" for t, k in gold)
                items.append(Generate(f"{CONLL_SHOT}Sentence: {' '.join(tokens)}\nEntities:", refs, "entity_f1"))
            tokens, tags = [], []
            continue
        cols = line.split()
        if len(cols) != 4 or cols[0] == "-DOCSTART-":
            if cols and cols[0] == "-DOCSTART-":
                continue
            raise TaskDataError(f"{path}:{n}: expected 4 columns (token POS chunk NER), got {len(cols)}")
        tokens.append(cols[0])
        tags.append(cols[3])
    return items


def read_builtin(name: str) -> list:
    path = TASK_DIR / f"{name}.jsonl"
    makers = {
        "sentiment": lambda r: sentiment_item(r["text"], r["label"] == 1),
        "entailment": lambda r: entailment_item(r["premise"], r["hypothesis"], r["label"] == 1),
        "reading": lambda r: yes_no_item(r["passage"], r["question"], r["label"] == 1),
        "arithmetic": lambda r: Choice(qa_prompt(r["question"]), tuple(r["choices"]), int(r["answer"])),
        "facts": lambda r: Choice(r["prompt"], tuple(r["choices"]), int(r["answer"])),
    }
    return _read(path, makers[name])


BUILTIN_TASKS = ("sentiment", "entailment", "reading", "arithmetic", "facts")
DATA_TASKS: dict[str, tuple[str, Callable[[Path], list]]] = {
    "sst2": ("downstream/sst2_dev_500.jsonl", read_sst2),
    "rte": ("downstream/rte_dev.jsonl", read_rte),
    "boolq": ("downstream/boolq_eraser_val_500.jsonl", read_boolq),
    "mmlu": ("downstream/mmlu_500.jsonl", read_mmlu),
    "mutual": ("downstream/mutual_dev_500.jsonl", read_mutual),
    "nq": ("downstream/nq_open_dev_500.jsonl", read_nq),
    "gsm8k": ("downstream/gsm8k_test_500.jsonl", read_gsm8k),
    "samsum": ("downstream/samsum_test_500.json", read_samsum),
    "conll03": ("downstream/conll03_test_500.txt", read_conll03),
}
ALL_TASKS = (*BUILTIN_TASKS, *DATA_TASKS)


def load_task(name: str, data_dir: Path | None = None) -> list:
    """The items of task ``name`` (built-in, or read from ``data_dir`` / the shared data)."""
    if name in BUILTIN_TASKS:
        return read_builtin(name)
    if name not in DATA_TASKS:
        raise UserError(f"unknown downstream task '{name}': expected one of {', '.join(ALL_TASKS)}")
    from streams.readers import default_data_dir

    rel, reader = DATA_TASKS[name]
    path = Path(data_dir or default_data_dir()) / rel
    if not path.is_file():
        raise MissingFileError(
            f"downstream task '{name}': {path} not found (set $LIFELONG_DATA to the shared data directory)"
        )
    return reader(path)


# ---------------------------------------------------------------------- scoring


def normalize_answer(text: str) -> str:
    """SQuAD/NQ normalisation: lowercase, drop punctuation and articles, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(normalize_answer(prediction) in {normalize_answer(r) for r in references})


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def final_number(text: str) -> str | None:
    """The number after the first 'answer is' (the few-shot format), else the last number."""
    found = re.search(r"answer is\s*\$?(-?\d[\d,]*(?:\.\d+)?)", text, re.IGNORECASE)
    return last_number(found.group(1)) if found else last_number(text)


def number_match(prediction: str, references: Sequence[str]) -> float:
    got = final_number(prediction)
    return float(got is not None and got in {last_number(r) for r in references})


def parse_entities(text: str) -> set[tuple[str, str]]:
    """'text (TYPE); text (TYPE)' -> {(text, TYPE)}; anything else is ignored."""
    pairs = re.findall(r"([^;()]+?)\s*\((PER|LOC|ORG|MISC)\)", text)
    return {(" ".join(t.split()), k) for t, k in pairs}


def entity_counts(prediction: str, references: Sequence[str]) -> tuple[int, int, int]:
    """(true positives, predicted, gold) over distinct (text, type) pairs."""
    pred, gold = parse_entities(prediction), parse_entities("; ".join(references))
    return len(pred & gold), len(pred), len(gold)


def f1_from_counts(tp: int, predicted: int, gold: int) -> float:
    if predicted == 0 and gold == 0:
        return 1.0
    if tp == 0:
        return 0.0
    precision, recall = tp / predicted, tp / gold
    return 2 * precision * recall / (precision + recall)


_rouge = None


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 (``rouge-score``, Porter stemming as in the SAMSum papers)."""
    global _rouge
    if _rouge is None:
        from rouge_score import rouge_scorer

        _rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    return {k: v.fmeasure for k, v in _rouge.score(reference, prediction).items()}


# ---------------------------------------------------------------------- the seed study's generation protocol
# Gu et al., "Model Editing Harms General Abilities of Large Language Models" (code: JasonForJoy/
# Model-Editing-Hurt, test-task-code/*.py). Tasks are answered by greedy generation; an answer that
# is no valid option counts as wrong (accuracy over all items, so a score can reach 0); open QA
# counts a hit when a run of words of the normalised answer equals a normalised reference; a
# summary scores the mean of ROUGE-1/2/L F1, and an (almost) empty one scores 0.


def choice_from_generation(prediction: str, choices: Sequence[str]) -> int | None:
    """The option a generated answer gives, or None when it gives no valid option.

    The answer must begin with an option (case-insensitive except for one-letter options such as
    MMLU's A-D, leading spaces and punctuation ignored, ending at a word boundary); where several
    options match, the longest wins. The seed
    code checks whether a one-token answer contains the option word; starting with it is the same
    test for answers of several tokens, without reading 'A' into any answer that holds an 'a'.
    """
    raw = prediction.strip().lstrip(string.punctuation + " ")
    best = None
    for k, c in enumerate(choices):
        c = c.strip()
        text = raw if len(c) == 1 else raw.lower()
        c = c if len(c) == 1 else c.lower()
        if c and text.startswith(c) and (len(text) == len(c) or not text[len(c)].isalnum()):
            if best is None or len(c) > len(choices[best].strip()):
                best = k
    return best


def score_choice_generations(items: Sequence[Choice], predictions: Sequence[str]) -> dict[str, float]:
    """Seed protocol on choice items: ``score`` = right answers / all items (an invalid answer is
    wrong), ``valid`` = share of answers that give an option."""
    got = [choice_from_generation(p, it.choices) for it, p in zip(items, predictions)]
    return {
        "score": float(np.mean([g == it.answer for it, g in zip(items, got)])),
        "valid": float(np.mean([g is not None for g in got])),
    }


def span_match(prediction: str, references: Sequence[str]) -> float:
    """1 if some run of consecutive words of the normalised prediction equals a normalised reference
    (the seed study's open-QA hit; exact match of the whole answer is one such run)."""
    words = normalize_answer(prediction).split()
    refs = {normalize_answer(r) for r in references} - {""}
    return float(any(" ".join(words[i:j]) in refs for i in range(len(words)) for j in range(i + 1, len(words) + 1)))


_rouge_plain = None


def rouge_mean_seed(prediction: str, reference: str) -> dict[str, float]:
    """The seed study's summary score: mean of ROUGE-1/2/L F1 (no stemming); 0 for a prediction of at
    most one character. Also returns the three parts."""
    global _rouge_plain
    if len(prediction.strip()) <= 1:
        return {"score": 0.0, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    if _rouge_plain is None:
        from rouge_score import rouge_scorer

        _rouge_plain = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    parts = {k: v.fmeasure for k, v in _rouge_plain.score(reference, prediction).items()}
    return {"score": float(np.mean(list(parts.values()))), **parts}


def choice_predictions(scorer, items: Sequence[Choice], reduce: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Predicted choice index per item and the gold choice's mean token log-probability, in one scorer call."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"choice score must be mean or sum, got '{reduce}'")
    pairs = [(it.prompt, c) for it in items for c in it.choices]
    scores = scorer.score(pairs)
    values = -scores.nll if reduce == "mean" else scores.logprob
    sizes = np.array([len(it.choices) for it in items])
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    width = int(sizes.max()) if len(items) else 0
    grid = np.full((len(items), width), -np.inf)
    cols = np.arange(len(pairs)) - np.repeat(starts, sizes)
    grid[np.repeat(np.arange(len(items)), sizes), cols] = values
    gold = np.array([it.answer for it in items])
    return grid.argmax(1), -scores.nll[starts + gold]


def score_generations(
    items: Sequence[Generate], predictions: Sequence[str], protocol: str = "likelihood"
) -> dict[str, float]:
    """Task score (and extra scores) of generated answers; ``metric`` is the same for all items.

    ``protocol="seed"`` scores open QA by :func:`span_match` and summaries by :func:`rouge_mean_seed`
    (the seed study's rules); GSM8K and CoNLL-03 are scored the same under both protocols.
    """
    metric = items[0].metric
    if protocol == "seed" and metric == "em":
        return {"score": float(np.mean([span_match(p, it.references) for it, p in zip(items, predictions)]))}
    if protocol == "seed" and metric == "rouge":
        scores = [rouge_mean_seed(p, it.references[0]) for it, p in zip(items, predictions)]
        return {k: float(np.mean([s[k] for s in scores])) for k in ("score", "rouge1", "rouge2", "rougeL")}
    if metric == "em":
        return {"score": float(np.mean([exact_match(p, it.references) for it, p in zip(items, predictions)]))}
    if metric == "number":
        return {"score": float(np.mean([number_match(p, it.references) for it, p in zip(items, predictions)]))}
    if metric == "rouge":
        scores = [rouge_scores(p, it.references[0]) for it, p in zip(items, predictions)]
        means = {k: float(np.mean([s[k] for s in scores])) for k in ("rouge1", "rouge2", "rougeL")}
        return {"score": means["rougeL"], **means}
    if metric == "entity_f1":  # micro F1 over the task
        tp, pred, gold = np.sum([entity_counts(p, it.references) for it, p in zip(items, predictions)], axis=0)
        return {"score": f1_from_counts(int(tp), int(pred), int(gold))}
    raise ValueError(f"unknown generation metric '{metric}'")

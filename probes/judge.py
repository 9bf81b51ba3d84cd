"""An LLM judge of stored generated answers (docs/PROBES.md, "Judging generations"; issue #38).

"The Mirage of Model Editing" (ACL 2025, WanliYoung/Revisit-Editing-Evaluation, cited **R** at
commit 61ccca3c1ecd) grades a generated answer by asking a chat model whether it matches the gold
target (R ``easyeditor/evaluate/evaluate_utils.py:37-100``, ``llm_judge``): its prompt
(:data:`MIRAGE_PROMPT`, lines 38-77, verbatim) with the raw question (before any context), the
gold target and the post-processed answer; an empty system message, temperature 0; the answer is
correct only when the reply is exactly ``A`` (line 98). :class:`ChatJudge` asks any
OpenAI-compatible chat-completions endpoint the same way. The verdicts become the protocol
``gen_judge@SETTING`` beside ``gen_exact`` and ``gen_contains`` (:func:`judged_rows`).

Nothing here is used unless a user runs ``lifelong judge``: the judge is off by default, never required.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import polars as pl

from probes.metric_table import (
    GEN_EXACT,
    GEN_JUDGE,
    LOCALITY,
    RETAINED_FRACTION,
    RETENTION,
    RETENTION_PROBE,
    SAMPLE_POPULATION,
    SAMPLE_SIZE,
)
from streams.errors import UserError

# R evaluate_utils.py:38-77 (the template, stripped as R strips it); filled by str.format.
MIRAGE_PROMPT = """Your job is to look at a question, a gold target, and a predicted answer, and then assign a grade of either ["CORRECT", "INCORRECT"].

The following are examples of CORRECT predicted answers.
```
Question: What are the names of Barack Obama's children?
Gold target: Malia Obama and Sasha Obama
Predicted answer 1: sasha and malia obama
Predicted answer 2: Malia and Sasha Obama are the names of Barack Obama's children.
```
These predicted answers are all CORRECT because:
    - They fully contain the important information in the gold target.
    - They do not contain any information that contradicts the gold target.

The following are examples of INCORRECT predicted answers.
```
Question: What are the names of Barack Obama's children?
Gold target: Malia and Sasha
Predicted answer 1: Malia.
Predicted answer 2: Malia, Sasha, and Susan.
Predicted answer 3: Malia and Sasha, Malia and Sasha, Malia and Sasha, Malia and Sasha (repeated answer)
```
These predicted answers are all INCORRECT because:
    - A factual statement in the answer contradicts the gold target or contain repeated answer.


Here is a sample. Simply reply with either CORRECT or INCORRECT.

```
Question: {question}
Gold target: {target}
Predicted answer: {predicted_answer}
```

According to the gold target, please grade the predicted answer of this question as one of:
A: CORRECT
B: INCORRECT

Just return the letters "A" or "B", with no text around it."""  # noqa: E501

AUTHORS_MODEL = "gpt-4o-mini"  # R evaluate_utils.py:90
ENV_URL, ENV_MODEL, ENV_KEYS = "LIFELONG_JUDGE_URL", "LIFELONG_JUDGE_MODEL", ("LIFELONG_JUDGE_KEY", "OPENAI_API_KEY")


class JudgeError(UserError):
    """The judge could not be asked or its reply not read; one line naming the endpoint."""


@dataclass(frozen=True)
class Verdict:
    correct: bool
    reply: str | None = None  # the judge's raw reply, where it gives one


class Judge(Protocol):
    """Anything that grades a generated answer against the gold answer(s) of a question."""

    name: str  # recorded with each verdict: verdicts of different judges are kept apart

    def judge(self, question: str, gold: str | Sequence[str], answer: str) -> Verdict: ...


def mirage_prompt(question: str, gold: str | Sequence[str], answer: str) -> str:
    """R's judge prompt for one answer. Several gold answers (not a case R has) are given joined by ' or '."""
    target = gold if isinstance(gold, str) else " or ".join(gold)
    return MIRAGE_PROMPT.format(question=question, target=target, predicted_answer=answer)


def mirage_verdict(reply: str) -> bool:
    """R's reading of the reply: correct only when it is exactly ``A`` (no strip, no case folding)."""
    return reply == "A"


def endpoint(url: str) -> str:
    """The chat-completions address of a base URL (``https://api.openai.com/v1``), or the URL itself
    when it already names it."""
    url = url.strip().rstrip("/")
    return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


class ChatJudge:
    """R's judge over an OpenAI-compatible ``/chat/completions`` endpoint (the standard library's HTTP
    client). Retries 429 and 5xx replies and timeouts with exponential backoff (a ``Retry-After``
    header is honoured, up to ``max_wait`` seconds); every other failure is a :class:`JudgeError`
    naming the URL."""

    def __init__(
        self,
        url: str,
        model: str = AUTHORS_MODEL,
        key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        backoff: float = 1.0,
        max_wait: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not url or not url.strip():
            raise JudgeError(f"no judge URL: give --judge URL or set {ENV_URL}")
        if not url.strip().lower().startswith(("http://", "https://")):
            raise JudgeError(f"judge URL '{url}': expected an http:// or https:// address")
        if retries < 0 or timeout <= 0:
            raise JudgeError(f"judge at {url}: retries must be ≥ 0 and the timeout > 0")
        self.url = endpoint(url)
        self.model = model
        self.name = f"{model} at {self.url}"  # the same model behind another server is another judge
        self.key = key
        self.timeout, self.retries, self.backoff, self.max_wait, self.sleep = timeout, retries, backoff, max_wait, sleep

    @classmethod
    def from_environment(cls, url: str | None = None, model: str | None = None, **kwargs) -> ChatJudge:
        """URL and model from the arguments, else ``LIFELONG_JUDGE_URL`` / ``LIFELONG_JUDGE_MODEL`` (the
        model defaults to R's); the key from ``LIFELONG_JUDGE_KEY``, else ``OPENAI_API_KEY`` (none: no
        Authorization header, as a local server needs)."""
        key = next((os.environ[k] for k in ENV_KEYS if os.environ.get(k)), None)
        return cls(
            url or os.environ.get(ENV_URL, ""), model or os.environ.get(ENV_MODEL) or AUTHORS_MODEL, key, **kwargs
        )

    def judge(self, question: str, gold: str | Sequence[str], answer: str) -> Verdict:
        reply = self.ask(mirage_prompt(question, gold, answer))
        return Verdict(mirage_verdict(reply), reply)

    def ask(self, content: str) -> str:
        """One chat completion (R evaluate_utils.py:89-97: empty system message, temperature 0); its text."""
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": ""}, {"role": "user", "content": content}],
            "temperature": 0.0,
        }
        return self._content(self._post(json.dumps(body).encode()))

    def _post(self, data: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        for attempt in range(self.retries + 1):
            wait = min(self.max_wait, self.backoff * 2**attempt)
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    return reply.read()
            except urllib.error.HTTPError as err:
                status = err.code
                if status in (401, 403):
                    raise JudgeError(
                        f"judge at {self.url}: HTTP {status} ({err.reason}): the key was refused; "
                        f"set {' or '.join(ENV_KEYS)}"
                    ) from None
                if status != 429 and status < 500:
                    raise JudgeError(f"judge at {self.url}: HTTP {status} ({err.reason}): {_snippet(err)}") from None
                problem = f"HTTP {status} ({err.reason})"
                after = err.headers.get("Retry-After") if err.headers else None
                if after and after.strip().replace(".", "", 1).isdigit():
                    wait = min(self.max_wait, float(after))
            except urllib.error.URLError as err:
                reason = err.reason
                if isinstance(reason, ConnectionRefusedError):
                    raise JudgeError(f"judge at {self.url}: connection refused (is the server running?)") from None
                if not isinstance(reason, (TimeoutError, ConnectionError)):  # DNS, TLS, a bad address: no retry
                    raise JudgeError(f"judge at {self.url}: cannot connect: {reason}") from None
                timed_out = isinstance(reason, TimeoutError)
                problem = f"no reply within {self.timeout:g} s" if timed_out else f"connection lost ({reason})"
            except TimeoutError:
                problem = f"no reply within {self.timeout:g} s"
            except (OSError, http.client.HTTPException) as err:  # a reset or dropped connection mid-reply
                problem = f"connection lost ({err.__class__.__name__})"
            if attempt < self.retries:
                self.sleep(wait)
        raise JudgeError(f"judge at {self.url}: {problem}, {self.retries + 1} tries")

    def _content(self, raw: bytes) -> str:
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            shown = raw[:80].decode(errors="replace")
            raise JudgeError(
                f"judge at {self.url}: malformed reply (not a chat completion with choices[0].message.content): "
                f"{shown!r}"
            ) from None
        if not isinstance(content, str):
            raise JudgeError(f"judge at {self.url}: malformed reply (message content is {type(content).__name__})")
        return content


def _snippet(err: urllib.error.HTTPError) -> str:
    try:
        text = err.read()[:200].decode(errors="replace")
    except OSError:
        return ""
    return " ".join(text.split())


# -------------------------------------------------------------- the run's answers, their verdicts, rows

Key = tuple[str, str, str]  # (question, gold answer, generated text): what the judge sees


def to_judge(generations: pl.DataFrame) -> list[Key]:
    """The distinct (question, gold, text) of a run's stored answers that rows are made of, in order:
    θ0's neighbour answers at step 0 are a reference, not rows, and are left out (as in
    :func:`probes.generation.rescore`). An answer repeated at later steps is judged once."""
    scored = generations.filter(~((pl.col("step") == 0) & (pl.col("metric") == LOCALITY)))
    return list(dict.fromkeys(scored.select("question", "answer", "text").iter_rows()))


def judge_all(
    judge: Judge,
    keys: Sequence[Key],
    *,
    workers: int = 1,
    on_verdict: Callable[[Key, Verdict], None] | None = None,
) -> dict[Key, Verdict]:
    """Ask ``judge`` about every key, ``workers`` requests at a time; ``on_verdict`` sees each verdict as it
    comes (in completion order). The first failure stops the rest and is raised, after every verdict
    given before it (requests in flight included) has been passed to ``on_verdict``."""
    out: dict[Key, Verdict] = {}

    def take(key: Key, verdict: Verdict) -> None:
        out[key] = verdict
        if on_verdict is not None:
            on_verdict(key, verdict)

    if workers <= 1:
        for key in keys:
            take(key, judge.judge(*key))
    else:
        _concurrently(judge, keys, workers, take)
    return out


def _concurrently(judge: Judge, keys: Sequence[Key], workers: int, take: Callable[[Key, Verdict], None]) -> None:
    from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

    def collect(done: Iterable[Future]) -> BaseException | None:
        """Take the verdicts of the finished requests; return the first failure among them."""
        failure = None
        for future in done:
            if future.cancelled():
                continue
            if future.exception() is None:
                take(*future.result())
            elif failure is None:
                failure = future.exception()
        return failure

    failure = None
    with ThreadPoolExecutor(max_workers=workers) as pool:
        running: set[Future] = set()
        for key in keys:
            running.add(pool.submit(lambda k: (k, judge.judge(*k)), key))
            if len(running) >= 2 * workers:
                done, running = wait(running, return_when=FIRST_EXCEPTION)
                failure = collect(done)
                if failure is not None:
                    break
        if failure is not None:
            for future in running:  # not started: dropped; in flight: their verdicts are still kept
                future.cancel()
        failure = collect(wait(running).done) or failure
    if failure is not None:
        raise failure


def judged_rows(generations: pl.DataFrame, verdicts: Mapping[Key, bool], results: pl.DataFrame) -> pl.DataFrame:
    """The rows of protocol ``gen_judge@SETTING`` (step, probe, metric, protocol, edit_id, value): per
    edit, the share of its answers (paraphrases, neighbours averaged) the judge called correct, grouped
    as :func:`probes.generation.rescore` groups them; per probed step, retention's retained fraction over
    the judged edits, and the sample size and population the ``gen_exact`` rows of the same setting record
    (the same sample). A group with an answer the judge has not graded gets no row."""
    scored: dict[tuple, list[float]] = {}
    for step, probe, metric, setting, edit_id, question, answer, text in generations.select(
        "step", "probe", "metric", "setting", "edit_id", "question", "answer", "text"
    ).iter_rows():
        if metric == LOCALITY and step == 0:
            continue
        verdict = verdicts.get((question, answer, text))
        group = scored.setdefault((step, probe, metric, f"{GEN_JUDGE}@{setting}", edit_id), [])
        group.append(float("nan") if verdict is None else float(verdict))
    rows = [(*key, float(np.mean(v))) for key, v in scored.items() if not np.isnan(v).any()]
    retained: dict[tuple, list[float]] = {}
    for step, probe, metric, protocol, _, value in rows:
        if probe == RETENTION_PROBE and metric == RETENTION:
            retained.setdefault((step, probe, protocol), []).append(value)
    rows += [(s, p, RETAINED_FRACTION, protocol, None, float(np.mean(v))) for (s, p, protocol), v in retained.items()]
    sample = results.filter(
        (pl.col("probe") == RETENTION_PROBE)
        & pl.col("metric").is_in([SAMPLE_SIZE, SAMPLE_POPULATION])
        & pl.col("protocol").str.starts_with(f"{GEN_EXACT}@")
    )
    for step, probe, metric, protocol, value in sample.select(
        "step", "probe", "metric", "protocol", "value"
    ).iter_rows():
        judged = f"{GEN_JUDGE}@{protocol.split('@', 1)[1]}"
        if (step, probe, judged) in retained:
            rows.append((step, probe, metric, judged, None, value))
    return pl.DataFrame(
        rows,
        schema={
            "step": pl.Int64,
            "probe": pl.String,
            "metric": pl.String,
            "protocol": pl.String,
            "edit_id": pl.String,
            "value": pl.Float64,
        },
        orient="row",
    )


__all__ = [
    "AUTHORS_MODEL",
    "MIRAGE_PROMPT",
    "ChatJudge",
    "Judge",
    "JudgeError",
    "Verdict",
    "judge_all",
    "judged_rows",
    "mirage_prompt",
    "mirage_verdict",
    "to_judge",
]

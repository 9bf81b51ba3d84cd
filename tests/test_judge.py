"""The optional LLM judge (issue #38, docs/PROBES.md "Judging generations"): a local HTTP server that speaks
the chat-completions API stands in for the judge; nothing leaves the machine."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import polars as pl
import pytest

from probes.judge import MIRAGE_PROMPT, ChatJudge, JudgeError, endpoint, mirage_prompt, mirage_verdict


def rule(question: str, gold: str, text: str) -> bool:
    """The stand-in judge's verdict: the gold answer is in the text, or the text has an even length (so that
    a random tiny model's answers get both verdicts)."""
    return gold.lower() in text.lower() or len(text) % 2 == 0


class FakeJudge:
    """A chat-completions server on localhost. ``mode``: ok, malformed, 401 (unless the key is right),
    busy (503 for the first ``busy`` requests), fail_after (HTTP 400 once ``limit`` answers were given)."""

    def __init__(self, mode: str = "ok", key: str | None = None, busy: int = 0, limit: int = 0):
        self.mode, self.key, self.busy, self.limit = mode, key, busy, limit
        self.asked: list[tuple[str, str, str]] = []
        self.requests = 0
        self.bodies: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                owner.requests += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.bodies.append(body)
                if self.path != "/v1/chat/completions":
                    return self.send(404, b'{"error": "no such path"}')
                if owner.key and self.headers.get("Authorization") != f"Bearer {owner.key}":
                    return self.send(401, b'{"error": {"message": "Incorrect API key"}}')
                if owner.mode == "busy" and owner.requests <= owner.busy:
                    return self.send(503, b"busy")
                if owner.mode == "slow" and owner.requests <= owner.busy:
                    time.sleep(0.5)  # past the client's timeout
                if owner.mode == "malformed":
                    return self.send(200, b'{"id": "x", "object": "chat.completion"')
                if owner.mode == "fail_after" and len(owner.asked) >= owner.limit:
                    return self.send(400, b'{"error": "quota"}')
                content = body["messages"][1]["content"]
                sample = content.split("Here is a sample.")[1]
                q, g, t = (
                    re.search(rf"^{label}: (.*)$", sample, re.M).group(1)
                    for label in ("Question", "Gold target", "Predicted answer")
                )
                owner.asked.append((q, g, t))
                reply = {
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "A" if rule(q, g, t) else "B"}}
                    ]
                }
                self.send(200, json.dumps(reply).encode())

            def send(self, status: int, payload: bytes):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def free_port_url() -> str:
    """A localhost URL where nothing listens."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# ---------------------------------------------------------------------- the judge and the protocol


def test_the_authors_prompt_and_verdict():
    text = mirage_prompt("The capital of France is", "Paris", " Paris, of course")
    assert text.startswith("Your job is to look at a question, a gold target, and a predicted answer")
    assert "Question: The capital of France is\nGold target: Paris\nPredicted answer:  Paris, of course\n" in text
    assert text.endswith('Just return the letters "A" or "B", with no text around it.')
    assert MIRAGE_PROMPT.count("{") == 3  # only the three fields; no other braces for str.format to trip on
    assert "Gold target: Paris or Paname" in mirage_prompt("q", ["Paris", "Paname"], "x")
    assert mirage_verdict("A") and not mirage_verdict("B") and not mirage_verdict("A.") and not mirage_verdict(" A")
    assert endpoint("http://h:1/v1/") == "http://h:1/v1/chat/completions" == endpoint("http://h:1/v1/chat/completions")


def test_the_request_is_the_authors_and_the_key_is_sent(monkeypatch):
    with FakeJudge(key="sekrit") as server:
        monkeypatch.setenv("LIFELONG_JUDGE_KEY", "sekrit")
        monkeypatch.setenv("LIFELONG_JUDGE_URL", server.url)
        judge = ChatJudge.from_environment(model="judge-1")
        verdict = judge.judge("The capital of France is", "Paris", "Paris")
        assert verdict.correct and verdict.reply == "A"
        assert not judge.judge("The capital of France is", "Paris", "Tokyo").correct  # odd length, no gold: B
        (body, _) = server.bodies
        assert body["model"] == "judge-1" and body["temperature"] == 0.0
        assert body["messages"][0] == {"role": "system", "content": ""}
        assert body["messages"][1]["content"] == mirage_prompt("The capital of France is", "Paris", "Paris")


def one_line_error(call, *patterns: str) -> str:
    with pytest.raises(JudgeError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    for pattern in patterns:
        assert pattern in message, message
    return message


def test_failures_are_one_line_and_name_the_url(monkeypatch):
    down = free_port_url()
    one_line_error(lambda: ChatJudge(down).judge("q", "a", "t"), f"{down}/chat/completions", "connection refused")
    with FakeJudge(key="sekrit") as server:
        monkeypatch.setenv("LIFELONG_JUDGE_KEY", "wrong")
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        judge = ChatJudge.from_environment(server.url)
        one_line_error(lambda: judge.judge("q", "a", "t"), server.url, "HTTP 401", "LIFELONG_JUDGE_KEY")
        assert server.requests == 1  # a refused key is not retried
    with FakeJudge("malformed") as server:
        one_line_error(lambda: ChatJudge(server.url).judge("q", "a", "t"), server.url, "malformed reply")
    with FakeJudge() as server:
        one_line_error(lambda: ChatJudge(server.url + "/nowhere").judge("q", "a", "t"), "HTTP 404", "no such path")
    one_line_error(lambda: ChatJudge(""), "LIFELONG_JUDGE_URL")
    one_line_error(lambda: ChatJudge("ftp://example.org"), "ftp://example.org", "http://")


def test_busy_replies_are_retried_with_backoff():
    waits: list[float] = []
    with FakeJudge("busy", busy=2) as server:
        judge = ChatJudge(server.url, retries=3, backoff=0.5, sleep=waits.append)
        assert judge.judge("q", "gold", "gold").correct
        assert server.requests == 3 and waits == [0.5, 1.0]
    with FakeJudge("slow", busy=1) as server:
        judge = ChatJudge(server.url, timeout=0.2, retries=1, backoff=0.0, sleep=waits.append)
        assert judge.judge("q", "gold", "gold").correct and server.requests == 2
        server.busy = server.requests + 1  # the next one is slow too
        message = one_line_error(lambda: ChatJudge(server.url, timeout=0.2, retries=0).judge("q", "a", "t"), server.url)
        assert "no reply within 0.2 s, 1 tries" in message
    with FakeJudge("busy", busy=100) as server:
        judge = ChatJudge(server.url, retries=2, backoff=0.0, sleep=waits.append)
        one_line_error(lambda: judge.judge("q", "a", "t"), server.url, "HTTP 503", "3 tries")
        assert server.requests == 3


# ---------------------------------------------------------------------- a tiny run, judged after the fact


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 6-step tiny-llama run with generation protocols (question, qa) in both probes, as in
    tests/test_generation.py; copied per test, since judging writes into it."""
    from lifelong.core.models import load_model
    from lifelong.replay import replay
    from lifelong.run import RunConfig
    from streams import EditStream
    from tests.conftest import TINY_FT, make_edits

    where = tmp_path_factory.mktemp("judged")
    stream = where / "tiny.jsonl"
    EditStream(make_edits()).to_jsonl(stream)
    probes = ["edit_quality:generation=question+qa", "retention:schedule=every:2,generation=qa,generation_sample=3"]
    config = RunConfig(model="tiny-llama", stream=str(stream), editor_overrides=dict(TINY_FT), probes=probes)
    lm = load_model("tiny-llama")
    replay(config, where / "part", lm=lm, progress=False, stop_after=2)
    replay(config, where / "run", lm=lm, progress=False)
    return where


def copy_run(tiny_run, tmp_path, name: str = "run"):
    import shutil

    from lifelong.run import RunDir

    shutil.copytree(tiny_run / name, tmp_path / name)
    return RunDir(tmp_path / name)


def test_verdicts_land_in_the_results_and_show_and_are_not_sent_twice(tiny_run, tmp_path, capsys):
    from lifelong.cli import main
    from lifelong.summary import format_summary
    from probes.generation import rescore

    run = copy_run(tiny_run, tmp_path)
    answers = run.generations()
    distinct = {
        (q, a, t)
        for s, m, q, a, t in answers.select("step", "metric", "question", "answer", "text").iter_rows()
        if not (s == 0 and m == "locality")
    }
    with FakeJudge() as server:
        assert main(["judge", str(run.path), "--judge", server.url, "--judge-model", "local", "--quiet"]) == 0
        out = capsys.readouterr().out
        assert f"{len(distinct)} distinct answers of steps 0..6 judged by local at {server.url}/chat/completions" in out
        # every distinct (question, gold, text) once; the question is the raw prompt, not the QA context
        assert len(server.asked) == len(set(server.asked)) == len(distinct) and set(server.asked) == distinct
        assert not any(q.startswith("Please answer") for q, _, _ in server.asked)

        results = run.results()
        judged = results.filter(pl.col("protocol").str.starts_with("gen_judge@"))
        # per edit: the same grouping as the stored gen_exact rows, with the judge's verdict as the score
        want = rescore(answers, exact=lambda text, gold: float(rule("", gold, text)))
        want = want.filter(pl.col("protocol").str.starts_with("gen_exact@")).with_columns(
            pl.col("protocol").str.replace("gen_exact@", "gen_judge@")
        )
        got = judged.filter(pl.col("edit_id").is_not_null()).select(want.columns)
        assert got.sort(got.columns).equals(want.sort(want.columns))
        assert 0 < got["value"].mean() < 1  # both verdicts occur: the rows are not a constant
        own = run.own_results().select("step", "run_id", "timestamp").unique()
        assert own.height == 7  # one run id and timestamp (None at θ0) per step: the judge's rows carry them
        stamped = judged.select("step", "run_id", "timestamp").unique()
        assert stamped.join(own, on=["step", "run_id", "timestamp"], how="anti", nulls_equal=True).height == 0
        # retention's retained fraction per probed step, and the sample it was drawn from, as gen_exact's
        fraction = judged.filter(pl.col("metric") == "retained_fraction").sort("step")
        per_edit = (
            judged.filter(pl.col("metric") == "retention").group_by("step").agg(pl.col("value").mean()).sort("step")
        )
        assert fraction["step"].to_list() == per_edit["step"].to_list() == [2, 4, 6]
        assert fraction["value"].to_list() == pytest.approx(per_edit["value"].to_list())
        sample = judged.filter(pl.col("metric").is_in(["sample_size", "sample_population"]))
        assert sample.height == 4 and set(sample["protocol"]) == {"gen_judge@qa"}

        summary = format_summary(run)
        for protocol in ("gen_judge@question", "gen_judge@qa"):
            line = next(x for x in summary.splitlines() if x.startswith("efficacy at own step") and protocol in x)
            assert re.search(r"n=\d+", line) and "[" in line, line
        assert any("retained fraction at last step" in x and "gen_judge@qa" in x for x in summary.splitlines())

        # Judged again: nothing is sent, the same rows
        before = len(server.asked)
        assert main(["judge", str(run.path), "--judge", server.url, "--judge-model", "local", "--quiet"]) == 0
        assert len(server.asked) == before and "(0 asked now" in capsys.readouterr().out
        assert run.results().sort(results.columns).equals(results.sort(results.columns))
        # another judge model is a different protocol source: its verdicts are asked for anew
        assert main(["judge", str(run.path), "--judge", server.url, "--judge-model", "other", "--quiet"]) == 0
        assert len(server.asked) == 2 * before


def test_an_interrupted_pass_resumes_without_asking_again(tiny_run, tmp_path, capsys, monkeypatch):
    from lifelong import judging
    from lifelong.cli import main

    monkeypatch.setattr(judging, "FLUSH_EVERY", 4)
    run = copy_run(tiny_run, tmp_path)
    with FakeJudge("fail_after", limit=10) as server:
        assert main(["judge", str(run.path), "--judge", server.url, "--quiet", "--workers", "3"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and server.url in err and "HTTP 400" in err
        # every verdict the server gave was kept, those of requests still in flight at the failure too
        assert run.verdicts().height == len(server.asked) == 10 and run.judged_results() is None
        assert not any("gen_judge" in p for p in run.results()["protocol"].unique())
        first = list(server.asked)
        server.mode = "ok"
        assert main(["judge", str(run.path), "--judge", server.url, "--quiet"]) == 0
        again = server.asked[len(first) :]
        assert not set(first) & set(again)  # the 10 graded before the failure were not sent again
        assert f"{len(again)} asked now, 10 from earlier passes" in capsys.readouterr().out


def test_a_run_that_went_on_is_judged_for_its_new_answers_only(tiny_run, tmp_path, capsys):
    import shutil

    from lifelong.cli import main
    from lifelong.run import RunAsOf

    part = copy_run(tiny_run, tmp_path, "part")
    with FakeJudge() as server:
        assert main(["judge", str(part.path), "--judge", server.url, "--quiet"]) == 0
        judged_at_2 = part.results().filter(pl.col("protocol").str.starts_with("gen_judge@"))
        assert judged_at_2.height and judged_at_2["step"].max() == 2
        asked = len(server.asked)
        # the run goes on (here: its completed steps from the full run), and its judged rows are stale
        full = tiny_run / "run"
        for sub in ("results", "generations"):
            shutil.copytree(full / sub, part.path / sub, dirs_exist_ok=True)
        for name in ("progress.json", "steps.jsonl"):
            shutil.copy(full / name, part.path / name)
        assert part.judged_results() is None
        assert not part.results()["protocol"].str.starts_with("gen_judge@").any()
        assert RunAsOf(part.path, 2).results()["protocol"].str.starts_with("gen_judge@").sum() == judged_at_2.height
        assert main(["judge", str(part.path), "--judge", server.url, "--quiet"]) == 0
        new = server.asked[asked:]
        assert new and not set(new) & set(server.asked[:asked])
        assert RunAsOf(part.path, 2).results().filter(pl.col("protocol").str.starts_with("gen_judge@")).height


def test_a_damaged_verdict_part_is_refused(tiny_run, tmp_path):
    from lifelong.run import GENERATIONS_DIGEST, RunDirError

    run = copy_run(tiny_run, tmp_path)
    run.write_verdicts([{"judge": "j", "question": "q", "answer": "a", "text": "t", "correct": True, "reply": "A"}])
    (part,) = (run.path / "judged" / "verdicts").glob("part_*.parquet")
    digest = pl.read_parquet_metadata(part)[GENERATIONS_DIGEST]
    pl.read_parquet(part).with_columns(pl.lit(False).alias("correct")).write_parquet(
        part, metadata={GENERATIONS_DIGEST: digest}
    )
    with pytest.raises(RunDirError, match="part_000001.parquet: damaged file"):
        run.verdicts()


def test_no_generations_no_judging(tmp_path, stream_file):
    from lifelong.cli import main
    from lifelong.core.models import load_model
    from lifelong.judging import judge_run
    from lifelong.replay import replay
    from lifelong.run import RunConfig
    from streams.errors import UserError
    from tests.conftest import TINY_FT

    config = RunConfig(model="tiny-llama", stream=str(stream_file), editor_overrides=dict(TINY_FT), steps=1)
    run = replay(config, tmp_path / "plain", lm=load_model("tiny-llama"), progress=False).run
    with pytest.raises(UserError, match="no stored generated answers to judge"):
        judge_run(run, ChatJudge("http://127.0.0.1:9/v1"))
    assert main(["judge", str(run.path), "--judge", "http://127.0.0.1:9/v1", "--workers", "0"]) == 2

"""The model-sampled covariance corpus: chunked, seeded per chunk, resumable after an interruption."""

from __future__ import annotations

import pytest

from lifelong.core.models import load_model
from lifelong.editors import covariance


@pytest.fixture
def small_chunks(monkeypatch, tmp_path):
    monkeypatch.setattr(covariance, "SAMPLE_BATCH", 2)
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_interrupted_sampling_resumes_to_the_same_rows(small_chunks, monkeypatch):
    lm = load_model("tiny-llama")
    whole = covariance.sample_rows(lm, 5, 6, seed=3, partial=small_chunks / "a.safetensors")
    assert len(whole) == 5 and all(len(r) == 6 for r in whole)

    calls = {"n": 0}
    generate = lm.model.generate

    def dies_on_second_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    monkeypatch.setattr(lm.model, "generate", dies_on_second_chunk)
    partial = small_chunks / "b.safetensors"
    with pytest.raises(KeyboardInterrupt):
        covariance.sample_rows(lm, 5, 6, seed=3, partial=partial)
    assert partial.is_file()  # the first chunk (2 rows) was kept
    monkeypatch.setattr(lm.model, "generate", generate)
    resumed = covariance.sample_rows(lm, 5, 6, seed=3, partial=partial)
    assert resumed == whole


def test_token_rows_are_cached_and_partial_file_removed(small_chunks):
    lm = load_model("tiny-llama")
    rows = covariance._token_rows(lm, covariance.MODEL_SAMPLE, 30, 6, seed=0)
    assert len(rows) == 5
    stats = list((small_chunks / "cache" / "stats").rglob("*.safetensors"))
    assert [p.name for p in stats] == [f"{covariance.corpus_key(covariance.MODEL_SAMPLE)}-seed0-rows5-len6.safetensors"]
    assert covariance._token_rows(lm, covariance.MODEL_SAMPLE, 30, 6, seed=0) == rows

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


def test_interrupted_sampling_resumes_to_the_same_rows(small_chunks, monkeypatch, capsys):
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
    capsys.readouterr()
    resumed = covariance.sample_rows(lm, 5, 6, seed=3, partial=partial)
    assert resumed == whole
    # chunks of 2, 2 and 1 rows: one kept, the resumed sampling says where it carries on
    err = capsys.readouterr().err
    assert f"resuming text sampling for key statistics from {partial} at chunk 2 of 3: 2 rows kept, 3 of 5 left" in err


def test_a_resumed_sampling_line_is_silenced_by_quiet(small_chunks, monkeypatch, capsys):
    lm = load_model("tiny-llama")
    partial = small_chunks / "c.safetensors"
    monkeypatch.setattr(covariance, "SAMPLE_BATCH", 3)  # chunks of 3 and 2 rows: keep the first, as a kill would
    first = covariance.sample_rows(lm, 3, 6, seed=3, partial=small_chunks / "d.safetensors")
    covariance.atomic_save_tensors({"tokens": covariance.torch.tensor(first)}, partial)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    capsys.readouterr()
    assert len(covariance.sample_rows(lm, 5, 6, seed=3, partial=partial)) == 5
    assert "resuming" not in capsys.readouterr().err


def test_token_rows_are_cached_and_partial_file_removed(small_chunks):
    lm = load_model("tiny-llama")
    rows = covariance._token_rows(lm, covariance.MODEL_SAMPLE, 30, 6, seed=0)
    assert len(rows) == 5
    stats = list((small_chunks / "cache" / "stats").rglob("*.safetensors"))
    assert [p.name for p in stats] == [f"{covariance.corpus_key(covariance.MODEL_SAMPLE)}-seed0-rows5-len6.safetensors"]
    assert covariance._token_rows(lm, covariance.MODEL_SAMPLE, 30, 6, seed=0) == rows

"""GRACE: codebook rules, pass-through outside every radius, state through store/replay/checkout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifelong.core.delta import DeltaStore
from lifelong.core.models import load_model
from lifelong.core.scorer import Scorer
from lifelong.editors import make_editor
from lifelong.editors.adaptor import label_id
from lifelong.editors.grace import GRACEEditor, GRACEParams
from lifelong.replay import checkout, replay, scorer_for
from lifelong.run import RunConfig
from streams.errors import UserError
from tests.adaptor_helpers import assert_weights_equal, logits, snapshot
from tests.conftest import make_edits

SET = {"layer": "2", "eps_init": "1.0", "max_steps": "20"}


def key(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_codebook_add_expand_split_rules():
    g = GRACEEditor(GRACEParams(eps_init=1.0))
    v = torch.zeros(3)
    assert g.add(key(0, 0), v, "a") == 0 and len(g) == 1 and float(g.eps[0]) == 1.0
    assert g.add(key(0.5, 0), v, "a") == 0 and len(g) == 1 and float(g.eps[0]) == 1.0  # inside: nothing changes
    assert g.add(key(1.5, 0), v, "a") == 0 and len(g) == 1  # same label within ε + ε_init: expand
    assert float(g.eps[0]) == pytest.approx(1.5)
    assert g.add(key(5, 0), v, "a") == 1 and len(g) == 2 and float(g.eps[1]) == 1.0  # too far: a new key
    assert g.add(key(5.8, 0), v, "b") == 2 and len(g) == 3  # conflicting label: split
    assert float(g.eps[1]) == pytest.approx(0.4 - 1e-5) and float(g.eps[2]) == pytest.approx(0.4)
    hit, idx = g.lookup(torch.stack([key(0.2, 0), key(5.1, 0), key(5.7, 0), key(3.2, 0), key(20, 0)]))
    assert hit.tolist() == [True, True, True, False, False] and idx[:3].tolist() == [0, 1, 2]
    # The same key with another label: the original splits at d = 0 too (old ε = 0/2 − 1e-5, new ε = 0),
    # and the older of two equal keys wins the lookup, so the key is served by neither edit.
    assert g.add(key(5.8, 0), v, "c") == 3 and len(g) == 4
    assert float(g.eps[2]) == pytest.approx(-1e-5) and float(g.eps[3]) == 0.0
    hit, idx = g.lookup(key(5.8, 0)[None])
    assert idx.tolist() == [2] and hit.tolist() == [False]


def test_same_key_relabel_setting():
    g = GRACEEditor(GRACEParams(eps_init=1.0, same_key="relabel"))
    v = torch.zeros(3)
    g.add(key(0, 0), v, "a")
    assert g.add(key(0, 0), v, "b") == 0 and len(g) == 1 and float(g.eps[0]) == 1.0  # the entry takes "b"
    assert int(g.labels[0]) == label_id("b")


def _hooked(query):
    """A 2-entry codebook on a bare hooked Linear, for hand checks of the query position."""
    g = GRACEEditor(GRACEParams(eps_init=0.5, query=query))
    g.add(key(1, 0), torch.tensor([10.0, 10.0]), "a")
    layer = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.eye_(layer.weight)
    layer.register_forward_hook(g._hook)
    return g, layer


@pytest.mark.parametrize("query", ["last", "every"])
def test_query_position_by_hand(query):
    g, layer = _hooked(query)
    x = torch.tensor(
        [
            [[1.0, 0.0], [3.0, 0.0], [1.1, 0.0]],  # last token within ε of the key
            [[1.0, 0.0], [3.0, 0.0], [3.0, 1.0]],
        ]
    )  # only an earlier token within ε
    with torch.no_grad():
        y = layer(x)
    want = x.clone()
    want[0, 2] = 10.0  # the original (replace_last): the row's last token only
    if query == "every":
        want[0, 0] = want[1, 0] = 10.0  # our earlier rule: every position within ε
    assert torch.equal(y, want)
    g._mask = torch.tensor([[1, 1, 1], [1, 0, 0]])  # right padding: row 1's last real token is position 0
    with torch.no_grad():
        y = layer(x)
    if query == "last":
        want[1, 0] = 10.0
    assert torch.equal(y, want)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_weights_bitwise_unchanged_and_edit_prompt_improves(spec):
    lm = load_model(spec)
    base = snapshot(lm)
    edits = make_edits(6)
    scorer = Scorer(lm.model, lm.tokenizer)
    pairs = [(e.rendered_prompt, e.target_new) for e in edits]
    before = scorer.score(pairs).nll
    editor = make_editor("grace", SET).bind(lm)
    for e in edits:
        delta = editor.apply(lm, [e])
        assert not delta.changes
    assert_weights_equal(lm, base)
    after = scorer.score(pairs).nll
    assert (after < before).all(), (before, after)
    editor.release()
    assert (scorer.score(pairs).nll == before).all()  # hooks gone: the base model again


@pytest.fixture(scope="module")
def edited():
    lm = load_model("tiny-llama")
    editor = make_editor("grace", SET).bind(lm)
    editor.apply(lm, make_edits(3))
    base = load_model("tiny-llama")
    return lm, editor, base


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=40))
def test_outside_every_radius_outputs_equal_base(edited, text):
    lm, editor, base = edited
    with (
        torch.no_grad(),
        __import__("lifelong.editors.locate", fromlist=["capture_keys"]).capture_keys(
            lm.adapter, editor.params.layer
        ) as seen,
    ):
        got = logits(lm, [text])
    hit, _ = editor.lookup(seen[0][:, -1])  # the one query: the last token
    want = logits(base, [text])
    assert torch.equal(got[0, :-1], want[0, :-1])  # only the last position can change
    if not bool(hit.any()):
        assert torch.equal(got, want)


def test_edit_prompt_is_inside_its_radius(edited):
    lm, editor, base = edited
    e = make_edits(3)[0]
    assert not torch.equal(logits(lm, [e.rendered_prompt]), logits(base, [e.rendered_prompt]))


def test_state_round_trip_through_store(tmp_path):
    lm = load_model("tiny-llama")
    editor = make_editor("grace", SET).bind(lm)
    store = DeltaStore.for_scope(tmp_path, lm.model, editor.scope(lm))
    assert editor.state_dict() == {}
    store.commit(1, editor.apply(lm, make_edits(2)), editor.state_dict())
    other = make_editor("grace", SET)
    other.load_state_dict(store.load_state(1))
    for k, v in editor.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    other.load_state_dict({})
    assert len(other) == 0


@pytest.mark.parametrize("index, scan_from", [("exact", 256), ("exact", 1), ("hnsw", 1)])
def test_resume_and_checkout_equal_live(tmp_path, stream_file, monkeypatch, index, scan_from):
    """Also with the screen (or the graph index) in use from the first key on."""
    if index == "hnsw":
        pytest.importorskip("faiss")
    monkeypatch.setattr(GRACEEditor, "SCAN_FROM", scan_from)
    overrides = {**SET, "index": index}
    cfg = RunConfig(
        model="tiny-llama", editor="grace", stream=str(stream_file), probe_every=2, editor_overrides=overrides
    )
    lm = load_model("tiny-llama")
    full = replay(cfg, tmp_path / "full", lm=lm, progress=False)
    replay(cfg, tmp_path / "resumed", progress=False, stop_after=3)
    resumed = replay(cfg, tmp_path / "resumed", progress=False)
    cols = ["step", "probe", "metric", "protocol", "edit_id"]
    assert full.run.results().drop("run_id").sort(cols).equals(resumed.run.results().drop("run_id").sort(cols))
    rebuilt = checkout(tmp_path / "full", 6)
    texts = [e.rendered_prompt for e in make_edits(6)]
    assert torch.equal(logits(rebuilt, texts), logits(lm, texts))
    assert not torch.equal(logits(checkout(tmp_path / "full", 0), texts), logits(lm, texts))
    assert scorer_for(rebuilt).rewrite is None


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_upper_layers_match_the_full_forward(spec):
    from lifelong.editors.adaptor import UpperLayers

    lm = load_model(spec)
    scorer = Scorer(lm.model, lm.tokenizer)
    batch = scorer.collate([scorer.encode(e.rendered_prompt, e.target_new) for e in make_edits(3)])
    with torch.no_grad():
        full = scorer.answer_logits(batch)
        upper = UpperLayers(lm, 2, batch).answer_logits()
    assert torch.allclose(full, upper, atol=1e-5)


def test_a_step_saves_only_the_codebook_rows_it_changed(tmp_path, stream_file):
    """Each step's saved state holds the rows its edit added or changed (not the whole codebook), and the
    codebook rebuilt from steps 1..k equals the live one, as does one rebuilt from whole states."""
    lm = load_model("tiny-llama")
    cfg = RunConfig(model="tiny-llama", editor="grace", editor_overrides=SET, stream=str(stream_file), steps=4)
    run = replay(cfg, tmp_path / "g", lm=lm, progress=False).run
    store = DeltaStore(run.deltas_dir, {})
    states = store.step_states(4, incremental=True)
    assert all(len(s["index"]) <= 2 for s in states if s)  # one edit: its new entry (and a split neighbour)
    live = make_editor("grace", SET).bind(lm)
    live.load_step_states(states)
    whole = make_editor("grace", SET)
    whole.load_step_states([live.state_dict()])
    for name in GRACEEditor.ROWS:
        assert torch.equal(getattr(live, name), getattr(whole, name))
    assert len(live) == int(states[-1]["size"]) >= 1


def _reference_lookup(g, queries):
    """The rule measured on every key (the lookup before the screen): exact distances, first of ties."""
    dist, idx = torch.cdist(queries.float(), g.keys, compute_mode="donot_use_mm_for_euclid_dist").min(1)
    return dist <= g.eps[idx], idx


@pytest.mark.parametrize("width", [16, 128, 1536])
def test_screened_lookup_equals_measuring_every_key(width):
    """The matmul-form screen only drops keys that cannot be nearest: on near-ties, duplicated keys and
    queries placed exactly on a radius, hits and indices are bitwise those of the exact scan."""
    gen = torch.Generator().manual_seed(width)
    g = GRACEEditor(GRACEParams(eps_init=1.0))
    centres = torch.randn(40, width, generator=gen) * 4 + 20  # clustered keys, far from the origin
    keys = centres[torch.randint(0, 40, (900,), generator=gen)] + torch.randn(900, width, generator=gen) * 0.05
    keys[500:520] = keys[100:120]  # exact duplicates: the older must win
    g.keys, g.eps = keys, torch.rand(900, generator=gen) * 0.3
    g.labels = torch.zeros(900, dtype=torch.long)
    assert len(g) >= g.SCAN_FROM
    q = torch.cat(
        [
            keys[torch.randint(0, 900, (200,), generator=gen)] + torch.randn(200, width, generator=gen) * 0.02,
            keys[100:120],  # on duplicated keys
            (keys[:50] + keys[50:100]) / 2,  # halfway between two keys
            torch.randn(50, width, generator=gen) * 4 + 20,
        ]
    )
    # radii set to the exact nearest distance of some queries: d ≤ ε must still decide the same way
    d = torch.cdist(q, g.keys, compute_mode="donot_use_mm_for_euclid_dist")
    dist, idx = d.min(1)
    g.eps[idx[:100]] = dist[:100]
    g.eps[idx[100:140]] = torch.nextafter(dist[100:140], torch.tensor(0.0))  # one float below
    want_hit, want_idx = _reference_lookup(g, q)
    hit, got_idx = g.lookup(q)
    assert torch.equal(got_idx, want_idx) and torch.equal(hit, want_hit)
    assert 0 < int(want_hit.sum()) < len(q)
    for i in range(0, len(q), 37):  # the float64 nearest of the add rule
        ref = (g.keys.double() - q[i].double()[None]).norm(dim=1)
        assert g.nearest(q[i]) == (float(ref.min()), int(ref.argmin()))
    assert len(g._scan(q[:1])) < len(g) // 4  # the screen does rule most keys out


def _codebook(n, width, seed):
    gen = torch.Generator().manual_seed(seed)
    g = GRACEEditor(GRACEParams(eps_init=1.0, index="hnsw"))
    centres = torch.randn(30, width, generator=gen) * 3
    g.keys = centres[torch.randint(0, 30, (n,), generator=gen)] + torch.randn(n, width, generator=gen)
    g.eps, g.labels = 1.5 + torch.rand(n, generator=gen) * 2, torch.zeros(n, dtype=torch.long)
    q = g.keys[torch.randint(0, n, (300,), generator=gen)] + torch.randn(300, width, generator=gen) * 0.3
    return g, torch.cat([q, torch.randn(100, width, generator=gen) * 3])


def test_graph_index_decisions_and_rebuild():
    """index=hnsw: its candidates are measured exactly, so on a codebook where the graph finds the nearest
    key its hits and indices are the exact rule's; a graph rebuilt from a loaded state (as after checkout)
    answers exactly as the one grown key by key during the run."""
    pytest.importorskip("faiss")
    g, q = _codebook(1200, 64, 0)
    want_hit, want_idx = _reference_lookup(g, q)
    hit, idx = g.lookup(q)
    assert torch.equal(hit, want_hit) and torch.equal(idx, want_idx)
    assert 0 < int(hit.sum()) < len(q)
    grown = GRACEEditor(GRACEParams(index="hnsw"))  # keys arrive in steps, a lookup between steps
    for stop in (300, 700, 1200):
        grown.keys, grown.eps, grown.labels = g.keys[:stop], g.eps[:stop], g.labels[:stop]
        grown.lookup(q[:5])
    rebuilt = GRACEEditor(GRACEParams(index="hnsw"))
    rebuilt.load_state_dict({**g.state_dict(), "values": torch.zeros(1200, 1)})
    for a, b in zip(grown.lookup(q), rebuilt.lookup(q)):
        assert torch.equal(a, b)
    assert grown._graph.ntotal == rebuilt._graph.ntotal == 1200


def test_graph_index_needs_faiss(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(UserError, match="index=hnsw needs the faiss-cpu package"):
        make_editor("grace", {"index": "hnsw"})
    with pytest.raises(UserError, match="index must be exact or hnsw"):
        make_editor("grace", {"index": "kd"})


def test_training_forwards_look_the_key_up_once(monkeypatch):
    """An edit's training forwards send the same query every step, so the codebook is searched once per
    edit, and the value trained is the same as when every forward searches."""
    lm = load_model("tiny-llama")
    edits = make_edits(3)
    trained = []
    for memo in (True, False):
        editor = make_editor("grace", {**SET, "max_steps": "5", "stop_loss": "0"}).bind(lm)
        calls = []
        real = GRACEEditor.lookup

        def counted(self, queries, real=real, calls=calls):
            calls.append(len(queries))
            return real(self, queries)

        monkeypatch.setattr(GRACEEditor, "lookup", counted)
        if not memo:
            monkeypatch.setattr(GRACEEditor, "_lookup_once", lambda self, q: self.lookup(q))
        editor.apply(lm, edits)
        monkeypatch.undo()
        trained.append(editor.values.clone())
        if memo:
            assert len(calls) == 3  # one per edit (its own key is in the codebook when training starts)
        else:
            assert len(calls) == 3 * 5
        editor.release()
    assert torch.equal(trained[0], trained[1])

"""UltraEdit against its defining equation, recomputed here the authors' way (module hooks, full
logits, labels with -100, a plain float64 normaliser), on tiny Llama and GPT-2 models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lifelong.core.delta import DeltaStore
from lifelong.core.model_access import answer_token_ids
from lifelong.core.models import load_model
from lifelong.core.scorer import Scorer
from lifelong.editors import make_editor
from lifelong.editors.ultraedit import AUTHORS_MODULES, Normaliser, UltraEditEditor, UltraEditParams, default_modules
from lifelong.replay import checkout, replay
from lifelong.run import RunConfig
from streams import EditStream
from streams.errors import UserError
from tests.conftest import make_edits

EPS = float(torch.finfo(torch.float32).eps)
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def authors_sub_batches(lm, edits, size):
    """The authors' tuples (data/zsre.py:24-51): prompt ++ answer[:-1], labels aligned with the logits,
    sorted by length, longest first (data/base.py:43-50), right-padded with 0 / -100, ``size`` per batch."""
    items = []
    for e in edits:
        prompt = lm.tokenizer(e.rendered_prompt).input_ids
        answer = answer_token_ids(lm.tokenizer, e.target_new)
        items.append((prompt + answer[:-1], [-100] * (len(prompt) - 1) + answer))
    items.sort(key=lambda t: len(t[0]), reverse=True)
    for i in range(0, len(items), size):
        chunk = items[i : i + size]
        width = max(len(x) for x, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for r, (x, y) in enumerate(chunk):
            ids[r, : len(x)], mask[r, : len(x)], labels[r, : len(y)] = torch.tensor(x), 1, torch.tensor(y)
        yield ids, mask, labels


def authors_rows(lm, names, edits, size):
    """Per sub-batch, {module: (K, G)} in float64: a forward hook for the inputs and a full backward
    hook for the output gradients (util.py:140-166), the edited weights requiring grad (model.py:29-35)."""
    modules = {n: lm.model.get_submodule(n) for n in names}
    out = []
    for ids, mask, labels in authors_sub_batches(lm, edits, size):
        at = labels != -100
        got: dict[str, list] = {n: [None, None] for n in names}
        handles = []
        for n, m in modules.items():
            handles.append(m.register_forward_hook(lambda mod, i, o, n=n: got[n].__setitem__(0, i[0][at].detach())))
            handles.append(
                m.register_full_backward_hook(lambda mod, gi, go, n=n: got[n].__setitem__(1, go[0][at].detach()))
            )
            m.weight.requires_grad_(True)
        try:
            with torch.enable_grad():
                logits = lm.model(input_ids=ids, attention_mask=mask).logits
                F.cross_entropy(logits[at], labels[at]).backward()  # util.py:50-56
        finally:
            for h in handles:
                h.remove()
            for m in modules.values():
                m.weight.requires_grad_(False)
                m.weight.grad = None
        out.append({n: (got[n][0].double(), got[n][1].double()) for n in names})
    return out


class PlainNormaliser:
    """nets.py:16-24, transcribed in float64 (the m·unbiased-variance term included)."""

    def __init__(self, size):
        self.n = 0.0
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.var = torch.zeros(size, dtype=torch.float64)

    def update(self, x):
        m = x.shape[0]
        n = self.n + m
        delta = x.mean(0) - self.mean
        self.mean = self.mean + m * delta / n
        self.var = self.var + m * x.var(0) + self.n * m * delta**2 / n
        self.n = n

    @property
    def std(self):
        return (self.var / (self.n - 1 + EPS)).sqrt()


def weight_shape(lm, name):
    """(d_k, d_v) of a module, as the original's get_shape."""
    module = lm.model.get_submodule(name)
    return tuple(module.weight.shape[::-1]) if not lm.adapter.spec.transposed else tuple(module.weight.shape)


def expected_shift(keys, grads, norm, ridge=1.0, sign=1.0, lr=1e-6):
    """(solve(KᵀK + λI, KᵀV))ᵀ, V = −lr·‖k̂‖²·ĝ (ultraedit.py:84-94), in float64, (out, in)."""
    z = (torch.cat([keys, grads], -1) - norm.mean) / (norm.std + EPS)
    k_hat, g_hat = z.split([keys.shape[1], grads.shape[1]], -1)
    v = sign * -lr * (k_hat * k_hat).sum(-1, keepdim=True) * g_hat
    eye = torch.eye(keys.shape[1], dtype=torch.float64)
    return torch.linalg.solve(keys.T @ keys + ridge * eye, keys.T @ v).T


def as_out_in(lm, change):
    dense = change.materialize().double()
    return dense.T if lm.adapter.spec.transposed else dense


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("solve", ["original", "kernel"])
@pytest.mark.parametrize("n_edits", [6, 12])  # tiny models: 6 edits give rank-N factors, 12 a dense change
def test_each_step_is_the_ridge_solve_with_the_running_normaliser(tiny, n_edits, solve):
    editor = make_editor("ultraedit", {"sub_batch": "5", "solve": solve}).bind(tiny)
    names = editor.modules(tiny)
    norms: dict[tuple, PlainNormaliser] = {}
    for step, edits in enumerate((make_edits(n_edits), make_edits(n_edits, start=n_edits))):
        chunks = authors_rows(tiny, names, edits, 5)
        for chunk in chunks:  # sub-batch major, then module (ultraedit.py:103-120); one normaliser per shape
            for name in names:
                shape = weight_shape(tiny, name)
                norms.setdefault(shape, PlainNormaliser(sum(shape))).update(torch.cat(chunk[name], -1))
        delta = editor.apply(tiny, edits)
        assert set(delta.changes) == {n + ".weight" for n in names}
        for name in names:
            keys = torch.cat([c[name][0] for c in chunks])
            grads = torch.cat([c[name][1] for c in chunks])
            norm = norms[weight_shape(tiny, name)]
            change = delta.changes[name + ".weight"]
            assert (change.rank is not None) == (len(keys) < min(keys.shape[1], grads.shape[1]) / 2)
            got = as_out_in(tiny, change)
            assert rel(got, expected_shift(keys, grads, norm)) < 1e-3, (step, name)
            # The check tells λ and the sign of V apart: a changed one misses by far more than the tolerance.
            for wrong in (dict(ridge=2.0), dict(ridge=0.5), dict(sign=-1.0), dict(lr=2e-6)):
                assert rel(got, expected_shift(keys, grads, norm, **wrong)) > 0.1, wrong


def test_kernel_solve_agrees_with_the_original(tiny):
    """To float32 tolerance: with KᵀK + I's condition up to ~2e4 on these keys, each float32 solve is
    itself up to ~4e-4 (relative) from the float64 solution."""
    for n_edits in (6, 12):
        deltas = []
        for solve in ("original", "kernel"):
            lm = load_model(tiny.name)
            editor = make_editor("ultraedit", {"solve": solve})
            editor.apply(lm, make_edits(4, start=20))  # some normaliser history first
            deltas.append(editor.apply(lm, make_edits(n_edits)))
        for name, change in deltas[0].changes.items():
            assert rel(deltas[1].changes[name].materialize(), change.materialize()) < 1e-3


def direct_statistics(rows):
    """What nets.py's update gives after all ``rows`` (a list of chunks, m × D each), computed at once:
    the mean of every row, and Σ(x − x̄)² plus each chunk's unbiased variance (the m·var₁ term's surplus)."""
    every = torch.cat(rows)
    mean = every.mean(0)
    var = ((every - mean) ** 2).sum(0) + sum(c.var(0) for c in rows)
    return len(every), mean, var, (var / (len(every) - 1 + EPS)).sqrt()


def test_normaliser_equals_the_direct_statistics_over_every_row_seen():
    lm = load_model("tiny-llama")
    editor = make_editor("ultraedit", {"sub_batch": "3"}).bind(lm)
    names = editor.modules(lm)
    assert len({weight_shape(lm, n) for n in names}) == 1  # gate_proj and up_proj share one normaliser
    rows = []
    for edits in (make_edits(7), make_edits(3, start=7), make_edits(5, start=10)):
        for chunk in authors_rows(lm, names, edits, 3):
            rows.extend(torch.cat(chunk[n], -1) for n in names)
        editor.apply(lm, edits)
    n, mean, var, std = direct_statistics(rows)
    ((key, norm),) = {k.rsplit(".", 1)[0]: None for k in editor.state_dict()}.items()
    state = {k.rsplit(".", 1)[1]: v.double() for k, v in editor.state_dict().items()}
    assert key == "norm.64x128" and state["n"].item() == n
    torch.testing.assert_close(state["mean"], mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(state["var"], var, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state["std"], std, rtol=1e-4, atol=1e-6)
    plain_chan = ((torch.cat(rows) - mean) ** 2).sum(0)  # without the quirk the spread would be this
    assert (state["var"] - plain_chan).abs().max() > 1e-2


def test_one_row_sub_batch_leaves_the_statistics_finite():
    """The original's var₁ of one row is NaN (nets.py:22); a one-row sub-batch adds no spread of its own here."""
    norm = Normaliser(3)
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    norm.update(x, EPS)
    norm.update(torch.tensor([[2.0, 5.0, 2.0]]), EPS)
    assert norm.n.item() == 3
    torch.testing.assert_close(norm.mean, torch.tensor([2.0, 3.0, 2.0]))
    # M2 of the three rows plus the first chunk's unbiased variance (the second chunk has none)
    torch.testing.assert_close(norm.var, torch.tensor([2.0, 6.0, 2.0]) + x.var(0))
    assert torch.isfinite(norm.std).all()


def test_state_is_rebuilt_exactly_by_resume_and_checkout(tmp_path, stream_file):
    cfg = RunConfig(model="tiny-llama", editor="ultraedit", stream=str(stream_file), batch_size=2, probe_every=3)
    live = UltraEditEditor()
    full = replay(cfg, tmp_path / "full", editor=live, progress=False).run
    replay(cfg, tmp_path / "resumed", progress=False, stop_after=1)
    resumed = replay(cfg, tmp_path / "resumed", progress=False).run
    full_store, resumed_store = DeltaStore(full.deltas_dir, {}), DeltaStore(resumed.deltas_dir, {})
    final = full_store.load_state(3)
    assert set(final) == {f"norm.64x128.{f}" for f in ("n", "mean", "var", "std")}
    for name, value in live.state_dict().items():
        assert torch.equal(final[name], value) and torch.equal(resumed_store.load_state(3)[name], value), name
    for name, change in full_store.load_delta(3).changes.items():
        assert torch.equal(resumed_store.load_delta(3).changes[name].materialize(), change.materialize())
    # Step 2 checked out (weights and normaliser) and step 3 applied again: the run's own step 3, bitwise.
    lm = checkout(tmp_path / "full", 2)
    editor = UltraEditEditor()
    editor.load_step_states(full_store.step_states(2, editor.incremental_state))
    again = editor.apply(lm, EditStream(make_edits()).steps(batch_size=2)[2])
    for name, change in full_store.load_delta(3).changes.items():
        assert torch.equal(again.changes[name].materialize(), change.materialize()), name
    assert all(torch.equal(v, live.state_dict()[k]) for k, v in editor.state_dict().items())


@pytest.mark.parametrize(
    "model, modules, message",
    [
        ("tiny-llama", "sideways_proj:1", "cannot read modules 'sideways_proj:1'"),
        ("tiny-llama", "down_proj", "cannot read modules 'down_proj'"),
        ("tiny-llama", "gate_proj:1-9", "modules 'gate_proj:1-9': layers '1-9' out of range for a 4-layer model"),
        ("tiny-llama", "up_proj:x", "modules 'up_proj:x': cannot read layers 'x'"),
        ("tiny-llama", "up_proj:1;up:1", "modules 'up_proj:1;up:1' names a module twice"),
        ("tiny-gpt2", "gate_proj:1", "modules 'gate_proj:1': a gpt2 MLP has no gate_proj"),
    ],
)
def test_a_bad_modules_value_is_refused_in_one_line(model, modules, message):
    with pytest.raises(UserError) as err:
        editor = make_editor("ultraedit", {"modules": modules})
        lm = load_model(model)
        editor.bind(lm).scope(lm)
    text = str(err.value)
    assert text.startswith("ultraedit: ") and message in text and "\n" not in text


def test_default_modules_are_the_authors_and_map_to_the_depth():
    llama = [("gate", [11, 12, 13, 14, 15]), ("up", [18, 19, 20, 21, 22, 23, 24])]
    assert default_modules("llama", 32) == default_modules("llama", 30) == llama  # SmolLM2-135M: 30 layers
    assert default_modules("llama", 4) == [("gate", [1]), ("up", [2, 3])]
    assert default_modules("llama", 2) == [("gate", [0]), ("up", [1])]
    assert default_modules("mistral", 32) == [("down", [29, 30])]
    assert default_modules("gpt2", 4) == [("down", [2, 3])]
    assert AUTHORS_MODULES["gptj"][1] == (("down", tuple(range(18, 27))),)
    lm = load_model("tiny-llama")
    editor = make_editor("ultraedit").bind(lm)
    assert editor.hyperparameters()["modules"] == "gate_proj:1;up_proj:2,3"  # recorded resolved
    assert editor.scope(lm) == [
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.2.mlp.up_proj.weight",
        "model.layers.3.mlp.up_proj.weight",
    ]
    custom = make_editor("ultraedit", {"modules": "down_proj:2,3"}).bind(lm)
    assert custom.scope(lm) == ["model.layers.2.mlp.down_proj.weight", "model.layers.3.mlp.down_proj.weight"]
    p = UltraEditParams()
    assert (p.lr, p.ridge, p.sub_batch, p.eps, p.solve) == (1e-6, 1.0, 10, EPS, "original")


def test_one_step_lowers_the_edits_nll_and_the_opposite_shift_raises_it(tiny):
    """The sign of V: the shift is a (ridge-regularised) step down the edits' loss, so adding it lowers
    the targets' NLL and subtracting it raises it by as much (to first order)."""
    edits = make_edits(6)
    scorer = Scorer(tiny.model, tiny.tokenizer)
    pairs = [(e.rendered_prompt, e.target_new) for e in edits]
    before = scorer.score(pairs).nll.mean()
    delta = make_editor("ultraedit").apply(tiny, edits)
    after = scorer.score(pairs).nll.mean()
    delta.revert(tiny.model)
    delta.revert(tiny.model)
    opposite = scorer.score(pairs).nll.mean()
    assert after < before - 1e-4 and opposite > before + 1e-4
    assert abs((before - after) - (opposite - before)) < 0.05 * (before - after)


def test_no_weight_gets_a_gradient_and_the_state_keeps_its_size(tiny):
    editor = make_editor("ultraedit")
    editor.apply(tiny, make_edits(3))
    sizes = {k: v.shape for k, v in editor.state_dict().items()}
    editor.apply(tiny, make_edits(9, start=3))
    assert {k: v.shape for k, v in editor.state_dict().items()} == sizes
    assert all(p.grad is None and not p.requires_grad for p in tiny.model.parameters())
    with pytest.raises(ValueError, match="unexpected state entry 'codebook'"):
        editor.load_state_dict({"codebook": torch.zeros(1)})
    with pytest.raises(ValueError, match="incomplete"):
        editor.load_state_dict({"norm.64x128.n": torch.zeros(1)})
    assert editor.apply(tiny, []).changes == {}

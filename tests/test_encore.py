"""ENCORE (stabilise=encore): MPES's stop rule in the v*/z* fit, the norm term in the solve, composition."""

import pytest
import torch

from lifelong.editors import make_editor
from lifelong.editors.locate import CONTEXT_TEMPLATES, _target_on_top, optimize_value
from lifelong.editors.upper import UpperStack
from lifelong.testing import check_editor
from streams.errors import UserError
from tests.conftest import make_edits
from tests.test_stabilise import FAST

ENCORE = {**FAST, "stabilise": "encore"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def lm():
    from lifelong.core.models import load_model

    return load_model("tiny-llama")


# -- MPES: the stop rule --------------------------------------------------------------------------


def test_target_on_top_is_per_row():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]], dtype=torch.bfloat16)
    targets = torch.tensor([1, 2])
    on_top = _target_on_top(logits, torch.tensor([2.0, 1.0]), targets)
    assert on_top.tolist() == [True, False]  # row 1: token 0 (3.0) above
    assert _target_on_top(logits, torch.tensor([2.0, 3.5]), targets).all()  # the exact logit replaces the row's own
    assert _target_on_top(logits, torch.tensor([2.0, 3.0]), targets).all()  # a tie counts (as argmax's first index)


class Scheduled(UpperStack):
    """The real upper stack whose logits, at chosen evaluations, drop far below the target's exact
    logit on the first ``rows`` answer rows: a hand-built path to 'the target is the argmax'."""

    def __init__(self, adapter, start, schedule: dict[int, int]):
        super().__init__(adapter, start, torch.float32)
        self.schedule, self.calls = schedule, 0

    def logits(self, hidden):
        out = super().logits(hidden)
        self.calls += 1
        rows = self.schedule.get(self.calls, 0)
        if rows:
            out = out.clone()
            out[:rows] -= 1e4
        return out


def scheduled_fit(lm, schedule, hits, steps=8):
    edit = make_edits(1)[0]
    templates = CONTEXT_TEMPLATES[:3]
    stack = Scheduled(lm.adapter, 2, schedule)
    fit = optimize_value(lm, 1, edit, templates, steps=steps, stop_loss=-1.0, stop_argmax=hits, stack=stack)
    assert stack.calls == fit.steps  # one logits pass per evaluation
    return fit


def test_mpes_stops_at_the_first_evaluation_where_every_prompt_has_the_target_on_top(lm):
    from lifelong.core.model_access import Codec

    answers = 3 * len(Codec(lm.tokenizer).answer_ids(make_edits(1)[0].target_new))  # 3 templates
    # evaluation 2: every answer row but the last on top (not a hit); 4 and 6: every row (hits)
    schedule = {2: answers - 1, 4: answers, 6: answers}
    first = scheduled_fit(lm, schedule, hits=1)
    assert (first.steps, first.argmax_hits) == (4, 1)
    second = scheduled_fit(lm, schedule, hits=2)  # the authors' count: hits need not be consecutive
    assert (second.steps, second.argmax_hits) == (6, 2)
    off = scheduled_fit(lm, schedule, hits=0)  # MPES off: the fit runs to its cap, nothing counted
    assert (off.steps, off.argmax_hits) == (8, 0)
    never = scheduled_fit(lm, {2: answers - 1}, hits=1)
    assert (never.steps, never.argmax_hits) == (8, 0)
    # the fit up to the stop is the plain fit's: same δ after the same number of evaluations
    capped = scheduled_fit(lm, schedule, hits=0, steps=4)
    assert torch.equal(first.value, capped.value)


def test_the_authors_mpes_count_is_exactly_five_positions_after_the_first_prompt():
    """compute_z.py: num_correct (positions on top, the first prompt left out) == 5; ours: every position."""
    from lifelong.editors.locate import mpes_hit

    def rows(*flags):
        return torch.tensor(flags, dtype=torch.bool)

    # six prompts (the bare one first), one-token answer
    assert mpes_hit(rows(1, 1, 1, 1, 1, 1), 1, "authors") and mpes_hit(rows(1, 1, 1, 1, 1, 1), 1)
    assert mpes_hit(rows(0, 1, 1, 1, 1, 1), 1, "authors") and not mpes_hit(rows(0, 1, 1, 1, 1, 1), 1)
    assert not mpes_hit(rows(1, 0, 1, 1, 1, 1), 1, "authors")
    # two-token answer: every position right is 10 of them, not the authors' 5; five of ten is a hit
    assert not mpes_hit(rows(*[1] * 12), 2, "authors") and mpes_hit(rows(*[1] * 12), 2)
    assert mpes_hit(rows(1, 1, 1, 1, 1, 0, 1, 0, 1, 0, 0, 0), 2, "authors")


def fit_settings(editor, lm, edits, monkeypatch) -> list[dict]:
    """The keyword settings of every v*/z* fit ``editor`` makes while applying ``edits``."""
    import lifelong.editors.stabilise as stabilise

    seen, inner = [], stabilise.fit_value

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return inner(*args, **kwargs)

    monkeypatch.setattr(stabilise, "fit_value", spy)
    editor.apply(lm, edits)
    return seen


def test_memit_encore_passes_its_mpes_count_to_its_fits(lm, monkeypatch):
    editor = make_editor("memit", {**ENCORE, "mpes_count": "authors"})
    seen = fit_settings(editor, lm, make_edits(1), monkeypatch)
    assert [s["argmax_rule"] for s in seen] == ["authors"] and editor.hyperparameters()["mpes_count"] == "authors"


def test_memit_encore_passes_mpes_hits_to_its_fits(lm, monkeypatch):
    editor = make_editor("memit", {**ENCORE, "mpes_hits": "3"})
    assert [s["stop_argmax"] for s in fit_settings(editor, lm, make_edits(2), monkeypatch)] == [3, 3]
    report = editor.step_report()
    assert report["v_fits"] == 2 and 0 <= report["mpes_stopped"] <= 2


# -- the norm term: normal equations and a smaller update ---------------------------------------


def random_problem(lm, editor, layer, n=3, seed=0):
    editor.prepare(lm)
    gen = torch.Generator().manual_seed(seed)
    c = editor.second_moment(lm, layer)
    m, d = c.shape[0], lm.adapter.out_proj_weight_view(layer).shape[0]
    keys = torch.randn(m, n, generator=gen, dtype=torch.float64) * c.diagonal().mean().sqrt()
    residual = torch.randn(d, n, generator=gen, dtype=torch.float64)
    return c, keys, residual


def test_memit_encore_solve_satisfies_its_normal_equations_and_shrinks_the_update(lm):
    encore = make_editor("memit", ENCORE)
    c, keys, residual = random_problem(lm, encore, 2)
    u, v = encore.solve(lm, 2, keys, residual)
    delta = u @ v.T
    lam, alpha = encore.params.mom2_weight, encore.params.encore_norm
    assert alpha == 20.0
    # ∇ of λ‖ΔK₀‖² + ‖ΔK − R‖² + α‖Δ‖²_F (K₀K₀ᵀ = C), halved: Δ(λC + αI) + (ΔK − R)Kᵀ = 0
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    gradient = delta @ (lam * c + alpha * eye) + (delta @ keys - residual) @ keys.T
    assert gradient.norm() <= 1e-9 * (residual @ keys.T).norm()
    plain = make_editor("memit", FAST)
    plain.prepare(lm)
    u0, v0 = plain.solve(lm, 2, keys, residual)
    assert (u @ v.T).norm() < (u0 @ v0.T).norm()
    none = make_editor("memit", {**ENCORE, "encore_norm": "0"})  # α = 0: MEMIT's solve exactly
    none.prepare(lm)
    assert torch.equal(none.solve(lm, 2, keys, residual)[1], v0)


def test_memit_encore_keeps_past_edits_keys_in_its_solve(lm):
    """ENCORE's add_prev_edits (encore_main.py: cov += SEQ_CACHE, then SEQ_CACHE += KKᵀ): a step's solve
    preserves every earlier step's keys, Δ(λC + KₚKₚᵀ + αI) + (ΔK − R)Kᵀ = 0; plain MEMIT keeps none."""
    encore = make_editor("memit", ENCORE)
    encore.apply(lm, make_edits(2))
    assert set(encore.step_state()) == {f"past_keys.{layer}" for layer in encore.layers(lm)}
    past = {layer: cov.clone() for layer, cov in encore._past_cov.items()}
    first = encore.step_state()["past_keys.2"].double()
    assert torch.allclose(past[2], first @ first.T)
    c, keys, residual = random_problem(lm, encore, 2, seed=1)
    u, v = encore.solve(lm, 2, keys, residual)
    delta = u @ v.T
    lam, alpha = encore.params.mom2_weight, encore.params.encore_norm
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    gradient = delta @ (lam * c + past[2] + alpha * eye) + (delta @ keys - residual) @ keys.T
    assert gradient.norm() <= 1e-9 * (residual @ keys.T).norm()
    encore._past_cov = {}  # without the term the solve differs: the test can fail
    u1, v1 = encore.solve(lm, 2, keys, residual)
    assert not torch.allclose(u1 @ v1.T, delta)
    plain = make_editor("memit", FAST)
    plain.apply(lm, make_edits(1))
    assert plain.step_state() == {} and plain.state_dict() == {}


def test_only_the_active_stabilisers_settings_are_recorded():
    """A run's hyperparameters (its identity) name the active stabiliser's settings alone."""
    plain = make_editor("memit", FAST).hyperparameters()
    assert plain["stabilise"] == "none" and not {
        "nas_samples",
        "rect_percent",
        "mpes_hits",
        "mpes_count",
        "encore_norm",
    } & set(plain)
    hp = make_editor("memit", {**FAST, "stabilise": "nas"}).hyperparameters()
    assert hp["nas_samples"] == 4 and not {"rect_percent", "mpes_hits"} & set(hp)


def test_alphaedit_encore_adds_alpha_to_its_ridge(lm):
    overrides = {"nullspace_threshold": "0.5"}
    encore = make_editor("alphaedit", {**ENCORE, **overrides})
    c, keys, residual = random_problem(lm, encore, 2)
    encore._past_cov[2] = keys[:, :1] @ keys[:, :1].T  # an earlier edit's key
    u, v = encore.solve(lm, 2, keys, residual)
    delta = u @ v.T
    proj, past = encore.projector(lm, 2), encore._past_cov[2]
    ridge = encore.params.l2 + encore.params.encore_norm
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    # AlphaEdit's normal equations with (L2 + α)·I: Δ (KKᵀP + KₚKₚᵀP + (L2 + α) I) = R Kᵀ P
    lhs = delta @ (keys @ keys.T @ proj + past @ proj + ridge * eye)
    assert (lhs - residual @ keys.T @ proj).norm() <= 1e-9 * (residual @ keys.T @ proj).norm()
    plain = make_editor("alphaedit", {**FAST, **overrides})
    plain.prepare(lm)
    plain._past_cov[2] = past
    u0, v0 = plain.solve(lm, 2, keys, residual)
    assert delta.norm() < (u0 @ v0.T).norm()


def test_emmet_encore_adds_alpha_to_its_preserved_moment(lm):
    settings = {"v_steps": "5", "templates": "3", "layers": "2", "cov_tokens": "1024", "emmet_lambda": "0"}
    encore = make_editor("emmet", {**settings, "stabilise": "encore"})
    plain = make_editor("emmet", {**settings, "update_norm_lambda": "20"})
    c, keys, residual = random_problem(lm, encore, 2)
    plain.prepare(lm)
    assert torch.equal(encore.preserved_moment(lm, 2), plain.preserved_moment(lm, 2))
    u, v = encore.solve(lm, 2, keys, residual)
    assert torch.allclose((u @ v.T) @ keys, residual, rtol=0, atol=1e-8 * residual.norm().item())  # still exact


# -- the editors: contract, identity, refusals ----------------------------------------------------


@pytest.mark.parametrize("name", ["memit", "alphaedit"])
def test_encore_composes_and_resumes_bitwise(name):
    overrides = {**ENCORE, "nullspace_threshold": "0.5"} if name == "alphaedit" else ENCORE
    report = check_editor(lambda: make_editor(name, overrides), model="tiny-llama", max_examples=2, max_edits=2)
    report.raise_if_failed()
    assert {"checkout_equals_live", "resume_same_results"} <= set(report.passed)


@pytest.mark.parametrize("name", ["memit", "alphaedit", "emmet"])
def test_encore_settings_are_in_the_hyperparameters(name):
    hp = make_editor(name, {"stabilise": "encore"}).hyperparameters()
    assert (hp["stabilise"], hp["mpes_hits"], hp["mpes_count"], hp["encore_norm"]) == ("encore", 2, "all", 20.0)


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("rome", {"stabilise": "encore"}, "rome: stabilise=encore needs a least-squares solve"),
        ("r-rome", {"stabilise": "encore"}, "r-rome: stabilise=encore needs a least-squares solve"),
        ("memit", {"mpes_hits": "0"}, "memit.mpes_hits: must be at least 1, got 0"),
        ("memit", {"encore_norm": "-1"}, "memit.encore_norm: must not be negative, got -1.0"),
        ("memit", {"mpes_count": "some"}, "memit: mpes_count must be one of all, authors, got 'some'"),
    ],
)
def test_a_bad_encore_setting_is_refused_in_one_line(name, overrides, message):
    with pytest.raises(UserError) as err:
        make_editor(name, overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)

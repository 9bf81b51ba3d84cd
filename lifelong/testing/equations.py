"""Editor-specific equation checks (:data:`EQUATIONS`): registered per editor class, or an editor's own.

``rome_writes_key_value`` is registered for ROME and r-ROME, ``alphaedit_preserves_nullspace_outputs``
for AlphaEdit, ``ultraedit_solves_ridge`` for UltraEdit, ``emmet_writes_every_key`` for EMMET,
``rledit_applies_hypernetwork`` for RLEdit;
:func:`register_equation` adds more.
"""

from __future__ import annotations

from typing import TypeVar, cast

import torch

from lifelong.editors.base import Editor
from lifelong.testing.invariants import EditorUnderTest, Invariant, InvariantViolation, _invariant
from streams import EditStream

_E = TypeVar("_E", bound=Editor)


def rome_writes_key_value(subject: EditorUnderTest, stream: EditStream) -> None:
    """ROME/r-ROME: after apply, the edited projection maps the edit's key k to v*: ‖W'k + b − v*‖/‖v*‖ < 1e-4."""
    from lifelong.editors.rome import ROMEEditor

    lm = subject.fresh_model()
    editor = _expect(subject.fresh_editor(lm), ROMEEditor, "rome_writes_key_value")
    layer = editor.layer
    for step, edit in enumerate(stream, start=1):  # one edit per step: the equation holds for the last one
        from lifelong.replay import step_seed

        torch.manual_seed(step_seed(subject.seed, step))  # the seed apply will see: the same v*
        _, _, key, value = editor.rank_one(lm, edit)
        subject.apply(editor, lm, [edit], step)
        weight = lm.adapter.out_proj_weight_view(layer).double()
        bias = cast("torch.Tensor | None", lm.adapter.out_proj(layer).bias)
        out = weight @ key + (bias.double() if bias is not None else 0)
        err = ((out - value).norm() / value.norm()).item()
        if not err < 1e-4:
            raise InvariantViolation(f"edit {edit.id}: ‖W'k + b − v*‖/‖v*‖ = {err:.3g} ≥ 1e-4")


def alphaedit_preserves_nullspace_outputs(subject: EditorUnderTest, stream: EditStream) -> None:
    """AlphaEdit: each step's change maps the preserved keys (C's eigenvectors outside the
    null space, by the editor's nullspace_rule) to ~0, so outputs on preserved knowledge stay unchanged."""
    from lifelong.editors.memit import AlphaEditEditor

    lm = subject.fresh_model()
    editor = _expect(subject.fresh_editor(lm), AlphaEditEditor, "alphaedit_preserves_nullspace_outputs")
    for step, batch in enumerate(stream.steps(), start=1):
        delta = subject.apply(editor, lm, batch, step)
        for layer in editor.layers(lm):
            values, vectors = torch.linalg.eigh(editor.second_moment(lm, layer))
            preserved = vectors[:, ~editor.null_directions(values)]
            change = delta.changes[lm.adapter.out_proj_param_name(layer)].materialize().double()
            change = change.T if lm.adapter.spec.transposed else change  # (out, in)
            leak = ((change @ preserved).norm() / (change.norm() * preserved.norm() + 1e-300)).item()
            if not leak < 1e-6:
                raise InvariantViolation(f"step {step}, layer {layer}: ‖ΔW·K₀‖/(‖ΔW‖‖K₀‖) = {leak:.3g} ≥ 1e-6")


def ultraedit_solves_ridge(subject: EditorUnderTest, stream: EditStream) -> None:
    """UltraEdit: each step's ΔW = solve(KᵀK + λI, KᵀV)ᵀ (relative error < 1e-3), V = −lr·‖k̂‖²·ĝ
    normalised by the statistics that include the step; K, G recomputed on the weights before it."""
    from lifelong.editors.ultraedit import UltraEditEditor

    lm = subject.fresh_model()
    editor = _expect(subject.fresh_editor(lm), UltraEditEditor, "ultraedit_solves_ridge")
    p = editor.params
    for step, batch in enumerate(stream.steps(), start=1):
        names = editor.modules(lm)
        rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in names}
        for encoded in editor.sub_batches(lm, batch):  # on the weights the step starts from
            _, captured = editor.collect(lm, encoded)
            for name in names:
                rows[name].append(captured[name])
        delta = subject.apply(editor, lm, batch, step)
        for name in names:
            keys = torch.cat([k for k, _ in rows[name]]).double()
            grads = torch.cat([g for _, g in rows[name]]).double()
            norm = editor.normaliser(editor.shape(lm, name))
            assert norm is not None
            z = (torch.cat([keys, grads], -1) - norm.mean.double()) / (norm.std.double() + p.eps)
            k_hat, g_hat = z.split([keys.shape[1], grads.shape[1]], -1)
            v = -p.lr * (k_hat * k_hat).sum(-1, keepdim=True) * g_hat
            eye = torch.eye(keys.shape[1], dtype=torch.float64, device=keys.device)
            expected = torch.linalg.solve(keys.T @ keys + p.ridge * eye, keys.T @ v).T  # (out, in)
            change = delta.changes[name + ".weight"].materialize().double()
            change = change.T if lm.adapter.spec.transposed else change
            err = ((change - expected).norm() / expected.norm()).item()
            if not err < 1e-3:
                raise InvariantViolation(f"step {step}, {name}: ‖ΔW − solve(KᵀK + λI, KᵀV)ᵀ‖/‖·‖ = {err:.3g} ≥ 1e-3")


def rledit_applies_hypernetwork(subject: EditorUnderTest, stream: EditStream) -> None:
    """RLEdit: each step's ΔWᵀ = (KᵀK + e^λ I)⁻¹ KᵀV with V_i = −η (k_i·k̃_i) d̃_i, [k̃; d̃] the blocks
    y + s ⊙ ReLU(yAB + b) + t applied to [k; d] normalised by the statistics that include the step,
    restated here in float64 (relative error < 1e-3); K, D recomputed on the weights before the step."""
    import copy

    from lifelong.editors.rledit import RLEditEditor, keys_and_grads
    from lifelong.editors.rledit.network import Block

    lm = subject.fresh_model()
    editor = _expect(subject.fresh_editor(lm), RLEditEditor, "rledit_applies_hypernetwork")
    for step, batch in enumerate(stream.steps(), start=1):
        editor.bind(lm)
        net = copy.deepcopy(editor._net)
        assert net is not None
        pairs = [(e.rendered_prompt, e.target_new) for e in batch]
        rows = keys_and_grads(lm, net, pairs, editor._meta["chunk"])  # the copy's statistics move as apply's will
        delta = subject.apply(editor, lm, batch, step)
        for i, (target, (keys, grads)) in enumerate(zip(net.targets, rows)):
            g, m = net.net(i), net.mode[i]
            keys, grads = keys.double(), grads.double()
            eps = torch.finfo(torch.float32).eps
            y = (torch.cat([keys, grads], -1) - g.normaliser.mean.double()) / (g.normaliser.std.double() + eps)
            for block in cast("list[Block]", list(g.blocks)):
                a, b, bias = block.a.double(), block.b.double(), block.bias.double()
                y = y + block.scale[m].double() * torch.relu(y @ a @ b + bias) + block.shift[m].double()
            pk, pd = y[:, : keys.shape[1]], y[:, keys.shape[1] :]
            v = -g.lr[m].double() * (keys * pk).sum(-1, keepdim=True) * pd
            eye = torch.eye(keys.shape[1], dtype=torch.float64, device=keys.device)
            expected = torch.linalg.solve(keys.T @ keys + g.lamda[m].double().exp() * eye, keys.T @ v).T  # (out, in)
            name = lm.adapter.mlp_proj_name(*target) + ".weight"
            change = delta.changes[name].materialize().double()
            change = change.T if lm.adapter.spec.transposed else change
            err = ((change - expected).norm() / expected.norm()).item()
            if not err < 1e-3:
                raise InvariantViolation(f"step {step}, {name}: ‖ΔW − (KᵀK + e^λI)⁻¹KᵀV‖/‖·‖ = {err:.3g} ≥ 1e-3")


def emmet_writes_every_key(subject: EditorUnderTest, stream: EditStream) -> None:
    """EMMET: each step's change writes every key of the batch: ΔW k̄ᵢ = rᵢ for all i, as
    ΔW K = R (D + λI)⁻¹ D with D = KᵀC⁻¹K (λ only for batches; λ = 0 gives ΔW K = R exactly),
    relative error < 1e-4. K (grouped template-averaged keys) and R (each edit's fitted z* − h,
    over the layers of the range) are recomputed here on the weights before the step, at the
    range's first layer, and C from the key statistics with the editor's weight and ridge."""
    from lifelong.editors.emmet import EMMETEditor
    from lifelong.editors.locate import average_key, fit_value
    from lifelong.replay import step_seed

    lm = subject.fresh_model()
    editor = _expect(subject.fresh_editor(lm), EMMETEditor, "emmet_writes_every_key")
    p = editor.params
    for step, batch in enumerate(stream.steps(), start=1):
        layers = editor.layers(lm)
        first, templates = layers[0], p.context_templates(editor.name)
        keys = torch.stack([average_key(lm, first, e, templates, p.key_average) for e in batch], 1)
        torch.manual_seed(step_seed(subject.seed, step))  # the seed apply will see: the same z*
        fits = [fit_value(lm, layers[-1], e, p, editor.name) for e in batch]
        residual = torch.stack([f.value - f.original for f in fits], 1) / len(layers)
        delta = subject.apply(editor, lm, batch, step)
        c = editor.second_moment(lm, first).double() * p.mom2_update_weight
        c = c + p.update_norm_lambda * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
        d = keys.T @ torch.linalg.solve(c, keys)
        ridge = p.emmet_lambda if len(batch) > 1 else 0.0
        eye = torch.eye(len(batch), dtype=d.dtype, device=d.device)
        expected = residual @ torch.linalg.solve(d + ridge * eye, d)  # R (D + λI)⁻¹ D (D symmetric)
        change = delta.changes[lm.adapter.out_proj_param_name(first)].materialize().double()
        change = change.T if lm.adapter.spec.transposed else change  # (out, in)
        err = ((change @ keys - expected).norm() / expected.norm()).item()
        if not err < 1e-4:
            raise InvariantViolation(f"step {step}, layer {first}: ‖ΔW K − R (D + λI)⁻¹ D‖/‖·‖ = {err:.3g} ≥ 1e-4")


EQUATIONS: dict[type, dict[str, Invariant]] = {}
"""Editor-specific equation checks: editor class -> {name: Invariant}; subclasses inherit them."""


def _expect(editor: Editor, cls: type[_E], check: str) -> _E:
    """``editor`` as the class ``check`` is registered for (it reads that class's internals)."""
    if not isinstance(editor, cls):
        raise TypeError(f"{check} checks a {cls.__name__} (or a subclass), not {type(editor).__name__}")
    return editor


def register_equation(editor_cls: type, invariant: Invariant) -> Invariant:
    """Register an equation check for ``editor_cls`` (and its subclasses); returns the invariant."""
    EQUATIONS.setdefault(editor_cls, {})[invariant.name] = invariant
    return invariant


def _one_edit_steps(max_edits: int):
    """The streams ROME's equation is checked on: one edit per step, no conflict chains."""
    from lifelong.testing.strategies import edit_streams

    return edit_streams(max_edits=max_edits, max_batch=1, conflicts=False)


def _register_builtin_equations() -> None:
    from lifelong.editors.rome import ROMEEditor

    register_equation(ROMEEditor, _invariant(rome_writes_key_value, _one_edit_steps))
    from lifelong.editors.memit import AlphaEditEditor

    register_equation(AlphaEditEditor, _invariant(alphaedit_preserves_nullspace_outputs))
    from lifelong.editors.ultraedit import UltraEditEditor

    register_equation(UltraEditEditor, _invariant(ultraedit_solves_ridge))
    from lifelong.editors.emmet import EMMETEditor

    register_equation(EMMETEditor, _invariant(emmet_writes_every_key))
    from lifelong.editors.rledit import RLEditEditor

    register_equation(RLEditEditor, _invariant(rledit_applies_hypernetwork))


_register_builtin_equations()


def invariants_for(editor: Editor) -> dict[str, Invariant]:
    """The equation checks that apply to ``editor``: registered for its class (or a base), or its own."""
    out: dict[str, Invariant] = {}
    for cls in reversed(type(editor).__mro__):
        out.update(EQUATIONS.get(cls, {}))
    own = getattr(editor, "testing_invariants", None)
    if callable(own):
        out.update({inv.name: inv for inv in own()})
    return out

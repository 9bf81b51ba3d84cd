"""Training RLEdit's hypernetwork over whole edit sequences (:func:`train_hypernetwork`, ``lifelong train-rledit``).

An epoch edits one sequence of ``num_seq`` batches of ``n_edits`` training records into the model,
each batch's update added to the weights for the rest of the sequence. At step t of the sequence
the hypernetwork's update ΔW_t is scored on the last ``back_depth`` batches (memory backtracking)
with the discounted sequence objective (:func:`sequence_objective`)

    L_t = Σ_{j<back_depth} γ^j (L_gen(t−j) + c_loc · L_loc(t−j)) + c_reg Σ_W ‖ΔW_t‖²,

L_gen: the summed per-chunk mean cross-entropy of the new targets on a paraphrase of each edit,
L_loc: the summed per-chunk mean KL of the model after from before ΔW_t on a neighbourhood prompt
of each edit. Its gradient reaches the hypernetwork through ΔW_t only (earlier updates are fixed);
the gradients of a sequence accumulate (norm clipped after every step) and Adam takes one step at
its end, after which the model is reset. Validation (``holdout`` records) edits a held-out sequence
with the current network and scores it at the end (the authors' sequential_valid)."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from lifelong.core.delta import atomic_save_tensors
from lifelong.core.models import LoadedModel, cache_root
from lifelong.core.scorer import Scorer
from lifelong.editors.mend.training import (
    _atomic_torch_save,
    _split_records,
    _write_curve,
    load_training_records,
    model_key,
    read_curve,
    record_keys,
)
from lifelong.editors.rledit.network import (
    Hypernetwork,
    build_hypernetwork,
    edit_targets,
    keys_and_grads,
    resolve_params,
    shifted,
)
from streams import Edit
from streams.errors import UserError


@dataclass
class TrainConfig:
    """The authors' RLEdit settings for Llama-3-8B (zhrli324/RLEdit ``config/editor/rledit.yaml``,
    ``config/config.yaml`` num_seq, ``config/dataset/counterfact.yaml`` n_edits and batch_size);
    ``steps`` (a cap), validation and checkpoints are ours."""

    n_edits: int = 20  # edits per sequence step (dataset n_edits)
    chunk: int = 4  # edits per forward/backward (dataset batch_size)
    num_seq: int = 400  # steps per training sequence (num_seq)
    epochs: int = 1  # sequences, one Adam step each (n_epochs)
    rank: int = 1024  # rank of each block's A B (rank)
    n_blocks: int = 4  # residual blocks (n_blocks)
    edit_lr: float = 1e-6  # initial η per edited weight (lr)
    meta_lr: float = 1e-5  # Adam's learning rate (meta_lr)
    loc_coef: float = 0.6  # c_loc (loc_coef)
    reg_coef: float = 1e-4  # c_reg (reg_coef)
    time_decay: float = 0.95  # γ (time_decay)
    back_depth: int = 10  # batches scored at each step, the current one included (back_depth)
    max_grad_norm: float = 1.0  # clip of the accumulated gradient after every step (max_grad_norm)
    seed: int = 0
    steps: int = 0  # cap on sequence steps over all epochs (0: epochs × num_seq, the authors' schedule)
    checkpoint_every: int = 10  # steps between checkpoints (and at every sequence's end)
    holdout: int = 100  # validation records: the last N, edited as one held-out sequence of n_edits batches
    eval_every: int = 1  # epochs between validations
    patience: int = 0  # stop after this many epochs without a better validation score (0: never; keep the last)
    stop_key: str = "es"  # the score early stopping watches: es (higher is better) or nll (lower is better)


TRAINING_PRESETS: dict[str, TrainConfig] = {
    "published": TrainConfig(),
    # sized for a CPU: short sequences of 5 edits, 5 batches scored back, validated every epoch on 20
    # held-out edits, stopped at a plateau of 3 epochs of the new target's NLL (validation ES stays 0 for
    # the first epochs at the published rates, so an ES plateau would stop at once) or at 200 steps
    "cpu-capped": TrainConfig(
        n_edits=5,
        num_seq=8,
        epochs=25,
        back_depth=5,
        steps=200,
        checkpoint_every=8,
        holdout=20,
        patience=3,
        stop_key="nll",
    ),
}

_NOT_IDENTITY = ("steps", "checkpoint_every")


def training_preset(name: str, **changes: Any) -> TrainConfig:
    if name not in TRAINING_PRESETS:
        raise UserError(f"rledit: training must be one of {', '.join(TRAINING_PRESETS)}, got '{name}'")
    return replace(TRAINING_PRESETS[name], **changes)


def config_identity(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(config).items() if k not in _NOT_IDENTITY}


def _preset_name(config: TrainConfig) -> str:
    ident = config_identity(config)
    return next((n for n, c in TRAINING_PRESETS.items() if config_identity(c) == ident), "custom")


def hypernet_dir(lm: LoadedModel, layers: Sequence[int], data: str, kinds: Sequence[str], config: TrainConfig) -> Path:
    """Cache directory for (model, layers, edited weights, training data, training settings)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_key(lm)).name)
    parts = [model_key(lm), list(layers), data, list(kinds), config_identity(config)]
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "rledit" / f"{safe}-L{'_'.join(map(str, layers))}-{'_'.join(kinds)}-{digest}"


def sequence_objective(
    gen: Sequence[torch.Tensor], loc: Sequence[torch.Tensor], shifts: Sequence[torch.Tensor], config: TrainConfig
) -> torch.Tensor:
    """L_t from the per-batch losses, most recent batch first (gen[j], loc[j]: batch t−j; loc unweighted)."""
    total = sum(config.time_decay**j * (g + config.loc_coef * lo) for j, (g, lo) in enumerate(zip(gen, loc)))
    return cast(torch.Tensor, total + config.reg_coef * sum((s**2).sum() for s in shifts))


def _chunks(pairs: Sequence[tuple[str, str]], size: int) -> list[Sequence[tuple[str, str]]]:
    return [pairs[i : i + size] for i in range(0, len(pairs), size)]


def batch_losses(
    lm: LoadedModel,
    targets: Sequence[tuple[int, str]],
    shifts: Sequence[torch.Tensor],
    gen_pairs: Sequence[tuple[str, str]],
    loc_pairs: Sequence[tuple[str, str]],
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_gen, L_loc) of one batch under W + ΔW (``shifts``: ΔWᵀ per target), L_loc against W."""
    scorer = Scorer(lm.model, lm.tokenizer)
    gens, locs = [], []
    for part in _chunks(gen_pairs, chunk):
        data = scorer.collate([scorer.encode(p, a) for p, a in part])
        with shifted(lm, targets, shifts):
            gens.append(torch.nn.functional.cross_entropy(scorer.answer_logits(data), data.targets))
    for part in _chunks(loc_pairs, chunk):
        data = scorer.collate([scorer.encode(p, a) for p, a in part])
        with torch.no_grad():
            before = scorer.answer_logits(data).log_softmax(-1)
        with shifted(lm, targets, shifts):
            after = scorer.answer_logits(data).log_softmax(-1)
        locs.append(torch.nn.functional.kl_div(after, before, reduction="batchmean", log_target=True))
    return torch.stack(gens).sum(), torch.stack(locs).sum()


def _batch_pairs(edit: Edit, rng: np.random.Generator) -> tuple[tuple[str, str], tuple[str, str], tuple[str, str]]:
    """(edit, paraphrase, neighbourhood) pairs of one record: one paraphrase and one neighbourhood prompt
    drawn, as the authors' CounterFact loader (a record without them: its own prompt)."""
    para = edit.paraphrases[int(rng.integers(len(edit.paraphrases)))] if edit.paraphrases else edit.rendered_prompt
    if edit.neighborhood:
        n = edit.neighborhood[int(rng.integers(len(edit.neighborhood)))]
        loc = (n.prompt, n.answer)
    else:
        loc = (edit.rendered_prompt, edit.target_true or edit.target_new)
    return (edit.rendered_prompt, edit.target_new), (para, edit.target_new), loc


def sequence_batches(records: Sequence[Edit], config: TrainConfig, epoch: int, length: int) -> list[list[Edit]]:
    """The epoch's sequence: ``length`` batches of ``n_edits`` records in a (seed, epoch) shuffled order."""
    order = np.random.default_rng([config.seed, epoch]).permutation(len(records))
    return [[records[int(i)] for i in order[s * config.n_edits : (s + 1) * config.n_edits]] for s in range(length)]


def _pairs(batch: Sequence[Edit], config: TrainConfig, epoch: int, position: int):
    rng = np.random.default_rng([config.seed, epoch, position])
    drawn = [_batch_pairs(e, rng) for e in batch]
    return [d[0] for d in drawn], [d[1] for d in drawn], [d[2] for d in drawn]


def sequence_step(
    lm: LoadedModel, net: Hypernetwork, history: Sequence[tuple[list, list, list]], config: TrainConfig
) -> dict[str, Any]:
    """One step: the current batch (history[-1]) through the network into ΔW, L_t backpropagated into
    the network's gradients. Returns ΔWᵀ per target (detached) and the losses."""
    edit_pairs = history[-1][0]
    kd = keys_and_grads(lm, net, edit_pairs, config.chunk)
    shifts = [net.shift(i, k, d) for i, (k, d) in enumerate(kd)]
    recent = list(reversed(history))[: config.back_depth]
    gens, locs = [], []
    for _, gen_pairs, loc_pairs in recent:
        g, lo = batch_losses(lm, net.targets, shifts, gen_pairs, loc_pairs, config.chunk)
        gens.append(g)
        locs.append(lo)
    total = sequence_objective(gens, locs, shifts, config)
    total.backward()
    return {
        "shifts": [s.detach() for s in shifts],
        "gen_loss": float(np.mean([g.item() for g in gens])),
        "loc_loss": float(np.mean([lo.item() for lo in locs])),
        "total": total.item(),
    }


def sequential_validation(
    lm: LoadedModel, net: Hypernetwork, records: Sequence[Edit], config: TrainConfig
) -> dict[str, float]:
    """Edit ``records`` in batches of ``n_edits`` with a copy of ``net`` (its normaliser moves as it edits),
    then score every edit: mean answer-token accuracy of the new target on its prompt (``es``) and
    paraphrases (``gen``), of the true answer on its neighbourhood prompts (``ls``), as the authors'
    sequential_valid; ours besides: the new target's mean NLL on the prompts (``nll``) and the share of
    neighbourhood answer tokens whose top prediction is the unedited model's (``same``)."""
    net = copy.deepcopy(net)
    views = [lm.adapter.mlp_weight_view(*t) for t in net.targets]
    saved = [v.detach().clone() for v in views]
    scorer = Scorer(lm.model, lm.tokenizer)
    near = [(n.prompt, n.answer) for e in records for n in e.neighborhood]
    unedited = scorer.score(near).argmax if near else []
    try:
        with torch.no_grad():
            for s in range(0, len(records), config.n_edits):
                pairs = [(e.rendered_prompt, e.target_new) for e in records[s : s + config.n_edits]]
                kd = keys_and_grads(lm, net, pairs, config.chunk)
                for i, (k, d) in enumerate(kd):
                    views[i] += net.shift(i, k, d).T.to(views[i].dtype)
            edit = scorer.score([(e.rendered_prompt, e.target_new) for e in records])
            para = [(p, e.target_new) for e in records for p in e.paraphrases]
            gen = scorer.score(para).token_acc if para else np.array([])
            after = scorer.score(near) if near else None
    finally:
        with torch.no_grad():
            for v, s0 in zip(views, saved):
                v.copy_(s0)
    mean = lambda xs: float(np.mean(xs)) if len(xs) else float("nan")  # noqa: E731
    same = [a == b for x, y in zip(unedited, after.argmax if after else []) for a, b in zip(x, y)]
    return {
        "es": mean(edit.token_acc),
        "gen": mean(gen),
        "ls": mean(after.token_acc) if after else float("nan"),
        "nll": mean(edit.nll),
        "same": mean(same),
    }


CURVE_FIELDS = (
    "step",
    "epoch",
    "seconds",
    "gen_loss",
    "loc_loss",
    "total",
    "val_es",
    "val_gen",
    "val_ls",
    "val_nll",
    "val_same",
)


def format_curve(rows: Sequence[dict]) -> str:
    """One line per validation: step, epoch, the mean losses since the previous one, the validation scores."""
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    lines = [
        f"{'step':>6} {'epoch':>5} {'gen loss':>9} {'loc loss':>9} {'val ES':>7} {'val GS':>7} {'val LS':>7} "
        f"{'val NLL':>7} {'same':>5}"
    ]
    window: list[dict] = []
    for row in rows:
        if row["step"]:
            window.append(row)
        if row.get("val_es") is not None:
            gen = float(np.mean([r["gen_loss"] for r in window])) if window else None
            loc = float(np.mean([r["loc_loss"] for r in window])) if window else None
            lines.append(
                f"{int(row['step']):>6} {fmt(row.get('epoch'), '.0f'):>5} {fmt(gen, '.3f'):>9} {fmt(loc, '.4f'):>9} "
                f"{fmt(row['val_es'], '.3f'):>7} {fmt(row['val_gen'], '.3f'):>7} {fmt(row['val_ls'], '.3f'):>7} "
                f"{fmt(row.get('val_nll'), '.3f'):>7} {fmt(row.get('val_same'), '.2f'):>5}"
            )
            window = []
    return "\n".join(lines)


_SCHEDULE = ("num_seq", "n_edits", "chunk", "epochs", "back_depth")  # what makes the authors' schedule


def is_authors_schedule(config: dict[str, Any]) -> bool:
    """Whether the sequences and epochs of ``config`` (a config identity) are the authors'."""
    published = asdict(TRAINING_PRESETS["published"])
    return all(config.get(k) == published[k] for k in _SCHEDULE)


def training_summary(meta: dict) -> str:
    """How the hypernetwork was trained, in one line (carried by every RLEdit figure): how training
    ended, against the authors' schedule where it is not theirs, with its validation scores."""
    t, config = meta["training"], meta["identity"]["config"]
    val = t.get("val") or {}
    scores = ", ".join(f"val {k} {val[k]:.3g}" for k in ("es", "gen", "ls", "nll") if val.get(k) is not None)
    scores = f"{scores} (n={t['val_n']}, after epoch {t['val_epoch']})" if scores else "no validation"
    ended = "cap" if t["stopped"] == "schedule" and not is_authors_schedule(config) else t["stopped"]
    authors = "the authors' schedule: one sequence of 400 steps of 20 edits"
    how = {
        "plateau": f"trained to a validation plateau (val {t.get('stop_key', 'es')}): stopped after "
        f"{t['steps_run']} steps ({authors})",
        "cap": f"stopped at the cap after {t['steps_run']} steps ({authors})",
        "schedule": f"ran the authors' whole schedule: {t['steps_run']} steps",
    }[ended]
    shape = f"sequences of {config['num_seq']} steps of {config['n_edits']} edits"
    return f"{how}, {t['epochs_run']} optimiser steps, {shape} ({t['preset']} training), {scores}"


def _check(config: TrainConfig, n_train: int) -> int:
    if min(config.n_edits, config.chunk, config.num_seq, config.epochs, config.back_depth, config.eval_every) < 1:
        raise UserError("rledit training: n_edits, chunk, num_seq, epochs, back_depth and eval_every must be >= 1")
    if config.stop_key not in ("es", "nll"):
        raise UserError(f"rledit training: stop_key must be es or nll, got '{config.stop_key}'")
    if config.patience and not config.holdout:
        raise UserError(f"rledit training: early stopping (patience {config.patience}) needs holdout records")
    length = min(config.num_seq, n_train // config.n_edits)
    if length < 1:
        raise UserError(f"rledit training: {n_train} training records cannot fill one batch of {config.n_edits}")
    return length


def _write_final(
    final: Path,
    net: Hypernetwork,
    config: TrainConfig,
    identity: dict,
    records: Sequence[Edit],
    heldout: Sequence[Edit],
    chosen: dict | None,
    ended: str,
    done: int,
    seconds: float,
    schedule: int,
    length: int,
) -> None:
    """The hypernetwork file, with how it was trained (what every RLEdit figure carries)."""
    meta = {
        "identity": identity,
        "steps": done,
        "seconds": round(seconds, 2),
        "targets": [list(t) for t in net.targets],
        "shapes": [list(s) for s in net.shapes],
        "rank": config.rank,
        "n_blocks": config.n_blocks,
        "chunk": config.chunk,
        "heldout_ids": [e.id for e in heldout],
        "train_keys": sorted(set().union(*(record_keys(e) for e in records))),
        "training": {
            "preset": _preset_name(config),
            "stopped": ended,
            "steps_run": done,
            "schedule": schedule,
            "epochs_run": -(-done // length),
            "patience": config.patience,
            "stop_key": config.stop_key,
            "val_n": len(heldout),
            "val_epoch": chosen["epoch"] if chosen else None,
            "val": chosen["val"] if chosen else None,
        },
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_save_tensors(tensors, final, {"lifelong_rledit": json.dumps(meta)})


def _resume(ckpt: Path, identity: dict, cap: int, net: Hypernetwork, optimizer: torch.optim.Optimizer):
    """Load a checkpoint into ``net`` (its accumulated gradient too) and ``optimizer``: (this sequence's
    summed updates, step, seconds, how it stopped, best validation, its network, last validation)."""
    saved = torch.load(ckpt, weights_only=True, map_location=next(net.parameters()).device)
    if json.loads(saved["identity"]) != identity:
        raise UserError(f"{ckpt}: checkpoint of a different training set-up; delete {ckpt.parent} to start over")
    if int(saved["step"]) > cap:
        raise UserError(f"{ckpt}: checkpoint at step {saved['step']}, past the cap of {cap} steps")
    net.load_state_dict(saved["net"])
    optimizer.load_state_dict(saved["optimizer"])
    for name, p in net.named_parameters():
        p.grad = saved["grads"].get(name)
    load = lambda key: json.loads(saved[key]) if saved[key] else None  # noqa: E731
    return (
        list(saved["acc"]),
        int(saved["step"]),
        float(saved["seconds"]),
        str(saved["stopped"]),
        load("best"),
        saved.get("best_net"),
        load("last_val"),
    )


def train_hypernetwork(
    lm: LoadedModel,
    layers: Sequence[int],
    data: str,
    config: TrainConfig,
    *,
    params: str | Sequence[str] | None = None,
    directory: Path | None = None,
    limit: int | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Train (or resume) RLEdit's hypernetwork for ``params`` of ``layers`` on ``data``; returns its file.

    Steps run sequence by sequence (see the module); a checkpoint (network, Adam, the sequence's
    accumulated gradient and weight updates) is written every ``checkpoint_every`` steps and at each
    sequence's end, so a killed run resumes to the same network. Every ``eval_every`` epochs the
    held-out sequence is validated; with ``patience``, the network of the best validation ES is kept
    and training stops after ``patience`` epochs without a better one. The model is left as it was."""
    from lifelong.core.bars import bar as progress_bar

    kinds = resolve_params(params, lm.adapter)
    records, heldout = _split_records(load_training_records(data, limit), config.holdout)
    length = _check(config, len(records))
    schedule = config.epochs * length
    cap = min(config.steps, schedule) if config.steps else schedule
    directory = Path(directory) if directory else hypernet_dir(lm, layers, data, kinds, config)
    directory.mkdir(parents=True, exist_ok=True)
    final, ckpt, curve_path = directory / "hypernet.safetensors", directory / "checkpoint.pt", directory / "curve.csv"
    net = build_hypernetwork(lm, layers, kinds, config.rank, config.n_blocks, config.edit_lr, config.seed)
    net = net.to(lm.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.meta_lr)
    content = hashlib.sha256(json.dumps([e.to_dict() for e in records], sort_keys=True, default=str).encode())
    identity = {
        "model": model_key(lm),
        "layers": list(layers),
        "params": list(kinds),
        "data": data,
        "limit": limit,
        "content": content.hexdigest()[:16],
        "config": config_identity(config),
    }
    views = [lm.adapter.mlp_weight_view(*t) for t in net.targets]
    base = [v.detach().clone() for v in views]
    acc = [torch.zeros_like(b) for b in base]  # this sequence's summed updates ΔW (out, in)
    done, seconds, stopped = 0, 0.0, ""
    best: dict[str, Any] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    last_val: dict[str, Any] | None = None
    if ckpt.is_file():
        acc, done, seconds, stopped, best, best_state, last_val = _resume(ckpt, identity, cap, net, optimizer)
    curve = [r for r in read_curve(curve_path) if cast(float, r["step"]) <= done] if done else []

    def validate(row: dict, epoch: int) -> None:
        nonlocal best, best_state, last_val
        if not heldout:
            return
        scores = sequential_validation(lm, net, heldout, config)
        row.update({f"val_{k}": v for k, v in scores.items()})
        last_val = {"epoch": epoch, "val": scores}
        sign = 1.0 if config.stop_key == "es" else -1.0
        key = config.stop_key
        if epoch > 0 and config.patience and (best is None or sign * scores[key] > sign * best["val"][key]):
            best = dict(last_val)
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def save_checkpoint(step: int) -> None:
        _atomic_torch_save(
            {
                "identity": json.dumps(identity),
                "net": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "grads": {n: p.grad for n, p in net.named_parameters() if p.grad is not None},
                "acc": acc,
                "step": step,
                "seconds": seconds,
                "stopped": stopped,
                "best": json.dumps(best) if best else "",
                **({"best_net": best_state} if best_state is not None else {}),
                "last_val": json.dumps(last_val) if last_val else "",
            },
            ckpt,
        )

    todo = range(done + 1, cap + 1) if not stopped else range(0)
    if stop_after is not None:
        todo = todo[:stop_after]
    if done == 0 and len(todo):  # the untrained network's validation starts the curve
        curve = [{"step": 0, "epoch": 0, "seconds": 0.0}]
        validate(curve[0], 0)
        _write_curve(curve_path, curve, CURVE_FIELDS)
    bar = progress_bar(todo, show=progress, desc="train-rledit", unit="step", initial=done, total=cap)
    try:
        for step in bar:
            t0 = time.perf_counter()
            epoch, position = divmod(step - 1, length)
            with torch.no_grad():
                for v, b, a in zip(views, base, acc):
                    v.copy_(b + a)
            batches = sequence_batches(records, config, epoch, length)
            first = max(0, position - config.back_depth + 1)
            history = [_pairs(batches[p], config, epoch, p) for p in range(first, position + 1)]
            out = sequence_step(lm, net, history, config)
            torch.nn.utils.clip_grad_norm_(list(net.parameters()), config.max_grad_norm)
            for a, s in zip(acc, out["shifts"]):
                a += s.T
            row: dict[str, Any] = {"step": step, "epoch": epoch + 1}
            row.update({k: out[k] for k in ("gen_loss", "loc_loss", "total")})
            ends = position == length - 1 or step == cap
            if ends:  # the sequence's end: one Adam step, the model reset
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                acc = [torch.zeros_like(b) for b in base]
                with torch.no_grad():
                    for v, b in zip(views, base):
                        v.copy_(b)
                if (epoch + 1) % config.eval_every == 0 or step == cap:
                    validate(row, epoch + 1)
                    if config.patience and best is not None and epoch + 1 - best["epoch"] >= config.patience:
                        stopped = "plateau"
            seconds += time.perf_counter() - t0
            row["seconds"] = round(seconds, 3)
            curve.append(row)
            _write_curve(curve_path, curve, CURVE_FIELDS)
            bar.set_postfix(gen=f"{out['gen_loss']:.2f}", loc=f"{out['loc_loss']:.3f}")
            if ends or step % config.checkpoint_every == 0:
                done = step
                save_checkpoint(step)
            if stopped:
                break
    finally:
        bar.close()
        with torch.no_grad():
            for v, b in zip(views, base):
                v.copy_(b)
    if stopped or done >= cap:
        if config.patience and best_state is not None:
            net.load_state_dict(best_state)  # the network of the best validation
        chosen = best if config.patience and best is not None else last_val
        ended = stopped or ("schedule" if cap == schedule and is_authors_schedule(config_identity(config)) else "cap")
        _write_final(final, net, config, identity, records, heldout, chosen, ended, done, seconds, schedule, length)
    return final


def load_hypernetwork(path: Path, device: torch.device) -> tuple[Hypernetwork, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lifelong_rledit", "{}"))
    if not meta:
        raise UserError(f"{path}: not an RLEdit hypernetwork file")
    targets = [(int(a), str(b)) for a, b in meta["targets"]]
    net = Hypernetwork(targets, [tuple(s) for s in meta["shapes"]], meta["rank"], meta["n_blocks"], 1.0)
    net.load_state_dict(load_file(str(path)))
    return net.to(device).eval().requires_grad_(False), meta


__all__ = [
    "CURVE_FIELDS",
    "model_key",
    "TRAINING_PRESETS",
    "TrainConfig",
    "batch_losses",
    "config_identity",
    "edit_targets",
    "format_curve",
    "hypernet_dir",
    "load_hypernetwork",
    "sequence_objective",
    "sequence_step",
    "sequential_validation",
    "train_hypernetwork",
    "training_preset",
    "training_summary",
]

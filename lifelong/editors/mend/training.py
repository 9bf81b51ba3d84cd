"""Training MEND's hypernetwork (:func:`train_hypernetwork`, ``lifelong train-mend``): the training
records, the loss, the loop with its checkpoints and learning curve, and the cached file
(:func:`hypernet_dir`, :func:`load_hypernetwork`)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np
import torch

from lifelong.core.delta import atomic_save_tensors
from lifelong.core.durable import publish
from lifelong.core.models import LoadedModel, cache_root
from lifelong.core.scorer import Scorer
from lifelong.editors.mend.network import (
    LEGACY_PARAMS,
    NETWORK_FORM,
    Hypernetwork,
    _ids_mask,
    _mean_nll,
    build_hypernetwork,
    edit_gradient_factors,
    edit_targets,
    lowrank_added,
    resolve_params,
)
from streams import Edit
from streams.errors import UserError


@dataclass
class TrainConfig:
    """Hyperparameters of hypernetwork training. The defaults are the toolkit's MEND training file
    for Llama models (EasyEdit ``hparams/TRAINING/MEND/llama-7b.yaml``), which keeps the original's
    ``lr``, ``lr_lr``, ``edit_lr``, rank and loss weights; only ``steps`` (the cap) is ours."""

    steps: int = 2000  # cap on iterations, sized for a CPU (the toolkit's max_iters: 100,000)
    batch_size: int = 1  # edits per iteration (batch_size)
    accumulate: int = 10  # iterations per optimiser step, gradients averaged (accumulate_bs)
    rank: int = 1920  # rank of the hypernetwork's low-rank layers (mend.rank)
    lr: float = 1e-6  # Adam on the hypernetworks (lr)
    lr_lr: float = 1e-4  # Adam on the log step sizes (lr_lr)
    edit_lr: float = 1e-4  # initial α (edit_lr)
    c_edit: float = 0.1  # edit-loss weight (cedit)
    c_loc: float = 1.0  # locality-loss weight (cloc)
    grad_clip: float = 100.0  # gradient norm clip (grad_clip); 0: none
    seed: int = 0
    checkpoint_every: int = 250
    holdout: int = 500  # validation records: the last N of the data, kept out of training (val_steps)
    eval_every: int = 1000  # iterations between validations (val_interval)
    patience: int = 30000  # stop after this many iterations without a better validation score
    # (early_stop_patience; the network of the best validation is kept); 0: never stop early, keep the last
    # early_stop_key: "es" (the toolkit's edit/acc_val, higher is better), or "total" (the original's
    # loss/total_edit_val: c_edit·NLL + c_loc·locality KL on validation) or "nll", lower is better
    stop_key: str = "es"


TRAINING_PRESETS: dict[str, TrainConfig] = {
    "published": TrainConfig(),
    # the former CPU configuration: 150 optimiser steps of 4 edits, 100-1000x the published rates, rank 64
    "cpu-small": TrainConfig(
        steps=150,
        batch_size=4,
        accumulate=1,
        rank=64,
        lr=1e-3,
        lr_lr=1e-2,
        grad_clip=0.0,
        checkpoint_every=25,
        holdout=20,
        eval_every=25,
        patience=0,
    ),
}
"""Named training configurations (``train-mend --training NAME``, the editor's ``training`` setting)."""

STOP_KEYS = {"es": 1.0, "total": -1.0, "nll": -1.0}  # validation score -> sign (higher sign*value is better)


def training_preset(name: str, **changes: Any) -> TrainConfig:
    """The named configuration of :data:`TRAINING_PRESETS`, with ``changes`` applied."""
    if name not in TRAINING_PRESETS:
        raise UserError(f"mend: training must be one of {', '.join(TRAINING_PRESETS)}, got '{name}'")
    return replace(TRAINING_PRESETS[name], **changes)


# TrainConfig fields that do not change the trained network (left out of a checkpoint's identity)
_NOT_IDENTITY = ("steps", "checkpoint_every")
# fields added with early stopping, at the values that give the former training; left out of the
# identity at those values, so hypernetworks trained before keep their identity and cache key
_FORMER = {"accumulate": 1, "grad_clip": 0.0, "patience": 0}


def config_identity(config: TrainConfig) -> dict[str, Any]:
    """The settings that decide the trained network (the cap and checkpoint cadence do not)."""
    setup = {k: v for k, v in asdict(config).items() if k not in _NOT_IDENTITY}
    for k, v in _FORMER.items():
        if setup[k] == v:
            del setup[k]
    if not config.patience:  # without early stopping, when validation runs does not change the network
        del setup["eval_every"], setup["stop_key"]
    if not config.holdout:
        del setup["holdout"]  # as before holdout existed, so such checkpoints still resume
    return setup


def _prompt_key(subject: str, prompt: str) -> str:
    text = json.dumps([subject.strip().lower(), " ".join(prompt.lower().split())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_keys(edit: Edit) -> set[str]:
    """Hashes of (subject, prompt) for an edit's prompt and paraphrases: what overlap is judged on."""
    return {_prompt_key(edit.subject, text) for text in (edit.rendered_prompt, *edit.paraphrases)}


# Training splits: name -> (the data set trained on, the evaluated data sets whose subjects it leaves out).
# CounterFact: the toolkit's 10,000-record counterfact-edit file less every record whose subject is in
# the 500 ROME CounterFact records the reproduction edits; counterfact-long: also less the subjects of
# that file's first 1,000 records, which docs/LIFELONG.md (benchmarks/lifelong_table.py) edits; zsRE:
# MEND's zsRE training sample less the subjects of the KnowEdit zsRE test split.
# name -> (source data set, evaluated data sets, evaluated head of the source: its first N records)
TRAIN_SPLITS: dict[str, tuple[str, tuple[str, ...], int]] = {
    "counterfact": ("counterfact_easyedit", ("counterfact",), 0),
    "counterfact-long": ("counterfact_easyedit", ("counterfact",), 1000),
    "zsre": ("zsre_mend", ("zsre",), 0),
}
SPLIT_PREFIX = "split:"
_SPLIT_SEED = 20220425  # fixed: the validation records are the same whatever the training seed


def _subject_key(subject: str) -> str:
    return " ".join(subject.lower().split())


def training_split(name: str) -> list[Edit]:
    """The training split ``name`` of :data:`TRAIN_SPLITS`: its records less any whose subject (or
    subject+prompt) occurs in the evaluated data sets, in a fixed shuffled order (the last records
    serve as validation)."""
    from streams import load_stream

    if name not in TRAIN_SPLITS:
        raise UserError(
            f"unknown MEND training split '{SPLIT_PREFIX}{name}': expected one of "
            f"{', '.join(SPLIT_PREFIX + k for k in TRAIN_SPLITS)}"
        )
    source, evaluated, head = TRAIN_SPLITS[name]
    records = list(load_stream(f"dataset:{source}"))
    held = [e for ev in evaluated for e in load_stream(f"dataset:{ev}")] + records[:head]
    subjects = {_subject_key(e.subject) for e in held}
    keys = set().union(*(record_keys(e) for e in held)) if held else set()
    kept = [e for e in records if _subject_key(e.subject) not in subjects and not record_keys(e) & keys]
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(kept))
    return [kept[int(i)] for i in order]


def load_training_records(spec: str, limit: int | None = None) -> list[Edit]:
    """Edits from one or more comma-separated specs: ``split:NAME`` (a training split of
    :data:`TRAIN_SPLITS`), or a stream (builtin, dataset:NAME, file.jsonl)."""
    from streams import load_stream

    records: list[Edit] = []
    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        if part.startswith(SPLIT_PREFIX):
            records.extend(training_split(part[len(SPLIT_PREFIX) :]))
        else:
            records.extend(load_stream(part))
    if limit:
        records = records[:limit]
    if len(records) < 2:
        raise UserError(f"MEND training data '{spec}' has {len(records)} records: at least 2 are needed")
    return records


def model_key(lm: LoadedModel) -> str:
    name = lm.name
    return str(Path(name).resolve()) if os.path.isdir(name) else name


def hypernet_dir(
    lm: LoadedModel,
    layers: Sequence[int],
    data: str,
    params: str | Sequence[str] | None = None,
    config: TrainConfig | None = None,
) -> Path:
    """Cache directory of the hypernetwork for (model, layers, edited weights, training data,
    training settings, gradient network form).

    ``params`` None or empty: every MLP projection (the default); ``config`` None: the published
    training. Keys before the network's form was recorded are not produced: the networks they name
    were trained with the former form and are refused."""
    kinds = resolve_params(params, lm.adapter)
    config = config or training_preset("published")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_key(lm)).name)
    name = f"{safe}-L{'_'.join(map(str, layers))}-" + "_".join(kinds)
    parts: list[Any] = [model_key(lm), list(layers), data, list(kinds), config_identity(config), NETWORK_FORM]
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "mend" / f"{name}-{digest}"


def _locality_pairs(records: Sequence[Edit], index: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    edit = records[index]
    if edit.neighborhood:
        n = edit.neighborhood[int(rng.integers(len(edit.neighborhood)))]
        return [(n.prompt, n.answer)]
    other = records[int(rng.integers(len(records)))]  # no neighbors: another record's fact stands in
    return [(other.rendered_prompt, other.target_true or other.target_new)]


def _edit_pairs(edit: Edit) -> list[tuple[str, str]]:
    return [(text, edit.target_new) for text in (edit.rendered_prompt, *edit.paraphrases)]


class StepLosses(TypedDict):
    total: torch.Tensor  # with its graph: call backward through it
    edit: float
    loc: float


def training_step(
    lm: LoadedModel, net: Hypernetwork, batch: Sequence[Edit], loc_pairs: Sequence[tuple[str, str]], config: TrainConfig
) -> StepLosses:
    """MEND's loss for one batch of edits; returns its parts (call backward through the returned total)."""
    scorer = Scorer(lm.model, lm.tokenizer)
    grads = edit_gradient_factors(lm, net.targets, [(e.rendered_prompt, e.target_new) for e in batch])
    for i, (u, delta) in enumerate(grads):  # a shared network's statistics pool all its weights' rows
        net.transform(i).norm_u.update(u)
        net.transform(i).norm_delta.update(delta)
    factors = [net.factors(i, u, delta) for i, (u, delta) in enumerate(grads)]
    edit_pairs = [p for e in batch for p in _edit_pairs(e)]
    loc = _ids_mask(scorer, loc_pairs)
    with torch.no_grad():
        base_logp = scorer.answer_logits(loc).log_softmax(-1)
    with lowrank_added(lm, net.targets, factors):
        edit_loss = _mean_nll(scorer, _ids_mask(scorer, edit_pairs), len(edit_pairs))
        new_logp = scorer.answer_logits(loc).log_softmax(-1)
    loc_loss = torch.nn.functional.kl_div(new_logp, base_logp, log_target=True, reduction="batchmean")
    total = config.c_edit * edit_loss + config.c_loc * loc_loss
    return {"total": total, "edit": edit_loss.item(), "loc": loc_loss.item()}


def heldout_success(lm: LoadedModel, net: Hypernetwork, edits: Sequence[Edit]) -> dict[str, float]:
    """Each edit applied alone through ``net``: mean token accuracy of the new target (MEND's edit
    success) on the prompt (``es``) and on its paraphrases (``gen``), the share of prompts with every
    target token right (``exact``), the prompt's mean target-token NLL (``nll``), and on the edit's
    neighborhood prompts the KL of the edited from the unedited predictions (``loc``, the training
    loss's term) and the share of answer tokens whose top prediction is unchanged (``loc_same``)."""
    scorer = Scorer(lm.model, lm.tokenizer)
    es: list[float] = []
    gen: list[float] = []
    exact: list[float] = []
    nll: list[float] = []
    kl: list[float] = []
    same: list[float] = []
    for e in edits:
        grads = edit_gradient_factors(lm, net.targets, [(e.rendered_prompt, e.target_new)])
        loc = _ids_mask(scorer, [(n.prompt, n.answer) for n in e.neighborhood]) if e.neighborhood else None
        with torch.no_grad():
            factors = [net.factors(i, u, delta) for i, (u, delta) in enumerate(grads)]
            base = scorer.answer_logits(loc).log_softmax(-1) if loc is not None else None
            with lowrank_added(lm, net.targets, factors):
                scores = scorer.score(_edit_pairs(e))
                if loc is not None and base is not None:
                    new = scorer.answer_logits(loc).log_softmax(-1)
                    kl.append(float(torch.nn.functional.kl_div(new, base, log_target=True, reduction="batchmean")))
                    same.append(float((new.argmax(-1) == base.argmax(-1)).sum()) / new.shape[0])
        es.append(float(scores.token_acc[0]))
        exact.append(float(scores.exact[0]))
        nll.append(float(scores.nll[0]))
        gen.extend(float(x) for x in scores.token_acc[1:])
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return {
        "es": mean(es),
        "gen": mean(gen),
        "exact": mean(exact),
        "nll": mean(nll),
        "loc": mean(kl),
        "loc_same": mean(same),
    }


CURVE_FIELDS = (
    "step",
    "seconds",
    "edit_loss",
    "loc_loss",
    "total",
    "heldout_es",
    "heldout_gen",
    "heldout_exact",
    "heldout_nll",
    "heldout_loc",
    "heldout_loc_same",
    "heldout_total",
)


def read_curve(path: Path) -> list[dict[str, float | None]]:
    """Rows of a ``curve.csv`` (empty cells: not evaluated at that step) as floats (None when empty)."""
    import csv

    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


def _write_curve(path: Path, rows: Sequence[dict], fields: Sequence[str] = CURVE_FIELDS) -> None:
    """Write ``rows`` (``fields`` of each; empty where absent) to ``path`` atomically (RLEdit's curve too)."""
    import csv

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for row in rows:
            out = {k: ("" if row.get(k) is None else row[k]) for k in fields}
            out["step"] = int(row["step"])  # read back as a float on resume; written as the integer it is
            writer.writerow(out)
    os.replace(tmp, path)


def curve_summary(rows: Sequence[dict]) -> list[dict[str, float]]:
    """One line per held-out evaluation: its step, the mean edit and locality losses and the mean
    seconds per step over the steps since the previous evaluation, and the held-out scores."""
    out, window, last_seconds = [], [], 0.0
    for row in rows:
        if row["step"] > 0:
            window.append(row)
        if row.get("heldout_es") is not None:
            seconds = row["seconds"] if row["seconds"] is not None else last_seconds
            out.append(
                {
                    "step": int(row["step"]),
                    "edit_loss": float(np.mean([r["edit_loss"] for r in window])) if window else None,
                    "loc_loss": float(np.mean([r["loc_loss"] for r in window])) if window else None,
                    "s_per_step": (seconds - last_seconds) / len(window) if window else None,
                    "es": row["heldout_es"],
                    "gen": row["heldout_gen"],
                    "exact": row["heldout_exact"],
                    "nll": row["heldout_nll"],
                    "loc": row.get("heldout_loc"),  # absent from curves written before it was measured
                }
            )
            window, last_seconds = [], seconds
    return out


def format_curve(rows: Sequence[dict]) -> str:
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    lines = [
        f"{'step':>6} {'edit loss':>10} {'loc loss':>9} {'s/step':>7} {'held-out ES':>12} {'gen':>6} "
        f"{'exact':>6} {'NLL':>6} {'loc KL':>7}"
    ]
    for r in curve_summary(rows):
        lines.append(
            f"{r['step']:>6} {fmt(r['edit_loss'], '.3f'):>10} {fmt(r['loc_loss'], '.4f'):>9} "
            f"{fmt(r['s_per_step'], '.2f'):>7} {fmt(r['es'], '.3f'):>12} {fmt(r['gen'], '.3f'):>6} "
            f"{fmt(r['exact'], '.3f'):>6} {fmt(r['nll'], '.2f'):>6} {fmt(r['loc'], '.4f'):>7}"
        )
    return "\n".join(lines)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    publish(tmp, path)


def _check_config(config: TrainConfig) -> None:
    if config.stop_key not in STOP_KEYS:
        raise UserError(f"mend training: stop_key must be one of {', '.join(STOP_KEYS)}, got '{config.stop_key}'")
    if config.accumulate < 1 or config.batch_size < 1 or config.eval_every < 1:
        raise UserError("mend training: accumulate, batch_size and eval_every must be at least 1")
    if config.patience and not config.holdout:
        raise UserError(
            f"mend training: early stopping (patience {config.patience}) needs validation records (holdout)"
        )


def training_summary(meta: dict) -> str:
    """How a hypernetwork was trained, in one line: to a validation plateau or stopped at the cap,
    after how many iterations, with its validation scores (what every MEND figure must carry)."""
    t = meta.get("training")
    if not t:
        return f"trained {meta.get('steps', '?')} steps, before validation was recorded (no early stopping)"
    val = t.get("val") or {}
    scores = ", ".join(f"val {k} {val[k]:.3g}" for k in ("es", "gen", "nll", "loc") if val.get(k) is not None)
    scores = f"{scores} (n={t.get('val_n', 0)}, at step {t.get('val_step')})" if scores else "no validation"
    how = {
        "plateau": f"trained to a validation plateau: stopped after {t['steps_run']} steps",
        "cap": f"stopped at the cap after {t['steps_run']} steps",
    }[t["stopped"]]
    return f"{how} ({t['preset']} training), {scores}"


def _split_records(records: list[Edit], holdout: int) -> tuple[list[Edit], list[Edit]]:
    """(training, validation): the last ``holdout`` records validate."""
    if not holdout:
        return records, []
    if holdout > len(records) - 2:
        raise UserError(f"holdout {holdout} leaves fewer than 2 of {len(records)} training records")
    return records[:-holdout], records[-holdout:]


def _chosen(val: dict[str, Any] | None) -> dict[str, Any]:
    """The validation the kept network is reported by: its step and scores (None without validation)."""
    return {"val_step": val["step"] if val else None, "val": val["val"] if val else None}


def _resume(ckpt: Path, identity: dict, net: Hypernetwork, optimizer: torch.optim.Optimizer, steps: int):
    """Load a checkpoint into ``net`` and ``optimizer``: (step, seconds, best, best state, last validation, stopped)."""
    saved = torch.load(ckpt, weights_only=True)
    if json.loads(saved["identity"]) != identity:
        raise UserError(f"{ckpt}: checkpoint of a different training set-up; delete {ckpt.parent} to start over")
    net.load_state_dict(saved["net"])
    optimizer.load_state_dict(saved["optimizer"])
    done = int(saved["step"])
    if done > steps:
        raise UserError(
            f"{ckpt}: checkpoint at step {done}, past the {steps} steps asked for; ask for {done} steps to finish there"
        )
    load = lambda key: json.loads(saved[key]) if saved.get(key) else None  # noqa: E731
    return (
        done,
        float(saved["seconds"]),
        load("best"),
        saved.get("best_net"),
        load("last_val"),
        str(saved.get("stopped", "")),
    )


def _preset_name(config: TrainConfig) -> str:
    ident = config_identity(config)
    names = [n for n, c in TRAINING_PRESETS.items() if config_identity(c) == ident]
    return names[0] if names else "custom"


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
    """Train (or resume training) the hypernetwork for ``lm``'s ``params`` of ``layers`` on ``data``; returns its file.

    Each iteration backpropagates MEND's loss for ``batch_size`` edits; every ``accumulate``
    iterations the averaged gradient (norm clipped at ``grad_clip``) takes one Adam step. Every
    ``eval_every`` iterations the ``holdout`` validation records are scored; with ``patience``, the
    network of the best ``stop_key`` is kept and training stops once ``patience`` iterations pass
    without a better one (the original's EarlyStopper), else at ``steps``, the cap. A checkpoint is
    written every ``checkpoint_every`` iterations (at optimiser steps), so a killed run resumes where
    it stopped; batches are drawn from (seed, step), so resuming gives the same result. The learning
    curve goes to ``curve.csv`` in the same directory. ``params`` None: every MLP projection."""
    from lifelong.core.bars import bar as progress_bar

    _check_config(config)
    kinds = resolve_params(params, lm.adapter)
    records, heldout = _split_records(load_training_records(data, limit), config.holdout)
    keys = sorted(set().union(*(record_keys(e) for e in records)))
    content = hashlib.sha256(
        json.dumps([e.to_dict() for e in records], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    directory = Path(directory) if directory else hypernet_dir(lm, layers, data, kinds, config)
    directory.mkdir(parents=True, exist_ok=True)
    final, ckpt, curve_path = directory / "hypernet.safetensors", directory / "checkpoint.pt", directory / "curve.csv"
    net = build_hypernetwork(lm, layers, kinds, config.rank, config.edit_lr, config.seed).to(lm.device)
    trained = [p for n, p in net.named_parameters() if n != "log_lr"]
    groups = [{"params": trained, "lr": config.lr}, {"params": [net.log_lr], "lr": config.lr_lr}]
    optimizer = torch.optim.Adam(groups)
    identity: dict[str, Any] = {
        "model": model_key(lm),
        "layers": list(layers),
        "data": data,
        "limit": limit,
        "content": content,
        "config": config_identity(config),
        "network": NETWORK_FORM,
    }
    if kinds != LEGACY_PARAMS:
        identity["params"] = list(kinds)
    sign = STOP_KEYS[config.stop_key]
    done, seconds = 0, 0.0
    best: dict[str, Any] | None = None  # {"step", "val"}: the best validation so far (with patience)
    best_state: dict[str, torch.Tensor] | None = None
    last_val: dict[str, Any] | None = None  # the latest validation: {"step", "val"}
    stopped = ""
    if ckpt.is_file():
        done, seconds, best, best_state, last_val, stopped = _resume(ckpt, identity, net, optimizer, config.steps)
    # every row has its step
    curve = [row for row in read_curve(curve_path) if cast(float, row["step"]) <= done] if done else []

    def evaluate(row: dict) -> None:
        nonlocal best, best_state, last_val
        if not heldout:
            return
        scores = heldout_success(lm, net, heldout)
        loc = 0.0 if np.isnan(scores["loc"]) else scores["loc"]  # no neighborhood prompts: no locality term
        scores["total"] = config.c_edit * scores["nll"] + config.c_loc * loc
        row.update({f"heldout_{k}": v for k, v in scores.items()})
        last_val = {"step": row["step"], "val": scores}
        value = scores[config.stop_key]
        # the untrained network (step 0) is no candidate: the original validates after a first step
        if config.patience and row["step"] > 0 and not np.isnan(value):
            if best is None or sign * value > sign * best["val"][config.stop_key]:
                best = dict(last_val)
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def save_checkpoint(step: int) -> None:
        _atomic_torch_save(
            {
                "identity": json.dumps(identity),
                "net": net.state_dict(),
                "step": step,
                "optimizer": optimizer.state_dict(),
                "seconds": seconds,
                "best": json.dumps(best) if best else "",
                **({"best_net": best_state} if best_state is not None else {}),
                "stopped": stopped,
                "last_val": json.dumps(last_val) if last_val else "",
            },
            ckpt,
        )

    todo = range(done + 1, config.steps + 1) if not stopped else range(0)
    if stop_after is not None:
        todo = todo[:stop_after]
    if done == 0 and len(todo):  # the untrained (identity) network's scores start the curve
        curve = [{"step": 0, "seconds": 0.0}]
        evaluate(curve[0])
        _write_curve(curve_path, curve)
    bar = progress_bar(todo, show=progress, desc="train-mend", unit="step", initial=done, total=config.steps)
    optimizer.zero_grad(set_to_none=True)
    for step in bar:
        t0 = time.perf_counter()
        rng = np.random.default_rng([config.seed, step])
        picks = rng.choice(len(records), size=min(config.batch_size, len(records)), replace=False)
        batch = [records[int(i)] for i in picks]
        loc_pairs = [p for i in picks for p in _locality_pairs(records, int(i), rng)]
        losses = training_step(lm, net, batch, loc_pairs, config)
        (losses["total"] / config.accumulate).backward()
        stepped = step % config.accumulate == 0 or step == config.steps
        if stepped:
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(net.parameters()), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        row = {
            "step": step,
            "seconds": round(seconds, 3),
            "edit_loss": losses["edit"],
            "loc_loss": losses["loc"],
            "total": losses["total"].item(),
        }
        if step % config.eval_every == 0 or step == config.steps:
            evaluate(row)
            if config.patience and best is not None and step - best["step"] >= config.patience:
                stopped = "plateau"
        curve.append(row)
        _write_curve(curve_path, curve)
        bar.set_postfix(
            edit=f"{losses['edit']:.2f}",
            loc=f"{losses['loc']:.3f}",
            **({"es": f"{row['heldout_es']:.2f}"} if "heldout_es" in row else {}),
        )
        if stopped or step == config.steps or (stepped and step % config.checkpoint_every == 0):
            done = step
            save_checkpoint(step)
        if stopped:
            break
    bar.close()
    if stopped or done >= config.steps:
        if config.patience and best_state is not None:
            net.load_state_dict(best_state)  # the original keeps the network of the best validation
        meta = {
            "identity": identity,
            "steps": done,
            "seconds": round(seconds, 2),
            "targets": [list(t) for t in net.targets],
            "shapes": [list(s) for s in net.shapes],
            "heldout_ids": [e.id for e in heldout],
            "train_ids": [e.id for e in records],
            "train_keys": keys,
            "training": {
                "preset": _preset_name(config),
                "stopped": stopped or "cap",
                "steps_run": done,
                "cap": config.steps,
                "patience": config.patience,
                "stop_key": config.stop_key,
                "val_n": len(heldout),
                **_chosen(best if config.patience and best is not None else last_val),
            },
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        atomic_save_tensors(tensors, final, {"lifelong_mend": json.dumps(meta)})
    return final


def load_hypernetwork(path: Path, device: torch.device) -> tuple[Hypernetwork, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lifelong_mend", "{}"))
    if not meta:
        raise UserError(f"{path}: not a MEND hypernetwork file")
    if meta["identity"].get("network") != NETWORK_FORM:
        raise UserError(
            f"{path}: MEND hypernetwork trained with the former gradient network (ReLU in its first layer, "
            "nothing in its second, where the original clamps both at 0); train it again with `lifelong train-mend`"
        )
    tensors = load_file(str(path))
    rank = tensors["transforms.0.v1"].shape[0]
    kinds = tuple(meta["identity"].get("params", LEGACY_PARAMS))  # files from before params existed: down only
    if "targets" in meta:
        targets, shapes = [tuple(t) for t in meta["targets"]], [tuple(s) for s in meta["shapes"]]
    else:
        layers = meta["identity"]["layers"]
        targets = edit_targets(layers, kinds)
        shapes = [
            (tensors[f"transforms.{i}.norm_u.mean"].numel(), tensors[f"transforms.{i}.norm_delta.mean"].numel())
            for i in range(len(layers))
        ]
    net = Hypernetwork(targets, shapes, rank, 1.0, shared=kinds != LEGACY_PARAMS)
    net.load_state_dict(tensors)
    return net.to(device).eval().requires_grad_(False), meta

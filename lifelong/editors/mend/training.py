"""Training MEND's hypernetwork (:func:`train_hypernetwork`, ``lifelong train-mend``): the training
records, the loss, the loop with its checkpoints and learning curve, and the cached file
(:func:`hypernet_dir`, :func:`load_hypernetwork`)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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
    """Hyperparameters of hypernetwork training (MEND's losses; steps and rates sized for a CPU)."""

    steps: int = 150
    batch_size: int = 4  # edits per training step
    rank: int = 64  # rank of the hypernetwork's low-rank layers
    lr: float = 1e-3  # Adam on the hypernetworks
    lr_lr: float = 1e-2  # Adam on the log step sizes
    edit_lr: float = 1e-4  # initial α
    c_edit: float = 0.1  # MEND's edit-loss weight (the locality loss has weight 1)
    c_loc: float = 1.0
    seed: int = 0
    checkpoint_every: int = 25
    holdout: int = 0  # the last N records are kept out of training, for the learning curve's edit success
    eval_every: int = 25  # steps between held-out evaluations (and before the first step)


# TrainConfig fields that do not change the trained network (left out of a checkpoint's identity)
_NOT_IDENTITY = ("steps", "checkpoint_every", "eval_every")


def _prompt_key(subject: str, prompt: str) -> str:
    text = json.dumps([subject.strip().lower(), " ".join(prompt.lower().split())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_keys(edit: Edit) -> set[str]:
    """Hashes of (subject, prompt) for an edit's prompt and paraphrases: what overlap is judged on."""
    return {_prompt_key(edit.subject, text) for text in (edit.rendered_prompt, *edit.paraphrases)}


def load_training_records(spec: str, limit: int | None = None) -> list[Edit]:
    """Edits from one or more comma-separated stream specs (builtin, dataset:NAME, file.jsonl)."""
    from streams import load_stream

    records: list[Edit] = []
    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        records.extend(load_stream(part))
    if limit:
        records = records[:limit]
    if len(records) < 2:
        raise UserError(f"MEND training data '{spec}' has {len(records)} records: at least 2 are needed")
    return records


def model_key(lm: LoadedModel) -> str:
    name = lm.name
    return str(Path(name).resolve()) if os.path.isdir(name) else name


def hypernet_dir(lm: LoadedModel, layers: Sequence[int], data: str, params: str | Sequence[str] | None = None) -> Path:
    """Cache directory of the hypernetwork for (model, layers, edited weights, training data).

    ``params`` None or empty: every MLP projection (the default). ``params=down`` keeps the
    key and name the down-only editor had, so its trained hypernetworks are found again."""
    kinds = resolve_params(params, lm.adapter)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_key(lm)).name)
    name = f"{safe}-L{'_'.join(map(str, layers))}"
    if kinds == LEGACY_PARAMS:
        key = json.dumps([model_key(lm), list(layers), data])
    else:
        key = json.dumps([model_key(lm), list(layers), data, list(kinds)])
        name += "-" + "_".join(kinds)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
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
    target token right (``exact``), and the prompt's mean target-token NLL (``nll``)."""
    scorer = Scorer(lm.model, lm.tokenizer)
    es: list[float] = []
    gen: list[float] = []
    exact: list[float] = []
    nll: list[float] = []
    for e in edits:
        grads = edit_gradient_factors(lm, net.targets, [(e.rendered_prompt, e.target_new)])
        with torch.no_grad():
            factors = [net.factors(i, u, delta) for i, (u, delta) in enumerate(grads)]
        with lowrank_added(lm, net.targets, factors):
            scores = scorer.score(_edit_pairs(e))
        es.append(float(scores.token_acc[0]))
        exact.append(float(scores.exact[0]))
        nll.append(float(scores.nll[0]))
        gen.extend(float(x) for x in scores.token_acc[1:])
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return {"es": mean(es), "gen": mean(gen), "exact": mean(exact), "nll": mean(nll)}


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
)


def read_curve(path: Path) -> list[dict[str, float | None]]:
    """Rows of a ``curve.csv`` (empty cells: not evaluated at that step) as floats (None when empty)."""
    import csv

    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


def _write_curve(path: Path, rows: Sequence[dict]) -> None:
    import csv

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, CURVE_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CURVE_FIELDS})
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
                }
            )
            window, last_seconds = [], seconds
    return out


def format_curve(rows: Sequence[dict]) -> str:
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    lines = [
        f"{'step':>6} {'edit loss':>10} {'loc loss':>9} {'s/step':>7} {'held-out ES':>12} {'gen':>6} "
        f"{'exact':>6} {'NLL':>6}"
    ]
    for r in curve_summary(rows):
        lines.append(
            f"{r['step']:>6} {fmt(r['edit_loss'], '.3f'):>10} {fmt(r['loc_loss'], '.4f'):>9} "
            f"{fmt(r['s_per_step'], '.2f'):>7} {fmt(r['es'], '.3f'):>12} {fmt(r['gen'], '.3f'):>6} "
            f"{fmt(r['exact'], '.3f'):>6} {fmt(r['nll'], '.2f'):>6}"
        )
    return "\n".join(lines)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    publish(tmp, path)


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

    ``params`` None: every MLP projection. A checkpoint is written every ``config.checkpoint_every``
    steps, so a killed run resumes where it stopped; batches are drawn from (seed, step), so
    resuming gives the same result. The learning curve goes to ``curve.csv`` in the same directory."""
    from lifelong.core.bars import bar as progress_bar

    kinds = resolve_params(params, lm.adapter)
    records = load_training_records(data, limit)
    heldout: list[Edit] = []
    if config.holdout:
        if config.holdout > len(records) - 2:
            raise UserError(f"holdout {config.holdout} leaves fewer than 2 of {len(records)} training records")
        records, heldout = records[: -config.holdout], records[-config.holdout :]
    keys = sorted(set().union(*(record_keys(e) for e in records)))
    content = hashlib.sha256(
        json.dumps([e.to_dict() for e in records], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    directory = Path(directory) if directory else hypernet_dir(lm, layers, data, kinds)
    directory.mkdir(parents=True, exist_ok=True)
    final, ckpt, curve_path = directory / "hypernet.safetensors", directory / "checkpoint.pt", directory / "curve.csv"
    net = build_hypernetwork(lm, layers, kinds, config.rank, config.edit_lr, config.seed).to(lm.device)
    groups = [
        {"params": [p for n, p in net.named_parameters() if n != "log_lr"], "lr": config.lr},
        {"params": [net.log_lr], "lr": config.lr_lr},
    ]
    optimizer = torch.optim.Adam(groups)
    setup = {k: v for k, v in asdict(config).items() if k not in _NOT_IDENTITY}
    if not config.holdout:
        del setup["holdout"]  # as before holdout existed, so such checkpoints still resume
    identity: dict[str, Any] = {
        "model": model_key(lm),
        "layers": list(layers),
        "data": data,
        "limit": limit,
        "content": content,
        "config": setup,
    }
    if kinds != LEGACY_PARAMS:
        identity["params"] = list(kinds)
    done, seconds = 0, 0.0
    if ckpt.is_file():
        saved = torch.load(ckpt, weights_only=True)
        if json.loads(saved["identity"]) != identity:
            raise UserError(f"{ckpt}: checkpoint of a different training set-up; delete {directory} to start over")
        net.load_state_dict(saved["net"])
        optimizer.load_state_dict(saved["optimizer"])
        done, seconds = int(saved["step"]), float(saved["seconds"])
        if done > config.steps:
            raise UserError(
                f"{ckpt}: checkpoint at step {done}, past the {config.steps} steps asked for; "
                f"ask for {done} steps to finish there"
            )
    # every row has its step
    curve = [row for row in read_curve(curve_path) if cast(float, row["step"]) <= done] if done else []

    def evaluate(row: dict) -> None:
        if heldout:
            scores = heldout_success(lm, net, heldout)
            row.update({f"heldout_{k}": v for k, v in scores.items()})

    def save_checkpoint(step: int) -> None:
        _atomic_torch_save(
            {
                "identity": json.dumps(identity),
                "net": net.state_dict(),
                "step": step,
                "optimizer": optimizer.state_dict(),
                "seconds": seconds,
            },
            ckpt,
        )

    todo = range(done + 1, config.steps + 1)
    if stop_after is not None:
        todo = todo[:stop_after]
    if done == 0 and len(todo):  # the untrained (identity) network's scores start the curve
        curve = [{"step": 0, "seconds": 0.0}]
        evaluate(curve[0])
        _write_curve(curve_path, curve)
    bar = progress_bar(todo, show=progress, desc="train-mend", unit="step", initial=done, total=config.steps)
    for step in bar:
        t0 = time.perf_counter()
        rng = np.random.default_rng([config.seed, step])
        picks = rng.choice(len(records), size=min(config.batch_size, len(records)), replace=False)
        batch = [records[int(i)] for i in picks]
        loc_pairs = [p for i in picks for p in _locality_pairs(records, int(i), rng)]
        losses = training_step(lm, net, batch, loc_pairs, config)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
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
        curve.append(row)
        _write_curve(curve_path, curve)
        bar.set_postfix(
            edit=f"{losses['edit']:.2f}",
            loc=f"{losses['loc']:.3f}",
            **({"es": f"{row['heldout_es']:.2f}"} if "heldout_es" in row else {}),
        )
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_checkpoint(step)
    bar.close()
    done = max([done, *todo]) if len(todo) else done
    if done >= config.steps:
        meta = {
            "identity": identity,
            "steps": config.steps,
            "seconds": round(seconds, 2),
            "targets": [list(t) for t in net.targets],
            "shapes": [list(s) for s in net.shapes],
            "heldout_ids": [e.id for e in heldout],
            "train_ids": [e.id for e in records],
            "train_keys": keys,
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

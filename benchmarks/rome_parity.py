"""Our ROME against the public implementation, on the same CounterFact edits in sequence.

The public code is NOT part of this repository and is never copied into it. Obtain it with

    git clone https://github.com/zjunlp/EasyEdit /work/scratch/rome-public/easyedit

(or extract ``easyeditor/models/rome``, ``easyeditor/util`` and ``hparams/ROME`` of a snapshot
there; this was measured against EasyEdit at commit 14cea82) and give its root with
``--public-root``. Its ``easyeditor/models/rome`` package is imported directly (the toolkit's
``__init__`` pulls in every editor's dependencies); ``datasets``, which only its covariance
statistics use (off in the Llama hparams), is stubbed when absent. Nothing of ours runs inside it.

    python benchmarks/rome_parity.py --public-root /work/scratch/rome-public/easyedit --n 50

Edits: the first N records of CounterFact's ROME sample (``../shared/data/counterfact``, the
dataset ``counterfact``) in the order of a permutation seeded by ``--sample-seed`` (default 0).
Each implementation edits them one after another on the default model from the same θ0; after
all N, per implementation: greedy retention (the model's greedy continuation of each edit's
prompt starts with the new object: teacher-forced argmax equal to every token of " " + object),
paraphrase success (the same on each paraphrase prompt), neighbourhood (NS: the true answer of
each neighbourhood prompt beats the new object by mean token NLL) and ES (on the edit prompt, the
new object beats the old one by mean token NLL), each with n and a 95% Wilson interval (prompts
of one edit are pooled as if independent: paraphrase and NS intervals are somewhat narrow), and
an edit-by-edit agreement table of greedy retention and of paraphrase success per prompt.

The public side runs EasyEdit's ``apply_rome_to_model`` with ``hparams/ROME/llama-7b.yaml`` (the
file our default follows for the Llama family), adapted to this model and machine only where it
cannot run as written: device ``cpu``; ``v_loss_layer`` 31 (llama-7b's last layer, a module this
30-layer model lacks) becomes this model's last layer (it only names a traced module: the loss is
on the logits either way). Its context templates are generated once, on the first edit, from
torch's global generator: it is seeded with ``--template-seed`` before that edit, and ours gets
the same number as ``context_seed``. EasyEdit passes its generation an attention mask only for
models whose name lacks "llama" (util/generate.py:124), sliced to the new positions; under
transformers 5 a mask that short with a KV cache hides the cache (each sampled token sees only
itself: the templates degenerate into "The-,,,." and the like). SmolLM2 is a Llama model whose
name does not say so: ``--public-mask llama`` (default) gives the model a name containing
"llama" so that EasyEdit takes its Llama path; ``--public-mask as-named`` keeps the name (and
the degenerate templates). The templates each side used are printed, with whether they agree.

``--ours LABEL:key=value,...`` adds a run of our ROME with those settings (``--set`` spellings);
``--only`` picks which runs to make (e.g. ``--only public`` or ``--only ours,ours-fixed21``).
``--save FILE`` writes every run's per-edit outcomes (JSON) and ``--load FILE`` adds runs saved so
on the same edits to the tables: the public run (about 84 s per edit here against our 8.5) can be
made once and compared with later runs of ours.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from lifelong.core.machine import runtime_header
from lifelong.core.models import LoadedModel, load_model
from lifelong.core.scorer import Scorer
from lifelong.core.stats import wilson
from lifelong.editors import make_editor
from streams.readers.registry import read_dataset


def sample_edits(n: int, seed: int) -> list:
    """The first ``n`` records of CounterFact's ROME sample in a ``seed``-ed permutation."""
    stream, _ = read_dataset("counterfact")
    edits = list(stream)
    order = list(range(len(edits)))
    random.Random(seed).shuffle(order)
    return [edits[i] for i in order[:n]]


def public_module(root: Path):
    """EasyEdit's ``easyeditor.models.rome`` imported from ``root`` (a checkout outside this repo)."""
    if not (root / "easyeditor" / "models" / "rome" / "rome_main.py").is_file():
        raise SystemExit(
            f"--public-root {root}: no easyeditor/models/rome/rome_main.py there (see this file's docstring)"
        )
    sys.path.insert(0, str(root))
    try:
        import datasets  # noqa: F401
    except ImportError:  # only its layer_stats (covariance statistics) reads datasets
        sys.modules["datasets"] = types.SimpleNamespace(load_dataset=None)  # type: ignore[assignment]
    from easyeditor.models.rome import rome_main
    from easyeditor.models.rome.rome_hparams import ROMEHyperParams

    return rome_main, ROMEHyperParams


def run_public(lm: LoadedModel, edits: list, root: Path, template_seed: int, mask: str) -> tuple[list[str], list]:
    """Edit in sequence with EasyEdit's ROME; returns its context templates and seconds per edit."""
    rome_main, hparams_cls = public_module(root)
    hparams = hparams_cls.from_hparams(str(root / "hparams" / "ROME" / "llama-7b.yaml"))
    hparams.device = "cpu"
    hparams.v_loss_layer = lm.num_layers - 1
    rome_main.CONTEXT_TEMPLATES_CACHE = None
    name = getattr(lm.model, "name_or_path", "")
    if mask == "llama":
        lm.model.name_or_path = f"{name} (llama)"
    side = lm.tokenizer.padding_side
    lm.tokenizer.padding_side = "right"  # as EasyEdit's BaseEditor sets it for ROME on Llama models
    torch.manual_seed(template_seed)
    times = []
    try:
        for edit in edits:
            request = {"prompt": edit.prompt, "subject": edit.subject, "target_new": edit.target_new}
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                rome_main.apply_rome_to_model(lm.model, lm.tokenizer, [request], hparams)
            times.append(time.perf_counter() - t0)
            print(f"  public: edit {len(times)}/{len(edits)} in {times[-1]:.1f} s", file=sys.stderr, flush=True)
    finally:
        lm.model.name_or_path = name
        lm.tokenizer.padding_side = side
    return list(rome_main.CONTEXT_TEMPLATES_CACHE), times


def run_ours(lm: LoadedModel, edits: list, overrides: dict[str, str], template_seed: int):
    """Edit in sequence with our ROME (its defaults plus ``overrides``); templates, seconds, settings."""
    overrides = {"context_seed": str(template_seed), **overrides}
    editor = make_editor("rome", overrides).bind(lm)
    editor.prepare(lm)
    times, stopped = [], 0
    for edit in edits:
        t0 = time.perf_counter()
        editor.apply(lm, [edit])
        times.append(time.perf_counter() - t0)
        stopped += editor.step_report().get("v_stopped", 0)
        print(f"  ours: edit {len(times)}/{len(edits)} in {times[-1]:.1f} s", file=sys.stderr, flush=True)
    settings = editor.hyperparameters()
    keep = ("hparams", "layer", "mom2", "v_steps", "v_lr", "v_weight_decay", "context", "templates", "v_dtype")
    label = ", ".join(f"{k}={settings[k]}" for k in keep) + f"; v* fits stopped early {stopped}/{len(edits)}"
    return list(editor.context_templates(lm)), times, label


def evaluate(lm: LoadedModel, edits: list) -> dict[str, np.ndarray]:
    """Per edit: greedy (0/1), ES (0/1); per paraphrase and per neighbourhood prompt: 0/1."""
    scorer = Scorer(lm.model, lm.tokenizer)
    greedy = scorer.score([(e.rendered_prompt, e.target_new) for e in edits]).exact
    nll = scorer.score([(e.rendered_prompt, t) for e in edits for t in (e.target_new, e.target_true)]).nll
    para = scorer.score([(p, e.target_new) for e in edits for p in e.paraphrases]).exact
    neigh_true = scorer.score([(n.prompt, n.answer) for e in edits for n in e.neighborhood]).nll
    neigh_new = scorer.score([(n.prompt, e.target_new) for e in edits for n in e.neighborhood]).nll
    return {
        "greedy retention": np.asarray(greedy, dtype=float),
        "paraphrase success": np.asarray(para, dtype=float),
        "neighbourhood (NS)": (neigh_true < neigh_new).astype(float),
        "ES (new beats old)": (nll[0::2] < nll[1::2]).astype(float),
    }


def cell(values: np.ndarray) -> str:
    low, high = wilson(float(values.sum()), len(values))
    return f"{values.mean():.3f} [{low:.2f}, {high:.2f}] n={len(values)}"


def agreement(name: str, a: np.ndarray, b: np.ndarray, label_a: str, label_b: str) -> str:
    both = int(((a == 1) & (b == 1)).sum())
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    neither = int(((a == 0) & (b == 0)).sum())
    return (
        f"{name:<20} both {both:>3}   only {label_a} {only_a:>3}   only {label_b} {only_b:>3}   "
        f"neither {neither:>3}   (of {len(a)})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--public-root", type=Path, required=True, help="an EasyEdit checkout outside this repository")
    ap.add_argument("--n", type=int, default=50, help="edits (default 50)")
    ap.add_argument("--sample-seed", type=int, default=0, help="seed of the permutation of CounterFact's records")
    ap.add_argument("--template-seed", type=int, default=0, help="seed of the generated context templates")
    ap.add_argument("--public-mask", choices=("llama", "as-named"), default="llama")
    ap.add_argument("--ours", action="append", default=[], help="LABEL:key=value,... (a run of ours with settings)")
    ap.add_argument("--only", default="", help="comma-separated runs to make (default: public, ours and every --ours)")
    ap.add_argument("--save", type=Path, help="write the runs' per-edit outcomes here (JSON)")
    ap.add_argument("--load", type=Path, action="append", default=[], help="add runs saved with --save")
    args = ap.parse_args()
    torch.set_num_threads(1)

    lm = load_model("smollm2-135m")
    print(runtime_header(lm.device))
    edits = sample_edits(args.n, args.sample_seed)
    print(
        f"{len(edits)} CounterFact edits (counterfact_rome_500.json, the first {len(edits)} of the permutation "
        f"seeded {args.sample_seed}), in sequence on {lm.name} from θ0; template seed {args.template_seed}"
    )
    runs: dict[str, dict[str, str]] = {"public": {}, "ours": {}}
    for spec in args.ours:
        label, _, rest = spec.partition(":")
        runs[label] = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    chosen = [r for r in args.only.split(",") if r] or list(runs)
    base = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    results, templates, about = {}, {}, {}
    ids = [e.id for e in edits]
    for path in args.load:
        saved = json.loads(path.read_text())
        if saved["edits"] != ids:
            raise SystemExit(f"--load {path}: saved on other edits (another --n or --sample-seed)")
        for label, run in saved["runs"].items():
            results[label] = {m: np.asarray(v, dtype=float) for m, v in run["outcomes"].items()}
            templates[label], about[label] = run["templates"], run["about"]
            print(f"\n[{label}] (loaded from {path}) {about[label]}", flush=True)
    for label in chosen:
        with torch.no_grad():
            for n, p in lm.model.named_parameters():
                p.copy_(base[n])
        if label == "public":
            used, times = run_public(lm, edits, args.public_root, args.template_seed, args.public_mask)
            how = f"EasyEdit ROME, hparams/ROME/llama-7b.yaml (device cpu, v_loss_layer {lm.num_layers - 1})"
            how += f", generation mask {args.public_mask}"
        else:
            used, times, how = run_ours(lm, edits, runs[label], args.template_seed)
        templates[label] = used
        results[label] = evaluate(lm, edits)
        about[label] = f"{how}; {np.mean(times):.1f} s/edit"
        print(f"\n[{label}] {how}\n  {np.mean(times):.1f} s/edit; context templates: {used}", flush=True)
        for metric, values in results[label].items():
            print(f"  {metric:<20} {cell(values)}", flush=True)

    if args.save:
        runs_out = {
            label: {
                "about": about[label],
                "templates": templates[label],
                "outcomes": {m: v.tolist() for m, v in results[label].items()},
            }
            for label in results
        }
        args.save.write_text(json.dumps({"edits": ids, "runs": runs_out}, indent=1))
    labels = list(results)
    print(f"\n{'':<20}" + "".join(f"{label:<30}" for label in labels))
    for metric in next(iter(results.values())):
        print(f"{metric:<20}" + "".join(f"{cell(results[label][metric]):<30}" for label in labels))
    if "public" in results:
        for label in labels:
            if label == "public":
                continue
            same = "identical" if templates[label] == templates["public"] else "different"
            print(f"\nedit by edit, {label} against public (context templates {same}):")
            for metric in ("greedy retention", "paraphrase success", "ES (new beats old)"):
                print("  " + agreement(metric, results[label][metric], results["public"][metric], label, "public"))


if __name__ == "__main__":
    main()

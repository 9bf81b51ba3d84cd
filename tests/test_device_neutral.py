"""No module hard-codes a device or a precision outside the helpers that decide them (issue #36).

The rule, checked on the syntax tree of every module under ``lifelong/``, ``probes/`` and ``streams/``:

1. **No device literal.** A string ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` in code (not in a
   docstring, a message or a dict key), ``.cuda()`` and ``.to("cpu")`` belong to the device helpers
   alone: ``lifelong/core/machine.py`` (precision per device), ``lifelong/core/models.py`` (loading,
   device checks), the settings and CLI defaults. Anything else follows the model: ``lm.device``,
   ``tensor.device``, ``device=other.device``. :data:`DEVICE_LITERALS` lists each exception with its reason.
2. **``.cpu()`` only to leave torch** (``.numpy()``, ``.tolist()``, ``.item()`` right after it) **or
   where a module keeps state on the host on purpose** (what is saved to disk, codebooks that grow):
   :data:`HOST_COPIES` holds, per module, how many such calls it makes and why. A new one fails
   until it is counted there, with its reason.
3. **No tensor made on the default device next to another tensor.** A tensor factory
   (``torch.zeros``, ``ones``, ``full``, ``eye``, ``arange``, ``tensor``, ``rand*``, ``empty``,
   ``linspace``) without ``device=`` that is an operand of arithmetic or a comparison with a
   non-constant, or an item of ``torch.cat``/``stack`` beside a tensor that is not such a factory,
   lands on the CPU while its partner may be on a GPU: an error there (or a silent copy). Give it
   ``device=`` (or build it where it is used and ``.to()`` it); where it must be made on the host (a
   CPU generator's draw), a ``# host: why`` comment on its line or the line above says so.
4. **Precision casts are deliberate.** ``torch.float64``/``torch.float32``/``.double()``/``.float()``
   mark the numerically sensitive parts (covariance, solves, v*/z* fits, normalisers) and host copies;
   :data:`PRECISION` holds, per module, how many it has and why. A module not listed has none; a new
   cast in a listed one fails until counted (a ratchet: each new cast is looked at once).
"""

from __future__ import annotations

import ast
import functools
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lifelong", "probes", "streams")
DEVICE_STRING = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
FACTORIES = {"zeros", "ones", "full", "eye", "arange", "tensor", "rand", "randn", "randint", "empty", "linspace"}
LEAVE_TORCH = {"numpy", "tolist", "item"}

# 1. file: (literals allowed, reason)
DEVICE_LITERALS = {
    "lifelong/core/machine.py": (4, "the device helpers: which precision a device runs natively"),
    "lifelong/core/models.py": (
        7,
        "loading: the load_model default, float16 refused on a CPU, device checks; --device auto: the CPU "
        "where no GPU is visible, and the dtype checked on the first GPU",
    ),
    "lifelong/run.py": (1, "the --device setting's default"),
    "lifelong/cli.py": (
        3,
        "the --device option's default on the checkout, inspect and train-mend/train-rledit commands",
    ),
    "lifelong/replay.py": (1, "checkout's device default (the CLI's)"),
    "lifelong/inspect.py": (1, "inspect's device default (the CLI's)"),
    "lifelong/sweep.py": (5, "a sweep's device setting is checked by name, and GPUs are asked of Ray for 'cuda' cells"),
    "lifelong/editors/upper.py": (1, "compute_dtype's device default, passed on to machine.choose_dtype"),
    "lifelong/core/delta.py": (1, "deltas are saved from host memory (safetensors writes CPU tensors)"),
    "lifelong/core/names.py": (4, "a --device refused by its name before torch is imported (no tensor is made)"),
    # the normaliser is restored from a step file on the host and moved to the edited weight's device at its
    # first use (UltraEditEditor._normaliser); the class's device default is the same host
    "lifelong/editors/ultraedit.py": (2, "the normaliser's state loads on the host, moved on first use"),
}

# 2. file: (.cpu() calls not followed by .numpy()/.tolist()/.item(), reason)
HOST_COPIES = {
    "lifelong/core/delta.py": (3, "deltas, snapshots and editor state are saved to disk from host memory"),
    "lifelong/editors/mend/training.py": (1, "the trained hypernetwork is saved to disk"),
    "lifelong/editors/rledit/training.py": (1, "the trained RLEdit hypernetwork is saved to disk"),
    "lifelong/editors/ultraedit.py": (1, "the normaliser's state for the step file (saved to disk)"),
    "lifelong/editors/grace.py": (
        4,
        "the codebook lives on the host (it grows by one entry per edit; moved to the layer's device per lookup)",
    ),  # noqa: E501
    "lifelong/editors/wise.py": (
        2,
        "the side memory's routing record and the step's delta kept on the host for the step file",
    ),  # noqa: E501
    "lifelong/editors/memit.py": (1, "AlphaEdit's accumulated keys, kept on the host for the step file"),
    "lifelong/editors/memoir.py": (
        4,
        "MEMOIR's memory, masks and background mean are host editor state (copied to the layer's device per"
        " forward); the last forward's routes are kept for inspection",
    ),
    "lifelong/editors/covariance.py": (1, "key statistics accumulate in float64 on the host and are cached on disk"),
    "lifelong/editors/adaptor.py": (1, "the attention mask's rows as a host bool mask for the hook's bookkeeping"),
    "lifelong/editors/memory.py": (1, "the memory's retrieval vectors are kept on the host with its records"),
}

# 4. file: (casts to float64/float32, reason)
PRECISION = {
    "lifelong/core/machine.py": (7, "the precision helpers themselves"),
    "lifelong/core/models.py": (4, "weights load in float32 (GGUF dequantisation, tiny models)"),
    "lifelong/core/scorer.py": (3, "log-probabilities summed in float32/float64 (answers' NLL over tokens)"),
    "lifelong/core/model_access.py": (3, "corpus NLL summed in float64; greedy decoding's argmax over float32 logits"),
    "lifelong/editors/stabilise.py": (3, "PRUNE's SVD and W₀ in float64; NAS rescales v* in float64 as the fits are"),
    "lifelong/editors/value_reference.py": (
        6,
        "the plain v*/z* reference computes in float32/float64 as locate.py does",
    ),
    "lifelong/editors/locate.py": (
        12,
        "v*/z* fits in float32 whatever the weights' dtype; rank-one factors in float64 as ROME/MEMIT do",
    ),  # noqa: E501
    "lifelong/editors/rome.py": (2, "C⁻¹ and the rank-one update in float64 (ROME's rome_main.py)"),
    "lifelong/editors/memit.py": (3, "the MEMIT/AlphaEdit solves in float64 (the originals' double)"),
    "lifelong/editors/emmet.py": (3, "EMMET's constrained solve in float64 (the authors' double, emmet_main.py:213)"),
    "lifelong/editors/covariance.py": (2, "key statistics accumulate in float64 (the originals' double)"),
    "lifelong/editors/upper_llama.py": (10, "the fused upper stack computes in the v* fit's dtype, float32 by default"),
    "lifelong/editors/ultraedit.py": (6, "UltraEdit's normaliser and ridge solve in float32/float64 as the authors'"),
    "lifelong/editors/grace.py": (13, "codebook keys/values and distances in float32 whatever the weights' dtype"),
    "lifelong/editors/wise.py": (
        11,
        "WISE's side memory and its merge weights in float32; activation scores in float64",
    ),
    "lifelong/editors/kn.py": (5, "integrated-gradient attributions in float32"),
    "lifelong/editors/memoir.py": (
        9,
        "MEMOIR's memory, prompt features and mask overlaps in float32 whatever the weights' dtype",
    ),
    "lifelong/editors/memory.py": (3, "retrieval similarities in float32/float64"),
    "lifelong/editors/mend/network.py": (4, "MEND's running statistics in float64"),
    "lifelong/editors/rledit/network.py": (3, "RLEdit's keys, gradients and normaliser eps in float32 (the authors')"),
    "lifelong/editors/adaptor.py": (1, "the adaptor's output added in float32"),
    "lifelong/testing/invariants.py": (4, "the kit's tolerances compare in float64"),
    "lifelong/testing/equations.py": (25, "the kit's reference equations in float64"),
    "probes/weight_drift.py": (3, "weight norms in float64"),
}


def _modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _docstrings_and_messages(tree: ast.AST, parents) -> set[int]:
    """ids of string constants that are docstrings, dict keys or parts of f-strings/raised messages."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.add(id(first.value))
        if isinstance(node, ast.Dict):
            skip.update(id(k) for k in node.keys if k is not None)
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in ast.walk(node))
    return skip


def _is_factory(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in FACTORIES
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "torch"
        and not any(k.arg == "device" for k in node.keywords)
    )


def _constant(node: ast.AST) -> bool:
    """A Python number: a literal, its negation, or a ``math.*`` call."""
    if isinstance(node, ast.UnaryOp):
        node = node.operand
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return isinstance(node.func.value, ast.Name) and node.func.value.id == "math"
    return isinstance(node, ast.Constant)


def _placed_operand(node: ast.AST, parents) -> bool:
    """A device-less factory whose value meets another tensor: the operand of arithmetic or a comparison
    with a non-constant, or an item of torch.cat/stack beside something that is not such a factory."""
    parent = parents.get(node)
    # walk up through pure reshaping of the factory itself (x.view(...), x.repeat(...), -x)
    while isinstance(parent, (ast.Attribute, ast.Call, ast.UnaryOp)):
        if isinstance(parent, ast.Attribute) and parent.attr in ("to", "type_as"):
            return False  # moved explicitly
        if isinstance(parent, ast.Call) and parent.func is not node and node not in parent.args:
            if not (isinstance(parent.func, ast.Attribute) and parent.func.value is node):
                break
        node, parent = parent, parents.get(parent)
    if isinstance(parent, ast.BinOp):
        other = parent.right if parent.left is node else parent.left
        return not _constant(other) and not _is_factory(other)
    if isinstance(parent, ast.Compare):
        others = [parent.left, *parent.comparators]
        return any(o is not node and not _constant(o) and not _is_factory(o) for o in others)
    if isinstance(parent, (ast.List, ast.Tuple)):
        call = parents.get(parent)
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr in ("cat", "stack", "concat")
        ):
            if isinstance(parents.get(call), ast.Attribute) and parents[call].attr == "to":
                return False
            return any(not _is_factory(e) and not _device_less_chain(e) for e in parent.elts)
    return False


def _device_less_chain(node: ast.AST) -> bool:
    """-factory(...) or factory(...).method(...): still a device-less factory's value."""
    while True:
        if _is_factory(node):
            return True
        if isinstance(node, ast.UnaryOp):
            node = node.operand
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            node = node.func.value
        else:
            return False


def _marked_host(source: list[str], line: int) -> bool:
    """A ``# host:`` comment on the line or the one above says why the tensor is made on the host."""
    return any("# host:" in source[i] for i in (line - 1, line - 2) if 0 <= i < len(source))


@functools.cache
def findings() -> dict:
    literals: Counter = Counter()
    literal_lines: list[str] = []
    cuda_calls: list[str] = []
    host: Counter = Counter()
    host_lines: list[str] = []
    stray: list[str] = []
    casts: Counter = Counter()
    for name, tree in _modules():
        source = (ROOT / name).read_text().splitlines()
        parents = _parents(tree)
        skip = _docstrings_and_messages(tree, parents)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                if DEVICE_STRING.match(node.value):
                    literals[name] += 1
                    literal_lines.append(f"{name}:{node.lineno}: {node.value!r}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                attr = node.func.attr
                if attr == "cuda" and not node.args:
                    cuda_calls.append(f"{name}:{node.lineno}")
                if attr == "cpu" and not node.args:
                    up = parents.get(node)
                    if not (isinstance(up, ast.Attribute) and up.attr in LEAVE_TORCH):
                        host[name] += 1
                        host_lines.append(f"{name}:{node.lineno}")
                if attr in ("double", "float") and not node.args and not node.keywords:
                    if not (isinstance(node.func.value, ast.Name) and node.func.value.id in ("np", "numpy")):
                        casts[name] += 1
            if _is_factory(node) and _placed_operand(node, parents) and not _marked_host(source, node.lineno):
                stray.append(f"{name}:{node.lineno}: torch.{node.func.attr}(...) without device=")  # type: ignore[attr-defined]
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("float64", "float32")
                and isinstance(node.value, ast.Name)
                and node.value.id == "torch"
            ):
                casts[name] += 1
    return {
        "literals": literals,
        "literal_lines": literal_lines,
        "cuda_calls": cuda_calls,
        "host": host,
        "host_lines": host_lines,
        "stray": stray,
        "casts": casts,
    }


def _over(counts: Counter, allowed: dict[str, tuple[int, str]]) -> list[str]:
    return [
        f"{name}: {n} (allowed {allowed.get(name, (0, ''))[0]})"
        for name, n in sorted(counts.items())
        if n > allowed.get(name, (0, ""))[0]
    ]


def test_no_module_hard_codes_a_device():
    found = findings()
    assert not found["cuda_calls"], f".cuda() pins a tensor to one device; use .to(lm.device): {found['cuda_calls']}"
    over = _over(found["literals"], DEVICE_LITERALS)
    lines = [line for line in found["literal_lines"] if any(line.startswith(o.split(":")[0] + ":") for o in over)]
    assert not over, f"device literals outside the device helpers (rule 1): {over}\n" + "\n".join(lines)


def test_host_copies_are_for_leaving_torch_or_counted():
    found = findings()
    over = _over(found["host"], HOST_COPIES)
    lines = [line for line in found["host_lines"] if any(line.startswith(o.split(":")[0] + ":") for o in over)]
    assert not over, f".cpu() outside rule 2 (count it in HOST_COPIES with its reason): {over}\n" + "\n".join(lines)


def test_no_tensor_is_made_on_the_default_device_beside_another():
    assert not findings()["stray"], "rule 3:\n" + "\n".join(findings()["stray"])


def test_precision_casts_are_counted_with_their_reason():
    over = _over(findings()["casts"], PRECISION)
    assert not over, f"float64/float32 casts not counted in PRECISION (rule 4; add them with a reason): {over}"


def test_the_allowlists_are_not_stale():
    """An allowance larger than the module's use would let a new hard-coded device or cast in unseen."""
    found = findings()
    for counts, allowed, what in (
        (found["literals"], DEVICE_LITERALS, "DEVICE_LITERALS"),
        (found["host"], HOST_COPIES, "HOST_COPIES"),
        (found["casts"], PRECISION, "PRECISION"),
    ):
        stale = {name: (n, counts.get(name, 0)) for name, (n, _) in allowed.items() if counts.get(name, 0) < n}
        assert not stale, f"{what}: lower these allowances to the use found (allowed, found): {stale}"


def test_the_rules_catch_what_they_name(tmp_path):
    """Each rule flags a planted example and passes its corrected form."""
    planted = (
        "import torch\n"
        "def f(x, c):\n"
        "    y = x.to('cuda')\n"
        "    z = c + torch.eye(3, dtype=c.dtype)\n"
        "    w = torch.cat([x, torch.zeros(2)])\n"
        "    ok1 = c + torch.eye(3, dtype=c.dtype, device=c.device)\n"
        "    ok2 = torch.cat([-torch.ones(2), torch.ones(2)]).to(x)\n"
        "    ok3 = (torch.arange(4) + 0.5) / 4\n"
        "    return x.cpu().numpy(), x.cuda()\n"
    )
    tree = ast.parse(planted)
    parents = _parents(tree)
    flagged = sorted(n.lineno for n in ast.walk(tree) if _is_factory(n) and _placed_operand(n, parents))
    assert flagged == [4, 5]
    skip = _docstrings_and_messages(tree, parents)
    literals = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in skip]
    assert [n.value for n in literals if isinstance(n.value, str) and DEVICE_STRING.match(n.value)] == ["cuda"]

"""Graph extraction for any traceable module: ``torch.fx`` graph -> ``lipschitz.graph`` composition tree.

``graph_from_module(model, input_shape)`` traces the eval-mode model with torch.fx (torch.nn modules and
registered classes are leaves), runs the traced graph once on a random input of ``input_shape`` to learn
every tensor's shape and every constant's value, and rewrites the data flow as a series-parallel tree:

- a chain of one-input ops is a ``Sequential``;
- ``a + b`` (or ``a - b``) whose operands fork from a common node is a ``Residual``: the nearest common
  dominator of the operands is the fork, and the two paths from it are the branch and the shortcut (the
  shorter, or the one without a nonlinearity, is the shortcut; an empty path is the identity);
- ``torch.cat`` of paths from a common fork is a ``Concat`` (L <= sqrt(sum L_i^2), docs/network-bounds.md);
- module calls become nested ``Sequential`` nodes named by their module path, so blocks and stages keep
  their structure; roles (stem, stage, block, head) are recovered from it (a block: the smallest module
  holding a residual sum; a stage: the smallest module holding blocks; stem/head: what comes before/after).

Ops with a rule: conv/linear, batch norm, activations as modules or functions (``F.relu``, ``F.leaky_relu``,
``F.silu``, ``F.gelu``, ``torch.tanh``, ``F.softplus``, ``x * torch.sigmoid(x)``), pooling modules and
functions (``F.avg_pool2d``, ``F.adaptive_avg_pool2d``, ``F.max_pool2d``, ``x.mean((2, 3))``), dropout in
eval mode, flatten/view/reshape to ``(B, -1)``, constant padding (1-Lipschitz), per-channel affine maps
with constant operands (``(x - mean) / std``), and leaves registered with :func:`register_leaf`. A parameter-free module that fx
cannot trace, or whose ops have no rule, is compared with the known activations on a dense grid of inputs
and taken as the one it equals (to 1e-6; a note says so). Anything else raises a one-line
:class:`GraphExtractionError` naming the node, its source line, and how to register a rule. The graph is
always checked to reproduce ``model(x)``.
"""
from __future__ import annotations

import math
import operator
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

import lipschitz.graph as G
from lipschitz.rules import activation_from_module

_TORCH_DIR = os.path.dirname(torch.__file__)
_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
_POOL_TYPES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.MaxPool1d, nn.MaxPool2d,
               nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_IDENTITY_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)
_PAD_TYPES = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ZeroPad1d, nn.ZeroPad2d)
MATCH_TOLERANCE = 1e-6  # relative (to max(1, |y|)) agreement with a known activation on the matching grid
MATCH_RANGE = 10.0  # the grid covers [-MATCH_RANGE, MATCH_RANGE]
MATCH_POINTS = 20001
_REGISTER_HINT = ("wrap it in an nn.Module and register a rule: lipschitz.register_leaf(ModuleClass, lipschitz=L) "
                  "(a float, or a function (module, input_shape) -> float), or activation='relu'/'silu'/...")


# ------------------------------------------------------------------------------------------------ registry

@dataclass(frozen=True)
class LeafRule:
    """A user rule for a module class: a Lipschitz constant (or function of (module, input_shape)), or the
    name of a known activation (``lipschitz.graph.ACTIVATION_KINDS``) with its parameters."""

    lipschitz: float | Callable[[nn.Module, tuple], float] | None = None
    activation: str | None = None
    params: dict = field(default_factory=dict)


_LEAF_RULES: dict[type, LeafRule] = {}


def register_leaf(module_class: type, lipschitz: float | Callable[[nn.Module, tuple], float] | None = None, *,
                  activation: str | None = None, params: dict | None = None) -> None:
    """Make ``module_class`` (and its subclasses) a leaf of the traced graph with a Lipschitz rule.

    ``lipschitz``: the l2 Lipschitz constant, a float or ``f(module, input_shape) -> float`` (input shape
    without batch); taken as given (your proof). ``activation``: instead, the module is exactly this
    elementwise activation (``relu``, ``leaky_relu``, ``silu``, ``gelu``, ``softplus``, ``tanh``,
    ``identity``; ``params`` as for ``lipschitz.graph.Activation``), bounded and folded like one; the check
    that the graph reproduces ``model(x)`` verifies the claim. Registering a class again replaces its rule.
    """
    if not isinstance(module_class, type) or not issubclass(module_class, nn.Module):
        raise TypeError(f"register_leaf needs an nn.Module subclass, got {module_class!r}")
    if (lipschitz is None) == (activation is None):
        raise ValueError("register_leaf needs exactly one of lipschitz=... or activation=...")
    if activation is not None:
        G.Activation(activation, dict(params or {}))  # validates the kind
    elif not callable(lipschitz):
        value = float(lipschitz)
        if not 0.0 <= value < math.inf:
            raise ValueError(f"lipschitz must be a finite number >= 0, got {lipschitz!r}")
        lipschitz = value
    _LEAF_RULES[module_class] = LeafRule(lipschitz, activation, dict(params or {}))


def unregister_leaf(module_class: type) -> None:
    """Remove the rule of ``module_class`` (no error if it has none)."""
    _LEAF_RULES.pop(module_class, None)


def leaf_rule(module: nn.Module) -> LeafRule | None:
    """The registered rule of the most specific registered class of ``module``, or None."""
    for cls in type(module).__mro__:
        if cls in _LEAF_RULES:
            return _LEAF_RULES[cls]
    return None


# ------------------------------------------------------------------------------------------------ errors

class GraphExtractionError(ValueError):
    """The model cannot be turned into a composition tree; the message names the node and its source line."""


def _user_frame(frames: Sequence[traceback.FrameSummary]) -> str:
    """``file:line: code`` of the innermost frame outside torch (the user's model code)."""
    for fr in reversed(list(frames)):
        if not os.path.abspath(fr.filename).startswith(_TORCH_DIR) and "lipschitz/trace.py" not in fr.filename:
            return f"{os.path.basename(fr.filename)}:{fr.lineno}: {(fr.line or '').strip()}"
    return "source line unknown"


def _source(node: fx.Node) -> str:
    text = node.stack_trace or ""
    frames, lines = [], text.strip().splitlines()
    for i, line in enumerate(lines):
        line = line.strip()
        if line.startswith("File "):
            try:
                fname = line.split('"')[1]
                lineno = int(line.split(", line ")[1].split(",")[0])
            except (IndexError, ValueError):
                continue
            code = lines[i + 1].strip() if i + 1 < len(lines) and not lines[i + 1].strip().startswith("File ") else ""
            frames.append(traceback.FrameSummary(fname, lineno, "", line=code))
    return _user_frame(frames)


class _NoRule(Exception):
    """An op without a rule (internal; becomes a GraphExtractionError unless a module can be made opaque)."""

    def __init__(self, node: fx.Node, what: str, scope: tuple[str, ...], detail: str = ""):
        super().__init__(what)
        self.node, self.what, self.scope, self.detail = node, what, scope, detail

    def message(self) -> str:
        detail = f"{self.detail}; " if self.detail else ""
        return (f"no Lipschitz rule for {self.what} at node {self.node.name!r} ({_source(self.node)}); {detail}"
                f"{_REGISTER_HINT}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ------------------------------------------------------------------------------------------------ tracing

class _Tracer(fx.Tracer):
    """torch.nn modules and registered classes are leaves; a parameter-free module that fails to trace (a
    custom autograd Function, data-dependent Python) becomes an opaque leaf, matched to an activation later."""

    def __init__(self, opaque: dict[str, str]):
        super().__init__()
        self.record_stack_traces = True
        self.opaque = opaque  # qualified name -> why it is opaque

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.opaque or leaf_rule(m) is not None or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname) or not qualname or _has_parameters(m):
            return super().call_module(m, forward, args, kwargs)
        n_before, stack, calls = len(self.graph.nodes), dict(self.module_stack), dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as err:  # noqa: BLE001 - any failure inside a parameter-free module: take it whole
            for node in reversed(list(self.graph.nodes)[n_before:]):
                self.graph.erase_node(node)
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.num_calls = calls
            frames = traceback.extract_tb(err.__traceback__)
            self.opaque[qualname] = f"fx cannot trace it ({_one_line(err)[:120]}; {_user_frame(frames)})"
            return super().call_module(m, forward, args, kwargs)


def _has_parameters(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _trace(model: nn.Module, opaque: dict[str, str]) -> fx.GraphModule:
    import inspect

    concrete = {}
    params = list(inspect.signature(model.forward).parameters.values())
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise GraphExtractionError(f"{type(model).__name__}.forward takes more than one input ({p.name!r}); "
                                       "wrap the model so that forward(x) returns the logits")
        concrete[p.name] = p.default
    tracer = _Tracer(opaque)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as err:  # noqa: BLE001 - TraceError, TypeError from Proxy misuse, ...
        where = _user_frame(traceback.extract_tb(err.__traceback__))
        raise GraphExtractionError(
            f"torch.fx cannot trace {type(model).__name__} ({where}): {_one_line(err)[:200]}; make forward free of "
            f"data-dependent Python control flow, or {_REGISTER_HINT}") from None
    return fx.GraphModule(model, graph)


# ------------------------------------------------------------------------------------------------ one run

class _Recorder(fx.Interpreter):
    """Runs the traced graph once: tensor shapes/dtypes of every node, values of every constant node, and
    which nodes carry data (depend on the input through tensors)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple] = {}
        self.dtypes: dict[fx.Node, torch.dtype] = {}
        self.values: dict[fx.Node, Any] = {}
        self.data: set[fx.Node] = set()

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        depends = n.op == "placeholder" or any(a in self.data for a in n.all_input_nodes)
        if isinstance(out, torch.Tensor):
            self.shapes[n], self.dtypes[n] = tuple(out.shape), out.dtype
        tensors = isinstance(out, torch.Tensor) or (
            isinstance(out, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in out))
        if depends and tensors:
            self.data.add(n)
        elif n.op != "output":
            self.values[n] = out
        return out


# ------------------------------------------------------------------------------------------------ helpers

@dataclass
class _Affine:
    """Per-channel ``x * scale + shift`` (float64 vectors over dim 1); materialised as Normalize or BN."""

    scale: torch.Tensor
    shift: torch.Tensor
    name: str
    dtype: torch.dtype


class _ConstantPad(nn.Module):
    """``F.pad(x, pad, "constant", value)`` as a module: 1-Lipschitz, pad(x) - pad(y) = pad_0(x - y)."""

    def __init__(self, pad: Sequence[int], value: float = 0.0):
        super().__init__()
        self.pad, self.value = tuple(int(p) for p in pad), float(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad, "constant", self.value)


class _ChannelAffine(nn.modules.batchnorm._BatchNorm):
    """Eval-mode batch norm with eps = 0, mean 0, var 1: exactly ``x * weight + bias`` per channel (buffers,
    not parameters), for constant affine maps whose scale is not positive."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__(scale.numel(), eps=0.0, affine=True, track_running_stats=True,
                         device=scale.device, dtype=scale.dtype)
        del self.weight, self.bias
        self.register_buffer("weight", scale.clone())
        self.register_buffer("bias", shift.clone())
        self.eval()

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 - torch's signature
        if input.dim() < 2:
            raise ValueError(f"expected an input with a channel dimension, got shape {tuple(input.shape)}")


def _nargs(node: fx.Node, names: Sequence[str], defaults: dict | None = None) -> dict:
    """Arguments after the data input by name: positional ``node.args[1:]`` then keywords."""
    out = dict(defaults or {})
    for name, value in zip(names, node.args[1:]):
        out[name] = value
    out.update({k: v for k, v in node.kwargs.items() if k in names})
    return out


def _fn(module, name: str):
    return getattr(module, name, None)


def _targets(*names_by_module) -> set:
    found = set()
    for module, names in names_by_module:
        for name in names:
            obj = _fn(module, name)
            if obj is not None:
                found.add(obj)
    return found


_RELU = _targets((F, ["relu", "relu_"]), (torch, ["relu", "relu_"]))
_SILU = _targets((F, ["silu"]))
_GELU = _targets((F, ["gelu"]), (torch._C._nn, ["gelu"]))
_TANH = _targets((F, ["tanh"]), (torch, ["tanh", "tanh_"]))
_SOFTPLUS = _targets((F, ["softplus"]), (torch._C._nn, ["softplus"]))
_LEAKY = _targets((F, ["leaky_relu", "leaky_relu_"]), (torch._C._nn, ["leaky_relu", "leaky_relu_"]))
_SIGMOID = _targets((F, ["sigmoid"]), (torch, ["sigmoid"]))
_DROPOUT = _targets((F, ["dropout", "dropout1d", "dropout2d", "alpha_dropout"]))
_PAD = _targets((F, ["pad"]), (torch._C._nn, ["pad"]))
_ADD = _targets((operator, ["add", "iadd"]), (torch, ["add"]))
_SUB = _targets((operator, ["sub", "isub"]), (torch, ["sub", "subtract"]))
_MUL = _targets((operator, ["mul", "imul"]), (torch, ["mul", "multiply"]))
_DIV = _targets((operator, ["truediv", "itruediv"]), (torch, ["div", "true_divide"]))
_NEG = _targets((operator, ["neg"]), (torch, ["neg", "negative"]))
_CAT = _targets((torch, ["cat", "concat", "concatenate"]))
_MEAN = _targets((torch, ["mean"]))
_RESHAPE = _targets((torch, ["flatten", "reshape", "squeeze", "unsqueeze"]))
_SAME = _targets((torch, ["clone", "detach"]))
_POOL_FUNCS: dict[Any, tuple[type, tuple[str, ...]]] = {}
for _name, _cls, _args in (
        ("avg_pool1d", nn.AvgPool1d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
        ("avg_pool2d", nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                      "divisor_override")),
        ("adaptive_avg_pool1d", nn.AdaptiveAvgPool1d, ("output_size",)),
        ("adaptive_avg_pool2d", nn.AdaptiveAvgPool2d, ("output_size",)),
        ("max_pool1d", nn.MaxPool1d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
        ("max_pool2d", nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
        ("adaptive_max_pool1d", nn.AdaptiveMaxPool1d, ("output_size", "return_indices")),
        ("adaptive_max_pool2d", nn.AdaptiveMaxPool2d, ("output_size", "return_indices"))):
    for _target in _targets((F, [_name]), (torch._C._nn, [_name]), (torch, [_name])):
        _POOL_FUNCS[_target] = (_cls, _args)
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "tanh_": "tanh"}
_AFFINE_METHODS = {"add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul", "mul_": "mul",
                   "div": "div", "div_": "div", "neg": "neg", "neg_": "neg"}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "clone", "detach", "view_as",
                    "reshape_as", "float", "double", "to", "type_as"}


def _affine_kind(node: fx.Node) -> str | None:
    if node.op == "call_method":
        return _AFFINE_METHODS.get(node.target)
    if node.op != "call_function":
        return None
    for kind, targets in (("add", _ADD), ("sub", _SUB), ("mul", _MUL), ("div", _DIV), ("neg", _NEG)):
        if node.target in targets:
            return kind
    return None


def _is_sigmoid(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _SIGMOID) or (
        node.op == "call_method" and node.target in ("sigmoid", "sigmoid_"))


# ------------------------------------------------------------------------------------------------ graph_from_module

def graph_from_module(model: nn.Module, input_shape: Sequence[int], *,
                      example_input: torch.Tensor | None = None) -> G.Node:
    """The ``lipschitz.graph`` tree of an eval-mode ``model`` on inputs of ``input_shape`` (without batch).

    Traces with torch.fx (see the module docstring for the ops with rules), checks that the tree reproduces
    ``model(x)`` on a random input (float models; meta-device models are only traced), and returns it. Raises
    :class:`GraphExtractionError` (a ValueError) naming the node and its source line for anything without a rule.
    """
    from lipschitz.lower import eval_mode

    input_shape = tuple(int(s) for s in input_shape)
    ref = next(iter(model.parameters()), None)
    ref = next(iter(model.buffers()), None) if ref is None else ref
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    if example_input is None:
        example_input = (torch.empty if device.type == "meta" else torch.rand)((2,) + input_shape, dtype=dtype,
                                                                                device=device)
    if tuple(example_input.shape[1:]) != input_shape:
        raise ValueError(f"example_input has shape {tuple(example_input.shape)}, expected (N, "
                         f"{', '.join(map(str, input_shape))})")
    opaque: dict[str, str] = {}
    with eval_mode(model), torch.no_grad():
        while True:  # each retry makes one more parameter-free module opaque, so this ends
            gm = _trace(model, opaque)
            run = _Recorder(gm)
            try:
                run.run(example_input)
            except RuntimeError as err:
                raise GraphExtractionError(f"the model cannot run on input shape {input_shape}: "
                                           f"{_one_line(err)[:200]}") from None
            try:
                root = _Builder(model, gm, run, opaque, example_input.device).build_root()
                break
            except _NoRule as err:
                qualname = _opaque_candidate(model, err.scope, opaque)
                if qualname is None:
                    raise GraphExtractionError(err.message()) from None
                opaque[qualname] = f"its op {err.what} at {_source(err.node)} has no rule"
        if example_input.device.type != "meta":
            _check_reproduces(model, root, example_input)
    return root


def _opaque_candidate(model: nn.Module, scope: tuple[str, ...], opaque: dict[str, str]) -> str | None:
    """The innermost parameter-free module (not the root, not yet opaque) around a node without a rule."""
    for qualname in reversed(scope):
        if qualname in opaque:
            return None
        try:
            module = model.get_submodule(qualname)
        except AttributeError:
            return None
        if not _has_parameters(module):
            return qualname
    return None


def _check_reproduces(model: nn.Module, root: G.Node, x: torch.Tensor) -> None:
    from lipschitz.graph import interpret

    ref, got = model(x), interpret(root, x)
    if not isinstance(ref, torch.Tensor) or ref.shape != got.shape:
        raise GraphExtractionError(f"the traced graph's output has shape {tuple(got.shape)} but the model returns "
                                   f"{getattr(ref, 'shape', type(ref).__name__)}")
    scale = max(1.0, float(ref.abs().max()))
    diff = float((ref - got).abs().max())
    if not diff <= 1e-4 * scale:
        raise GraphExtractionError(
            f"the traced graph does not reproduce the model's forward (max diff {diff:.3g} at output scale "
            f"{scale:.3g}); the forward depends on something fx cannot see (randomness, global state, "
            "batch-dependent Python code)")


# ------------------------------------------------------------------------------------------------ the builder

class _Builder:
    """fx graph (with one recorded run) -> composition tree with module groups and roles."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, run: _Recorder, opaque: dict[str, str],
                 device: torch.device):
        self.model, self.gm, self.run, self.opaque, self.device = model, gm, run, opaque, device
        self.modules = dict(model.named_modules())
        self.qual: dict[str, str] = {}  # module-stack key -> qualified name
        self.path: dict[int, tuple[str, ...]] = {}  # id(graph node) -> module-stack keys around it
        self.groups: dict[int, str] = {}  # id(graph node) -> module-stack key of the group it stands for
        self.emitted: dict[fx.Node, int] = {}
        self.used_names: set[str] = set()
        self.leaf_names: dict[fx.Node, str] = {}
        self.preds, self.idom, self.depth = self._dominators()

    # ---------------------------------------------------------------- data flow
    def _data_inputs(self, n: fx.Node) -> list[fx.Node]:
        """Data operands of ``n`` in order (``x * sigmoid(x)`` counts as one op on x: SiLU)."""
        flat: list[fx.Node] = []
        fx.node.map_arg((n.args, n.kwargs), lambda a: flat.append(a) if a in self.run.data else None)
        if self._silu_input(n) is not None:
            return [self._silu_input(n)]
        return flat

    def _silu_input(self, n: fx.Node) -> fx.Node | None:
        if _affine_kind(n) != "mul" or len(n.args) != 2:
            return None
        a, b = n.args
        for x, s in ((a, b), (b, a)):
            if isinstance(s, fx.Node) and _is_sigmoid(s) and s.args and s.args[0] is x and len(s.users) == 1:
                return x
        return None

    def _dominators(self):
        preds, idom, depth = {}, {}, {}
        for n in self.gm.graph.nodes:
            if n not in self.run.data:
                continue
            if n.op == "placeholder":
                preds[n], idom[n], depth[n] = [], None, 0
                continue
            preds[n] = self._data_inputs(n)
            uniq = list(dict.fromkeys(preds[n]))
            d = uniq[0]
            for other in uniq[1:]:
                d = self._lca(d, other, idom, depth)
            idom[n], depth[n] = d, depth[d] + 1
        return preds, idom, depth

    @staticmethod
    def _lca(a, b, idom, depth):
        while a is not b:
            if depth[a] >= depth[b]:
                a = idom[a]
            else:
                b = idom[b]
        return a

    # ---------------------------------------------------------------- tree
    def build_root(self) -> G.Node:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        result = out.args[0]
        if not isinstance(result, fx.Node) or result not in self.run.data:
            raise GraphExtractionError(
                f"{type(self.model).__name__}.forward must return one tensor computed from its input, got "
                f"{type(result).__name__}; wrap the model so that forward(x) returns the logits")
        items = self._materialise(self._path(result, placeholders[0]))
        return _Roles(self).assign(self._group(items, ()), type(self.model).__name__)

    def _path(self, end: fx.Node, start: fx.Node) -> list:
        """Items computing ``end`` from ``start`` (``start`` dominates ``end``), in forward order."""
        items: list = []
        node = end
        while node is not start:
            self._emit(node)
            inputs = self.preds[node]
            if node.op == "call_function" and node.target in _CAT or len(set(inputs)) > 1:
                self._check_join(node)
                fork = self.idom[node]
                items.append(self._join(node, [self._path(u, fork) for u in inputs], fork))
                node = fork
            else:
                items.extend(reversed(self._unary(node, inputs[0])))
                node = inputs[0]
        items.reverse()
        return items

    def _emit(self, node: fx.Node) -> None:
        if node in self.emitted:
            raise GraphExtractionError(
                f"the graph is not series-parallel at node {node.name!r} ({_source(node)}): its value feeds "
                "parallel paths that do not meet at one sum or concatenation; network_bound composes sequences, "
                f"residual sums and concatenations only; {_REGISTER_HINT}")
        self.emitted[node] = 1

    def _scope(self, node: fx.Node) -> tuple[str, ...]:
        stack = node.meta.get("nn_module_stack") or {}
        keys = []
        for key, value in stack.items():
            qualname = value[0] if isinstance(value, tuple) else str(value)
            self.qual[key] = qualname
            keys.append(key)
        if node.op == "call_module" and keys and self.qual[keys[-1]] == node.target:
            keys = keys[:-1]
        return tuple(keys)

    def _name(self, base: str) -> str:
        name, k = base, 1
        while name in self.used_names:
            name, k = f"{base}_{k}", k + 1
        self.used_names.add(name)
        return name

    def _leaf_name(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return node.target
        if node not in self.leaf_names:
            scope = self._scope(node)
            self.leaf_names[node] = self._name(f"{self.qual[scope[-1]]}.{node.name}" if scope else node.name)
        return self.leaf_names[node]

    def _tag(self, items: list, node: fx.Node) -> list:
        scope = self._scope(node)
        for item in items:
            self.path[id(item)] = scope
        return items

    # ---------------------------------------------------------------- joins
    def _check_join(self, node: fx.Node) -> None:
        kind = "cat" if node.op == "call_function" and node.target in _CAT else _affine_kind(node)
        if kind == "cat" or (kind in ("add", "sub") and len(self.preds[node]) == 2 and not node.kwargs.get("alpha")):
            return
        what = node.target if node.op == "call_method" else getattr(node.target, "__name__", node.target)
        raise _NoRule(node, f"{what} of two input-dependent tensors", self._scope(node),
                      "a product/comparison of activations (attention, gating, max) has no global Lipschitz constant")

    def _join(self, node: fx.Node, parts: list[list], fork: fx.Node) -> G.Node:
        kind = "cat" if node.op == "call_function" and node.target in _CAT else _affine_kind(node)
        scope = self._scope(node)
        for part in parts:
            for item in part:
                scope = _common_prefix(scope, self.path[id(item)])
        prefix = f"{self.qual[scope[-1]]}." if scope else ""
        parts = [self._materialise(p) for p in parts]
        if kind == "cat":
            dim = _nargs(node, ("dim",), {"dim": 0})["dim"]
            rank = len(self.run.shapes[node])
            if dim % rank == 0 or len(node.args[0]) != len(parts):
                raise _NoRule(node, "torch.cat along the batch dimension or with constant parts", scope)
            grouped = [self._part(self._group(p, scope), f"{prefix}cat") for p in parts]
            joined: G.Node = G.Concat(grouped, dim % rank, name=self._name(f"{prefix}cat"))
        else:
            if kind == "sub":
                parts[1] = parts[1] + self._materialise([self._tag([self._affine_const(node, -1.0, 0.0)], node)[0]])
            joined = self._residual([self._group(p, scope) for p in parts], prefix)
        self.path[id(joined)] = scope
        return joined

    def _residual(self, parts: list[list], prefix: str) -> G.Residual:
        def cost(p):
            nonlinear = any(isinstance(n, (G.Activation, G.Leaf, G.Residual, G.Concat)) or
                            (isinstance(n, G.Pool) and not isinstance(n.module, (nn.AvgPool1d, nn.AvgPool2d,
                                                                                 nn.AdaptiveAvgPool1d,
                                                                                 nn.AdaptiveAvgPool2d)))
                            for item in p for n in G.iter_nodes(item))
            return nonlinear, sum(1 for item in p for _ in G.iter_nodes(item))

        first, second = parts
        shortcut, branch = (first, second) if cost(first) < cost(second) else (second, first)
        branch_node = self._part(branch, f"{prefix}branch")
        shortcut_node = None if not shortcut else (shortcut[0] if len(shortcut) == 1 else
                                                   G.Sequential(shortcut, name=self._name(f"{prefix}shortcut")))
        return G.Residual(branch_node, shortcut_node, name=self._name(f"{prefix}residual"))

    def _part(self, items: list, name: str) -> G.Node:
        if len(items) == 1 and id(items[0]) in self.groups and isinstance(items[0], G.Sequential):
            return items[0]
        return G.Sequential(items, name=self._name(name))

    # ---------------------------------------------------------------- groups (module structure)
    def _group(self, items: list, level: tuple[str, ...]) -> list:
        out, i, depth = [], 0, len(level)
        while i < len(items):
            p = self.path[id(items[i])]
            if len(p) <= depth or p[:depth] != level:
                out.append(items[i])
                i += 1
                continue
            key, j = p[depth], i
            while j < len(items) and len(self.path[id(items[j])]) > depth and self.path[id(items[j])][depth] == key \
                    and self.path[id(items[j])][:depth] == level:
                j += 1
            out.extend(self._make_group(self._group(items[i:j], level + (key,)), level + (key,)))
            i = j
        return out

    def _make_group(self, inner: list, path: tuple[str, ...]) -> list:
        key = path[-1]
        qualname = self.qual[key]
        name = key if "@" in key else qualname
        module = self.modules.get(qualname)
        single = inner[0] if len(inner) == 1 else None
        if not inner:
            return []
        if isinstance(single, (G.Residual, G.Concat)) and id(single) not in self.groups:
            single.name = self._name(name)
        elif single is not None and not isinstance(module, nn.Sequential) and id(single) not in self.groups \
                and not isinstance(single, (G.Sequential, G.Residual, G.Concat)):
            if not isinstance(single, (G.Layer, G.BatchNorm, G.Pool, G.Leaf)) or single.name == "":
                single.name = self._name(name)  # a function op stands for its module (e.g. a normalisation)
            self.path[id(single)] = path[:-1]
            return [single]
        else:
            single = G.Sequential(inner, name=self._name(name))
        self.groups[id(single)] = key
        self.path[id(single)] = path[:-1]
        return [single]

    # ---------------------------------------------------------------- affine constants
    def _materialise(self, items: list) -> list:
        """Merge adjacent constant affine maps and turn them into Normalize (positive scale) or BN nodes."""
        merged: list = []
        for item in items:
            prev = merged[-1] if merged else None
            if isinstance(item, _Affine) and isinstance(prev, _Affine) and self.path[id(prev)] == self.path[id(item)]:
                combo = _Affine(item.scale * prev.scale, item.scale * prev.shift + item.shift, prev.name, prev.dtype)
                self.path[id(combo)] = self.path[id(prev)]
                merged[-1] = combo
            else:
                merged.append(item)
        return [self._affine_node(m) if isinstance(m, _Affine) else m for m in merged]

    def _affine_node(self, a: _Affine) -> G.Node:
        if a.scale.is_meta or bool((a.scale > 0).all()):
            # in the data's dtype, like the model's own buffers: (x - mean) / std with float32 mean and std
            # comes back exactly (1 / (1 / std) is std to within a float64 ulp)
            node: G.Node = G.Normalize((-a.shift / a.scale).to(a.dtype), (1.0 / a.scale).to(a.dtype), name=a.name)
        else:
            node = G.BatchNorm(_ChannelAffine(a.scale.to(a.dtype), a.shift.to(a.dtype)), name=a.name)
        self.path[id(node)] = self.path[id(a)]
        return node

    def _affine_const(self, node: fx.Node, scale, shift, x: fx.Node | None = None) -> _Affine:
        """An affine item for ``node`` from scalars or constant tensors broadcast per channel."""
        ref = x if x is not None else node
        shape = self.run.shapes[ref]
        channels = shape[1] if len(shape) >= 2 else 1
        vecs = [self._channel_vector(node, v, shape, channels) for v in (scale, shift)]
        return _Affine(vecs[0], vecs[1], self._leaf_name(node), self.run.dtypes[ref])

    def _channel_vector(self, node, value, shape, channels) -> torch.Tensor:
        t = torch.as_tensor(value).detach().to(device=self.device, dtype=torch.float64)
        padded = (1,) * (len(shape) - t.dim()) + tuple(t.shape)
        if t.dim() > len(shape) or padded[0] != 1 or any(s != 1 for s in padded[2:]) or \
                (len(shape) >= 2 and padded[1] not in (1, channels)) or (len(shape) < 2 and t.numel() != 1):
            raise _NoRule(node, f"an elementwise op with a constant of shape {tuple(t.shape)} on a tensor of shape "
                          f"{shape}", self._scope(node), "only scalars and per-channel constants (dim 1) are affine "
                          "maps with a rule")
        return t.reshape(-1).expand(channels).clone() if t.numel() == 1 else t.reshape(-1).clone()

    # ---------------------------------------------------------------- one-input ops
    def _unary(self, node: fx.Node, x: fx.Node) -> list:
        """Items (forward order) for a one-input op ``node`` applied to the data node ``x``."""
        if node.op == "call_module":
            items = self._module_op(node, self.modules[node.target], x)
        elif node.op in ("call_function", "call_method"):
            items = self._function_op(node, x)
        else:
            raise _NoRule(node, f"a {node.op} node", self._scope(node))
        return self._tag(items, node)

    def _module_op(self, node: fx.Node, m: nn.Module, x: fx.Node) -> list:
        name = node.target
        rule = leaf_rule(m)
        if rule is not None:
            if rule.activation is not None:
                return [G.Activation(rule.activation, dict(rule.params), name=name)]
            return [G.Leaf(m, rule.lipschitz, name=name, note=f"{name} ({type(m).__name__}): Lipschitz constant "
                           "from a registered rule (lipschitz.register_leaf), taken as given")]
        if isinstance(m, _LAYER_TYPES):
            return [G.Layer(m, name=name)]
        if isinstance(m, _BN_TYPES):
            return [G.BatchNorm(m, name=name)]
        act = activation_from_module(m)
        if act is not None:
            return [G.Activation(act[0], act[1], name=name)]
        if isinstance(m, _POOL_TYPES):
            if getattr(m, "return_indices", False):
                raise _NoRule(node, f"{type(m).__name__}(return_indices=True)", self._scope(node))
            return [G.Pool(m, name=name)]
        if isinstance(m, _IDENTITY_TYPES):
            return []
        if isinstance(m, nn.Flatten):
            return self._reshape(node, x, name)
        if isinstance(m, _PAD_TYPES) and all(p >= 0 for p in m.padding):
            return [G.Leaf(m, 1.0, name=name)]
        if not _has_parameters(m):
            return [self._match_activation(node, m, x)]
        raise _NoRule(node, f"module {type(m).__name__} ({name!r})", self._scope(node))

    def _function_op(self, node: fx.Node, x: fx.Node) -> list:
        t, name = node.target, self._leaf_name(node)
        method = node.op == "call_method"
        if t is operator.getitem and x not in self.run.shapes:  # an item of an op returning several tensors
            what = x.target if x.op == "call_method" else getattr(x.target, "__name__", str(x.target))
            raise _NoRule(x, f"{what} (it returns several tensors)", self._scope(x))
        if (not method and t in _RELU) or (method and t in _ACT_METHODS):
            kind = _ACT_METHODS.get(t, "relu") if method else "relu"
            return [G.Activation(kind, name=name)]
        if not method and t in _TANH:
            return [G.Activation("tanh", name=name)]
        if self._silu_input(node) is not None or (not method and t in _SILU):
            return [G.Activation("silu", name=name)]
        if not method and t in _GELU:
            return [G.Activation("gelu", {"approximate": _nargs(node, ("approximate",), {"approximate": "none"})
                                          ["approximate"]}, name=name)]
        if not method and t in _LEAKY:
            slope = _nargs(node, ("negative_slope",), {"negative_slope": 0.01})["negative_slope"]
            return [G.Activation("leaky_relu", {"negative_slope": float(slope)}, name=name)]
        if not method and t in _SOFTPLUS:
            a = _nargs(node, ("beta", "threshold"), {"beta": 1.0, "threshold": 20.0})
            return [G.Activation("softplus", {"beta": float(a["beta"]), "threshold": float(a["threshold"])}, name=name)]
        if not method and t in _DROPOUT:
            if _nargs(node, ("p", "training"), {"training": True})["training"]:
                raise _NoRule(node, "dropout with training=True", self._scope(node),
                              "pass training=self.training so that it is the identity in eval mode")
            return []
        if not method and t in _PAD:
            a = _nargs(node, ("pad", "mode", "value"), {"mode": "constant", "value": None})
            if a["mode"] != "constant" or any(int(p) < 0 for p in a["pad"]):
                raise _NoRule(node, f"F.pad with mode={a['mode']!r}, pad={a['pad']}", self._scope(node),
                              "constant padding (no cropping) has a rule")
            return [G.Leaf(_ConstantPad(a["pad"], a["value"] or 0.0), 1.0, name=name)]
        if not method and t in _POOL_FUNCS:
            return self._pool_function(node, name)
        if (not method and t in _MEAN) or (method and t == "mean"):
            return self._mean(node, x, name)
        if (not method and t in _RESHAPE | _SAME) or (method and t in _RESHAPE_METHODS):
            return self._reshape(node, x, name)
        if _affine_kind(node) is not None:
            return [self._affine(node, x)]
        what = t if method else getattr(t, "__name__", str(t))
        raise _NoRule(node, f"{'method ' if method else ''}{what}", self._scope(node))

    def _pool_function(self, node: fx.Node, name: str) -> list:
        cls, names = _POOL_FUNCS[node.target]
        kwargs = _nargs(node, names)
        if kwargs.pop("return_indices", False):
            raise _NoRule(node, f"{node.target.__name__}(return_indices=True)", self._scope(node))
        try:
            module = cls(**kwargs)
        except TypeError as err:
            raise _NoRule(node, f"{node.target.__name__} with arguments {kwargs}", self._scope(node), str(err)) from None
        return [G.Pool(module, name=name)]

    def _mean(self, node: fx.Node, x: fx.Node, name: str) -> list:
        a = _nargs(node, ("dim", "keepdim"), {"dim": None, "keepdim": False})
        rank = len(self.run.shapes[x])
        dims = a["dim"] if isinstance(a["dim"], (tuple, list)) else (a["dim"],)
        if None in dims or rank not in (3, 4) or sorted(int(d) % rank for d in dims) != list(range(2, rank)):
            raise _NoRule(node, f"mean over dims {a['dim']} of a tensor of shape {self.run.shapes[x]}",
                          self._scope(node), "a mean over all spatial dims (2, 3) of (B, C, H, W) has a rule")
        pool = (nn.AdaptiveAvgPool2d if rank == 4 else nn.AdaptiveAvgPool1d)(1)
        return [G.Pool(pool, name=name)] + ([] if a["keepdim"] else [G.Flatten(name=f"{name}.flatten")])

    def _reshape(self, node: fx.Node, x: fx.Node, name: str) -> list:
        before, after = self.run.shapes[x], self.run.shapes[node]
        if self.run.dtypes[x] != self.run.dtypes[node]:
            raise _NoRule(node, f"a dtype change {self.run.dtypes[x]} -> {self.run.dtypes[node]}", self._scope(node))
        if after == before:
            return []
        if len(before) >= 2 and after == (before[0], math.prod(before[1:])):
            return [G.Flatten(name=name)]
        raise _NoRule(node, f"a reshape from {before} to {after}", self._scope(node),
                      "only flattening to (B, -1) has a rule")

    def _affine(self, node: fx.Node, x: fx.Node) -> _Affine:
        kind = _affine_kind(node)
        if kind == "neg":
            return self._affine_const(node, -1.0, 0.0, x)
        if set(node.kwargs) - {"alpha", "other", "input", "out"} or node.kwargs.get("alpha") not in (None, 1):
            raise _NoRule(node, f"{kind} with keyword arguments {dict(node.kwargs)}", self._scope(node))
        operands = list(node.args) + [node.kwargs[k] for k in ("input", "other") if k in node.kwargs]
        if len(operands) != 2:
            raise _NoRule(node, f"{kind} with {len(operands)} operands", self._scope(node))
        data_first = operands[0] is x
        other = operands[1] if data_first else operands[0]
        if other is x:  # x + x, x - x
            if kind in ("add", "sub"):
                return self._affine_const(node, 2.0 if kind == "add" else 0.0, 0.0, x)
            raise _NoRule(node, f"{kind} of a tensor with itself", self._scope(node))
        c = self.run.values[other] if isinstance(other, fx.Node) else other
        if kind == "add":
            return self._affine_const(node, 1.0, c, x)
        if kind == "sub":
            return self._affine_const(node, 1.0, -torch.as_tensor(c), x) if data_first else \
                self._affine_const(node, -1.0, c, x)
        if kind == "mul":
            return self._affine_const(node, c, 0.0, x)
        if not data_first:
            raise _NoRule(node, "division by an input-dependent tensor", self._scope(node))
        return self._affine_const(node, 1.0 / torch.as_tensor(c, dtype=torch.float64), 0.0, x)

    # ---------------------------------------------------------------- activation matching
    def _match_activation(self, node: fx.Node, m: nn.Module, x: fx.Node) -> G.Activation:
        """A parameter-free leaf that equals a known activation on a dense grid (to MATCH_TOLERANCE)."""
        name, why = node.target, self.opaque.get(node.target, "it is a module without a rule")
        shape = self.run.shapes[x][1:]
        dtype, device = self.run.dtypes[x], self.device
        if device.type == "meta":
            raise _NoRule(node, f"module {type(m).__name__} ({name!r})", self._scope(node),
                          f"{why}; a meta-device model cannot be compared with the known activations")
        per = max(1, math.prod(shape))
        batch = max(1, -(-MATCH_POINTS // per))
        grid = torch.linspace(-MATCH_RANGE, MATCH_RANGE, batch * per, dtype=torch.float64)
        grid = grid[torch.randperm(grid.numel(), generator=torch.Generator().manual_seed(0))]
        z = grid.reshape((batch,) + tuple(shape)).to(dtype=dtype, device=device)
        try:
            y = m(z)
        except Exception as err:  # noqa: BLE001 - the module's own failure: no match
            raise _NoRule(node, f"module {type(m).__name__} ({name!r})", self._scope(node),
                          f"{why}; it fails on a test input ({_one_line(err)[:80]})") from None
        for kind, params in _candidates(m, z, y):
            ref = G.activation_fn(kind, params, z)
            if isinstance(y, torch.Tensor) and y.shape == z.shape and \
                    bool(((y - ref).abs() <= MATCH_TOLERANCE * ref.abs().clamp(min=1.0)).all()):
                note = (f"{name} ({type(m).__name__}): {why}; it equals {kind}{params or ''} on {z.numel()} grid "
                        f"points in [-{MATCH_RANGE:g}, {MATCH_RANGE:g}] to {MATCH_TOLERANCE:g}, so it is bounded as {kind}")
                return G.Activation(kind, params, name=name, note=note)
        raise _NoRule(node, f"module {type(m).__name__} ({name!r})", self._scope(node),
                      f"{why}, and it matches no known activation ({', '.join(G.ACTIVATION_KINDS)}) on a dense grid")


def _candidates(m: nn.Module, z: torch.Tensor, y: Any) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = [("relu", {}), ("silu", {}), ("gelu", {"approximate": "none"}),
                                   ("gelu", {"approximate": "tanh"}), ("softplus", {"beta": 1.0, "threshold": 20.0}),
                                   ("tanh", {}), ("identity", {})]
    if isinstance(y, torch.Tensor) and y.shape == z.shape:
        probe = m(torch.full((1,) + tuple(z.shape[1:]), -1.0, dtype=z.dtype, device=z.device))
        slope = -float(probe.reshape(-1)[0])
        if math.isfinite(slope):
            out.insert(1, ("leaky_relu", {"negative_slope": slope}))
    return out


def _common_prefix(a: tuple, b: tuple) -> tuple:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


# ------------------------------------------------------------------------------------------------ roles

class _Roles:
    """Stem, stage, block and head roles from the module groups of a traced tree."""

    def __init__(self, builder: _Builder):
        self.groups = builder.groups
        self.name = builder._name

    def assign(self, items: list, root_name: str) -> G.Sequential:
        for item in items:
            self._blocks(item)
            if isinstance(item, G.Residual) and item.role is None and not self._structural(item):
                item.role = "block"  # a residual sum outside any module group (a model written in one forward)
        for item in items:
            self._stages(item)
        items = self._dissolve([self._collapse(item) for item in items])
        body = items
        while True:  # descend through wrappers (e.g. nn.Sequential(normalize, net)) to the level with stages
            structural = [i for i, it in enumerate(body) if self._structural(it)]
            if len(structural) != 1 or not all(_is_normalisation(it) for i, it in enumerate(body)
                                               if i != structural[0]):
                break
            inner = body[structural[0]]
            if getattr(inner, "role", None) is not None or not isinstance(inner, G.Sequential):
                break
            inner.children = self._dissolve(inner.children)
            body = inner.children
        self._stem_and_head(body)
        k = 0
        for item in items:
            for n in G.iter_nodes(item):
                if getattr(n, "role", None) == "stage":
                    k += 1
                    n.name = f"stage{k}"
        return G.Sequential(items, name=root_name)

    def _children(self, node) -> list:
        if isinstance(node, G.Sequential):
            return list(node.children)
        if isinstance(node, G.Residual):
            return [node.branch] + ([node.shortcut] if node.shortcut is not None else [])
        if isinstance(node, G.Concat):
            return list(node.parts)
        return []

    def _blocks(self, node) -> bool:
        """Mark blocks (smallest groups holding a residual sum); returns whether ``node`` holds one."""
        has_res = isinstance(node, G.Residual)
        for child in self._children(node):
            has_res |= self._blocks(child)
        if id(node) in self.groups and has_res:
            if not any(getattr(n, "role", None) == "block" for n in G.iter_nodes(node) if n is not node):
                node.role = "block"
        return has_res

    def _stages(self, node) -> bool:
        """Mark stages (smallest non-block groups holding blocks); returns whether ``node`` holds a block."""
        if getattr(node, "role", None) == "block":
            return True
        holds = [self._stages(child) for child in self._children(node)]
        has_block = any(holds)
        if has_block and id(node) in self.groups:
            inner = any(getattr(n, "role", None) == "stage" for n in G.iter_nodes(node) if n is not node)
            if not inner:
                node.role = "stage"
        return has_block

    def _collapse(self, node):
        """Merge a group whose only child is a group (e.g. a stage module holding one nn.Sequential)."""
        if isinstance(node, G.Sequential):
            node.children = [self._collapse(c) for c in node.children]
            if len(node.children) == 1 and id(node.children[0]) in self.groups and id(node) in self.groups:
                child = node.children[0]
                if node.role is None or child.role is None:
                    child.role = child.role or node.role
                    return child
        elif isinstance(node, G.Residual):
            node.branch = self._collapse(node.branch)
            node.shortcut = None if node.shortcut is None else self._collapse(node.shortcut)
        elif isinstance(node, G.Concat):
            node.parts = [self._collapse(p) for p in node.parts]
        return node

    def _dissolve(self, items: list) -> list:
        """Replace a role-less group holding only stages (``self.layer = nn.Sequential(stage, ...)``) by the
        stages (bound-neutral: each stage is a Sequential of its own)."""
        out = []
        for item in items:
            if isinstance(item, G.Sequential) and getattr(item, "role", None) is None and item.children and \
                    all(getattr(c, "role", None) == "stage" for c in item.children):
                out.extend(item.children)
            else:
                out.append(item)
        return out

    def _structural(self, node) -> bool:
        return any(getattr(n, "role", None) in ("stage", "block") for n in G.iter_nodes(node))

    def _stem_and_head(self, body: list) -> None:
        """Wrap what precedes the first stage/block (after input normalisation) as stem, what follows as head."""
        marks = [i for i, it in enumerate(body) if self._structural(it)]
        if not marks:
            return
        lead = 0
        while lead < marks[0] and _is_normalisation(body[lead]):
            lead += 1
        first, last = marks[0], marks[-1]
        head = body[last + 1:]
        if head:
            body[last + 1:] = [self._wrap(head, "head")]
        if body[lead:first]:
            body[lead:first] = [self._wrap(body[lead:first], "stem")]

    def _wrap(self, items: list, role: str) -> G.Node:
        if len(items) == 1 and id(items[0]) in self.groups and getattr(items[0], "role", None) is None:
            items[0].role = role
            return items[0]
        return G.Sequential(items, name=self.name(role), role=role)


def _is_normalisation(node) -> bool:
    if isinstance(node, G.Normalize):
        return True
    if isinstance(node, G.BatchNorm) and isinstance(node.module, _ChannelAffine):
        return True
    return isinstance(node, G.Sequential) and bool(node.children) and all(_is_normalisation(c) for c in node.children)

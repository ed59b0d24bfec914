"""One validation layer for every node's inputs, derived from the node's own ``INPUT_TYPES`` so the checks cannot
drift from the widgets.

ComfyUI checks widget values against ``min``/``max`` at queue time, but ``nan < min`` is False (NaN passes) and a value
that arrives through a link (a primitive, a math node) skips the check entirely. So every pack node's ``FUNCTION`` is
wrapped (``install``, called once by the pack's ``__init__`` over ``NODE_CLASS_MAPPINGS``) and, before the node body
runs - before any encoding, sampling or training - each input is checked against its declaration:

- ``FLOAT``: a real number, finite (NaN and +-inf refused), inside the declared ``min``/``max``;
- ``INT``: an integer inside ``min``/``max``;
- ``IMAGE`` / ``MASK``: tensors (or lists of tensors) with finite values in 0..1 (a resampling overshoot of up to
  ``RANGE_SLACK`` is tolerated; 0..255 or -1..1 data is refused);
- ``LATENT``: ``samples`` finite (and ``noise_mask`` finite, in 0..1);
- ``CONDITIONING``: finite embeddings (and pooled outputs).

Shapes and node-specific rules stay in the nodes (they know what they need); the errors are the pack's ``InputError``
naming the input, what was expected and what was given.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers

import torch

from .errors import InputError

# images/masks: bicubic/lanczos resizing overshoots 0..1 a little; 0..255 or -1..1 data does not pass
RANGE_SLACK = 0.25
MARK = "_personalize_validated"


# ------------------------------------------------------------------------------------------------ numbers
def _fmt(v) -> str:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return repr(v)


def _range_text(opts: dict) -> str:
    lo, hi = opts.get("min"), opts.get("max")
    if lo is not None and hi is not None:
        return f" from {_fmt(lo)} to {_fmt(hi)}"
    if lo is not None:
        return f" >= {_fmt(lo)}"
    if hi is not None:
        return f" <= {_fmt(hi)}"
    return ""


def check_float(value, name: str, opts: dict | None = None) -> float:
    """A finite real number inside ``opts``' min/max; returns it as float."""
    opts = opts or {}
    rng = _range_text(opts)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(name, f"a number{rng}", f"{type(value).__name__} {value!r}"[:120])
    v = float(value)
    if not math.isfinite(v):
        raise InputError(name, f"a finite number{rng}", _fmt(v))
    lo, hi = opts.get("min"), opts.get("max")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise InputError(name, f"a number{rng}", _fmt(v), "A value arriving through a link skips the widget's limits")
    return v


def check_int(value, name: str, opts: dict | None = None) -> int:
    """An integer (an integral float is accepted) inside ``opts``' min/max; returns it as int."""
    opts = opts or {}
    rng = _range_text(opts)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(name, f"an integer{rng}", f"{type(value).__name__} {value!r}"[:120])
    if not isinstance(value, numbers.Integral):
        v = float(value)
        if not math.isfinite(v) or v != int(v):
            raise InputError(name, f"an integer{rng}", _fmt(v))
    v = int(value)
    lo, hi = opts.get("min"), opts.get("max")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise InputError(name, f"an integer{rng}", v, "A value arriving through a link skips the widget's limits")
    return v


# ------------------------------------------------------------------------------------------------ tensors
def nonfinite_text(t: torch.Tensor) -> str | None:
    if not t.is_floating_point() and not t.is_complex():
        return None
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    nan = int(torch.isnan(t).sum())
    inf = int(bad.sum()) - nan
    parts = ([f"{nan} NaN"] if nan else []) + ([f"{inf} infinite"] if inf else [])
    return f"a tensor {tuple(t.shape)} with {' and '.join(parts)} values"


def check_finite(t, name: str, what: str = "a tensor") -> None:
    """InputError if the tensor ``t`` holds NaN or inf (non-tensors are left to the node's own checks)."""
    if isinstance(t, torch.Tensor):
        bad = nonfinite_text(t)
        if bad is not None:
            raise InputError(name, f"{what} with finite values (no NaN or infinity)", bad)


def check_unit_range(t, name: str, what: str = "an IMAGE", slack: float = RANGE_SLACK) -> None:
    """Finite values in 0..1 (with ``slack``)."""
    if not isinstance(t, torch.Tensor):
        return
    check_finite(t, name, what)
    if t.numel() == 0:
        return
    lo, hi = float(t.amin()), float(t.amax())
    if lo < -slack or hi > 1.0 + slack:
        hint = ("Pixel values look like 0..255: divide by 255" if hi > 2.0 else
                "Values look like -1..1: map them with (x + 1) / 2" if lo < -0.5 else None)
        raise InputError(name, f"{what} with values in 0..1", f"values from {lo:.4g} to {hi:.4g}", hint)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def check_image(value, name: str) -> None:
    for t in _tensors(value):
        check_unit_range(t, name, "an IMAGE")


def check_mask(value, name: str) -> None:
    for t in _tensors(value):
        check_unit_range(t, name, "a MASK")


def check_latent(value, name: str) -> None:
    if isinstance(value, dict):
        check_finite(value.get("samples"), name, "a LATENT")
        nm = value.get("noise_mask")
        if isinstance(nm, torch.Tensor):
            check_unit_range(nm, name, "a LATENT noise_mask")


def check_conditioning(value, name: str) -> None:
    if not isinstance(value, (list, tuple)):
        return
    for item in value:
        if isinstance(item, (list, tuple)) and item:
            check_finite(item[0], name, "a CONDITIONING")
            extra = item[1] if len(item) > 1 and isinstance(item[1], dict) else {}
            check_finite(extra.get("pooled_output"), name, "a CONDITIONING (pooled output)")


def context_mismatch(expected: torch.Tensor, got: torch.Tensor, tol: float = 0.2) -> int | None:
    """First token position where the conditioning ``got`` [B, T, C] does not start with ``expected`` [1, L, C]
    (relative L2 distance per token above ``tol``: a text encoder with a small LoRA stays well below it, another
    token is far above it), or None when it does. A conditioning shorter than ``expected`` mismatches at its end."""
    if got is None or got.ndim != 3 or got.shape[-1] != expected.shape[-1]:
        return 0
    n = int(expected.shape[1])
    if got.shape[1] < n:
        return int(got.shape[1])
    e = expected[0].to(torch.float32)
    g = got[0, :n].detach().to(device="cpu", dtype=torch.float32)
    rel = (g - e).norm(dim=-1) / e.norm(dim=-1).clamp_min(1e-6)
    bad = torch.nonzero(~(rel <= tol)).flatten()
    return int(bad[0]) if bad.numel() else None


TENSOR_CHECKS = {"IMAGE": check_image, "MASK": check_mask, "LATENT": check_latent, "CONDITIONING": check_conditioning}


# ------------------------------------------------------------------------------------------------ the layer
def declared_inputs(node_cls) -> dict:
    """{name: (type, opts)} of the node's required and optional inputs, in declaration order."""
    spec = node_cls.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, decl in (spec.get(section) or {}).items():
            if not isinstance(decl, (list, tuple)) or not decl:
                continue
            kind = decl[0]
            opts = decl[1] if len(decl) > 1 and isinstance(decl[1], dict) else {}
            out[name] = (kind, opts)
    return out


def check_inputs(node_cls, values: dict) -> dict:
    """Check every given value against the node's declaration; returns the values (numbers as float/int)."""
    out = dict(values)
    for name, (kind, opts) in declared_inputs(node_cls).items():
        if name not in values or values[name] is None:
            continue
        v = values[name]
        if kind == "FLOAT":
            out[name] = check_float(v, name, opts)
        elif kind == "INT":
            out[name] = check_int(v, name, opts)
        elif isinstance(kind, str) and kind in TENSOR_CHECKS:
            TENSOR_CHECKS[kind](v, name)
    return out


def validated(node_cls):
    """Class decorator (idempotent): the node's FUNCTION checks its inputs against INPUT_TYPES before it runs."""
    fname = getattr(node_cls, "FUNCTION", None)
    fn = inspect.getattr_static(node_cls, fname, None) if fname else None
    if not inspect.isfunction(fn) or getattr(fn, MARK, False):
        # a classmethod/staticmethod FUNCTION is left alone: is_validated() stays False, and the walking test
        # (tests/test_validation.py) names the node
        return node_cls
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        bound = sig.bind_partial(self, *args, **kwargs)
        params = dict(bound.arguments)
        params.pop(next(iter(sig.parameters)), None)  # self
        extra = params.pop("kwargs", None) if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()) else None
        if extra:
            params.update(extra)
        checked = check_inputs(type(self), params)
        # numbers come back as plain float/int; everything else is passed through unchanged
        for k, v in checked.items():
            if k in bound.arguments:
                bound.arguments[k] = v
            elif extra and k in extra:
                extra[k] = v
        return fn(*bound.args, **bound.kwargs)

    setattr(wrapper, MARK, True)
    setattr(node_cls, fname, wrapper)
    return node_cls


def install(mappings: dict) -> None:
    """Wrap every node class of a NODE_CLASS_MAPPINGS dict (the pack's ``__init__`` calls this once)."""
    for cls in mappings.values():
        validated(cls)


def is_validated(node_cls) -> bool:
    fname = getattr(node_cls, "FUNCTION", None)
    return bool(fname and getattr(getattr(node_cls, fname, None), MARK, False))

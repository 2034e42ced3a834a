"""Backend registry: which implementations exist, which can run on a device, and `"auto"`.

A backend is a module with three functions, all taking validated, non-empty inputs:

    mab(x, y) -> am
    fab(am, y, gate) -> out                 # gate: the FAB's GateNetwork
    mutex_attention(x, y, gate) -> out      # FAB(MAB(x, y), y)

and `unavailable_reason(device) -> str | None` (None when it can run there).
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

_MODULES = {
    "native": "mutex_attn.backends.native",
    "triton": "mutex_attn.backends.triton",
    "reference": "mutex_attn.backends.reference",
}
# Fastest first: "auto" picks the first available one for the inputs' device...
_AUTO_ORDER = {"cpu": ("native", "reference"), "cuda": ("native", "triton", "reference")}
# ...except where the benchmarks measured otherwise: (device, op, channels_last) -> order.
# H100, batch 32, the five ResNet-50 stage shapes (benchmarks/RESULTS.md, "GPU"):
#   mab on channels_last: triton 1.5-2.4x faster than native in all three cases measured;
#   fab: the eager reference beat both kernel backends in all ten (0.50-0.80x), whose
#     time there is the host's, for the gate network's ops (measured before the gate's fused
#     CUDA form, which cuts FAB's host ops by 40% and is not yet measured on a GPU).
# MutexAttention (what MA-Net uses): native beat triton in 11 of 12 cases, so the default.
_AUTO_EXCEPTIONS = {
    ("cuda", "mab", True): ("triton", "native", "reference"),
    ("cuda", "fab", False): ("reference", "native", "triton"),
    ("cuda", "fab", True): ("reference", "native", "triton"),
}
_HOW_TO_GET = {
    "native": "build the C++ extension with `pip install --no-build-isolation -e .` "
    "(add FORCE_CUDA=1 to build the CUDA kernels without a visible GPU)",
    "triton": "install triton (`pip install triton`) and run on a CUDA GPU, "
    "or set TRITON_INTERPRET=1 before importing to run the kernels on CPU (slow, for tests)",
    "reference": "",
}
BACKEND_NAMES = tuple(sorted(_MODULES))

_loaded: dict[str, ModuleType | str] = {}  # name -> module, or the import error text


def _load(name: str) -> ModuleType | str:
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except ImportError as err:  # a missing or stale build: keep the reason for the error
            _loaded[name] = f"it failed to import ({err})"
    return _loaded[name]


def preload() -> None:
    """Import the backends that are cheap to import (called once by `import mutex_attn`).

    A native build that exists but does not load (stale, built against another torch) is
    worth a warning now; a missing one is not (the reference backend works), and asking for
    "native" then says why it is unavailable and how to build it."""
    module = _load("native")
    if isinstance(module, str) and "is not built" not in module:
        warnings.warn(f"mutex_attn: the native backend is unavailable: {module}", RuntimeWarning, stacklevel=3)


def unavailable_reason(name: str, device: torch.device | str = "cpu") -> str | None:
    """Why backend `name` cannot run on `device`, or None when it can."""
    if check_backend_name(name) == "auto":
        raise ValueError("'auto' is a choice among backends, not a backend")
    module = _load(name)
    if isinstance(module, str):
        return module
    return module.unavailable_reason(torch.device(device))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on `device`, e.g. ['native', 'reference'] on CPU."""
    return sorted(name for name in _MODULES if unavailable_reason(name, device) is None)


def auto_order(device_type: str, op: str | None = None, channels_last: bool = False) -> tuple[str, ...]:
    """The backends "auto" tries for `op` on `device_type`, fastest first."""
    default = _AUTO_ORDER.get(device_type, ("reference",))
    return _AUTO_EXCEPTIONS.get((device_type, op, channels_last), default)


@torch.compiler.assume_constant_result
def _pick(backend: str, device_type: str, op: str | None = None, channels_last: bool = False) -> str:
    """The backend name to use (runs eagerly even under torch.compile: it imports modules)."""
    if backend == "auto":
        for name in auto_order(device_type, op, channels_last):
            if unavailable_reason(name, device_type) is None:
                return name
        raise AssertionError("the reference backend is always available")  # pragma: no cover
    reason = unavailable_reason(backend, device_type)
    if reason is not None:
        raise RuntimeError(
            f"backend {backend!r} is not available on {device_type}: {reason}. "
            f"To get it: {_HOW_TO_GET[backend]}. Available here: {available_backends(device_type)}."
        )
    return backend


def resolve(backend: str, device: torch.device, op: str | None = None, channels_last: bool = False) -> ModuleType:
    """The backend module to use for `op` ("mab", "fab", "mutex_attention") on tensors on
    `device` in that layout; a clear error when the named backend cannot run there."""
    return _loaded[_pick(backend, device.type, op, channels_last)]  # type: ignore[return-value]


def check_backend_name(backend: str) -> str:
    if backend != "auto" and backend not in _MODULES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKEND_NAMES} or 'auto'")
    return backend

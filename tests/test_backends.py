"""The backend registry: what is available, what "auto" picks, and the error for the rest."""
import types

import pytest
import torch

import mutex_attn as ma
from mutex_attn import backends


def test_reference_is_always_available():
    assert "reference" in ma.available_backends("cpu")
    assert "reference" in ma.available_backends(torch.device("cpu"))
    assert set(ma.available_backends("cpu")) <= set(ma.BACKEND_NAMES)


def test_auto_picks_the_first_available_in_speed_order():
    picked = backends.resolve("auto", torch.device("cpu"))
    first = next(n for n in backends._AUTO_ORDER["cpu"] if n in ma.available_backends("cpu"))
    assert picked is backends._load(first)


def test_unavailable_backend_says_why_and_how(monkeypatch):
    fake = types.SimpleNamespace(unavailable_reason=lambda device: "it was built without CUDA")
    monkeypatch.setitem(backends._loaded, "native", fake)
    assert "native" not in ma.available_backends("cpu")
    with pytest.raises(RuntimeError) as info:
        ma.mab(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2), backend="native")
    message = str(info.value)
    assert "'native' is not available on cpu: it was built without CUDA" in message
    assert "pip install --no-build-isolation -e ." in message and "FORCE_CUDA=1" in message
    # "auto" quietly falls back to the next backend.
    assert backends.resolve("auto", torch.device("cpu")) is not fake


def test_import_failure_becomes_the_reason(monkeypatch):
    monkeypatch.setitem(backends._MODULES, "native", "mutex_attn.no_such_module")
    monkeypatch.setattr(backends, "_loaded", {})  # restored after the test
    reason = backends.unavailable_reason("native", "cpu")
    assert reason.startswith("it failed to import") and "no_such_module" in reason


def test_stale_build_warns_at_import_but_a_missing_one_does_not(monkeypatch, recwarn):
    monkeypatch.setattr(backends, "_loaded", {"native": "it failed to import (the C++ extension "
                                                        "mutex_attn._C is not built; build it ...)"})
    backends.preload()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    monkeypatch.setattr(backends, "_loaded", {"native": "it failed to import (the built extension "
                                                        "mutex_attn._C is stale: it lacks ['x'])"})
    with pytest.warns(RuntimeWarning, match="native backend is unavailable.*stale"):
        backends.preload()


def test_auto_order_follows_the_gpu_measurements(monkeypatch):
    """On CUDA: native first, except MAB on channels_last (Triton) and FAB (the reference)."""
    order = backends.auto_order
    assert order("cuda", "mutex_attention", False) == order("cuda", "mutex_attention", True) == order("cuda")
    assert order("cuda", "mab", False)[0] == "native" and order("cuda", "mab", True)[0] == "triton"
    assert order("cuda", "fab", False)[0] == order("cuda", "fab", True)[0] == "reference"
    assert all(order("cpu", op, cl) == ("native", "reference")
               for op in ("mab", "fab", "mutex_attention") for cl in (False, True))
    # and resolve() follows it, falling back past what cannot run
    available = {"reference", "native"}
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device="cpu": None if name in available else "no")
    assert backends._pick("auto", "cuda", "mab", True) == "native"
    available.add("triton")
    assert backends._pick("auto", "cuda", "mab", True) == "triton"
    assert backends._pick("auto", "cuda", "fab", False) == "reference"

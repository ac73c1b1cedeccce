"""CPU: the compiled fast path of eager dense calls launches what the Python plan path launches.

The extension module is built against the running PyTorch (a C++ compiler and the Python headers are needed) and is
driven with CPU tensors and a stand-in launch function that records each launch's parameters.
"""

from __future__ import annotations

import ctypes
import importlib
import shutil

import pytest
import sparsek
import torch
from sparsek import _dense_plans, _lib, build

attention_module = importlib.import_module("sparsek.attention")
LAUNCH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
POINTERS = ("q", "k", "v", "o", "lse")


class _StandIn:
    """The kernel library: the Python plan path calls `sk_fmha_fwd`, the compiled one calls `address_of`'s address."""

    def __init__(self):
        self.python_calls, self.compiled_calls, self.code = [], [], 0
        self._launch = LAUNCH(self._compiled)

    def sk_fmha_fwd(self, params, stream):
        self.python_calls.append(_lib.SkFmhaParams.from_buffer_copy(params))
        return 0

    def _compiled(self, params, stream):
        self.compiled_calls.append(_lib.SkFmhaParams.from_buffer_copy(ctypes.string_at(params, _lib.FMHA_PARAMS.size)))
        return self.code

    def address_of(self, name):
        return ctypes.cast(self._launch, ctypes.c_void_p).value if name == "sk_fmha_fwd" else None


@pytest.fixture(scope="module")
def compiled_module():
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler to build the eager fast path")
    return build.build_eager_fastpath()


@pytest.fixture
def lib(compiled_module, monkeypatch):
    lib = _StandIn()
    monkeypatch.setattr(_lib, "load", lambda device: lib)
    monkeypatch.setattr(_lib, "current_stream", lambda device: ctypes.c_void_p(0))
    monkeypatch.setattr(attention_module, "_eager_cuda", lambda q, k, v: True)
    assert _dense_plans.enable_compiled(cpu_for_tests=True), _dense_plans.compiled_status
    yield lib
    _dense_plans.disable_compiled()
    _dense_plans.clear()


def _qkv(layout="bshd", dtype=torch.float16, b=2, s=37, h=4, hk=2, d=16):
    shape_q, shape_kv = ((b, s, h, d), (b, s + 5, hk, d)) if layout == "bshd" else ((b, h, s, d), (b, hk, s + 5, d))
    return torch.randn(shape_q, dtype=dtype), torch.randn(shape_kv, dtype=dtype), torch.randn(shape_kv, dtype=dtype)


def _fields(p, skip=POINTERS):
    return {name: getattr(p, name) for name, _ in _lib.SkFmhaParams._fields_ if name not in skip}


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("return_lse", [False, True])
def test_second_call_is_compiled_and_packs_the_same_parameters(lib, layout, return_lse):
    opts = dict(causal=True, scale=0.3, window=(5, 0), layout=layout, return_lse=return_lse)
    first = sparsek.attention(*_qkv(layout), **opts)
    q, k, v = _qkv(layout)
    second = sparsek.attention(q, k, v, **opts)
    assert len(lib.python_calls) == 1 and len(lib.compiled_calls) == 1
    p0, p1 = lib.python_calls[0], lib.compiled_calls[0]
    assert _fields(p1) == _fields(p0)
    out, lse = second if return_lse else (second, None)
    out0, lse0 = first if return_lse else (first, None)
    assert (out.shape, out.stride(), out.dtype, out.device) == (out0.shape, out0.stride(), out0.dtype, out0.device)
    assert (p1.q, p1.k, p1.v, p1.o) == (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr())
    if return_lse:
        assert isinstance(second, tuple) and (lse.shape, lse.dtype) == (lse0.shape, torch.float32)
        assert p1.lse == lse.data_ptr()
    else:
        assert isinstance(second, torch.Tensor) and p1.lse is None


def test_calls_it_does_not_recognise_take_the_python_path(lib):
    q, k, v = _qkv()
    sparsek.attention(q, k, v, scale=0.5, window=(3, 2))
    fast = _dense_plans.compiled_call
    assert fast(q, k, v, False, 0.5, (3, 2), "bshd", False) is not None
    grad = q.clone().requires_grad_()
    others = [
        (grad, k, v, False, 0.5, (3, 2), "bshd", False),  # autograd
        (torch.nn.Parameter(q), k, v, False, 0.5, (3, 2), "bshd", False),  # a Tensor subclass
        (q.float(), k, v, False, 0.5, (3, 2), "bshd", False),  # another dtype
        (q[:, :20], k, v, False, 0.5, (3, 2), "bshd", False),  # another shape
        (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, False, 0.5, (3, 2), "bshd", False),  # other strides
        (q, k, v, True, 0.5, (3, 2), "bshd", False),  # other options
        (q, k, v, False, None, (3, 2), "bshd", False),
        (q, k, v, False, 0.5, (3, 1), "bshd", False),
        (q, k, v, False, 0.5, [3, 2], "bshd", False),  # not plain values: never cached
        (q, k, v, False, torch.tensor(0.5), (3, 2), "bshd", False),
        (q, k, v, 0, 0.5, (3, 2), "bshd", False),
        (q, k, v, False, 0.5, (3, 2), "sbhd", False),
        (q, k, v, False, 0.5, (True, 2), "bshd", False),
        (q[0], k[0], v[0], False, 0.5, (3, 2), "bshd", False),  # 3-D
    ]
    for args in others:
        assert fast(*args) is None
    assert len(lib.compiled_calls) == 1


def test_int_scale_shares_the_float_plan(lib):
    q, k, v = _qkv()
    sparsek.attention(q, k, v, scale=1)
    sparsek.attention(q, k, v, scale=1.0)
    assert len(lib.python_calls) == 1 and len(lib.compiled_calls) == 1


def test_launch_error_raises(lib):
    q, k, v = _qkv()
    sparsek.attention(q, k, v)
    lib.code = 7
    with pytest.raises(RuntimeError, match=r"fmha forward failed: .*\(code 7\)"):
        sparsek.attention(q, k, v)


def test_bad_input_after_a_plan_still_raises(lib):
    q, k, v = _qkv()
    sparsek.attention(q, k, v)
    with pytest.raises(ValueError, match="same dtype"):
        sparsek.attention(q, k.to(torch.bfloat16), v)
    with pytest.raises(ValueError, match="layout"):
        sparsek.attention(q, k, v, layout="sbhd")
    with pytest.raises(ValueError, match="scale"):
        sparsek.attention(q, k, v, scale=-1.0)
    assert len(lib.python_calls) == 1 and not lib.compiled_calls


def test_clear_forgets_compiled_plans(lib):
    q, k, v = _qkv()
    sparsek.attention(q, k, v)
    _dense_plans.clear()
    assert _dense_plans.compiled_call(q, k, v, False, None, None, "bshd", False) is None
    sparsek.attention(q, k, v)
    assert len(lib.python_calls) == 2 and not lib.compiled_calls


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("SPARSEK_EAGER_FASTPATH", "0")
    assert not _dense_plans.enable_compiled() and "off" in _dense_plans.compiled_status
    assert _dense_plans.compiled_call is None


def test_active_python_modes_take_the_python_path(lib):
    """A TorchFunctionMode or TorchDispatchMode must see the allocation as the Python path makes it."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Functions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Dispatches(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    q, k, v = _qkv()
    sparsek.attention(q, k, v)
    args = (q, k, v, False, None, None, "bshd", False)
    for mode in (Functions(), Dispatches()):
        with mode:
            assert _dense_plans.compiled_call(*args) is None
    assert _dense_plans.compiled_call(*args) is not None


def test_a_failed_build_is_not_retried_until_forced(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a compiler that always fails
    with pytest.raises(build.BuildError, match="building sparsek's eager fast path failed"):
        build.build_eager_fastpath(root=tmp_path)
    with pytest.raises(build.BuildError, match="earlier build .* failed"):
        build.build_eager_fastpath(root=tmp_path)
    with pytest.raises(build.BuildError, match="building sparsek's eager fast path failed"):
        build.build_eager_fastpath(root=tmp_path, force=True)
    if shutil.which("c++") or shutil.which("g++"):
        monkeypatch.delenv("CXX")
        lib = build.build_eager_fastpath(root=tmp_path, force=True)
        assert lib.exists() and not list(tmp_path.glob("*.failed"))

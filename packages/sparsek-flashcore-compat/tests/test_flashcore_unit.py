"""Unit tests of the compat layer: layout guessing, routing, gradients, patching, warnings, lazy imports (CPU)."""

from __future__ import annotations

import importlib.metadata
import sys
import threading
import types
import warnings

import blackwell_sparsek
import flashcore
import pytest
import torch
import torch.nn.functional as F
from flashcore import _dispatch, _patch
from flashcore._functional import guess_layout, normalize_layout
from flashcore._warnings import _reset_for_tests
from sparsek.testing import rel_error

REAL_SDPA = F.scaled_dot_product_attention

# The legacy warnings are asserted explicitly (``record`` fixture); keep them out of the summary otherwise.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::flashcore.FlashcoreFallbackWarning"),
    pytest.mark.filterwarnings("ignore::flashcore.FlashcoreLayoutWarning"),
]


@pytest.fixture(autouse=True)
def _clean_state():
    _reset_for_tests()
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flashcore.unpatch_pytorch()
    F.scaled_dot_product_attention = REAL_SDPA
    _reset_for_tests()


@pytest.fixture
def record():
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        yield log


def _of(log, category, fragment=""):
    return [w for w in log if issubclass(w.category, category) and fragment in str(w.message)]


@pytest.fixture
def spy(monkeypatch):
    """Count which backend serves each call."""
    calls = {"sparsek": 0, "sdpa": 0}
    run_sparsek, torch_sdpa = _dispatch._run_sparsek, _dispatch.TORCH_SDPA

    def sparsek_spy(*args, **kwargs):
        calls["sparsek"] += 1
        return run_sparsek(*args, **kwargs)

    def sdpa_spy(*args, **kwargs):
        calls["sdpa"] += 1
        return torch_sdpa(*args, **kwargs)

    monkeypatch.setattr(_dispatch, "_run_sparsek", sparsek_spy)
    monkeypatch.setattr(_dispatch, "TORCH_SDPA", sdpa_spy)
    return calls


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- layout guessing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "policy", "expected"),
    [
        ((16, 8, 512, 64), "shape", ("bhsd", "differs-from-0.5")),
        ((16, 512, 8, 64), "shape", ("bshd", None)),
        ((2, 8, 8, 64), "shape", ("bhsd", "ambiguous")),
        ((1, 1, 32, 64), "shape", ("bhsd", "differs-from-0.5")),
        ((16, 8, 512, 64), "legacy", ("bshd", None)),
        ((16, 512, 8, 64), "legacy", ("bshd", None)),
        ((2, 8, 8, 64), "legacy", ("bhsd", "ambiguous")),
    ],
)
def test_guess_layout(shape, policy, expected):
    assert guess_layout(shape, policy) == expected


def test_guess_layout_env(monkeypatch):
    monkeypatch.setenv("FLASHCORE_LAYOUT_GUESS", "legacy")
    assert guess_layout((16, 8, 512, 64)) == ("bshd", None)
    monkeypatch.setenv("FLASHCORE_LAYOUT_GUESS", "bogus")
    with pytest.raises(ValueError, match="FLASHCORE_LAYOUT_GUESS"):
        guess_layout((16, 8, 512, 64))


def test_normalize_layout():
    assert [normalize_layout(x) for x in ("bhsd", "BHND", "bshd", "bnhd")] == ["bhsd", "bhsd", "bshd", "bshd"]
    with pytest.raises(ValueError, match="layout must be"):
        normalize_layout("sbhd")


def test_ambiguous_shape_warns_once_and_matches_sdpa(record):
    x = rand(2, 8, 8, 32)
    out1 = flashcore.attention(x, x, x)
    out2 = flashcore.attention(x, x, x)
    assert len(_of(record, flashcore.FlashcoreLayoutWarning, "ambiguous")) == 1
    assert rel_error(out1, REAL_SDPA(x, x, x)) < 1e-5 and torch.equal(out1, out2)


def test_explicit_layout_is_silent_and_honoured(record):
    q, k, v = (rand(2, 8, 8, 32, seed=s) for s in (1, 2, 3))  # ambiguous shape, read both ways
    bhsd = flashcore.attention(q, k, v, layout="bhsd")
    bshd = flashcore.attention(q, k, v, layout="bshd")
    assert not _of(record, flashcore.FlashcoreLayoutWarning)
    assert rel_error(bhsd, REAL_SDPA(q, k, v)) < 1e-5
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    assert rel_error(bshd, REAL_SDPA(qt, kt, vt).transpose(1, 2)) < 1e-5
    assert rel_error(bhsd, bshd) > 0.1  # the two readings really differ


def test_legacy_guess_reproduces_flashcore_05(monkeypatch):
    monkeypatch.setenv("FLASHCORE_LAYOUT_GUESS", "legacy")
    q = rand(2, 4, 16, 32)  # SDPA layout; 0.5 read it as [B, N=4, H=16, D]
    out = flashcore.attention(q, q, q)
    qt = q.transpose(1, 2)
    assert rel_error(out, REAL_SDPA(qt, qt, qt).transpose(1, 2)) < 1e-5


def test_layout_for_non_4d():
    q = rand(3, 16, 32)
    assert rel_error(flashcore.attention(q, q, q), REAL_SDPA(q, q, q)) < 1e-6
    with pytest.raises(ValueError, match="4-D"):
        flashcore.attention(q, q, q, layout="bshd")


# --- routing -----------------------------------------------------------------------------------------------------


def _case(name):
    q, k, v = rand(2, 4, 16, 32, seed=1), rand(2, 4, 16, 32, seed=2), rand(2, 4, 16, 32, seed=3)
    kw = {"layout": "bhsd"}
    if name == "plain":
        return (q, k, v), kw, "sparsek", None
    if name == "causal":
        return (q, k, v), {**kw, "is_causal": True}, "sparsek", None
    if name == "gqa":
        return (q, k[:, :2], v[:, :2]), kw, "sparsek", None
    if name == "mask":
        return (q, k, v), {**kw, "attn_mask": torch.ones(16, 16, dtype=torch.bool).tril()}, "sdpa", "attn_mask"
    if name == "dropout":
        return (q, k, v), {**kw, "dropout_p": 0.5}, "sdpa", "dropout"
    if name == "causal-unequal":
        return (q, rand(2, 4, 24, 32), rand(2, 4, 24, 32)), {**kw, "is_causal": True}, "sdpa", "top-left"
    if name == "v-head-dim":
        return (q, k, rand(2, 4, 16, 48)), kw, "sdpa", "value head dim"
    if name == "negative-scale":
        return (q, k, v), {**kw, "scale": -0.1}, "sdpa", "scale"
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name", ["plain", "causal", "gqa", "mask", "dropout", "causal-unequal", "v-head-dim", "negative-scale"]
)
def test_routing(name, spy, record):
    args, kwargs, backend, warning = _case(name)
    torch.manual_seed(0)
    out = flashcore.attention(*args, **kwargs)
    assert spy[backend] == 1 and spy["sparsek" if backend == "sdpa" else "sdpa"] == 0, spy
    fallbacks = _of(record, flashcore.FlashcoreFallbackWarning)
    if warning is None:
        assert not fallbacks
    else:
        assert len(fallbacks) == 1 and warning in str(fallbacks[0].message), [str(w.message) for w in fallbacks]
    q, k, v = args
    sdpa_kwargs = {key: val for key, val in kwargs.items() if key != "layout"}
    torch.manual_seed(0)
    ref = REAL_SDPA(q, k, v, **sdpa_kwargs, enable_gqa=q.shape[1] != k.shape[1])
    assert rel_error(out, ref) < 1e-5


def test_fallback_warning_once_per_reason(record):
    q = rand(1, 2, 8, 16)
    mask = torch.ones(8, 8, dtype=torch.bool)
    for _ in range(3):
        flashcore.attention(q, q, q, attn_mask=mask, layout="bhsd")
        flashcore.attention(q, q, q, dropout_p=0.1, layout="bhsd")
    assert len(_of(record, flashcore.FlashcoreFallbackWarning, "attn_mask")) == 1
    assert len(_of(record, flashcore.FlashcoreFallbackWarning, "dropout")) == 1


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "head_dim", "backend", "warning"),
    [
        (torch.float16, 64, "sparsek", None),
        (torch.bfloat16, 128, "sparsek", None),
        (torch.float16, 256, "sparsek", None),
        (torch.float32, 64, "sdpa", "float16/bfloat16, not float32"),
        (torch.float16, 80, "sdpa", "head dims"),
    ],
)
def test_cuda_routing(dtype, head_dim, backend, warning, spy, record):
    q, k, v = (rand(2, 4, 96, head_dim, seed=s).to("cuda", dtype) for s in (1, 2, 3))
    out = flashcore.attention(q, k, v, is_causal=True, layout="bhsd")
    assert spy[backend] == 1, spy
    fallbacks = _of(record, flashcore.FlashcoreFallbackWarning)
    assert [warning in str(w.message) for w in fallbacks] == ([True] if warning else [])
    ref = REAL_SDPA(q.float(), k.float(), v.float(), is_causal=True)
    assert rel_error(out, ref) < (2e-2 if dtype == torch.bfloat16 else 3e-3)


def test_meta_device_falls_back():
    reason = _dispatch.unsupported_reason(*(torch.empty(1, 2, 8, 64, device="meta"),) * 3, layout="bhsd")
    assert reason is not None and reason.key == "device-meta" and reason.warn


def test_kernel_unavailable_falls_back(monkeypatch, record):
    def unavailable(*args, **kwargs):
        raise _dispatch._KernelUnavailable("no nvcc")

    monkeypatch.setattr(_dispatch, "_run_sparsek", unavailable)
    q = rand(1, 2, 8, 16)
    out = flashcore.attention(q, q, q, layout="bhsd")
    assert rel_error(out, REAL_SDPA(q, q, q)) < 1e-6
    assert len(_of(record, flashcore.FlashcoreFallbackWarning, "unavailable (no nvcc)")) == 1


def test_fallback_warning_points_at_caller(record):
    q = rand(1, 2, 8, 16)
    flashcore.attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool), layout="bhsd")
    (w,) = _of(record, flashcore.FlashcoreFallbackWarning)
    assert w.filename == __file__


# --- gradients ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "causal", "kv_heads", "sk"),
    [("bhsd", False, 4, 6), ("bshd", True, 4, 6), ("bhsd", True, 2, 6), ("bshd", False, 1, 7)],
)
def test_gradcheck(layout, causal, kv_heads, sk):
    def shape(h, s):
        return (1, h, s, 4) if layout == "bhsd" else (1, s, h, 4)

    q = rand(*shape(4, 6), dtype=torch.float64, seed=1).requires_grad_()
    k = rand(*shape(kv_heads, sk), dtype=torch.float64, seed=2).requires_grad_()
    v = rand(*shape(kv_heads, sk), dtype=torch.float64, seed=3).requires_grad_()
    torch.autograd.gradcheck(
        lambda q, k, v: flashcore.attention(q, k, v, is_causal=causal, scale=0.4, layout=layout),
        (q, k, v),
        fast_mode=True,
    )


def test_forward_runs_on_sparsek_under_autograd(spy):
    q = rand(1, 2, 8, 16).requires_grad_()
    out = flashcore.attention(q, q.detach(), q.detach(), layout="bhsd")
    assert spy == {"sparsek": 1, "sdpa": 0} and out.grad_fn is not None
    out.sum().backward()
    assert spy["sdpa"] == 1 and q.grad is not None  # backward recomputed through SDPA


def test_only_requested_grads():
    q, k, v = rand(1, 2, 8, 16, seed=1).requires_grad_(), rand(1, 2, 8, 16, seed=2), rand(1, 2, 8, 16, seed=3)
    flashcore.attention(q, k, v, layout="bhsd").sum().backward()
    assert q.grad is not None and k.grad is None and v.grad is None


def test_no_grad_mode_skips_autograd_function():
    q = rand(1, 2, 8, 16).requires_grad_()
    with torch.no_grad():
        out = flashcore.attention(q, q, q, layout="bhsd")
    assert out.grad_fn is None


# --- patching ----------------------------------------------------------------------------------------------------


def test_patch_idempotent_and_restores(capsys, record):
    flashcore.patch_pytorch()
    fn = F.scaled_dot_product_attention
    flashcore.patch_pytorch()
    assert F.scaled_dot_product_attention is fn is not REAL_SDPA and flashcore.is_patched()
    assert _patch.original_sdpa() is REAL_SDPA
    flashcore.unpatch_pytorch()
    flashcore.unpatch_pytorch()
    assert F.scaled_dot_product_attention is REAL_SDPA and not flashcore.is_patched()
    assert capsys.readouterr() == ("", "")  # no prints
    assert len(_of(record, DeprecationWarning, "flashcore.patch_pytorch is deprecated")) == 1
    assert len(_of(record, DeprecationWarning, "flashcore.unpatch_pytorch is deprecated")) == 1


def test_patch_thread_safety():
    barrier = threading.Barrier(16)

    def hammer(i):
        barrier.wait()
        for _ in range(50):
            if i % 2:
                flashcore.patch_pytorch()
            else:
                with flashcore.patched():
                    assert flashcore.is_patched()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert flashcore.is_patched() and _patch.original_sdpa() is REAL_SDPA  # never wrapped twice
        barrier = threading.Barrier(16)
        threads = [threading.Thread(target=lambda: (barrier.wait(), flashcore.unpatch_pytorch())) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert F.scaled_dot_product_attention is REAL_SDPA


def test_patched_context_nesting():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with flashcore.patched():
            with flashcore.patched():
                assert flashcore.is_patched()
            assert flashcore.is_patched()
        assert not flashcore.is_patched()
        flashcore.patch_pytorch()
        with flashcore.patched():
            pass
        assert flashcore.is_patched()  # an explicit patch outlives the block


def test_patched_routing(spy, record):
    q, k, v = rand(2, 4, 16, 32, seed=1), rand(2, 4, 16, 32, seed=2), rand(2, 4, 16, 32, seed=3)
    with flashcore.patched():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert spy == {"sparsek": 1, "sdpa": 0}
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(16, 16, dtype=torch.bool))
        gqa = F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True)
        assert spy == {"sparsek": 2, "sdpa": 0}  # mask went to the original captured at patch time (not the spy)
        with pytest.raises(RuntimeError):  # uneven heads without enable_gqa: SDPA's own error
            F.scaled_dot_product_attention(q, k[:, :2], v[:, :2])
        three_d = F.scaled_dot_product_attention(q[0], k[0], v[0])
    assert rel_error(out, REAL_SDPA(q, k, v, is_causal=True)) < 1e-5
    assert rel_error(masked, REAL_SDPA(q, k, v)) < 1e-6
    assert rel_error(gqa, REAL_SDPA(q, k[:, :2], v[:, :2], enable_gqa=True)) < 1e-5
    assert rel_error(three_d, REAL_SDPA(q[0], k[0], v[0])) < 1e-6
    assert len(_of(record, flashcore.FlashcoreFallbackWarning, "attn_mask")) == 1
    assert len(_of(record, flashcore.FlashcoreFallbackWarning, "4-D")) == 1


def test_patch_falls_back_to_the_sdpa_it_replaced():
    seen = []

    def user_wrapper(*args, **kwargs):
        seen.append(kwargs.get("attn_mask") is not None)
        return REAL_SDPA(*args, **kwargs)

    F.scaled_dot_product_attention = user_wrapper
    q = rand(1, 2, 8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flashcore.patch_pytorch()
        F.scaled_dot_product_attention(q, q, q)
        F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool))
        flashcore.unpatch_pytorch()
    assert seen == [True] and F.scaled_dot_product_attention is user_wrapper


def test_unpatch_leaves_a_later_replacement(record):
    flashcore.patch_pytorch()

    def other(*args, **kwargs):
        return REAL_SDPA(*args, **kwargs)

    F.scaled_dot_product_attention = other
    flashcore.unpatch_pytorch()
    assert F.scaled_dot_product_attention is other
    assert len(_of(record, RuntimeWarning, "replaced by someone else")) == 1


def test_patched_sdpa_gradients():
    q = rand(1, 2, 8, 16, dtype=torch.float64).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with flashcore.patched():
            torch.autograd.gradcheck(
                lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True), (q,), fast_mode=True
            )


# --- deprecations, version, module, lazy imports -----------------------------------------------------------------


def test_each_entry_point_deprecates_once(record):
    q = rand(1, 2, 8, 64)
    for _ in range(2):
        flashcore.attention(q, q, q, layout="bhsd")
        flashcore.build_baseline().forward(q, q, q)
        flashcore.FlashCoreAttention(64, 2)
        blackwell_sparsek.attention_forward(q, q, q)
    for old, new in (
        ("flashcore.attention", "sparsek.attention(q, k, v"),
        ("flashcore.build_baseline", "sparsek.attention(Q, K, V, layout='bhsd')"),
        ("flashcore.FlashCoreAttention", "sparsek.attention(q, k, v, layout='bshd')"),
        ("blackwell_sparsek.attention_forward", "sparsek.attention(q, k, v, causal="),
    ):
        hits = _of(record, DeprecationWarning, f"{old} is deprecated; use {new}")
        assert len(hits) == 1, (old, [str(w.message) for w in record])
        assert hits[0].filename == __file__


def test_versions():
    from flashcore import _version

    assert flashcore.__version__ == f"0.5.0+sparsek.compat.{_version.__version__}"
    assert blackwell_sparsek.__version__ == f"0.1.0+sparsek.compat.{_version.__version__}"
    assert importlib.metadata.version("sparsek-flashcore-compat") == _version.__version__


def test_torch_ops_module_path():
    from flashcore.torch_ops import FlashCoreAttention, FlashCoreAttentionFunction, attention

    q = rand(1, 2, 8, 16)
    assert FlashCoreAttention is flashcore.FlashCoreAttention and attention is flashcore.attention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = FlashCoreAttentionFunction.apply(q, q, q, None, 0.0, True, None)
    assert rel_error(out, REAL_SDPA(q, q, q, is_causal=True)) < 1e-5


def test_module_argument_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AssertionError, match="divisible"):
            flashcore.FlashCoreAttention(100, 3)
        m = flashcore.FlashCoreAttention(32, 2)
        with pytest.raises(ValueError, match="2-D"):
            m(rand(1, 2, 3, 32), rand(1, 2, 3, 32), rand(1, 2, 3, 32))


def test_module_pickled_by_flashcore_05_loads():
    import pickle

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = flashcore.FlashCoreAttention(32, 2).eval()
        state = dict(m.__getstate__())
        del state["batch_first"]  # 0.5's module had no such attribute
        old = flashcore.torch_ops.FlashCoreAttention.__new__(flashcore.torch_ops.FlashCoreAttention)
        old.__setstate__(state)
        restored = pickle.loads(pickle.dumps(old))
        x = rand(6, 2, 32)
        assert torch.equal(restored(x, x, x)[0], m(x, x, x)[0])


def test_attention_forward_positional_scale():
    q = rand(1, 2, 8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rel_error(blackwell_sparsek.attention_forward(q, q, q, 0.3), REAL_SDPA(q, q, q, scale=0.3)) < 1e-5
        with pytest.raises(TypeError, match="causal"):
            blackwell_sparsek.attention_forward(q, q, q, 0.3, 0.2)


@pytest.mark.parametrize("namespace", ["blackwell_sparsek", "blackwell_sparsek.backends"])
@pytest.mark.parametrize(
    ("name", "module", "dist"),
    [
        ("SparseKAttention", "sparsek_xformers", "sparsek-xformers"),
        ("SparseKBackend", "sparsek_vllm", "sparsek-vllm"),
        ("register_vllm_backend", "sparsek_vllm", "sparsek-vllm"),
    ],
)
def test_lazy_names_missing_package(monkeypatch, namespace, name, module, dist):
    ns = importlib.import_module(namespace)
    monkeypatch.delitem(ns.__dict__, name, raising=False)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=f"pip install {dist}"):
        getattr(ns, name)
    with pytest.raises(ImportError, match=f"{namespace}.{name} now lives in the '{dist}' package"):
        exec(f"from {namespace} import {name}", {})


def test_lazy_names_missing_framework(monkeypatch):
    fake = types.ModuleType("sparsek_vllm")

    def missing(attr):
        raise ImportError("sparsek_vllm.SparsekAttentionBackend needs vLLM (>=0.32,<0.34)")

    fake.__getattr__ = missing  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "sparsek_vllm", fake)
    monkeypatch.delitem(blackwell_sparsek.__dict__, "SparseKBackend", raising=False)
    with pytest.raises(ImportError, match=r"needs vLLM.*pip install sparsek-vllm"):
        blackwell_sparsek.SparseKBackend  # noqa: B018


def test_lazy_names_resolve(monkeypatch, record):
    sentinel = type("SparseKAttention", (), {})
    monkeypatch.setitem(sys.modules, "sparsek_xformers", types.SimpleNamespace(SparseKAttention=sentinel))
    monkeypatch.delitem(blackwell_sparsek.__dict__, "SparseKAttention", raising=False)
    from blackwell_sparsek.backends import SparseKAttention

    assert SparseKAttention is sentinel and blackwell_sparsek.backends.SparseKAttention is sentinel
    hits = _of(record, DeprecationWarning, "blackwell_sparsek.backends.SparseKAttention is deprecated")
    assert len(hits) == 1 and "sparsek_xformers.SparseKAttention" in str(hits[0].message)
    monkeypatch.delitem(blackwell_sparsek.backends.__dict__, "SparseKAttention")


def test_unknown_attribute_and_star_import():
    assert not hasattr(blackwell_sparsek, "does_not_exist")
    assert not hasattr(blackwell_sparsek.backends, "does_not_exist")
    namespace: dict = {}
    exec("from blackwell_sparsek import *", namespace)
    assert "attention_forward" in namespace and "SparseKAttention" not in namespace

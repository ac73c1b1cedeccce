"""CPU: architecture dispatch (mocked capability), the ninja build description, cache keys, the lock, fake impls."""

from __future__ import annotations

import ctypes
import math
import multiprocessing as mp
import os
import re
import time
from pathlib import Path

import pytest
import sparsek
import torch
from sparsek import _lib, arch, build


@pytest.mark.parametrize(
    "cap,target,note",
    [
        ((9, 0), "sm90a", "Hopper"),
        ((10, 0), "sm100a", "portable"),
        ((8, 6), "sm86", "portable"),
        ((12, 0), "sm120", ""),
    ],
)
def test_target_for_capability(cap, target, note):
    choice = arch.target_for_capability(cap)
    assert choice.target == target
    assert note in choice.note


def test_old_gpu_is_refused():
    with pytest.raises(RuntimeError, match="compute capability 8.0 or newer"):
        arch.target_for_capability((7, 5))


def test_device_choice_uses_capability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert arch.device_choice().target == "sm90a"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert arch.device_choice().target == "sm100a"


def test_gencode_flags():
    assert arch.gencode_flag("sm90a") == "-gencode=arch=compute_90a,code=sm_90a"
    assert arch.gencode_flag("sm100a") == "-gencode=arch=compute_100a,code=sm_100a"
    assert arch.gencode_flag("sm86") == "-gencode=arch=compute_86,code=sm_86"
    with pytest.raises(ValueError, match="unknown architecture"):
        arch.gencode_flag("hopper")


def test_ninja_file_lists_every_source_and_the_gencode(tmp_path):
    srcs = [tmp_path / "a.cu", tmp_path / "b.cu"]
    spec = build.BuildSpec(target="sm90a", cuda="13.0", src_hash="abc")
    text = build.ninja_file(spec, "/opt/nvcc", srcs)
    assert "build a.o: cu " + str(srcs[0]) in text
    assert "build b.o: cu " + str(srcs[1]) in text
    assert f"build {build.LIB_NAME}: link a.o b.o" in text
    assert "-gencode=arch=compute_90a,code=sm_90a" in text
    assert "nvcc = /opt/nvcc" in text


def test_cache_key_changes_with_every_input(tmp_path):
    base = build.BuildSpec(target="sm90a", cuda="13.0", src_hash="h1", version="0.1.0")
    keys = {
        base.key,
        build.BuildSpec("sm100a", "13.0", "h1", "0.1.0").key,
        build.BuildSpec("sm90a", "12.8", "h1", "0.1.0").key,
        build.BuildSpec("sm90a", "13.0", "h2", "0.1.0").key,
        build.BuildSpec("sm90a", "13.0", "h1", "0.2.0").key,
    }
    assert len(keys) == 5
    assert base.directory(tmp_path) == tmp_path / "0.1.0-h1-cuda13.0-sm90a"


def test_source_hash_tracks_content(tmp_path):
    (tmp_path / "k.cu").write_text("int x;")
    h1 = build.source_hash(tmp_path)
    (tmp_path / "k.cuh").write_text("// header")
    h2 = build.source_hash(tmp_path)
    (tmp_path / "k.cu").write_text("int y;")
    assert len({h1, h2, build.source_hash(tmp_path)}) == 3


def test_packaged_sources_exist():
    names = {p.name for p in build.sources()}
    assert "fmha_fwd.cu" in names


def test_kernels_use_the_single_instruction_exp2():
    """Softmax exponentials go through ``sparsek_math::fast_exp2`` (one ``MUFU.EX2``): a plain ``exp2f``/``expf``
    without fast-math compiles to four instructions per score (PERF_NOTES v20)."""
    slow = re.compile(r"(?<![\w:])(exp2f|expf|exp2|exp)\s*\(")  # the fast intrinsic __expf is fine
    csrc = Path(sparsek.__file__).parent / "csrc"
    for src in sorted(csrc.glob("*.cu*")):
        code = "\n".join(line.split("//")[0] for line in src.read_text().splitlines())
        found = slow.search(code)
        assert found is None, f"{src.name} calls {found.group(1)}; use sparsek_math::fast_exp2"


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEK_CACHE_DIR", str(tmp_path / "c"))
    assert build.cache_root() == tmp_path / "c"
    assert build.built_targets() == []
    (tmp_path / "c" / "k1").mkdir(parents=True)
    (tmp_path / "c" / "k1" / build.LIB_NAME).write_bytes(b"")
    assert build.built_targets() == ["k1"]


def _hold_lock(path: str, seconds: float) -> None:
    with build._FileLock(Path(path)):
        time.sleep(seconds)


def test_lock_excludes_and_is_released_when_holder_dies(tmp_path):
    lock = tmp_path / "x.lock"
    ctx = mp.get_context("spawn")
    holder = ctx.Process(target=_hold_lock, args=(str(lock), 60))
    holder.start()
    time.sleep(2.0)  # let it take the lock
    t0 = time.time()
    holder.kill()  # a killed build must not leave a stale lock
    holder.join()
    with build._FileLock(lock):
        pass
    assert time.time() - t0 < 10


def test_build_without_nvcc_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    with pytest.raises(build.BuildError, match="nvcc not found"):
        build.build("sm90a")


def test_kernel_unavailable_message(monkeypatch):
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    _lib._libs.pop("sm90a", None)
    with pytest.raises(_lib.KernelUnavailable, match="SPARSEK_ALLOW_FALLBACK"):
        _lib.load(torch.device("cuda", 0))


def test_fallback_flag(monkeypatch):
    monkeypatch.setenv("SPARSEK_ALLOW_FALLBACK", "1")
    assert _lib.fallback_allowed()
    monkeypatch.setenv("SPARSEK_ALLOW_FALLBACK", "0")
    assert not _lib.fallback_allowed()


def test_params_struct_matches_header():
    """Every field of the C struct appears in the ctypes mirror, in order."""
    import re

    header = (Path(sparsek.__file__).parent / "csrc" / "sparsek_abi.h").read_text()
    body = header[header.index("typedef struct {") : header.index("} SkFmhaParams;")]
    body = re.sub(r"//[^\n]*", "", body)
    names = []
    for decl in body.split(";"):
        decl = decl.strip()
        if not decl or decl.startswith("typedef"):
            decl = decl.replace("typedef struct {", "").strip()
            if not decl:
                continue
        parts = decl.replace("*", " ").split()
        names += [n.strip(",") for n in " ".join(parts[1:]).split(",") if n.strip()]
    names = [n.split()[-1] for n in names]
    assert names == [f[0] for f in _lib.SkFmhaParams._fields_]


def test_params_packing_matches_ctypes_layout():
    """The struct-packed parameters the kernels receive are byte-identical to the ctypes mirror of the C struct."""
    fields = _lib.SkFmhaParams._fields_
    values = []
    for i, (_, typ) in enumerate(fields):
        if typ is ctypes.c_float:
            values.append(0.125)
        elif typ is ctypes.c_void_p:
            values.append(0x1000 * (i + 1))
        else:
            values.append(-3 * i - 1 if i % 2 else 7 * i + 2)
    assert _lib.FMHA_PARAMS.pack(*values) == bytes(_lib.SkFmhaParams(*values))


def test_fake_impl_under_compile_and_opcheck():
    q = torch.randn(2, 7, 4, 16)
    k = torch.randn(2, 9, 2, 16)
    torch.library.opcheck(torch.ops.sparsek.fmha_fwd.default, (q, k, k.clone(), None, None, 7, 9, 0.25, -1, 0, True))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    qv = torch.randn(7, 4, 16)
    torch.library.opcheck(
        torch.ops.sparsek.fmha_fwd.default, (qv, qv.clone(), qv.clone(), cu, cu, 4, 4, 0.25, 2, -1, True)
    )
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fq = torch.empty(2, 7, 4, 16)
        fk = torch.empty(2, 9, 2, 16)
        out, lse = torch.ops.sparsek.fmha_fwd(fq, fk, fk, None, None, 7, 9, 0.25, -1, -1, True)
        assert out.shape == (2, 7, 4, 16) and lse.shape == (2, 4, 7)
    f = torch.compile(lambda a, b, c: sparsek.attention(a, b, c, causal=True, return_lse=True), fullgraph=True)
    o1, l1 = f(q, k, k)
    o2, l2 = sparsek.attention(q, k, k, causal=True, return_lse=True)
    assert torch.allclose(o1, o2) and torch.allclose(l1, l2)


def test_nothing_compiled_at_import():
    code = "import sparsek, sparsek._lib as l; assert not l._libs; print('ok')"
    import subprocess
    import sys

    env = dict(os.environ, SPARSEK_CACHE_DIR="/nonexistent/sparsek-cache")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_launches_make_the_tensors_device_current(monkeypatch):
    """With several GPUs, a launch for a tensor on another GPU than the current one switches devices around it."""
    monkeypatch.setattr(_lib, "_current_device_index", lambda: 0)
    same = _lib.on_device(torch.device("cuda", 0))
    assert same is _lib.on_device(torch.device("cuda")) is _lib.on_device(torch.device("cpu"))
    with same:  # a reusable no-op
        pass
    other = _lib.on_device(torch.device("cuda", 1))
    assert isinstance(other, torch.cuda.device) and other.idx == 1


def test_fmha_launch_switches_devices_only_for_another_gpu(monkeypatch):
    """The eager FMHA launch makes the tensors' GPU current around the call only when another GPU is current."""
    entered = []

    class _Device:  # records what torch.cuda.device would make current
        def __init__(self, idx):
            self.idx = idx

        def __enter__(self):
            entered.append(self.idx)

        def __exit__(self, *exc):
            entered.append(-1)

    monkeypatch.setattr(torch.cuda, "device", _Device)
    monkeypatch.setattr(_lib, "_current_device_index", lambda: 0)
    monkeypatch.setattr(_lib, "current_stream", lambda device: None)
    lib = _CaptureLaunch()
    params = _lib.FMHA_PARAMS.pack(*([0] * len(_lib.SkFmhaParams._fields_)))
    _lib.launch_fmha(lib, torch.device("cuda", 0), params)
    assert entered == [] and lib.params is not None
    lib.params = None
    _lib.launch_fmha(lib, torch.device("cuda", 1), params)
    assert entered == [1, -1] and lib.params is not None


class _CaptureLaunch:
    """Stands in for the CUDA library: keeps the parameters of the last FMHA launch, decoded."""

    params = None

    def sk_fmha_fwd(self, params, stream):
        self.params = _lib.SkFmhaParams.from_buffer_copy(params)
        return 0


def _launch_params(monkeypatch, q, k, v, out, lse, **kw):
    lib = _CaptureLaunch()
    monkeypatch.setattr(_lib, "load", lambda device: lib)
    monkeypatch.setattr(_lib, "current_stream", lambda device: ctypes.c_void_p(0))
    args = dict(cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, block_table=None, window_left=-1)
    args.update(kw)
    _lib.fmha_fwd(q, k, v, out, lse, **args)
    return lib.params


def _assert_rows(p, name, t, batch_stride):
    assert (
        getattr(p, f"{name}_batch_stride"),
        getattr(p, f"{name}_row_stride"),
        getattr(p, f"{name}_head_stride"),
    ) == (
        batch_stride,
        t.stride(-3),
        t.stride(-2),
    )


def test_launch_params_dense_views_gqa(monkeypatch):
    """The packed launch parameters carry each tensor's own pointer, strides and sizes (here non-contiguous views)."""
    q = torch.randn(2, 4, 7, 16, dtype=torch.bfloat16).transpose(1, 2)  # [B, S, H, D] view of a [B, H, S, D] tensor
    k = torch.randn(2, 9, 2, 16, dtype=torch.bfloat16)
    v = torch.randn(2, 2, 9, 16, dtype=torch.bfloat16).transpose(1, 2)
    out, lse = torch.empty_like(q), torch.empty(2, 4, 7)
    p = _launch_params(
        monkeypatch, q, k, v, out, lse, max_seqlen_q=7, max_seqlen_k=9, scale=0.25, window_left=3, window_right=0
    )
    assert (p.q, p.k, p.v, p.o, p.lse) == (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr())
    for name, t in (("q", q), ("k", k), ("v", v), ("o", out)):
        _assert_rows(p, name, t, t.stride(0))
    assert (p.lse_batch_stride, p.lse_head_stride) == lse.stride()[:2]
    assert (p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k, p.head_dim) == (2, 4, 2, 7, 9, 16)
    assert (p.total_q, p.total_k, p.window_left, p.window_right, p.is_bf16) == (7, 9, 3, 0, 1)
    assert p.scale_log2 == pytest.approx(0.25 / math.log(2.0))
    assert (p.cu_seqlens_q, p.cu_seqlens_k, p.block_table, p.kv_indices, p.kv_intervals) == (None,) * 5


def test_launch_params_varlen_without_lse(monkeypatch):
    q = torch.randn(11, 4, 16, dtype=torch.float16)
    k = v = torch.randn(13, 1, 16, dtype=torch.float16)
    cu_q, cu_k = torch.tensor([0, 5, 11], dtype=torch.int32), torch.tensor([0, 0, 13], dtype=torch.int32)
    out = torch.empty_like(q)
    p = _launch_params(
        monkeypatch, q, k, v, out, None, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=6, max_seqlen_k=13,
        scale=0.5, window_right=-1,
    )  # fmt: skip
    for name, t in (("q", q), ("k", k), ("v", v), ("o", out)):
        _assert_rows(p, name, t, 0)
    assert (p.cu_seqlens_q, p.cu_seqlens_k) == (cu_q.data_ptr(), cu_k.data_ptr())
    assert (p.lse, p.lse_batch_stride, p.lse_head_stride) == (None, 0, 0)
    assert (p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k, p.total_q, p.total_k) == (2, 4, 1, 6, 13, 11, 13)
    assert p.is_bf16 == 0

"""The CPU emulator of Gluon kernels (``dldna.kernels.gluon_emulator``), and the FA3-style Gluon FlashAttention
kernels (``dldna.kernels.flash_gluon``) run through it against the float64 reference.

The emulator is what lets the CPU-only CI test Gluon kernels at all: Triton's interpreter cannot run them. So its
own rules are tested first (C division, int32 overflow, bounds, deadlocks), then the three kernels on small odd
shapes under several schedules, then mutated copies of the forward kernel, each of which must fail.
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import mbarrier  # noqa: E402

from dldna.attention.reference import attention  # noqa: E402
from dldna.kernels import gluon_emulator as emulator  # noqa: E402
from dldna.kernels.flash_gluon import dkdv as gluon_fa3_dkdv  # noqa: E402
from dldna.kernels.flash_gluon import dq as gluon_fa3_dq  # noqa: E402
from dldna.kernels.flash_gluon import forward as gluon_fa3_forward  # noqa: E402
from benchmarks.experiments.gluon_fa3_forward import VARIANTS  # noqa: E402 - the forward variants that were timed

# (schedule, copies): the loader first with copies landing at once (a producer that overwrites a slot too early
# shows), and random switches with copies landing only at their barrier's wait (a consumer that reads too early)
SETTINGS = [("last", "eager"), ("random", "lazy")]
BF16_BOUND = 1.5e-2  # relative Frobenius error against float64, as tests/test_flash_attention.py's BOUNDS


@gluon.jit
def _integer_ops(out_ptr, a, b):
    gl.store(out_ptr, a // b)
    gl.store(out_ptr + 1, a % b)
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    lanes = gl.arange(0, 4, layout) - 2  # -2 -1 0 1
    gl.store(out_ptr + 2 + gl.arange(0, 4, layout), lanes * 7 // 3)
    gl.store(out_ptr + 6 + gl.arange(0, 4, layout), lanes * 7 % 3)


@gluon.jit
def _product(out_ptr, a, b):
    gl.store(out_ptr, a * b)


@gluon.jit
def _load_at(out_ptr, src_ptr, offset, n):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    lanes = offset + gl.arange(0, 4, layout)
    gl.store(out_ptr + gl.arange(0, 4, layout), gl.load(src_ptr + lanes, mask=lanes < n))


@gluon.jit
def _waits_forever(out_ptr):
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    mbarrier.wait(bar, 0)  # nobody arrives
    gl.store(out_ptr, 1.0)


def test_runtime_integers_divide_as_c_and_constexprs_as_python():
    out = torch.zeros(10, dtype=torch.int32)
    emulator.launch(_integer_ops, (1,), out, -7, 2)
    assert out[:2].tolist() == [-3, -1]  # C: truncated towards zero (Python would give -4, 1)
    assert out[2:6].tolist() == [-4, -2, 0, 2]  # -14 // 3, -7 // 3, ...
    assert out[6:].tolist() == [-2, -1, 0, 1]


def test_int32_overflow_raises_instead_of_wrapping():
    out = torch.zeros(1, dtype=torch.int32)
    emulator.launch(_product, (1,), out, 46340, 46340)
    assert out.item() == 46340 ** 2
    with pytest.raises(OverflowError, match="int32 overflow"):
        emulator.launch(_product, (1,), out, 46341, 46341)


def test_loads_raise_out_of_bounds_and_masked_lanes_read_nan():
    src = torch.arange(6, dtype=torch.float32)
    out = torch.zeros(4)
    emulator.launch(_load_at, (1,), out, src, 4, 6)
    assert out[:2].tolist() == [4.0, 5.0] and out[2:].isnan().all()  # masked off without ``other``: undefined
    with pytest.raises(IndexError, match="src_ptr"):
        emulator.launch(_load_at, (1,), out, src, 4, 8)  # the mask lets lanes 6 and 7 through


def test_a_wait_that_nothing_completes_is_a_deadlock_not_a_hang():
    with pytest.raises(emulator.DeadlockError, match="phase 0"):
        emulator.launch(_waits_forever, (2,), torch.zeros(1))


def test_launch_rejects_unknown_settings():
    with pytest.raises(ValueError, match="schedule"):
        emulator.launch(_product, (1,), torch.zeros(1, dtype=torch.int32), 1, 1, schedule="fifo")
    with pytest.raises(ValueError, match="copies"):
        emulator.launch(_product, (1,), torch.zeros(1, dtype=torch.int32), 1, 1, copies="never")
    with pytest.raises(TypeError, match="Gluon JIT function"):
        emulator.launch(lambda: None, (1,))


def _inputs(b, h, n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for _ in range(4))
    return q.bfloat16(), k.bfloat16(), v.bfloat16(), grad


def _reference(q, k, v, grad, window):
    n = q.shape[2]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    mask = (j <= i) if window is None else (j <= i) & (i - j < window)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out, lse = attention(q64, k64, v64, mask=mask, return_lse=True)
    return out.detach(), lse.detach(), torch.autograd.grad(out, (q64, k64, v64), grad)


def _rel(x, ref):
    x = x.double()
    assert torch.isfinite(x).all(), "non-finite values in the result"
    return ((x - ref).norm() / ref.norm()).item()


FORWARD_CASES = [(64, 3, 384, None), (64, 3, 384, 100), (64, 1, 256, 1), (128, 1, 256, 129), (128, 1, 256, None)]


@pytest.mark.parametrize("schedule,copies", SETTINGS)
@pytest.mark.parametrize("d,h,n,window", FORWARD_CASES)
def test_gluon_forward_variants_match_float64(d, h, n, window, schedule, copies):
    q, k, v, grad = _inputs(2, h, n, d, seed=d + n + (window or 0))
    ref, ref_lse, _ = _reference(q, k, v, grad, window)
    for name, kwargs in VARIANTS.items():
        if gluon_fa3_forward._build_problem(d, kwargs.get("consumers", 2), kwargs.get("stages", 2),
                                            kwargs.get("persistent")):
            continue
        with emulator.options(schedule=schedule, copies=copies, seed=n):
            out, lse = gluon_fa3_forward.fa3_forward(q, k, v, window=window, poison=True, **kwargs)
        assert _rel(out, ref) < BF16_BOUND, name
        assert (lse.double() - ref_lse).abs().max().item() < 1e-4, name


@pytest.mark.parametrize("schedule,copies", SETTINGS)
@pytest.mark.parametrize("d,window,keys,dkdv_variant", [(64, None, 64, (2, 2)), (64, 100, 128, (3, 1)),
                                                       (128, 129, 64, (2, 1)), (128, 2, 64, (3, 2))])
def test_gluon_backward_kernels_match_float64(d, window, keys, dkdv_variant, schedule, copies):
    q, k, v, grad = _inputs(1, 3, 256, d, seed=d + (window or 0))
    _, _, (dq_ref, dk_ref, dv_ref) = _reference(q, k, v, grad, window)
    with emulator.options(schedule=schedule, copies=copies, seed=keys):
        out, lse = gluon_fa3_forward.fa3_forward(q, k, v, window=window)
        dq, lse2, delta = gluon_fa3_dq.fa3_dq(q, k, v, out, lse, grad.bfloat16(), window=window, keys=keys)
        stages, consumers = dkdv_variant
        dk, dv = gluon_fa3_dkdv.fa3_dkdv(q, k, v, grad.bfloat16(), lse2, delta, window=window, stages=stages,
                                         consumers=consumers)
    for got, ref in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        assert _rel(got, ref) < 2 * BF16_BOUND
    assert torch.allclose(lse2, lse * math.log2(math.e), atol=1e-5)


# Mutations of the forward kernel's source, each a real synchronisation or indexing bug
MUTATIONS = {
    "the loader does not wait for a free K slot": (
        "            mbarrier.wait(k_empty.index(s), phase ^ 1)\n", ""),
    "the loader waits on the wrong phase of a V slot": (
        "            mbarrier.wait(v_empty.index(s), phase ^ 1)\n",
        "            mbarrier.wait(v_empty.index(s), phase)\n"),
    "a consumer releases V before its P @ V product is done": (
        "                acc = warpgroup_mma_wait(0, deps=[o_tok])\n"
        "                mbarrier.arrive(v_empty.index(sp))",
        "                mbarrier.arrive(v_empty.index(sp))\n"
        "                acc = warpgroup_mma_wait(0, deps=[o_tok])"),
    "a consumer reads K before it has landed": (
        "                mbarrier.wait(k_ready.index(s), (c // STAGES) & 1)\n", ""),
    "the output store is never waited for": (
        "    tma.store_wait(0)\n\n\n@gluon.jit\ndef _fa3_fwd", "\n\n\n@gluon.jit\ndef _fa3_fwd"),
    "the loader drops the last key tile": (
        "        for j in range(lo, hi):\n            c = taken + j - lo\n            s = c % STAGES\n"
        "            phase = (c // STAGES) & 1\n            mbarrier.wait(k_empty",
        "        for j in range(lo, hi - 1):\n            c = taken + j - lo\n            s = c % STAGES\n"
        "            phase = (c // STAGES) & 1\n            mbarrier.wait(k_empty"),
}


def _mutated_forward(tmp_path, old, new):
    source = open(gluon_fa3_forward.__file__).read()
    assert source.count(old) == 1, old
    path = tmp_path / "mutated_forward.py"
    path.write_text(source.replace(old, new))
    spec = importlib.util.spec_from_file_location("mutated_forward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_each_mutated_forward_fails_under_some_schedule(mutation, tmp_path):
    """Every bug must show under one of the settings: an error of the emulator or a wrong result."""
    module = _mutated_forward(tmp_path, *MUTATIONS[mutation])
    q, k, v, grad = _inputs(1, 2, 384, 64, seed=5)
    ref, _, _ = _reference(q, k, v, grad, None)
    outcomes = []
    for schedule, copies in [("last", "eager"), ("random", "eager"), ("first", "lazy")]:
        try:
            with emulator.options(schedule=schedule, copies=copies, seed=1):
                out, _ = module.fa3_forward(q, k, v, poison=True)
            outcomes.append("wrong" if not _rel(out, ref) < BF16_BOUND else "passed")
        except (emulator.DeadlockError, emulator.HazardError, AssertionError) as error:
            outcomes.append(type(error).__name__)
    assert any(o != "passed" for o in outcomes), outcomes


def test_unmutated_forward_passes_the_same_settings(tmp_path):
    module = _mutated_forward(tmp_path, "def _fa3_fwd(", "def _fa3_fwd(")
    q, k, v, grad = _inputs(1, 2, 384, 64, seed=5)
    ref, _, _ = _reference(q, k, v, grad, None)
    for schedule, copies in [("last", "eager"), ("random", "eager"), ("first", "lazy")]:
        with emulator.options(schedule=schedule, copies=copies, seed=1):
            out, _ = module.fa3_forward(q, k, v, poison=True)
        assert _rel(out, ref) < BF16_BOUND

# ---- public ops: sequence_logprobs and fused_linear_sequence_logprobs
import pytest
import torch

import rationale_kernels as rk
from rationale_kernels import _native
from rationale_kernels.reference import sequence_logprobs as seq_ref
from rationale_kernels.testing import assert_idiom

OP_BACKENDS = (
    ["torch"]
    + (["cpu"] if _native.has_cpu() else [])
    + (["triton"] if _native.has_triton() else [])
)
NATIVE = [b for b in OP_BACKENDS if b != "torch"]


def _padded(B, T, V, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, : T // 2] = -100  # a prompt
    if B > 2:
        y[2] = -100  # a sequence with no valid token
    return z, y


def _value_and_grad(fn, x, upstream):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    (g,) = torch.autograd.grad((out * upstream).sum(), x)
    return out.detach(), g


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("average", [False, True])
def test_padded_matches_reference(backend, dtype, average):
    V = 1000 if backend == "triton" else 32003
    z, y = _padded(4, 9, V, dtype)
    up = torch.tensor([1.0, -2.0, 0.5, 3.0])
    out, g = _value_and_grad(
        lambda x: rk.sequence_logprobs(x, y, average=average, backend=backend), z, up
    )
    assert out.dtype == torch.float32
    ref64, gref = _value_and_grad(lambda x: seq_ref.sequence_logprobs(x, y, average=average),
                                  z.double(), up.double())  # fmt: skip
    t_out, t_g = _value_and_grad(lambda x: seq_ref.sequence_logprobs(x, y, average=average),
                                 z, up)  # fmt: skip
    assert_idiom(out, ref64, t_out, dtype, "logp")
    assert_idiom(g, gref, t_g, dtype, "grad")
    assert out[2] == 0 and torch.count_nonzero(g[2]) == 0  # no valid token: 0, no gradient


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_packed_equals_padded_and_average_is_token_mean(backend):
    z, y = _padded(5, 7, 61, torch.float64, seed=1)
    lens = [7, 3, 0, 5, 7]
    zp = torch.cat([z[b, :n] for b, n in enumerate(lens)])
    yp = torch.cat([y[b, :n] for b, n in enumerate(lens)])
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    yt = y.clone()
    for b, n in enumerate(lens):
        yt[b, n:] = -100
    for average in (False, True):
        packed = rk.sequence_logprobs(zp, yp, cu_seqlens=cu, average=average, backend=backend)
        padded = rk.sequence_logprobs(z, yt, average=average, backend=backend)
        torch.testing.assert_close(packed, padded, rtol=1e-12, atol=1e-12)
    tok = seq_ref.token_logprobs(z, yt)
    valid = (yt != -100).sum(1)
    mean = rk.sequence_logprobs(z, yt, average=True, backend=backend)
    want = torch.where(valid > 0, tok.sum(1) / valid.clamp_min(1), torch.zeros(()).double())
    torch.testing.assert_close(mean, want, rtol=1e-12, atol=1e-12)
    assert mean[2] == 0 and not torch.isnan(mean).any()


@pytest.mark.parametrize("backend", NATIVE)
def test_ignored_tokens_contribute_nothing(backend):
    z, y = _padded(3, 6, 50, torch.float32, seed=2)
    z2 = z.clone()
    z2[y == -100] = torch.randn(int((y == -100).sum()), 50) * 100  # change only ignored rows
    a = rk.sequence_logprobs(z, y, backend=backend)
    b, g = _value_and_grad(lambda x: rk.sequence_logprobs(x, y, backend=backend), z2,
                           torch.ones(3))  # fmt: skip
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.count_nonzero(g[y == -100]) == 0


@pytest.mark.parametrize("backend", NATIVE)
def test_shifted_and_strided_views(backend):
    V = 300 if backend == "triton" else 3001
    g = torch.Generator().manual_seed(3)
    full = torch.randn(3, 8, V, generator=g)
    ids = torch.randint(0, V, (3, 8), generator=g)
    up = torch.tensor([0.5, 1.0, -1.0])
    shifted = lambda x: rk.sequence_logprobs(x[:, :-1], ids[:, 1:], backend=backend)  # noqa: E731
    out, grad = _value_and_grad(shifted, full, up)
    want, wgrad = _value_and_grad(
        lambda x: seq_ref.sequence_logprobs(x[:, :-1].double(), ids[:, 1:]), full, up
    )
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, wgrad, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(grad[:, -1]) == 0
    tz = full.transpose(0, 1)  # [8, 3, V]: batch stride smaller than time stride
    ty = ids.t()
    torch.testing.assert_close(
        rk.sequence_logprobs(tz, ty, backend=backend).double(),
        seq_ref.sequence_logprobs(tz.double(), ty),
        rtol=1e-5,
        atol=1e-4,
    )


@pytest.mark.parametrize("backend", NATIVE)
def test_empty_and_nonfinite(backend):
    z = torch.randn(0, 5, 11)
    y0 = torch.zeros(0, 5, dtype=torch.long)
    assert rk.sequence_logprobs(z, y0, backend=backend).shape == (0,)
    zp = torch.randn(0, 11)
    cu = torch.zeros(4, dtype=torch.long)  # three empty sequences
    out = rk.sequence_logprobs(zp, torch.zeros(0, dtype=torch.long), cu_seqlens=cu,
                               average=True, backend=backend)  # fmt: skip
    assert out.tolist() == [0.0, 0.0, 0.0]
    z = torch.randn(2, 3, 11)
    y = torch.randint(0, 11, (2, 3))
    z[0, 1, 4] = float("nan")
    z[1, :, 7] = float("-inf")
    y[1, 0] = 7
    out = rk.sequence_logprobs(z, y, backend=backend)
    assert torch.isnan(out[0]) and out[1] == float("-inf")


@pytest.mark.skipif(not _native.has_cpu(), reason="needs the cpu backend")
def test_gradcheck_float64_cpu():
    z, y = _padded(3, 4, 13, torch.float64, seed=4)
    cu = torch.tensor([0, 5, 5, 12])
    assert torch.autograd.gradcheck(
        lambda x: rk.sequence_logprobs(x, y, average=True, backend="cpu"),
        (z.requires_grad_(),),
    )
    zp = z.detach().reshape(12, 13).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: rk.sequence_logprobs(x, y.reshape(12), cu_seqlens=cu, backend="cpu"), (zp,)
    )


@pytest.mark.skipif(not _native.has_cpu(), reason="needs the cpu backend")
def test_compile_and_opcheck():
    z, y = _padded(3, 5, 29, torch.float32, seed=5)
    f = torch.compile(lambda x: rk.sequence_logprobs(x, y, backend="cpu"), fullgraph=True)
    out, g = _value_and_grad(f, z, torch.ones(3))
    want, wg = _value_and_grad(lambda x: rk.sequence_logprobs(x, y, backend="cpu"), z,
                               torch.ones(3))  # fmt: skip
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(g, wg)
    from rationale_kernels.ops import sequence_logprobs as ops

    zz = z.clone().requires_grad_()
    torch.library.opcheck(ops._token_op, (zz, y, -100, "cpu"))
    h = torch.randn(15, 8, requires_grad=True)
    w = torch.randn(29, 8, requires_grad=True)
    torch.library.opcheck(ops._fused_token_op, (h, w, None, y.reshape(-1), -100, "cpu", 4))


# ---- fused_linear_sequence_logprobs


def _linear_case(N, H, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * H**-0.5 * 3).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[::4] = -100
    return h, w, b, y


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_matches_reference(backend, dtype):
    N, H, V = 19, 16, (301 if backend == "triton" else 3001)
    h, w, b, y = _linear_case(N, H, V, dtype)
    cu = torch.tensor([0, 4, 4, 11, 19])
    up = torch.tensor([1.0, 2.0, 0.0, -1.5])  # a zero upstream: that sequence is not recomputed

    def run(fn, args):
        leaves = [a.detach().clone().requires_grad_() for a in args]
        out = fn(*leaves)
        return (out.detach(),) + torch.autograd.grad((out * up.to(out.dtype)).sum(), leaves)

    def ref(hh, ww, bb):
        return seq_ref.sequence_logprobs(torch.nn.functional.linear(hh, ww, bb), y, cu_seqlens=cu)

    ours = run(lambda hh, ww, bb: rk.fused_linear_sequence_logprobs(
        hh, ww, y, bias=bb, cu_seqlens=cu, chunk_size=5, backend=backend), (h, w, b))  # fmt: skip
    want = run(ref, (h.double(), w.double(), b.double()))
    same = run(ref, (h, w, b))
    for o, r, t, what in zip(ours, want, same, ("logp", "hidden", "weight", "bias")):
        assert o.dtype == (torch.float32 if what == "logp" else dtype)
        assert_idiom(o, r, t, dtype, what)
    assert torch.count_nonzero(ours[1][4:11]) == 0  # zero upstream: zero grad_hidden


def test_fused_linear_padded_and_chunking_agree():
    if not _native.has_cpu():
        pytest.skip("needs the cpu backend")
    h, w, b, y = _linear_case(24, 8, 97, torch.float64, seed=6)
    base = rk.fused_linear_sequence_logprobs(h.view(3, 8, 8), w, y.view(3, 8), backend="cpu")
    for chunk in (1, 5, 24, 100):
        out = rk.fused_linear_sequence_logprobs(h.view(3, 8, 8), w, y.view(3, 8),
                                                chunk_size=chunk, backend="cpu")  # fmt: skip
        torch.testing.assert_close(out, base, rtol=1e-13, atol=1e-12)


# ---- bad input


def test_bad_input():
    z, y = _padded(2, 3, 11, torch.float32)
    cu = torch.tensor([0, 2, 6])
    zp, yp = z.reshape(6, 11), y.reshape(6)
    with pytest.raises(ValueError, match="end at"):
        rk.sequence_logprobs(zp, yp, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="start at 0"):
        rk.sequence_logprobs(zp, yp, cu_seqlens=torch.tensor([1, 2, 6]))
    with pytest.raises(ValueError, match="non-decreasing"):
        rk.sequence_logprobs(zp, yp, cu_seqlens=torch.tensor([0, 4, 3, 6]))
    with pytest.raises(TypeError, match="int32 or int64"):
        rk.sequence_logprobs(zp, yp, cu_seqlens=cu.float())
    with pytest.raises(ValueError, match="1-D"):
        rk.sequence_logprobs(zp, yp, cu_seqlens=cu[None])
    with pytest.raises(ValueError, match="packed"):
        rk.sequence_logprobs(z, y, cu_seqlens=cu)
    with pytest.raises(ValueError, match="padded"):
        rk.sequence_logprobs(zp, yp)
    with pytest.raises(ValueError, match="labels shape"):
        rk.sequence_logprobs(z, y[:, :2])
    with pytest.raises(TypeError, match="integer"):
        rk.sequence_logprobs(z, y.float())
    with pytest.raises(TypeError, match="float32"):
        rk.sequence_logprobs(z.long(), y)
    with pytest.raises(ValueError, match="meta"):
        rk.sequence_logprobs(z, y.to("meta"))
    with pytest.raises(ValueError, match="meta"):
        rk.sequence_logprobs(zp, yp, cu_seqlens=cu.to("meta"))
    with pytest.raises(ValueError, match="backend"):
        rk.sequence_logprobs(z, y, backend="gpu")
    for backend in OP_BACKENDS:
        bad = y.clone()
        bad[1, 1] = 11
        with pytest.raises(ValueError, match="out of range"):
            rk.sequence_logprobs(z, bad, backend=backend)
    h, w, b, yl = _linear_case(6, 4, 11, torch.float32)
    with pytest.raises(ValueError, match="hidden size"):
        rk.fused_linear_sequence_logprobs(h, w[:, :3], yl, cu_seqlens=cu)
    with pytest.raises(TypeError, match="dtype"):
        rk.fused_linear_sequence_logprobs(h, w.double(), yl, cu_seqlens=cu)
    with pytest.raises(ValueError, match="chunk_size"):
        rk.fused_linear_sequence_logprobs(h, w, yl, cu_seqlens=cu, chunk_size=0)

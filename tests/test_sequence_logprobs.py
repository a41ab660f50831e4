"""sequence_logprobs: the row kernels (native CPU / CUDA, Triton) and the public ops
(sequence_logprobs, fused_linear_sequence_logprobs) against float64 references."""

import math

import pytest
import torch

import rationale_kernels as rk
from rationale_kernels import _native
from rationale_kernels.reference import sequence_logprobs as seq_ref
from rationale_kernels.testing import assert_idiom, rel_err

# ---- row kernels
# token_logprobs_{fwd,bwd}_{cpu,cuda} (rationale_kernels._C, contract csrc/sequence_logprobs.h) and
# rationale_kernels.triton.sequence_logprobs, called directly with raw pointers / tensors.

_DT = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
ROW_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ROW_BACKENDS = (["cpu"] if _native.has_cpu() else []) + (["triton"] if _native.has_triton() else [])


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_fwd(backend, z, y, ignore=-100, num_threads=0):
    """(logp, lse) [B, T] of the [B, T, V] logits z (unit stride on V) with labels y [B, T]."""
    if backend == "triton":
        from rationale_kernels.triton.sequence_logprobs import token_logprobs_fwd

        return token_logprobs_fwd(z, y, ignore)
    B, T, V = z.shape
    logp = torch.full((B, T), math.pi, dtype=_acc(z.dtype), device=z.device)
    lse = torch.full_like(logp, math.pi)
    args = (_DT[z.dtype], B, T, V, z.data_ptr(), z.stride(0), z.stride(1), y.data_ptr(), ignore)
    args += (logp.data_ptr(), lse.data_ptr())
    if backend == "cpu":
        _native.native().token_logprobs_fwd_cpu(*args, num_threads)
    else:
        _native.native().token_logprobs_fwd_cuda(*args, torch.cuda.current_stream().cuda_stream)
    return logp, lse


def rows_bwd(backend, z, y, lse, w, ignore=-100, grad=None, num_threads=0):
    """grad [B * T, V] = w ([j == y] - exp(z - lse)); written into grad when given (may be z)."""
    B, T, V = z.shape
    if grad is None:  # filled with garbage: every element must be written
        grad = torch.full((B * T, V), math.pi, dtype=z.dtype, device=z.device)
    if backend == "triton":
        from rationale_kernels.triton.sequence_logprobs import token_logprobs_bwd

        return token_logprobs_bwd(z, y, lse, w, ignore, grad)
    args = (_DT[z.dtype], B, T, V, z.data_ptr(), z.stride(0), z.stride(1), y.data_ptr(), ignore)
    args += (lse.data_ptr(), w.data_ptr(), grad.data_ptr(), grad.stride(0))
    if backend == "cpu":
        _native.native().token_logprobs_bwd_cpu(*args, num_threads)
    else:
        _native.native().token_logprobs_bwd_cuda(*args, torch.cuda.current_stream().cuda_stream)
    return grad


def oracle(z, y, w, ignore=-100):
    """float64 (logp, lse, grad [B * T, V]): log_softmax + gather; grad = w (onehot - softmax)."""
    V = z.shape[-1]
    z64 = z.double()
    valid = y != ignore
    yc = torch.where(valid, y, torch.zeros_like(y))
    lsm = torch.log_softmax(z64, -1)
    logp = torch.where(valid, lsm.gather(-1, yc[..., None]).squeeze(-1), 0.0)
    lse = torch.where(valid, torch.logsumexp(z64, -1), 0.0)
    onehot = torch.nn.functional.one_hot(yc, V).double()
    live = (valid & (w != 0))[..., None]
    grad = torch.where(live, w.double()[..., None] * (onehot - lsm.exp()), 0.0)
    return logp, lse, grad.reshape(-1, V)


def torch_same_dtype(z, y, w, ignore=-100):
    """The same quantities from torch at z's dtype (autograd of log_softmax + gather)."""
    V = z.shape[-1]
    valid = y != ignore
    yc = torch.where(valid, y, torch.zeros_like(y))
    zz = z.detach().clone().requires_grad_()
    tok = torch.log_softmax(zz, -1).gather(-1, yc[..., None]).squeeze(-1)
    logp = torch.where(valid, tok, torch.zeros_like(tok))
    (logp * torch.where(valid, w, 0.0).to(z.dtype)).sum().backward()
    lse = torch.where(valid, torch.logsumexp(z, -1), torch.zeros((), dtype=z.dtype))
    return logp.detach(), lse, zz.grad.reshape(-1, V)


def make_rows(B, T, V, dtype, seed=0, scale=3.0, offset=0.0, device="cpu"):
    """Logits [B, T, V], labels (row 1 ignored), weights in [0, 2) (row 2 has w = 0)."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    w = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    if B * T > 2:
        y.view(-1)[1] = -100
        w.view(-1)[2] = 0.0
    return z.to(device), y.to(device), w.to(_acc(dtype)).to(device)


def check_rows(backend, z, y, w, ignore=-100):
    dtype = z.dtype
    logp, lse = rows_fwd(backend, z, y, ignore)
    grad = rows_bwd(backend, z, y, lse, w, ignore)
    assert logp.dtype == lse.dtype == _acc(dtype) and logp.shape == lse.shape == y.shape
    assert grad.dtype == dtype and grad.shape == (y.numel(), z.shape[-1])
    r = oracle(z.cpu(), y.cpu(), w.cpu(), ignore)
    t = torch_same_dtype(z.cpu(), y.cpu(), w.cpu(), ignore)
    for name, out, ref, same in zip(("logp", "lse", "grad"), (logp, lse, grad), r, t):
        assert_idiom(out.cpu(), ref, same, dtype, f"{backend} {name}")
    ignored = (y == ignore).cpu()
    assert (logp.cpu()[ignored] == 0).all() and (lse.cpu()[ignored] == 0).all()
    dead = (ignored | (w.cpu() == 0)).reshape(-1)
    assert (grad.cpu()[dead] == 0).all()
    return logp, lse, grad


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("dtype", ROW_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 7), (3, 11, 1000)])
def test_rows_match_oracle(backend, dtype, shape):
    check_rows(backend, *make_rows(*shape, dtype))


@pytest.mark.parametrize("dtype", ROW_DTYPES)
def test_rows_large_vocab_cpu(dtype):
    if not _native.has_cpu():
        pytest.skip("native module not built")
    check_rows("cpu", *make_rows(2, 3, 32003, dtype))


def test_rows_large_vocab_triton():
    if not _native.has_triton():
        pytest.skip("triton not installed")
    check_rows("triton", *make_rows(1, 3, 32003, torch.float32))


def test_rows_num_threads_cpu():
    if not _native.has_cpu():
        pytest.skip("native module not built")
    z, y, w = make_rows(4, 9, 1000, torch.float32)
    outs = []
    for n in (1, 2, 0):
        logp, lse = rows_fwd("cpu", z, y, num_threads=n)
        outs.append((logp, lse, rows_bwd("cpu", z, y, lse, w, num_threads=n)))
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], o))


def _strided_views(B, T, V, dtype, device):
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(B, T + 1, V, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)
    shifted = base[:, :-1]  # the causal-LM shift, no copy: stride_b = (T + 1) V
    tb = (torch.randn(T, B, V, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)
    return {"shifted": shifted, "transposed": tb.transpose(0, 1)}  # stride_b = V, stride_t = B V


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_strided_views(backend, dtype):
    B, T, V = 3, 5, 300 if backend == "triton" else 1001
    _, y, w = make_rows(B, T, V, dtype)
    for name, z in _strided_views(B, T, V, dtype, "cpu").items():
        assert not z.is_contiguous(), name
        logp, lse, grad = check_rows(backend, z, y, w)
        # the same rows, copied: bitwise the same results (the math is per row and per element)
        zc = z.contiguous()
        logp_c, lse_c = rows_fwd(backend, zc, y)
        assert torch.equal(logp, logp_c) and torch.equal(lse, lse_c), name
        assert torch.equal(grad, rows_bwd(backend, zc, y, lse_c, w)), name


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_rows_single_column_any_stride(backend):
    # V == 1: the last stride is never used (a size-1 dim may keep any stride)
    z = torch.randn(3, 2, 5)[..., ::5]
    assert z.stride(-1) == 5
    y = torch.zeros(3, 2, dtype=torch.long)
    y[1, 1] = -100
    logp, lse = rows_fwd(backend, z, y)
    assert torch.equal(logp, torch.zeros(3, 2)) and torch.equal(
        lse, torch.where(y == 0, z[..., 0], 0)
    )
    assert torch.equal(rows_bwd(backend, z, y, lse, torch.ones(3, 2)), torch.zeros(6, 1))


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("B", [1, 2])
def test_rows_in_place_backward(backend, B):
    z, y, w = make_rows(B, 6, 777, torch.bfloat16)
    logp, lse = rows_fwd(backend, z, y)
    expect = rows_bwd(backend, z, y, lse, w)
    zi = z.clone()
    out = rows_bwd(backend, zi, y, lse, w, grad=zi.view(-1, z.shape[-1]))  # grad is the logits
    assert out.data_ptr() == zi.data_ptr()
    assert torch.equal(zi.view(-1, z.shape[-1]), expect)


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_large_magnitude(backend, dtype):
    # |z| ~ 1e4 spread: the forward is centred on the row max, so it stays as accurate as
    # log_softmax; every row has one dominant token.
    check_rows(backend, *make_rows(2, 4, 300, dtype, scale=1e4))
    # z ~ 1e4 + N(0, 3): many tokens share the mass. logp is still as accurate as log_softmax, but
    # the backward only has lse (rounded to the accumulation type: |error| <= ulp(lse) / 2), so
    # exp(z - lse) carries that relative error. Check the kernel against the contract evaluated at
    # its own lse, and lse against the exact one.
    z, y, w = make_rows(2, 4, 300, dtype, offset=1e4)
    logp, lse = rows_fwd(backend, z, y)
    r_logp, r_lse, _ = oracle(z, y, w)
    assert_idiom(logp, r_logp, torch_same_dtype(z, y, w)[0], dtype, "logp")
    ulp = torch.finfo(_acc(dtype)).eps * r_lse.abs()
    assert ((lse.double() - r_lse).abs() <= ulp).all()
    grad = rows_bwd(backend, z, y, lse, w)
    valid = y != -100
    yc = torch.where(valid, y, 0)
    onehot = torch.nn.functional.one_hot(yc, z.shape[-1]).double()
    at_lse = w.double()[..., None] * (onehot - torch.exp(z.double() - lse.double()[..., None]))
    at_lse = torch.where((valid & (w != 0))[..., None], at_lse, 0.0).reshape(grad.shape)
    assert rel_err(grad, at_lse) <= 10 * torch.finfo(_acc(dtype)).eps


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_rows_minus_inf_logits(backend):
    z, y, w = make_rows(1, 4, 20, torch.float32)
    w.fill_(1.0)
    y[0] = torch.tensor([0, 1, 12, 6])
    z[0, :, 5:9] = -math.inf  # banned tokens: probability 0
    z[0, 2, :5] = -math.inf
    logp, lse = rows_fwd(backend, z, y)
    grad = rows_bwd(backend, z, y, lse, w)
    r_logp, r_lse, r_grad = oracle(z, y, w)
    assert logp[0, 3] == -math.inf  # label on a -inf logit
    assert rel_err(logp[0, :3], r_logp[0, :3]) < 1e-6 and rel_err(lse, r_lse) < 1e-6
    assert torch.isfinite(grad).all() and rel_err(grad, r_grad) < 1e-6
    assert torch.equal(grad[:, 5:9][[0, 1, 2]], torch.zeros(3, 4))
    assert grad[3, 6] == 1.0  # w ([j == y] - 0)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_rows_non_finite_give_nan(backend, bad):
    z, y, w = make_rows(1, 6, 30, torch.float32)
    w.fill_(1.0)
    y[0, 1] = -100  # ignored: zeros whatever the logits
    w[0, 2] = 0.0  # zero weight: zeros whatever the logits
    z[0, :4, 7] = bad
    logp, lse = rows_fwd(backend, z, y)
    assert torch.isnan(logp[0, [0, 2, 3]]).all() and torch.isnan(lse[0, [0, 2, 3]]).all()
    assert logp[0, 1] == 0 and lse[0, 1] == 0
    assert torch.isfinite(logp[0, 4:]).all()
    grad = rows_bwd(backend, z, y, lse, w)
    assert torch.isnan(grad[[0, 3]]).all()
    assert (grad[[1, 2]] == 0).all() and torch.isfinite(grad[4:]).all()


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_rows_empty(backend):
    z = torch.randn(0, 4, 10)
    y = torch.zeros(0, 4, dtype=torch.long)
    logp, lse = rows_fwd(backend, z, y)
    assert logp.shape == (0, 4)
    grad = rows_bwd(backend, z, y, lse, torch.ones(0, 4))
    assert grad.shape == (0, 10)


# GPU: the same checks with the CUDA kernels and compiled Triton (block- and warp-per-row paths,
# misaligned rows through odd V and shifted views).


def _gpu_backend(backend):
    if backend == "cuda" and not _native.has_cuda():
        pytest.skip("built without CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", ROW_DTYPES)
@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (2, 3, 7), (3, 43, 1000), (2, 5, 2048), (2, 5, 2049), (2, 9, 32003)]
)
def test_gpu_rows_match_oracle(backend, dtype, shape):
    _gpu_backend(backend)
    check_rows(backend, *make_rows(*shape, dtype, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [1001, 32003])
def test_gpu_rows_strided_and_in_place(backend, dtype, V):
    _gpu_backend(backend)
    B, T = 3, 5
    _, y, w = make_rows(B, T, V, dtype, device="cuda")
    for z in _strided_views(B, T, V, dtype, "cuda").values():
        check_rows(backend, z, y, w)
    z = make_rows(B, T, V, dtype, device="cuda")[0]
    logp, lse = rows_fwd(backend, z, y)
    expect = rows_bwd(backend, z, y, lse, w)
    rows_bwd(backend, z, y, lse, w, grad=z.view(-1, V))
    assert torch.equal(z.view(-1, V), expect)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_rows_special_values(backend):
    _gpu_backend(backend)
    z, y, w = make_rows(2, 4, 3000, torch.float32, device="cuda")
    y.clamp_(min=0)
    w.fill_(1.0)
    z[0, 0, 100:200] = -math.inf
    z[0, 1, 7] = math.nan
    z[0, 2, 9] = math.inf
    y[0, 3] = 5
    z[0, 3, 5] = -math.inf
    logp, lse = rows_fwd(backend, z, y)
    grad = rows_bwd(backend, z, y, lse, w)
    assert torch.isnan(logp[0, 1:3]).all() and torch.isnan(grad[1:3]).all()
    assert logp[0, 3] == -math.inf
    r = oracle(z[1:].cpu(), y[1:].cpu(), w[1:].cpu())
    assert rel_err(logp[1:].cpu(), r[0]) < 1e-6 and rel_err(grad[4:].cpu(), r[2]) < 1e-6
    assert (grad[0, 100:200] == 0).all() and torch.isfinite(grad[0]).all()


# ---- public ops: sequence_logprobs and fused_linear_sequence_logprobs

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


# ---- public ops on a GPU (run by bench/gpu_check.sh; skipped without CUDA)

GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_public_ops_match_reference(backend, dtype):
    if backend == "cuda" and not _native.has_cuda():
        pytest.skip("built without CUDA")
    z, y = _padded(6, 33, 32003, dtype, seed=7)
    z, y = z.cuda(), y.cuda()
    up = torch.randn(6, device="cuda")
    out, g = _value_and_grad(
        lambda x: rk.sequence_logprobs(x[:, :-1], y[:, 1:], backend=backend), z, up
    )
    ref64, gref = _value_and_grad(
        lambda x: seq_ref.sequence_logprobs(x[:, :-1], y[:, 1:]), z.double(), up.double()
    )
    t_out, t_g = _value_and_grad(lambda x: seq_ref.sequence_logprobs(x[:, :-1], y[:, 1:]), z, up)
    assert_idiom(out, ref64, t_out, dtype, "logp")
    assert_idiom(g, gref, t_g, dtype, "grad")
    h, w, b, yl = _linear_case(300, 64, 32003, dtype, seed=8)
    h, w, b, yl = h.cuda(), w.cuda(), b.cuda(), yl.cuda()
    cu = torch.tensor([0, 100, 100, 250, 300], device="cuda")
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    lp = rk.fused_linear_sequence_logprobs(
        leaves[0], leaves[1], yl, bias=leaves[2], cu_seqlens=cu, chunk_size=64, backend=backend
    )
    grads = torch.autograd.grad(lp.sum(), leaves)
    r64 = [t.double().requires_grad_() for t in (h, w, b)]
    want = seq_ref.sequence_logprobs(torch.nn.functional.linear(*r64), yl, cu_seqlens=cu)
    wgrads = torch.autograd.grad(want.sum(), r64)
    rlow = [t.clone().requires_grad_() for t in (h, w, b)]
    same = seq_ref.sequence_logprobs(torch.nn.functional.linear(*rlow), yl, cu_seqlens=cu)
    sgrads = torch.autograd.grad(same.sum(), rlow)
    assert_idiom(lp, want, same, dtype, "fused logp")
    for a, r, t in zip(grads, wgrads, sgrads):
        assert_idiom(a, r, t, dtype, "fused grad")

"""rationale_loss and fused_linear_rationale_loss: every backend against the float64 reference."""

import math

import pytest
import torch

import rationale_kernels as rk
from rationale_kernels import _native
from rationale_kernels.reference import rationale_loss as ref
from rationale_kernels.testing import assert_idiom, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _cpu_backends():
    out = []
    if _native.has_cpu():
        out.append("cpu")
    if _native.has_triton():
        out.append("triton")
    return out


BACKENDS = _cpu_backends()
DEV = "cpu"

# (weights, kl mode, kl_vocab offset, kl_coef, entropy_coef): the option sets every backend sees
OPTIONS = {
    "nll": dict(),
    "full": dict(weights=True, kl="full", kl_coef=0.3, entropy_coef=0.2),
    "full_vocab": dict(weights=True, kl="full", kl_vocab=-2, ref_extra=3, kl_coef=0.5),
    "k1": dict(kl="k1", kl_coef=0.4, entropy_coef=0.1),
    "k3": dict(weights=True, kl="k3", kl_coef=0.7),
}


def make_case(N, V, dtype, opts, seed=0, scale=3.0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    if N > 2:
        y[1] = -100
    kw = dict(kl_coef=opts.get("kl_coef", 0.0), entropy_coef=opts.get("entropy_coef", 0.0))
    if opts.get("weights"):
        kw["token_weights"] = torch.rand(N, generator=g, dtype=torch.float64) * 2
    kl = opts.get("kl", "full")
    kw["kl"] = kl
    if kl == "full" and "kl_coef" in opts:
        extra = opts.get("ref_extra", 0)
        r = torch.randn(N, V + extra, generator=g, dtype=torch.float64) * scale
        kw["ref_logits"] = r.to(dtype)
        if "kl_vocab" in opts:
            kw["kl_vocab"] = max(1, V + opts["kl_vocab"])
        elif extra:
            kw["kl_vocab"] = V
    if kl in ("k1", "k3"):
        # a reference close to the policy, as in training (k3's exp(rho) overflows fp16 otherwise)
        logp = torch.log_softmax(z.double(), -1).gather(1, y.clamp_min(0)[:, None]).squeeze(1)
        kw["ref_logprobs"] = logp + torch.randn(N, generator=g, dtype=torch.float64) * 0.5
    return (
        z.to(device),
        y.to(device),
        {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()},
    )


def upcast(kw):
    return {
        k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()
    }


def run(z, y, kw, backend, reduction="none", upstream=None):
    z = z.detach().clone().requires_grad_()
    out = rk.rationale_loss(z, y, reduction=reduction, backend=backend, **kw)
    (out * upstream).sum().backward() if upstream is not None else out.backward()
    return out.detach(), z.grad


def check_against_reference(z, y, kw, backend, dtype, reduction="none"):
    g = torch.Generator().manual_seed(1)
    up = torch.rand(y.shape, generator=g, dtype=torch.float64) if reduction == "none" else None
    up_t = None if up is None else up.to(z.device)
    out, grad = run(z, y, kw, backend, reduction, up_t if up is None else up_t.float())
    out_t, grad_t = run(z, y, kw, "torch", reduction, None if up is None else up_t.float())
    out64, grad64 = run(z.double(), y, upcast(kw), "torch", reduction, up_t)
    assert out.dtype == out_t.dtype or dtype != torch.float32
    assert_idiom(out, out64, out_t, dtype, f"{backend} loss")
    assert_idiom(grad, grad64, grad_t, dtype, f"{backend} grad")
    assert grad.dtype == z.dtype and grad.shape == z.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (33, 1000)])
def test_matches_reference(backend, opt, dtype, shape):
    N, V = shape
    if OPTIONS[opt].get("kl_vocab") and V < 3:
        pytest.skip("kl_vocab < V needs V >= 3")
    z, y, kw = make_case(N, V, dtype, OPTIONS[opt])
    check_against_reference(z, y, kw, backend, dtype, "none")
    check_against_reference(z, y, kw, backend, dtype, "mean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opt", ["nll", "full_vocab"])
def test_large_vocab_cpu(dtype, opt):
    if not _native.has_cpu():
        pytest.skip("native module not built")
    z, y, kw = make_case(5, 32003, dtype, OPTIONS[opt])
    check_against_reference(z, y, kw, "cpu", dtype, "sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocab_triton(backend):
    if backend != "triton":
        pytest.skip("triton case")
    z, y, kw = make_case(2, 32003, torch.float32, OPTIONS["full"])
    check_against_reference(z, y, kw, "triton", torch.float32, "sum")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("opt", list(OPTIONS))
def test_gradcheck_float64(backend, opt):
    if backend == "cpu" and not _native.has_cpu():
        pytest.skip("native module not built")
    z, y, kw = make_case(4, 6, torch.float64, OPTIONS[opt], scale=1.0)
    for red in ("none", "mean"):
        f = lambda zz: rk.rationale_loss(zz, y, reduction=red, backend=backend, **kw)  # noqa: E731, B023
        assert torch.autograd.gradcheck(f, (z.requires_grad_(),))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_normalizer_and_stats(backend):
    z, y, kw = make_case(17, 50, torch.float64, OPTIONS["full"])
    t = ref.rationale_loss_terms(z, y, **kw)
    n_valid = int(t["valid"].sum())
    per = rk.rationale_loss(z, y, reduction="none", backend=backend, **kw)
    assert per.shape == y.shape and float(per[1]) == 0.0
    torch.testing.assert_close(per, t["loss"], rtol=1e-5, atol=1e-6)
    s = rk.rationale_loss(z, y, reduction="sum", backend=backend, **kw)
    m, st = rk.rationale_loss(z, y, backend=backend, return_stats=True, **kw)
    nm = rk.rationale_loss(z, y, normalizer=123.0, backend=backend, **kw)
    torch.testing.assert_close(s, t["loss"].sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m, t["loss"].sum() / n_valid, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nm, t["loss"].sum() / 123.0, rtol=1e-5, atol=1e-6)
    assert int(st["num_tokens"]) == n_valid
    for k in ("nll", "kl", "entropy"):
        torch.testing.assert_close(st[k], t[k].sum() / n_valid, rtol=1e-5, atol=1e-6)
        assert not st[k].requires_grad
    # normalizer as a tensor (e.g. an all-reduced count) gives the same thing
    nt = rk.rationale_loss(z, y, normalizer=torch.tensor(123.0), backend=backend, **kw)
    torch.testing.assert_close(nt, nm)


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_all_ignored_and_empty(backend):
    z = torch.randn(4, 9, requires_grad=True)
    y = torch.full((4,), -100)
    loss = rk.rationale_loss(z, y, backend=backend, entropy_coef=0.1)
    loss.backward()
    assert float(loss) == 0.0 and torch.equal(z.grad, torch.zeros_like(z))
    e = torch.randn(0, 9, requires_grad=True)
    ye = torch.zeros(0, dtype=torch.long)
    assert float(rk.rationale_loss(e, ye, backend=backend)) == 0.0
    assert float(rk.rationale_loss(e, ye, reduction="sum", backend=backend)) == 0.0
    assert rk.rationale_loss(e, ye, reduction="none", backend=backend).shape == (0,)
    rk.rationale_loss(e, ye, backend=backend).backward()
    assert e.grad.shape == e.shape


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_linear_empty_batch(backend, reduction):
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    out = rk.fused_linear_rationale_loss(h, w, y, bias=b, reduction=reduction, backend=backend)
    assert out.shape == ((0,) if reduction == "none" else ())
    out.sum().backward()
    assert h.grad is not None and h.grad.shape == (0, 8)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_batched(backend):
    g = torch.Generator().manual_seed(3)
    big = torch.randn(2, 6, 40, generator=g, dtype=torch.float64)
    y = torch.randint(0, 31, (2, 5), generator=g)
    y[0, 2] = -100
    cases = {
        "shifted": big[:, :-1, :31],  # non-viewable slice of a 3-D tensor
        "row_strided": big.reshape(12, 40)[:10, :31].reshape(2, 5, 31),
        "transposed": big[:, :5, :31].transpose(0, 1).contiguous().transpose(0, 1),
        "column_strided": big[:, :5, ::2][..., :20],
    }
    for name, z in cases.items():
        yy = y.clamp_max(z.shape[-1] - 1)
        out, grad = run(z, yy, {"entropy_coef": 0.3}, backend, "none", torch.ones(2, 5))
        out64, grad64 = run(
            z.contiguous(), yy, {"entropy_coef": 0.3}, "torch", "none", torch.ones(2, 5)
        )
        assert out.shape == (2, 5), name
        assert rel_err(out, out64) < 1e-6 and rel_err(grad, grad64) < 1e-6, name


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_minus_inf_logits(backend):
    z = torch.randn(3, 20, dtype=torch.float64)
    z[:, 5:9] = -math.inf  # banned tokens
    r = torch.randn(3, 20, dtype=torch.float64)
    r[0, 10] = -math.inf  # reference forbids a token the policy allows: KL is infinite there
    y = torch.tensor([0, 1, 2])
    kw = dict(entropy_coef=0.2)
    out, grad = run(z, y, {**kw, "ref_logits": r, "kl_coef": 0.1}, backend, "none", torch.ones(3))
    assert math.isinf(float(out[0])) and torch.isfinite(out[1:]).all()
    out, grad = run(z, y, kw, backend, "none", torch.ones(3))
    out64, grad64 = run(z, y, kw, "torch", "none", torch.ones(3))
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert rel_err(out, out64) < 1e-6 and rel_err(grad, grad64) < 1e-6
    assert torch.equal(grad[:, 5:9], torch.zeros(3, 4, dtype=grad.dtype))
    y_banned = torch.tensor([6, 1, 2])  # label on a -inf logit: infinite NLL
    assert math.isinf(float(rk.rationale_loss(z, y_banned, reduction="none", backend=backend)[0]))


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_logits_give_nan(backend, bad):
    z = torch.randn(3, 30)
    z[1, 7] = bad
    y = torch.tensor([0, 1, 2])
    per = rk.rationale_loss(z, y, reduction="none", backend=backend, entropy_coef=0.1)
    assert torch.isnan(per[1]) and torch.isfinite(per[[0, 2]]).all()
    assert torch.isnan(rk.rationale_loss(z, y, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_magnitude_logits(backend):
    z, y, kw = make_case(9, 300, torch.float32, OPTIONS["full"], scale=1e4)
    check_against_reference(z, y, kw, backend, torch.float32, "none")


def test_reference_gets_no_gradient():
    z, y, kw = make_case(5, 11, torch.float64, OPTIONS["full"])
    r = kw["ref_logits"].clone().requires_grad_()
    w = kw["token_weights"].clone().requires_grad_()
    zz = z.clone().requires_grad_()
    for backend in ["torch"] + BACKENDS:
        kw2 = {**kw, "ref_logits": r, "token_weights": w}
        rk.rationale_loss(zz, y, backend=backend, **kw2).backward()
        assert r.grad is None and w.grad is None


def test_custom_op_opcheck_and_compile():
    if not _native.has_cpu():
        pytest.skip("native module not built")
    from rationale_kernels.ops.rationale_loss import _rows_op

    z = torch.randn(5, 13, requires_grad=True)
    y = torch.tensor([1, 2, -100, 4, 12])
    args = (z, y, None, None, None, 0, 13, 0.0, 0.2, -100, "cpu", True)
    torch.library.opcheck(_rows_op, args)

    def f(zz):
        return rk.rationale_loss(zz, y, entropy_coef=0.2, backend="cpu")

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(z)
    torch.testing.assert_close(out, f(z))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_custom_ops_opcheck_and_compile(reduction):
    if not _native.has_cpu():
        pytest.skip("native module not built")
    from rationale_kernels.ops.rationale_loss import _fused_op

    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(13, 8, requires_grad=True)
    y = torch.tensor([1, 2, -100, 4, 12, 0])
    flags = (True, True, False) if reduction == "mean" else (False, False, False)
    args = (h, w, None, y, None, None, None, None, None, 0, 13, 0.0, 0.2, -100, "cpu", 4, *flags)
    torch.library.opcheck(_fused_op, args)

    def f(hh, ww):
        return rk.fused_linear_rationale_loss(
            hh, ww, y, entropy_coef=0.2, backend="cpu", chunk_size=4, reduction=reduction
        ).sum()

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(h, w)
    out.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    f(h, w).backward()
    torch.testing.assert_close(out, f(h, w))
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


# ---------------------------------------------------------------------------------------------
# fused linear


def make_linear_case(N, H, V, dtype, opts, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) / math.sqrt(H) * 2).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype) if bias else None
    _, y, kw = make_case(N, V, dtype, opts, seed=seed)
    r = kw.pop("ref_logits", None)
    if r is not None:
        Vr = r.shape[-1]
        kw["ref_hidden"] = torch.randn(N, H + 1, generator=g, dtype=torch.float64).to(dtype)
        kw["ref_weight"] = (torch.randn(Vr, H + 1, generator=g, dtype=torch.float64) / 3).to(dtype)
    return h, w, b, y, kw


def run_linear(h, w, b, y, kw, backend, reduction, upstream=None, **extra):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    out = rk.fused_linear_rationale_loss(h, w, y, bias=b, reduction=reduction, backend=backend,
                                         **kw, **extra)  # fmt: skip
    (out * upstream).sum().backward() if upstream is not None else out.backward()
    return out.detach(), h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt", ["nll", "full", "full_vocab", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_fused_linear_matches_reference(backend, opt, dtype, reduction, chunk):
    if backend == "triton" and (chunk == 1 or dtype != torch.float32):
        pytest.skip("keep the interpreter fast")
    h, w, b, y, kw = make_linear_case(19, 16, 45, dtype, OPTIONS[opt])
    up = torch.rand(19) if reduction == "none" else None
    got = run_linear(h, w, b, y, kw, backend, reduction, up, chunk_size=chunk)
    same = run_linear(h, w, b, y, kw, "torch", reduction, up)
    up64 = None if up is None else up.double()
    kw64 = upcast(kw)
    ref64 = run_linear(h.double(), w.double(), b.double(), y, kw64, "torch", reduction, up64)
    for name, a, s, r in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, same, ref64):
        assert a.dtype == s.dtype, name
        assert_idiom(a, r, s, dtype, f"{backend} {name}")


def test_fused_linear_gradcheck_float64():
    if not _native.has_cpu():
        pytest.skip("native module not built")
    h, w, b, y, kw = make_linear_case(6, 5, 9, torch.float64, OPTIONS["full_vocab"])
    for red in ("mean", "none"):

        def f(hh, ww, bb):
            return rk.fused_linear_rationale_loss(hh, ww, y, bias=bb, reduction=red, chunk_size=4,  # noqa: B023
                                                  backend="cpu", **kw)  # fmt: skip

        assert torch.autograd.gradcheck(
            f, (h.requires_grad_(), w.requires_grad_(), b.requires_grad_())
        )


def test_fused_linear_3d_and_frozen_weight():
    if not _native.has_cpu():
        pytest.skip("native module not built")
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(30, 8)  # frozen head: no grad_weight computed
    y = torch.randint(0, 30, (2, 5))
    out = rk.fused_linear_rationale_loss(h, w, y, reduction="none", backend="cpu")
    assert out.shape == (2, 5)
    loss = rk.fused_linear_rationale_loss(h, w, y, backend="cpu")
    loss.backward()
    h2 = h.detach().clone().requires_grad_()
    rk.fused_linear_rationale_loss(h2, w, y, backend="torch").backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(rk.fused_linear_rationale_loss(h, w, y, backend="cpu"), loss)


# ---------------------------------------------------------------------------------------------
# bad input


def _z():
    return torch.randn(3, 10), torch.tensor([1, 2, 3])


@pytest.mark.parametrize(
    "mutate, err, match",
    [
        (lambda z, y, kw: (z, torch.tensor([1, 10, 3]), kw), ValueError, "out of range"),
        (lambda z, y, kw: (z, torch.tensor([1, -5, 3]), kw), ValueError, "out of range"),
        (lambda z, y, kw: (z, y.float(), kw), TypeError, "integer"),
        (lambda z, y, kw: (z, y[:2], kw), ValueError, "leading shape"),
        (lambda z, y, kw: (z.long(), y, kw), TypeError, "float32"),
        (
            lambda z, y, kw: (z, y, {"ref_logits": torch.randn(2, 10), "kl_coef": 0.1}),
            ValueError,
            "does not match",
        ),
        (
            lambda z, y, kw: (z, y, {"ref_logits": torch.randn(3, 12), "kl_coef": 0.1}),
            ValueError,
            "kl_vocab",
        ),
        (
            lambda z, y, kw: (z, y, {"ref_logits": torch.randn(3, 10).double(), "kl_coef": 0.1}),
            TypeError,
            "dtype",
        ),
        (lambda z, y, kw: (z, y, {"kl_coef": 0.1}), ValueError, "needs reference"),
        (lambda z, y, kw: (z, y, {"kl": "k3", "kl_coef": 0.1}), ValueError, "ref_logprobs"),
        (lambda z, y, kw: (z, y, {"kl": "k2"}), ValueError, "kl must be"),
        (lambda z, y, kw: (z, y, {"kl_vocab": 11}), ValueError, "kl_vocab"),
        (lambda z, y, kw: (z, y, {"kl": "k1", "kl_vocab": 5}), ValueError, "kl_vocab"),
        (lambda z, y, kw: (z, y, {"token_weights": torch.ones(4)}), ValueError, "token_weights"),
        (lambda z, y, kw: (z, y, {"reduction": "avg"}), ValueError, "reduction"),
        (
            lambda z, y, kw: (z, y, {"reduction": "sum", "normalizer": 3.0}),
            ValueError,
            "normalizer",
        ),
        (lambda z, y, kw: (z, y, {"normalizer": 0.0}), ValueError, "normalizer"),
        (lambda z, y, kw: (z, y, {"kl_coef": math.nan}), ValueError, "finite"),
        (lambda z, y, kw: (z, y, {"backend": "numpy"}), ValueError, "backend"),
        (lambda z, y, kw: (z, y, {"backend": "cuda"}), (RuntimeError, ValueError), "cuda"),
        (
            lambda z, y, kw: (z, y, {"ref_logprobs": torch.zeros(3, device="meta"), "kl": "k1"}),
            ValueError,
            "meta",
        ),
    ],
)
def test_bad_input(mutate, err, match):
    z, y = _z()
    z, y, kw = mutate(z, y, {})
    with pytest.raises(err, match=match):
        rk.rationale_loss(z, y, **kw)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    if not _native.has_triton():
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    z, y = _z()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        rk.rationale_loss(z, y, backend="triton")


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(weight=torch.randn(10, 7)), ValueError, "hidden size"),
        (dict(weight=torch.randn(10, 8).double()), TypeError, "dtype"),
        (dict(bias=torch.randn(9)), ValueError, "bias"),
        (dict(ref_hidden=torch.randn(3, 8)), ValueError, "together"),
        (
            dict(ref_hidden=torch.randn(2, 8), ref_weight=torch.randn(10, 8), kl_coef=0.1),
            ValueError,
            "leading shape",
        ),
        (dict(chunk_size=0), ValueError, "chunk_size"),
    ],
)
def test_fused_linear_bad_input(kw, err, match):
    args = dict(hidden=torch.randn(3, 8), weight=torch.randn(10, 8))
    args.update(kw)
    with pytest.raises(err, match=match):
        rk.fused_linear_rationale_loss(args.pop("hidden"), args.pop("weight"),
                                       torch.tensor([1, 2, 3]), **args)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (129, 1000), (17, 32003)])
def test_gpu_matches_reference(backend, opt, dtype, shape):
    N, V = shape
    if backend == "cuda" and not _native.has_cuda():
        pytest.skip("built without CUDA")
    if OPTIONS[opt].get("kl_vocab") and V < 3:
        pytest.skip("kl_vocab < V needs V >= 3")
    z, y, kw = make_case(N, V, dtype, OPTIONS[opt], device="cuda")
    check_against_reference(z, y, kw, backend, dtype, "none")
    check_against_reference(z, y, kw, backend, dtype, "mean")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_linear(backend, dtype):
    if backend == "cuda" and not _native.has_cuda():
        pytest.skip("built without CUDA")
    h, w, b, y, kw = make_linear_case(300, 64, 1000, dtype, OPTIONS["full_vocab"])
    dev = lambda t: t.cuda() if torch.is_tensor(t) else t  # noqa: E731
    h, w, b, y = map(dev, (h, w, b, y))
    kw = {k: dev(v) for k, v in kw.items()}
    got = run_linear(h, w, b, y, kw, backend, "mean", chunk_size=64)
    same = run_linear(h, w, b, y, kw, "torch", "mean")
    ref64 = run_linear(h.double(), w.double(), b.double(), y, upcast(kw), "torch", "mean")
    for name, a, s, r in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, same, ref64):
        assert_idiom(a, r, s, dtype, f"{backend} {name}")

"""rk.sample: statistical exactness against the float64 sort-based oracle, support, per-row
parameters, independence of draws, edge cases, determinism and every documented error.

Statistical tests: 100k draws per row; the total-variation distance between the empirical and the
exact filtered distribution must stay below 4x its expected value under pure sampling noise
(E|p^ - q| ~ sqrt(2 q (1 - q) / (pi N)) per token), and each test also checks that a plausibly
wrong distribution (e.g. the unfiltered one) would have failed that bound. Fixed seeds make the
tests deterministic.
"""

import math

import pytest
import torch

import rationale_kernels as rk
from rationale_kernels import _native
from rationale_kernels.reference.sample import filtered_probs

GPU = torch.cuda.is_available()
TRITON_DEV = "cuda" if GPU else "cpu"


def _cases():
    cases = [pytest.param("torch", "cpu", id="torch-cpu")]
    if _native.has_cpu():
        cases.append(pytest.param("cpu", "cpu", id="cpu"))
    if _native.has_triton() and (GPU or _native.triton_interpret()):
        cases.append(pytest.param("triton", TRITON_DEV, id=f"triton-{TRITON_DEV}"))
    cases.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu))
    cases.append(pytest.param("torch", "cuda", id="torch-cuda", marks=pytest.mark.gpu))
    return cases


CASES = _cases()
N_DRAWS = 100_000


def _skip_unbuilt(backend):
    if backend == "cuda" and not _native.has_cuda():
        pytest.skip("built without CUDA")


def _empirical(ids: torch.Tensor, V: int) -> torch.Tensor:
    ids = ids.cpu()
    counts = torch.zeros(ids.shape[0], V, dtype=torch.float64)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float64))
    return counts / ids.shape[1]


def _tv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a - b).abs().sum(-1)


def _tv_bound(q: torch.Tensor, n: int) -> torch.Tensor:
    """4x the expected TV distance of n draws from q (per row)."""
    expected = 0.5 * torch.sqrt(2 * q * (1 - q) / (math.pi * n)).sum(-1)
    return 4 * expected + 1e-4


def _tied_logits(B, V, seed):
    # integer-valued logits: many exact ties, so the tie rules of top-k / top-p / min-p matter
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 4, (B, V), generator=g).to(torch.float64) * 0.6


# --------------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("backend,device", CASES)
def test_matches_filtered_distribution_per_row(backend, device):
    _skip_unbuilt(backend)
    V = 16
    z = _tied_logits(5, V, seed=0)
    z[3, 2] = -math.inf
    z[3, 7] = -math.inf
    temperature = torch.tensor([1.0, 0.7, 1.5, 1.0, 2.0], dtype=torch.float64)
    top_k = torch.tensor([0, 5, 0, 8, 3])
    top_p = torch.tensor([1.0, 1.0, 0.8, 0.9, 0.95], dtype=torch.float64)
    min_p = torch.tensor([0.0, 0.0, 0.05, 0.2, 0.0], dtype=torch.float64)
    q = filtered_probs(z, temperature, top_k, top_p, min_p)
    unfiltered = torch.softmax(z / temperature[:, None], -1)
    dev = torch.device(device)
    ids, lp = rk.sample(
        z.float().to(dev),
        temperature=temperature.float().to(dev),
        top_k=top_k.to(dev),
        top_p=top_p.float().to(dev),
        min_p=min_p.float().to(dev),
        num_samples=N_DRAWS,
        seed=1234,
        return_logprobs=True,
        backend=backend,
    )
    assert ids.shape == (5, N_DRAWS) and ids.dtype == torch.int64
    ids = ids.cpu()
    # support: never a filtered-out token
    assert bool((q.gather(1, ids) > 0).all())
    emp = _empirical(ids, V)
    bound = _tv_bound(q, N_DRAWS)
    tv = _tv(emp, q)
    assert bool((tv < bound).all()), (tv, bound)
    # the test has power: the unfiltered distribution (rows 1-4 filter something) would fail
    assert bool((_tv(q, unfiltered)[1:] > 2 * bound[1:]).all())
    assert bool((_tv(emp, unfiltered)[1:] > bound[1:]).all())
    # and a per-row mix-up (row 1's parameters applied to row 3) would fail as well
    assert float(_tv(emp[3], q[1])) > float(bound[3])
    # log-probs under the filtered distribution
    torch.testing.assert_close(lp.cpu().double(), q.gather(1, ids).log(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend,device", CASES)
def test_scalar_params_and_independent_draws(backend, device):
    _skip_unbuilt(backend)
    V = 8
    z = torch.tensor([[1.0, 0.4, 0.4, -0.2, -1.0, 0.9, -3.0, 0.0]], dtype=torch.float64)
    q = filtered_probs(z, 0.8, 6, 0.9, 0.05)
    ids = rk.sample(
        z.float().to(device), temperature=0.8, top_k=6, top_p=0.9, min_p=0.05,
        num_samples=N_DRAWS, seed=7, backend=backend,
    ).cpu()  # fmt: skip
    assert bool((q.gather(1, ids) > 0).all())
    assert float(_tv(_empirical(ids, V), q)[0]) < float(_tv_bound(q, N_DRAWS)[0])
    # consecutive draws of the same row are independent: joint of pairs ~ q x q
    pairs = ids[0, 0::2] * V + ids[0, 1::2]
    joint = torch.bincount(pairs, minlength=V * V).double() / pairs.numel()
    qq = (q[0][:, None] * q[0][None, :]).reshape(-1)
    n = pairs.numel()
    assert float(_tv(joint, qq)) < float(_tv_bound(qq[None], n)[0])
    # a perfectly correlated pair (same token twice) would fail
    diag = torch.diag(q[0]).reshape(-1)
    assert float(_tv(joint, diag)) > float(_tv_bound(qq[None], n)[0])


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_and_f64_logits(backend, device, dtype):
    _skip_unbuilt(backend)
    n = 40_000
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(2, 24, generator=g) * 2).to(dtype)
    q = filtered_probs(z.double(), 1.0, 10, 0.85, 0.0)
    ids, lp = rk.sample(
        z.to(device), top_k=10, top_p=0.85, num_samples=n, seed=5, return_logprobs=True,
        backend=backend,
    )  # fmt: skip
    ids = ids.cpu()
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert bool((q.gather(1, ids) > 0).all())
    assert bool((_tv(_empirical(ids, 24), q) < _tv_bound(q, n)).all())


@pytest.mark.parametrize("backend,device", CASES)
def test_support_larger_vocab_and_strided_rows(backend, device):
    """V spans several Triton blocks / CUDA tiles; the rows are a strided view."""
    _skip_unbuilt(backend)
    g = torch.Generator().manual_seed(11)
    big = torch.randn(3, 3100, generator=g, dtype=torch.float64) * 3
    z = big[:, :3000]  # row stride 3100
    params = dict(temperature=0.9, top_k=torch.tensor([40, 0, 3000]), top_p=0.7)
    params["min_p"] = torch.tensor([0.0, 0.01, 0.0], dtype=torch.float64)
    q = filtered_probs(z, **params)
    dev_params = {
        k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in params.items()
    }
    dev_params["min_p"] = dev_params["min_p"].float()
    zz = big.float().to(device)[:, :3000]
    ids = rk.sample(zz, num_samples=3000, seed=2, backend=backend, **dev_params).cpu()
    assert bool((q.gather(1, ids) > 0).all())
    # the kept sets are large, so only a loose distribution check: mass-weighted coverage
    emp = _empirical(ids, 3000)
    assert bool((_tv(emp, q) < 0.25).all())


# --------------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("backend,device", CASES)
def test_edge_cases(backend, device):
    _skip_unbuilt(backend)
    kw = dict(seed=99, backend=backend)
    # V = 1
    ids, lp = rk.sample(torch.zeros(3, 1, device=device), num_samples=4, return_logprobs=True, **kw)
    assert bool((ids == 0).all()) and torch.allclose(lp.cpu(), torch.zeros(3, 4))
    z = torch.randn(4, 30, generator=torch.Generator().manual_seed(0)).to(device)
    base = rk.sample(z, num_samples=64, **kw)
    # top_k >= V and top_p = 1 and min_p = 0 are "off": the very same draws
    assert torch.equal(rk.sample(z, top_k=30, num_samples=64, **kw), base)
    assert torch.equal(rk.sample(z, top_k=1000, top_p=1.0, min_p=0.0, num_samples=64, **kw), base)
    # top_p tiny: only the argmax; top_k = 1 likewise
    am = z.argmax(1, keepdim=True)
    assert bool((rk.sample(z, top_p=1e-6, num_samples=64, **kw) == am).all())
    assert bool((rk.sample(z, top_k=1, num_samples=64, **kw) == am).all())
    # ties at the top: top_k=1 and tiny top_p keep every maximum
    zt = torch.tensor([[0.0, 2.0, 1.0, 2.0, -1.0]], device=device)
    for extra in (dict(top_k=1), dict(top_p=1e-3), dict(min_p=1.0)):
        s = rk.sample(zt, num_samples=2000, **kw, **extra).cpu()
        assert set(s.unique().tolist()) == {1, 3}
    # greedy: lowest id among equal maxima, log-prob 0, whatever the other filters
    ids, lp = rk.sample(zt, temperature=0.0, top_p=0.5, num_samples=3, return_logprobs=True, **kw)
    assert ids.tolist() == [[1, 1, 1]] and lp.abs().max().item() == 0.0
    # per-row temperature 0 next to sampled rows
    t = torch.tensor([0.0, 1.0, 0.0, 1.0], device=device)
    s = rk.sample(z, temperature=t, num_samples=50, **kw)
    assert bool((s[0] == am[0]).all()) and bool((s[2] == am[2]).all())
    assert s[1].unique().numel() > 1
    # -inf logits are never drawn
    zi = torch.full((2, 10), -math.inf, device=device)
    zi[0, 3] = 0.0
    zi[1, 2:5] = torch.tensor([1.0, 0.0, 1.0])
    s = rk.sample(zi, num_samples=500, **kw).cpu()
    assert bool((s[0] == 3).all()) and set(s[1].unique().tolist()) <= {2, 3, 4}
    # empty batch
    assert rk.sample(torch.zeros(0, 5, device=device), num_samples=3, **kw).shape == (0, 3)


@pytest.mark.parametrize("backend,device", CASES)
def test_bad_logits_raise(backend, device):
    _skip_unbuilt(backend)
    z = torch.zeros(3, 6, device=device)
    for bad, msg in ((math.nan, "NaN"), (math.inf, r"\+inf")):
        zb = z.clone()
        zb[1, 2] = bad
        with pytest.raises(ValueError, match=msg):
            rk.sample(zb, seed=0, backend=backend)
    zb = z.clone()
    zb[2] = -math.inf
    with pytest.raises(ValueError, match="row 2 is entirely -inf"):
        rk.sample(zb, seed=0, backend=backend)


@pytest.mark.parametrize("backend,device", CASES)
def test_seeds(backend, device):
    _skip_unbuilt(backend)
    z = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)).to(device)
    a = rk.sample(z, num_samples=32, seed=5, backend=backend)
    assert torch.equal(a, rk.sample(z, num_samples=32, seed=5, backend=backend))
    assert not torch.equal(a, rk.sample(z, num_samples=32, seed=6, backend=backend))
    # rows with identical inputs still draw independently
    zz = z[:1].expand(2, -1).contiguous()
    s = rk.sample(zz, num_samples=32, seed=5, backend=backend)
    assert not torch.equal(s[0], s[1])
    # torch.manual_seed / generator make seed=None reproducible
    torch.manual_seed(0)
    b = rk.sample(z, num_samples=32, backend=backend)
    torch.manual_seed(0)
    assert torch.equal(b, rk.sample(z, num_samples=32, backend=backend))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(
        rk.sample(z, num_samples=32, generator=g1, backend=backend),
        rk.sample(z, num_samples=32, generator=g2, backend=backend),
    )


def test_native_backends_share_the_philox_stream():
    """cpu and triton draw the same uniforms (csrc/philox.h == tl.randint), so they agree."""
    if not _native.has_cpu() or not (_native.has_triton() and _native.triton_interpret()):
        pytest.skip("needs the cpu backend and the Triton interpreter")
    z = torch.randn(3, 40, generator=torch.Generator().manual_seed(4))
    kw = dict(top_k=20, top_p=0.9, min_p=0.02, num_samples=500, seed=2**40 + 17)
    a = rk.sample(z, backend="cpu", **kw)
    b = rk.sample(z, backend="triton", **kw)
    assert (a == b).double().mean().item() > 0.99


@pytest.mark.gpu
def test_cuda_matches_cpu_stream():
    if not _native.has_cuda():
        pytest.skip("built without CUDA")
    z = torch.randn(64, 5000, generator=torch.Generator().manual_seed(4))
    kw = dict(top_k=50, top_p=0.9, min_p=0.01, num_samples=8, seed=123)
    a = rk.sample(z, backend="cpu", **kw)
    b = rk.sample(z.cuda(), backend="cuda", **kw).cpu()
    assert (a == b).double().mean().item() > 0.99
    if _native.has_triton():
        c = rk.sample(z.cuda(), backend="triton", **kw).cpu()
        assert (a == c).double().mean().item() > 0.99


# --------------------------------------------------------------------------------------------
# validation


def test_validation_errors():
    z = torch.randn(2, 5)
    cases = [
        (dict(logits=torch.randn(5)), ValueError, "2-D"),
        (dict(logits=torch.randn(2, 3, 5)), ValueError, "2-D"),
        (dict(logits=torch.randint(0, 3, (2, 5))), TypeError, "float32"),
        (dict(logits=torch.zeros(2, 0)), ValueError, "non-empty"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=math.nan), ValueError, "temperature"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_k=2.5), TypeError, "top_k"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(min_p=1.5), ValueError, "min_p"),
        (dict(min_p=-0.1), ValueError, "min_p"),
        (dict(num_samples=0), ValueError, "num_samples"),
        (dict(top_k=torch.tensor([1, 2, 3])), ValueError, "shape"),
        (dict(top_k=torch.tensor([1.0, 2.0])), TypeError, "integer"),
        (dict(top_p=torch.tensor([1, 1])), TypeError, "floating"),
        (dict(temperature=torch.tensor([1.0, -1.0])), ValueError, r"temperature\[1\]"),
        (dict(top_k=torch.tensor([1, -2])), ValueError, r"top_k\[1\]"),
        (dict(top_p=torch.tensor([0.0, 0.5])), ValueError, r"top_p\[0\]"),
        (dict(min_p=torch.tensor([0.5, 2.0])), ValueError, r"min_p\[1\]"),
        (dict(seed=1, generator=torch.Generator()), ValueError, "either seed or generator"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=2**63), ValueError, "seed"),
        (dict(generator=3), TypeError, "generator"),
        (dict(backend="nope"), ValueError, "backend"),
    ]
    for kw, exc, msg in cases:
        logits = kw.pop("logits", z)
        with pytest.raises(exc, match=msg):
            rk.sample(logits, **kw)
    if GPU:
        with pytest.raises(ValueError, match="device"):
            rk.sample(z.cuda(), top_k=torch.tensor([1, 2]))


def test_zero_dim_tensor_params_and_noncontiguous_columns():
    z = torch.randn(3, 40, generator=torch.Generator().manual_seed(8))
    a = rk.sample(z, temperature=torch.tensor(0.5), top_k=torch.tensor(5), seed=1, backend="torch")
    b = rk.sample(z, temperature=0.5, top_k=5, seed=1, backend="torch")
    assert torch.equal(a, b)
    wide = torch.randn(3, 80)
    ids = rk.sample(wide[:, ::2], top_k=3, num_samples=20, seed=0)
    q = filtered_probs(wide[:, ::2].double(), top_k=3)
    assert bool((q.gather(1, ids) > 0).all())


def test_custom_op_opcheck():
    """The torch.library registration (schema, fake impl) is consistent."""
    from rationale_kernels.ops.sample import _sample_op

    z = torch.randn(3, 20)
    backend = "cpu" if _native.has_cpu() else "torch"
    args = (z, None, 0.8, torch.tensor([0, 3, 5]), 0, None, 0.9, None, 0.0, 4, 17, backend)
    torch.library.opcheck(_sample_op, args, test_utils=("test_schema", "test_faketensor"))

"""preference_loss, preference_pairs and fused_linear_dpo_loss against the formulas written out in
reference/preference_loss.py (float64) and the materialising reference composition."""

import math

import pytest
import torch

import rationale_kernels as rk
from rationale_kernels import _native
from rationale_kernels.ops import preference_loss as pref_ops
from rationale_kernels.ops import sequence_logprobs as seq_ops
from rationale_kernels.reference import preference_loss as ref
from rationale_kernels.reference import sequence_logprobs as seq_ref

BACKENDS = (
    ["torch"]
    + (["cpu"] if _native.has_cpu() else [])
    + (["triton"] if _native.has_triton() else [])
)
CASES = [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.0), ("robust", 0.3), ("hinge", 0.0),
         ("ipo", 0.0)]  # fmt: skip


def _logps(C, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pi = (torch.randn(C, generator=g, dtype=torch.float64) * 3 - 20).to(dtype)
    refl = (pi.double() + torch.randn(C, generator=g, dtype=torch.float64)).to(dtype)
    return pi, refl


PAIRS = torch.tensor([[0, 1], [2, 1], [0, 3], [4, 5], [5, 4], [0, 5]])


@pytest.mark.parametrize("loss_type,eps", CASES)
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_loss_matches_published_formula(loss_type, eps, beta):
    pi, refl = _logps(6)
    pi.requires_grad_()
    loss, _ = rk.preference_loss(pi, refl, PAIRS, beta=beta, loss_type=loss_type,
                                 label_smoothing=eps)  # fmt: skip
    (g,) = torch.autograd.grad(loss, pi)
    x = pi.detach().clone().requires_grad_()
    want = ref.preference_loss(x, refl, PAIRS, beta, loss_type, eps)
    (gw,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, gw, rtol=1e-10, atol=1e-12)
    # float32 inputs: float32 loss within float32 accuracy of the float64 formula
    l32, _ = rk.preference_loss(pi.detach().float(), refl.float(), PAIRS, beta=beta,
                                loss_type=loss_type, label_smoothing=eps)  # fmt: skip
    assert l32.dtype == torch.float32
    torch.testing.assert_close(l32.double(), want, rtol=1e-5, atol=1e-6)


def test_sigmoid_loss_value_by_hand():
    # one pair, Δ = (−1 − −3) − (−4 − −2) = 4, β = 0.5: −log σ(2)
    pi = torch.tensor([-1.0, -4.0], dtype=torch.float64)
    refl = torch.tensor([-3.0, -2.0], dtype=torch.float64)
    loss, m = rk.preference_loss(pi, refl, torch.tensor([[0, 1]]), beta=0.5)
    assert abs(float(loss) - math.log1p(math.exp(-2.0))) < 1e-12
    assert float(m["chosen_rewards"][0]) == 1.0 and float(m["rejected_rewards"][0]) == -1.0
    assert float(m["margins"][0]) == 2.0 and float(m["accuracy"]) == 1.0


def test_candidate_in_several_pairs_gets_summed_gradient():
    pi, refl = _logps(6, seed=3)
    x = pi.clone().requires_grad_()
    loss, _ = rk.preference_loss(x, refl, PAIRS, beta=0.7)
    (g,) = torch.autograd.grad(loss, x)
    want = torch.zeros_like(pi)
    for p in range(PAIRS.shape[0]):  # each pair alone, weighted 1/P as in the mean
        xp = pi.clone().requires_grad_()
        lp, _ = rk.preference_loss(xp, refl, PAIRS[p : p + 1], beta=0.7)
        want += torch.autograd.grad(lp / PAIRS.shape[0], xp)[0]
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-14)
    assert g[0] != 0 and g[5] != 0  # candidates 0 and 5 appear in three pairs each


def test_metrics_and_reference_gets_no_gradient():
    pi = torch.tensor([-1.0, -2.0, -3.0, -3.0])
    refl = torch.tensor([-1.5, -1.0, -3.0, -3.0], requires_grad=True)
    pairs = torch.tensor([[0, 1], [1, 0], [2, 3]])
    loss, m = rk.preference_loss(pi.clone().requires_grad_(), refl, pairs, beta=2.0)
    loss.backward()
    assert refl.grad is None
    torch.testing.assert_close(m["chosen_rewards"], torch.tensor([1.0, -2.0, 0.0]))
    torch.testing.assert_close(m["rejected_rewards"], torch.tensor([-2.0, 1.0, 0.0]))
    torch.testing.assert_close(m["margins"], torch.tensor([3.0, -3.0, 0.0]))
    torch.testing.assert_close(m["chosen_logps"], torch.tensor([-1.0, -2.0, -3.0]))
    assert abs(float(m["accuracy"]) - 1 / 3) < 1e-7  # the tie counts as wrong
    assert all(not v.requires_grad for v in m.values())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_type="dpo"), "loss_type"),
        (dict(beta=0.0), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
        (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
        (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
        (dict(loss_type="sigmoid", label_smoothing=0.7), "label_smoothing"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
    ],
)
def test_bad_options(kwargs, match):
    pi, refl = _logps(6)
    with pytest.raises(ValueError, match=match):
        rk.preference_loss(pi, refl, PAIRS, **kwargs)


def test_bad_pairs_and_logps():
    pi, refl = _logps(6)
    with pytest.raises(ValueError, match="out of range"):
        rk.preference_loss(pi, refl, torch.tensor([[0, 6]]))
    with pytest.raises(ValueError, match="out of range"):
        rk.preference_loss(pi, refl, torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="itself"):
        rk.preference_loss(pi, refl, torch.tensor([[0, 1], [2, 2]]))
    with pytest.raises(ValueError, match="at least one pair"):
        rk.preference_loss(pi, refl, torch.empty((0, 2), dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[P, 2\]"):
        rk.preference_loss(pi, refl, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="int32/int64"):
        rk.preference_loss(pi, refl, torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="candidates"):
        rk.preference_loss(pi, refl[:5], PAIRS)
    with pytest.raises(ValueError, match="1-D"):
        rk.preference_loss(pi[None], refl[None], PAIRS)
    with pytest.raises(TypeError, match="floating-point"):
        rk.preference_loss(pi.long(), refl, PAIRS)
    with pytest.raises(ValueError, match="meta"):
        rk.preference_loss(pi, refl.to("meta"), PAIRS)
    with pytest.raises(ValueError, match="meta"):
        rk.preference_loss(pi, refl, PAIRS.to("meta"))


# --------------------------------------------------------------------------------------------
# preference_pairs


def test_pairs_best_vs_worst_ties_and_singletons():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0, 0.0, 5.0, 2.0, 2.0, 7.0, 4.0])
    groups = torch.tensor([10, 10, 10, 10, 10, 3, 7, 7, 11, 11])
    pairs = rk.preference_pairs(scores, groups)
    # group 3: single candidate -> skipped; group 7: all tied -> skipped;
    # group 10: best = lowest index of the maxima (1), worst = highest index of the minima (4)
    assert pairs.tolist() == [[1, 4], [8, 9]]
    assert pairs.dtype == torch.int64


def test_pairs_all_pairs():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0, 9.0, 2.0, 2.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    pairs = rk.preference_pairs(scores, groups, mode="all_pairs")
    assert pairs.tolist() == [[0, 3], [1, 0], [1, 3], [2, 0], [2, 3]]  # ties never pair
    for c, r in pairs.tolist():
        assert scores[c] > scores[r] and groups[c] == groups[r]


def test_pairs_deterministic_under_group_order():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (40,), generator=g).double()
    groups = torch.randint(0, 6, (40,), generator=g)
    a = rk.preference_pairs(scores, groups, mode="all_pairs")
    b = rk.preference_pairs(scores.clone(), groups.clone(), mode="all_pairs")
    assert torch.equal(a, b)
    bvw = rk.preference_pairs(scores, groups)
    for c, r in bvw.tolist():  # best and worst of their group
        same = groups == groups[c]
        assert scores[c] == scores[same].max() and scores[r] == scores[same].min()


def test_pairs_bad_input():
    s = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="mode"):
        rk.preference_pairs(s, torch.tensor([0, 0]), mode="best")
    with pytest.raises(ValueError, match="NaN"):
        rk.preference_pairs(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="shape"):
        rk.preference_pairs(s, torch.tensor([0, 0, 1]))
    with pytest.raises(TypeError, match="integer"):
        rk.preference_pairs(s, torch.tensor([0.0, 0.0]))
    with pytest.raises(TypeError, match="1-D floating"):
        rk.preference_pairs(torch.tensor([1, 2]), torch.tensor([0, 0]))
    assert rk.preference_pairs(s, torch.tensor([0, 1])).shape == (0, 2)


# --------------------------------------------------------------------------------------------
# fused_linear_dpo_loss


def _dpo_case(C=6, H=16, V=37, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([5, 0, 7, 3, 6, 4][:C])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    N = int(cu[-1])
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[0] = labels[7] = -100  # prompt tokens
    refl = -torch.rand(C, generator=g, dtype=torch.float64) * 30
    return hidden, weight, bias, labels, cu, refl


def _ref_dpo(hidden, weight, bias, labels, cu, refl, pairs, average, **kw):
    logits = torch.nn.functional.linear(hidden.double(), weight.double(), bias.double())
    logps = seq_ref.sequence_logprobs(logits, labels, cu_seqlens=cu, average=average)
    return ref.preference_loss(logps, refl, pairs, kw["beta"], kw["loss_type"],
                               kw.get("label_smoothing", 0.0))  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize(
    "loss_type,eps", [("sigmoid", 0.1), ("ipo", 0.0), ("robust", 0.2), ("hinge", 0.0)]
)
@pytest.mark.parametrize("one_pass", [True, False])
def test_fused_dpo_matches_reference(backend, average, loss_type, eps, one_pass, monkeypatch):
    if not one_pass:  # every component "too big": score first, recompute in the backward
        if backend == "torch":
            pytest.skip("the torch backend always scores first")
        monkeypatch.setattr(pref_ops, "_DPO_MAX_CHUNK_BYTES", {"cpu": 0})
    hidden, weight, bias, labels, cu, refl = _dpo_case()
    # candidate 3 is in no pair; candidate 0 is in three; candidate 1 is empty (log-prob 0)
    pairs = torch.tensor([[0, 2], [4, 0], [0, 5], [1, 2]])
    kw = dict(beta=0.3 if loss_type != "hinge" else 0.02, loss_type=loss_type, label_smoothing=eps)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, m = rk.fused_linear_dpo_loss(leaves[0], leaves[1], labels, cu, refl, pairs,
                                       bias=leaves[2], average=average, chunk_size=4,
                                       backend=backend, **kw)  # fmt: skip
    grads = torch.autograd.grad(loss, leaves)
    rl = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    want = _ref_dpo(*rl, labels, cu, refl, pairs, average, **kw)
    wgrads = torch.autograd.grad(want, rl)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, wgrads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert m["margins"].shape == (4,)
    # candidate 3 (rows 12:15) is in no pair: no gradient reaches its hidden states
    assert torch.count_nonzero(grads[0][12:15]) == 0


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_fused_dpo_padded_matches_packed(backend):
    hidden, weight, bias, labels, cu, refl = _dpo_case()
    C, T, H = 6, 7, hidden.shape[1]
    hp = torch.zeros(C, T, H, dtype=hidden.dtype)
    yp = torch.full((C, T), -100)
    for s in range(C):
        n = int(cu[s + 1] - cu[s])
        hp[s, :n], yp[s, :n] = hidden[cu[s] : cu[s + 1]], labels[cu[s] : cu[s + 1]]
    pairs = torch.tensor([[0, 2], [4, 0], [3, 5]])
    a, _ = rk.fused_linear_dpo_loss(hidden, weight, labels, cu, refl, pairs, backend=backend)
    b, _ = rk.fused_linear_dpo_loss(hp, weight, yp, None, refl, pairs, backend=backend)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("chunk_size", [1, 10, 1000])
def test_fused_dpo_interleaved_components(backend, chunk_size):
    """Components (0, 3)-(5, 3) and (1, 2)-(4, 2) interleave in candidate order; with a large chunk
    they share one chunk, with a small one each gets its own."""
    hidden, weight, bias, labels, cu, refl = _dpo_case()
    pairs = torch.tensor([[0, 3], [2, 1], [5, 3], [4, 2]])
    kw = dict(beta=0.5, loss_type="sigmoid")
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    loss, m = rk.fused_linear_dpo_loss(leaves[0], leaves[1], labels, cu, refl, pairs,
                                       chunk_size=chunk_size, backend=backend, **kw)  # fmt: skip
    grads = torch.autograd.grad(loss, leaves)
    rl = [t.clone().requires_grad_() for t in (hidden, weight)]
    want = _ref_dpo(rl[0], rl[1], torch.zeros_like(bias), labels, cu, refl, pairs, False, **kw)
    wgrads = torch.autograd.grad(want, rl)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, wgrads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    logits = torch.nn.functional.linear(hidden, weight)
    logps = seq_ref.sequence_logprobs(logits, labels, cu_seqlens=cu)
    torch.testing.assert_close(m["chosen_logps"], logps[pairs[:, 0]], rtol=1e-10, atol=1e-12)


def test_fused_dpo_scores_each_candidate_once(monkeypatch):
    if not _native.has_cpu():
        pytest.skip("needs the cpu backend")
    hidden, weight, bias, labels, cu, refl = _dpo_case()
    rows = []
    orig = seq_ops._launch_fwd

    def counting(backend, logits, labels, ignore_index):
        rows.append(logits.shape[0] * logits.shape[1])
        return orig(backend, logits, labels, ignore_index)

    monkeypatch.setattr(seq_ops, "_launch_fwd", counting)
    pairs = torch.tensor([[0, 2], [2, 0], [0, 5], [5, 2], [2, 5]])  # 0, 2, 5 in many pairs
    rk.fused_linear_dpo_loss(hidden, weight, labels, cu, refl, pairs, backend="cpu")
    lens = (cu[1:] - cu[:-1]).tolist()
    assert sum(rows) == lens[0] + lens[2] + lens[5]


def test_fused_dpo_bad_input():
    hidden, weight, bias, labels, cu, refl = _dpo_case()
    pairs = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="one per candidate"):
        rk.fused_linear_dpo_loss(hidden, weight, labels, cu, refl[:5], pairs)
    with pytest.raises(ValueError, match="out of range"):
        rk.fused_linear_dpo_loss(hidden, weight, labels, cu, refl, torch.tensor([[0, 6]]))
    with pytest.raises(ValueError, match="end at"):
        rk.fused_linear_dpo_loss(hidden, weight, labels, cu[:-1], refl[:5], pairs)
    with pytest.raises(ValueError, match="padded"):
        rk.fused_linear_dpo_loss(hidden, weight, labels, None, refl, pairs)
    with pytest.raises(ValueError, match="beta"):
        rk.fused_linear_dpo_loss(hidden, weight, labels, cu, refl, pairs, beta=-1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_fused_dpo_matches_reference(backend):
    if backend == "cuda" and not _native.has_cuda():
        pytest.skip("built without CUDA")
    hidden, weight, bias, labels, cu, refl = _dpo_case(V=5003)
    pairs = torch.tensor([[0, 2], [4, 0], [0, 5], [1, 2]])
    kw = dict(beta=0.3, loss_type="sigmoid", label_smoothing=0.1)
    leaves = [t.cuda().requires_grad_() for t in (hidden, weight, bias)]
    loss, _ = rk.fused_linear_dpo_loss(leaves[0], leaves[1], labels.cuda(), cu.cuda(),
                                       refl.cuda(), pairs.cuda(), bias=leaves[2],
                                       backend=backend, **kw)  # fmt: skip
    grads = torch.autograd.grad(loss, leaves)
    rl = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    want = _ref_dpo(*rl, labels, cu, refl, pairs, False, **kw)
    wgrads = torch.autograd.grad(want, rl)
    torch.testing.assert_close(loss.cpu(), want, rtol=1e-9, atol=1e-11)
    for a, b in zip(grads, wgrads):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("one_pass", [True, False])
def test_fused_dpo_normalizer_splits_add_up(backend, one_pass, monkeypatch):
    """Data parallelism: two shards of the pairs, each normalised by the global pair count, give
    losses and gradients that sum to the one-shard mean (preference_loss too)."""
    if not one_pass:
        if backend == "torch":
            pytest.skip("the torch backend always scores first")
        monkeypatch.setattr(pref_ops, "_DPO_MAX_CHUNK_BYTES", {"cpu": 0})
    hidden, weight, bias, labels, cu, refl = _dpo_case()
    pairs = torch.tensor([[0, 2], [4, 0], [0, 5], [3, 2], [5, 4]])
    kw = dict(beta=0.3, loss_type="sigmoid", label_smoothing=0.1, backend=backend, bias=bias)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    full, _ = rk.fused_linear_dpo_loss(leaves[0], leaves[1], labels, cu, refl, pairs, **kw)
    want = torch.autograd.grad(full, leaves)
    parts, got = [], [torch.zeros_like(t) for t in leaves]
    for shard, norm in ((pairs[:2], 5.0), (pairs[2:], torch.tensor(5.0, dtype=torch.float64))):
        lv = [t.clone().requires_grad_() for t in (hidden, weight)]
        part, _ = rk.fused_linear_dpo_loss(lv[0], lv[1], labels, cu, refl, shard, normalizer=norm,
                                           **kw)  # fmt: skip
        for acc, g in zip(got, torch.autograd.grad(part, lv)):
            acc += g
        parts.append(part)
    torch.testing.assert_close(parts[0] + parts[1], full, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    pi, rl = _logps(6)
    a, _ = rk.preference_loss(pi, rl, pairs[:2], normalizer=5)
    b, _ = rk.preference_loss(pi, rl, pairs[2:], normalizer=5)
    c, _ = rk.preference_loss(pi, rl, pairs)
    torch.testing.assert_close(a + b, c, rtol=1e-12, atol=1e-12)
    for bad in (0, -1.0, "5", torch.ones(2)):
        with pytest.raises(ValueError, match="normalizer"):
            rk.preference_loss(pi, rl, pairs, normalizer=bad)
        with pytest.raises(ValueError, match="normalizer"):
            rk.fused_linear_dpo_loss(hidden, weight, labels, cu, refl, pairs, normalizer=bad)

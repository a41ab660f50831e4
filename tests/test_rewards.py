"""MaRio rewards, the reward registry, and the quantiser / control tokens.

The consistency reward runs on a tiny random Llama with a character-level tokenizer built locally
(no downloads) and is checked against a direct float64 log_softmax + gather computation."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from rationale_train import rewards as R
from rationale_train.data import Example, synthetic_task, verify_steps
from rationale_train.quantize import (
    best_code,
    control_code,
    control_token,
    control_tokens,
    num_bins,
    quantize,
    quantize_binary,
    quantize_rewards,
)

_spec = importlib.util.spec_from_file_location("_tiny_lm", Path(__file__).with_name("_tiny_lm.py"))
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


def bins(values, k):
    return quantize(values, k).tolist()


# ------------------------------------------------------------------------------------ quantiser


def test_quantize_hand_worked_remainder_to_worst_bin():
    # N = 7, K = 3: bin size 2; descending: .9(1) .7(5) | .5(2) .5(3) | .3(4) .2(6) .1(0)
    v = [0.1, 0.9, 0.5, 0.5, 0.3, 0.7, 0.2]
    assert bins(v, 3) == [2, 0, 1, 1, 2, 0, 2]
    counts = torch.bincount(quantize(v, 3), minlength=3).tolist()
    assert counts == [2, 2, 3]  # remainder N % K = 1 goes to the worst bin


def test_quantize_ties_keep_pool_order():
    assert bins([1.0, 1.0, 1.0, 1.0], 2) == [0, 0, 1, 1]
    # three tied 1s straddle the boundary: the earliest two rank first
    assert bins([0, 1, 1, 0, 1], 2) == [1, 0, 0, 1, 1]
    assert bins([3.0, 3.0, 3.0], 3) == [0, 1, 2]
    # -0.0 and 0.0 are a tie too
    assert bins([-0.0, 0.0], 2) == [0, 1]


def test_quantize_equal_counts():
    g = torch.Generator().manual_seed(0)
    for n, k in [(10, 5), (11, 5), (14, 5), (100, 7), (5, 5), (6, 5)]:
        q = quantize(torch.rand(n, generator=g), k)
        s = n // k
        assert torch.bincount(q, minlength=k).tolist() == [s] * (k - 1) + [s + n % k]


def test_quantize_order_is_by_value():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(50, generator=g)
    q = quantize(v, 4)
    for a in range(4):
        for b in range(a + 1, 4):
            assert v[q == a].min() >= v[q == b].max()  # every better bin beats every worse one


def test_quantize_fewer_samples_than_bins():
    # N < K: one sample per bin, top-down; bins N..K-1 stay empty
    assert bins([0.2, 0.8, 0.5], 5) == [2, 0, 1]
    assert bins([7.0], 5) == [0]
    assert bins([1.0, 1.0], 4) == [0, 1]


def test_quantize_edge_cases_and_errors():
    assert quantize([], 3).tolist() == []
    assert quantize([], 3).dtype == torch.long
    assert bins([3, 1, 2], 1) == [0, 0, 0]
    assert bins([float("inf"), 0.0, -float("inf"), 1.0], 2) == [0, 1, 1, 0]
    t = torch.tensor([0.5, 0.1, 0.9], dtype=torch.bfloat16)
    assert quantize(t, 3).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="NaN"):
        quantize([0.1, float("nan")], 2)
    for k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_bins"):
            quantize([1.0, 2.0], k)
    with pytest.raises(ValueError, match="1-D"):
        quantize(torch.zeros(2, 2), 2)


def test_requantize_as_pool_grows():
    pool = [5.0, 4.0, 3.0, 2.0]
    assert bins(pool, 2) == [0, 0, 1, 1]
    pool += [6.0, 6.0]  # two better samples arrive: 4.0 drops from bin 0 to bin 1
    assert bins(pool, 2) == [0, 1, 1, 1, 0, 0]
    pool += [0.0, 1.0, 4.5]  # N = 9, K = 2: bin size 4 (6 6 5 4.5), the rest (5) in bin 1
    assert bins(pool, 2) == [0, 1, 1, 1, 0, 0, 1, 1, 0]
    # K = 3 on the same pool: size 3 -> (6 6 5) (4.5 4 3) (2 1 0)
    assert bins(pool, 3) == [0, 1, 1, 2, 0, 0, 2, 2, 1]


def test_quantize_binary_and_pool():
    assert quantize_binary([1.0, 0.0, 1, 0]).tolist() == [0, 1, 0, 1]
    assert quantize_binary([0.7, 0.2], threshold=0.5).tolist() == [0, 1]
    pool = {"correctness": [1.0, 1.0, 1.0, 0.0], "diversity": [0.1, 0.4, 0.3, 0.2]}
    q = quantize_rewards(pool, 4)
    # correctness: by value, not equal counts (three correct samples all in bin 0)
    assert q["correctness"].tolist() == [0, 0, 0, 1]
    assert q["diversity"].tolist() == [3, 0, 1, 2]
    with pytest.raises(ValueError, match="same samples"):
        quantize_rewards({"correctness": [1.0], "diversity": [0.1, 0.2]}, 2)


def test_control_tokens():
    names = ["correctness", "diversity", "plausibility"]
    assert num_bins("correctness", 5) == 2 and num_bins("consistency", 5) == 5
    toks = control_tokens(names, 3)
    assert toks == [
        "<|correct_0|>", "<|correct_1|>",
        "<|div_0|>", "<|div_1|>", "<|div_2|>",
        "<|plaus_0|>", "<|plaus_1|>", "<|plaus_2|>",
    ]  # fmt: skip
    assert len(set(control_tokens(R.available_rewards(), 5))) == 2 + 3 * 5
    assert best_code(names) == "<|correct_0|><|div_0|><|plaus_0|>"
    assert best_code("consistency") == "<|consist_0|>"
    q = quantize_rewards({"correctness": [0.0, 1.0], "plausibility": [0.3, 0.9]}, 3)
    code = control_code({n: q[n][0] for n in q})
    assert code == ["<|correct_1|>", "<|plaus_1|>"]
    assert control_code({"plausibility": 2, "correctness": 0}) == ["<|plaus_2|>", "<|correct_0|>"]
    assert set(code) <= set(control_tokens(["correctness", "plausibility"], 3))
    assert control_token("diversity", torch.tensor(4)) == "<|div_4|>"
    with pytest.raises(ValueError, match="out of range"):
        control_token("correctness", 2)
    with pytest.raises(ValueError, match="out of range"):
        control_token("diversity", -1)
    with pytest.raises(TypeError, match="integer"):
        control_code({"diversity": 1.5})
    with pytest.raises(ValueError, match="repeat"):
        control_tokens(["diversity", "diversity"], 2)
    with pytest.raises(ValueError, match="unknown reward"):
        control_tokens(["nope"], 2)


# ------------------------------------------------------------------------------------ diversity


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a b a b", (2 / 3) * 1 * 1),  # rep_2 = 1 - 2/3, no repeated 3-/4-grams
        ("a  b\na\tb", 2 / 3),  # any whitespace splits
        ("a a a a a", (1 / 4) * (1 / 3) * (1 / 2)),
        ("x y x y x y", (2 / 5) * (2 / 4) * (2 / 3)),
        ("the cat sat on the mat", 1.0),
        ("the cat the cat", (2 / 3) * 1 * 1),
        ("A a A a", (2 / 3)),  # case-sensitive: "A a" and "a A" differ
        ("", 1.0),  # no n-gram of any size: rep_n = 0
        ("word", 1.0),
        ("two words", 1.0),
        ("a a", 1.0),  # one 2-gram is unique; no 3-/4-grams
        ("a a a", 1 / 2),  # 2-grams (a a)(a a): rep_2 = 1/2; one 3-gram
    ],
)
def test_diversity_hand_computed(text, expected):
    assert math.isclose(R.diversity_score(text), expected, rel_tol=1e-12)


def test_diversity_reward_batch():
    rats = ["a b a b", "", "a a a a a"]
    out = R.get_reward("diversity")([None] * 3, rats, [None] * 3)
    assert out == [R.diversity_score(r) for r in rats]
    assert R.diversity_score("a b a b a b", orders=(2,)) == 2 / 5


# ---------------------------------------------------------------------------------- correctness

MC = Example("mc", "which is a planet? (A) pluto (B) earth", ["pluto", "earth"], "(B)")
YN = Example("yn", "is ice cold?", None, "Yes")
NUM = Example("num", "what is 2+3?", None, "1000")


@pytest.mark.parametrize(
    "ex, pred, ok",
    [
        (MC, "(B)", 1.0),
        (MC, "(b)", 1.0),
        (MC, " B. ", 1.0),
        (MC, "b", 1.0),
        (MC, "earth", 1.0),  # the gold choice's text
        (MC, "(B) Earth.", 1.0),
        (MC, "(A)", 0.0),
        (MC, "pluto", 0.0),
        (MC, None, 0.0),
        (MC, "", 0.0),
        (YN, "yes.", 1.0),
        (YN, "YES", 1.0),
        (YN, "no", 0.0),
        (NUM, "1,000", 1.0),
        (NUM, "1000.0", 1.0),
        (NUM, "$1000", 1.0),
        (NUM, "100", 0.0),
        (NUM, "10000", 0.0),
    ],
)
def test_correctness(ex, pred, ok):
    assert R.correctness([ex], ["r"], [pred]) == [ok]


def test_correctness_batch_and_dicts():
    exs = [MC, {"answer": "5", "choices": None}, YN]
    assert R.get_reward("correctness")(exs, ["", "", ""], ["(b)", "5.", None]) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="one entry per rationale"):
        R.correctness([MC], ["a", "b"], [None, None])


# ------------------------------------------------------------------------------------- registry


@pytest.fixture
def registry():
    saved = dict(R._REGISTRY)
    yield
    R._REGISTRY.clear()
    R._REGISTRY.update(saved)


def test_registry_builtins():
    assert {"correctness", "diversity", "consistency", "plausibility"} <= set(R.available_rewards())
    assert R.available_rewards() == sorted(R.available_rewards())
    assert R.reward_spec("correctness").binary and not R.reward_spec("diversity").binary
    assert isinstance(R.get_reward("consistency", batch_size=3), R.Consistency)
    assert R.get_reward("consistency", batch_size=3).batch_size == 3
    assert isinstance(R.get_reward("plausibility"), R.Plausibility)


def test_registry_unknown_name():
    with pytest.raises(ValueError, match=r"unknown reward 'nope'.*correctness.*register_reward"):
        R.get_reward("nope")


def test_register_custom_reward(registry):
    @R.register_reward("length", code="len")
    def length(examples, rationales, answers, scale=1.0, **ctx):
        return [scale * len(r.split()) for r in rationales]

    assert "length" in R.available_rewards()
    assert R.get_reward("length") is length
    assert R.get_reward("length", scale=2.0)([None], ["a b c"], [None]) == [6.0]
    assert control_tokens(["length"], 2) == ["<|len_0|>", "<|len_1|>"]

    class Const(R.Reward):
        def __init__(self, value=0.5):
            self.value = value

        def __call__(self, examples, rationales, answers, **ctx):
            return [self.value] * len(rationales)

    R.register_reward("const", Const, binary=True)
    assert R.get_reward("const", value=1.0)([None], ["x"], [None]) == [1.0]
    assert best_code(["const", "length"]) == "<|const_0|><|len_0|>"
    assert num_bins("const", 9) == 2

    out = R.compute_rewards(["length", "diversity"], [None] * 2, ["a b", "a b a b"], [None] * 2)
    assert out == {"length": [2.0, 4.0], "diversity": [1.0, 2 / 3]}
    out = R.compute_rewards({"c": Const(0.25)}, [None], ["x"], [None])
    assert out == {"c": [0.25]}

    with pytest.raises(ValueError, match="already registered"):
        R.register_reward("length", length)
    with pytest.raises(ValueError, match="already used"):
        R.register_reward("length2", length, code="len")
    R.register_reward("length", Const, overwrite=True)
    assert isinstance(R.get_reward("length"), Const)
    with pytest.raises(ValueError, match="code"):
        R.register_reward("bad code", length)
    with pytest.raises(TypeError, match="callable"):
        R.register_reward("notcallable", 3)


def test_compute_rewards_checks(registry):
    R.register_reward("short", lambda e, r, a, **c: [1.0])
    R.register_reward("nan", lambda e, r, a, **c: [float("nan")] * len(r))
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        R.compute_rewards(["short"], [None] * 2, ["a", "b"], [None] * 2)
    with pytest.raises(ValueError, match="non-finite"):
        R.compute_rewards(["nan"], [None], ["a"], [None])
    with pytest.raises(ValueError, match="one entry per rationale"):
        R.compute_rewards(["diversity"], [None], ["a", "b"], [None])


# ---------------------------------------------------------------------------------- consistency


@pytest.fixture(scope="module")
def tok():
    return tiny.tiny_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    return tiny.tiny_llama(vocab_size=len(tok), hidden=32, layers=2, heads=4, seed=0)


def direct_logprob(model, tok, prompt, choice, average=True):
    """float64 log_softmax + gather over the whole text, one row, no padding. The char-level
    tokenizer maps characters to tokens one to one, so the continuation is the last
    len(trailing whitespace of the prompt) + len(choice) tokens."""
    n = len(prompt) - len(prompt.rstrip()) + len(choice)
    ids = torch.tensor([tok(prompt + choice)["input_ids"]])
    with torch.no_grad():
        logp = model(ids).logits[0].double().log_softmax(-1)
    tgt = ids[0, 1:]
    lp = logp[:-1].gather(-1, tgt[:, None])[:, 0][-n:]
    return float(lp.mean() if average else lp.sum())


PROMPTS = ["is ice cold? so the answer is ", "a", "what is 2+3? x = 5. so the answer is"]
CHOICES = [["(a).", "(b)."], ["b", "bcd", "b c d e f g"], ["5.", " 57."]]


@pytest.mark.parametrize("average", [True, False])
def test_choice_logprobs_vs_direct_float64(lm, tok, average):
    out = R.choice_logprobs(lm, tok, PROMPTS, CHOICES, batch_size=2, average=average)
    assert [o.shape for o in out] == [torch.Size([len(c)]) for c in CHOICES]
    for p, cs, o in zip(PROMPTS, CHOICES, out):
        assert o.dtype == torch.float32
        ref = torch.tensor(
            [direct_logprob(lm, tok, p, c, average) for c in cs], dtype=torch.float64
        )
        torch.testing.assert_close(o.double(), ref, atol=2e-5, rtol=1e-5)
    one = R.choice_logprobs(lm, tok, PROMPTS, CHOICES, batch_size=100, average=average)
    for a, b in zip(out, one):  # batching does not change the scores
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_choice_logprobs_keeps_only_answer_logits(lm, tok):
    seen = []
    h = lm.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("logits_to_keep")), with_kwargs=True
    )
    try:
        out = R.choice_logprobs(lm, tok, PROMPTS, CHOICES, batch_size=2)
    finally:
        h.remove()
    assert seen and all(k is not None for k in seen)  # the prompts are longer than the answers

    class NoKeep(torch.nn.Module):  # a model whose forward takes no logits_to_keep
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return self.inner(input_ids, attention_mask=attention_mask, position_ids=position_ids)

    full = R.choice_logprobs(NoKeep(lm), tok, PROMPTS, CHOICES, batch_size=2)
    for a, b in zip(out, full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_answer_tokens_as_in_training_text_bpe():
    """With a byte-level BPE the prompt's trailing space belongs to the answer's first token, as
    in the training text: "... is" + " yes" -> "Ġyes", not "Ġ" + "yes"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    bpe.train_from_iterator(["So the answer is yes. So the answer is no."] * 20, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", pad_token="<pad>")
    prompt = "q? So the answer is "
    ((_, _, ctx, cont),) = R._context_continuation(t, [prompt], [["yes."]])
    assert ctx + cont == t(prompt + "yes.")["input_ids"]
    assert t.convert_ids_to_tokens(cont) == ["Ġyes", "."]


def test_choice_logprobs_edge_cases(lm, tok):
    assert R.choice_logprobs(lm, tok, [], []) == []
    out = R.choice_logprobs(lm, tok, ["abc", "de"], [[], ["f"]])
    assert out[0].numel() == 0 and out[1].numel() == 1
    lm.train()
    R.choice_logprobs(lm, tok, ["abc"], [["d"]])
    assert lm.training  # mode restored
    lm.eval()
    with pytest.raises(ValueError, match="same length"):
        R.choice_logprobs(lm, tok, ["a"], [["b"], ["c"]])
    with pytest.raises(ValueError, match="tokenises to nothing"):
        R.choice_logprobs(lm, tok, ["a"], [[""]])
    with pytest.raises(TypeError, match="list of strings"):
        R.choice_logprobs(lm, tok, ["a"], ["bc"])


def consistency_examples():
    return [
        Example("m1", "is ice cold? (a) yes (b) no", ["yes", "no"], "(a)"),
        Example("m2", "pick two: (a) one (b) two (c) three", ["one", "two", "three"], "(b)"),
        Example("v1", "what is 2+3? (a) 5 (b) 6", ["5", "6"], "5"),  # text answer
        Example("f1", "what is 2+3?", None, "5"),  # free-form
        Example("y1", "is fire hot?", None, "yes"),  # yes / no without choices
    ]


def test_answer_options():
    exs = consistency_examples()
    assert R.answer_options(exs[0]) == (["(a).", "(b)."], 0)
    assert R.answer_options(exs[1]) == (["(a).", "(b).", "(c)."], 1)
    assert R.answer_options(exs[2]) == (["5.", "6."], 0)
    assert R.answer_options(exs[3]) == (["5."], None)
    assert R.answer_options(exs[4]) == (["yes.", "no."], 0)
    assert R.answer_options(Example("u", "q? (A) x (B) y", ["x", "y"], "(B)")) == (
        ["(A).", "(B)."],
        1,
    )
    assert R.answer_options(Example("n", "q", None, "No")) == (["No.", "Yes."], 0)
    with pytest.raises(ValueError, match="neither a choice label"):
        R.answer_options(Example("bad", "q (a) x (b) y", ["x", "y"], "z"))
    with pytest.raises(ValueError, match="no gold answer"):
        R.answer_options(Example("empty", "q", None, ""))


def test_consistency_vs_direct_float64(lm, tok):
    exs = consistency_examples()
    rats = ["ice is frozen water.", "two is 2.", "2 + 3 = 5.", "2 + 3 = 5.", "fire burns."]
    reward = R.Consistency(lm, tok, batch_size=3)
    got = reward(exs, rats, [None] * len(exs))
    for ex, r, g in zip(exs, rats, got):
        options, gold = R.answer_options(ex)
        with_r = torch.tensor(
            [direct_logprob(lm, tok, R.answer_prompt(ex, r), o) for o in options],
            dtype=torch.float64,
        )
        without = torch.tensor(
            [direct_logprob(lm, tok, R.answer_prompt(ex, None), o) for o in options],
            dtype=torch.float64,
        )
        if gold is None:
            expected = float(with_r[0] - without[0])
        else:
            expected = float(with_r.softmax(0)[gold] - without.softmax(0)[gold])
            assert -1.0 <= g <= 1.0
        assert math.isclose(g, expected, abs_tol=1e-5), (ex.id, g, expected)
    assert any(abs(g) > 1e-4 for g in got)  # a random LM does react to the rationale
    # the no-rationale term is cached per distinct prompt and reused on the next call
    assert len(reward._cache) == len(exs)
    assert reward(exs, rats, [None] * len(exs)) == pytest.approx(got, abs=1e-6)
    assert len(reward._cache) == len(exs)
    reward.clear_cache()
    assert not reward._cache


def test_consistency_prompts_and_scorer_from_ctx(lm, tok):
    ex = consistency_examples()[0]
    assert R.answer_prompt(ex, "ice is cold.") == (
        "is ice cold? (a) yes (b) no ice is cold. So the answer is "
    )
    assert R.answer_prompt(ex, None) == "is ice cold? (a) yes (b) no So the answer is "
    assert R.answer_prompt(ex, "  ") == R.answer_prompt(ex, None)
    # repeated candidates of one question; the scorer comes from the trainer's context
    exs, rats = [ex] * 3, ["ice is cold.", "", "ice is cold."]
    got = R.get_reward("consistency", cache_baseline=False)(
        exs, rats, [None] * 3, ref_model=lm, tokenizer=tok
    )
    assert got[0] == pytest.approx(got[2], abs=1e-6)
    assert got[1] == pytest.approx(0.0, abs=1e-5)  # an empty rationale changes nothing
    assert R.Consistency()([], [], [], ref_model=lm, tokenizer=tok) == []
    with pytest.raises(ValueError, match="scorer causal LM"):
        R.Consistency()([ex], ["r"], [None])
    with pytest.raises(ValueError, match="neither a choice label"):
        R.Consistency(lm, tok)([Example("b", "q (a) x (b) y", ["x", "y"], "z")], ["r"], [None])


# --------------------------------------------------------------------------------- plausibility


def test_plausibility_step_verifier_and_callable():
    exs = synthetic_task(6, seed=3, flawed_fraction=0.5)
    rats = [ex.rationale for ex in exs[:3]] + ["1 + 1 = 3.", "", "nothing"]
    got = R.Plausibility()(exs, rats, [None] * 6)
    assert got == [verify_steps(ex, r) for ex, r in zip(exs, rats)]
    assert max(got[:3]) > 0 and got[4] == 0.0 and got[5] == 0.0

    def scorer(examples, rationales, answers, **ctx):
        return [len(r) * ctx.get("k", 1) for r in rationales]

    reward = R.get_reward("plausibility", scorer=scorer)
    assert reward([None] * 2, ["ab", "c"], [None] * 2, k=2) == [4.0, 2.0]
    with pytest.raises(TypeError, match="scorer"):
        R.Plausibility(3)


def test_plausibility_local_classifier(tmp_path, tok):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=2,
        id2label={0: "implausible", 1: "plausible"}, label2id={"implausible": 0, "plausible": 1},
        initializer_range=0.3,
    )  # fmt: skip
    torch.manual_seed(0)
    clf = LlamaForSequenceClassification(cfg).eval()
    clf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    exs = [{"question": "is ice cold?"}, {"question": "what is 2+3?"}, {"question": "a"}]
    rats = ["ice is frozen.", "2 + 3 = 5.", "b"]
    reward = R.Plausibility(str(tmp_path), batch_size=2)
    got = reward(exs, rats, [None] * 3)
    texts = [f"{e['question']} {r}" for e, r in zip(exs, rats)]
    with torch.no_grad():
        ref = [float(clf(**tok([t], return_tensors="pt")).logits.softmax(-1)[0, 1]) for t in texts]
    assert got == pytest.approx(ref, abs=1e-5)
    assert len(set(round(g, 6) for g in got)) > 1
    # a loaded model works too, and label= picks the class
    got0 = R.Plausibility(clf, tokenizer=tok, label="implausible")(exs, rats, [None] * 3)
    assert got0 == pytest.approx([1 - g for g in got], abs=1e-5)
    with pytest.raises(OSError):
        R.Plausibility(str(tmp_path / "missing"))(exs[:1], rats[:1], [None])


def test_positive_label_resolution():
    from types import SimpleNamespace as NS

    assert R._positive_label(NS(num_labels=1, id2label={0: "LABEL_0"}), None) is None
    assert R._positive_label(NS(num_labels=2, id2label={0: "LABEL_0", 1: "LABEL_1"}), None) == 1
    assert R._positive_label(NS(num_labels=2, id2label={0: "Positive", 1: "neg"}), None) == 0
    assert R._positive_label(NS(num_labels=3, id2label={0: "a", 1: "b", 2: "c"}), 2) == 2
    assert R._positive_label(NS(num_labels=3, id2label={0: "a", 1: "B", 2: "c"}), "b") == 1
    with pytest.raises(ValueError, match="pass label="):
        R._positive_label(NS(num_labels=3, id2label={0: "a", 1: "b", 2: "c"}), None)
    with pytest.raises(ValueError, match="not among"):
        R._positive_label(NS(num_labels=2, id2label={0: "a", 1: "b"}), "zzz")
    with pytest.raises(ValueError, match="out of range"):
        R._positive_label(NS(num_labels=2, id2label={0: "a", 1: "b"}), 5)

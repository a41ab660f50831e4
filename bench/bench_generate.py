"""Candidate generation: ``generate_candidates`` (prefill once, KV cache expanded to the N
candidates, ``rk.sample``) vs Hugging Face ``model.generate(do_sample=True,
num_return_sequences=N)`` with the same sampling parameters, on a tiny randomly initialised Llama
(built from a config, no downloads).

    pytest bench/bench_generate.py --benchmark-only [--benchmark-json out.json]

Shape: P=32 prompts of 16-64 tokens, N=8 candidates, 32 new tokens, temperature 0.8, top_k 50,
top_p 0.9; Llama hidden 256, 4 layers, 4 heads, vocab 32000, fp32 on CPU (hidden 1024, 8 layers,
bf16 on GPU). Override with RK_BENCH_GEN="P,N,new_tokens". EOS is off on both sides (our
``ignore_eos``; HF with no eos_token_id), so both generate exactly P·N·new_tokens tokens.
extra_info: tokens_per_s (generated tokens / median wall time) and tokens_per_cpu_s (/ median
process CPU time: less sensitive to other jobs on a shared machine; on CPU it sums all threads).
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from rationale_train.generate import generate_candidates

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
P, N, NEW = 32, 8, 32
if os.environ.get("RK_BENCH_GEN"):
    P, N, NEW = (int(x) for x in os.environ["RK_BENCH_GEN"].split(","))
V = 32000
if DEVICE.type == "cuda":
    HIDDEN, LAYERS, HEADS, DTYPE = 1024, 8, 8, torch.bfloat16
else:
    HIDDEN, LAYERS, HEADS, DTYPE = 256, 4, 4, torch.float32
SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.9)
ROUNDS = 5 if DEVICE.type == "cuda" else 3


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        padding_side="left",
    )  # fmt: skip


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=V, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.05,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(DEVICE, DTYPE).eval()
    model.generation_config.eos_token_id = None  # generate all NEW tokens
    model.generation_config.pad_token_id = 0
    return model


def _prompts():
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(16, 65, (P,), generator=g).tolist()
    return [[1] + torch.randint(3, V, (n - 1,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module")
def setup():
    return _model(), _tokenizer(), _prompts()


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _ours(backend):
    def run(model, tok, prompts, seed):
        c = generate_candidates(
            model, tok, prompts, N, NEW, seed=seed, ignore_eos=True, backend=backend, **SAMPLING
        )
        assert int(c.lengths.sum()) == P * N * NEW
        return c

    return run


def _hf(model, tok, prompts, seed):
    T = max(len(p) for p in prompts)
    ids = torch.zeros((P, T), dtype=torch.int64)
    mask = torch.zeros((P, T), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p)
        mask[i, T - len(p) :] = 1
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), do_sample=True,
        num_return_sequences=N, max_new_tokens=NEW, min_new_tokens=0, pad_token_id=0,
        **SAMPLING,
    )  # fmt: skip
    assert out.shape == (P * N, T + NEW)
    return out


def _providers():
    from rationale_kernels import _native

    # ours with the sort-based torch sampler is left out: ~45 s a call at this shape on 2 cores
    be = "cpu" if DEVICE.type == "cpu" and _native.has_cpu() else "auto"
    return {f"rk generate_candidates ({be})": _ours(be), "hf generate(num_return_sequences)": _hf}


PROVIDERS = _providers()


def _device_name():
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU x{torch.get_num_threads()}"


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_generate(benchmark, setup, provider):
    model, tok, prompts = setup
    fn = PROVIDERS[provider]
    benchmark.group = (
        f"candidate generation P={P} N={N} new={NEW} Llama h={HIDDEN} L={LAYERS} V={V} "
        f"{str(DTYPE).replace('torch.', '')}"
    )
    seeds = iter(range(1000))
    cpu = []

    def step():
        t = time.process_time()
        fn(model, tok, prompts, next(seeds))
        _sync()
        cpu.append(time.process_time() - t)

    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    cpu_s = statistics.median(cpu[1:])  # without the warm-up round
    benchmark.extra_info.update(
        device=_device_name(), P=P, N=N, new_tokens=NEW,
        tokens_per_s=round(P * N * NEW / benchmark.stats.stats.median, 1),
        cpu_s=round(cpu_s, 3), tokens_per_cpu_s=round(P * N * NEW / cpu_s, 1),
    )  # fmt: skip

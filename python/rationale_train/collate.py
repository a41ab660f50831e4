"""COLLATE ("Learning Together to Perform Better: Teaching Small-Scale LLMs to Collaborate via
Preferential Rationale Tuning", ACL 2025): the training loop and ``rationale-train collate``.

Several instances of one small LM act as distinct *rationale providers*; each candidate rationale
is scored by how likely it makes the gold answer, and the providers are tuned with DPO to prefer the
best one. No larger teacher is used at tuning time.

Prompt templates (three modes, loss on the target tokens only; targets end with EOS)::

    I -> A      "<question> Answer:"                         target " <answer>."
    I -> R      "<question> Rationale:"                      target " <rationale>"
    [I;R] -> A  "<question> Rationale: <rationale> Answer:"  target " <answer>."

Stages:

0. **Multi-mode SFT** of the base model (the tiny Llama of the embedded default, or ``--model
   DIR``): every training question with a rationale gives three rows (one per mode), one without a
   rationale only the I->A row. Token-mean NLL with ``rk.fused_linear_rationale_loss`` (via
   ``mario.train_step``); warmup + cosine. Result: ``M_sft`` (``RUN/sft_model``), frozen from then
   on as the *scorer*.
1. **Distinct providers.** ``M_sft`` is copied ``providers`` (S) times; the rationale data is split
   into S disjoint random parts; provider s samples one rationale for each question of its part
   (I->R mode) and is DPO-trained (β, reference = frozen ``M_sft``) to prefer the gold rationale
   over its own (pairs whose two rationales are the same text are dropped). ``provider_mode="full"``
   keeps full copies (small models); ``"lora"`` keeps S LoRA adapters on one shared base with peft
   (``pip install peft``; the scorer is then the base with the adapters disabled).
2. **Task-based preferential tuning**, ``rounds`` (R) rounds on the (question, answer) data (every
   training question): each provider samples ``candidates_per_provider`` rationales per question
   (one ``generate_candidates`` call per provider); every candidate r is scored by the
   length-normalised log-likelihood of the gold answer under ``M_sft`` in [I;R]->A mode
   (``rk.sequence_logprobs(..., average=True)``, :func:`answer_logprobs`); per question the best
   candidate is paired against the worst (``rk.preference_pairs(mode="best_vs_worst")``, pooled
   over providers) and the pair is dropped when the best does not beat the no-rationale likelihood
   log P(A | I) (I->A mode, also under ``M_sft``; :func:`build_pairs`). Every provider is then
   DPO-trained on the kept pairs with ``rk.fused_linear_dpo_loss`` (sum log-probs of the rationale
   tokens + EOS, reference = that provider before this round: its log-probs are computed once before
   its training starts, so no copy is kept).
3. **Evaluation.** Every provider decodes a rationale greedily for each validation question; the
   provider whose rationales give the best mean answer likelihood under ``M_sft`` is selected. On
   the test split: accuracy of ``M_sft`` in I->A mode (no rationale), of ``M_sft`` answering after
   its own greedy rationales ([I;R]->A), and of COLLATE: the answerer (``M_sft`` by default,
   ``answerer="provider"`` for the provider itself) after the selected provider's rationales.
   Answers are chosen by likelihood among the options when the question has choices (the option
   whose " <option>." has the highest mean token log-prob), else decoded greedily.

Run folder: ``config.json``, ``metrics.jsonl`` (one record per optimizer step, per round, per
evaluation), ``summary.md`` (the accuracy table; kept-pair fraction and chosen-vs-rejected gap per
round), ``result.json``, ``sft_model/`` (HF format), ``sft/checkpoints/`` (during SFT), and per
training unit (``stage1_p<s>``, ``round<r>_p<s>``) ``units/<unit>/``: ``pairs.json`` (the
preference data and reference log-probs), ``checkpoints/`` (during its training; safetensors +
optimizer + RNG, written atomically) and ``provider.safetensors`` + ``done.json`` when finished;
``units/round<r>/candidates.json`` holds a round's scored candidates. ``--resume`` skips finished
units, restarts an unfinished one from its latest checkpoint and truncates the metrics to what that
point had written; every seed (sampling, batch order) is derived from ``(seed, tag)``, so a resumed
run reproduces the losses of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

import rationale_kernels as rk

from . import dist, runs
from .mario import (
    _build_base,
    _device_of,
    _f,
    _float,
    _freeze,
    _n_targets,
    _read_json,
    _sft_schedule,
    _write_json,
    prepare_run,
)
from .runs import derive_seed as _derive_seed
from .runs import epoch_order as _epoch_order
from .runs import progress
from .runs import seeded_generator as _generator

__all__ = [
    "CollateConfig",
    "Providers",
    "add_arguments",
    "answer_logprobs",
    "build_pairs",
    "dpo_step",
    "format_prompt",
    "load_split",
    "run",
    "run_collate",
]

SFT_DIR = "sft_model"
UNITS_DIR = "units"
STATE_FILE = "state.json"
RESULT_FILE = "result.json"

MODES = ("answer", "rationale", "rationale_answer")  # I->A, I->R, [I;R]->A


@dataclasses.dataclass
class CollateConfig:
    """Every option of a COLLATE run (each is a ``--flag`` and a config-file key). The defaults
    are the embedded run: synthetic task, tiny Llama, a few minutes on a 2-core CPU."""

    # run
    seed: int = _f(0, "seed of data, model init, splits, batch order and sampling")
    device: str = _f("cpu", "cpu, cuda, cuda:N or auto")
    backend: str = _f("auto", "rationale_kernels backend: auto, cpu, cuda, triton, torch")
    threads: Optional[int] = _f(None, "torch CPU threads (default: 1 for the tiny default model, "
                                "whose small matmuls gain nothing from more; torch's choice with "
                                "--model)")  # fmt: skip
    # data
    dataset: str = _f("synthetic", "synthetic, or a COLLATE dataset: gsm8k commonsenseqa piqa "
                      "winogrande hellaswag")  # fmt: skip
    data_root: Optional[str] = _f(None, "data root for non-synthetic datasets")
    data_seed: Optional[int] = _f(None, "seed of the synthetic data (default: --seed)")
    n_train: int = _f(1000, "synthetic: training questions")
    n_dev: int = _f(200, "synthetic: validation questions (provider selection)")
    n_test: int = _f(300, "synthetic: test questions")
    flawed_fraction: float = _f(0.0, "synthetic: fraction of flawed silver rationales (0: clean "
                                "gold rationales, as COLLATE's come from the dataset; MaRio's "
                                "default uses 0.3 to have flaws to fix)")  # fmt: skip
    synth_ops: str = _f("+-", "synthetic: operations (subset of +-*)")
    synth_max_value: int = _f(20, "synthetic: largest value in a problem")
    synth_min_steps: int = _f(2, "synthetic: fewest operations per problem")
    synth_max_steps: int = _f(2, "synthetic: most operations per problem")
    synth_num_choices: int = _f(0, "synthetic: inline answer choices (0: free-form answers)")
    synth_answer_style: str = _f("value", "synthetic: answers as the value (value) or the choice "
                                 "label (letter)", choices=["value", "letter"])  # fmt: skip
    synth_flaw_kinds: List[str] = dataclasses.field(
        default_factory=lambda: ["wrong_step"],
        metadata={"help": "synthetic: flaw kinds of the flawed rationales (wrong_step, "
                  "wrong_answer)"},
    )  # fmt: skip
    rationale_fraction: float = _f(1.0, "fraction of training questions whose rationale is used "
                                   "(the others are (question, answer) data only)")  # fmt: skip
    max_train: Optional[int] = _f(None, "use at most this many training examples")
    max_dev: Optional[int] = _f(None, "use at most this many validation examples")
    max_test: Optional[int] = _f(None, "evaluate at most this many test examples")
    stage2_max: Optional[int] = _f(None, "stage 2: at most this many questions per round "
                                   "(a different random subset each round)")  # fmt: skip
    # model
    model: Optional[str] = _f(None, "local HF causal LM dir; default: a tiny Llama with a "
                              "tokenizer trained on the task text")  # fmt: skip
    dtype: str = _f("float32", "model dtype")
    vocab_size: int = _f(512, "tiny model: tokenizer vocabulary bound")
    hidden_size: int = _f(64, "tiny model: hidden size")
    num_layers: int = _f(2, "tiny model: layers")
    num_heads: int = _f(4, "tiny model: attention heads")
    max_new_tokens: int = _f(48, "longest generated rationale, in tokens")
    # stage 0: multi-mode SFT
    sft_epochs: float = _f(16.0, "SFT epochs (over the rows of all three modes)")
    sft_lr: float = _f(3e-3, "SFT peak learning rate (warmup + cosine decay)")
    sft_batch_size: int = _f(32, "SFT batch size (rows)")
    sft_warmup: float = _f(0.05, "SFT warmup, fraction of the steps")
    # providers
    providers: int = _f(2, "number of rationale providers S")
    provider_mode: str = _f("full", "full: S full copies of M_sft; lora: S LoRA adapters on one "
                            "shared base (needs peft)", choices=["full", "lora"])  # fmt: skip
    lora_r: int = _f(16, "lora: rank")
    lora_alpha: float = _f(32.0, "lora: alpha")
    lora_targets: List[str] = dataclasses.field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],  # fmt: skip
        metadata={"help": "lora: target module names"},
    )
    # stage 1
    stage1_epochs: float = _f(1.0, "stage 1: DPO epochs over each provider's pairs")
    stage1_temperature: float = _f(1.0, "stage 1: sampling temperature of the providers' own "
                                   "rationales")  # fmt: skip
    # stage 2
    rounds: int = _f(2, "stage 2 rounds R (the paper's default)")
    candidates_per_provider: int = _f(4, "stage 2: rationales each provider samples per question")
    temperature: float = _f(0.7, "stage 2: sampling temperature")
    top_p: float = _f(1.0, "stage 2: nucleus top-p")
    filter_no_rationale: bool = _f(True, "drop a pair whose best candidate does not beat "
                                   "log P(A | I)")  # fmt: skip
    dpo_epochs: float = _f(1.0, "stage 2: DPO epochs over the kept pairs, per round")
    # DPO
    beta: float = _f(0.1, "DPO beta")
    loss_type: str = _f("sigmoid", "preference loss: sigmoid (DPO), ipo, hinge, robust",
                        choices=["sigmoid", "ipo", "hinge", "robust"])  # fmt: skip
    dpo_lr: float = _f(1e-5, "DPO learning rate (constant; 1e-4 drifts the tiny default model "
                       "away from M_sft: greedy accuracy falls every round)")  # fmt: skip
    dpo_batch_size: int = _f(16, "DPO batch size (pairs)")
    grad_clip: float = _f(1.0, "gradient-norm clip (0: off)")
    nll_coef: float = _f(0.0, "add this times the chosen rationales' token-mean NLL to the DPO "
                         "loss (RPO, a departure from the paper; 0: plain DPO as in the paper; "
                         "it only helped at dpo_lr=1e-4)")  # fmt: skip
    # evaluation
    answerer: str = _f("sft", "who answers after a provider's rationale: sft (M_sft) or "
                       "provider", choices=["sft", "provider"])  # fmt: skip
    eval_each_round: bool = _f(False, "also evaluate the providers on the test split after "
                               "stage 1 and every round")  # fmt: skip
    gen_batch_size: int = _f(256, "prompts per generation batch")
    score_batch_size: int = _f(64, "rows per scoring forward pass")
    parallel: str = _f(
        "ddp",
        "under torchrun: ddp (every rank holds the models) or fsdp (FSDP2 per provider and for "
        "SFT: parameters, gradients and optimizer state sharded, gathered for generation; "
        "provider_mode full only)",
        choices=["ddp", "fsdp"],
    )
    save_every: int = _f(0, "also checkpoint every N steps of a unit (0: at unit ends only)")
    keep_last: int = _f(2, "checkpoints kept per unit")

    def __post_init__(self):
        if isinstance(self.synth_flaw_kinds, str):
            self.synth_flaw_kinds = [t.strip() for t in self.synth_flaw_kinds.split(",")]
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        for name in ("providers", "candidates_per_provider", "sft_batch_size", "dpo_batch_size",
                     "max_new_tokens"):  # fmt: skip
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"rounds must be an int >= 0, got {self.rounds!r}")
        if self.provider_mode not in ("full", "lora"):
            raise ValueError(f"provider_mode must be full or lora, got {self.provider_mode!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.parallel == "fsdp" and self.provider_mode == "lora":
            raise ValueError("parallel=fsdp needs provider_mode=full (LoRA providers share one "
                             "base model; use ddp)")  # fmt: skip
        if self.answerer not in ("sft", "provider"):
            raise ValueError(f"answerer must be sft or provider, got {self.answerer!r}")
        if not 0.0 <= self.rationale_fraction <= 1.0:
            raise ValueError("rationale_fraction must be in [0, 1]")
        if self.beta <= 0:
            raise ValueError("beta must be > 0")

    @classmethod
    def load(cls, run_dir) -> CollateConfig:
        return runs.build_config(cls, file_values=runs.load_config(run_dir))


# ------------------------------------------------------------------------------------ helpers


def setup_torch(cfg: CollateConfig) -> torch.device:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    elif not cfg.model and cfg.device in ("cpu", "auto") and not torch.cuda.is_available():
        torch.set_num_threads(1)
    return dist.device(cfg.device)


def _answer_text(answer: str) -> str:
    a = answer.strip()
    return a if a.endswith(".") else a + "."


def format_prompt(mode: str, question: str, rationale: Optional[str] = None) -> str:
    """The prompt of ``mode`` (``"answer"`` I->A, ``"rationale"`` I->R, ``"rationale_answer"``
    [I;R]->A) for the input text ``question`` (``data.format_input`` of the example)."""
    q = question.strip()
    if mode == "answer":
        return q + " Answer:"
    if mode == "rationale":
        return q + " Rationale:"
    if mode == "rationale_answer":
        return q + " Rationale: " + (rationale or "").strip() + " Answer:"
    raise ValueError(f"unknown mode {mode!r}; known: {MODES}")


class _Tok:
    """Token-id helpers for one tokenizer (cached prompt encodings)."""

    def __init__(self, tok):
        self.tok = tok
        self.eos = int(tok.eos_token_id)
        pad = tok.pad_token_id
        self.pad = int(pad if pad is not None else tok.eos_token_id)

    def prompt(self, text: str) -> List[int]:
        return list(self.tok(text, add_special_tokens=True)["input_ids"])

    def target(self, text: str, eos: bool = True) -> List[int]:
        ids = list(self.tok(" " + text.strip(), add_special_tokens=False)["input_ids"])
        return ids + [self.eos] if eos else ids


def _body_head(model):
    """``(body, lm_head)`` of a HF causal LM or a peft model wrapping one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    getter = getattr(base, "get_decoder", None)
    body = getter() if callable(getter) else None
    if body is None:
        body = getattr(base, base.base_model_prefix)
    return body, base.get_output_embeddings()


def _pad_rows(rows: Sequence[Tuple[List[int], List[int]]], pad_id: int, device):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside targets)."""
    n = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), n), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    for i, (p, t) in enumerate(rows):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        mask[i, : len(p) + len(t)] = 1
        labels[i, len(p) : len(p) + len(t)] = torch.tensor(t)
    return ids.to(device), mask.to(device), labels.to(device)


# ------------------------------------------------------------------------------------ scoring


@torch.no_grad()
def answer_logprobs(
    model,
    rows: Sequence[Tuple[List[int], List[int]]],
    *,
    pad_id: int,
    batch_size: int = 64,
    average: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Log-likelihood of each row's continuation after its prompt: ``rows`` are ``(prompt_ids,
    continuation_ids)``; returns float32 CPU ``[len(rows)]``, the mean (``average=True``) or sum
    of the continuation tokens' log-probs, from ``rk.sequence_logprobs(logits[:, :-1],
    labels[:, 1:])``. Rows run ``batch_size`` at a time, sorted by length, right-padded."""
    out = torch.zeros(len(rows), dtype=torch.float32)
    if not rows:
        return out
    was_training = model.training
    model.eval()
    device = _device_of(model)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            ids, mask, labels = _pad_rows([rows[i] for i in idx], pad_id, device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            lp = rk.sequence_logprobs(logits[:, :-1], labels[:, 1:], average=average,
                                      backend=backend)  # fmt: skip
            out[torch.tensor(idx)] = lp.float().cpu()
    finally:
        model.train(was_training)
    return out


def build_pairs(
    scores: torch.Tensor,
    groups: torch.Tensor,
    baseline: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """COLLATE's pairs: per group (question) its best candidate against its worst
    (``rk.preference_pairs(mode="best_vs_worst")``; ties give no pair). With ``baseline`` (one
    value per group id, indexed by the group id: log P(A | I)), a pair is kept only when the
    chosen candidate's score is strictly above its group's baseline. Returns ``(all_pairs,
    kept_pairs)``, int64 ``[P, 2]`` each."""
    pairs = rk.preference_pairs(scores, groups, mode="best_vs_worst")
    if baseline is None or pairs.numel() == 0:
        return pairs, pairs
    chosen = pairs[:, 0]
    keep = scores[chosen] > baseline[groups[chosen]]
    return pairs, pairs[keep]


# ------------------------------------------------------------------------------------ providers


class Providers:
    """S rationale providers initialised from ``M_sft``.

    ``mode="full"``: S independent full copies (``deepcopy``). ``mode="lora"``: one peft model on a
    copy of ``M_sft`` with S LoRA adapters ``p0..p{S-1}`` (B initialised to 0, so every provider
    starts equal to ``M_sft``); :meth:`model` activates one adapter and returns the shared model.
    """

    def __init__(self, sft_model, num: int, mode: str = "full", *, lora_r: int = 16,
                 lora_alpha: float = 32.0, lora_targets: Sequence[str] = ("q_proj", "v_proj"),
                 seed: int = 0):  # fmt: skip
        self.num, self.mode = int(num), mode
        self._par: Dict[int, dist.Parallel] = {}
        if mode == "full":
            self.models = []
            for _ in range(self.num):
                m = copy.deepcopy(sft_model)
                for p in m.parameters():
                    p.requires_grad_(True)
                self.models.append(m.eval())
        elif mode == "lora":
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError as e:  # pragma: no cover
                raise ImportError("provider_mode='lora' needs peft: pip install peft") from e
            base = copy.deepcopy(sft_model)
            lc = LoraConfig(r=int(lora_r), lora_alpha=float(lora_alpha), lora_dropout=0.0,
                            target_modules=list(lora_targets), bias="none")  # fmt: skip
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_derive_seed(seed, "lora"))
                pm = get_peft_model(base, lc, adapter_name="p0")
                for s in range(1, self.num):
                    pm.add_adapter(f"p{s}", lc)
            self.peft = pm.eval()
        else:
            raise ValueError(f"unknown provider mode {mode!r}")

    def parallel(self, s: int, mode: str) -> dist.Parallel:
        """Provider ``s`` set up for data-parallel training (made once: FSDP shards in place)."""
        if s not in self._par:
            if mode == "fsdp" and self.mode == "lora":
                raise ValueError("parallel='fsdp' needs provider_mode='full' (LoRA providers "
                                 "share one base model; use ddp)")  # fmt: skip
            self._par[s] = dist.Parallel(self.model(s), mode)
        self.model(s)  # LoRA: make adapter p{s} the active, trainable one (the wrapper is shared)
        return self._par[s]

    @contextlib.contextmanager
    def use(self, s: int):
        """Provider ``s``'s model with full weights, for generation and scoring (FSDP: gathered
        on every rank for the block)."""
        m = self.model(s)
        if s in self._par:
            with self._par[s].gathered() as g:
                yield g
        else:
            yield m

    def model(self, s: int):
        """Provider ``s``'s model (for LoRA: the shared model with adapter ``p{s}`` active and the
        only trainable one)."""
        if self.mode == "full":
            return self.models[s]
        self.peft.set_adapter(f"p{s}")
        return self.peft

    def parameters(self, s: int) -> List[torch.nn.Parameter]:
        """The trainable parameters of provider ``s``."""
        if self.mode == "full":
            return [p for p in self.models[s].parameters() if p.requires_grad]
        self.model(s)
        tag = f".p{s}."
        return [p for n, p in self.peft.named_parameters() if tag in n]

    def checkpoint_module(self, s: int):
        """The module a unit checkpoint saves (the whole shared model for LoRA)."""
        return self.models[s] if self.mode == "full" else self.peft

    def state(self, s: int) -> Dict[str, torch.Tensor]:
        if self.mode == "full":
            return {k: v.detach().clone() for k, v in self.models[s].state_dict().items()}
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in
                get_peft_model_state_dict(self.peft, adapter_name=f"p{s}").items()}  # fmt: skip

    def save(self, s: int, path) -> None:
        """Provider ``s``'s weights (full model, or its adapter) to ``path`` (safetensors,
        atomic). Under torchrun every rank calls it (FSDP gathers) and rank 0 writes."""
        state = self._par[s].gather_state() if s in self._par else None
        dist.main_only(lambda: self._save(s, Path(path), state))

    def _save(self, s: int, path: Path, state) -> None:
        from safetensors.torch import save_file, save_model

        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        if state is not None:  # gathered from FSDP shards
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                      metadata={"format": "pt"})  # fmt: skip
        elif self.mode == "full":
            save_model(self.models[s], str(tmp), metadata={"format": "pt"})
        else:
            save_file({k: v.contiguous() for k, v in self.state(s).items()}, str(tmp),
                      metadata={"format": "pt"})  # fmt: skip
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, s: int, path) -> None:
        from safetensors.torch import load_file, load_model

        if s in self._par and self._par[s].mode == "fsdp":
            self._par[s].load_state(load_file(str(path)))
        elif self.mode == "full":
            load_model(self.models[s], str(path), strict=True)
        else:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.peft, load_file(str(path)), adapter_name=f"p{s}")

    @contextlib.contextmanager
    def base(self):
        """LoRA only: the shared model with every adapter disabled (= ``M_sft``)."""
        with self.peft.disable_adapter():
            yield self.peft


# ------------------------------------------------------------------------------------ DPO


def _rows_hidden(model, rows, pad_id):
    device = _device_of(model)
    ids, mask, labels = _pad_rows(rows, pad_id, device)
    body, head = _body_head(model)
    hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden[:, :-1], labels[:, 1:], head


@torch.no_grad()
def sequence_logps(model, rows, *, pad_id: int, batch_size: int = 64, backend: str = "auto"):
    """Summed log-probs of each row's target under ``model`` (``fused_linear_sequence_logprobs``
    from the body's hidden states), float32 CPU ``[len(rows)]`` -- the DPO reference values."""
    out = torch.zeros(len(rows), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(rows), batch_size):
            h, y, head = _rows_hidden(model, rows[s : s + batch_size], pad_id)
            lp = rk.fused_linear_sequence_logprobs(h, head.weight, y,
                                                   bias=getattr(head, "bias", None),
                                                   backend=backend)  # fmt: skip
            out[s : s + len(lp)] = lp.float().cpu()
    finally:
        model.train(was_training)
    return out


def _all_rows(score, model, rows, **kw) -> torch.Tensor:
    """``score(model, rows, **kw)`` (:func:`answer_logprobs` or :func:`sequence_logps`) of every
    row, each rank scoring its shard (a collective under torchrun)."""
    out = dist.map_shards(lambda sub: score(model, sub, **kw).tolist(), list(rows))
    return torch.tensor(out, dtype=torch.float32)


def dpo_step(
    model,
    optimizer,
    rows: Sequence[Tuple[List[int], List[int]]],
    ref_logps: torch.Tensor,
    pairs: torch.Tensor,
    *,
    pad_id: int,
    params: Optional[Sequence[torch.nn.Parameter]] = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    grad_clip: float = 0.0,
    nll_coef: float = 0.0,
    backend: str = "auto",
    parallel: Optional[dist.Parallel] = None,
    contributes: bool = True,
) -> Dict[str, float]:
    """One optimizer step of DPO with ``rk.fused_linear_dpo_loss``: ``rows`` are the candidates
    ``(prompt_ids, target_ids)``, ``ref_logps`` ``[C]`` their reference log-probs, ``pairs``
    ``[P, 2]`` (chosen, rejected) indices into ``rows``. ``nll_coef > 0`` adds that times the
    token-mean NLL of the chosen targets (``rk.fused_linear_rationale_loss``; RPO-style, against
    DPO's likelihood displacement).

    ``parallel`` (a :class:`dist.Parallel` of ``model``): ``rows`` / ``pairs`` are this rank's
    share of the global batch, whole components of the pair graph (:func:`rank_pairs`), so no
    candidate is on two ranks. The DPO loss is normalised by the global pair count and the NLL by
    the global chosen-token count (all-reduced) over the world size, so the averaged gradient is
    the one-process gradient of the global batch; the returned figures are global.
    ``contributes=False``: this rank has no share and runs the step on a stand-in with zero
    weight (DDP and FSDP need a forward on every rank)."""
    model.train()
    w = 1.0 if contributes else 0.0
    chosen = torch.unique(pairs[:, 0])
    n_pairs = int(pairs.shape[0]) * w
    n_tok = sum(_n_targets(*rows[c]) for c in chosen.tolist()) * w
    world = dist.world() if parallel is not None else 1
    norm = nll_norm = None
    if world > 1:
        n_pairs_g, n_tok_g = dist.all_sum([n_pairs, n_tok])
        norm, nll_norm = max(n_pairs_g, 1.0) / world, max(n_tok_g, 1.0) / world

    def loss_of(m):
        h, y, head = _rows_hidden(m, rows, pad_id)
        b = getattr(head, "bias", None)
        loss, met = rk.fused_linear_dpo_loss(
            h, head.weight, y, None, ref_logps.to(h.device, torch.float32), pairs.to(h.device),
            bias=b, beta=float(beta), loss_type=loss_type, normalizer=norm, backend=backend,
        )  # fmt: skip
        nll = None
        if nll_coef and nll_coef > 0:
            ci = chosen.to(h.device)
            hc, yc = h[ci], y[ci]
            keep = yc != -100
            nll = rk.fused_linear_rationale_loss(hc[keep], head.weight, yc[keep], bias=b,
                                                 normalizer=nll_norm, backend=backend)  # fmt: skip
            loss = loss + float(nll_coef) * nll
        return loss * w, met, nll

    loss, m, nll = parallel(loss_of) if parallel is not None else loss_of(model)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = None
    if grad_clip and grad_clip > 0:
        if params is not None:
            ps = list(params)
        else:
            ps = parallel.parameters() if parallel is not None else list(model.parameters())
        gnorm = _float(torch.nn.utils.clip_grad_norm_(ps, grad_clip))
    optimizer.step()
    model.eval()
    # sums over this rank's pairs, then over the ranks
    vals = [float(loss.detach()), float(m["accuracy"]) * n_pairs,
            float(m["margins"].float().sum()) * w, float(m["chosen_rewards"].float().sum()) * w,
            float(m["rejected_rewards"].float().sum()) * w,
            float(nll.detach()) if nll is not None else 0.0, n_pairs]  # fmt: skip
    if world > 1:
        vals = dist.all_sum(vals)
    P = max(vals[-1], 1.0)
    out = {
        "loss": vals[0] / world,
        "accuracy": vals[1] / P,
        "margin": vals[2] / P,
        "chosen_reward": vals[3] / P,
        "rejected_reward": vals[4] / P,
        "pairs": int(vals[-1]),
    }
    if nll is not None:
        out["nll"] = vals[5] / world
    if gnorm is not None:
        out["grad_norm"] = gnorm
    return out


def rank_pairs(pairs: Sequence[Sequence[int]]) -> Tuple[List[int], bool]:
    """This rank's share of a global batch of pairs: the positions of the pairs in a contiguous
    block of the pair graph's components (candidates joined by a pair; in COLLATE, one per
    question), so a candidate lives on one rank. Returns ``(positions, contributes)``; a rank left
    without a component gets the first one as a zero-weight stand-in (``contributes=False``)."""
    from rationale_kernels.ops.preference_loss import pair_components

    comps = pair_components(torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2))
    comp_of = {c: k for k, comp in enumerate(comps) for c in comp}
    by_comp: Dict[int, List[int]] = {}  # pair positions, components in order of first pair
    for i, (c, _) in enumerate(pairs):
        by_comp.setdefault(comp_of[int(c)], []).append(i)
    groups = list(by_comp.values())
    mine = [i for g in dist.part(groups) for i in g]
    if mine:
        return mine, True
    return groups[0], False


# ------------------------------------------------------------------------------------ data


def load_split(cfg: CollateConfig, split: str):
    """The examples of ``split`` (``train`` / ``dev`` / ``test``); synthetic splits are
    regenerated from the data seed. Capped by ``max_train`` / ``max_dev`` / ``max_test``."""
    from .data import load_dataset, synthetic_splits

    if cfg.dataset == "synthetic":
        seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
        exs = synthetic_splits(seed=seed, n_train=cfg.n_train, n_dev=cfg.n_dev,
                               n_test=cfg.n_test, flawed_fraction=cfg.flawed_fraction,
                               ops=cfg.synth_ops, max_value=cfg.synth_max_value,
                               min_steps=cfg.synth_min_steps, max_steps=cfg.synth_max_steps,
                               answer_style=cfg.synth_answer_style,
                               num_choices=cfg.synth_num_choices or None,
                               flaw_kinds=tuple(cfg.synth_flaw_kinds))[split]  # fmt: skip
    else:
        exs = load_dataset(cfg.dataset, split, cfg.data_root)
    cap = {"train": cfg.max_train, "dev": cfg.max_dev, "test": cfg.max_test}.get(split)
    return exs[:cap] if cap is not None else exs


def _rationale_mask(cfg: CollateConfig, train) -> List[bool]:
    """Which training questions have a usable rationale (``rationale_fraction`` of those that
    have one, chosen at random)."""
    has = [bool(e.rationale) for e in train]
    idx = [i for i, h in enumerate(has) if h]
    k = int(round(len(idx) * cfg.rationale_fraction))
    perm = torch.randperm(len(idx), generator=_generator(cfg.seed, "rationale_fraction")).tolist()
    keep = {idx[j] for j in perm[:k]}
    return [i in keep for i in range(len(train))]


def _sft_rows(T: _Tok, train, with_rationale: Sequence[bool]):
    from .data import format_input

    rows = []
    for e, has in zip(train, with_rationale):
        q = format_input(e)
        rows.append((T.prompt(format_prompt("answer", q)), T.target(_answer_text(e.answer))))
        if has:  # (question, rationale, gold answer): the answer is the question's label
            rows.append((T.prompt(format_prompt("rationale", q)), T.target(e.rationale)))
            rows.append((T.prompt(format_prompt("rationale_answer", q, e.rationale)),
                         T.target(_answer_text(e.answer))))  # fmt: skip
    return rows


def _tokenizer_texts(train) -> List[str]:
    from .data import format_input

    out = []
    for e in train:
        q = format_input(e)
        out.append(format_prompt("answer", q) + " " + _answer_text(e.answer))
        if e.rationale:
            out.append(format_prompt("rationale_answer", q, e.rationale) + " "
                       + _answer_text(e.answer))  # fmt: skip
    return out


# ------------------------------------------------------------------------------------ stages


class _Stop(Exception):
    pass


class _Run:
    """State shared by the stages of one run."""

    def __init__(self, cfg: CollateConfig, run_dir: Path, log, stop_after_step, stop_after_sft):
        self.cfg, self.run_dir, self.log = cfg, run_dir, log
        self.stop_after_step, self.stop_after_sft = stop_after_step, stop_after_sft
        self.state = _read_json(run_dir / STATE_FILE) or {"metrics_lines": 0, "step": 0}
        self.step = int(self.state.get("step", 0))  # DPO steps over all units

    def mark(self, **kw) -> None:
        """Persist a durable point: the metrics written so far belong to it."""
        self.state.update(kw, metrics_lines=len(self.log), step=self.step)
        _write_json(self.run_dir / STATE_FILE, self.state)


def _sft_phase(R: _Run, device, train, with_rat) -> None:
    from .checkpoint import load_checkpoint, save_checkpoint
    from .mario import _latest, train_step
    from .models import save_pretrained_atomic

    cfg = R.cfg
    sft_run = R.run_dir / "sft"
    model, tok = _build_base(cfg, _tokenizer_texts(train), device)
    T = _Tok(tok)
    rows = _sft_rows(T, train, with_rat)
    total = max(int(math.ceil(cfg.sft_epochs * len(rows) / cfg.sft_batch_size)), 1)
    dist.check_batch(cfg.sft_batch_size, "sft_batch_size")
    par = dist.Parallel(model, cfg.parallel)
    opt = torch.optim.AdamW(par.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    sched = _sft_schedule(opt, total, cfg.sft_warmup)
    start = 0
    ck = _latest(sft_run)
    if ck is not None:
        info = load_checkpoint(ck, par, opt, sched)
        start = int(info["step"])
        R.log.truncate(int(info["extra"]["metrics_lines"]))
        print(f"resumed SFT at step {start}/{total}")
    else:
        R.log.truncate(int(R.state.get("metrics_lines", 0)))
    order = _epoch_order(cfg.seed, "sft", len(rows), total * cfg.sft_batch_size)
    bar = progress(total=total, initial=start, desc="stage 0: multi-mode SFT")
    try:
        for step in range(start, total):
            idx = dist.part(order[step * cfg.sft_batch_size : (step + 1) * cfg.sft_batch_size])
            lr = opt.param_groups[0]["lr"]
            st = train_step(model, opt, [rows[i] for i in idx], pad_id=T.pad,
                            grad_clip=cfg.grad_clip, backend=cfg.backend,
                            scheduler=sched, parallel=par)  # fmt: skip
            R.log.log(phase="sft", step=step + 1, lr=lr, **st)
            bar.update(1)
            bar.set_postfix(loss=f"{st['loss']:.3f}")
            done = step + 1
            stop = R.stop_after_sft is not None and done >= R.stop_after_sft
            if done < total and ((cfg.save_every and done % cfg.save_every == 0) or stop):
                save_checkpoint(sft_run, done, par, opt, sched,
                                extra={"metrics_lines": len(R.log)},
                                keep_last=cfg.keep_last)  # fmt: skip
            if stop and done < total:
                raise _Stop()
    finally:
        bar.close()
    model.eval()
    state = par.gather_state()  # FSDP: the full weights on rank 0
    dist.main_only(lambda: save_pretrained_atomic(model, tok, R.run_dir / SFT_DIR,
                                                  state_dict=state))  # fmt: skip
    R.mark(sft_done=True)


def _generate_rationales(
    model,
    T: _Tok,
    examples,
    n: int,
    *,
    temperature: float,
    top_p: float,
    seed: int,
    cfg: CollateConfig,
    desc: Optional[str] = None,
):
    """``[len(examples)][n]`` rationale texts sampled in I->R mode (``temperature=0``: greedy)."""
    from .data import format_input
    from .generate import generate_candidates

    if not examples:
        return []

    def gen(exs):  # this rank's shard (seeds differ per rank)
        prompts = [T.prompt(format_prompt("rationale", format_input(e))) for e in exs]
        was = model.training
        model.eval()
        try:
            cands = generate_candidates(
                model, T.tok, prompts, n, cfg.max_new_tokens, temperature=temperature,
                top_p=top_p, seed=dist.rank_seed(seed), eos_token_id=T.eos,
                batch_size=cfg.gen_batch_size, return_logprobs=False, backend=cfg.backend,
                stop_strings=[" Answer:"],
            )  # fmt: skip
        finally:
            model.train(was)
        return [[t.strip() for t in ts] for ts in cands.texts_by_prompt()]

    return dist.map_shards(gen, list(examples))


def _score_rows(T: _Tok, examples, rationales: Sequence[Optional[str]]):
    """Scoring rows: the gold answer (``" <answer>."``, no EOS) after [I;R]->A (or I->A when the
    rationale is ``None``)."""
    from .data import format_input

    rows = []
    for e, r in zip(examples, rationales):
        q = format_input(e)
        p = format_prompt("answer", q) if r is None else format_prompt("rationale_answer", q, r)
        rows.append((T.prompt(p), T.target(_answer_text(e.answer), eos=False)))
    return rows


def _train_unit(
    R: _Run,
    unit: str,
    providers: Providers,
    s: int,
    T: _Tok,
    data: Dict[str, Any],
    epochs: float,
    desc: str,
) -> Dict[str, Any]:
    """DPO-train provider ``s`` on ``data`` (``rows`` texts, ``ref_logps``, ``pairs``), resumable;
    returns the unit's summary."""
    from .checkpoint import load_checkpoint, save_checkpoint
    from .mario import _latest

    cfg = R.cfg
    udir = R.run_dir / UNITS_DIR / unit
    pairs = torch.tensor(data["pairs"], dtype=torch.long).reshape(-1, 2)
    P = int(pairs.shape[0])
    total = int(math.ceil(epochs * P / cfg.dpo_batch_size)) if P else 0
    par = providers.parallel(s, cfg.parallel)  # its .model is providers.checkpoint_module(s)
    model = providers.model(s)
    params = providers.parameters(s)
    opt = torch.optim.AdamW(params, lr=cfg.dpo_lr, weight_decay=0.0)
    start = 0
    ck = _latest(udir)
    if ck is not None:
        info = load_checkpoint(ck, par, opt)
        start = int(info["extra"]["unit_step"])
        R.step = int(info["extra"]["step"])
        R.log.truncate(int(info["extra"]["metrics_lines"]))
        print(f"resumed {unit} at step {start}/{total}")
    cand_rows = [(T.prompt(p), T.target(t)) for p, t in data["rows"]]
    ref = torch.tensor(data["ref_logps"], dtype=torch.float32)
    order = _epoch_order(cfg.seed, unit, P, total * cfg.dpo_batch_size)
    stats: List[Dict[str, float]] = []
    bar = progress(total=total, initial=start, desc=desc)
    try:
        for k in range(start, total):
            pidx = order[k * cfg.dpo_batch_size : (k + 1) * cfg.dpo_batch_size]
            bp = pairs[pidx]
            mine, contributes = rank_pairs(bp.tolist())  # whole questions per rank
            bp = bp[mine]
            uniq = sorted(set(bp.flatten().tolist()))
            remap = {c: j for j, c in enumerate(uniq)}
            local = torch.tensor([[remap[a], remap[b]] for a, b in bp.tolist()], dtype=torch.long)
            st = dpo_step(model, opt, [cand_rows[c] for c in uniq], ref[uniq], local,
                          pad_id=T.pad, params=params, beta=cfg.beta, loss_type=cfg.loss_type,
                          grad_clip=cfg.grad_clip, nll_coef=cfg.nll_coef, backend=cfg.backend,
                          parallel=par, contributes=contributes)  # fmt: skip
            R.step += 1
            stats.append(st)
            R.log.log(phase="dpo", unit=unit, provider=s, step=R.step, unit_step=k + 1, **st)
            bar.update(1)
            bar.set_postfix(loss=f"{st['loss']:.3f}", acc=f"{st['accuracy']:.2f}")
            done = k + 1
            stop = R.stop_after_step is not None and R.step >= R.stop_after_step
            if done < total and ((cfg.save_every and done % cfg.save_every == 0) or stop):
                save_checkpoint(udir, R.step, par, opt,
                                extra={"unit_step": done, "step": R.step,
                                       "metrics_lines": len(R.log)},
                                keep_last=cfg.keep_last)  # fmt: skip
            if stop and done < total:
                raise _Stop()
    finally:
        bar.close()
    providers.save(s, udir / "provider.safetensors")
    summ = {"unit": unit, "provider": s, "pairs": P, "steps": total,
            "mean_loss": _mean(x["loss"] for x in stats) if stats else None}  # fmt: skip
    _write_json(udir / "done.json", summ)
    R.mark(last_unit=unit)
    if R.stop_after_step is not None and R.step >= R.stop_after_step:
        raise _Stop()
    return summ


def _unit_in_progress(run_dir: Path) -> bool:
    from .checkpoint import latest_checkpoint

    root = Path(run_dir) / UNITS_DIR
    if not root.is_dir():
        return False
    return any(d.is_dir() and not (d / "done.json").is_file() and latest_checkpoint(d) is not None
               for d in root.iterdir())  # fmt: skip


def _unit_done(R: _Run, unit: str) -> bool:
    return dist.from_main(lambda: (R.run_dir / UNITS_DIR / unit / "done.json").is_file())


def _stage1(R: _Run, providers: Providers, sft, T: _Tok, train, with_rat, bar_desc="stage 1"):
    """Distinct providers: disjoint parts, own sample vs gold, DPO against M_sft."""
    from .data import format_input

    cfg = R.cfg
    idx = [i for i, h in enumerate(with_rat) if h]
    perm = torch.randperm(len(idx), generator=_generator(cfg.seed, "stage1_split")).tolist()
    parts = [sorted(idx[j] for j in perm[s :: cfg.providers]) for s in range(cfg.providers)]
    for s in range(cfg.providers):
        unit = f"stage1_p{s}"
        udir = R.run_dir / UNITS_DIR / unit
        if _unit_done(R, unit):
            providers.load(s, udir / "provider.safetensors")
            continue
        data = _read_json(udir / "pairs.json")
        if data is None:
            t0 = time.time()
            exs = [train[i] for i in parts[s]]
            with providers.use(s) as pm:
                own = _generate_rationales(pm, T, exs, 1, temperature=cfg.stage1_temperature,
                                           top_p=1.0, seed=_derive_seed(cfg.seed, "stage1_gen", s),
                                           cfg=cfg, desc=f"stage 1: p{s} generate")  # fmt: skip
            rows, pairs, same = [], [], 0
            for e, o in zip(exs, own):
                gold, mine = e.rationale.strip(), o[0]
                if mine == gold:
                    same += 1
                    continue
                p = format_prompt("rationale", format_input(e))
                pairs.append([len(rows), len(rows) + 1])
                rows += [[p, gold], [p, mine]]
            with _with_scorer(providers, sft) as ref_model:  # reference: the frozen M_sft
                ref = _all_rows(sequence_logps, ref_model,
                                [(T.prompt(p), T.target(t)) for p, t in rows], pad_id=T.pad,
                                batch_size=cfg.score_batch_size,
                                backend=cfg.backend).tolist()  # fmt: skip
            data = {"rows": rows, "pairs": pairs, "ref_logps": ref, "questions": parts[s]}
            udir.mkdir(parents=True, exist_ok=True)
            _write_json(udir / "pairs.json", data)
            R.log.log(phase="stage1", provider=s, questions=len(exs), pairs=len(pairs),
                      same_as_gold=same, seconds=round(time.time() - t0, 2))  # fmt: skip
            R.mark(last_data=unit)
        _train_unit(R, unit, providers, s, T, data, cfg.stage1_epochs,
                    f"{bar_desc}: p{s} DPO")  # fmt: skip


def _round(R: _Run, r: int, providers: Providers, sft, T: _Tok, train, noR_all: torch.Tensor):
    cfg = R.cfg
    S, k = cfg.providers, cfg.candidates_per_provider
    units = [f"round{r}_p{s}" for s in range(S)]
    if all(_unit_done(R, u) for u in units):
        for s, u in enumerate(units):
            providers.load(s, R.run_dir / UNITS_DIR / u / "provider.safetensors")
        return
    cdir = R.run_dir / UNITS_DIR / f"round{r}"
    cand = _read_json(cdir / "candidates.json")
    if cand is None:
        t0 = time.time()
        qs = list(range(len(train)))
        if cfg.stage2_max is not None and cfg.stage2_max < len(qs):
            perm = torch.randperm(len(qs), generator=_generator(cfg.seed, "stage2", r)).tolist()
            qs = sorted(perm[: cfg.stage2_max])
        exs = [train[i] for i in qs]
        texts, prov, group = [], [], []
        t_gen = time.time()
        for s in range(S):
            with providers.use(s) as pm:
                gen = _generate_rationales(pm, T, exs, k, temperature=cfg.temperature,
                                           top_p=cfg.top_p,
                                           seed=_derive_seed(cfg.seed, "round", r, s), cfg=cfg,
                                           desc=f"round {r}: p{s} generate")  # fmt: skip
            for j, ts in enumerate(gen):
                for t in ts:
                    texts.append(t)
                    prov.append(s)
                    group.append(j)
        gen_s = time.time() - t_gen
        gen_tok = sum(len(T.target(t, eos=False)) for t in texts)  # tokens generated, all ranks
        scores = _scorer_logprobs(R, providers, sft, T, [exs[g] for g in group], texts)
        groups = torch.tensor(group, dtype=torch.long)
        noR = noR_all[torch.tensor(qs, dtype=torch.long)]
        all_pairs, kept = build_pairs(scores, groups, noR if cfg.filter_no_rationale else None)
        gap_all = (scores[all_pairs[:, 0]] - scores[all_pairs[:, 1]]) if len(all_pairs) else None
        gap = (scores[kept[:, 0]] - scores[kept[:, 1]]) if len(kept) else None
        rec = {"phase": "round", "round": r, "questions": len(qs), "candidates": len(texts),
               "pairs": int(all_pairs.shape[0]), "kept": int(kept.shape[0]),
               "kept_fraction": kept.shape[0] / max(len(qs), 1),
               "gap": float(gap.mean()) if gap is not None else None,
               "gap_all": float(gap_all.mean()) if gap_all is not None else None,
               "mean_score": float(scores.mean()), "mean_no_rationale": float(noR.mean()),
               "best_above_no_rationale": float(
                   (torch.stack([scores[groups == j].max() for j in range(len(qs))]) > noR)
                   .float().mean()),
               "seconds": round(time.time() - t0, 2), "gen_tokens": gen_tok,
               "gen_seconds": round(gen_s, 3),
               "gen_tokens_per_s": round(gen_tok / max(gen_s, 1e-9), 1),
               "world": dist.world()}  # fmt: skip
        for s in range(S):
            rec[f"score_p{s}"] = float(scores[torch.tensor(prov) == s].mean())
        cand = {"questions": qs, "texts": texts, "provider": prov, "group": group,
                "scores": scores.tolist(), "no_rationale": noR.tolist(),
                "pairs": all_pairs.tolist(), "kept": kept.tolist(), "record": rec}  # fmt: skip
        cdir.mkdir(parents=True, exist_ok=True)
        _write_json(cdir / "candidates.json", cand)
        R.log.log(rec)
        print(f"round {r}: kept {rec['kept']}/{rec['questions']} pairs "
              f"({rec['kept_fraction']:.2f}), gap {rec['gap'] or 0:.3f}")  # fmt: skip
        R.mark(last_data=f"round{r}")
    from .data import format_input

    kept = cand["kept"]
    # the candidates that appear in kept pairs, renumbered
    used = sorted({c for p in kept for c in p})
    remap = {c: j for j, c in enumerate(used)}
    rows = [[format_prompt("rationale", format_input(train[cand["questions"][cand["group"][c]]])),
             cand["texts"][c]] for c in used]  # fmt: skip
    pairs = [[remap[a], remap[b]] for a, b in kept]
    for s, unit in enumerate(units):
        udir = R.run_dir / UNITS_DIR / unit
        if _unit_done(R, unit):
            providers.load(s, udir / "provider.safetensors")
            continue
        data = _read_json(udir / "pairs.json")
        if data is None:
            with providers.use(s) as pm:
                ref = _all_rows(sequence_logps, pm, [(T.prompt(p), T.target(t)) for p, t in rows],
                                pad_id=T.pad, batch_size=cfg.score_batch_size,
                                backend=cfg.backend).tolist()  # fmt: skip
            data = {"rows": rows, "pairs": pairs, "ref_logps": ref}
            udir.mkdir(parents=True, exist_ok=True)
            _write_json(udir / "pairs.json", data)
            R.mark(last_data=unit)
        _train_unit(R, unit, providers, s, T, data, cfg.dpo_epochs, f"round {r}: p{s} DPO")


def _scorer_logprobs(R: _Run, providers: Providers, sft, T: _Tok, examples, rationales):
    rows = _score_rows(T, examples, rationales)
    cfg = R.cfg
    if sft is not None:
        return _all_rows(answer_logprobs, sft, rows, pad_id=T.pad,
                         batch_size=cfg.score_batch_size, backend=cfg.backend)  # fmt: skip
    with providers.base() as base:
        return _all_rows(answer_logprobs, base, rows, pad_id=T.pad,
                         batch_size=cfg.score_batch_size, backend=cfg.backend)  # fmt: skip


# ------------------------------------------------------------------------------------ evaluation


def answer_accuracy(
    model, T: _Tok, examples, rationales: Sequence[Optional[str]], *, cfg: CollateConfig
) -> Tuple[List[bool], List[Optional[str]]]:
    """Answer each example after its rationale ([I;R]->A; I->A when ``None``): with choices, the
    option with the highest mean log-prob; otherwise greedy decoding. Returns ``(correct,
    predicted answers)``."""
    from .data import answer_matches, format_input
    from .generate import generate_candidates
    from .rewards import answer_options

    prompts = []
    for e, r in zip(examples, rationales):
        q = format_input(e)
        prompts.append(format_prompt("answer", q) if r is None else
                       format_prompt("rationale_answer", q, r))  # fmt: skip
    correct: List[bool] = [False] * len(examples)
    preds: List[Optional[str]] = [None] * len(examples)
    rows, owner, opts = [], [], []
    free = []
    for i, (e, p) in enumerate(zip(examples, prompts)):
        if e.choices:
            options, gold = answer_options(e)
            pid = T.prompt(p)
            for j, o in enumerate(options):
                rows.append((pid, T.target(o, eos=False)))
                owner.append((i, j))
            opts.append((i, options, gold))
        else:
            free.append(i)
    if rows:
        lp = answer_logprobs(model, rows, pad_id=T.pad, batch_size=cfg.score_batch_size,
                             backend=cfg.backend)  # fmt: skip
        best: Dict[int, Tuple[float, int]] = {}
        for (i, j), v in zip(owner, lp.tolist()):
            if i not in best or v > best[i][0]:
                best[i] = (v, j)
        for i, options, gold in opts:
            j = best[i][1]
            preds[i] = options[j].rstrip(".")
            correct[i] = j == gold
    if free:
        cands = generate_candidates(model, T.tok, [T.prompt(prompts[i]) for i in free], 1, 16,
                                    temperature=0.0, eos_token_id=T.eos,
                                    batch_size=cfg.gen_batch_size, return_logprobs=False,
                                    backend=cfg.backend)  # fmt: skip
        for i, t in zip(free, cands.texts):
            a = t.strip().rstrip(".").strip()
            preds[i] = a
            correct[i] = answer_matches(a, examples[i].answer, examples[i].choices or None)
    return correct, preds


def _evaluate_rationales(R: _Run, answerer, scorer, T, examples, rationales, label: str):
    """Accuracy of ``answerer`` after ``rationales`` and the gold answer's mean log-prob under
    ``scorer``."""
    cfg = R.cfg

    def part(items):  # this rank's shard
        exs, rats = [e for e, _ in items], [r for _, r in items]
        ok, pred = answer_accuracy(answerer, T, exs, rats, cfg=cfg)
        lps = answer_logprobs(scorer, _score_rows(T, exs, rats), pad_id=T.pad,
                              batch_size=cfg.score_batch_size, backend=cfg.backend)  # fmt: skip
        return list(zip(ok, pred, lps.tolist()))

    got = dist.map_shards(part, list(zip(examples, rationales)))
    correct, preds = [g[0] for g in got], [g[1] for g in got]
    lp = torch.tensor([g[2] for g in got], dtype=torch.float32)
    n = len(examples)
    m = {"model": label, "n": n, "accuracy": sum(correct) / max(n, 1),
         "answer_logprob": float(lp.mean()) if n else None}  # fmt: skip
    if rationales and rationales[0] is not None and examples and examples[0].meta.get("steps"):
        from .data import verify_steps

        m["valid_steps"] = sum(verify_steps(e, r) for e, r in zip(examples, rationales)) / n
    pred_rows = [{"id": e.id, "rationale": r, "answer": a, "gold": e.answer, "correct": c}
                 for e, r, a, c in zip(examples, rationales, preds, correct)]  # fmt: skip
    return m, pred_rows


# ------------------------------------------------------------------------------------ run


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


def run_collate(
    cfg: CollateConfig,
    run_dir,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after_step: Optional[int] = None,
    stop_after_sft_step: Optional[int] = None,
) -> Dict[str, Any]:
    """Run (or resume) a full COLLATE run in ``run_dir``. Returns ``{"status", "run_dir",
    "elapsed_s", "table": [rows], "rounds": [records], "selected": s}``. ``stop_after_step`` (DPO
    steps over all units) / ``stop_after_sft_step`` checkpoint and stop early
    (``status="stopped"``)."""
    from .models import load_model

    t_start = time.time()
    _quiet_transformers()
    device = setup_torch(cfg)  # joins the process group under torchrun
    run_dir = prepare_run(run_dir, cfg, resume, overwrite)
    train = load_split(cfg, "train")
    dev = load_split(cfg, "dev")
    test = load_split(cfg, "test")
    if not train:
        raise ValueError("no training examples")
    with_rat = _rationale_mask(cfg, train)
    if not any(with_rat):
        raise ValueError("no training example has a rationale (stage 1 needs some)")
    log = runs.MetricsLogger(run_dir / runs.METRICS_FILE, write=dist.is_main())
    prior = _read_json(run_dir / "elapsed.json") or {}
    elapsed_before = float(prior.get("elapsed_s", 0.0)) if resume else 0.0
    R = _Run(cfg, run_dir, log, stop_after_step, stop_after_sft_step)

    def elapsed():
        return elapsed_before + time.time() - t_start

    def stopped():
        _write_json(run_dir / "elapsed.json", {"elapsed_s": elapsed()})
        return {"status": "stopped", "run_dir": str(run_dir), "elapsed_s": elapsed()}

    try:
        # ---- stage 0
        if not R.state.get("sft_done"):
            if not resume or not R.state.get("started"):
                log.truncate(0)
                log.log(phase="start", n_train=len(train), n_dev=len(dev), n_test=len(test),
                        with_rationale=sum(with_rat))  # fmt: skip
                R.mark(started=True)
            try:
                _sft_phase(R, device, train, with_rat)
            except _Stop:
                return stopped()
        sft, tok = load_model(run_dir / SFT_DIR, device=device, dtype=cfg.dtype)
        T = _Tok(tok)
        providers = Providers(sft, cfg.providers, cfg.provider_mode, lora_r=cfg.lora_r,
                              lora_alpha=cfg.lora_alpha, lora_targets=cfg.lora_targets,
                              seed=cfg.seed)  # fmt: skip
        scorer = _freeze(sft) if cfg.provider_mode == "full" else None
        if scorer is None:
            del sft
        # pending work must not re-log what is already there: go back to the last durable point
        # (a unit interrupted after a checkpoint truncates to that checkpoint instead)
        if resume and not _unit_in_progress(run_dir):
            log.truncate(int(R.state.get("metrics_lines", len(log))))
        # ---- stage 1 + 2
        try:
            _stage1(R, providers, scorer, T, train, with_rat)
            if cfg.eval_each_round:
                _eval_providers(R, providers, scorer, T, test, "stage1")
            noR = _no_rationale(R, providers, scorer, T, train)
            for r in range(cfg.rounds):
                _round(R, r, providers, scorer, T, train, noR)
                if cfg.eval_each_round:
                    _eval_providers(R, providers, scorer, T, test, f"round{r}")
        except _Stop:
            return stopped()

        # ---- evaluation
        result = _final_eval(R, providers, scorer, T, dev, test)
        total_s = elapsed()
        _write_json(run_dir / "elapsed.json", {"elapsed_s": total_s})
        result.update(status="done", run_dir=str(run_dir), elapsed_s=round(total_s, 1),
                      steps=R.step)  # fmt: skip
        result["rounds"] = [r for r in runs.read_metrics(run_dir) if r.get("phase") == "round"]
        _write_json(run_dir / RESULT_FILE, result)
        if dist.is_main():
            _write_summary(run_dir, cfg, result, runs.read_metrics(run_dir))
        log.log(phase="done", elapsed_s=round(total_s, 1))
        print(runs.markdown_table(result["table"]))
        print(f"done in {total_s:.0f} s; summary: {run_dir / runs.SUMMARY_FILE}")
        return result
    finally:
        log.close()


def _with_scorer(providers: Providers, scorer):
    if scorer is not None:
        return contextlib.nullcontext(scorer)
    return providers.base()


def _no_rationale(R: _Run, providers, scorer, T, train) -> torch.Tensor:
    path = R.run_dir / UNITS_DIR / "no_rationale.json"
    got = _read_json(path)
    if got is not None:
        return torch.tensor(got, dtype=torch.float32)
    with _with_scorer(providers, scorer) as m:
        lp = _all_rows(
            answer_logprobs,
            m,
            _score_rows(T, train, [None] * len(train)),
            pad_id=T.pad,
            batch_size=R.cfg.score_batch_size,
            backend=R.cfg.backend,
        )
    _write_json(path, lp.tolist())
    return lp


def _eval_providers(R: _Run, providers, scorer, T, examples, tag: str) -> None:
    cfg = R.cfg
    done = list(R.state.get("evals_done", []))
    if tag in done:
        return
    for s in range(cfg.providers):
        with providers.use(s) as pm:
            rats = [x[0] for x in _generate_rationales(pm, T, examples, 1, temperature=0.0,
                                                       top_p=1.0, seed=0, cfg=cfg)]  # fmt: skip
            with _with_scorer(providers, scorer) as sm:
                ans = sm if cfg.answerer == "sft" else None
                if ans is not None:
                    m, _ = _evaluate_rationales(R, ans, sm, T, examples, rats, f"p{s}")
            if cfg.answerer == "provider":
                pm = providers.model(s)
                m, _ = _evaluate_rationales(R, pm, pm, T, examples, rats, f"p{s}")
        R.log.log(phase="eval", after=tag, provider=s, split="test", **m)
    R.mark(evals_done=done + [tag])


def _final_eval(R: _Run, providers, scorer, T, dev, test) -> Dict[str, Any]:
    cfg = R.cfg
    cached = _read_json(R.run_dir / "eval.json")
    if cached is not None:
        return cached
    t0 = time.time()
    table, preds = [], {}
    with _with_scorer(providers, scorer) as sm:
        m, p = _evaluate_rationales(R, sm, sm, T, test, [None] * len(test),
                                    "SFT: I->A (no rationale)")  # fmt: skip
        table.append(m)
        preds["sft_no_rationale"] = p[:50]
        rats = [
            x[0]
            for x in _generate_rationales(
                sm, T, test, 1, temperature=0.0, top_p=1.0, seed=0, cfg=cfg, desc="eval: M_sft"
            )
        ]
        m, p = _evaluate_rationales(R, sm, sm, T, test, rats,
                                    "SFT: [I;R]->A, M_sft rationales")  # fmt: skip
        table.append(m)
        preds["sft_rationale"] = p[:50]
    # selection on dev
    sel_rows = []
    for s in range(cfg.providers):
        with providers.use(s) as pm:
            rats = [x[0] for x in _generate_rationales(pm, T, dev, 1, temperature=0.0, top_p=1.0,
                                                       seed=0, cfg=cfg,
                                                       desc=f"select: p{s}")]  # fmt: skip
        with _with_scorer(providers, scorer) as sm:
            lp = _all_rows(
                answer_logprobs,
                sm,
                _score_rows(T, dev, rats),
                pad_id=T.pad,
                batch_size=cfg.score_batch_size,
                backend=cfg.backend,
            )
        sel_rows.append({"provider": f"p{s}", "dev_answer_logprob": float(lp.mean())})
    best = max(range(cfg.providers), key=lambda s: sel_rows[s]["dev_answer_logprob"])
    for s in range(cfg.providers):
        with providers.use(s) as pm:
            rats = [x[0] for x in _generate_rationales(pm, T, test, 1, temperature=0.0,
                                                       top_p=1.0, seed=0, cfg=cfg,
                                                       desc=f"eval: p{s}")]  # fmt: skip
            if cfg.answerer == "sft":
                with _with_scorer(providers, scorer) as sm:
                    m, p = _evaluate_rationales(R, sm, sm, T, test, rats, "")
            else:
                pm = providers.model(s)
                m, p = _evaluate_rationales(R, pm, pm, T, test, rats, "")
        sel_rows[s].update(
            test_accuracy=m["accuracy"],
            test_answer_logprob=m["answer_logprob"],
            valid_steps=m.get("valid_steps"),
            selected=s == best,
        )
        if s == best:
            m["model"] = f"COLLATE: [I;R^]->A, provider p{s} rationales (selected on dev)"
            table.append(m)
            preds["collate"] = p[:50]
    for m in table:
        R.log.log(phase="eval", split="test", **m)
    R.mark(final_eval=True)
    out = {"table": table, "providers": sel_rows, "selected": best, "predictions": preds,
           "eval_seconds": round(time.time() - t0, 1)}  # fmt: skip
    _write_json(R.run_dir / "eval.json", out)
    return out


def _write_summary(run_dir: Path, cfg: CollateConfig, result: Dict[str, Any], metrics) -> None:
    table = result["table"]
    rows = [dict(r) for r in table]
    if len(table) >= 3:
        c = table[-1]["accuracy"]
        rows.append(
            {
                "model": "Δ COLLATE − best SFT baseline",
                "accuracy": c - max(table[0]["accuracy"], table[1]["accuracy"]),
            }
        )
    sections = [("Test accuracy: SFT baselines vs COLLATE", runs.markdown_table(rows))]
    sections.append(("Providers (selection: mean gold-answer log-prob on the validation split)",
                     runs.markdown_table(result["providers"])))  # fmt: skip
    rnd = [
        {
            k: r.get(k)
            for k in (
                "round",
                "questions",
                "candidates",
                "pairs",
                "kept",
                "kept_fraction",
                "gap",
                "gap_all",
                "mean_score",
                "mean_no_rationale",
            )
        }
        for r in result.get("rounds", [])
    ]
    if rnd:
        for row, r in zip(rnd, result["rounds"]):
            dpo = [
                m
                for m in metrics
                if m.get("phase") == "dpo"
                and str(m.get("unit", "")).startswith(f"round{r['round']}_")
            ]
            row["dpo_loss"] = _mean(m["loss"] for m in dpo)
            row["dpo_acc"] = _mean(m["accuracy"] for m in dpo)
        sections.append(("Stage 2 rounds (kept pairs per question; gap = mean chosen − rejected "
                         "log-likelihood of the gold answer over kept pairs)",
                         runs.markdown_table(rnd)))  # fmt: skip
    st1 = [{k: m.get(k) for k in ("provider", "questions", "pairs", "same_as_gold")}
           for m in metrics if m.get("phase") == "stage1"]  # fmt: skip
    if st1:
        sections.append(("Stage 1 (own rationale vs gold, per provider)", runs.markdown_table(st1)))
    ev = [m for m in metrics if m.get("phase") == "eval" and m.get("after")]
    if ev:
        sections.append(("Providers on the test split after each stage",
                         runs.markdown_table([{k: m.get(k) for k in ("after", "provider",
                                              "accuracy", "answer_logprob", "valid_steps")}
                                              for m in ev])))  # fmt: skip
    keys = ["dataset", "model", "providers", "provider_mode", "rounds", "candidates_per_provider",
            "beta", "loss_type", "dpo_lr", "dpo_batch_size", "dpo_epochs", "stage1_epochs",
            "temperature", "top_p", "filter_no_rationale", "answerer", "sft_epochs", "n_train",
            "n_dev", "n_test", "flawed_fraction", "seed"]  # fmt: skip
    d = dataclasses.asdict(cfg)
    lines = [f"- `{k}`: {d[k]!r}" for k in keys]
    lines.append(f"- wall time: {result['elapsed_s']:.0f} s; DPO steps: {result['steps']}")
    mode = f" ({cfg.parallel})" if dist.world() > 1 else ""
    lines.append(f"- processes: {dist.world()}{mode}")
    sections.append(("Run", "\n".join(lines)))
    runs.write_summary(run_dir, "COLLATE run", sections)


# ------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``rationale-train collate``: one per :class:`CollateConfig` field, plus the run
    folder options."""
    from .mario import _common_arguments

    _common_arguments(parser, "collate", CollateConfig)


def config_from_args(args: argparse.Namespace) -> CollateConfig:
    file_values = getattr(args, "config_values", None)
    if args.resume and args.run_dir:
        base = CollateConfig.load(args.run_dir)
        return runs.build_config(CollateConfig, args, file_values, base=base)
    return runs.build_config(CollateConfig, args, file_values)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """``rationale-train collate``."""
    from .mario import _resolve_run_dir

    run_dir = _resolve_run_dir(args, "collate")
    args.run_dir = str(run_dir)
    cfg = config_from_args(args)
    if args.resume and dist.is_main():
        runs.save_config(run_dir, cfg)
    return run_collate(cfg, run_dir, resume=args.resume, overwrite=args.overwrite,
                       stop_after_step=args.stop_after_step,
                       stop_after_sft_step=args.stop_after_sft_step)  # fmt: skip

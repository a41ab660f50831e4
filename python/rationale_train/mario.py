"""MaRio (Multi-rewArd RatIOnalization, Ramnath et al., ICLR 2024): the training loop and the
``rationale-train mario`` / ``rationale-train sft`` commands.

MaRio extends Quark to several rewards. The loop here:

1. **Data, tokenizer, model.** The embedded default is the synthetic arithmetic task
   (``data.synthetic_splits``: ~30 % of the silver rationales are flawed) with a tiny Llama and a
   byte-level BPE tokenizer trained on the task text; ``--model DIR`` loads any local Hugging Face
   causal LM, ``--dataset`` one of MaRio's datasets.
2. **SFT warm start** on the silver rationales (target ``rationale + " So the answer is " + answer
   + "."`` + EOS after ``question + " "``), token-mean NLL. The result is saved as
   ``RUN/sft_model`` and is the frozen **reference**.
3. **Rounds** ``r = 0..R-1``:

   - *sample* ``samples_per_question`` rationales per training question with nucleus sampling
     (``top_p``, ``temperature``), conditioned on the best control code of every (active) reward;
     round 0 samples from the reference without codes and also adds every silver rationale.
     Samples without the answer marker are dropped;
   - *score* every new sample with every reward (the consistency scorer is the reference);
   - *add* them to the pool (it only grows; ``RUN/pool.jsonl``, rewritten atomically) and
     *re-quantise* the whole pool per reward into K equal-count bins (bin 0 = best; binary rewards
     such as correctness into 2 bins by value; by default, ``ties="best"``, samples tied on a value
     share the best bin of their tie group, as the step verifier's few distinct values tie
     40-55 % of the pool): a sample's control code is its per-reward tokens in reward order,
     ``<|plaus_0|><|consist_3|>...``, placed in front of the question;
   - *train* ``steps_per_round`` steps on batches drawn from the pool with
     ``rk.fused_linear_rationale_loss``: per target token NLL + β·KL(policy‖reference) −
     α·entropy, mean over the batch's target tokens. The reference reads the same target after the
     question *without* codes (its target-token hidden states are gathered at its own positions);
     KL over the original vocabulary only (``kl_vocab`` = the first control-token id).

   Variants: ``classic`` (every reward's code from the start) and ``additive`` (reward i's code
   joins after ``i * additive_every`` steps, in reward order).
4. **Evaluation** on the test split: greedy decoding, the SFT reference without codes vs the
   MaRio policy with the best code of every reward forced; accuracy and the mean of each reward
   (``rationale_train.evaluate``). ``RUN/summary.md`` holds the table.

Control tokens are added (``models.add_control_tokens``) to a copy of the SFT model as special
tokens whose embeddings are drawn from the mean / std of the existing ones.

Run folder: ``config.json``, ``metrics.jsonl`` (one record per step, per round, per evaluation),
``summary.md``, ``result.json``, ``sft_model/`` (reference, HF format), ``pool.jsonl``,
``sft/checkpoints/`` (during SFT) and ``checkpoints/`` (MaRio: safetensors weights, optimizer and
RNG state; written atomically). ``--resume`` restarts from the latest checkpoint, truncates the
pool and the metrics to what that checkpoint had seen, and reproduces the losses of an
uninterrupted run: every batch order and sampling seed is derived from ``(seed, phase, round)``,
never from a running RNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

import rationale_kernels as rk

from . import dist, runs
from .runs import derive_seed as _derive_seed
from .runs import epoch_order as _epoch_order
from .runs import progress

__all__ = [
    "MarioConfig",
    "Pool",
    "add_arguments",
    "add_sft_arguments",
    "best_code_ids",
    "build_rewards",
    "load_policy",
    "load_reference",
    "load_split",
    "reward_context",
    "run",
    "run_mario",
    "run_sft",
    "setup_torch",
    "train_step",
]

SFT_DIR = "sft_model"
POOL_FILE = "pool.jsonl"
SFT_EVAL_FILE = "sft_eval.json"
RESULT_FILE = "result.json"


def _f(default, help: str, **kw):
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _fl(default, help: str, **kw):
    return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **kw})


@dataclasses.dataclass
class MarioConfig:
    """Every option of a MaRio run (each is a ``--flag`` and a config-file key). The defaults are
    the embedded run: synthetic task, tiny Llama, a few minutes on a 2-core CPU."""

    # run
    seed: int = _f(0, "seed of data, model init, batch order and sampling")
    device: str = _f("cpu", "cpu, cuda, cuda:N or auto")
    backend: str = _f("auto", "rationale_kernels backend: auto, torch, cpu, triton, cuda")
    threads: Optional[int] = _f(
        None,
        "torch CPU threads; default 1 for the tiny default model (fastest on a shared CPU: "
        "OpenMP barriers stall when another process holds a core), torch's choice otherwise",
    )
    # data
    dataset: str = _f("synthetic", "synthetic, or a MaRio dataset: strategyqa quarel openbookqa "
                      "numersense qasc")  # fmt: skip
    data_root: Optional[str] = _f(None, "data root for non-synthetic datasets")
    data_seed: Optional[int] = _f(None, "seed of the synthetic data (default: --seed)")
    n_train: int = _f(3000, "synthetic: training questions")
    n_test: int = _f(1000, "synthetic: test questions (1000: ±1.5 points of noise per figure)")
    flawed_fraction: float = _f(0.3, "synthetic: fraction of flawed silver rationales")
    synth_ops: str = _f("+-", "synthetic: operations (subset of +-*)")
    synth_max_value: int = _f(20, "synthetic: largest value in a problem")
    synth_min_steps: int = _f(2, "synthetic: fewest operations per problem")
    synth_max_steps: int = _f(2, "synthetic: most operations per problem")
    synth_answer_style: str = _f(
        "value",
        "synthetic: answers as choice letters (letter) or values (value)",
        choices=["letter", "value"],
    )
    max_train: Optional[int] = _f(None, "use at most this many training examples")
    max_test: Optional[int] = _f(None, "evaluate at most this many test examples")
    eval_split: str = _f("test", "split the final evaluation uses")
    # model
    model: Optional[str] = _f(None, "local HF causal LM dir or smollm2-135m-gguf; default: a tiny "
                              "Llama with a tokenizer trained on the task text")  # fmt: skip
    dtype: str = _f("float32", "model dtype")
    vocab_size: int = _f(512, "tiny model: tokenizer vocabulary bound")
    hidden_size: int = _f(64, "tiny model: hidden size")
    num_layers: int = _f(2, "tiny model: layers")
    num_heads: int = _f(4, "tiny model: attention heads")
    max_new_tokens: int = _f(40, "longest generated target, in tokens")
    # SFT
    sft_epochs: float = _f(12.0, "SFT epochs over the silver rationales")
    sft_lr: float = _f(3e-3, "SFT peak learning rate (warmup + cosine decay)")
    sft_batch_size: int = _f(32, "SFT batch size")
    sft_warmup: float = _f(0.05, "SFT warmup, fraction of the steps")
    # MaRio
    rewards: List[str] = _fl(
        ["plausibility", "consistency", "correctness"],
        "rewards in control-code order (registered names; diversity is registered but left out "
        "of the default: ~84 percent of synthetic samples score 1.0 on it, so its code carries "
        "almost no signal)",
    )
    k: int = _f(5, "quantisation bins per (non-binary) reward")
    beta: float = _f(0.1, "KL(policy || reference) coefficient")
    alpha: float = _f(0.0, "entropy bonus coefficient")
    rounds: int = _f(4, "MaRio rounds (sample, score, re-quantise, train)")
    samples_per_question: int = _f(1, "rationales sampled per training question per round")
    top_p: float = _f(0.7, "nucleus sampling top-p")
    temperature: float = _f(1.0, "sampling temperature")
    steps_per_round: int = _f(400, "optimizer steps per round")
    batch_size: int = _f(32, "MaRio batch size")
    lr: float = _f(1e-3, "MaRio learning rate (constant; the paper's 3e-5 is for T5-large)")
    grad_clip: float = _f(1.0, "gradient-norm clip (0: off)")
    variant: str = _f("classic", "classic: all codes from the start; additive: one reward at a "
                      "time", choices=["classic", "additive"])  # fmt: skip
    additive_every: int = _f(100, "additive: steps between introducing rewards")
    ties: str = _f(
        "best",
        "tied reward values: best (every tied sample gets the best bin of its tie group, so the "
        "policy's own perfect samples share bin 0 with the silver ones) or pool (Quark: "
        "equal-count bins, ties split by pool order, earlier first)",
        choices=["pool", "best"],
    )
    add_silver: bool = _f(True, "round 0: add the silver rationales to the pool")
    plausibility_model: Optional[str] = _f(None, "plausibility classifier dir (default: the "
                                           "synthetic step verifier)")  # fmt: skip
    # evaluation / bookkeeping
    eval_each_round: bool = _f(True, "evaluate the policy after every round")
    gen_batch_size: int = _f(256, "prompts per generation batch")
    eval_batch_size: int = _f(200, "prompts per evaluation batch")
    score_batch_size: int = _f(64, "rows per forward pass of model-based rewards")
    parallel: str = _f(
        "ddp",
        "under torchrun: ddp (every rank holds the model) or fsdp (FSDP2: parameters, gradients "
        "and optimizer state sharded over the ranks, gathered for generation)",
        choices=["ddp", "fsdp"],
    )
    save_every: int = _f(0, "also checkpoint every N steps (0: end of SFT and of each round)")
    keep_last: int = _f(2, "checkpoints kept")

    def __post_init__(self):
        from .rewards import reward_spec

        if self.variant not in ("classic", "additive"):
            raise ValueError(f"variant must be classic or additive, got {self.variant!r}")
        if isinstance(self.rewards, str):
            self.rewards = [r.strip() for r in self.rewards.split(",") if r.strip()]
        self.rewards = list(self.rewards)
        if len(set(self.rewards)) != len(self.rewards):
            raise ValueError(f"rewards repeat: {self.rewards}")
        for name in self.rewards:
            reward_spec(name)  # raises for unknown names
        for name in ("k", "rounds", "steps_per_round", "batch_size", "sft_batch_size",
                     "samples_per_question", "max_new_tokens"):  # fmt: skip
            v = getattr(self, name)
            lo = 0 if name in ("rounds", "steps_per_round") else 1
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if self.additive_every < 1:
            raise ValueError("additive_every must be >= 1")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be ddp or fsdp, got {self.parallel!r}")

    @classmethod
    def load(cls, run_dir) -> MarioConfig:
        return runs.build_config(cls, file_values=runs.load_config(run_dir))


# ------------------------------------------------------------------------------------ setup


def setup_torch(cfg: MarioConfig) -> torch.device:
    threads = cfg.threads if cfg.threads is not None else (1 if cfg.model is None else None)
    if threads:
        torch.set_num_threads(int(threads))
    return dist.device(cfg.device)


def load_split(cfg: MarioConfig, split: str):
    """The examples of ``split`` for this config (synthetic splits are regenerated from the
    data seed; other datasets are read from ``data_root``), capped by ``max_train/max_test``."""
    from .data import load_dataset, synthetic_splits

    if cfg.dataset == "synthetic":
        seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
        exs = synthetic_splits(
            seed=seed,
            n_train=cfg.n_train,
            n_dev=cfg.n_test,  # constant: the splits must not depend on which one is asked
            n_test=cfg.n_test,
            flawed_fraction=cfg.flawed_fraction,
            ops=cfg.synth_ops,
            max_value=cfg.synth_max_value,
            min_steps=cfg.synth_min_steps,
            max_steps=cfg.synth_max_steps,
            answer_style=cfg.synth_answer_style,
        )[split]
    else:
        exs = load_dataset(cfg.dataset, split, cfg.data_root)
        if split == "train":
            exs = [e for e in exs if e.rationale]
    cap = cfg.max_train if split == "train" else cfg.max_test
    return exs[:cap] if cap is not None else exs


def build_rewards(cfg: MarioConfig) -> Dict[str, Any]:
    from .rewards import get_reward

    out = {}
    for name in cfg.rewards:
        if name == "plausibility" and cfg.plausibility_model:
            out[name] = get_reward(name, scorer=cfg.plausibility_model)
        elif name == "consistency":
            out[name] = get_reward(name, backend=cfg.backend)
        else:
            out[name] = get_reward(name)
    return out


def reward_context(cfg: MarioConfig, ref, base_tok) -> Dict[str, Any]:
    """What every reward call gets: the frozen reference (the consistency scorer) and its
    tokenizer."""
    return {"ref_model": ref, "tokenizer": base_tok, "batch_size": cfg.score_batch_size}


def _freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_reference(run_dir, cfg: MarioConfig):
    """``(reference, tokenizer)``: the SFT model of a run, frozen."""
    from .models import load_model

    device = setup_torch(cfg)
    model, tok = load_model(Path(run_dir) / SFT_DIR, device=device, dtype=cfg.dtype)
    return _freeze(model), tok


def _control_tokens(cfg: MarioConfig) -> List[str]:
    from .quantize import control_tokens

    return control_tokens(cfg.rewards, cfg.k)


def _fresh_policy(run_dir, cfg: MarioConfig):
    """The SFT model with the control tokens added (deterministic from the seed)."""
    from .models import add_control_tokens, load_model

    device = setup_torch(cfg)
    model, tok = load_model(Path(run_dir) / SFT_DIR, device=device, dtype=cfg.dtype)
    ids = add_control_tokens(model, tok, _control_tokens(cfg), seed=_derive_seed(cfg.seed, "ctrl"))
    return model, tok, min(ids)


def load_policy(run_dir, cfg: MarioConfig, checkpoint=None):
    """``(policy, tokenizer, checkpoint_path)``: the MaRio policy of a run with the weights of
    ``checkpoint`` (default: the latest), RNG untouched. Without any MaRio checkpoint the fresh
    policy (SFT + control tokens) is returned with ``checkpoint_path=None``."""
    from .checkpoint import latest_checkpoint, load_checkpoint

    model, tok, _ = _fresh_policy(run_dir, cfg)
    path = checkpoint or latest_checkpoint(run_dir)
    if path is not None:
        path = load_checkpoint(path, model, restore_rng=False)["path"]
    return model.eval(), tok, path


def best_code_ids(tok, reward_names: Sequence[str], k: int) -> List[int]:
    """Token ids of the best code (bin 0) of every reward, in order."""
    from .quantize import control_token

    return [int(tok.convert_tokens_to_ids(control_token(n, 0))) for n in reward_names]


def _target_ids(tok, target: str) -> List[int]:
    ids = tok(" " + target, add_special_tokens=False)["input_ids"]
    return list(ids) + [int(tok.eos_token_id)]


def _body(model):
    getter = getattr(model, "get_decoder", None)
    body = getter() if callable(getter) else None
    if body is None:
        body = getattr(model, model.base_model_prefix)
    return body


def _collate(rows: Sequence[Tuple[List[int], List[int]]], pad_id: int, device):
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


def _target_hidden(model, rows, pad_id, device):
    """Hidden states that predict each target token, ``[N, H]``, and those tokens ``[N]``
    (row-major, so two models reading the same targets after different prompts line up)."""
    ids, mask, labels = _collate(rows, pad_id, device)
    hidden = _body(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    lab = labels[:, 1:]
    keep = lab != -100
    return hidden[:, :-1][keep], lab[keep]


def _head(model):
    out = model.get_output_embeddings()
    return out.weight, getattr(out, "bias", None)


def train_step(
    policy,
    optimizer,
    policy_rows,
    *,
    pad_id: int,
    ref=None,
    ref_rows=None,
    kl_coef: float = 0.0,
    kl_vocab: Optional[int] = None,
    entropy_coef: float = 0.0,
    grad_clip: float = 0.0,
    backend: str = "auto",
    scheduler=None,
    parallel: Optional[dist.Parallel] = None,
) -> Dict[str, float]:
    """One optimizer step on ``policy_rows`` (``(prompt_ids, target_ids)`` pairs) with
    ``rk.fused_linear_rationale_loss``; ``ref_rows`` are the same targets after the reference's
    prompts (no codes). Returns the loss and its parts (means over the target tokens).

    ``parallel`` (a :class:`dist.Parallel` of ``policy``): the rows are this rank's share of the
    global batch; the loss is normalised by the global target-token count (all-reduced) over the
    world size, as DDP / FSDP average gradients, so the step equals the one-process step on the
    global batch. The returned figures are then those of the global batch."""
    device = _device_of(policy)
    policy.train()
    kw: Dict[str, Any] = {}
    yr = None
    if ref is not None and kl_coef:
        with torch.no_grad():
            hr, yr = _target_hidden(ref, ref_rows, pad_id, device)
        wr, br = _head(ref)
        kw = dict(ref_hidden=hr, ref_weight=wr, ref_bias=br, kl_coef=float(kl_coef),
                  kl="full", kl_vocab=kl_vocab)  # fmt: skip
    n_local = sum(_n_targets(p, t) for p, t in policy_rows)
    world = dist.world() if parallel is not None else 1
    normalizer = None
    if world > 1:
        normalizer = max(dist.all_sum([n_local])[0], 1.0) / world

    def loss_of(model):
        h, y = _target_hidden(model, policy_rows, pad_id, device)
        if yr is not None and not torch.equal(y, yr):
            raise RuntimeError("policy and reference targets do not line up")
        w, b = _head(model)
        return rk.fused_linear_rationale_loss(
            h, w, y, bias=b, entropy_coef=float(entropy_coef), reduction="mean",
            normalizer=normalizer, return_stats=True, backend=backend, **kw,
        )  # fmt: skip

    loss, stats = parallel(loss_of) if parallel is not None else loss_of(policy)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = None
    if grad_clip and grad_clip > 0:
        params = parallel.parameters() if parallel is not None else policy.parameters()
        gnorm = _float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    keys = [k for k in ("nll", "kl", "entropy") if k in stats]
    vals = [float(loss.detach())] + [float(stats[k]) * n_local for k in keys] + [n_local]
    if world > 1:  # global figures: the loss parts add up, the means are token-weighted
        vals = dist.all_sum(vals)
    n = vals[-1]
    out = {"loss": vals[0] / world}  # each rank's part is scaled by the world size
    out.update({k: v / max(n, 1) for k, v in zip(keys, vals[1:-1])})
    out["num_tokens"] = int(n)
    if gnorm is not None:
        out["grad_norm"] = gnorm
    return out


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _n_targets(prompt: Sequence[int], target: Sequence[int]) -> int:
    """Target tokens a ``(prompt, target)`` row trains (the first one needs a token before it)."""
    return len(target) - (0 if len(prompt) else 1)


def _float(x) -> float:
    """A scalar tensor (or an FSDP DTensor's full value) as a float."""
    full = getattr(x, "full_tensor", None)
    return float(full() if callable(full) else x)


# ------------------------------------------------------------------------------------ pool


class Pool:
    """The growing pool of scored rationales; one dict per sample: ``example`` (index into the
    training examples), ``round``, ``source`` (``silver`` / ``sample``), ``rationale``,
    ``answer``, ``rewards`` ({name: value}). Persisted as JSONL (atomic rewrite)."""

    def __init__(self, records: Optional[List[Dict[str, Any]]] = None):
        self.records: List[Dict[str, Any]] = list(records or [])

    def __len__(self) -> int:
        return len(self.records)

    def add(self, recs: Sequence[Dict[str, Any]]) -> None:
        self.records.extend(dict(r) for r in recs)

    def truncate(self, n: int) -> None:
        del self.records[n:]

    def values(self, name: str) -> List[float]:
        return [float(r["rewards"][name]) for r in self.records]

    def quantize(
        self, reward_names: Sequence[str], k: int, ties: str = "pool"
    ) -> Dict[str, List[int]]:
        """Bins of every sample per reward over the whole pool (``quantize_rewards``). With
        ``ties="best"`` every sample whose value is tied with others gets the best bin of its tie
        group (a discrete reward's perfect samples then share bin 0 whatever their age)."""
        from .quantize import quantize_rewards

        if not self.records:
            return {n: [] for n in reward_names}
        values = {n: self.values(n) for n in reward_names}
        bins = {n: b.tolist() for n, b in quantize_rewards(values, k).items()}
        if ties == "best":
            for n in reward_names:
                best: Dict[float, int] = {}
                for v, b in zip(values[n], bins[n]):
                    best[v] = min(best.get(v, b), b)
                bins[n] = [best[v] for v in values[n]]
        elif ties != "pool":
            raise ValueError(f"ties must be pool or best, got {ties!r}")
        return bins

    def save(self, path) -> None:
        runs.write_jsonl_atomic(path, self.records)

    @classmethod
    def load(cls, path) -> Pool:
        path = Path(path)
        if not path.is_file():
            return cls()
        with open(path, encoding="utf-8") as f:
            return cls([json.loads(line) for line in f if line.strip()])


# ------------------------------------------------------------------------------------ SFT


def _build_base(cfg, texts, device):
    """(model, tokenizer): ``cfg.model`` loaded, or a tiny Llama with a tokenizer trained on
    ``texts`` (shared by MaRio and COLLATE; ``cfg`` needs model, dtype, vocab_size, hidden_size,
    num_layers, num_heads, seed)."""
    from .models import load_model, tiny_llama, train_tokenizer

    if cfg.model:
        return load_model(cfg.model, device=device, dtype=cfg.dtype)
    # rank 0's tokenizer everywhere (BPE training need not be bit-identical between processes)
    tok = dist.broadcast(train_tokenizer(texts, vocab_size=cfg.vocab_size) if dist.is_main()
                         else None)  # fmt: skip
    model = tiny_llama(tok, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                       num_heads=cfg.num_heads, seed=_derive_seed(cfg.seed, "init"),
                       dtype=cfg.dtype)  # fmt: skip
    return model.to(device), tok


def _sft_schedule(optimizer, total: int, warmup: float):
    warm = max(int(round(total * warmup)), 1)

    def f(step):
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(total - warm, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def _sft_phase(cfg, run_dir: Path, log, device, train, test, *, stop_after_sft_step=None):
    """SFT (resumable); saves ``RUN/sft_model`` and evaluates it. Returns False when stopped."""
    from .checkpoint import load_checkpoint, save_checkpoint
    from .data import format_example_target, format_input
    from .evaluate import prompt_ids
    from .models import save_pretrained_atomic

    sft_run = run_dir / "sft"
    texts = [format_input(e) + " " + format_example_target(e) for e in train]
    model, tok = _build_base(cfg, texts, device)
    dist.check_batch(cfg.sft_batch_size, "sft_batch_size")
    par = dist.Parallel(model, cfg.parallel)
    total = max(int(math.ceil(cfg.sft_epochs * len(train) / cfg.sft_batch_size)), 1)
    opt = torch.optim.AdamW(par.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    sched = _sft_schedule(opt, total, cfg.sft_warmup)
    start = 0
    ck = _latest(sft_run)
    if ck is not None:
        info = load_checkpoint(ck, par, opt, sched)
        start = int(info["step"])
        log.truncate(int(info["extra"]["metrics_lines"]))
        print(f"resumed SFT at step {start}/{total}")
    rows = [(prompt_ids(tok, e), _target_ids(tok, format_example_target(e))) for e in train]
    order = _epoch_order(cfg.seed, "sft", len(train), total * cfg.sft_batch_size)
    pad = tok.pad_token_id
    bar = progress(total=total, initial=start, desc="SFT")
    try:
        for step in range(start, total):
            idx = dist.part(order[step * cfg.sft_batch_size : (step + 1) * cfg.sft_batch_size])
            lr = opt.param_groups[0]["lr"]
            st = train_step(model, opt, [rows[i] for i in idx], pad_id=pad,
                            grad_clip=cfg.grad_clip, backend=cfg.backend,
                            scheduler=sched, parallel=par)  # fmt: skip
            log.log(phase="sft", step=step + 1, lr=lr, **st)
            bar.update(1)
            bar.set_postfix(loss=f"{st['loss']:.3f}")
            done = step + 1
            stop = stop_after_sft_step is not None and done >= stop_after_sft_step
            if done < total and ((cfg.save_every and done % cfg.save_every == 0) or stop):
                save_checkpoint(sft_run, done, par, opt, sched,
                                extra={"metrics_lines": len(log)},
                                keep_last=cfg.keep_last)  # fmt: skip
            if stop and done < total:
                return False
    finally:
        bar.close()
    model.eval()
    state = par.gather_state()  # FSDP: the full weights on rank 0
    dist.main_only(lambda: save_pretrained_atomic(model, tok, run_dir / SFT_DIR, state_dict=state))
    return True


def _latest(run_dir):
    """The latest checkpoint as rank 0 sees it (every rank takes the same branch)."""
    from .checkpoint import latest_checkpoint

    return dist.from_main(lambda: latest_checkpoint(run_dir))


# ------------------------------------------------------------------------------------ MaRio


def _active_rewards(cfg: MarioConfig, step: int) -> List[str]:
    if cfg.variant == "classic":
        return list(cfg.rewards)
    n = min(len(cfg.rewards), 1 + step // cfg.additive_every)
    return list(cfg.rewards[:n])


def _sample_round(cfg, r, model, tok, code_ids, train, idxs):
    """Sample for the training examples ``idxs`` (this rank's shard), parse and filter (answer
    marker); returns the new pool records and the number sampled."""
    from .data import parse_target
    from .evaluate import generate_targets

    texts = generate_targets(
        model, tok, [train[i] for i in idxs], code_ids, num_samples=cfg.samples_per_question,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        seed=dist.rank_seed(_derive_seed(cfg.seed, "sample", r)), batch_size=cfg.gen_batch_size,
        backend=cfg.backend, desc=f"round {r}: sample",
    ) if idxs else []  # fmt: skip
    recs = []
    for i, outs in zip(idxs, texts):
        for t in outs:
            rationale, answer = parse_target(t)
            if answer is None:
                continue
            recs.append({"example": i, "round": r, "source": "sample", "rationale": rationale,
                         "answer": answer})  # fmt: skip
    n_sampled = sum(len(o) for o in texts)
    return recs, n_sampled


def _score(recs, train, rewards, ctx):
    from .rewards import compute_rewards

    if not recs:
        return
    exs = [train[r["example"]] for r in recs]
    scores = compute_rewards(rewards, exs, [r["rationale"] for r in recs],
                             [r["answer"] for r in recs], **ctx)  # fmt: skip
    for j, r in enumerate(recs):
        r["rewards"] = {n: scores[n][j] for n in rewards}


def _silver_records(train, idxs):
    recs = []
    for i in idxs:
        e = train[i]
        if not e.rationale:
            continue
        recs.append({"example": i, "round": 0, "source": "silver", "rationale": e.rationale,
                     "answer": e.meta.get("silver_answer", e.answer)})  # fmt: skip
    return recs


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def run_mario(
    cfg: MarioConfig,
    run_dir,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after_step: Optional[int] = None,
    stop_after_sft_step: Optional[int] = None,
) -> Dict[str, Any]:
    """Run (or resume) a full MaRio run in ``run_dir``; returns ``{"sft": metrics, "mario":
    metrics, "status", "elapsed_s", "run_dir"}``. ``stop_after_step`` /
    ``stop_after_sft_step`` checkpoint and stop early (``status="stopped"``; for tests and
    interrupted runs)."""
    from .checkpoint import load_checkpoint, save_checkpoint
    from .data import format_target
    from .evaluate import evaluate, leading_special_count, prompt_ids

    t_start = time.time()
    _quiet_transformers()
    device = setup_torch(cfg)  # joins the process group under torchrun
    run_dir = prepare_run(run_dir, cfg, resume, overwrite)
    train = load_split(cfg, "train")
    test = load_split(cfg, cfg.eval_split)
    if not train:
        raise ValueError("no training examples (with rationales)")
    log = runs.MetricsLogger(run_dir / runs.METRICS_FILE, write=dist.is_main())
    prior = _read_json(run_dir / "elapsed.json") or {}
    elapsed_before = float(prior.get("elapsed_s", 0.0)) if resume else 0.0

    def elapsed():
        return elapsed_before + time.time() - t_start

    try:
        # ---- SFT
        has_mario_ckpt = _latest(run_dir) is not None
        has_sft = dist.from_main(lambda: (run_dir / SFT_DIR / "config.json").is_file())
        if not has_sft and not has_mario_ckpt:
            if not resume:
                log.log(phase="start", n_train=len(train), n_test=len(test))
            ok = _sft_phase(cfg, run_dir, log, device, train, test,
                            stop_after_sft_step=stop_after_sft_step)  # fmt: skip
            if not ok:
                _write_json(run_dir / "elapsed.json", {"elapsed_s": elapsed()})
                return {"status": "stopped", "run_dir": str(run_dir), "elapsed_s": elapsed()}
        ref, base_tok = load_reference(run_dir, cfg)
        rewards = build_rewards(cfg)
        ctx = reward_context(cfg, ref, base_tok)
        sft_eval = _read_json(run_dir / SFT_EVAL_FILE)
        if sft_eval is None:
            m, preds = evaluate(ref, base_tok, test, rewards, max_new_tokens=cfg.max_new_tokens,
                                batch_size=cfg.eval_batch_size, backend=cfg.backend,
                                reward_ctx=ctx, desc="eval SFT")  # fmt: skip
            sft_eval = {"metrics": m, "predictions": preds[:50]}
            _write_json(run_dir / SFT_EVAL_FILE, sft_eval)
            log.log(phase="eval", model="sft", round=None, **m)
        print("SFT:", _fmt_metrics(sft_eval["metrics"], cfg.rewards))

        # ---- MaRio setup
        policy, tok, kl_vocab = _fresh_policy(run_dir, cfg)
        dist.check_batch(cfg.batch_size, "batch_size")
        par = dist.Parallel(policy, cfg.parallel)
        opt = torch.optim.AdamW(par.parameters(), lr=cfg.lr, weight_decay=0.0)
        pool = Pool.load(run_dir / POOL_FILE)
        step, rnd, rstep = 0, 0, 0
        ck = _latest(run_dir)
        if ck is not None:
            info = load_checkpoint(ck, par, opt)
            ex = info["extra"]
            step, rnd, rstep = int(ex["step"]), int(ex["round"]), int(ex["round_step"])
            pool.truncate(int(ex["pool_size"]))
            log.truncate(int(ex["metrics_lines"]))
            if rstep >= cfg.steps_per_round:
                rnd, rstep = rnd + 1, 0
            print(f"resumed MaRio at round {rnd}, step {step} (pool {len(pool)})")
        elif resume:
            # SFT finished, MaRio never checkpointed: start MaRio from scratch
            pool = Pool()
            log.truncate(_sft_end_lines(run_dir))
        pad = tok.pad_token_id
        lead = leading_special_count(tok)
        q_ids = [prompt_ids(base_tok, e) for e in train]
        tgt_cache: Dict[int, List[int]] = {}

        def target_of(i):
            if i not in tgt_cache:
                rec = pool.records[i]
                tgt_cache[i] = _target_ids(tok, format_target(rec["rationale"], rec["answer"]))
            return tgt_cache[i]

        best_all = best_code_ids(tok, cfg.rewards, cfg.k)
        final_metrics = None
        for r in range(rnd, cfg.rounds):
            # ---- sample + score + grow the pool (skipped when resuming inside round r)
            sampled_this_round = any(rec["round"] == r for rec in pool.records)
            if not sampled_this_round:
                t0 = time.time()
                mine = list(dist.shard(len(train)))  # this rank's questions
                if r == 0:
                    recs, n_s = _sample_round(cfg, r, ref, base_tok, [], train, mine)
                    silver = _silver_records(train, mine) if cfg.add_silver else []
                else:
                    code = best_code_ids(tok, _active_rewards(cfg, step), cfg.k)
                    with par.gathered() as m:
                        recs, n_s = _sample_round(cfg, r, m, tok, code, train, mine)
                    silver = []
                _score(silver + recs, train, rewards, ctx)
                # the whole round, in question order, on every rank
                silver, recs = dist.gather(silver), dist.gather(recs)
                n_s = int(dist.all_sum([n_s])[0])
                pool.add(silver + recs)
                if dist.is_main():
                    pool.save(run_dir / POOL_FILE)
                rec_log = {"phase": "round", "round": r, "step": step, "sampled": n_s,
                           "kept": len(recs), "silver": len(silver), "pool_size": len(pool),
                           "seconds": round(time.time() - t0, 2)}  # fmt: skip
                for n in cfg.rewards:
                    rec_log[f"new_{n}"] = _mean(x["rewards"][n] for x in recs)
                    rec_log[f"pool_{n}"] = _mean(pool.values(n))
                log.log(rec_log)
                print(
                    f"round {r}: kept {len(recs)}/{n_s} samples, pool {len(pool)}; new: "
                    + ", ".join(f"{n}={rec_log[f'new_{n}'] or 0:.3f}" for n in cfg.rewards)
                )
            if not pool.records:
                raise RuntimeError(f"round {r}: the pool is empty (no sample had an answer)")
            bins = pool.quantize(cfg.rewards, cfg.k, cfg.ties)
            ctrl = {n: [int(tok.convert_tokens_to_ids(t)) for t in _tokens_of(n, cfg.k)]
                    for n in cfg.rewards}  # fmt: skip
            order = _epoch_order(cfg.seed, f"round{r}", len(pool),
                                 cfg.steps_per_round * cfg.batch_size)  # fmt: skip

            # ---- train
            bar = progress(total=cfg.steps_per_round, initial=rstep, desc=f"round {r}: train")
            t_train, n_tok, first = time.time(), 0, rstep
            try:
                for s in range(rstep, cfg.steps_per_round):
                    active = _active_rewards(cfg, step)
                    idx = dist.part(order[s * cfg.batch_size : (s + 1) * cfg.batch_size])
                    prow, rrow = [], []
                    for i in idx:
                        e = pool.records[i]["example"]
                        code = [ctrl[n][bins[n][i]] for n in active]
                        q = q_ids[e]
                        prow.append((q[:lead] + code + q[lead:], target_of(i)))
                        rrow.append((q, target_of(i)))
                    st = train_step(policy, opt, prow, pad_id=pad, ref=ref, ref_rows=rrow,
                                    kl_coef=cfg.beta, kl_vocab=kl_vocab, entropy_coef=cfg.alpha,
                                    grad_clip=cfg.grad_clip, backend=cfg.backend,
                                    parallel=par)  # fmt: skip
                    step += 1
                    n_tok += st["num_tokens"]
                    log.log(phase="mario", step=step, round=r, active=len(active), **st)
                    bar.update(1)
                    bar.set_postfix(loss=f"{st['loss']:.3f}", kl=f"{st.get('kl', 0):.3f}")
                    stop = stop_after_step is not None and step >= stop_after_step
                    last = s + 1 == cfg.steps_per_round
                    if not last and ((cfg.save_every and step % cfg.save_every == 0) or stop):
                        _save(save_checkpoint, run_dir, step, par, opt, cfg, r, s + 1, pool,
                              log)  # fmt: skip
                    if stop and not last:
                        _write_json(run_dir / "elapsed.json", {"elapsed_s": elapsed()})
                        return {"status": "stopped", "run_dir": str(run_dir),
                                "elapsed_s": elapsed()}  # fmt: skip
            finally:
                bar.close()
            if cfg.steps_per_round > first:  # training throughput (target tokens, all ranks)
                sec = time.time() - t_train
                log.log(phase="train_round", round=r, steps=cfg.steps_per_round - first,
                        tokens=n_tok, seconds=round(sec, 3), world=dist.world(),
                        tokens_per_s=round(n_tok / max(sec, 1e-9), 1))  # fmt: skip
            rstep = 0
            if cfg.eval_each_round or r == cfg.rounds - 1:
                with par.gathered() as pm:
                    m, preds = evaluate(pm, tok, test, rewards, code_ids=best_all,
                                        max_new_tokens=cfg.max_new_tokens,
                                        batch_size=cfg.eval_batch_size, backend=cfg.backend,
                                        reward_ctx=ctx, desc=f"round {r}: eval")  # fmt: skip
                log.log(phase="eval", model="mario", round=r, step=step, **m)
                print(f"round {r} MaRio:", _fmt_metrics(m, cfg.rewards))
                if r == cfg.rounds - 1:
                    final_metrics = {"metrics": m, "predictions": preds[:50]}
            _save(save_checkpoint, run_dir, step, par, opt, cfg, r, cfg.steps_per_round, pool,
                  log)  # fmt: skip
            if stop_after_step is not None and step >= stop_after_step and r + 1 < cfg.rounds:
                _write_json(run_dir / "elapsed.json", {"elapsed_s": elapsed()})
                return {"status": "stopped", "run_dir": str(run_dir), "elapsed_s": elapsed()}

        # ---- final evaluation (when resumed after the last round; none with zero rounds)
        if final_metrics is None and cfg.rounds > 0:
            prev = _read_json(run_dir / RESULT_FILE)
            if prev and prev.get("mario") and cfg.rounds > 0:
                final_metrics = {"metrics": prev["mario"]}
            else:
                with par.gathered() as pm:
                    m, preds = evaluate(pm, tok, test, rewards, code_ids=best_all,
                                        max_new_tokens=cfg.max_new_tokens,
                                        batch_size=cfg.eval_batch_size, backend=cfg.backend,
                                        reward_ctx=ctx, desc="eval MaRio")  # fmt: skip
                log.log(phase="eval", model="mario", round=cfg.rounds - 1, step=step, **m)
                final_metrics = {"metrics": m, "predictions": preds[:50]}
        total_s = elapsed()
        _write_json(run_dir / "elapsed.json", {"elapsed_s": total_s})
        result = {"status": "done", "run_dir": str(run_dir), "elapsed_s": round(total_s, 1),
                  "sft": sft_eval["metrics"],
                  "mario": final_metrics["metrics"] if final_metrics else None,
                  "pool_size": len(pool), "steps": step}  # fmt: skip
        _write_json(run_dir / RESULT_FILE, result)
        if dist.is_main():
            _write_summary(run_dir, cfg, result, runs.read_metrics(run_dir))
        log.log(phase="done", elapsed_s=round(total_s, 1))
        print(f"done in {total_s:.0f} s; summary: {run_dir / runs.SUMMARY_FILE}")
        return result
    finally:
        log.close()


def _quiet_transformers() -> None:
    try:  # transformers' own bars (loading / writing shards) drown ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def _tokens_of(name: str, k: int) -> List[str]:
    from .quantize import control_tokens

    return control_tokens([name], k)


def _sft_end_lines(run_dir: Path) -> int:
    rows = runs.read_metrics(run_dir)
    n = 0
    for i, r in enumerate(rows):
        if r.get("phase") in ("start", "sft") or (r.get("phase") == "eval" and
                                                  r.get("model") == "sft"):  # fmt: skip
            n = i + 1
    return n


def _save(save_checkpoint, run_dir, step, policy, opt, cfg, r, rstep, pool, log):
    save_checkpoint(run_dir, step, policy, opt,
                    extra={"phase": "mario", "step": step, "round": r, "round_step": rstep,
                           "pool_size": len(pool), "metrics_lines": len(log)},
                    keep_last=cfg.keep_last)  # fmt: skip


def _read_json(path: Path):
    """A JSON file of the run folder as rank 0 reads it (``None`` when absent); every rank
    calls it at the same point and gets the same value."""

    def read():
        p = Path(path)
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None

    return dist.from_main(read)


def _write_json(path: Path, obj) -> None:
    """Rank 0 writes the run folder; the others wait, so a later read sees the file."""
    from .evaluate import _finite

    def write():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        runs.write_text_atomic(path, json.dumps(_finite(obj), indent=1) + "\n")

    dist.main_only(write)


def prepare_run(run_dir, cfg, resume: bool, overwrite: bool) -> Path:
    """Rank 0 creates (or checks, for ``resume``) the run folder and writes the config; the
    other ranks wait for it."""
    if dist.is_main():
        run_dir = runs.prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
        if not resume:
            runs.save_config(run_dir, cfg)
    dist.barrier()
    return Path(run_dir)


def _fmt_metrics(m: Dict[str, Any], names: Sequence[str]) -> str:
    keys = ["accuracy", *names]
    return ", ".join(f"{k}={m[k]:.4f}" for k in keys if isinstance(m.get(k), (int, float)))


def _write_summary(run_dir: Path, cfg: MarioConfig, result: Dict[str, Any], metrics) -> None:
    from .evaluate import summary_row

    rows = [summary_row("SFT (reference, no codes)", result["sft"], cfg.rewards)]
    if result.get("mario"):
        rows.append(summary_row("MaRio (best codes)", result["mario"], cfg.rewards))
        delta = {"model": "Δ (MaRio − SFT)"}
        for key in ["accuracy", "answered", *cfg.rewards]:
            a, b = result["mario"].get(key), result["sft"].get(key)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                delta[key] = a - b
        rows.append(delta)
    sections = [(f"Test split ({cfg.eval_split}): SFT vs MaRio", runs.markdown_table(rows))]
    per_round = [summary_row(f"round {r['round']}", r, cfg.rewards) for r in metrics
                 if r.get("phase") == "eval" and r.get("model") == "mario"]  # fmt: skip
    if per_round:
        sections.append(("MaRio after each round", runs.markdown_table(per_round)))
    pool_rows = [{k: r.get(k) for k in ("round", "sampled", "kept", "silver", "pool_size")}
                 | {n: r.get(f"new_{n}") for n in cfg.rewards}
                 for r in metrics if r.get("phase") == "round"]  # fmt: skip
    if pool_rows:
        sections.append(("Pool (mean reward of each round's new samples)",
                         runs.markdown_table(pool_rows)))  # fmt: skip
    keys = ["dataset", "model", "rewards", "variant", "k", "beta", "alpha", "rounds",
            "steps_per_round", "batch_size", "lr", "samples_per_question", "top_p",
            "temperature", "sft_epochs", "seed"]  # fmt: skip
    cfg_d = dataclasses.asdict(cfg)
    lines = [f"- `{k}`: {cfg_d[k]!r}" for k in keys]
    lines.append(f"- wall time: {result['elapsed_s']:.0f} s; MaRio steps: {result['steps']}; "
                 f"pool: {result['pool_size']} samples")  # fmt: skip
    mode = f" ({cfg.parallel})" if dist.world() > 1 else ""
    lines.append(f"- processes: {dist.world()}{mode}")
    sections.append(("Run", "\n".join(lines)))
    runs.write_summary(run_dir, "MaRio run", sections)


# ------------------------------------------------------------------------------------ CLI


def _common_arguments(parser: argparse.ArgumentParser, command: str, cls=None) -> None:
    """The run folder options and one flag per field of ``cls`` (default: MarioConfig)."""
    parser.add_argument(
        "--run-dir", default=None, help=f"run folder (default: runs/{command}-<time>)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its latest checkpoint",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="empty a non-empty --run-dir and start over"
    )
    parser.add_argument("--stop-after-step", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stop-after-sft-step", type=int, default=None, help=argparse.SUPPRESS)
    runs.add_dataclass_arguments(parser, cls or MarioConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``rationale-train mario``: one per :class:`MarioConfig` field, plus the run
    folder options."""
    _common_arguments(parser, "mario")


def add_sft_arguments(parser: argparse.ArgumentParser) -> None:
    """``rationale-train sft``: the same options; runs the SFT warm start and its evaluation
    only (``--rounds 0``)."""
    _common_arguments(parser, "sft")


def config_from_args(args: argparse.Namespace) -> MarioConfig:
    file_values = getattr(args, "config_values", None)
    if args.resume and args.run_dir:
        base = MarioConfig.load(args.run_dir)
        explicit = {f.name for f in dataclasses.fields(MarioConfig) if hasattr(args, f.name)}
        if explicit or file_values:
            print(f"--resume: overriding {sorted(explicit | set(file_values or {}))} of the saved "
                  "config")  # fmt: skip
        return runs.build_config(MarioConfig, args, file_values, base=base)
    return runs.build_config(MarioConfig, args, file_values)


def _resolve_run_dir(args, command: str) -> Path:
    """The run folder: ``--run-dir``, else (decided by rank 0 under torchrun) the newest
    ``runs/<command>-*`` for ``--resume`` or a new timestamped one."""
    if args.run_dir:
        return Path(args.run_dir)
    return dist.from_main(lambda: _default_run_dir(args, command))


def _default_run_dir(args, command: str) -> Path:
    if args.resume:
        found = sorted(Path("runs").glob(f"{command}-*"))
        if not found:
            raise SystemExit("--resume needs --run-dir (no runs/ folder found)")
        print(f"--resume: continuing {found[-1]}")
        return found[-1]
    return runs.default_run_dir(command)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """``rationale-train mario``."""
    run_dir = _resolve_run_dir(args, "mario")
    args.run_dir = str(run_dir)
    cfg = config_from_args(args)
    if args.resume and dist.is_main():
        runs.save_config(run_dir, cfg)
    return run_mario(cfg, run_dir, resume=args.resume, overwrite=args.overwrite,
                     stop_after_step=args.stop_after_step,
                     stop_after_sft_step=args.stop_after_sft_step)  # fmt: skip


def run_sft(args: argparse.Namespace) -> Dict[str, Any]:
    """``rationale-train sft``: SFT + evaluation of the SFT model (no MaRio rounds)."""
    run_dir = _resolve_run_dir(args, "sft")
    args.run_dir = str(run_dir)
    cfg = config_from_args(args)
    cfg.rounds = 0
    if args.resume and dist.is_main():
        runs.save_config(run_dir, cfg)
    return run_mario(cfg, run_dir, resume=args.resume, overwrite=args.overwrite,
                     stop_after_sft_step=args.stop_after_sft_step)  # fmt: skip

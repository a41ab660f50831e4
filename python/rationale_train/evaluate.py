"""Evaluation: greedy decoding (optionally with forced control codes), accuracy and the mean of
every reward, and the ``rationale-train eval`` command.

Prompts are built exactly as in training (:func:`prompt_ids`): the tokenizer's encoding of
``format_input(example)`` with the control-code ids inserted after the tokens the tokenizer adds in
front (BOS), so the question tokens are identical with and without codes. The model continues with
``" <rationale> So the answer is <answer>."`` and EOS; :func:`~rationale_train.data.parse_target`
splits the output.

``rationale-train eval --run-dir RUN`` evaluates a MaRio run: by default the latest checkpoint of
the policy with the best code of every reward forced, and the SFT reference (no codes) beside it;
``--checkpoint PATH`` picks another checkpoint, ``--which`` one of them only.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    "add_arguments",
    "evaluate",
    "generate_targets",
    "leading_special_count",
    "prompt_ids",
    "run",
    "summary_row",
]


def leading_special_count(tokenizer) -> int:
    """How many ids the tokenizer adds in front of a text (1 for a BOS-adding tokenizer); only
    specials added at the front count, so a trailing EOS does not shift the code."""
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    body = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = 0
    while n < len(full) and full[n : n + len(body)] != body:
        n += 1
    return n


def prompt_ids(
    tokenizer, example, code_ids: Sequence[int] = (), lead: Optional[int] = None
) -> List[int]:
    """Token ids of the model input for ``example``: the encoding of ``format_input(example)``
    (special tokens included) with ``code_ids`` inserted after the leading special tokens
    (``lead``: their number, :func:`leading_special_count`, computed when not given)."""
    from .data import format_input

    ids = list(tokenizer(format_input(example), add_special_tokens=True)["input_ids"])
    if code_ids:
        n = leading_special_count(tokenizer) if lead is None else lead
        ids = ids[:n] + [int(i) for i in code_ids] + ids[n:]
    return ids


def generate_targets(
    model,
    tokenizer,
    examples: Sequence[Any],
    code_ids: Sequence[int] = (),
    *,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    backend: str = "auto",
    desc: Optional[str] = None,
    show_progress: Optional[bool] = None,
) -> List[List[str]]:
    """``[len(examples)][num_samples]`` generated continuations (texts without EOS) for the
    prompts :func:`prompt_ids` builds. ``temperature=0`` decodes greedily. Chunks of
    ``batch_size`` prompts are drawn with seeds ``seed + chunk`` (reproducible)."""
    from .generate import generate_candidates
    from .runs import progress

    lead = leading_special_count(tokenizer)
    prompts = [prompt_ids(tokenizer, ex, code_ids, lead) for ex in examples]
    out: List[List[str]] = []
    bar = progress(total=len(prompts), desc=desc, disable=None if show_progress is None
                   else not show_progress)  # fmt: skip
    try:
        for c, s in enumerate(range(0, len(prompts), batch_size)):
            chunk = prompts[s : s + batch_size]
            cands = generate_candidates(
                model, tokenizer, chunk, num_samples, max_new_tokens,
                temperature=temperature, top_p=top_p, seed=seed + c, backend=backend,
                eos_token_id=tokenizer.eos_token_id, return_logprobs=False,
            )  # fmt: skip
            out.extend(cands.texts_by_prompt())
            bar.update(len(chunk))
    finally:
        bar.close()
    return out


def evaluate(
    model,
    tokenizer,
    examples: Sequence[Any],
    rewards: Mapping[str, Any],
    *,
    code_ids: Sequence[int] = (),
    max_new_tokens: int = 64,
    batch_size: int = 64,
    backend: str = "auto",
    reward_ctx: Optional[Mapping[str, Any]] = None,
    desc: Optional[str] = None,
) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Greedy-decode every example (``code_ids`` forced in front of the question) and score it.

    Returns ``(metrics, predictions)``: ``metrics`` = ``{"n", "accuracy", "answered",
    "<reward>": mean, ...}`` (``accuracy``: the fraction whose parsed answer matches the gold one,
    ``answered``: the fraction with an answer marker); ``predictions``: one dict per example
    (``id``, ``output``, ``rationale``, ``answer``, ``correct``, reward values)."""
    from . import dist

    if not examples:
        return {"n": 0, "accuracy": float("nan"), "answered": float("nan")}, []

    def predict(exs):
        return _predict(model, tokenizer, exs, rewards, code_ids=code_ids,
                        max_new_tokens=max_new_tokens, batch_size=batch_size, backend=backend,
                        reward_ctx=reward_ctx, desc=desc)  # fmt: skip

    # under torchrun each rank decodes and scores its shard; the metrics are over all of them
    preds = dist.map_shards(predict, list(examples))
    n = len(preds)
    metrics: Dict[str, Any] = {
        "n": n,
        "accuracy": sum(p["correct"] for p in preds) / n,
        "answered": sum(p["answer"] is not None for p in preds) / n,
    }
    for name in rewards:
        metrics[name] = sum(p[name] for p in preds) / n
    return metrics, preds


def _predict(model, tokenizer, examples, rewards, *, code_ids, max_new_tokens, batch_size,
             backend, reward_ctx, desc) -> List[Dict[str, Any]]:  # fmt: skip
    from .data import answer_matches, parse_target
    from .rewards import compute_rewards

    texts = [
        t[0]
        for t in generate_targets(
            model,
            tokenizer,
            examples,
            code_ids,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            batch_size=batch_size,
            backend=backend,
            desc=desc,
        )  # fmt: skip
    ]
    parsed = [parse_target(t) for t in texts]
    rationales = [p[0] for p in parsed]
    answers = [p[1] for p in parsed]
    correct = [
        float(a is not None and answer_matches(a, ex.answer, ex.choices or None))
        for a, ex in zip(answers, examples)
    ]
    scores = compute_rewards(dict(rewards), list(examples), rationales, answers,
                             **dict(reward_ctx or {}))  # fmt: skip
    preds = []
    for i, ex in enumerate(examples):
        row = {"id": ex.id, "output": texts[i], "rationale": rationales[i], "answer": answers[i],
               "gold": ex.answer, "correct": bool(correct[i])}  # fmt: skip
        row.update({name: vals[i] for name, vals in scores.items()})
        preds.append(row)
    return preds


def summary_row(label: str, metrics: Mapping[str, Any], reward_names: Sequence[str]) -> dict:
    """One row of the SFT-vs-method table: model, n, accuracy, answered, each reward's mean."""
    row = {"model": label, "n": metrics.get("n"), "accuracy": metrics.get("accuracy"),
           "answered": metrics.get("answered")}  # fmt: skip
    for name in reward_names:
        row[name] = metrics.get(name)
    return row


# ---------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="a `rationale-train mario` run folder")
    parser.add_argument(
        "--checkpoint", default=None,
        help="a checkpoint folder (checkpoints/step_XXXXXXXX); default: the run's latest",
    )  # fmt: skip
    parser.add_argument(
        "--which",
        choices=["both", "sft", "mario"],
        default="both",
        help="evaluate the SFT reference, the MaRio policy, or both (default)",
    )
    parser.add_argument("--split", default="test", help="data split to evaluate (default test)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N examples")
    parser.add_argument(
        "--no-code", action="store_true", help="evaluate the MaRio policy without control codes"
    )
    parser.add_argument("--device", default=None, help="override the run's device")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per decode batch")
    parser.add_argument(
        "--output",
        default=None,
        help="write metrics + predictions as JSON here (default: RUN/eval-*.json)",
    )


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from . import mario
    from .runs import markdown_table, write_text_atomic

    run_dir = Path(args.run_dir)
    cfg = mario.MarioConfig.load(run_dir)
    if args.device:
        cfg.device = args.device
    mario.setup_torch(cfg)
    examples = mario.load_split(cfg, args.split)
    if args.limit is not None:
        examples = examples[: args.limit]
    bs = args.batch_size or cfg.eval_batch_size
    ref, base_tok = mario.load_reference(run_dir, cfg)
    rewards = mario.build_rewards(cfg)
    ctx = mario.reward_context(cfg, ref, base_tok)
    results: Dict[str, Any] = {"split": args.split, "run_dir": str(run_dir)}
    rows = []
    if args.which in ("both", "sft"):
        m, preds = evaluate(ref, base_tok, examples, rewards, max_new_tokens=cfg.max_new_tokens,
                            batch_size=bs, backend=cfg.backend, reward_ctx=ctx,
                            desc="eval sft")  # fmt: skip
        results["sft"] = {"metrics": m, "predictions": preds}
        rows.append(summary_row("SFT (reference, no codes)", m, cfg.rewards))
    if args.which in ("both", "mario"):
        policy, tok, ckpt = mario.load_policy(run_dir, cfg, args.checkpoint)
        code = [] if args.no_code else mario.best_code_ids(tok, cfg.rewards, cfg.k)
        m, preds = evaluate(policy, tok, examples, rewards, code_ids=code,
                            max_new_tokens=cfg.max_new_tokens, batch_size=bs, backend=cfg.backend,
                            reward_ctx=ctx, desc="eval mario")  # fmt: skip
        results["mario"] = {"metrics": m, "predictions": preds, "checkpoint": str(ckpt)}
        label = "MaRio (no codes)" if args.no_code else "MaRio (best codes)"
        rows.append(summary_row(f"{label} @ {Path(str(ckpt)).name}", m, cfg.rewards))
    table = markdown_table(rows)
    print(table)
    out = Path(args.output) if args.output else run_dir / f"eval-{args.split}.json"
    write_text_atomic(out, json.dumps(_finite(results), indent=1) + "\n")
    print(f"wrote {out}")
    results["table"] = table
    return results


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj

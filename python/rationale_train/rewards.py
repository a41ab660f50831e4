"""Rewards for MaRio-style multi-reward rationale distillation, and a registry users extend.

A reward scores a batch of generated rationales. Every reward has the same call signature::

    reward(examples, rationales, answers, **ctx) -> list[float]

- ``examples``: one example per rationale (``rationale_train.data.Example`` or anything with
  ``question``, ``choices`` and ``answer`` attributes, or a dict with those keys). When N candidates
  are scored for one question, its example appears N times.
- ``rationales``: the generated rationale texts (the part before ``ANSWER_MARKER``).
- ``answers``: the predicted answers (the text after ``ANSWER_MARKER``, as
  ``rationale_train.data.parse_target`` returns it), ``None`` where the output had no answer.
- ``ctx``: keyword context the trainer passes to every reward; a reward takes what it needs and
  ignores the rest. Keys the trainers pass (all optional):
  ``model`` (the policy), ``tokenizer`` (its tokenizer), ``ref_model`` (the frozen SFT reference,
  which shares ``tokenizer``), ``scorer_model`` / ``scorer_tokenizer`` (a dedicated scorer LM),
  ``batch_size`` (rows per forward pass for model-based rewards).
- Returns one float per rationale, higher = better.

Batch-level on purpose: model-based rewards (consistency, a plausibility classifier) batch their
forward passes. A plain per-sample function is a one-line list comprehension.

Built-ins (``available_rewards()``; name, control-token code, bins, value):

- ``correctness`` (``correct``, 2 bins): 1.0 if the predicted answer matches the gold one after
  ``normalize_answer`` (or names the same choice), else 0.0.
- ``diversity`` (``div``, K bins): Π_{n=2..4} (1 − rep_n) of the whitespace-split rationale.
- ``consistency`` (``consist``, K bins): P(gold | q, rationale) − P(gold | q) under a scorer LM.
- ``plausibility`` (``plaus``, K bins): a local classifier's P(plausible), any callable, or the
  synthetic task's step verifier.

Register your own::

    @register_reward("length", code="len")
    def length(examples, rationales, answers, **ctx):
        return [-len(r.split()) / 100 for r in rationales]

    reward = get_reward("length")

Classes register the same way; ``get_reward(name, **kwargs)`` instantiates them with ``kwargs``
(for a function, ``kwargs`` are bound as default context with ``functools.partial``).
``binary=True`` marks a reward whose values are 1.0 / 0.0 (MaRio's correct / wrong token): it is
quantised into two bins by value, not into K equal-count bins (see ``rationale_train.quantize``).
``code`` names its control tokens (``<|{code}_{bin}|>``).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "Reward",
    "RewardSpec",
    "register_reward",
    "get_reward",
    "reward_spec",
    "available_rewards",
    "compute_rewards",
    "correctness",
    "diversity",
    "diversity_score",
    "Consistency",
    "Plausibility",
    "choice_logprobs",
    "answer_prompt",
    "answer_options",
]

RewardFn = Callable[..., List[float]]


class Reward:
    """Optional base class for rewards with state (a scorer model, a cache). Subclasses implement
    ``__call__(examples, rationales, answers, **ctx) -> list[float]``."""

    def __call__(
        self,
        examples: Sequence[Any],
        rationales: Sequence[str],
        answers: Sequence[Optional[str]],
        **ctx: Any,
    ) -> List[float]:  # pragma: no cover - interface
        raise NotImplementedError


# ------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward: ``factory`` (a function, a ``Reward`` subclass or instance), whether it
    is ``binary`` (two bins: 1.0 = bin 0, 0.0 = bin 1) and the ``code`` its control tokens use."""

    name: str
    factory: Any
    binary: bool = False
    code: str = ""


_REGISTRY: Dict[str, RewardSpec] = {}
_CODE_RE = re.compile(r"^[A-Za-z0-9_]+$")


def register_reward(
    name: str,
    reward: Any = None,
    *,
    binary: bool = False,
    code: Optional[str] = None,
    overwrite: bool = False,
):
    """Register a reward under ``name``: ``@register_reward("name")`` on a function or a class, or
    ``register_reward("name", obj)``. ``code`` (default: ``name``) is the stem of its control tokens
    and must be letters, digits or ``_``; ``binary`` marks a 1.0 / 0.0 reward (two bins).
    Registering a taken name (or code) is an error unless ``overwrite=True``."""
    if not isinstance(name, str) or not name:
        raise ValueError("reward name must be a non-empty string")
    code = name if code is None else code
    if not _CODE_RE.match(code):
        raise ValueError(f"reward code {code!r} must match [A-Za-z0-9_]+ (it names control tokens)")

    def deco(obj):
        if not callable(obj):
            raise TypeError(f"reward {name!r} must be callable (a function, class or instance)")
        if not overwrite:
            if name in _REGISTRY:
                raise ValueError(f"reward {name!r} is already registered (pass overwrite=True)")
            taken = [s.name for s in _REGISTRY.values() if s.code == code]
            if taken:
                raise ValueError(f"control-token code {code!r} is already used by {taken[0]!r}")
        _REGISTRY[name] = RewardSpec(name=name, factory=obj, binary=bool(binary), code=code)
        return obj

    return deco if reward is None else deco(reward)


def reward_spec(name: str) -> RewardSpec:
    """The registration of ``name``; unknown names raise ``ValueError`` listing the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown reward {name!r}; available: {', '.join(available_rewards())} "
            "(add one with @register_reward)"
        ) from None


def get_reward(name: str, **kwargs: Any) -> RewardFn:
    """A callable reward for ``name``: a registered class is instantiated with ``kwargs``; a
    function (or instance) is returned as is, or with ``kwargs`` bound as default context."""
    factory = reward_spec(name).factory
    if isinstance(factory, type):
        return factory(**kwargs)
    return functools.partial(factory, **kwargs) if kwargs else factory


def available_rewards() -> List[str]:
    """Registered reward names, sorted."""
    return sorted(_REGISTRY)


def compute_rewards(
    rewards: Union[Mapping[str, RewardFn], Sequence[str]],
    examples: Sequence[Any],
    rationales: Sequence[str],
    answers: Sequence[Optional[str]],
    **ctx: Any,
) -> Dict[str, List[float]]:
    """Score one batch with several rewards: ``rewards`` maps names to callables (or is a list of
    registered names). Checks that every reward returns one finite float per rationale."""
    n = len(rationales)
    if len(examples) != n or len(answers) != n:
        raise ValueError(
            f"examples ({len(examples)}), rationales ({n}) and answers ({len(answers)}) must have "
            "one entry per rationale"
        )
    if not isinstance(rewards, Mapping):
        rewards = {name: get_reward(name) for name in rewards}
    out: Dict[str, List[float]] = {}
    for name, fn in rewards.items():
        values = [float(v) for v in fn(examples, rationales, answers, **ctx)]
        if len(values) != n:
            raise ValueError(f"reward {name!r} returned {len(values)} values for {n} rationales")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"reward {name!r} returned non-finite values at rows {bad[:8]}")
        out[name] = values
    return out


# ------------------------------------------------------------------------------------- helpers


def _field(example: Any, name: str, default: Any = None) -> Any:
    if isinstance(example, Mapping):
        return example.get(name, default)
    return getattr(example, name, default)


def _check_batch(examples, rationales, answers) -> int:
    n = len(rationales)
    if len(examples) != n or len(answers) != n:
        raise ValueError(
            f"examples ({len(examples)}), rationales ({n}) and answers ({len(answers)}) must have "
            "one entry per rationale"
        )
    return n


def _normalize(text: str) -> str:
    from .data import normalize_answer

    return normalize_answer(text)


# ----------------------------------------------------------------------------------- correctness


def correctness(examples, rationales, answers, **ctx) -> List[float]:
    """1.0 where the predicted answer matches the gold ``example.answer``, else 0.0 (also for a
    missing answer, ``None``). Match = equal after ``data.normalize_answer`` (case, whitespace,
    final punctuation, enclosing brackets, number formatting: ``"(B)" == "b"``, ``"Yes." ==
    "yes"``, ``"1,000" == "1000.0"``), or, for an example with choices, both naming the same choice
    by label or by text (``data.answer_matches``: ``"Earth"`` matches ``"(B)"`` when choice B is
    Earth)."""
    from .data import answer_matches

    _check_batch(examples, rationales, answers)
    out = []
    for ex, pred in zip(examples, answers):
        gold = _field(ex, "answer")
        ok = pred is not None and gold is not None
        ok = ok and answer_matches(str(pred), str(gold), _field(ex, "choices") or None)
        out.append(1.0 if ok else 0.0)
    return out


register_reward("correctness", correctness, binary=True, code="correct")


# ------------------------------------------------------------------------------------- diversity


def diversity_score(text: str, orders: Sequence[int] = (2, 3, 4)) -> float:
    """Π_n (1 − rep_n) over ``orders``, with rep_n = 1 − #unique n-grams / #n-grams of the
    whitespace-split text (case-sensitive, punctuation stays attached to words). A text with no
    n-gram of size n (fewer than n words) has rep_n = 0, so an empty or one-word text scores 1.0."""
    words = text.split()
    score = 1.0
    for n in orders:
        total = len(words) - n + 1
        if total <= 0:
            continue
        unique = len({tuple(words[i : i + n]) for i in range(total)})
        score *= unique / total  # = 1 - rep_n
    return score


def diversity(examples, rationales, answers, **ctx) -> List[float]:
    """``diversity_score`` of every rationale (MaRio's Π_{n=2..4}(1 − rep_n))."""
    _check_batch(examples, rationales, answers)
    return [diversity_score(r) for r in rationales]


register_reward("diversity", diversity, code="div")


# ------------------------------------------------------------------- answer log-likelihood scoring


def _encode(tokenizer, texts: List[str], add_special_tokens: bool) -> List[List[int]]:
    if not texts:
        return []
    return [list(e) for e in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def _context_continuation(tokenizer, prompts, choices_per_prompt):
    """``(prompt index, choice index, context ids, continuation ids)`` of every pair.

    The context is the prompt with the tokenizer's special tokens (e.g. BOS). Trailing whitespace
    of the prompt moves to the continuation, and the continuation ids are read off the encoding of
    the whole text, so ``"... is" + " yes"`` tokenises as the training text does
    (lm-evaluation-harness's rule; robust to BPE and SentencePiece word boundaries). Where the
    whole text's ids do not start with the context's (a merge across the boundary, or a tokenizer
    that appends EOS), the continuation is encoded alone. Texts are encoded in batches."""
    ctx_texts = [p.rstrip() for p in prompts]
    ctx_ids = _encode(tokenizer, ctx_texts, True)
    pairs = [(i, j) for i, cs in enumerate(choices_per_prompt) for j in range(len(cs))]
    conts = [prompts[i][len(ctx_texts[i]) :] + choices_per_prompt[i][j] for i, j in pairs]
    wholes = _encode(tokenizer, [ctx_texts[i] + c for (i, _), c in zip(pairs, conts)], True)
    out = []
    for (i, j), cont, whole in zip(pairs, conts, wholes):
        ctx = ctx_ids[i]
        if len(whole) > len(ctx) and whole[: len(ctx)] == ctx:
            cont_ids = whole[len(ctx) :]
        else:
            cont_ids = _encode(tokenizer, [cont], False)[0]
        out.append((i, j, ctx, cont_ids))
    return out


def choice_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    choices_per_prompt: Sequence[Sequence[str]],
    batch_size: int = 16,
    *,
    average: bool = True,
    backend: str = "auto",
) -> List[Tensor]:
    """Log-likelihood of each choice as the continuation of its prompt under a causal LM.

    Returns one float32 CPU tensor per prompt, ``[len(choices_per_prompt[i])]``: the mean
    (``average=True``, length-normalised) or sum of the continuation tokens' log-probs.

    - Tokenisation: the prompt gets the tokenizer's special tokens (e.g. BOS); trailing whitespace
      of the prompt is scored as part of the continuation; the continuation's ids are those the
      whole text ``prompt + choice`` gets after the prompt's (see ``_context_continuation``).
    - Every (prompt, choice) pair is one row; rows are sorted by length and run ``batch_size`` rows
      per forward pass, left-padded with position ids from the attention mask, under
      ``torch.inference_mode()`` with the model in eval mode (its mode is restored).
    - Only the logits of the last ``max continuation + 1`` positions are computed when the model's
      forward takes ``logits_to_keep``; the log-probs come from
      ``rk.sequence_logprobs(logits[:, :-1], labels[:, 1:], average=average)`` with labels -100 on
      the prompt and padding.
    """
    import rationale_kernels as rk

    from .generate import _forward_params, _model_device, _takes_position_ids

    if len(prompts) != len(choices_per_prompt):
        raise ValueError(
            f"prompts ({len(prompts)}) and choices_per_prompt ({len(choices_per_prompt)}) must "
            "have the same length"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, choices in enumerate(choices_per_prompt):
        if isinstance(choices, str):
            raise TypeError(f"choices_per_prompt[{i}] must be a list of strings, not a string")
    rows = []  # (prompt index, choice index, ids, number of continuation tokens)
    for i, j, ctx_ids, cont_ids in _context_continuation(tokenizer, prompts, choices_per_prompt):
        if not ctx_ids:
            raise ValueError(
                f"prompt {i} tokenises to nothing: the first answer token needs a context "
                "(use a tokenizer that adds BOS, or a non-empty prompt)"
            )
        if not cont_ids:
            choice = choices_per_prompt[i][j]
            raise ValueError(f"choice {j} of prompt {i} ({choice!r}) tokenises to nothing")
        rows.append((i, j, ctx_ids + cont_ids, len(cont_ids)))
    out = [torch.zeros(len(c), dtype=torch.float32) for c in choices_per_prompt]
    if not rows:
        return out

    device = _model_device(model)
    params = _forward_params(model)
    keep_name = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    pos_ok = _takes_position_ids(model, params)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    pad_id = 0 if pad_id is None else pad_id

    order = sorted(range(len(rows)), key=lambda r: len(rows[r][2]), reverse=True)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = [rows[r] for r in order[start : start + batch_size]]
                t = max(len(ids) for _, _, ids, _ in chunk)
                ids = torch.full((len(chunk), t), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), t), dtype=torch.long)
                labels = torch.full((len(chunk), t), -100, dtype=torch.long)
                for b, (_, _, row, n_cont) in enumerate(chunk):
                    ids[b, t - len(row) :] = torch.tensor(row)
                    mask[b, t - len(row) :] = 1
                    labels[b, t - n_cont :] = ids[b, t - n_cont :]
                keep = max(n for *_, n in chunk) + 1
                kwargs: Dict[str, Any] = {"attention_mask": mask.to(device)}
                if pos_ok:
                    kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0).to(device)
                if keep_name is not None and keep < t:
                    kwargs[keep_name] = keep
                logits = model(ids.to(device), **kwargs).logits
                labels = labels[:, t - logits.shape[1] :].to(logits.device)
                logps = rk.sequence_logprobs(
                    logits[:, :-1], labels[:, 1:], average=average, backend=backend
                )
                for (i, j, _, _), v in zip(chunk, logps.float().cpu()):
                    out[i][j] = v
    finally:
        model.train(was_training)
    return out


def answer_prompt(example: Any, rationale: Optional[str], sep: str = " ") -> str:
    """The text the answer follows when scoring ``P(answer | ...)``: the MaRio training text
    ``format_input(example) + sep + format_target(rationale, answer)`` cut before the answer, i.e.
    ``input + " " + rationale + " So the answer is "``; with ``rationale=None`` (or empty: the
    no-rationale baseline) ``input + " " + "So the answer is "``, as ``format_target`` writes a
    target without a rationale. Pass ``Consistency(prompt_fn=...)`` for another layout."""
    from .data import ANSWER_MARKER, format_input

    r = (rationale or "").strip()
    body = r + ANSWER_MARKER if r else ANSWER_MARKER.lstrip()
    return format_input(example) + sep + body


_LABEL_RE = re.compile(r"^\(?([A-Za-z])\)?\.?$")


def _tail(answer: str) -> str:
    # the answer as data.format_target ends a target: with one final "." (so that "5" is not
    # credited with the probability of "57")
    a = answer.strip()
    return a if a.endswith(".") else a + "."


def answer_options(example: Any) -> Tuple[List[str], Optional[int]]:
    """The answers the consistency scorer compares, written as a target ends (``format_target``:
    the answer and a final ``"."``), and the index of the gold one.

    - Choices and a label answer (``"(B)"``, ``"(b)"``): the labels of all choices in the gold's
      case, ``["(A).", "(B).", ...]``.
    - Choices and a text answer (the synthetic task's ``answer_style="value"``): the choice texts;
      the gold is the choice equal to it after ``normalize_answer``.
    - No choices, answer yes/no (StrategyQA): ``["yes.", "no."]`` in the gold's case.
    - No choices otherwise (free-form, e.g. GSM8K): ``([gold + "."], None)``.

    A gold answer that matches no choice raises ``ValueError``."""
    from .data import choice_label

    gold = _field(example, "answer")
    if gold is None or not str(gold).strip():
        raise ValueError(f"example {_field(example, 'id')!r} has no gold answer")
    gold = str(gold).strip()
    choices = list(_field(example, "choices") or [])
    if choices:
        m = _LABEL_RE.match(gold)
        k = ord(m.group(1).lower()) - ord("a") if m else -1
        if 0 <= k < len(choices):
            lower = m.group(1).islower()
            return [_tail(choice_label(i, lower)) for i in range(len(choices))], k
        norm = _normalize(gold)
        for k, c in enumerate(choices):
            if _normalize(c) == norm:
                return [_tail(c) for c in choices], k
        raise ValueError(
            f"gold answer {gold!r} of example {_field(example, 'id')!r} is neither a choice label "
            f"nor one of its choices {choices!r}"
        )
    norm = _normalize(gold)
    if norm in ("yes", "no"):
        other = {"yes": "no", "no": "yes"}[norm]
        if gold[:1].isupper():
            other = other.capitalize()
        return [_tail(gold), _tail(other)], 0
    return [_tail(gold)], None


class Consistency(Reward):
    """MaRio's consistency: how much the rationale raises the scorer's belief in the gold answer,
    ``P(gold | question, rationale) − P(gold | question)``, in [−1, 1].

    ``P(· | ·)`` is the softmax over the example's answer options (``answer_options``: the choice
    labels ``"(A)." "(B)." ...`` as the targets write them, the choice texts, or yes / no) of
    their length-normalised log-likelihoods (``choice_logprobs``), i.e. the scorer's distribution
    over the options. For an example with free-form answers (no choices, not yes/no, e.g.
    arithmetic) the reward is the difference of the gold answer's length-normalised log-probs
    instead, ``mean log p(gold | q, r) − mean log p(gold | q)``: unbounded, on a log scale (the
    quantiser only uses its order).

    The scorer: ``model`` / ``tokenizer`` given here, else ``ctx["scorer_model"]`` /
    ``ctx["scorer_tokenizer"]``, else ``ctx["ref_model"]`` (the SFT reference, the trainers'
    default) with ``ctx["tokenizer"]``. ``prompt_fn(example, rationale_or_None) -> str`` builds the
    text the answer follows (default ``answer_prompt``). The no-rationale term depends only on the
    example, so it is computed once per distinct prompt and, with ``cache_baseline=True``, kept
    across calls (keyed by the scorer model object; ``clear_cache()`` after updating a scorer's
    weights in place). ``batch_size``: rows ((prompt, option) pairs) per forward pass; default
    ``ctx["batch_size"]``, else 16.
    """

    def __init__(
        self,
        model=None,
        tokenizer=None,
        *,
        batch_size: Optional[int] = None,
        prompt_fn: Optional[Callable[[Any, Optional[str]], str]] = None,
        cache_baseline: bool = True,
        backend: str = "auto",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.prompt_fn = prompt_fn or answer_prompt
        self.cache_baseline = cache_baseline
        self.backend = backend
        self._cache: Dict[Any, Tensor] = {}

    def clear_cache(self) -> None:
        self._cache.clear()

    def _scorer(self, ctx):
        model, tok = self.model, self.tokenizer
        if model is None:
            model = ctx.get("scorer_model")
            if model is None:
                model = ctx.get("ref_model")
        if tok is None:
            tok = ctx.get("scorer_tokenizer")
            if tok is None:
                tok = ctx.get("tokenizer")
        if model is None or tok is None:
            raise ValueError(
                "consistency needs a scorer causal LM and its tokenizer: pass model=/tokenizer= to "
                "Consistency, or scorer_model/scorer_tokenizer (or ref_model/tokenizer) as context"
            )
        return model, tok

    def __call__(self, examples, rationales, answers, **ctx) -> List[float]:
        n = _check_batch(examples, rationales, answers)
        if n == 0:
            return []
        model, tok = self._scorer(ctx)
        batch_size = self.batch_size or int(ctx.get("batch_size") or 16)
        choice_sets, golds = [], []
        for ex in examples:
            options, gold = answer_options(ex)
            choice_sets.append(options)
            golds.append(gold)

        def score(prompts, sets):
            return choice_logprobs(
                model, tok, prompts, sets, batch_size, average=True, backend=self.backend
            )

        with_r = score([self.prompt_fn(ex, r) for ex, r in zip(examples, rationales)], choice_sets)

        # the no-rationale baseline: once per distinct (prompt, choices)
        keys = [
            (id(model), self.prompt_fn(ex, None), tuple(c)) for ex, c in zip(examples, choice_sets)
        ]
        cache = self._cache if self.cache_baseline else {}
        missing = list(dict.fromkeys(k for k in keys if k not in cache))
        if missing:
            fresh = score([k[1] for k in missing], [list(k[2]) for k in missing])
            cache.update(zip(missing, fresh))
        base = [cache[k] for k in keys]

        out = []
        for lp_r, lp_0, g in zip(with_r, base, golds):
            lp_r, lp_0 = lp_r.double(), lp_0.double()
            if g is None:
                out.append(float(lp_r[0] - lp_0[0]))
            else:
                out.append(float(lp_r.softmax(0)[g] - lp_0.softmax(0)[g]))
        return out


register_reward("consistency", Consistency, code="consist")


# ---------------------------------------------------------------------------------- plausibility

_POSITIVE = ("plausible", "positive", "pos", "true", "yes", "correct", "valid", "entailment")


def _positive_label(config, label: Union[None, int, str]) -> Optional[int]:
    """Index of the positive class of a classifier config; None means one logit (sigmoid)."""
    num = int(getattr(config, "num_labels", 0) or 0)
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    if isinstance(label, int):
        if not 0 <= label < max(num, 1):
            raise ValueError(f"label {label} out of range for a classifier with {num} labels")
        return None if num == 1 else label
    if isinstance(label, str):
        for k, v in id2label.items():
            if v.lower() == label.lower():
                return k
        raise ValueError(f"label {label!r} not among the classifier's labels {id2label}")
    if num == 1:
        return None
    for name in _POSITIVE:
        for k, v in id2label.items():
            if v.lower() == name:
                return k
    if num == 2:
        return 1
    raise ValueError(
        f"cannot tell which of the classifier's labels {id2label} means plausible: pass label="
    )


class Plausibility(Reward):
    """Plausibility of each rationale, from a pluggable scorer:

    - ``scorer=None`` (default): the built-in synthetic task's step verifier,
      ``rationale_train.data.verify_steps(example, rationale) -> float`` (imported lazily).
    - ``scorer="path/to/dir"``: a local Hugging Face sequence-classification model directory
      (loaded on first use with ``local_files_only=True``: nothing is downloaded). The reward is the
      probability of the positive class: ``label=`` (index or name), else the label named
      plausible/positive/true/yes/correct/valid/entailment, else class 1 of a two-class model; a
      one-logit model gives ``sigmoid(logit)``. A loaded model can be passed instead of a path,
      with ``tokenizer=``.
    - ``scorer=callable``: any function with the reward signature
      ``(examples, rationales, answers, **ctx) -> list[float]``.

    The classifier reads ``text_fn(example, rationale)`` (default ``"{question} {rationale}"``),
    truncated to ``max_length`` tokens, ``batch_size`` texts per forward pass.
    """

    def __init__(
        self,
        scorer: Any = None,
        *,
        tokenizer=None,
        label: Union[None, int, str] = None,
        batch_size: int = 32,
        max_length: int = 512,
        text_fn: Optional[Callable[[Any, str], str]] = None,
        device: Union[None, str, torch.device] = None,
    ):
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.label = label
        self.batch_size = batch_size
        self.max_length = max_length
        self.text_fn = text_fn or (lambda ex, r: f"{_field(ex, 'question', '')} {r}")
        self.device = device
        self._model = None
        self._pos: Optional[int] = None
        if scorer is not None and not isinstance(scorer, (str, bytes)) and not callable(scorer):
            import os

            if not isinstance(scorer, os.PathLike):
                raise TypeError("scorer must be None, a local model path, a model or a callable")

    def _is_model(self) -> bool:
        return isinstance(self.scorer, torch.nn.Module)

    def _load(self):
        if self._model is not None:
            return
        if self._is_model():
            model, tok = self.scorer, self.tokenizer
            if tok is None:
                raise ValueError("a classifier model passed as scorer needs tokenizer=")
        else:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            path = str(self.scorer)
            model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
            tok = self.tokenizer or AutoTokenizer.from_pretrained(path, local_files_only=True)
            if self.device is not None:
                model = model.to(self.device)
        if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
            model.config.pad_token_id = tok.pad_token_id
        self._pos = _positive_label(model.config, self.label)
        self._model, self.tokenizer = model, tok

    def _classify(self, texts: List[str]) -> List[float]:
        from .generate import _model_device

        self._load()
        model, tok = self._model, self.tokenizer
        device = _model_device(model)
        out: List[float] = []
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for s in range(0, len(texts), self.batch_size):
                    enc = tok(
                        texts[s : s + self.batch_size], padding=True, truncation=True,
                        max_length=self.max_length, return_tensors="pt",
                    )  # fmt: skip
                    enc = {k: v.to(device) for k, v in enc.items()}
                    logits = model(**enc).logits.float()
                    if self._pos is None:
                        p = logits[:, 0].sigmoid()
                    else:
                        p = logits.softmax(-1)[:, self._pos]
                    out.extend(p.cpu().tolist())
        finally:
            model.train(was_training)
        return out

    def __call__(self, examples, rationales, answers, **ctx) -> List[float]:
        _check_batch(examples, rationales, answers)
        if self.scorer is None:
            from .data import verify_steps

            return [float(verify_steps(ex, r)) for ex, r in zip(examples, rationales)]
        if callable(self.scorer) and not self._is_model():
            return [float(v) for v in self.scorer(examples, rationales, answers, **ctx)]
        if not rationales:
            return []
        return self._classify([self.text_fn(ex, r) for ex, r in zip(examples, rationales)])


register_reward("plausibility", Plausibility, code="plaus")

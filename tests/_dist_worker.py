"""Run by tests/test_dist.py under ``torchrun --nproc-per-node N`` (or as one plain process): one
optimizer step of MaRio's loss or COLLATE's DPO on a tiny model, each rank feeding its share of a
fixed global batch; rank 0 saves the parameters after the step and the step's figures.

    python tests/_dist_worker.py {mario,dpo} {ddp,fsdp} OUT.pt [RUN_DIR]

With RUN_DIR, the step is also saved as checkpoint 1 of RUN_DIR (model and optimizer).
"""

import sys

import torch
from rationale_train import dist
from rationale_train.checkpoint import save_checkpoint
from rationale_train.collate import dpo_step, rank_pairs
from rationale_train.mario import train_step
from rationale_train.models import tiny_llama, train_tokenizer

LR = 0.5
TEXTS = [f"question {i} plus {i + 3} is {2 * i + 3} because we add" for i in range(40)]


def tiny(seed, tok):
    return tiny_llama(tok, hidden_size=32, num_layers=2, num_heads=4, seed=seed)


def rows(tok, n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):  # prompts and targets of different lengths
        p = tok(TEXTS[i][: 8 + int(torch.randint(0, 20, (1,), generator=g))])["input_ids"]
        t = tok(" " + TEXTS[-1 - i][: 5 + 3 * i])["input_ids"]
        out.append((list(p), list(t) + [tok.eos_token_id]))
    return out


def main(kind, mode, out, run_dir=None):
    torch.set_num_threads(1)
    dist.init()
    tok = train_tokenizer(TEXTS, vocab_size=300) if dist.is_main() else None
    tok = dist.broadcast(tok)
    model = tiny(0, tok)
    par = dist.Parallel(model, mode)
    # SGD: the step is linear in the gradient (Adam's first step is ~sign(g), which flips for
    # gradients within rounding of 0 and would hide nothing but test rounding); the momentum
    # buffer (= the first step's gradient) is optimizer state for the checkpoint to carry
    opt = torch.optim.SGD(par.parameters(), lr=LR, momentum=0.9)
    pad = tok.pad_token_id
    if kind == "mario":
        ref = tiny(1, tok).eval()
        batch = rows(tok, 7, 0)  # 7 rows: ranks get 3 and 4
        ref_batch = [(p[:1] + p, t) for p, t in batch]  # the reference reads other prompts
        mine = dist.part(list(range(len(batch))))
        st = train_step(model, opt, [batch[i] for i in mine], pad_id=pad, ref=ref,
                        ref_rows=[ref_batch[i] for i in mine], kl_coef=0.3, entropy_coef=0.05,
                        kl_vocab=200, grad_clip=0.5, backend="torch", parallel=par)  # fmt: skip
    else:
        cands = rows(tok, 8, 1)  # 4 questions x 2 candidates
        ref_logps = -torch.arange(8, dtype=torch.float32) - 5.0
        pairs = [[0, 1], [3, 2], [4, 5], [7, 6], [0, 2]]  # the last pair spans two questions
        mine, contributes = rank_pairs(pairs)  # whole questions per rank
        used = sorted({c for i in mine for c in pairs[i]})
        remap = {c: j for j, c in enumerate(used)}
        local = torch.tensor([[remap[a], remap[b]] for a, b in (pairs[i] for i in mine)])
        st = dpo_step(model, opt, [cands[c] for c in used], ref_logps[used], local, pad_id=pad,
                      beta=0.5, grad_clip=0.5, nll_coef=0.2, backend="torch", parallel=par,
                      contributes=contributes)  # fmt: skip
    if run_dir:
        save_checkpoint(run_dir, 1, par, opt)
    state = par.gather_state()
    if dist.is_main():
        state = state if state is not None else model.state_dict()
        torch.save({"state": {k: v.detach().cpu() for k, v in state.items()}, "stats": st}, out)
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])

"""The demo: a small GPT trained on synthetic sentences with an effective batch of 256.

Everything is built in code (no downloads). Sentences have different lengths and are padded,
so the loss is a mean over real tokens: exactly the case where dividing each micro-batch loss
by ``accum_steps`` goes wrong and item-weighted accumulation does not. After training, the demo
checks on a float64 copy that one accumulated step equals one full-batch step.
"""
from __future__ import annotations

import copy
import math
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100

# A tiny grammar: enough structure for the loss to fall visibly within a few dozen steps.
_SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our team"]
_VERBS = ["sees", "likes", "finds", "carries", "paints", "follows", "builds"]
_OBJECTS = ["a red ball", "the green door", "two apples", "a long road", "the blue sky", "this house"]
_TAILS = ["", " today", " at night", " in the park", " again and again", " with care"]
ALPHABET = " .abcdefghijklmnopqrstuvwxyz"
PAD_ID = 0
VOCAB = len(ALPHABET) + 1  # id 0 is padding


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}."


def make_batch(n: int, seq_len: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` padded sentences: ``input_ids`` (n, seq_len) and next-character ``targets``.

    Targets are ``IGNORE`` past each sentence's end, so samples carry different token counts.
    """
    rng = random.Random(seed)
    ids = torch.full((n, seq_len), PAD_ID, dtype=torch.long)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    for i in range(n):
        text = sentence(rng)[: seq_len + 1]
        codes = torch.tensor([ALPHABET.index(c) + 1 for c in text])
        ids[i, : len(codes) - 1] = codes[:-1]
        targets[i, : len(codes) - 1] = codes[1:]
    return {"input_ids": ids, "targets": targets}


def count_tokens(micro_batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Items the loss averages over: positions with a real target."""
    return (micro_batch["targets"] != IGNORE).sum()


def lm_loss(model: nn.Module, micro_batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the real (non-padding) target tokens of the micro-batch."""
    logits = model(micro_batch["input_ids"])
    return F.cross_entropy(logits.flatten(0, 1).float() if logits.dtype in (torch.float16, torch.bfloat16)
                           else logits.flatten(0, 1), micro_batch["targets"].flatten(), ignore_index=IGNORE)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        # Right padding + a causal mask: real tokens never attend to padding, so no pad mask is needed.
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyGPT(nn.Module):
    """A GPT-style decoder: token + position embeddings, pre-norm blocks, tied-free head."""

    def __init__(self, vocab: int = VOCAB, dim: int = 64, layers: int = 2, heads: int = 4,
                 max_len: int = 64, dropout: float = 0.0):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def exactness_check(model: nn.Module, batch: dict, target_batch: int, micro_batch: int) -> dict:
    """One accumulated step vs one full-batch step on float64 copies: max |param difference|.

    Also measures the tutorial method (each micro-batch loss / accum_steps) for contrast.
    """
    from .fit import fit  # the demo sits above fit; imported here to keep the module cheap

    def clone():
        m = copy.deepcopy(model).double().cpu()
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3)

    cpu_batch = {k: v.cpu() for k, v in batch.items()}
    full, full_opt = clone()
    lm_loss(full, cpu_batch).backward()
    full_opt.step()

    exact, exact_opt = clone()
    trainer = fit(exact, target_batch, exact_opt, loss_fn=lm_loss, count_fn=count_tokens,
                  micro_batch=micro_batch, device="cpu")
    trainer.step(cpu_batch)

    naive, naive_opt = clone()
    sizes = trainer.plan.micro_batches
    start = 0
    for s in sizes:
        part = {k: v[start:start + s] for k, v in cpu_batch.items()}
        (lm_loss(naive, part) / len(sizes)).backward()
        start += s
    naive_opt.step()

    def max_diff(a: nn.Module) -> float:
        return max((p - q).abs().max().item() for p, q in zip(a.parameters(), full.parameters()))

    return {"autoaccum": max_diff(exact), "naive": max_diff(naive), "micro_batches": sizes}


def run(steps: int = 30, target_batch: int = 256, micro_batch: int | None = None,
        memory_budget: str | int | None = "64MiB", device: str | None = None, seed: int = 0,
        progress: bool = True) -> dict:
    """Train the demo model and print a summary; returns the numbers it printed.

    Without ``micro_batch`` the largest micro-batch is probed under ``memory_budget`` (64 MiB by
    default, so that even a large GPU shows accumulation; ``None`` means the whole device).
    """
    from .fit import fit

    torch.manual_seed(seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = TinyGPT().to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    print(f"autoaccum demo on {dev}: TinyGPT ({sum(p.numel() for p in model.parameters()):,} parameters), "
          f"synthetic padded sentences")
    sizing = (dict(sample=make_batch(16, seed=seed), memory_budget=memory_budget) if micro_batch is None
              else dict(micro_batch=micro_batch))     # probe, or take the micro-batch as given
    trainer = fit(model, target_batch, opt, loss_fn=lm_loss, count_fn=count_tokens, scheduler=sched,
                  max_grad_norm=1.0, device=dev, probe_cache=False, **sizing)
    probed = trainer.probe_result
    if probed is not None:
        from .memory import format_bytes
        print(f"probe: {len(probed.trials)} trials under {format_bytes(probed.limit_bytes)} -> largest "
              f"micro-batch {probed.max_micro_batch} ({probed.seconds:.2f} s)")
        print(probed.table())
    print(f"plan: {trainer.plan}")

    loader = [make_batch(target_batch, seed=seed * 100_000 + i) for i in range(steps)]
    started = time.perf_counter()
    history = trainer.train(loader, progress=progress)
    elapsed = time.perf_counter() - started
    samples_per_s = sum(s.samples for s in history) / elapsed
    tokens = sum(s.items for s in history)

    # With a single micro-batch the check would be trivial; then show an uneven split instead.
    check_micro = trainer.plan.micro_batch if trainer.plan.accum_steps > 1 else max(1, target_batch // 5)
    check = exactness_check(model, make_batch(target_batch, seed=10_000_000 + seed), target_batch, check_micro)
    summary = {
        "device": str(dev), "plan": trainer.plan.to_dict(), "steps": len(history),
        "probe": probed.to_dict() if probed is not None else None,
        "loss_start": history[0].loss, "loss_end": history[-1].loss,
        "samples_per_s": samples_per_s, "tokens_per_s": tokens / elapsed,
        "skipped_steps": trainer.skipped_steps,
        "exactness_max_abs_diff": check["autoaccum"], "naive_max_abs_diff": check["naive"],
    }
    print(f"loss {summary['loss_start']:.3f} -> {summary['loss_end']:.3f} over {len(history)} steps; "
          f"{samples_per_s:,.0f} samples/s ({summary['tokens_per_s']:,.0f} tokens/s)")
    verdict = "OK" if check["autoaccum"] <= 1e-12 else "MISMATCH"
    print(f"exactness (float64, one AdamW step, micro-batches {check['micro_batches']}): "
          f"max |accumulated - full batch| = {check['autoaccum']:.1e} [{verdict}]; "
          f"tutorial loss/accum_steps: {check['naive']:.1e}")
    return summary

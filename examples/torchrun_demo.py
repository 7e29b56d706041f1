"""The demo GPT under DistributedDataParallel, launched with torchrun.

    torchrun --standalone --nproc_per_node=2 examples/torchrun_demo.py --steps 20

Each rank holds its share of every 256-sample batch (DistributedSampler);
autoaccum probes the micro-batch on every rank and takes the smallest, counts real tokens over
all ranks before the first backward, runs every micro-batch under no_sync() and all-reduces the
gradient buffer once per step. Works on CPUs (gloo) and GPUs (nccl).
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import autoaccum
from autoaccum.demo import TinyGPT, count_tokens, lm_loss, make_batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--target-batch", type=int, default=256)
    ap.add_argument("--memory-budget", default="32MiB", help="per rank, for the probe")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)
    model = DDP(TinyGPT().to(device), device_ids=[device.index] if cuda else None)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = make_batch(args.target_batch * args.steps, seed=1)
    dataset = TensorDataset(data["input_ids"], data["targets"])
    per_rank = args.target_batch // world
    loader = DataLoader(dataset, batch_size=per_rank, sampler=DistributedSampler(dataset, shuffle=True, seed=0),
                        drop_last=True)

    def to_dict(batch):
        return {"input_ids": batch[0], "targets": batch[1]}

    trainer = autoaccum.fit(model, args.target_batch, opt, loss_fn=lm_loss, count_fn=count_tokens,
                            sample=make_batch(16), memory_budget=args.memory_budget, max_grad_norm=1.0,
                            probe_cache=False)
    if rank == 0:
        print(f"{world} ranks: {trainer.plan}")
    history = trainer.train((to_dict(b) for b in loader), max_steps=args.steps, progress=False)
    if rank == 0:
        print(f"loss {history[0].loss:.3f} -> {history[-1].loss:.3f} over {len(history)} steps "
              f"({history[-1].items} tokens in the last global batch)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

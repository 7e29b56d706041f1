"""Size a Hugging Face Trainer run with autoaccum's probe, then train with HF as usual.

    python examples/hf_trainer_tune.py        # a tiny GPT-2 from a config, on the CPU, in seconds

tune() probes a real training step (the model's own loss, the optimizer HF builds from the
arguments) and returns a copy of the arguments whose per_device_train_batch_size x
gradient_accumulation_steps x world size is the effective batch you asked for.
"""
import logging
import tempfile

import torch
import transformers

from autoaccum.integrations.transformers import tune


def batch(n, seq=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 512, (n, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def main():
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=512, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=16,
                                          gradient_accumulation_steps=1, max_steps=2, use_cpu=True,
                                          report_to="none", save_strategy="no", disable_tqdm=True)
    # the worst case batch: the longest sequences the data holds; a tiny budget, so that it splits
    args = tune(args, model, batch(16), target_batch=16, memory_budget="12MiB")
    print(f"per_device_train_batch_size={args.per_device_train_batch_size}, "
          f"gradient_accumulation_steps={args.gradient_accumulation_steps}")
    rows = batch(32, seed=1)
    data = [{k: v[i] for k, v in rows.items()} for i in range(32)]
    transformers.Trainer(model=model, args=args, train_dataset=data).train()


if __name__ == "__main__":
    main()

"""A student distilled from a kdcache store in a plain PyTorch loop: DataLoader + `kd_loss`.

    python -m kdcache.pipeline.examples.kd_loop STORE --data SPEC [--data-arg k=v ...]
        --student SPEC [--student-arg k=v ...] [--steps 40] [--batch-size 8] [--alpha 0.5]

`train` is the whole loop (nanoGPT-style: no framework); any causal LM whose forward takes
`input_ids` and `attention_mask` and returns `.logits` (Hugging Face's) fits. README "Use the
cache from your own trainer" shows it run; tests/pipeline/test_kd_loop.py runs it.
"""

from __future__ import annotations

import argparse

import torch

import kdcache


def train(store, data, model, steps=40, batch_size=8, lr=3e-3, alpha=0.5, device="cpu"):
    cache = kdcache.open_cache(store)
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(
        cache.dataset(data), batch_size=batch_size, shuffle=True, collate_fn=cache.collate,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    step, log = 0, []
    while step < steps:
        for batch in loader:
            batch = {
                k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()
            }
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss, kd, ce = kdcache.kd_loss(logits.logits, batch, alpha=alpha, return_terms=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 10 == 0 or step == steps:  # the only reads back to the host
                log.append({"step": step, "loss": loss.item(), "kd": kd.item(), "ce": ce.item()})
                print("step {step:4d}  loss {loss:.4f}  kd {kd:.4f}  ce {ce:.4f}".format(**log[-1]))
            if step == steps:
                break
    return log


def main(argv=None) -> list[dict]:
    from kdcache.pipeline.data import load_dataset
    from kdcache.pipeline.models import load_model
    from kdcache.pipeline.specs import parse_kv

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--data", required=True)
    p.add_argument("--data-arg", action="append", default=[])
    p.add_argument("--student", required=True)
    p.add_argument("--student-arg", action="append", default=[])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    data = load_dataset(a.data, parse_kv(a.data_arg, "--data-arg"))
    model, _ = load_model(a.student, parse_kv(a.student_arg, "--student-arg"), what="--student")
    return train(a.store, data, model, a.steps, a.batch_size, a.lr, a.alpha, a.device)


if __name__ == "__main__":
    main()

"""The GPU side of bench_lm_loss: one student step at LM vocabularies, in process, on one GPU.

    python -m bench.bench_lm_loss --device cuda [--quick]      (under 5 minutes on one H100)

A `CausalMix(dim 256)` student, AdamW, a batch of 8 rows x 1,024 tokens with 10% right padding,
stored targets drawn on the GPU as a store would hold them (sampled N = 50 from the student's own
initial softmax, topk k = 64), at V = 32,768 and 131,072, fp32 and bf16 autocast. Contenders,
each timed over the same step (forward + loss + backward + optimizer, `torch.cuda.synchronize`
around the timed loop only) with `torch.cuda.max_memory_allocated` reset before each:

- CE only, plain: `lm.next_token_loss` on the full logits (the baseline);
- KD, plain: the loss before issue 22 (`next_token_loss` + the codec's `soft_loss` on
  `valid_tokens`): several (tokens x V) fp32 tensors;
- KD, chunked: `lm_loss.causal_lm_loss` on the logits (`--no-fused-head`);
- KD, fused: `lm_loss.causal_lm_loss` on the hidden states and the head (the default).

Targets: fused KD step <= 1.05x and its peak memory <= 1.2x the plain CE-only step's.
"""

from __future__ import annotations

import time

import torch

from bench.common import Report, parse_args, ratio
from bench.lm_models import CausalMix
from kdcache.stages.common.device import autocast
from kdcache.stages.tasks import causal_lm as lm
from kdcache.stages.tasks import lm_loss
from kdcache.storage.codecs import open_codec
from kdcache.storage.codecs.sampled import draw

DIM, ROWS, LENGTH, SAMPLES, TOPK, ALPHA = 256, 8, 1024, 50, 64, 0.9
SIZES = {"full": ((32768, 131072), 10), "quick": ((32768,), 3), "tiny": ((2048,), 2)}


def batch(v: int, device, rows=ROWS, length=LENGTH) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, v, (rows, length), generator=g, device=device)
    mask = torch.ones_like(ids)
    mask[:, int(0.9 * length) :] = 0  # 10% right padding, as a loader's longest-row batch has
    return {"input_ids": ids * mask, "attention_mask": mask}


def stored(codec_name: str, v: int, s: torch.Tensor) -> tuple:
    codec = open_codec({"codec": codec_name, "dtype": "float16", "num_classes": v,
                        "top_k": TOPK, "samples": SAMPLES}, "causal-lm")  # fmt: skip
    if codec_name == "sampled":
        g = torch.Generator(device=s.device).manual_seed(1)
        ids, counts, per = draw(torch.softmax(s, -1), SAMPLES, g)
        return codec, {"sampled_n": per, "sampled_ids": ids, "sampled_counts": counts}
    vals, idx = torch.topk(s, TOPK, dim=1)
    return codec, {"topk_indices": idx, "topk_logits": vals.half(), "logsumexp": s.logsumexp(1)}


def contenders(model, x, codec, cols, precision, device) -> dict:
    pos = lm_loss.positions(x["input_ids"].cpu(), x["attention_mask"].cpu()).to(device)
    v = model.head.out_features
    chunk = lm_loss.chunk_tokens(lm_loss.CHUNK_MB * 4, v)  # a GPU takes bigger chunks

    def plain_ce():
        with autocast(device, precision):
            z = model(x["input_ids"])
        return lm.next_token_loss(z.float(), x["input_ids"], x["attention_mask"])

    def plain_kd():
        with autocast(device, precision):
            z = model(x["input_ids"]).float()
        hard = lm.next_token_loss(z, x["input_ids"], x["attention_mask"])
        soft = codec.soft_loss(lm.valid_tokens(z, x["attention_mask"]), cols, 1.0, 1.0)
        return ALPHA * soft + (1 - ALPHA) * hard

    def chunked(fused: bool):
        def step():
            targets = codec.token_targets(cols, 1.0, 1.0, v)
            with autocast(device, precision):
                out = model.hidden_states(x["input_ids"]) if fused else model(x["input_ids"])
                head = model.head if fused else None
                return lm_loss.causal_lm_loss(out, pos, targets, 1.0, 1 - ALPHA, ALPHA, chunk,
                                              head)[0]  # fmt: skip

        return step

    return {"CE only, plain": plain_ce, "KD, plain (before issue 22)": plain_kd,
            "KD, chunked logits": chunked(False), "KD, fused head": chunked(True)}  # fmt: skip


def measure(model, opt, loss_fn, steps: int) -> tuple[float, int]:
    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    step()  # warm-up (allocator, kernels)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    tick = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - tick) / steps, torch.cuda.max_memory_allocated()


def main(argv: list[str], device_name: str) -> Report:
    args = parse_args(__doc__.splitlines()[0], argv)
    device = torch.device(device_name)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise SystemExit(f"bench_lm_loss --device {device_name}: no CUDA device here")
    vocabs, steps = SIZES["tiny" if args.tiny else "quick" if args.quick else "full"]
    report = Report(f"stage two step on {torch.cuda.get_device_name(device)}", quick=args.quick)
    t = report.table(
        f"one step of CausalMix(dim {DIM}) + AdamW, {ROWS} x {LENGTH} tokens (10% padding), "
        f"mean of {steps} steps after a warm-up",
        ["V", "precision", "codec", "run", "ms/step", "vs CE", "peak MB", "peak vs CE"],
    )
    for v in vocabs:
        torch.manual_seed(0)
        model = CausalMix(v, DIM).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = batch(v, device)
        with torch.no_grad():
            s = model(x["input_ids"])[x["attention_mask"].bool()].float()
        for precision in ("fp32", "bf16"):
            for name in ("sampled", "topk"):
                codec, cols = stored(name, v, s)
                runs = contenders(model, x, codec, cols, precision, device)
                got = {k: measure(model, opt, fn, steps) for k, fn in runs.items()}
                base_t, base_m = got["CE only, plain"]
                for k, (sec, peak) in got.items():
                    t.add(v, precision, name, k, 1000 * sec, ratio(sec, base_t), peak / 2**20,
                          ratio(peak, base_m))  # fmt: skip
                sec, peak = got["KD, fused head"]
                what = f"{name} V={v:,} {precision}"
                report.target(f"fused KD step / CE only, {what}", ratio(sec, base_t), "<=", 1.05)
                report.target(f"fused KD peak memory / CE only, {what}", ratio(peak, base_m),
                              "<=", 1.2)  # fmt: skip
        del model, opt
        torch.cuda.empty_cache()
    report.emit(args.json)
    return report

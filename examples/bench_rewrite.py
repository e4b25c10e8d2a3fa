#!/usr/bin/env python
"""Benchmark of `rewrite`'s mixed-policy decode against plain sampling and against a cache-less decode.

Side by side in one run, on the same model, the same B traces and the same number of new tokens (stop
tokens banned, so every variant decodes exactly N tokens per sequence):
  (a) dail.decode with the `choose` of dail.rollout (dail.sampling_probs for both contexts, then
      dail.mix_step): B traces, two contexts each (a student-length and a privileged-length prompt), i.e.
      2B rows per forward, one KV cache.
  (b) model.generate sampling 2B independent sequences from the same 2B prompts (the same compute: two
      contexts per trace), temperature / top-p / top-k as (a), min_new_tokens = max_new_tokens = N.
  (c) a decode that re-runs the whole prefix of all 2B rows every step without a cache (what the released
      code's one-request-per-token loop effectively does), with the same `choose` as (a).
Reported: (a)/(b) (target <= 1.25) and (c)/(a) (should grow with N).

(a) and (b) are timed fully, `--reps` times each, interleaved (a, b, a, b, ...), median reported.
(c) is quadratic in N: it is timed fully (one rep) when its estimated time is under --c-budget seconds,
otherwise it is ESTIMATED from --c-samples real cache-less steps at evenly spaced prefix lengths (the
midpoint of each of c-samples equal strata of the N steps): estimate = N * mean(step time). The JSON and
the table say which ("full" or "sampled k/N"). With --c-check the estimator is also run where (c) was
timed fully, to show its error.

Prompts are random byte-token ids of the given lengths (the tiny tokenizer is byte-level, so the lengths
are chosen to look like a real tokenizer's token counts, not characters).

Run (CPU, 1 thread, the two models of the report):
    HF_HUB_OFFLINE=1 python examples/bench_rewrite.py --out runs/bench_rewrite.json
GPU later:
    python examples/bench_rewrite.py --device cuda --dtype bfloat16 --batch 32 --out runs/bench_rewrite_gpu.json
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import torch  # noqa: E402

import dail  # noqa: E402
from tiny_model import make_model, make_tokenizer  # noqa: E402

# name -> (hidden, layers, heads, kv_heads, intermediate)
PRESETS = {
    "tiny": (128, 2, 4, 2, 256),          # the test fixture size
    "10m": (384, 6, 6, 2, 1536),          # ~13M parameters, head dim 64
}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,10m",
                    help="comma-separated presets (tiny: hidden 128, 2 layers, 4 heads; 10m: hidden 384, 6 "
                         "layers, 6 heads, 2 KV heads, MLP 1536) or custom HIDDEN:LAYERS:HEADS:KV:MLP")
    ap.add_argument("--vocab", type=int, default=0,
                    help="resize the model's vocabulary to this many rows (0: the byte tokenizer's 261); a "
                         "real vocabulary (e.g. 151936) makes the per-step sampling cost realistic")
    ap.add_argument("--lengths", default="128,512,2048", help="comma-separated numbers of new tokens N")
    ap.add_argument("--batch", type=int, default=8, help="B traces (2B rows: student + privileged prompts)")
    ap.add_argument("--student-len", type=int, default=128, help="student prompt length in tokens")
    ap.add_argument("--privileged-len", type=int, default=512, help="privileged prompt length in tokens")
    ap.add_argument("--threshold", type=float, default=0.8, help="validator threshold tau (released: 0.8)")
    ap.add_argument("--retries", type=int, default=5, help="proposals per step R (released: 5)")
    ap.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (released: 0.6)")
    ap.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (released: 0.95)")
    ap.add_argument("--top-k", type=int, default=20, help="top-k candidates (released: 20)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of (a) and (b), interleaved")
    ap.add_argument("--c-budget", type=float, default=60.0,
                    help="time (c) fully when its estimated time is below this many seconds, else sample")
    ap.add_argument("--c-samples", type=int, default=6, help="cache-less steps timed when (c) is sampled")
    ap.add_argument("--c-step-reps", type=int, default=1,
                    help="when (c) is sampled, time each sampled step this many times (median)")
    ap.add_argument("--c-check", action="store_true",
                    help="also run the sampled estimator where (c) is timed fully, to report its error")
    ap.add_argument("--skip-c", action="store_true", help="do not run (c)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="model dtype (bfloat16 on GPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU timings: 1)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (prompts, weights, sampling)")
    ap.add_argument("--out", default="runs/bench_rewrite.json", help="where the JSON of results goes")
    return ap.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(tok, spec, vocab, device, dtype, seed):
    hidden, layers, heads, kv, inter = PRESETS[spec] if spec in PRESETS else map(int, spec.split(":"))
    model = make_model(tok, hidden=hidden, layers=layers, heads=heads, kv_heads=kv, intermediate=inter,
                       seed=seed, max_positions=8192)
    if vocab and vocab != model.config.vocab_size:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(device=device, dtype=dtype).eval()


def make_contexts(B, ls, lp, seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 256, (ls,), generator=g).tolist(), torch.randint(0, 256, (lp,), generator=g).tolist()]
            for _ in range(B)]


def make_choose(a, device, seed, n_traces):
    """Exactly dail.rollout's choose: sampling_probs on both contexts, the validator's model probability,
    per-trace counter-based uniforms, then mix_step."""
    keys = dail.trace_keys(seed, [str(i) for i in range(n_traces)], [0] * n_traces).to(device)

    def choose(logits, step, rows):  # [2, b, V]
        p_propose = dail.sampling_probs(logits[0], a.temperature, a.top_p, a.top_k)
        p_validate = dail.sampling_probs(logits[1], a.temperature, a.top_p, a.top_k)
        u = dail.counter_uniforms(keys[rows], step, a.retries + 1)
        return dail.mix_step(p_propose, p_validate, dail.model_probs(logits[1]), a.threshold, a.retries, u)
    return choose


def run_a(model, contexts, n, a, pad_id, device):
    choose = make_choose(a, device, a.seed, len(contexts))
    sync(device)
    t0 = time.perf_counter()
    res = dail.decode(model, contexts, choose, n, stop_ids=[], pad_id=pad_id)
    sync(device)
    dt = time.perf_counter() - t0
    assert all(len(r["ids"]) == n for r in res), "decode did not produce N tokens per trace"
    return dt


def run_b(model, contexts, n, a, pad_id, device):
    rows = [trace[g] for g in range(2) for trace in contexts]
    ids, mask, _ = dail.left_pad(rows, pad_id, device)
    torch.manual_seed(a.seed)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=a.temperature,
                             top_p=a.top_p, top_k=a.top_k, max_new_tokens=n, min_new_tokens=n,
                             eos_token_id=None, pad_token_id=pad_id, use_cache=True)
    sync(device)
    dt = time.perf_counter() - t0
    assert out.shape == (len(rows), ids.shape[1] + n), f"generate returned {tuple(out.shape)}"
    return dt


@torch.no_grad()
def nocache_step(model, ids, mask, choose, step):
    """One step of the cache-less decode: the whole [2B, L] prefix, last position's logits, choose."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                   logits_to_keep=1).logits[:, -1]
    b = ids.shape[0] // 2
    tokens, _ = choose(logits.reshape(2, b, -1), step, torch.arange(b, device=ids.device))
    return tokens


def run_c_full(model, contexts, n, a, pad_id, device):
    choose = make_choose(a, device, a.seed, len(contexts))
    rows = [trace[g] for g in range(2) for trace in contexts]
    ids, mask, _ = dail.left_pad(rows, pad_id, device)
    sync(device)
    t0 = time.perf_counter()
    for step in range(n):
        tokens = nocache_step(model, ids, mask, choose, step)
        tokens.tolist()                                   # the per-step host sync every decode loop has
        ids = torch.cat([ids, tokens.repeat(2)[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    sync(device)
    return time.perf_counter() - t0


def run_c_sampled(model, contexts, n, a, pad_id, device, k, reps=1):
    """Estimate of run_c_full: time k real steps at the midpoints of k equal strata of the n steps (each
    step timed `reps` times, median)."""
    choose = make_choose(a, device, a.seed, len(contexts))
    rows = [trace[g] for g in range(2) for trace in contexts]
    ids0, mask0, _ = dail.left_pad(rows, pad_id, device)
    g = torch.Generator().manual_seed(a.seed + 1)
    steps, times = [], []
    for j in range(k):
        t = int((j + 0.5) * n / k)                         # generated tokens already in the prefix
        b = len(contexts)
        gen = torch.randint(0, 256, (b, t), generator=g).to(device).repeat(2, 1)
        ids = torch.cat([ids0, gen], dim=1)
        mask = torch.cat([mask0, mask0.new_ones(mask0.shape[0], t)], dim=1)
        rep_times = []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            tokens = nocache_step(model, ids, mask, choose, t)
            tokens.tolist()
            torch.cat([ids, tokens.repeat(2)[:, None]], dim=1)
            torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            sync(device)
            rep_times.append(time.perf_counter() - t0)
        times.append(statistics.median(rep_times))
        steps.append(t)
    return n * statistics.mean(times), dict(steps=steps, step_s=times)


def main():
    a = parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[a.dtype]
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass
    tok = make_tokenizer()
    lengths = [int(x) for x in a.lengths.split(",")]
    contexts = make_contexts(a.batch, a.student_len, a.privileged_len, a.seed)
    env = dict(device=str(device), dtype=a.dtype, threads=torch.get_num_threads(), torch=torch.__version__,
               cpu_count=os.cpu_count(), batch=a.batch, rows=2 * a.batch, student_len=a.student_len,
               privileged_len=a.privileged_len, threshold=a.threshold, retries=a.retries,
               temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, reps=a.reps)
    import transformers
    env["transformers"] = transformers.__version__
    print(f"bench_rewrite: device {device}, dtype {a.dtype}, torch.set_num_threads({torch.get_num_threads()}), "
          f"B={a.batch} traces = {2 * a.batch} rows, prompts {a.student_len}/{a.privileged_len} tokens, "
          f"reps {a.reps} (median)", flush=True)
    results = []
    for spec in a.models.split(","):
        model = build_model(tok, spec, a.vocab, device, dtype, a.seed)
        n_params = sum(p.numel() for p in model.parameters())
        cfg = model.config
        print(f"\nmodel {spec}: {n_params / 1e6:.2f}M params, hidden {cfg.hidden_size}, layers "
              f"{cfg.num_hidden_layers}, heads {cfg.num_attention_heads}, kv {cfg.num_key_value_heads}, "
              f"vocab {cfg.vocab_size}", flush=True)
        # warm-up (allocator, kernels, generate's first-call set-up)
        run_a(model, contexts[:2], 4, a, tok.pad_token_id, device)
        run_b(model, contexts[:2], 4, a, tok.pad_token_id, device)
        for n in lengths:
            ta, tb = [], []
            for _ in range(a.reps):
                ta.append(run_a(model, contexts, n, a, tok.pad_token_id, device))
                tb.append(run_b(model, contexts, n, a, tok.pad_token_id, device))
            ma, mb = statistics.median(ta), statistics.median(tb)
            row = dict(model=spec, params=n_params, new_tokens=n, a_s=ta, b_s=tb, a_median_s=ma, b_median_s=mb,
                       a_over_b=ma / mb, a_tok_per_s=2 * a.batch * n / ma, b_tok_per_s=2 * a.batch * n / mb)
            if not a.skip_c:
                # estimate from one sampled step at the middle to decide full vs sampled
                est, _ = run_c_sampled(model, contexts, n, a, tok.pad_token_id, device, 1)
                if est <= a.c_budget:
                    tc = run_c_full(model, contexts, n, a, tok.pad_token_id, device)
                    row.update(c_s=tc, c_mode="full")
                    if a.c_check:
                        est, detail = run_c_sampled(model, contexts, n, a, tok.pad_token_id, device, a.c_samples,
                                                     a.c_step_reps)
                        row.update(c_sampled_estimate_s=est, c_sampled_error=est / tc - 1)
                else:
                    tc, detail = run_c_sampled(model, contexts, n, a, tok.pad_token_id, device, a.c_samples,
                                                     a.c_step_reps)
                    row.update(c_s=tc, c_mode=f"estimated from {a.c_samples}/{n} steps", c_detail=detail)
                row["c_over_a"] = tc / ma
            results.append(row)
            c_txt = (f"  c {row['c_s']:9.2f}s ({row['c_mode']})  c/a {row['c_over_a']:7.1f}"
                     if "c_s" in row else "")
            print(f"  N={n:5d}  a {ma:8.3f}s  b {mb:8.3f}s  a/b {ma / mb:5.2f}{c_txt}   "
                  f"a runs {[round(x, 3) for x in ta]}  b runs {[round(x, 3) for x in tb]}", flush=True)
        del model

    print("\n| model | params | N | (a) dail.decode s | (b) generate s | (a)/(b) | (c) no-cache s | (c) mode | (c)/(a) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['new_tokens']} | {r['a_median_s']:.3f} | "
              f"{r['b_median_s']:.3f} | {r['a_over_b']:.2f} | "
              + (f"{r['c_s']:.2f} | {r['c_mode']} | {r['c_over_a']:.1f} |" if "c_s" in r else "- | - | - |"))
    for r in results:
        if "c_sampled_estimate_s" in r:
            print(f"check of the (c) estimator: {r['model']} N={r['new_tokens']}: timed {r['c_s']:.2f}s, estimated "
                  f"{r['c_sampled_estimate_s']:.2f}s ({100 * r['c_sampled_error']:+.0f}%)")
    ok = all(r["a_over_b"] <= 1.25 for r in results)
    print(f"\ntarget (a)/(b) <= 1.25 at every length: {'met' if ok else 'NOT met'}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(env=env, results=results, target_a_over_b_met=ok), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

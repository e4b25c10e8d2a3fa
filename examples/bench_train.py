#!/usr/bin/env python
"""Benchmark of a DAIL training step against an SFT step, and of the chunked loss's peak memory.

Part 1, step time, side by side in one run on the same micro-batch (LoRA via dail.add_lora as `train`
does; the reference theta0 is the same network with adapters off, applied inside dail.micro_batch_loss;
--lora-rank 0 is full fine-tuning with a frozen copy as reference, as `train` does):
  (a) DAIL step: dail.micro_batch_loss(objective dail) + backward (student forward+backward, two no-grad
      forwards for the privileged and shortcut contexts, the chunked DAIL loss);
  (b) SFT step: dail.micro_batch_loss(objective sft) + backward.
Also timed, for diagnosis: the two no-grad reference forwards alone (privileged, shortcut), so that
"ideal" = (b) + privileged forward + shortcut forward is what (a) would cost with a free loss. Reported:
(a)/(b) (target <= 1.8), the measured ideal/(b), and a token-count FLOP floor (f*Ts + Tp + Tc) / (f*Ts)
with f = forward+backward cost in forward units (2 for LoRA: frozen weights need no weight gradients;
3 for full fine-tuning or LoRA + gradient checkpointing; 4 for full FT + checkpointing). The "1.67"
of the brief is that floor at f = 3 and equal context lengths. Variants are interleaved, median of --reps.
Examples: {"student": (prompt, response), "privileged": (...), "shortcut": (...)} with random byte-token
prompts of the given lengths (privileged longer than student) and the same response in all three.

Part 2, peak memory of the loss alone at long length and large vocabulary (T positions, V vocabulary,
H hidden), each variant in a fresh subprocess, peak = ru_maxrss after the work minus ru_maxrss before it
(inputs already allocated):
  plain:   dail.dail_loss on full [1, T, V] logits of a linear head over [T, H] hidden states (student
           logits with grad, teacher and shortcut logits without), then backward;
  chunked: dail.chunked_dail_loss on the [T, H] hidden states (--loss-chunk positions per chunk), backward.
The head is frozen (as with LoRA) and the student hidden states require grad; --head-trainable makes
the head trainable too. Reported: chunked / plain (target <= 0.30), and the time of each.

Run (CPU, 1 thread):
    HF_HUB_OFFLINE=1 python examples/bench_train.py --out runs/bench_train.json
GPU later (memory then is torch.cuda.max_memory_allocated in the subprocess):
    python examples/bench_train.py --device cuda --dtype bfloat16 --out runs/bench_train_gpu.json
"""
import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import torch  # noqa: E402

import dail  # noqa: E402

PRESETS = {  # name -> (hidden, layers, heads, kv_heads, intermediate); the same as bench_rewrite.py
    "tiny": (128, 2, 4, 2, 256),
    "10m": (384, 6, 6, 2, 1536),
}
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,10m",
                    help="comma-separated presets (tiny: hidden 128, 2 layers; 10m: hidden 384, 6 layers, 6 "
                         "heads, MLP 1536) or custom HIDDEN:LAYERS:HEADS:KV:MLP ('' skips part 1)")
    ap.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--student-len", type=int, default=128, help="student prompt length in tokens")
    ap.add_argument("--privileged-len", type=int, default=512, help="privileged prompt length in tokens")
    ap.add_argument("--shortcut-len", type=int, default=192, help="shortcut prompt length in tokens")
    ap.add_argument("--response-len", type=int, default=512, help="response length in tokens (all contexts)")
    ap.add_argument("--lora-rank", type=int, default=32, help="LoRA rank (0: full fine-tuning, frozen copy)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="gradient checkpointing as train does")
    ap.add_argument("--lam", type=float, default=0.1, help="lambda of the shortcut term")
    ap.add_argument("--direction", default="reverse", choices=["reverse", "forward"], help="KL direction")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions, variants interleaved (median)")
    ap.add_argument("--mem-T", type=int, default=4096, help="part 2: positions T")
    ap.add_argument("--mem-V", type=int, default=32000, help="part 2: vocabulary V")
    ap.add_argument("--mem-H", type=int, default=1024, help="part 2: hidden size H")
    ap.add_argument("--loss-chunk", default="1024",
                    help="part 1 and 2: positions per loss chunk (part 2 accepts a comma list)")
    ap.add_argument("--head-trainable", action="store_true", help="part 2: the LM head gets gradients too")
    ap.add_argument("--skip-mem", action="store_true", help="skip part 2")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES),
                    help="model / hidden-state dtype (bfloat16 on GPU; the loss is float32 inside dail.py)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU timings: 1)")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--out", default="runs/bench_train.json", help="where the JSON of results goes")
    ap.add_argument("--mem-worker", default=None, choices=["plain", "chunked"],
                    help="internal: run one part-2 variant in this process and print its JSON")
    ap.add_argument("--mem-chunk", type=int, default=1024, help="internal: the chunk of a chunked worker")
    return ap.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------
# part 1: DAIL step vs SFT step
# ---------------------------------------------------------------------------------------------------
def make_examples(a):
    g = torch.Generator().manual_seed(a.seed)
    rand = lambda n: torch.randint(0, 256, (n,), generator=g).tolist()  # noqa: E731
    examples = []
    for _ in range(a.micro_batch):
        response = rand(a.response_len)
        examples.append({"student": (rand(a.student_len), response),
                         "privileged": (rand(a.privileged_len), response),
                         "shortcut": (rand(a.shortcut_len), response)})
    return examples


def build_model(tok, spec, a, device, dtype):
    from tiny_model import make_model
    hidden, layers, heads, kv, inter = PRESETS[spec] if spec in PRESETS else map(int, spec.split(":"))
    max_len = max(a.student_len, a.privileged_len, a.shortcut_len) + a.response_len
    model = make_model(tok, hidden=hidden, layers=layers, heads=heads, kv_heads=kv, intermediate=inter,
                       seed=a.seed, max_positions=max(2048, max_len))
    if a.lora_rank == 0:
        model = model.to(device=device, dtype=torch.float32)        # full FT keeps fp32 weights, as train
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    else:
        model = model.to(device=device, dtype=dtype)
        model = dail.add_lora(model, LORA_TARGETS.split(","), a.lora_rank, float(a.lora_rank))
        reference = model
    if a.grad_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, reference


def bench_steps(tok, spec, a, device, dtype):
    model, reference = build_model(tok, spec, a, device, dtype)
    n_base = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    examples = make_examples(a)
    num_tokens = sum(len(ex["student"][1]) for ex in examples)
    pad = tok.pad_token_id
    chunk = int(a.loss_chunk.split(",")[0])
    use_autocast = device.type == "cuda" and dtype != torch.float32
    params = [p for p in model.parameters() if p.requires_grad]

    def step(objective):
        args = SimpleNamespace(objective=objective, lam=a.lam, direction=a.direction, loss_chunk=chunk, loss_norm="token")
        for p in params:
            p.grad = None
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
            loss, _ = dail.micro_batch_loss(model, reference, examples, args, num_tokens, pad, device)
        loss.backward()
        sync(device)
        return time.perf_counter() - t0

    def ref_forward(ctx):
        batch = dail.collate([ex[ctx] for ex in examples], pad)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), dail.adapters_off(reference), \
                torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
            dail.response_hidden(reference, batch, device)
        sync(device)
        return time.perf_counter() - t0

    step("dail"), step("sft"), ref_forward("privileged")        # warm-up
    times = {"dail": [], "sft": [], "privileged_fwd": [], "shortcut_fwd": []}
    for _ in range(a.reps):
        times["dail"].append(step("dail"))
        times["sft"].append(step("sft"))
        times["privileged_fwd"].append(ref_forward("privileged"))
        times["shortcut_fwd"].append(ref_forward("shortcut"))
    med = {k: statistics.median(v) for k, v in times.items()}
    ts = a.micro_batch * (a.student_len + a.response_len)
    tp = a.micro_batch * (a.privileged_len + a.response_len)
    tc = a.micro_batch * (a.shortcut_len + a.response_len)
    f = (2 if a.lora_rank else 3) + (1 if a.grad_checkpointing else 0)
    ideal = med["sft"] + med["privileged_fwd"] + med["shortcut_fwd"]
    return dict(model=spec, params=n_base, trainable=n_train, lora_rank=a.lora_rank,
                grad_checkpointing=a.grad_checkpointing, micro_batch=a.micro_batch, loss_chunk=chunk,
                tokens=dict(student=ts, privileged=tp, shortcut=tc, response=num_tokens),
                times_s=times, median_s=med, dail_over_sft=med["dail"] / med["sft"],
                ideal_over_sft=ideal / med["sft"], dail_over_ideal=med["dail"] / ideal,
                flop_floor=(f * ts + tp + tc) / (f * ts), flop_floor_equal_lengths=(f + 2) / f, fwd_bwd_units=f)


# ---------------------------------------------------------------------------------------------------
# part 2: peak memory of the plain and chunked loss (one variant per fresh subprocess)
# ---------------------------------------------------------------------------------------------------
def maxrss_bytes():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024           # Linux reports KiB


def current_rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def mem_worker(a):
    torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    T, V, H = a.mem_T, a.mem_V, a.mem_H
    torch.manual_seed(a.seed)                                  # the head's init: the same in every worker
    g = torch.Generator().manual_seed(a.seed)
    head = torch.nn.Linear(H, V, bias=False).to(device=device, dtype=dtype)
    head.weight.requires_grad_(a.head_trainable)
    h_s, h_e, h_c = (torch.randn(T, H, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    h_s.requires_grad_(True)
    mask = torch.ones(1, T, dtype=torch.bool, device=device)

    def work(h_s=h_s, h_e=h_e, h_c=h_c, mask=mask):
        if a.mem_worker == "plain":
            s_logits = head(h_s)[None]
            with torch.no_grad():
                e_logits, c_logits = head(h_e)[None], head(h_c)[None]
            loss, _ = dail.dail_loss(s_logits, e_logits, c_logits, mask, a.lam, a.direction)
        else:
            loss, _ = dail.chunked_dail_loss(h_s, h_e, h_c, head, head, a.lam, a.direction,
                                             chunk_size=a.mem_chunk)
        loss.backward()
        return float(loss)

    # warm-up on a few positions: first-call imports and set-up (torch.utils.checkpoint pulls in modules
    # worth ~100 MiB of RSS) must not count as the loss's memory
    w = min(16, T)
    work(h_s[:w].detach().requires_grad_(True), h_e[:w], h_c[:w], mask[:, :w])
    head.weight.grad = None
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_gpu = torch.cuda.memory_allocated(device)
    rss_now, base = current_rss_bytes(), maxrss_bytes()
    t0 = time.perf_counter()
    loss = work()
    sync(device)
    dt = time.perf_counter() - t0
    peak = maxrss_bytes()
    # The work's extra peak is peak - rss_now when the process's peak rose during the work (resolved); if
    # it did not (an earlier transient peak, e.g. imports, was higher), only an upper bound is known.
    out = dict(variant=a.mem_worker, chunk=a.mem_chunk if a.mem_worker == "chunked" else None, T=T, V=V, H=H,
               loss=loss, time_s=dt, baseline_maxrss=base, baseline_rss=rss_now, peak_maxrss=peak,
               peak_bytes=peak - (rss_now if rss_now is not None else base), resolved=peak > base,
               measure="ru_maxrss after the work - RSS before it")
    if device.type == "cuda":
        out.update(peak_bytes=torch.cuda.max_memory_allocated(device) - base_gpu,
                   measure="torch.cuda.max_memory_allocated delta")
    print("MEMJSON " + json.dumps(out))


def run_mem_variant(a, variant, chunk):
    cmd = [sys.executable, __file__, "--mem-worker", variant, "--mem-chunk", str(chunk), "--mem-T", str(a.mem_T),
           "--mem-V", str(a.mem_V), "--mem-H", str(a.mem_H), "--device", a.device, "--dtype", a.dtype,
           "--threads", str(a.threads), "--seed", str(a.seed), "--lam", str(a.lam), "--direction", a.direction]
    if a.head_trainable:
        cmd.append("--head-trainable")
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("MEMJSON ")]
    if p.returncode or not line:
        raise SystemExit(f"memory worker {variant} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(line[-1][len("MEMJSON "):])


def main():
    a = parse_args()
    if a.mem_worker:
        return mem_worker(a)
    torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass
    import transformers
    env = dict(device=str(device), dtype=a.dtype, threads=torch.get_num_threads(), torch=torch.__version__,
               transformers=transformers.__version__, cpu_count=os.cpu_count(), reps=a.reps)
    print(f"bench_train: device {device}, dtype {a.dtype}, torch.set_num_threads({torch.get_num_threads()}), "
          f"reps {a.reps} (median, variants interleaved)", flush=True)
    steps = []
    if a.models:
        from tiny_model import make_tokenizer
        tok = make_tokenizer()
        print(f"part 1: micro-batch {a.micro_batch}, prompts student {a.student_len} / privileged "
              f"{a.privileged_len} / shortcut {a.shortcut_len}, response {a.response_len} tokens, LoRA rank "
              f"{a.lora_rank or 'off (full FT)'}, grad checkpointing {a.grad_checkpointing}", flush=True)
        for spec in a.models.split(","):
            r = bench_steps(tok, spec, a, device, dtype)
            steps.append(r)
            m = r["median_s"]
            print(f"  {spec}: {r['params'] / 1e6:.2f}M params ({r['trainable'] / 1e6:.2f}M trainable)  "
                  f"dail {m['dail']:.3f}s  sft {m['sft']:.3f}s  (a)/(b) {r['dail_over_sft']:.2f}  "
                  f"priv fwd {m['privileged_fwd']:.3f}s  short fwd {m['shortcut_fwd']:.3f}s  "
                  f"ideal/(b) {r['ideal_over_sft']:.2f}  flop floor {r['flop_floor']:.2f}", flush=True)
    mems = []
    if not a.skip_mem:
        print(f"part 2: T={a.mem_T}, V={a.mem_V}, H={a.mem_H}, head {'trainable' if a.head_trainable else 'frozen'}",
              flush=True)
        plain = run_mem_variant(a, "plain", 0)
        print(f"  plain:   peak {plain['peak_bytes'] / 2**20:8.0f} MiB  time {plain['time_s']:.2f}s", flush=True)
        for chunk in [int(x) for x in a.loss_chunk.split(",")]:
            ch = run_mem_variant(a, "chunked", chunk)
            ch["ratio_to_plain"] = ch["peak_bytes"] / plain["peak_bytes"]
            mems.append(ch)
            if not (ch["resolved"] and plain["resolved"]):
                print("  warning: a peak did not rise above the pre-work peak (imports); increase T or V")
            print(f"  chunked {chunk}: peak {ch['peak_bytes'] / 2**20:8.0f} MiB  time {ch['time_s']:.2f}s  "
                  f"chunked/plain {ch['ratio_to_plain']:.3f}  |loss diff| {abs(ch['loss'] - plain['loss']):.2e}",
                  flush=True)
        mems.insert(0, plain)

    if steps:
        print("\n| model | params | (a) DAIL step s | (b) SFT step s | (a)/(b) | priv fwd s | short fwd s | "
              "ideal/(b) | (a)/ideal | FLOP floor |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in steps:
            m = r["median_s"]
            print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {m['dail']:.3f} | {m['sft']:.3f} | "
                  f"{r['dail_over_sft']:.2f} | {m['privileged_fwd']:.3f} | {m['shortcut_fwd']:.3f} | "
                  f"{r['ideal_over_sft']:.2f} | {r['dail_over_ideal']:.2f} | {r['flop_floor']:.2f} |")
        ok = all(r["dail_over_sft"] <= 1.8 for r in steps)
        print(f"target (a)/(b) <= 1.8: {'met' if ok else 'NOT met'}")
    if mems:
        print(f"\n| loss (T={a.mem_T}, V={a.mem_V}, H={a.mem_H}) | peak MiB | time s | / plain |")
        print("|---|---|---|---|")
        for m in mems:
            name = "plain dail_loss" if m["variant"] == "plain" else f"chunked_dail_loss (chunk {m['chunk']})"
            print(f"| {name} | {m['peak_bytes'] / 2**20:.0f} | {m['time_s']:.2f} | "
                  f"{m['peak_bytes'] / mems[0]['peak_bytes']:.3f} |")
        ok_mem = all(m["ratio_to_plain"] <= 0.30 for m in mems[1:])
        print(f"target chunked peak <= 30% of plain: {'met' if ok_mem else 'NOT met'}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(env=env, steps=steps, memory=mems), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

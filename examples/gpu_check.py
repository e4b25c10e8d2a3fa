#!/usr/bin/env python
"""A prepared GPU check: what no CPU run can measure, in one command under a global time budget.

    python examples/gpu_check.py --out runs/gpu_check                # on the GPU (default budget 480 s)
    python examples/gpu_check.py --smoke --out /tmp/gpu_check_smoke  # every part on the CPU at toy sizes

No downloads: models have random weights at real shapes, built in-process from Qwen2Config directly on the
device in bf16 (a Qwen2.5-0.5B shape, and a Qwen2.5-7B shape with --layers-7b layers), at the real
vocabulary of 151,936. The tokenizer is the project's offline byte tokenizer (examples/tiny_model.py); the
vocabulary tail beyond it is masked (logits -inf, a forward hook on the LM head) wherever anything samples.
Every part calls the functions `dail.py rewrite|train|eval` call (and the benchmarks' own timing helpers),
never copies of them:

  1. rewrite: dail.decode + mix_step through rollout's `choose` (bench_rewrite.run_a) against
     model.generate sampling the same 2B rows and N tokens (bench_rewrite.run_b), tokens/s and the ratio;
     vLLM sampling of the same rows and tokens when vLLM is importable.
  2. train: a DAIL step (dail.micro_batch_loss + backward; uncached, and with the reference cache) against
     an SFT step, LoRA as `train`, gradient checkpointing, --trace-len response tokens: tokens/s, peak memory
     (torch.cuda.max_memory_allocated), model FLOPs utilization, and the largest micro-batch that fits
     (doubling, OOM caught, bounded by time).
  3. loss: dail's loss in bf16 (autocast, and bf16 weights + autocast as `train` runs) against float32 on
     the same batch (relative error of both KL terms), and the chunked loss's peak memory against the plain
     dail_loss at the real vocabulary (bench_train.mem_worker).
  4. eval: samples/s through dail.make_sampler (the hf engine) and through vLLM when importable, and whether
     both give the same greedy samples and pass@1.
  5. torchrun with 2 processes on one GPU: skipped (not meaningful), and said so.

Each part gets a share of the time left; inside a part, repetitions and sizes that would not fit are
skipped and recorded; a part that overruns its share (plus a grace) is stopped by an alarm. A part that
fails is recorded with its error and traceback, and the next part runs. OUT/gpu_check.json is rewritten
after every measurement; at the end a markdown table is printed and written to OUT/gpu_check.md.
"""
import argparse
import contextlib
import dataclasses
import gc
import io
import json
import os
import platform
import signal
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

START = time.perf_counter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import torch  # noqa: E402

import bench_rewrite  # noqa: E402
import bench_train  # noqa: E402
import dail  # noqa: E402
from tiny_model import make_tokenizer  # noqa: E402

# Qwen2.5 shapes (the published configs); the 7B one gets --layers-7b layers
SHAPES = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=151936, tie_word_embeddings=False),
}
# --smoke: the same two kinds (tied / untied), tiny; vocabulary 512 > the tokenizer's 261, so the mask works
SMOKE_SHAPES = {
    "0.5b": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
    "7b": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
               intermediate_size=192, vocab_size=512, tie_word_embeddings=False),
}
# dense bf16 peak (no sparsity): the MFU denominator; the first name found in the device's name counts
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12}
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
PARTS = ("rewrite", "train", "loss", "eval", "torchrun")
SHARES = dict(rewrite=0.25, train=0.40, loss=0.15, eval=0.20, torchrun=0.0)   # of the time left at each part
OOM = getattr(torch.cuda, "OutOfMemoryError", RuntimeError)


def is_oom(e):
    """An allocation failure, whichever way CUDA reports it (cuBLAS reports its own as a RuntimeError)."""
    return isinstance(e, OOM) or isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED"))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json, gpu_check.md")
    ap.add_argument("--budget-s", type=float, default=480.0, help="global wall-time budget in seconds, start-up "
                                                                  "included (each part gets a share of what is left)")
    ap.add_argument("--grace-s", type=float, default=15.0, help="a part is stopped this long after its share ends")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run, in this order")
    ap.add_argument("--smoke", action="store_true", help="every part on the CPU at toy sizes (under a minute)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    ap.add_argument("--layers-7b", default="8", help="layers of the 7B shape (28 in the real model), or 'auto': "
                                                     "as many as fill a third of the GPU's memory in bf16")
    ap.add_argument("--rewrite-models", default="0.5b,7b", help="shapes the rewrite part times")
    ap.add_argument("--rewrite-batch", type=int, default=32, help="B traces (2B rows: student + privileged)")
    ap.add_argument("--rewrite-tokens", type=int, default=256, help="N new tokens per trace")
    ap.add_argument("--student-len", type=int, default=128, help="student prompt tokens (rewrite, train)")
    ap.add_argument("--privileged-len", type=int, default=512, help="privileged prompt tokens (rewrite, train)")
    ap.add_argument("--shortcut-len", type=int, default=192, help="shortcut prompt tokens (train)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions, variants interleaved (median)")
    ap.add_argument("--train-models", default="7b,0.5b", help="shapes the train part times, in this order")
    ap.add_argument("--trace-len", type=int, default=2048, help="train: response tokens per trace")
    ap.add_argument("--micro-batch", type=int, default=1, help="train: micro-batch of the timed steps")
    ap.add_argument("--max-micro-batch", type=int, default=64, help="train: the doubling search stops here")
    ap.add_argument("--lora-rank", type=int, default=32, help="train: LoRA rank (as `train`'s default)")
    ap.add_argument("--loss-chunk", type=int, default=1024, help="train, loss: positions per loss chunk")
    ap.add_argument("--loss-T", type=int, default=4096, help="loss: positions of the memory comparison")
    ap.add_argument("--eval-problems", type=int, default=8, help="eval: problems (examples/world/test.jsonl)")
    ap.add_argument("--eval-n", type=int, default=16, help="eval: samples per problem")
    ap.add_argument("--eval-tokens", type=int, default=256, help="eval: tokens per sample (no stop tokens)")
    ap.add_argument("--vllm", default="auto", choices=["auto", "off"], help="auto: the vLLM parts run when vLLM "
                                                                          "is importable and a GPU is present")
    ap.add_argument("--work-dir", default=None, help="where model folders for the engines are saved (default: a "
                                                     "temporary folder, removed at the end; never under --out)")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--fail-part", default=None, help="debug: make this part raise at its start (tests the "
                                                      "recording of a failed part)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.device = "cpu"
        a.rewrite_batch, a.rewrite_tokens, a.student_len, a.privileged_len, a.shortcut_len = 2, 8, 12, 24, 16
        a.trace_len, a.max_micro_batch, a.reps, a.loss_T = 24, 4, 2, 64
        a.eval_problems, a.eval_n, a.eval_tokens, a.loss_chunk = 2, 2, 8, 16
        a.vllm = "off"   # vLLM's own tests cover it; starting it costs more than this whole run
    return a


# ----------------------------------------------------------------------------------------------------
# the run: parts under a budget, results written after every measurement
# ----------------------------------------------------------------------------------------------------
class PartTimeout(Exception):
    pass


_ARMED = [False]      # the alarm raises only while a part runs, never inside run_parts' own bookkeeping


def _on_alarm(signum, frame):
    if _ARMED[0]:
        _ARMED[0] = False
        raise PartTimeout("stopped: the part ran past its share of the budget")


LOG = []      # OUT/gpu_check.log, once run_parts knows OUT: every progress line (the console may keep only a tail)


def say(msg):
    line = f"[{time.perf_counter() - START:6.1f}s] {msg}"
    print(line, flush=True)
    if LOG:
        with open(LOG[0], "a") as f:
            f.write(line + "\n")


def run_parts(parts, budget_s, out, env, grace_s=15.0, fail_part=None, start=None, min_share_s=5.0):
    """Run parts [(name, fn(ctx) -> dict)] in order under budget_s seconds (counted from `start`, default the
    script's start), each with a share of the time left (SHARES), stopped by SIGALRM grace_s after it; write
    OUT/gpu_check.json after each part (and ctx.write() after each measurement). A part that raises or overruns
    is recorded (status 'error', error, traceback) and the next one runs. -> (results, markdown table)."""
    start = START if start is None else start
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    LOG[:] = [out / "gpu_check.log"]
    results = dict(env=env, parts={})

    def write():
        tmp = out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(results, indent=2, default=str))
        os.replace(tmp, out / "gpu_check.json")

    for i, (name, fn) in enumerate(parts):
        record = results["parts"][name] = dict(status="running")
        left = budget_s - (time.perf_counter() - start)
        shares = [SHARES.get(n, 0.1) for n, _ in parts[i:]]
        share = max(0.0, left * shares[0] / sum(shares) if sum(shares) > 0 else 0.0)
        t0 = time.perf_counter()
        if shares[0] > 0 and share < min_share_s:
            record.update(status="skipped", skipped=f"no time left in the budget ({left:.0f} s)", seconds=0)
            say(f"part {name}: skipped, no time left")
            write()
            continue
        ctx = SimpleNamespace(deadline=t0 + share, left=lambda t0=t0, share=share: t0 + share - time.perf_counter(),
                              record=record, write=write)
        say(f"part {name}: {share:.0f} s of {left:.0f} s left")
        use_alarm = shares[0] > 0 and hasattr(signal, "setitimer")   # a part with no share is instant
        if use_alarm:
            signal.signal(signal.SIGALRM, _on_alarm)
            signal.setitimer(signal.ITIMER_REAL, share + grace_s)
            _ARMED[0] = True
        try:
            if name == fail_part:
                raise RuntimeError(f"--fail-part {name}: a deliberate failure")
            result = fn(ctx) or {}
            _ARMED[0] = False
            record.update(result)
            record["status"] = "skipped" if "skipped" in result else "ok"
        except BaseException as e:  # noqa: B902 - a timeout or error of one part must not end the run
            _ARMED[0] = False
            if isinstance(e, KeyboardInterrupt):
                raise
            record.update(status="error", error=f"{type(e).__name__}: {str(e)[:500]}",
                          traceback=traceback.format_exc()[-6000:])
            say(f"part {name}: ERROR {record['error']}\n{record['traceback'][-1500:]}")
        finally:
            _ARMED[0] = False
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
        record["seconds"] = round(time.perf_counter() - t0, 2)
        free_memory()
        write()
        say(f"part {name}: {record['status']} in {record['seconds']:.1f} s")
    results["total_s"] = round(time.perf_counter() - start, 2)
    write()
    table = markdown(results)
    (out / "gpu_check.md").write_text(table + "\n")
    return results, table


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


# ----------------------------------------------------------------------------------------------------
# models with random weights at real shapes
# ----------------------------------------------------------------------------------------------------
def shape_of(name, a):
    shape = dict((SMOKE_SHAPES if a.smoke else SHAPES)[name])
    if name == "7b":
        shape["num_hidden_layers"] = a.layers_7b_resolved
    return shape


def layers_for_7b(a, device):
    """--layers-7b: a number, or 'auto': the layers whose bf16 weights (with embeddings and head) fill a third
    of the GPU's memory, at most the real 28."""
    if a.smoke:
        return SMOKE_SHAPES["7b"]["num_hidden_layers"]
    if a.layers_7b != "auto":
        return int(a.layers_7b)
    if device.type != "cuda":
        return 2
    s = SHAPES["7b"]
    h, kv = s["hidden_size"], s["num_key_value_heads"] * s["hidden_size"] // s["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * s["intermediate_size"]
    fixed = 2 * s["vocab_size"] * h
    third = torch.cuda.get_device_properties(device).total_memory / 3 / 2          # bf16: 2 bytes a weight
    return max(1, min(28, int((third - fixed) // per_layer)))


def build_model(name, a, device, dtype, tok, mask_tail=True):
    """A Qwen2 causal LM of the named shape, random weights (std 0.02, as the config's initializer), made on
    `device` in `dtype` directly (no float32 copy on the host, which for billions of weights takes minutes)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(**shape_of(name, a), max_position_embeddings=32768,
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(a.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    cast_weights(model, dtype)        # a no-op here; buffers (RoPE's float32 inv_freq) stay as transformers made them
    model.generation_config.eos_token_id = None          # timed decodes run exactly N tokens
    model.generation_config.pad_token_id = tok.pad_token_id
    if mask_tail:
        mask_vocab_tail(model, len(tok))
    return model


def cast_weights(model, dtype):
    """The parameters to `dtype`, buffers untouched (model.to(dtype) would round RoPE's inv_freq to bf16 too,
    which loading a checkpoint in bf16 does not)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def mask_vocab_tail(model, n):
    """Logits of ids >= n (beyond the tokenizer) become -inf at the LM head's output, so that no sampler
    (decode, generate, the eval sampler) ever draws a token the tokenizer cannot decode."""
    def hook(module, inputs, output):
        output[..., n:] = float("-inf")
        return output
    return model.get_output_embeddings().register_forward_hook(hook)


def forward_params(model):
    """(P, P_head): the weights multiplied in a forward (every parameter but the input embedding table, a
    lookup; a tied table counts once, as the head) and the LM head's share of them."""
    total = sum(p.numel() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    head_w = head.base.weight if isinstance(head, dail.LoRALinear) else head.weight
    tied = emb.data_ptr() == head_w.data_ptr()
    return total - (0 if tied else emb.numel()), head_w.numel()


# ----------------------------------------------------------------------------------------------------
# part 1: rewrite
# ----------------------------------------------------------------------------------------------------
def sampling_args(a):
    return SimpleNamespace(temperature=0.6, top_p=0.95, top_k=20, retries=5, threshold=0.8, seed=a.seed)


def part_rewrite(ctx, a, device, dtype, tok):
    s = sampling_args(a)
    B, N, pad = a.rewrite_batch, a.rewrite_tokens, tok.pad_token_id
    out = dict(setup=dict(traces=B, rows=2 * B, new_tokens=N, student_len=a.student_len,
                          privileged_len=a.privileged_len, threshold=s.threshold, retries=s.retries,
                          temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, reps=a.reps))
    ctx.record.update(out)
    contexts = bench_rewrite.make_contexts(B, a.student_len, a.privileged_len, a.seed)
    for name in a.rewrite_models.split(","):
        key = f"{name}" + (f" ({a.layers_7b_resolved} layers)" if name == "7b" else "")
        if ctx.left() < 10:
            ctx.record[key] = dict(skipped=f"no time left ({ctx.left():.0f} s)")
            continue
        t_build = time.perf_counter()
        model = build_model(name, a, device, dtype, tok).eval()
        row = dict(params=sum(p.numel() for p in model.parameters()), build_s=time.perf_counter() - t_build)
        ctx.record[key] = row
        say(f"rewrite {key}: {row['params'] / 1e6:.0f}M params, built in {row['build_s']:.1f} s")
        # Warm-up at the full length, not timed: on the H200 a short warm-up left the first full decode of the
        # 0.5B shape 3.4x slower than the later ones (20.4 s, then 6.1 and 5.8 s), which made a one-rep figure
        # meaningless. Its time estimates one rep.
        estimate = bench_rewrite.run_a(model, contexts, N, s, pad, device)
        estimate += bench_rewrite.run_b(model, contexts, N, s, pad, device)
        ta, tb = [], []
        for rep in range(a.reps):
            need = (ta[-1] + tb[-1]) if ta else estimate
            if ctx.left() < 1.2 * need + 2:
                row["reps_cut"] = f"{rep} of {a.reps} reps: the next would need ~{need:.0f} s, {ctx.left():.0f} s left"
                break
            ta.append(bench_rewrite.run_a(model, contexts, N, s, pad, device))
            tb.append(bench_rewrite.run_b(model, contexts, N, s, pad, device))
        if ta:
            ma, mb = statistics.median(ta), statistics.median(tb)
            row.update(decode_s=ta, generate_s=tb, decode_tok_per_s=2 * B * N / ma, generate_tok_per_s=2 * B * N / mb,
                       decode_over_generate=ma / mb, trace_tok_per_s=B * N / ma)
            say(f"rewrite {key}: mixed decode {2 * B * N / ma:,.0f} tok/s, generate {2 * B * N / mb:,.0f} tok/s, "
                f"time ratio {ma / mb:.2f}")
        ctx.write()
        if vllm_skip(a, device):
            row["vllm"] = dict(skipped=vllm_skip(a, device))
            del model
            free_memory()
            continue
        folder = save_folder(model, tok, Path(a.work_dir) / f"model_{name}")
        del model
        free_memory()
        try:
            row["vllm"] = vllm_rows(a, folder, tok, [r for g in range(2) for r in (c[g] for c in contexts)], N, s, ctx)
            row["vllm"].pop("outputs")
        except Exception as e:
            row["vllm"] = dict(error=f"{type(e).__name__}: {str(e)[:300]}", traceback=traceback.format_exc()[-3000:])
        if "tok_per_s" in row["vllm"] and "decode_tok_per_s" in row:
            row["decode_over_vllm"] = row["vllm"]["tok_per_s"] / row["decode_tok_per_s"]
        ctx.write()
    return out


def vllm_skip(a, device):
    """Why the vLLM comparison does not run (None: it runs)."""
    if a.vllm == "off":
        return "skipped: --vllm off" + (" (--smoke)" if a.smoke else "")
    if not dail.vllm_available():
        return "skipped: vLLM not importable"
    if device.type != "cuda":
        return "skipped: no GPU"
    return None


def save_folder(model, tok, folder):
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return str(folder)


def eval_namespace(**settings):
    """eval's own arguments (dail.EvalArgs with its defaults, e.g. trust_remote_code) with these settings."""
    return SimpleNamespace(**{**dataclasses.asdict(dail.EvalArgs(model="", data="", out="")), **settings})


def vllm_rows(a, folder, tok, prompts, n_tokens, s, ctx, n=1, temperature=None):
    """vLLM sampling (dail.load_vllm + dail.vllm_sample, as eval) of one sample per prompt row, n_tokens each,
    the vocabulary tail banned. -> dict(seconds, tokens, tok_per_s, outputs)."""
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    args = eval_namespace(model=folder, device="auto", dtype="auto", seed=a.seed, tensor_parallel_size=1,
                           max_model_len=max(len(p) for p in prompts) + n_tokens + 8, gpu_memory_utilization=0.5,
                           temperature=s.temperature if temperature is None else temperature, top_p=s.top_p,
                           top_k=s.top_k, max_new_tokens=n_tokens)
    t0 = time.perf_counter()
    llm = dail.load_vllm(args)
    start_s = time.perf_counter() - t0
    try:
        banned = range(len(tok), vocab)
        dail.vllm_sample(llm, prompts[:2], 1, args, [], [a.seed] * 2, banned, max_tokens=4)      # warm-up
        t0 = time.perf_counter()
        outs = dail.vllm_sample(llm, prompts, n, args, [], [a.seed + i for i in range(len(prompts))], banned)
        dt = time.perf_counter() - t0
    finally:
        dail.close_vllm(llm)
    tokens = sum(len(x["ids"]) for o in outs for x in o)
    return dict(start_s=start_s, seconds=dt, tokens=tokens, tok_per_s=tokens / dt, outputs=outs)


# ----------------------------------------------------------------------------------------------------
# part 2: train
# ----------------------------------------------------------------------------------------------------
def train_examples(a, mb):
    return bench_train.make_examples(SimpleNamespace(seed=a.seed, micro_batch=mb, response_len=a.trace_len,
                                                     student_len=a.student_len, privileged_len=a.privileged_len,
                                                     shortcut_len=a.shortcut_len))


def train_step(model, examples, objective, a, device, dtype, pad, cache=None):
    """One micro-step as `train` runs it: micro_batch_loss under autocast, backward. -> seconds, peak GiB."""
    args = SimpleNamespace(objective=objective, lam=0.1, direction="reverse", loss_chunk=a.loss_chunk,
                           loss_norm="sequence")
    for p in model.parameters():
        p.grad = None
    reset_peak(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and dtype != torch.float32):
        loss, _ = dail.micro_batch_loss(model, model, examples, args, len(examples), pad, device, cache)
    loss.backward()
    sync(device)
    dt = time.perf_counter() - t0
    for p in model.parameters():
        p.grad = None
    return dt, peak_gib(device)


def step_flops(P, P_head, a, mb, objective):
    """Model FLOPs of one step: 6 P T for the student context (forward + backward, the usual convention: it
    counts neither the recomputation of checkpointing nor the weight gradients LoRA skips) and 2 P T for each
    reference forward (DAIL uncached; cached: the reference head alone); the head runs at the response
    positions only. objective: sft | dail | dail_cached."""
    R = mb * a.trace_len

    def ctx_flops(prompt_len, factor):
        return factor * ((P - P_head) * mb * (prompt_len + a.trace_len) + P_head * R)
    flops = ctx_flops(a.student_len, 6)
    if objective == "dail":
        flops += ctx_flops(a.privileged_len, 2) + ctx_flops(a.shortcut_len, 2)
    if objective == "dail_cached":                   # the reference head still runs on the cached states
        flops += 2 * 2 * P_head * R
    return flops


def part_train(ctx, a, device, dtype, tok, peak_flops):
    pad = tok.pad_token_id
    out = dict(setup=dict(trace_len=a.trace_len, student_len=a.student_len, privileged_len=a.privileged_len,
                          shortcut_len=a.shortcut_len, lora_rank=a.lora_rank, grad_checkpointing=True,
                          micro_batch=a.micro_batch, loss_chunk=a.loss_chunk, reps=a.reps,
                          peak_flops=peak_flops, flops="6 P T student + 2 P T per reference forward; P = weights "
                                                      "multiplied (all but the input embedding)",
                          no_optimizer_step="AdamW's step on the LoRA weights is not timed"))
    ctx.record.update(out)
    for name in a.train_models.split(","):
        key = f"{name}" + (f" ({a.layers_7b_resolved} layers)" if name == "7b" else "")
        if ctx.left() < 15:
            ctx.record[key] = dict(skipped=f"no time left ({ctx.left():.0f} s)")
            continue
        model = build_model(name, a, device, dtype, tok, mask_tail=False)
        model = dail.add_lora(model, LORA_TARGETS.split(","), a.lora_rank, float(a.lora_rank))
        model.config.use_cache = False                                # as dail.build_models does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        P, P_head = forward_params(model)
        row = dict(params=sum(p.numel() for p in model.parameters()), forward_params=P,
                   trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
        ctx.record[key] = row
        try:
            measure_train(ctx, row, model, a, device, dtype, pad, P, P_head, peak_flops)
        finally:
            del model
            free_memory()
        ctx.write()
    return out


def measure_train(ctx, row, model, a, device, dtype, pad, P, P_head, peak_flops):
    mb = a.micro_batch
    examples = train_examples(a, mb)
    cache = dail.new_reference_cache("memory")
    variants = {"dail": lambda: train_step(model, examples, "dail", a, device, dtype, pad),
                "dail_cached": lambda: train_step(model, examples, "dail", a, device, dtype, pad, cache),
                "sft": lambda: train_step(model, examples, "sft", a, device, dtype, pad)}
    warm = {k: f()[0] for k, f in variants.items()}             # warm-up; dail_cached's first call fills the cache
    times, peaks = {k: [] for k in variants}, {}
    for rep in range(a.reps):
        need = sum(statistics.median(v) for v in times.values()) if rep else sum(warm.values())
        if ctx.left() < 1.2 * need + 5:
            row["reps_cut"] = f"{rep} of {a.reps} reps (~{need:.0f} s each, {ctx.left():.0f} s left)"
            break
        for k, f in variants.items():
            dt, peak = f()
            times[k].append(dt)
            peaks[k] = peak
    response_tokens = mb * a.trace_len
    for k, v in times.items():
        if not v:
            continue
        med = statistics.median(v)
        flops = step_flops(P, P_head, a, mb, k)
        row[k] = dict(step_s=v, median_s=med, tok_per_s=response_tokens / med, peak_gib=peaks.get(k),
                      model_tflops_per_s=flops / med / 1e12, mfu=flops / med / peak_flops if peak_flops else None)
    if times["sft"]:
        sft = statistics.median(times["sft"])
        row["dail_over_sft"] = statistics.median(times["dail"]) / sft
        row["cached_over_sft"] = statistics.median(times["dail_cached"]) / sft
        say(f"train: DAIL {row['dail']['median_s']:.3f} s, cached {row['dail_cached']['median_s']:.3f} s, SFT "
            f"{sft:.3f} s per micro-batch of {mb} x {a.trace_len} tokens; peak {row['dail']['peak_gib']} GiB; "
            f"MFU {row['dail']['mfu'] or 0:.1%}")
    ctx.write()
    # the largest micro-batch a DAIL step (uncached: the most memory) fits, doubling until OOM or out of time
    search, last = [], statistics.median(times["dail"]) if times["dail"] else warm["dail"]
    size, largest, stop = 2 * mb, mb, f"reached --max-micro-batch {a.max_micro_batch}"
    row["micro_batch_search"] = dict(largest_fitting=largest, sizes=search)     # kept as it grows (a timeout)
    while size <= a.max_micro_batch:
        if ctx.left() < 2.5 * last + 5:
            stop = f"time: the next size needs ~{2.2 * last:.0f} s, {ctx.left():.0f} s left"
            break
        oom = None
        try:
            dt, peak = train_step(model, train_examples(a, size), "dail", a, device, dtype, pad)
        except Exception as e:
            if not is_oom(e):
                raise
            oom = f"out of memory at {size}: {str(e).splitlines()[0][:160]}"
        if oom:                                    # after the except block: its frames (and tensors) are gone
            stop = oom
            for p in model.parameters():
                p.grad = None
            free_memory()
            break
        search.append(dict(micro_batch=size, step_s=dt, tok_per_s=size * a.trace_len / dt, peak_gib=peak,
                           mfu=step_flops(P, P_head, a, size, "dail") / dt / peak_flops if peak_flops else None))
        say(f"train: micro-batch {size} fits: {dt:.2f} s, {size * a.trace_len / dt:,.0f} tok/s, peak {peak} GiB")
        largest, last = size, dt
        row["micro_batch_search"]["largest_fitting"] = largest
        size *= 2
        ctx.write()
    row["micro_batch_search"]["stopped"] = stop


# ----------------------------------------------------------------------------------------------------
# part 3: the loss's precision and memory
# ----------------------------------------------------------------------------------------------------
def part_loss(ctx, a, device, dtype, tok):
    pad = tok.pad_token_id
    out = {}
    ctx.record["precision"] = out
    # (a) the same batch in float32, in bf16 autocast (float32 weights), in bf16 weights + autocast (train's way)
    model = build_model("0.5b", a, device, torch.float32, tok, mask_tail=False).eval()
    examples = train_examples(a, 1)
    args = SimpleNamespace(objective="dail", lam=0.1, direction="reverse", loss_chunk=a.loss_chunk,
                           loss_norm="sequence")

    def terms(autocast):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            _, stats = dail.micro_batch_loss(model, model, examples, args, 1, pad, device)
        return stats
    ref = terms(False)
    variants = {"bf16_autocast": terms(True)}
    cast_weights(model, torch.bfloat16)
    variants["bf16_weights_autocast"] = terms(True)
    del model
    free_memory()
    out.update(setup=dict(model="0.5b", tokens=a.trace_len, float32=ref))
    for k, st in variants.items():
        out[k] = dict(values=st, **{f"rel_err_{t}": abs(st[t] - ref[t]) / abs(ref[t]) if ref[t] else None
                                    for t in ("kl_teacher", "kl_shortcut")})
    say("loss: " + ", ".join(f"{k}: KL teacher rel err {v['rel_err_kl_teacher']:.2e}, shortcut "
                             f"{v['rel_err_kl_shortcut']:.2e}" for k, v in out.items() if k != "setup"))
    ctx.write()
    # (b) peak memory of the plain and the chunked loss at the real vocabulary, bench_train's worker in-process
    V, H = shape_of("7b", a)["vocab_size"], shape_of("7b", a)["hidden_size"]
    mem = dict(T=a.loss_T, V=V, H=H, chunk=a.loss_chunk)
    ctx.record["memory"] = mem
    for variant in ("plain", "chunked"):
        if ctx.left() < 5:
            mem[variant] = dict(skipped=f"no time left ({ctx.left():.0f} s)")
            continue
        ns = SimpleNamespace(threads=torch.get_num_threads(), device=str(device),
                             dtype="bfloat16" if device.type == "cuda" else "float32", mem_T=a.loss_T, mem_V=V,
                             mem_H=H, seed=a.seed, head_trainable=False, mem_worker=variant, lam=0.1,
                             direction="reverse", mem_chunk=a.loss_chunk)
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                bench_train.mem_worker(ns)
            line = [x for x in buf.getvalue().splitlines() if x.startswith("MEMJSON ")][-1]
            mem[variant] = json.loads(line[len("MEMJSON "):])
        except Exception as e:
            if not is_oom(e):
                raise
            mem[variant] = dict(oom=str(e).splitlines()[0][:200])
        free_memory()
        ctx.write()
    if "peak_bytes" in mem.get("plain", {}) and "peak_bytes" in mem.get("chunked", {}):
        mem["chunked_over_plain"] = mem["chunked"]["peak_bytes"] / mem["plain"]["peak_bytes"]
        say(f"loss: peak plain {mem['plain']['peak_bytes'] / 2**20:,.0f} MiB, chunked "
            f"{mem['chunked']['peak_bytes'] / 2**20:,.0f} MiB ({mem['chunked_over_plain']:.3f})")
    return {}


# ----------------------------------------------------------------------------------------------------
# part 4: eval
# ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def masked_loads(n):
    """dail.load_model, as make_sampler calls it, with the vocabulary tail masked on the loaded model."""
    original = dail.load_model

    def load(*args, **kw):
        model = original(*args, **kw)
        mask_vocab_tail(model, n)
        return model
    dail.load_model = load
    try:
        yield
    finally:
        dail.load_model = original


def eval_args(a, folder, temperature, n):
    return eval_namespace(model=folder, device=str(a.device_resolved), dtype="auto", seed=a.seed, thinking=False,
                           no_force_answer=True, engine="hf", n=n, temperature=temperature, top_p=0.95, top_k=0,
                           presence_penalty=1.5, max_new_tokens=a.eval_tokens, answer_tokens=16,
                           batch_size=a.eval_problems * n, tensor_parallel_size=1, gpu_memory_utilization=0.5,
                           max_model_len=None)


def hf_samples(a, folder, tok, prompts, pids, temperature, n):
    """dail.make_sampler('hf') as eval builds it (stop tokens off: every sample is --eval-tokens long)."""
    args = eval_args(a, folder, temperature, n)
    with masked_loads(len(tok)):
        sampler = dail.make_sampler("hf", args, tok, [])
    try:
        args.max_new_tokens = 4
        sampler(prompts[:1], [a.seed], pids[:1])                                      # warm-up
        args.max_new_tokens = a.eval_tokens
        t0 = time.perf_counter()
        outs = sampler(prompts, [a.seed + i for i in range(len(prompts))], pids)
        sync(a.device_resolved)
        dt = time.perf_counter() - t0
    finally:
        sampler.close()
    samples = sum(len(o) for o in outs)
    tokens = sum(len(s["ids"]) for o in outs for s in o)
    return dict(seconds=dt, samples=samples, tokens=tokens, samples_per_s=samples / dt, tok_per_s=tokens / dt), outs


def pass_at_1(tok, outs, problems):
    correct = [[dail.grade(tok.decode(s["ids"], skip_special_tokens=False), p["answer"])[1] for s in o]
               for o, p in zip(outs, problems)]
    return sum(dail.pass_at_k(len(c), sum(c), 1) for c in correct) / len(correct)


def part_eval(ctx, a, device, dtype, tok):
    problems = dail.load_problems(str(ROOT / "examples" / "world" / "test.jsonl"), need_solution=False,
                                  need_answer=True)[:a.eval_problems]
    prompts = [dail.eval_prompt_ids(tok, p, False, None) for p in problems]
    pids = [p["id"] for p in problems]
    model = build_model("0.5b", a, device, dtype, tok, mask_tail=False)
    folder = save_folder(model, tok, Path(a.work_dir) / "model_0.5b_eval")
    del model
    free_memory()
    out = dict(setup=dict(model="0.5b", problems=len(problems), n=a.eval_n, tokens=a.eval_tokens, top_p=0.95,
                          temperature=0.6, presence_penalty=1.5))
    ctx.record.update(out)
    hf, _ = hf_samples(a, folder, tok, prompts, pids, 0.6, a.eval_n)
    ctx.record["hf"] = hf
    say(f"eval: hf engine {hf['samples_per_s']:.1f} samples/s ({hf['tok_per_s']:,.0f} tok/s)")
    ctx.write()
    why = vllm_skip(a, device)
    if why:
        ctx.record["vllm"] = dict(skipped=why)
        ctx.record["greedy_same"] = dict(skipped=why)
        return {}
    s = SimpleNamespace(temperature=0.6, top_p=0.95, top_k=0)
    rows = [p for p in prompts for _ in range(a.eval_n)]
    v = vllm_rows(a, folder, tok, rows, a.eval_tokens, s, ctx)
    v.pop("outputs")
    v["samples_per_s"] = len(rows) / v["seconds"]
    ctx.record["vllm"] = v
    ctx.write()
    if ctx.left() < 10:
        ctx.record["greedy_same"] = dict(skipped=f"no time left ({ctx.left():.0f} s)")
        return {}
    _, hf_greedy = hf_samples(a, folder, tok, prompts, pids, 0.0, 1)
    vg = vllm_rows(a, folder, tok, prompts, a.eval_tokens, s, ctx, temperature=0.0)["outputs"]
    same = [h[0]["ids"] == g[0]["ids"] for h, g in zip(hf_greedy, vg)]
    ctx.record["greedy_same"] = dict(identical_samples=sum(same), of=len(same),
                                     pass_at_1_hf=pass_at_1(tok, hf_greedy, problems),
                                     pass_at_1_vllm=pass_at_1(tok, vg, problems))
    return {}


def part_torchrun(ctx, a, device, dtype, tok):
    return dict(skipped="skipped: torchrun with 2 processes on one GPU is not meaningful (both ranks share one "
                        "card: no speed-up, and two copies of the model in its memory); the multi-process paths "
                        "are covered by the CPU tests with the gloo backend")


# ----------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------
def _f(x, fmt="{:,.0f}"):
    return "-" if x is None else fmt.format(x)


def markdown(results):
    env, parts = results["env"], results["parts"]
    mem = f", {env['memory_gib']} GiB" if env.get("memory_gib") else ""
    lines = [f"gpu_check on {env.get('device_name')} ({env.get('device')}{mem}), torch {env.get('torch')}, transformers "
             f"{env.get('transformers')}, {results.get('total_s', 0):.0f} s of a {env.get('budget_s'):.0f} s budget",
             "", "| part | model | result |", "|---|---|---|"]

    def skip_or_error(rec):
        return rec.get("skipped") or (f"ERROR {rec['error']}" if "error" in rec else None)

    for part, rec in parts.items():
        if rec.get("status") in ("error", "skipped") or "skipped" in rec:
            lines.append(f"| {part} | | {skip_or_error(rec) or rec.get('status')} |")
            if rec.get("status") != "error":
                continue
        for key, row in rec.items():
            if not isinstance(row, dict) or key in ("setup",):
                continue
            text = skip_or_error(row)
            if text:
                lines.append(f"| {part} | {key} | {text} |")
                continue
            if part == "rewrite" and "decode_tok_per_s" in row:
                st = rec["setup"]
                v = row.get("vllm", {})
                vtext = (f"vLLM {v['tok_per_s']:,.0f} tok/s (mixed decode / vLLM speed "
                         f"{row.get('decode_over_vllm', 0):.2f})" if "tok_per_s" in v else
                         f"vLLM: {v.get('skipped') or v.get('error')}")
                lines.append(f"| rewrite | {key} | mixed decode {row['decode_tok_per_s']:,.0f} tok/s vs generate "
                             f"{row['generate_tok_per_s']:,.0f} tok/s: time ratio {row['decode_over_generate']:.2f} "
                             f"({st['traces']} traces = {st['rows']} rows x {st['new_tokens']} tokens, tau "
                             f"{st['threshold']}); {vtext} |")
            elif part == "train" and "dail" in row:
                d, c, s_ = row["dail"], row["dail_cached"], row["sft"]
                ms = row.get("micro_batch_search", {})
                lines.append(
                    f"| train | {key} | per micro-batch of {rec['setup']['micro_batch']} x {rec['setup']['trace_len']} "
                    f"tokens: DAIL {d['median_s']:.3f} s ({d['tok_per_s']:,.0f} tok/s, peak {_f(d['peak_gib'], '{}')} "
                    f"GiB, MFU {_f(d['mfu'], '{:.1%}')}), cached {c['median_s']:.3f} s, SFT {s_['median_s']:.3f} s "
                    f"(MFU {_f(s_['mfu'], '{:.1%}')}); DAIL/SFT {row['dail_over_sft']:.2f}, cached/SFT "
                    f"{row['cached_over_sft']:.2f}; largest micro-batch {ms.get('largest_fitting')} "
                    f"({ms.get('stopped', 'search not finished')}) |")
            elif part == "loss" and key == "precision":
                for k in ("bf16_autocast", "bf16_weights_autocast"):
                    if k in row:
                        lines.append(f"| loss | 0.5b | {k}: relative error of KL(teacher) "
                                     f"{_f(row[k]['rel_err_kl_teacher'], '{:.1e}')}, KL(shortcut) "
                                     f"{_f(row[k]['rel_err_kl_shortcut'], '{:.1e}')} against float32 |")
            elif part == "loss" and key == "memory":
                p, c = row.get("plain", {}), row.get("chunked", {})
                ptxt = (f"{p['peak_bytes'] / 2**20:,.0f} MiB" if "peak_bytes" in p else
                        p.get("oom") and "out of memory" or p.get("skipped"))
                ctxt = f"{c['peak_bytes'] / 2**20:,.0f} MiB" if "peak_bytes" in c else c.get("skipped") or c.get("oom")
                lines.append(f"| loss | T={row['T']}, V={row['V']}, H={row['H']} | peak memory: plain dail_loss {ptxt}, "
                             f"chunked_dail_loss (chunk {row['chunk']}) {ctxt}; ratio "
                             f"{_f(row.get('chunked_over_plain'), '{:.3f}')} |")
            elif part == "eval" and key in ("hf", "vllm") and "samples_per_s" in row:
                st = rec["setup"]
                lines.append(f"| eval | {key} engine | {row['samples_per_s']:.1f} samples/s, {row['tok_per_s']:,.0f} "
                             f"tok/s ({st['problems']} problems x {st['n']} samples x {st['tokens']} tokens) |")
            elif part == "eval" and key == "greedy_same" and "of" in row:
                lines.append(f"| eval | greedy | {row['identical_samples']}/{row['of']} identical samples; pass@1 hf "
                             f"{row['pass_at_1_hf']:.3f}, vLLM {row['pass_at_1_vllm']:.3f} |")
            elif part in ("rewrite", "train") and "params" in row:      # a model whose timing did not happen
                lines.append(f"| {part} | {key} | no timed run: {row.get('reps_cut') or rec.get('error') or 'see JSON'} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
def environment(a, device):
    import transformers
    env = dict(device=str(device), torch=torch.__version__, transformers=transformers.__version__,
               python=platform.python_version(), cpu_count=os.cpu_count(), smoke=a.smoke, budget_s=a.budget_s,
               layers_7b=a.layers_7b_resolved, args=dict(vars(a)), vllm_importable=dail.vllm_available())
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        env.update(device_name=name, memory_gib=round(prop.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   peak_bf16_flops=peak, peak_note="dense bf16 peak (H100/H200 SXM 989, H100 NVL 835, H100 PCIe 756 "
                                                   "TFLOP/s)" if peak else f"no known peak for {name}: MFU is None")
    else:
        env.update(device_name=f"CPU ({platform.processor() or platform.machine()})", peak_bf16_flops=None)
    return env


def main(argv=None):
    a = parse_args(argv)
    if a.smoke:
        torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)      # deprecation notes would fill the log tail
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)
    a.device_resolved = device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a.layers_7b_resolved = layers_for_7b(a, device)
    env = environment(a, device)
    say(f"gpu_check: {env['device_name']}, {dtype}, 7B shape with {a.layers_7b_resolved} layers, budget "
        f"{a.budget_s:.0f} s, vLLM {'importable' if env['vllm_importable'] else 'not importable'}")
    tok = make_tokenizer()
    own_work_dir = a.work_dir is None
    a.work_dir = a.work_dir or tempfile.mkdtemp(prefix="gpu_check_")
    fns = dict(rewrite=lambda c: part_rewrite(c, a, device, dtype, tok),
               train=lambda c: part_train(c, a, device, dtype, tok, env["peak_bf16_flops"]),
               loss=lambda c: part_loss(c, a, device, dtype, tok),
               eval=lambda c: part_eval(c, a, device, dtype, tok),
               torchrun=lambda c: part_torchrun(c, a, device, dtype, tok))
    names = [n for n in a.parts.split(",") if n]
    bad = [n for n in names if n not in fns]
    if bad:
        raise SystemExit(f"--parts: unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}")
    try:
        results, table = run_parts([(n, fns[n]) for n in names], a.budget_s, a.out, env, a.grace_s, a.fail_part)
    finally:
        if own_work_dir:
            shutil.rmtree(a.work_dir, ignore_errors=True)
    print("\n" + table, flush=True)
    print(f"\nwrote {Path(a.out) / 'gpu_check.json'} and {Path(a.out) / 'gpu_check.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

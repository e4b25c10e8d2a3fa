"""Train the shortcut world's base model: examples/shortcut_world/model/.

    OMP_NUM_THREADS=1 python examples/shortcut_world/shortcut_base.py [--steps N --seed 0]
    python examples/shortcut_world/shortcut_base.py --measure-only      # re-measure the saved model's leap rates

Warm-started from the tiny world's base model (examples/world/model: same size, same tokenizer), then trained
on the tiny world's synthetic data (examples/world/train_base.py) with one change, the leaps of shortcut.py:
  * student prompt    -> brute force on easy exponents, as before (it never sees the answer: no leaps)
  * privileged prompt -> the trick in the model's own format; with an expert write-up shown (the answer is
                         in its \\boxed{}) a trace leaps at shortcut.PRIVILEGED_RATES, with an idea-only
                         reference (no answer to copy) never
  * shortcut prompt   -> the same format, leaping at shortcut.SHORTCUT_RATES (it was told the answer)
Every prompt is built by dail.build_contexts at run time, so the model learns the prompts dail.py uses now.
The held-out problems (examples/world/expert.jsonl and test.jsonl) never appear, in any context.

Then it *measures* what it learned (train_report.json, "leaps"): it samples one trace per held-out test
problem from each context and classifies it with shortcut.classify, at temperature 1 (the model's own
distribution) and at the rewrite's sampling settings (temperature 0.6, top-p 0.95, top-k 20).
"""
import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WORLD = ROOT / "examples" / "world"
sys.path[:0] = [str(ROOT), str(HERE), str(WORLD)]

import torch  # noqa: E402

import dail  # noqa: E402
import shortcut  # noqa: E402
import world  # noqa: E402

_spec = importlib.util.spec_from_file_location("world_train_base", WORLD / "train_base.py")
world_train_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(world_train_base)   # the tiny world's encode / batch_tensors / greedy_accuracy


def sample_example(rng, held_out):
    """(context name, problem dict for dail.build_contexts, response text) of one training example."""
    u = rng.random()
    if u < 0.25:                                    # student prompt: brute force on an easy exponent
        a, n = rng.choice(world.BASES), rng.choice(world.EASY_N)
        ref = world.expert_solution(a, n, rng) if rng.random() < 0.6 else world.idea_only(a, n, rng)
        kind, response = "student", world.brute_force(a, n)
    else:
        while True:
            a, n = rng.choice(world.BASES), rng.choice(world.HARD_N)
            if (a, n) not in held_out:
                break
        expert_shown = rng.random() < 0.6
        ref = world.expert_solution(a, n, rng) if expert_shown else world.idea_only(a, n, rng)
        if u < 0.75:                                # privileged: leaps only when the answer is visible
            kind = "privileged"
            leap = shortcut.sample_leap(shortcut.PRIVILEGED_RATES, rng) if expert_shown else None
        else:                                       # shortcut: the hint always states the answer
            kind, leap = "shortcut", shortcut.sample_leap(shortcut.SHORTCUT_RATES, rng)
        response = shortcut.leap_trace(a, n, leap, rng)
    problem = dict(where="train", problem=world.problem_text(a, n), solution=ref, answer=str(world.answer(a, n)))
    return kind, problem, response


@torch.no_grad()
def sample_traces(model, tok, problems, kind, temperature, top_p, top_k, seed, max_new_tokens=160):
    """One sampled response per (a, n, reference) from `kind`'s prompt (dail.build_contexts, dail.decode)."""
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    gen = torch.Generator().manual_seed(seed)
    ctx = [[dail.build_contexts(tok, dict(where="measure", problem=world.problem_text(a, n), solution=ref,
                                          answer=str(world.answer(a, n))), False, None, (kind,))[kind]]
           for a, n, ref in problems]

    def choose(logits, step, rows):  # one generator, as when the recorded rates were measured
        probs = dail.sampling_probs(logits[0], temperature, top_p, top_k)
        return torch.multinomial(probs, 1, generator=gen).squeeze(1), None
    texts = []
    for i in range(0, len(ctx), 100):
        res = dail.decode(model, ctx[i:i + 100], choose, max_new_tokens, [eot], tok.pad_token_id)
        texts += [tok.decode(r["ids"]) if r["finish_reason"] == "stop" else tok.decode(r["ids"]) + "<cut>"
                  for r in res]
    return texts


SAMPLING = dict(own=(1.0, 1.0, 0), rewrite=(0.6, 0.95, 20))   # (temperature, top-p, top-k)


def measure_leaps(model, tok, seed=0, settings=tuple(SAMPLING)):
    """Leap rates of the model's own traces on the 200 held-out test problems, per context and sampling:
    {"<context>@<setting>": shortcut.leap_rates(...)}."""
    model.eval()
    rng = random.Random(seed)
    test = world.split()[1]
    with_expert = [(a, n, world.expert_solution(a, n, rng)) for a, n in test]
    idea = [(a, n, world.idea_only(a, n, rng)) for a, n in test]
    out = {}
    for setting in settings:
        temp, top_p, top_k = SAMPLING[setting]
        for name, kind, probs in (("privileged_expert", "privileged", with_expert),
                                  ("privileged_idea_only", "privileged", idea),
                                  ("shortcut", "shortcut", with_expert)):
            texts = sample_traces(model, tok, probs, kind, temp, top_p, top_k, seed)
            labels = [shortcut.classify(t, a, n)[0] for t, (a, n, _) in zip(texts, probs)]
            out[f"{name}@{setting}"] = shortcut.leap_rates(labels)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "model"))
    ap.add_argument("--init", default=str(WORLD / "model"), help="warm start: the tiny world's base model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--measure-only", action="store_true", help="only re-measure the model in --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = Path(args.out)
    if args.measure_only:
        tok = AutoTokenizer.from_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(out)
        report = json.loads((out / "train_report.json").read_text())
        report["leaps"] = measure_leaps(model, tok)
        (out / "train_report.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report["leaps"], indent=1))
        return
    rng = random.Random(args.seed)
    expert, test = world.split()
    held_out = set(expert) | set(test)
    tok = AutoTokenizer.from_pretrained(args.init)
    model = AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"warm start from {args.init}: {n_params / 1e6:.2f}M parameters", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    t0, tokens, log = time.time(), 0, []
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (
            0.5 * (1 + math.cos(math.pi * max(0, step - args.warmup) / max(1, args.steps - args.warmup))))
        for g in opt.param_groups:
            g["lr"] = lr
        pairs = [world_train_base.encode(tok, *sample_example(rng, held_out), eot) for _ in range(args.batch)]
        ids, mask, labels = world_train_base.batch_tensors(pairs, tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
        if step % 25 == 0 or step == args.steps - 1:
            el = time.time() - t0
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}  {tokens / el:.0f} tok/s  {el:.0f}s",
                  flush=True)
            log.append(dict(step=step, loss=loss.item(), lr=lr, seconds=el))
    train_s = time.time() - t0

    probe = random.Random(7).sample(test, 64)
    report = dict(seed=args.seed, steps=args.steps, batch=args.batch, lr=args.lr, params=n_params,
                  warm_start=str(Path(args.init).relative_to(ROOT)) if Path(args.init).is_relative_to(ROOT)
                  else args.init,
                  rates=dict(privileged_expert_shown=shortcut.PRIVILEGED_RATES, shortcut=shortcut.SHORTCUT_RATES),
                  train_seconds=round(train_s, 1), train_tokens=tokens,
                  greedy_privileged_test64=world_train_base.greedy_accuracy(model, tok, probe, "privileged", 200, eot),
                  greedy_student_test64=world_train_base.greedy_accuracy(model, tok, probe, "student", 200, eot),
                  greedy_student_easy=world_train_base.greedy_accuracy(
                      model, tok, [(a, n) for a in world.BASES[:8] for n in world.EASY_N], "student", 200, eot),
                  args=vars(args), log=log)
    t1 = time.time()
    report["leaps"] = measure_leaps(model, tok)
    report["measure_seconds"] = round(time.time() - t1, 1)
    print(json.dumps({k: v for k, v in report.items() if k not in ("log", "args")}, indent=1))
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = eot
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    for extra in ("chat_template.jinja",):      # the tokenizer folder as the tiny world ships it
        if (Path(args.init) / extra).exists() and not (out / extra).exists():
            shutil.copy(Path(args.init) / extra, out / extra)
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""DAIL in a tiny world, end to end on a CPU in minutes: rewrite -> train -> eval through the real CLI.

    pip install -r requirements.txt matplotlib pytest && python examples/quickstart.py   # one seed (timings: README)
    python examples/quickstart.py --seeds 0,1,2                                  # mean +- std over 3 seeds
    python examples/quickstart.py --small --out runs/qs_small                   # smoke run: 166 s, shared 2-core CPU, 2 threads

The world (examples/world/world.py): "Find the sum of the last digits of 17^1, 17^2, ..., 17^83."
The shipped base model (examples/world/model, ~1M parameters, trained by examples/world/train_base.py)
solves such problems by brute force, one power per line, so on the held-out exponents (20..99) it runs out
of tokens. Expert solutions (examples/world/expert.jsonl) state the trick (the last digits are periodic)
in one terse LaTeX sentence that skips the steps a 1M-parameter model needs. Shown such a solution, the
base model writes the periodicity procedure step by step in its own format.

Every step is a subprocess `python dail.py ...` (nothing here reimplements the method):
  rewrite   the expert solutions into the model's own traces (student proposes, privileged validates)
  train     four models from the same base, same optimiser settings:
              sft-expert   --objective sft --sft-target expert   (SFT on the raw expert solutions)
              sft-trace    --objective sft --sft-target trace    (SFT on the rewritten traces)
              dail-lam0    --objective dail --lam 0              (DAIL without the contrastive term)
              dail         --objective dail                      (DAIL, lambda = 0.1)
  eval      the base model and the four trained ones on examples/world/test.jsonl (held out)
Then a table (pass@1, pass@n, mean response tokens; mean +- std over seeds), OUT/passk.png and
OUT/summary.json. Finished steps are skipped when the command is rerun with the same settings.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORLD = ROOT / "examples" / "world"
METHODS = [  # name, label, train flags (None: the base model itself)
    ("base", "base model", None),
    ("sft-expert", "SFT on expert solutions", ["--objective", "sft", "--sft-target", "expert"]),
    ("sft-trace", "SFT on rewritten traces", ["--objective", "sft", "--sft-target", "trace"]),
    ("dail-lam0", "DAIL, lambda = 0", ["--objective", "dail", "--lam", "0"]),
    ("dail", "DAIL (lambda = 0.1)", ["--objective", "dail"]),
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    ap.add_argument("--seed", type=int, default=0, help="seed of rewrite, training and eval sampling")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (overrides --seed), e.g. 0,1,2")
    ap.add_argument("--model", default=str(WORLD / "model"), help="base model folder")
    ap.add_argument("--expert", default=str(WORLD / "expert.jsonl"), help="expert solutions (JSONL)")
    ap.add_argument("--test", default=str(WORLD / "test.jsonl"), help="held-out problems (JSONL)")
    ap.add_argument("--problems", type=int, default=None, help="use only the first N expert problems")
    ap.add_argument("--test-problems", type=int, default=None, help="use only the first N test problems")
    ap.add_argument("--steps", type=int, default=None, help="cap every training run at N optimizer steps")
    ap.add_argument("--small", action="store_true",
                    help="smoke run: 4 expert problems, 4 test problems, 2 training steps, n=2, 2 rewrite samples")
    # the settings of the world (the same for every method)
    ap.add_argument("--samples", type=int, default=4, help="rewrite: traces decoded per expert problem")
    ap.add_argument("--max-new-tokens", type=int, default=160, help="rewrite and eval token budget")
    ap.add_argument("--n", type=int, default=8, help="eval: samples per test problem")
    ap.add_argument("--epochs", type=int, default=4, help="train: passes over the training set")
    ap.add_argument("--lr", type=float, default=2e-3, help="train: peak learning rate (all methods)")
    ap.add_argument("--lora-rank", type=int, default=16, help="train: LoRA rank (all methods)")
    # 1 thread: a ~1M-parameter model gains little from a second core and loses 4-7x when another process
    # wants it (measured: 1,493 s with 2 threads vs 321 s with 1 on a loaded 2-core machine; 236 s vs 308 s quiet)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of each subprocess (OMP_NUM_THREADS; 0: torch's choice; default: 1)")
    args = ap.parse_args(argv)
    if args.small:
        args.problems = args.problems or 4
        args.test_problems = args.test_problems or 4
        args.steps = args.steps or 2
        args.n, args.samples = 2, 2
    args.seed_list = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    return args


def run(cmd, log, env):
    """One `python dail.py ...` subprocess; its output goes to `log`; a failure stops the quickstart."""
    t0 = time.time()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if rc != 0:
        tail = Path(log).read_text().splitlines()[-15:]
        sys.exit(f"quickstart: failed (exit {rc}): {' '.join(cmd)}\n  " + "\n  ".join(tail))
    return time.time() - t0


def head_jsonl(src, dst, n):
    """The first n lines of a JSONL file (all lines when n is None) -> dst; returns dst."""
    lines = [x for x in Path(src).read_text().split("\n") if x.strip()]
    Path(dst).write_text("\n".join(lines[:n] if n else lines) + "\n")
    return dst


def pipeline(args, seed, out, env):
    """rewrite -> 4 trainings -> 5 evals for one seed; returns {method: eval summary} and step timings."""
    py, dail = sys.executable, str(ROOT / "dail.py")
    out.mkdir(parents=True, exist_ok=True)
    expert = head_jsonl(args.expert, out / "expert.jsonl", args.problems)
    test = head_jsonl(args.test, out / "test.jsonl", args.test_problems)
    timings = {}
    traces = out / "traces.jsonl"
    if not (out / "traces.summary.json").exists():
        print(f"[seed {seed}] rewrite: {args.samples} traces per expert problem", flush=True)
        timings["rewrite"] = run([py, dail, "rewrite", "--model", args.model, "--data", str(expert),
                                  "--out", str(traces), "--seed", str(seed), "--samples", str(args.samples),
                                  "--max-new-tokens", str(args.max_new_tokens), "--batch-size", "64"],
                                 out / "rewrite.log", env)
    rw = json.loads((out / "traces.summary.json").read_text())
    print(f"[seed {seed}]   kept {rw['kept']} traces for {rw['problems_with_kept']}/{rw['problems']} problems "
          f"(acceptance {rw['acceptance_rate']:.2f}, rejected {rw['reject_reasons']})", flush=True)
    if rw["kept"] == 0:
        sys.exit("quickstart: rewrite kept no trace; nothing to train on (try more --samples or --problems)")
    summaries = {}
    for name, label, flags in METHODS:
        model = args.model
        if flags is not None:
            model = str(out / name / "model")
            if not (Path(model) / "train_summary.json").exists():
                print(f"[seed {seed}] train {name}", flush=True)
                data = expert if "expert" in flags else traces
                cmd = [py, dail, "train", "--model", args.model, "--data", str(data), "--out", model,
                       "--seed", str(seed), "--lr", str(args.lr), "--epochs", str(args.epochs),
                       "--lora-rank", str(args.lora_rank), "--lora-alpha", str(2 * args.lora_rank),
                       "--batch-size", "16", "--micro-batch-size", "16", "--warmup-steps", "5",
                       "--overwrite"] + flags  # no train_summary.json: an unfinished run, start it over
                if args.steps:
                    cmd += ["--max-steps", str(args.steps)]
                timings[f"train {name}"] = run(cmd, out / f"train-{name}.log", env)
        ev = out / name / "eval"
        if not (ev / "summary.json").exists():
            print(f"[seed {seed}] eval {name}", flush=True)
            timings[f"eval {name}"] = run([py, dail, "eval", "--model", model, "--data", str(test), "--out", str(ev),
                                           "--seed", str(seed), "--n", str(args.n), "--engine", "hf",
                                           "--max-new-tokens", str(args.max_new_tokens), "--batch-size", "128",
                                           # the released presence penalty (1.5) taxes every repeated token;
                                           # this world's answers are digit strings over a 667-token byte-level
                                           # vocabulary, so there it taxes the task itself (SFT on traces, seed
                                           # 0: pass@1 74.9% with it, 79.2% without). Off here, on by default.
                                           "--presence-penalty", "0"],
                                          out / f"eval-{name}.log", env)
        summaries[name] = json.loads((ev / "summary.json").read_text())
    return summaries, timings


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def fmt(m, s, pct=True, spread=True):
    if m is None:
        return "-"
    scale = 100 if pct else 1
    return f"{m * scale:.1f} ± {s * scale:.1f}" if spread else f"{m * scale:.1f}"  # one seed has no spread


def aggregate(per_seed):
    """{method: {pass_at_k: {k: [mean, std]}, mean_tokens: [mean, std], ...}} over seeds."""
    agg = {}
    for name, label, _ in METHODS:
        runs = [s[name] for s in per_seed.values()]
        ks = list(runs[0]["pass_at_k"])
        agg[name] = dict(label=label, seeds=len(runs),
                         pass_at_k={k: list(mean_std([r["pass_at_k"][k] for r in runs])) for k in ks},
                         mean_tokens=list(mean_std([r["mean_tokens"] for r in runs])),
                         mean_tokens_correct=list(mean_std([r["mean_tokens_correct"] for r in runs])),
                         truncated=list(mean_std([r["truncated"] for r in runs])))
    return agg


def table(agg, n):
    k_last = str(max(int(k) for k in agg["base"]["pass_at_k"]))
    rows = [("method", "pass@1 (%)", f"pass@{k_last} (%)", "mean tokens", "tokens (correct)")]
    for name, _, _ in METHODS:
        a, many = agg[name], agg[name]["seeds"] > 1
        rows.append((a["label"], fmt(*a["pass_at_k"]["1"], spread=many), fmt(*a["pass_at_k"][k_last], spread=many),
                     fmt(*a["mean_tokens"], pct=False, spread=many),
                     fmt(*a["mean_tokens_correct"], pct=False, spread=many)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(agg, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("quickstart: matplotlib not installed, no plot written", file=sys.stderr)
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw=dict(width_ratios=[2, 1]))
    for name, label, _ in METHODS:
        ks = sorted(int(k) for k in agg[name]["pass_at_k"])
        m = [agg[name]["pass_at_k"][str(k)][0] for k in ks]
        s = [agg[name]["pass_at_k"][str(k)][1] for k in ks]
        line, = ax.plot(ks, m, marker="o", ms=3, label=label)
        ax.fill_between(ks, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.15,
                        color=line.get_color())
        bx.bar(label, agg[name]["mean_tokens"][0], yerr=agg[name]["mean_tokens"][1], color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel="k", ylabel="pass@k", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    bx.set(title="mean response tokens", ylabel="tokens")
    bx.tick_params(axis="x", labelrotation=60, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("seeds", "seed_list", "seed", "threads")}
    cfg_path = out / "quickstart_config.json"
    if cfg_path.exists() and json.loads(cfg_path.read_text()) != config:
        sys.exit(f"quickstart: {out} holds a run with other settings ({cfg_path}); use another --out")
    cfg_path.write_text(json.dumps(config, indent=2))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    t0 = time.time()
    per_seed, timings = {}, {}
    for seed in args.seed_list:
        per_seed[seed], timings[seed] = pipeline(args, seed, out / f"seed{seed}", env)
    agg = aggregate(per_seed)
    n_test = per_seed[args.seed_list[0]]["base"]["problems"]
    title = f"{n_test} held-out problems, n = {args.n}, {len(args.seed_list)} seed(s)"
    png = plot(agg, out / "passk.png", title)
    summary = dict(seeds=args.seed_list, test_problems=n_test, n=args.n, methods=agg,
                   per_seed={str(s): {m: dict(pass_at_k=r["pass_at_k"], mean_tokens=r["mean_tokens"],
                                              mean_tokens_correct=r["mean_tokens_correct"],
                                              truncated=r["truncated"]) for m, r in v.items()}
                             for s, v in per_seed.items()},
                   rewrite={str(s): json.loads((out / f"seed{s}" / "traces.summary.json").read_text())["kept"]
                            for s in args.seed_list},
                   seconds=round(time.time() - t0, 1), step_seconds={str(s): t for s, t in timings.items()},
                   settings=config)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    over = "mean ± std over seeds" if len(args.seed_list) > 1 else "one seed"
    print(f"\n{title} ({over})\n" + table(agg, args.n))
    print(f"\nwrote {out / 'summary.json'}" + (f" and {png}" if png else "") + f" in {time.time() - t0:.0f} s")
    return summary


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""What each part of DAIL does, measured in the tiny worlds: a lambda sweep and a data-efficiency curve.

    python examples/experiments.py lambda --world shortcut --seeds 0,1,2          # the contrastive term
    python examples/experiments.py efficiency --world tiny --seeds 0,1,2          # fewer expert solutions
    python examples/experiments.py lambda --world shortcut --small --out runs/x   # a smoke run (minutes)

Worlds (both use examples/world/expert.jsonl and test.jsonl: 160 expert problems, 200 held-out ones):
  tiny      examples/world/model           the quickstart's world: privileged traces fully derived
  shortcut  examples/shortcut_world/model  the same world, but a model that sometimes *leaps* when it can
                                           see the answer (examples/shortcut_world/shortcut.py)

Experiments (every step a `python dail.py rewrite | train | eval` subprocess, as in quickstart.py, with the
quickstart's settings; nothing here reimplements the method):
  lambda      per seed: one rewrite of all expert problems; then base model, SFT on expert solutions, SFT on
              the traces, DAIL for every lambda in --lams (lambda = 0: no contrastive term); eval on the
              held-out problems. Besides pass@k and tokens it classifies every kept trace and every eval
              sample with the shortcut world's checker (derived / leap / wrong, and what the first line that
              does not follow is: a stated result or a false computation).
  efficiency  per seed: one rewrite of the first max(--problems) expert problems; for each N in --problems,
              SFT on the first N expert solutions, SFT on their traces, DAIL lambda = 0 and DAIL (0.1), each
              for the same --steps optimizer steps (a small set is repeated more), and pass@1 on the
              held-out problems against N.
Writes OUT/<experiment>.json (per seed and mean +- std) and OUT/<experiment>.png. Finished steps (a rewrite
with its summary, a model with train_summary.json, an eval with summary.json) are skipped on a rerun with the
same settings; a run with other settings in the same OUT is refused.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "examples" / "shortcut_world")]
from quickstart import fmt, head_jsonl, mean_std  # noqa: E402
import shortcut  # noqa: E402  (the checker: classify, parse_problem)

WORLDS = {"tiny": ROOT / "examples" / "world" / "model", "shortcut": ROOT / "examples" / "shortcut_world" / "model"}
EXPERT, TEST = ROOT / "examples" / "world" / "expert.jsonl", ROOT / "examples" / "world" / "test.jsonl"
BATCH = 16


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=["lambda", "efficiency"])
    ap.add_argument("--world", default="shortcut", help="comma-separated worlds: tiny, shortcut")
    ap.add_argument("--seeds", default=None,
                    help="comma-separated seeds (rewrite, training, eval sampling) (default: 0,1,2; --small: 0)")
    ap.add_argument("--out", default=None, help="output folder (default: runs/<experiment>)")
    ap.add_argument("--lams", default="0,0.1,0.3,1.0", help="lambda: DAIL's lambda values")
    ap.add_argument("--problems", default="10,20,40,80,160",
                    help="efficiency: numbers of expert problems; lambda: one number (default: all 160)")
    ap.add_argument("--steps", type=int, default=40,
                    help="efficiency: optimizer steps of every run (40 = 4 epochs of 160 traces at batch 16)")
    ap.add_argument("--methods", default=None, help="only these methods (comma-separated names), e.g. sft-trace")
    ap.add_argument("--test-problems", type=int, default=None, help="use only the first N test problems")
    ap.add_argument("--small", action="store_true",
                    help="smoke run: 4 (efficiency: 2,4) expert problems, 4 test problems, 2 steps, n=2, 2 samples")
    # the settings of the worlds, as in examples/quickstart.py (the same for every method)
    ap.add_argument("--samples", type=int, default=4, help="rewrite: traces decoded per expert problem")
    ap.add_argument("--max-new-tokens", type=int, default=160, help="rewrite and eval token budget")
    ap.add_argument("--n", type=int, default=8, help="eval: samples per test problem")
    ap.add_argument("--epochs", type=int, default=4, help="lambda: passes over the training set")
    ap.add_argument("--lr", type=float, default=2e-3, help="train: peak learning rate (all methods)")
    ap.add_argument("--lora-rank", type=int, default=16, help="train: LoRA rank (all methods)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of each subprocess")
    args = ap.parse_args(argv)
    args.worlds = [w.strip() for w in args.world.split(",") if w.strip()]
    bad = [w for w in args.worlds if w not in WORLDS]
    if bad:
        ap.error(f"--world: unknown world(s) {bad}; choose from {sorted(WORLDS)}")
    args.seed_list = [int(s) for s in (args.seeds or ("0" if args.small else "0,1,2")).split(",")]
    args.lam_list = [float(x) for x in args.lams.split(",")]
    if args.small:
        args.problems = "2,4" if args.experiment == "efficiency" else "4"
        args.test_problems = args.test_problems or 4
        args.steps, args.n, args.samples = 2, 2, 2
    args.problem_list = [int(x) for x in args.problems.split(",")]
    if args.experiment == "lambda" and args.problems == "10,20,40,80,160":
        args.problem_list = [160]
    args.out = Path(args.out or f"runs/{args.experiment}")
    return args


def lambda_methods(lams):
    """(name, label, train flags or None for the base model) of the lambda sweep."""
    out = [("base", "base model", None),
           ("sft-expert", "SFT on expert solutions", ["--objective", "sft", "--sft-target", "expert"]),
           ("sft-trace", "SFT on rewritten traces", ["--objective", "sft", "--sft-target", "trace"])]
    return out + [(f"dail-lam{lam:g}", f"DAIL, lambda = {lam:g}", ["--objective", "dail", "--lam", f"{lam:g}"])
                  for lam in lams]


EFFICIENCY_METHODS = [
    ("sft-expert", "SFT on expert solutions", ["--objective", "sft", "--sft-target", "expert"]),
    ("sft-trace", "SFT on rewritten traces", ["--objective", "sft", "--sft-target", "trace"]),
    ("dail-lam0", "DAIL, lambda = 0", ["--objective", "dail", "--lam", "0"]),
    ("dail", "DAIL (lambda = 0.1)", ["--objective", "dail"]),
]


# ---- subprocesses --------------------------------------------------------------------------------------
def run(cmd, log, env):
    """One `python dail.py ...` subprocess, its output in `log`; returns (seconds, ok)."""
    t0 = time.time()
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if rc != 0:
        tail = "\n  ".join(Path(log).read_text().splitlines()[-8:])
        print(f"experiments: failed (exit {rc}), see {log}:\n  {tail}", file=sys.stderr, flush=True)
    return round(time.time() - t0, 1), rc == 0


# Eval flags this script sets on top of the quickstart's. The released presence penalty (1.5) penalizes every
# token already in the response; in a byte-level world whose steps are digits, '=', '+' and '*' over and over,
# that forbids the very format the model answers in, so the tiny worlds evaluate with --presence-penalty 0 (a
# language model's prose rarely needs a token 30 times).
EVAL_EXTRA_FLAGS = ["--presence-penalty", "0"]


def rewrite(args, model, seed, expert, out, env, timings):
    traces = out / "traces.jsonl"
    summary = traces.with_suffix(".summary.json")                 # written last: the rewrite is finished
    if not summary.exists():
        print(f"[{out}] rewrite", flush=True)
        timings["rewrite"], ok = run([sys.executable, str(ROOT / "dail.py"), "rewrite", "--model", str(model),
                                      "--data", str(expert), "--out", str(traces), "--seed", str(seed),
                                      "--samples", str(args.samples), "--max-new-tokens", str(args.max_new_tokens),
                                      "--batch-size", "64", "--overwrite"], out / "rewrite.log", env)
        if not ok:
            sys.exit("experiments: the rewrite failed; nothing to train on")
    return traces, json.loads(summary.read_text())


def train(args, base, seed, data, model_out, flags, env, timings, name, steps=None, epochs=None):
    """Train one model unless model_out holds a finished one; True when it exists afterwards."""
    if (model_out / "train_summary.json").exists():
        return True
    print(f"[{model_out.parent}] train {name}", flush=True)
    cmd = [sys.executable, str(ROOT / "dail.py"), "train", "--model", str(base), "--data", str(data),
           "--out", str(model_out), "--seed", str(seed), "--lr", str(args.lr), "--epochs", str(epochs or args.epochs),
           "--lora-rank", str(args.lora_rank), "--lora-alpha", str(2 * args.lora_rank),
           "--batch-size", str(BATCH), "--micro-batch-size", str(BATCH), "--warmup-steps", "5",
           "--overwrite"] + flags   # no train_summary.json: an unfinished run, start it over
    if steps:
        cmd += ["--max-steps", str(steps)]
    model_out.parent.mkdir(parents=True, exist_ok=True)
    timings[f"train {name}"], ok = run(cmd, model_out.parent / f"train-{name}.log", env)
    return ok


def evaluate(args, model, seed, test, ev, env, timings, name, extra):
    if not (ev / "summary.json").exists():
        print(f"[{ev.parent}] eval {name}", flush=True)
        timings[f"eval {name}"], ok = run(
            [sys.executable, str(ROOT / "dail.py"), "eval", "--model", str(model), "--data", str(test),
             "--out", str(ev), "--seed", str(seed), "--n", str(args.n), "--engine", "hf",
             "--max-new-tokens", str(args.max_new_tokens), "--batch-size", "128"] + extra,
            ev.parent / f"eval-{name}.log", env)
        if not ok:
            return None
    return json.loads((ev / "summary.json").read_text())


# ---- the checker over result files ---------------------------------------------------------------------
def kind_of(reason):
    """What a first line that does not follow is: 'stated' (a result with no derivation), 'slip' (a false
    computation) or 'other' (off the world's formats, or inconsistent with the lines above)."""
    if reason is None:
        return None
    if "stated" in reason:
        return "stated"
    return "slip" if reason.startswith("false arithmetic") else "other"


def check_texts(pairs):
    """pairs: (problem text, response text). Fractions of derived / leap / wrong (shortcut.classify), and of
    responses whose first non-following line is a stated result or a false computation, whatever the answer
    (a student that leaps without the answer to copy is mostly *wrong*, not a 'leap')."""
    labels, kinds = [], []
    for problem, text in pairs:
        a, n = shortcut.parse_problem(problem)
        labels.append(shortcut.classify(text, a, n)[0])
        clean = text
        for special in shortcut.SPECIAL_TOKENS:
            clean = clean.replace(special, "")
        kinds.append(kind_of(next((w for w in shortcut.check_lines(clean, a, n) if w is not None), None)))
    out = shortcut.leap_rates(labels)
    total = max(len(kinds), 1)
    out.update(stated=sum(k == "stated" for k in kinds) / total, slip=sum(k == "slip" for k in kinds) / total,
               other=sum(k == "other" for k in kinds) / total)
    out["leap_shaped"] = out["stated"] + out["slip"]
    # what a leap costs: how many leap-shaped responses still end in the right answer
    shaped = [lab for lab, k in zip(labels, kinds) if k in ("stated", "slip")]
    out["leap_shaped_right"] = sum(lab == "leap" for lab in shaped) / len(shaped) if shaped else None
    return out


def kept_trace_check(traces):
    rows = [json.loads(x) for x in Path(traces).read_text().split("\n") if x.strip()]
    return check_texts([(r["problem"], r["response"]) for r in rows if r["kept"]])


def sample_check(ev):
    """The checker over every eval sample, as graded: the response plus eval's forced-answer pass, if any
    (a boxed answer forced after a cut trace is stated, not derived)."""
    rows = [json.loads(x) for x in (ev / "samples.jsonl").read_text().split("\n") if x.strip()]
    return check_texts([(r["problem"], t + (f or "")) for r in rows
                        for t, f in zip(r["responses"], r.get("forced") or [None] * len(r["responses"]))])


def final_metrics(model_out):
    s = model_out / "train_summary.json"
    if not s.exists():
        return None
    final = json.loads(s.read_text()).get("final") or {}
    return {k: final[k] for k in ("loss", "kl_teacher", "kl_shortcut", "ce", "grad_norm") if k in final}


def record(summary, ev, model_out=None):
    """One run's numbers: pass@k, tokens, the checker on its samples, its last training step's loss terms."""
    if summary is None:
        return dict(failed=True)
    k_last = str(max(int(k) for k in summary["pass_at_k"]))
    return dict(pass1=summary["pass_at_k"]["1"], pass_n=summary["pass_at_k"][k_last], k_last=int(k_last),
                mean_tokens=summary["mean_tokens"], mean_tokens_correct=summary.get("mean_tokens_correct"),
                samples=sample_check(ev), train_final=final_metrics(model_out) if model_out else None)


# ---- the two experiments -------------------------------------------------------------------------------
def lambda_seed(args, world, seed, env, extra):
    out = args.out / world / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    expert = head_jsonl(EXPERT, out / "expert.jsonl", args.problem_list[0])
    test = head_jsonl(TEST, out / "test.jsonl", args.test_problems)
    timings = {}
    traces, rw = rewrite(args, WORLDS[world], seed, expert, out, env, timings)
    res = dict(rewrite=dict(kept=rw["kept"], problems=rw["problems"], acceptance=rw["acceptance_rate"],
                            kept_traces=kept_trace_check(traces)), methods={})
    for name, label, flags in selected(lambda_methods(args.lam_list), args):
        model = WORLDS[world]
        model_out = None
        if flags is not None:
            model_out = out / name / "model"
            data = expert if "expert" in flags else traces
            if not train(args, WORLDS[world], seed, data, model_out, flags, env, timings, name):
                res["methods"][name] = dict(failed=True, stage="train")
                continue
            model = model_out
        summary = evaluate(args, model, seed, test, out / name / "eval", env, timings, name, extra)
        res["methods"][name] = record(summary, out / name / "eval", model_out)
    res["seconds"] = timings
    return res


def efficiency_seed(args, world, seed, env, extra):
    out = args.out / world / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    expert_all = head_jsonl(EXPERT, out / "expert.jsonl", max(args.problem_list))
    test = head_jsonl(TEST, out / "test.jsonl", args.test_problems)
    timings = {}
    traces_all, rw = rewrite(args, WORLDS[world], seed, expert_all, out, env, timings)
    ids = [json.loads(x)["id"] for x in expert_all.read_text().split("\n") if x.strip()]
    trace_rows = [x for x in traces_all.read_text().split("\n") if x.strip()]
    res = dict(rewrite=dict(kept=rw["kept"], problems=rw["problems"]), by_problems={})
    for n_problems in args.problem_list:
        sub = out / f"N{n_problems}"
        sub.mkdir(exist_ok=True)
        expert = head_jsonl(expert_all, sub / "expert.jsonl", n_problems)
        # the traces of the first N problems: the rewrite of one problem does not depend on the others
        keep_ids = set(ids[:n_problems])
        rows = [x for x in trace_rows if json.loads(x)["id"] in keep_ids]
        (sub / "traces.jsonl").write_text("\n".join(rows) + "\n")
        kept = sum(json.loads(x)["kept"] for x in rows)
        res["by_problems"][str(n_problems)] = cell = dict(kept_traces=kept, methods={})
        for name, label, flags in selected(EFFICIENCY_METHODS, args):
            size = n_problems if "expert" in flags else kept
            if size == 0:
                cell["methods"][name] = dict(failed=True, stage="no kept trace")
                continue
            epochs = math.ceil(args.steps * BATCH / size)      # every run takes the same number of steps
            model_out = sub / name / "model"
            data = expert if "expert" in flags else sub / "traces.jsonl"
            if not train(args, WORLDS[world], seed, data, model_out, flags, env, timings, f"N{n_problems} {name}",
                         steps=args.steps, epochs=epochs):
                cell["methods"][name] = dict(failed=True, stage="train")
                continue
            summary = evaluate(args, model_out, seed, test, sub / name / "eval", env, timings,
                               f"N{n_problems} {name}", extra)
            cell["methods"][name] = record(summary, sub / name / "eval", model_out)
    res["seconds"] = timings
    return res


def selected(methods, args):
    if not args.methods:
        return methods
    want = {m.strip() for m in args.methods.split(",")}
    return [m for m in methods if m[0] in want or m[2] is None and "base" in want]


# ---- aggregation, table, plot --------------------------------------------------------------------------
def agg_runs(runs):
    """mean and std over seeds of every number of the run records (failed runs left out, and counted)."""
    ok = [r for r in runs if not r.get("failed")]
    out = dict(seeds=len(ok), failed=len(runs) - len(ok))
    if not ok:
        return out
    for key in ("pass1", "pass_n", "mean_tokens", "mean_tokens_correct"):
        out[key] = list(mean_std([r.get(key) for r in ok]))
    out["k_last"] = ok[0]["k_last"]
    out["samples"] = {k: list(mean_std([r["samples"][k] for r in ok]))
                      for k in ("derived", "leap", "wrong", "stated", "slip", "leap_shaped", "leap_among_right",
                                "leap_shaped_right")}
    tf = [r["train_final"] for r in ok if r.get("train_final")]
    if tf:
        out["train_final"] = {k: list(mean_std([t.get(k) for t in tf])) for k in tf[0]}
    return out


def fmt_small(ms):
    """mean ± std of a per-token KL (nats), which is 0.001-0.01 at the end of a good run."""
    return "-" if not ms or ms[0] is None else f"{ms[0]:.4f} ± {ms[1]:.4f}"


def lambda_table(world_res, methods):
    rows = [("method", "pass@1 (%)", "pass@n (%)", "mean tokens", "leap-shaped (%)", "of them right (%)", "derived (%)",
             "kl_teacher (last step)", "kl_shortcut (last step)")]
    for name, label, _ in methods:
        a = world_res["methods"].get(name)
        if not a or not a.get("seeds"):
            rows.append((label, "failed", "", "", "", "", "", "", ""))
            continue
        tf = a.get("train_final") or {}
        rows.append((label, fmt(*a["pass1"]), fmt(*a["pass_n"]), fmt(*a["mean_tokens"], pct=False),
                     fmt(*a["samples"]["leap_shaped"]), fmt(*a["samples"]["leap_shaped_right"]),
                     fmt(*a["samples"]["derived"]),
                     fmt_small(tf.get("kl_teacher")), fmt_small(tf.get("kl_shortcut"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("experiments: matplotlib not installed, no plot written", file=sys.stderr)
        return None


def lambda_plot(result, path, lams):
    plt = _plt()
    if plt is None:
        return None
    worlds = list(result["worlds"])
    fig, axes = plt.subplots(len(worlds), 2, figsize=(10, 3.6 * len(worlds)), squeeze=False)
    xs = list(range(len(lams)))
    for row, world in zip(axes, worlds):
        methods = result["worlds"][world]["methods"]
        for ax, key, title in ((row[0], "pass1", "held-out pass@1"),
                               (row[1], "leap_shaped", "leap-shaped eval samples")):
            def val(m):
                a = methods.get(m) or {}
                if not a.get("seeds"):
                    return None, None
                return tuple(a["pass1"]) if key == "pass1" else tuple(a["samples"][key])
            pts = [val(f"dail-lam{lam:g}") for lam in lams]
            xm = [(x, m, s) for x, (m, s) in zip(xs, pts) if m is not None]
            if xm:
                ax.errorbar([x for x, _, _ in xm], [m for _, m, _ in xm], yerr=[s for _, _, s in xm], marker="o",
                            capsize=3, label="DAIL")
            for m, style, color, label in (("sft-trace", "--", "C1", "SFT on traces"),
                                           ("sft-expert", ":", "gray", "SFT on expert")):
                mm, ss = val(m)
                if mm is not None:
                    ax.axhline(mm, ls=style, color=color, label=label)
                    ax.axhspan(mm - ss, mm + ss, color=color, alpha=0.12)
            if key == "leap_shaped":
                kt = result["worlds"][world].get("kept_traces_leap")
                if kt:
                    ax.axhline(kt[0], ls="-.", color="C3", label="kept traces (leap rate)")
            ax.set_xticks(xs, [f"{lam:g}" for lam in lams])
            ax.set(title=f"{world} world: {title}", xlabel="lambda", ylim=(-0.02, 1.02))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def efficiency_plot(result, path):
    plt = _plt()
    if plt is None:
        return None
    worlds = list(result["worlds"])
    fig, axes = plt.subplots(1, len(worlds), figsize=(5.5 * len(worlds), 4), squeeze=False)
    for ax, world in zip(axes[0], worlds):
        cells = result["worlds"][world]["by_problems"]
        ns = sorted(int(n) for n in cells)
        for name, label, _ in EFFICIENCY_METHODS:
            pts = [(n, cells[str(n)]["methods"].get(name) or {}) for n in ns]
            pts = [(n, a["pass1"]) for n, a in pts if a.get("seeds")]
            if not pts:
                continue
            x = [n for n, _ in pts]
            m = [p[0] for _, p in pts]
            s = [p[1] for _, p in pts]
            line, = ax.plot(x, m, marker="o", ms=3, label=label)
            ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.15,
                            color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set(title=f"{world} world ({result['seeds_run']} seeds)", xlabel="expert problems used",
               ylabel="held-out pass@1", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("seeds", "seed_list", "threads", "world", "worlds", "methods", "out")}
    cfg_path = args.out / f"{args.experiment}_config.json"
    if cfg_path.exists() and json.loads(cfg_path.read_text()) != config:
        sys.exit(f"experiments: {args.out} holds a run with other settings ({cfg_path}); use another --out")
    cfg_path.write_text(json.dumps(config, indent=2))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    extra = EVAL_EXTRA_FLAGS
    t0 = time.time()
    result = dict(experiment=args.experiment, seeds_run=len(args.seed_list), seeds=args.seed_list,
                  eval_extra_flags=extra, settings=config, worlds={})
    for world in args.worlds:
        per_seed = {}
        for seed in args.seed_list:
            fn = lambda_seed if args.experiment == "lambda" else efficiency_seed
            per_seed[str(seed)] = fn(args, world, seed, env, extra)
        if args.experiment == "lambda":
            methods = selected(lambda_methods(args.lam_list), args)
            agg = {name: dict(agg_runs([s["methods"][name] for s in per_seed.values()]), label=label)
                   for name, label, _ in methods}
            kt = [s["rewrite"]["kept_traces"]["leap_among_right"] for s in per_seed.values()]
            result["worlds"][world] = dict(methods=agg, per_seed=per_seed,
                                           kept_traces_leap=list(mean_std(kt)),
                                           kept=list(mean_std([s["rewrite"]["kept"] for s in per_seed.values()])))
            print(f"\n{world} world, lambda sweep, {len(args.seed_list)} seed(s), mean ± std; kept traces' leap "
                  f"rate {fmt(*result['worlds'][world]['kept_traces_leap'])} %\n"
                  + lambda_table(result["worlds"][world], methods))
        else:
            cells = {}
            for n_problems in args.problem_list:
                key = str(n_problems)
                cells[key] = dict(methods={name: dict(agg_runs([s["by_problems"][key]["methods"][name]
                                                                for s in per_seed.values()
                                                                if name in s["by_problems"][key]["methods"]]),
                                                      label=label)
                                           for name, label, _ in selected(EFFICIENCY_METHODS, args)},
                                  kept_traces=list(mean_std([s["by_problems"][key]["kept_traces"]
                                                             for s in per_seed.values()])))
            result["worlds"][world] = dict(by_problems=cells, per_seed=per_seed)
            print(f"\n{world} world, pass@1 (%) against expert problems used, {len(args.seed_list)} seed(s)")
            for name, label, _ in selected(EFFICIENCY_METHODS, args):
                row = [fmt(*cells[str(n)]["methods"][name]["pass1"]) if cells[str(n)]["methods"][name].get("seeds")
                       else "failed" for n in args.problem_list]
                print(f"  {label:26s} " + "  ".join(f"N={n}: {v}" for n, v in zip(args.problem_list, row)))
    result["seconds"] = round(time.time() - t0, 1)
    path = args.out / f"{args.experiment}.json"
    path.write_text(json.dumps(result, indent=2))
    png = (lambda_plot(result, args.out / "lambda.png", args.lam_list) if args.experiment == "lambda"
           else efficiency_plot(result, args.out / "efficiency.png"))
    print(f"\nwrote {path}" + (f" and {png}" if png else "") + f" in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()

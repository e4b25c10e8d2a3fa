#!/usr/bin/env python
"""What each of the three contexts thinks of one token of the kept traces: a probe for "did the student
inherit this from the teacher?".

    python examples/probe_teacher.py --traces runs/lambda_tiny/tiny/seed0/traces.jsonl \
        --model examples/world/model --after "Block " --then "+" --out examples/results_probe_block_line.json

The traces there are written by the lambda experiment (`python examples/experiments.py lambda --world tiny
--seeds 0,1,2 --out runs/lambda_tiny`); any rewrite's traces.jsonl works too, e.g. the quickstart's
runs/quickstart/seed0/traces.jsonl.

For every kept trace, finds the first line that starts with --after, then the first --then after it, and
takes the trace's own next token there (in the tiny worlds: the second summand of the block line,
`Block 4+6=10.`). It reports, per context (student, privileged, shortcut: dail.build_contexts, the prompts
train uses), the probability the frozen model gives that token after the trace's own prefix: its mean over
traces and the fraction of traces where it is below 0.5. DAIL fits the privileged context's whole
distribution at every position, so a mistake its students make that the privileged context also makes
(probability well below 1 on the right token) is inherited; one it does not make is the student's own fit.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dail  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", required=True, help="a rewrite's traces.jsonl (kept traces are probed)")
    ap.add_argument("--model", required=True, help="the frozen model the traces were rewritten (and trained) from")
    ap.add_argument("--after", default="Block ", help="the probed line starts with this text")
    ap.add_argument("--then", default="+", help="the probed token follows the first occurrence of this text")
    ap.add_argument("--thinking", action="store_true", help="reasoning model: the prompts as train builds them with --thinking")
    ap.add_argument("--out", default=None, help="write the summary here as JSON")
    args = ap.parse_args(argv)
    try:
        return probe(args)
    except dail.DailError as e:          # a missing file, a malformed line: one line, exit 2
        print(f"probe_teacher: error: {e}", file=sys.stderr)
        sys.exit(2)


def probe(args):
    records = [rec for _, rec in dail.read_jsonl(args.traces, "--traces")]   # bad input fails before the model loads
    if args.out:                                                               # never over its own input
        dail.check_own_inputs(args.out, [args.out], {"--traces": args.traces}, args.model)
    tok = dail.load_tokenizer(args.model)
    model = dail.load_model(args.model, torch.device("cpu"), torch.float32)
    probs = {name: [] for name in ("student", "privileged", "shortcut")}
    for rec in records:
        text, ids = rec["response"], rec["response_ids"]
        start = 0 if text.startswith(args.after) else text.find("\n" + args.after) + 1   # 0: not found
        at = text.find(args.then, start) if start or text.startswith(args.after) else -1
        if not rec.get("kept") or at < 0:
            continue
        cut = at + len(args.then)
        # the number of response tokens whose text is exactly the prefix up to the probed token
        n = next((k for k in range(len(ids) + 1) if tok.decode(ids[:k]) == text[:cut]), None)
        if n is None or n >= len(ids):
            continue
        contexts = dail.build_contexts(tok, rec, args.thinking, None)
        for name, prompt in contexts.items():
            with torch.no_grad():
                logits = model(torch.tensor([prompt + ids[:n]])).logits[0, -1]
            probs[name].append(float(logits.float().softmax(-1)[ids[n]]))
    if not probs["student"]:
        sys.exit(f"probe_teacher: no kept trace of {args.traces} has a line starting {args.after!r} with {args.then!r}")
    summary = dict(traces=args.traces, model=args.model, after=args.after, then=args.then,
                   probed=len(probs["student"]),
                   contexts={name: dict(mean=sum(v) / len(v), below_half=sum(p < 0.5 for p in v) / len(v))
                             for name, v in probs.items()})
    for name, s in summary["contexts"].items():
        print(f"{name:10s}  mean probability of the trace's token {s['mean']:.3f}; below 0.5 in "
              f"{100 * s['below_half']:.1f} % of {summary['probed']} kept traces")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()

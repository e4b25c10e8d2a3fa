#!/usr/bin/env python
"""Both graders of `--grader` on the grading-case table of test_dail.py (GRADING_CASES: public grading facts
with the source of each in a comment): agreement with the right verdict, false positives (a wrong answer
called right), false negatives (a right answer missed), and time per case.

Each case is graded as eval grades a sample: `dail.grade(response, reference, grader)`, the response being
the case's text (boxed when it holds no box). Every case is timed on its own in `--reps` passes over the
whole table (the median per case is kept); the table gives the mean and the largest of those medians.
math-verify's first call (its import and parser set-up) is done before timing and reported apart.

    python examples/bench_grade.py                # builtin and math-verify (when installed)
    python examples/bench_grade.py --list-errors  # also print every case a grader gets wrong
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import dail  # noqa: E402


def load_cases():
    """GRADING_CASES and as_response from test_dail.py, read without importing torch-using fixtures twice."""
    sys.path.insert(0, str(ROOT / "examples"))
    import test_dail
    return test_dail.GRADING_CASES, test_dail.as_response


def run(grader, cases, as_response, reps):
    t0 = time.perf_counter()
    dail.grade(as_response("1"), "1", grader)  # warm-up: import, parser set-up
    warmup = time.perf_counter() - t0
    per = [[] for _ in cases]
    for _ in range(reps):  # whole passes, so that math-verify's small parse caches (20 entries) never help
        rows = []
        for i, (response, reference, want) in enumerate(cases):
            t = time.perf_counter()
            pred, got = dail.grade(as_response(response), reference, grader)
            per[i].append(time.perf_counter() - t)
            rows.append((response, reference, want, got, pred))
    times = [statistics.median(p) for p in per]
    fp = sum(got and not want for _, _, want, got, _ in rows)
    fn = sum(want and not got for _, _, want, got, _ in rows)
    return dict(grader=grader, cases=len(rows), agree=1 - (fp + fn) / len(rows), fp=fp, fn=fn,
                mean_ms=1000 * statistics.mean(times), max_ms=1000 * max(times), warmup_s=warmup,
                info=dail.grader_info(grader), rows=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="timed passes over the table (median per case kept)")
    ap.add_argument("--list-errors", action="store_true", help="print the cases each grader gets wrong")
    a = ap.parse_args()
    cases, as_response = load_cases()
    graders = ["builtin"]
    try:
        dail.make_grader("math-verify")
        graders.append("math-verify")
    except dail.DailError as e:
        print(f"note: {e}", file=sys.stderr)
    results = [run(g, cases, as_response, a.reps) for g in graders]
    positives = sum(w for _, _, w in cases)
    print(f"{len(cases)} cases ({positives} right answers, {len(cases) - positives} wrong ones)\n")
    print("| grader | agreement | false positives | false negatives | time per case, mean | max | first call |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        name = r["grader"] + (f" {r['info']['version']}" if "version" in r["info"] else "")
        print(f"| {name} | {r['agree']:.1%} ({r['cases'] - r['fp'] - r['fn']}/{r['cases']}) | {r['fp']} | {r['fn']} "
              f"| {r['mean_ms']:.3f} ms | {r['max_ms']:.1f} ms | {r['warmup_s']:.2f} s |")
        if r["info"].get("timeouts"):
            print(f"  ({r['info']['timeouts']} math-verify time-outs, counted as wrong)")
    if a.list_errors:
        for r in results:
            for response, reference, want, got, pred in r["rows"]:
                if got != want:
                    kind = "FP" if got else "FN"
                    print(f"{r['grader']} {kind}: response {response!r} reference {reference!r} -> {pred!r}")


if __name__ == "__main__":
    main()

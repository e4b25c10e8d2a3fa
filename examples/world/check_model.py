"""Check the shipped base model against the numbers recorded when it was trained (examples/world/recorded.json).

    python examples/world/check_model.py            # measure and compare (exit 1 on a mismatch)
    python examples/world/check_model.py --record   # measure and write recorded.json

Three measurements, all offline and deterministic for a given machine (fixed seeds):
  test_pass1      `dail.py eval` on the first 64 held-out problems of test.jsonl, n = 4, student prompt.
                  Near 0 by design: alone, the base model brute-forces and runs out of tokens.
  easy_pass1      `dail.py eval` on easy.jsonl (exponents 2..9: brute force fits the budget), n = 4.
  privileged_acc  greedy accuracy on the same 64 held-out problems when the prompt carries the expert
                  solution (dail.build_contexts' privileged context): the capability DAIL distils.
Tolerance: TOL (absolute) on every number, for floating-point differences between machines and thread
counts that flip a few sampled tokens.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MODEL = HERE / "model"
RECORDED = HERE / "recorded.json"
TOL = 0.08
N_TEST, N_SAMPLES, MAX_NEW = 64, 4, 150


def write_easy(path=HERE / "easy.jsonl"):
    import world
    with open(path, "w") as f:
        for i, (a, n) in enumerate((a, n) for a in world.BASES[::5] for n in world.EASY_N[::2]):
            f.write(json.dumps(dict(id=f"easy{i}", problem=world.problem_text(a, n), answer=str(world.answer(a, n))))
                    + "\n")
    return path


def cli_pass1(data, out, n_problems=None, model=MODEL):
    """pass@1 of `python dail.py eval` on the first n_problems of data."""
    lines = [x for x in Path(data).read_text().split("\n") if x.strip()][:n_problems]
    sub = Path(out) / "data.jsonl"
    sub.parent.mkdir(parents=True, exist_ok=True)
    sub.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    subprocess.run([sys.executable, str(ROOT / "dail.py"), "eval", "--model", str(model), "--data", str(sub),
                    "--out", str(Path(out) / "eval"), "--n", str(N_SAMPLES), "--max-new-tokens", str(MAX_NEW),
                    "--engine", "hf", "--seed", "0", "--batch-size", "128"], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((Path(out) / "eval" / "summary.json").read_text())["pass_at_k"]["1"]


def privileged_accuracy(model_dir=MODEL, n_problems=N_TEST):
    """Greedy exact-match rate on held-out problems, prompted with their expert solutions (privileged)."""
    sys.path[:0] = [str(ROOT), str(HERE)]
    import dail
    import world
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = [json.loads(x) for x in (HERE / "test.jsonl").read_text().split("\n") if x.strip()][:n_problems]
    import random
    import re
    rng = random.Random(0)
    ctx, answers = [], []
    for r in rows:
        a, n = map(int, re.findall(r"(\d+)\^(\d+)\.$", r["problem"])[0])
        p = dict(where="test.jsonl", problem=r["problem"], solution=world.expert_solution(a, n, rng),
                 answer=r["answer"])
        ctx.append([dail.build_contexts(tok, p, False, None, ("privileged",))["privileged"]])
        answers.append(r["answer"])
    import torch
    with torch.no_grad():
        res = dail.decode(model, ctx, lambda logits, step, rows: (logits[0].argmax(-1), None), MAX_NEW,
                          dail.stop_token_ids(tok, str(model_dir)), tok.pad_token_id)
    ok = [r["finish_reason"] == "stop" and dail.is_equiv(dail.extract_boxed(tok.decode(r["ids"])), a)
          for r, a in zip(res, answers)]
    return sum(ok) / len(ok)


def measure(model=MODEL):
    with tempfile.TemporaryDirectory() as tmp:
        return dict(test_pass1=cli_pass1(HERE / "test.jsonl", Path(tmp) / "test", N_TEST, model),
                    easy_pass1=cli_pass1(HERE / "easy.jsonl", Path(tmp) / "easy", None, model),
                    privileged_acc=privileged_accuracy(model))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true", help="write recorded.json instead of comparing")
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.record:
        write_easy()
    got = measure()
    if args.record:
        RECORDED.write_text(json.dumps(dict(got, tolerance=TOL, n_test=N_TEST, n=N_SAMPLES, max_new_tokens=MAX_NEW),
                                       indent=2) + "\n")
        print(f"recorded {got} in {RECORDED}")
        return 0
    want = json.loads(RECORDED.read_text())
    bad = {k: (got[k], want[k]) for k in got if abs(got[k] - want[k]) > want["tolerance"]}
    print(json.dumps(dict(measured=got, recorded={k: want[k] for k in got}, tolerance=want["tolerance"])))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""The tiny world's domain: sums of last digits of powers.

Problem:  "Find the sum of the last digits of 17^1, 17^2, ..., 17^83."

Two ways to solve it:
  * brute force (the base model's own habit on the student prompt): walk the powers one at a time, keep a
    running total. About 18 tokens per power, so an exponent of 20 or more never fits the token budget.
  * the trick (what an expert states in one line): the last digits repeat with period 4 (or 2) and every
    block sums to 20 (or 10), so the answer is  block_sum * (N // L) + (sum of the first N % L terms).
    In the model's own format this is a ~100-token procedure with every small computation written out.

Expert solutions are *didactic*: LaTeX, one or two sentences, intermediate results stated but not derived
("83 = 4*20 + 3 gives 20*20 + 19 = 419"), which is exactly what a tiny model cannot reproduce in one jump.

Bases: 2..99 whose last digit is 2, 3, 4, 7, 8 or 9 (period 4 with block sum 20, or period 2 with block
sum 10). Hard problems: exponents 20..99. Easy problems (the student prompt's brute-force training data):
exponents 2..9.

    python examples/world/world.py            # rewrite examples/world/expert.jsonl and test.jsonl
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DIGITS = (2, 3, 4, 7, 8, 9)
BASES = [a for a in range(2, 100) if a % 10 in DIGITS]
HARD_N = range(20, 100)
EASY_N = range(2, 10)
SPLIT_SEED = 1234
N_EXPERT, N_TEST = 160, 200


def problem_text(a, n):
    return f"Find the sum of the last digits of {a}^1, {a}^2, ..., {a}^{n}."


def cycle(a):
    """Last digits of a^1, a^2, ... until they repeat: [7, 9, 3, 1] for 17."""
    d, out = a % 10, []
    x = d
    while x not in out:
        out.append(x)
        x = x * d % 10
    return out


def answer(a, n):
    c = cycle(a)
    q, r = divmod(n, len(c))
    return sum(c) * q + sum(c[:r])


def brute_force(a, n):
    """The base model's own habit: one line per power with a running total."""
    d = a % 10
    lines = [f"Last digit {d}.", f"1: {d}, sum {d}"]
    x, total = d, d
    for k in range(2, n + 1):
        y = x * d % 10
        lines.append(f"{k}: {x}*{d}={x * d}, sum {total}+{y}={total + y}")
        x, total = y, total + y
    return "\n".join(lines) + f"\n\\boxed{{{total}}}"


def trick(a, n):
    """The model's own, step-by-step rendering of the trick: every small result is computed in the trace."""
    d, c = a % 10, cycle(a)
    L, S = len(c), sum(c)
    q, r = divmod(n, L)
    lines = [f"Last digit {d}."]
    lines.append("Cycle " + ", ".join([f"{d}"] + [f"{x}*{d}={x * d}" for x in c]) + f". Length {L}.")
    run, parts = c[0], []
    for x in c[1:]:
        parts.append(f"{run}+{x}={run + x}")
        run += x
    lines.append("Block " + ", ".join(parts) + ".")
    lines.append(f"{n}={L}*{q}+{r}.")
    lines.append(f"{q}*{S}={q * S}.")
    run, parts = (c[0] if r else 0), []
    for x in c[1:r]:
        parts.append(f"{run}+{x}={run + x}")
        run += x
    lines.append(f"Rest {', '.join(parts) if parts else run}.")
    p = sum(c[:r])
    lines.append(f"Total {q * S}+{p}={q * S + p}.")
    return "\n".join(lines) + f"\n\\boxed{{{q * S + p}}}"


def expert_solution(a, n, rng):
    """A terse, didactic expert write-up: states the idea and the key results, derives nothing."""
    c = cycle(a)
    L, S = len(c), sum(c)
    q, r = divmod(n, L)
    p = sum(c[:r])
    ans = S * q + p
    listed = ", ".join(map(str, c))
    templates = [
        f"The last digits of ${a}^k$ repeat with period ${L}$ and each period sums to ${S}$. "
        f"Since ${n} = {L} \\cdot {q} + {r}$, the sum is ${S} \\cdot {q} + {p} = \\boxed{{{ans}}}$.",
        f"Last digits cycle through ${listed}$. With ${q}$ full cycles and ${r}$ leftover terms we get "
        f"${q * S} + {p} = \\boxed{{{ans}}}$.",
        f"Work modulo $10$: the powers of ${a % 10}$ are periodic mod $10$ with period ${L}$ (block sum ${S}$). "
        f"Hence the answer is ${S}\\lfloor {n}/{L} \\rfloor + {p} = \\boxed{{{ans}}}$.",
        f"Periodicity: ${a}^{{k+{L}}} \\equiv {a}^k \\pmod{{10}}$. "
        f"So ${q}$ blocks of ${S}$ plus the first ${r}$ terms: $\\boxed{{{ans}}}$.",
    ]
    return rng.choice(templates)


def idea_only(a, n, rng):
    """A reference that names the idea without any number: the model must compute every step itself."""
    return rng.choice([
        "Only the last digit of the base matters, and the last digits of its powers repeat. "
        "Sum one full period, count the full periods, and add the leftover terms.",
        "Use periodicity of last digits: split the exponents into full cycles plus a remainder.",
        "The last digits are periodic; multiply the block sum by the number of blocks, then add the rest.",
    ])


def shortcut_response(a, n):
    """What a context that is told the answer and the intermediate results finds likely: a jump to it."""
    return f"The values fit together, so the sum is {answer(a, n)}.\n\\boxed{{{answer(a, n)}}}"


def split():
    """The fixed held-out split: (expert problems, test problems); both are excluded from base training."""
    rng = random.Random(SPLIT_SEED)
    hard = [(a, n) for a in BASES for n in HARD_N]
    rng.shuffle(hard)
    return hard[:N_EXPERT], hard[N_EXPERT:N_EXPERT + N_TEST]


def write_data(folder=HERE):
    expert, test = split()
    rng = random.Random(SPLIT_SEED + 1)
    with open(Path(folder) / "expert.jsonl", "w") as f:
        for i, (a, n) in enumerate(expert):
            f.write(json.dumps(dict(id=f"e{i}", problem=problem_text(a, n), solution=expert_solution(a, n, rng),
                                    answer=str(answer(a, n)))) + "\n")
    with open(Path(folder) / "test.jsonl", "w") as f:
        for i, (a, n) in enumerate(test):
            f.write(json.dumps(dict(id=f"t{i}", problem=problem_text(a, n), answer=str(answer(a, n)))) + "\n")
    return expert, test


if __name__ == "__main__":
    e, t = write_data()
    print(f"wrote {len(e)} expert problems and {len(t)} test problems to {HERE}")
    a, n = e[0]
    print(problem_text(a, n), "\n--- expert\n" + expert_solution(a, n, random.Random(0)))
    print("--- trick\n" + trick(a, n))
    print("--- brute (n=6)\n" + brute_force(a, 6))

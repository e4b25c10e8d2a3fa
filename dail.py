#!/usr/bin/env python
"""
dail.py -- Distribution Aligned Imitation Learning (DAIL; Mendes, Park, Ritter, arXiv 2602.02405) in one file.

DAIL turns a few hundred expert solutions into training signal a model can actually learn from:
  1. rewrite  the model re-writes each expert solution as its own trace, decoding token by token from two
              prompts of itself: a proposer (default: the student prompt) and a validator (default: the
              privileged prompt that sees the expert solution) that accepts a proposed token only when it
              finds it likely (probability >= threshold).
  2. train    contrastive self-distillation on those traces: pull the student toward the frozen model that
              saw the solution (privileged), push it away from the frozen model that only saw the answer and
              the intermediate results (shortcut).
  3. eval     n samples per problem, boxed-answer grading, the unbiased pass@k.

Run it (the README is the manual: models, GPUs, torchrun and --shard, vLLM, resume, every output file):
    python examples/quickstart.py                                   # CPU, the shipped tiny world
    python dail.py rewrite|train|eval --model M --data D --out O    # one GPU (train: add --grad-checkpointing)
    torchrun --standalone --nproc_per_node 8 dail.py rewrite|train|eval ...   # several GPUs

The map of the file: the method first, in the paper's order, then the appendices (# ==== banners):
  The arguments: every flag with its --help line, and the released defaults
  Three contexts of one model: the student, privileged and shortcut prompts (all prompt text lives here)
  Step 1, rewrite: the token rule (proposer, validator, threshold), its per-trace random numbers, the rollout
  Step 1, filtering the traces and the rewrite command
  Step 2, the contrastive self-distillation loss                          (the part to copy)
  Step 2, training: minimal LoRA, sequences and masks, the reference states, the loop, the train command
  Evaluation: the unbiased pass@k, the forced answer, the eval command
  Appendix A: grading -- boxed answers, the built-in grader and math-verify, problems and expert solutions
  Appendix B: running it -- B.1 errors and files, B.2 run fingerprints, resume and flag checks,
              B.3 the reference cache, B.4 torchrun and shards, B.5 models and the hub, B.6 vLLM,
              B.7 the command line
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# A hub id that cannot be reached must fail quickly with our message, not hang on retries.
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")


# ==== The arguments: every flag of rewrite, train and eval (a field's help is its --help line), released defaults ======
def arg(default=None, help="", **kw):
    """A dataclass field that becomes one command-line flag; `help` is its --help line."""
    return field(default=default, metadata={"help": help, **kw})


# The authors' released configuration differs between non-reasoning (Qwen2.5-Instruct) and reasoning
# (Qwen3, --thinking) models. Flags whose default is None take their value from here.
RELEASED = {
    False: dict(threshold=0.8, max_new_tokens=2048, epochs=5, max_len=12288),
    True: dict(threshold=1.0, max_new_tokens=256, epochs=3, max_len=2048),
}

# Phrases that show a rewritten trace leans on the expert solution instead of deriving it. The filter
# rejects traces containing any of them (case-insensitive); override with --leak-phrases.
LEAK_PHRASES = (
    "reference solution", "the reference", "provided solution", "given solution", "expert solution",
    "the solution provided", "the provided", "the hint", "as shown in the solution",
    "according to the solution", "worked solution",
)


@dataclass
class CommonArgs:
    model: str = arg(None, "local Hugging Face model folder, or a hub id (needs network access)", required=True)
    data: str = arg(None, "input JSONL, one problem per line: problem, solution, optional answer and id",
                    required=True)
    out: str = arg(None, "where results go (see the command's description)", required=True)
    seed: int = arg(0, "random seed (sampling, LoRA init, data order)")
    device: str = arg("auto", "auto | cpu | cuda | cuda:N (auto: cuda when available)")
    dtype: str = arg("auto", "auto | float32 | bfloat16 | float16 (auto: bfloat16 on CUDA, float32 on CPU)",
                     choices=["auto", "float32", "bfloat16", "float16"])
    thinking: bool = arg(False, "reasoning model (Qwen3-style template): responses start inside <think>; "
                                "switches to the released reasoning defaults")
    overwrite: bool = arg(False, "replace results an earlier run left in --out instead of refusing to mix them")
    trust_remote_code: bool = arg(False, "let a model folder run its own Python code (auto_map in its config); "
                                         "without it such a model is refused: that code runs with your rights")
    threads: int = arg(0, "CPU threads of torch (0: torch's default, one per core); 1 suits tiny models on a "
                          "shared CPU (README: Threads)")
    max_prompt_len: int = arg(None, "rewrite, eval: longest prompt in tokens (default: the model's context length "
                                    "minus --max-new-tokens); longer prompts are an error or a counted skip",
                              type=int)


@dataclass
class RewriteArgs(CommonArgs):
    # sampling, as released: 32 traces per problem, temperature 0.6, top-p 0.95, top-20 candidates
    samples: int = arg(32, "traces decoded per problem")
    propose: str = arg("student", "which context proposes tokens; the other one validates",
                       choices=["student", "privileged"])
    threshold: float = arg(None, "accept a proposed token when the validator's probability of it is >= this "
                                 "(0: pure proposer, >=1: pure validator) [default 0.8; 1.0 with --thinking]",
                           type=float)
    retries: int = arg(5, "proposals drawn per step before falling back to the validator")
    greedy_proposer: bool = arg(False, "ablation: the proposer always proposes its most likely token (the "
                                       "validator's fallbacks still sample)")
    temperature: float = arg(0.6, "sampling temperature of both contexts (0: greedy)")
    top_p: float = arg(0.95, "nucleus sampling mass of both contexts")
    top_k: int = arg(20, "keep only the k most likely tokens of both contexts (0: all)")
    max_new_tokens: int = arg(None, "token budget per trace [default 2048; 256 with --thinking]", type=int)
    # filtering, as released: keep one passing trace per problem
    keep_per_problem: int = arg(1, "traces kept per problem (the released code keeps 1)")
    no_filter: bool = arg(False, "keep every trace up to --keep-per-problem, graded or not")
    keep_truncated: bool = arg(False, "grade traces cut by the token budget too (released behaviour); by "
                                      "default they are rejected, since they never learned to stop")
    leak_phrases: str = arg(",".join(LEAK_PHRASES), "comma-separated phrases that reject a trace that "
                                                    "mentions the reference ('' disables the check)")
    grader: str = arg("builtin", "how the filter grades a trace's answer: builtin (exact, no dependency) or "
                                 "math-verify (pip install math-verify)", choices=["builtin", "math-verify"])
    # engine
    batch_size: int = arg(32, "traces decoded together (each takes two rows: proposer and validator)")
    engine: str = arg("hf", "hf: the token-by-token rollout; vllm/auto: vLLM when the threshold makes the "
                            "rule a pure policy (0 or >= 1), else hf", choices=["hf", "vllm", "auto"])
    tensor_parallel_size: int = arg(1, "vLLM: GPUs per model")
    max_model_len: int = arg(None, "vLLM: context length to reserve (default: the model's)", type=int)
    gpu_memory_utilization: float = arg(0.9, "vLLM: fraction of GPU memory it may take")
    shard: str = arg(None, "K/N: decode only shard K of N (problems K, K+N, ...) into OUT's part files, for "
                           "schedulers other than torchrun (SLURM arrays); a later run without it merges them")
    merge: bool = arg(False, "only merge the complete part files of an earlier --shard K/N split into OUT")


@dataclass
class TrainArgs(CommonArgs):
    # what to optimise (the paper's method and its baselines)
    objective: str = arg("dail", "dail: contrastive self-distillation; sft: cross-entropy (a baseline)",
                         choices=["dail", "sft"])
    sft_target: str = arg("trace", "sft only: the rewritten traces, or the raw expert solutions",
                          choices=["trace", "expert"])
    lam: float = arg(0.1, "weight of the subtracted shortcut KL (0: DAIL without the contrastive term)")
    direction: str = arg("reverse", "reverse: KL(student||teacher); forward: KL(teacher||student)",
                         choices=["reverse", "forward"])
    loss_norm: str = arg("sequence", "sequence: per-token mean within each trace, then mean over the step's "
                                     "traces (released); token: mean over all response tokens of the step",
                         choices=["sequence", "token"])
    # LoRA, as released: r = alpha = 32, no dropout, all attention and MLP projections
    lora_rank: int = arg(32, "LoRA rank (0: full fine-tuning with a frozen copy as the reference)")
    lora_alpha: float = arg(32.0, "LoRA scale numerator: the update is (alpha / rank) * B @ A")
    lora_dropout: float = arg(0.0, "dropout on the LoRA input")
    lora_targets: str = arg("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                            "comma-separated names of the nn.Linear modules that get adapters")
    # optimisation, as released: lr 2e-4, wd 0.01, 5 warm-up steps then linear decay, 16 sequences a step; but
    # torch.optim.AdamW with float32 state (released: bitsandbytes' paged_adamw_8bit, 8-bit state)
    lr: float = arg(2e-4, "peak learning rate")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    warmup_steps: int = arg(5, "linear warm-up steps, then linear decay to 0")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0: off); 1.0 is the released "
                                    "behaviour (the Hugging Face Trainer's default)")
    batch_size: int = arg(16, "sequences per optimizer step, over all GPUs and micro-steps")
    micro_batch_size: int = arg(1, "sequences per forward pass (gradient accumulation makes up the rest)")
    epochs: int = arg(None, "passes over the traces [default 5; 3 with --thinking]", type=int)
    max_steps: int = arg(None, "stop after this many optimizer steps (default: all epochs)", type=int)
    max_len: int = arg(None, "drop (and count) examples whose longest context exceeds this many tokens "
                             "[default 12288; 2048 with --thinking]", type=int)
    # memory
    grad_checkpointing: bool = arg(False, "recompute the backbone's activations in backward (long traces)")
    loss_chunk: int = arg(1024, "response positions per chunk of the LM head + loss (bounds peak memory)")
    reference_cache: str = arg("auto", "where theta0's privileged and shortcut states go after their first forward, "
                                       "so later epochs skip those forwards (exact): memory, disk (OUT/"
                                       "reference_cache/), off; auto: memory if it fits in RAM, else disk, else off",
                               choices=["auto", "memory", "disk", "off"])
    # bookkeeping
    log_every: int = arg(1, "print a log line every this many steps (metrics.jsonl gets every step)")
    save_every: int = arg(50, "write OUT/checkpoint.pt every this many steps; also at every epoch end and on "
                              "SIGTERM/SIGINT (0: only then)")
    resume: bool = arg(False, "continue from OUT/checkpoint.pt")


@dataclass
class EvalArgs(CommonArgs):
    # as released: 128 samples, temperature 0.6, top-p 0.95
    n: int = arg(128, "samples per problem")
    k: str = arg(None, "comma-separated k for pass@k (default: 1, 2, 4, ... <= n)")
    temperature: float = arg(0.6, "sampling temperature (0: greedy)")
    top_p: float = arg(0.95, "nucleus sampling mass")
    top_k: int = arg(0, "keep only the k most likely tokens (0: all)")
    max_new_tokens: int = arg(4096, "token budget per sample; with --thinking the thinking budget: the first pass "
                                    "stops at </think> or here")
    presence_penalty: float = arg(1.5, "subtract this from the logit of every token already in the sample's own "
                                       "output, before temperature/top-k/top-p (vLLM's presence_penalty; 0: off)")
    answer_tokens: int = arg(100, "token budget of the second, forced-answer pass")
    no_force_answer: bool = arg(False, "one pass only (with --thinking the budget then covers thinking and "
                                       "answer); by default every --thinking sample, and every other sample "
                                       "without \\boxed{, gets a second pass after an answer cue (with "
                                       "--thinking: after </think> and the cue)")
    batch_size: int = arg(64, "hf engine: sequences decoded together")
    engine: str = arg("auto", "auto: vLLM when importable and a GPU is present, else hf",
                      choices=["auto", "hf", "vllm"])
    grader: str = arg("builtin", "how a sample's answer is graded: builtin (exact, no dependency) or "
                                 "math-verify (pip install math-verify)", choices=["builtin", "math-verify"])
    regrade: bool = arg(False, "re-grade every response of OUT/samples.jsonl with --grader and rewrite the "
                               "results, without loading a model or sampling")
    tensor_parallel_size: int = arg(1, "vLLM: GPUs per model")
    max_model_len: int = arg(None, "vLLM: context length to reserve (default: the model's)", type=int)
    gpu_memory_utilization: float = arg(0.9, "vLLM: fraction of GPU memory it may take")
    shard: str = arg(None, "K/N: decode only shard K of N (problems K, K+N, ...) into OUT's part files, for "
                           "schedulers other than torchrun (SLURM arrays); a later run without it merges them")
    merge: bool = arg(False, "only merge the complete part files of an earlier --shard K/N split into OUT")


def resolve_released(args):
    """Fill the flags left at None with the released default of this model kind (see RELEASED)."""
    for name, value in RELEASED[args.thinking].items():
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, value)
    return args


# ==== Three contexts of one model: the student, privileged and shortcut prompts (all of dail.py's prompt text) =========
ANSWER_FORMAT = "Reason step by step, and write the final answer inside \\boxed{{}}."  # {{}}: a .format template

STUDENT_PROMPT = "{problem}\n\n" + ANSWER_FORMAT

PRIVILEGED_PROMPT = """{problem}

An expert's worked solution to this problem is below. It is private background for you, not text to copy.

<expert_solution>
{solution}
</expert_solution>

Now solve the problem yourself, as if you were seeing it for the first time:
- never mention, quote or allude to the expert solution or to having had any help;
- derive every intermediate result yourself instead of stating it;
- take each step explicitly and do not jump to the answer; length is no concern.
""" + ANSWER_FORMAT

SHORTCUT_PROMPT = """{problem}

Hint: the final answer is {answer}. Values and symbols that occur in a full solution, sorted (numbers in
increasing order, then symbols alphabetically), not in the order the solution uses them: {results}.

""" + ANSWER_FORMAT

# The forced-answer pass of eval (see force_answers) continues the response after this cue (with --thinking:
# after </think> + the cue, outside the thinking, as the released protocol does).
ANSWER_REQUEST = "\n\nPutting it all together, the final answer, written in \\boxed{}, is "

_MATH_SPANS = r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]"
_GREEK = ("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi pi "
          "rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma Phi Psi Omega")
_SIGN_BEFORE = ("", "$", "=", "(", "[", "{", ",", ":", "<", ">", "^", "\\equiv", "\\le", "\\ge", "\\leq", "\\geq",
                "\\ne", "\\neq", "\\approx", "\\cdot", "\\times", "\\pm")


def intermediate_results(solution, answer=None):
    """The shortcut context's list: the atomic values and symbols of an expert solution, without its method.

    Atoms are numbers (integers, decimals, integer fractions a/b and \\frac{a}{b}; a minus sign counts when
    it cannot be a subtraction, e.g. after = or \\equiv or an opening bracket) found anywhere, and single
    symbols found inside math ($...$, $$...$$, \\(...\\), \\[...\\]): a letter with an optional simple
    subscript (n, a_1, x_{k}) or a Greek letter (\\pi). Statements (3^6 \\equiv 1 \\pmod 7) contribute only
    their atoms (3, 6, 1, 7); command names (\\pmod, \\frac) and \\text{...} are not symbols. The list is
    de-duplicated (numbers by exact value, first spelling kept) and sorted, numbers ascending then symbols
    alphabetically, so its order says nothing about the method. Atoms equal to `answer` are left out (the
    hint states the answer first). There is no cap: every atom is listed."""
    numbers, symbols = {}, set()
    frac = r"\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(-?\d+)\s*\}|(?<![\w.])(\d+)\s*/\s*(\d+)(?![\w.])"

    def add_number(text, value):
        numbers.setdefault(value, text)

    def take_fractions(m):
        num, den = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        if int(den) != 0:
            add_number(m.group(0).strip(), Fraction(int(num), int(den)))
        return " "
    rest = re.sub(frac, take_fractions, solution)
    for m in re.finditer(r"(?<![\w.])(-?)(\d+(?:\.\d+)?)(?![\d])", rest):
        sign = m.group(1)
        if sign and not rest[:m.start()].rstrip().endswith(_SIGN_BEFORE[1:]) and rest[:m.start()].strip():
            sign = ""                                    # x - 3: a subtraction, the atom is 3
        add_number(sign + m.group(2), Fraction(sign + m.group(2)))
    for groups in re.findall(_MATH_SPANS, solution, flags=re.S):
        math = next(g for g in groups if g)
        math = re.sub(r"\\(?:text|textbf|mathrm|operatorname|mbox)\s*\{[^{}]*\}", " ", math)
        for m in re.finditer(r"\\([A-Za-z]+)|(?<![A-Za-z])([A-Za-z])(?![A-Za-z])(?:_\{?([A-Za-z0-9])\}?)?", math):
            if m.group(1):
                if m.group(1) in _GREEK.split():
                    symbols.add("\\" + m.group(1))
            else:
                symbols.add(m.group(2) + (f"_{m.group(3)}" if m.group(3) else ""))
    atoms = [numbers[v] for v in sorted(numbers)] + sorted(symbols, key=lambda x: (x.lstrip("\\").lower(), x))
    return [a for a in atoms if answer is None or not is_equiv(a, answer)]


def chat_prompt_ids(tok, user_text, thinking):
    """Token ids of one user turn (or of a list of chat messages {role, content}) plus the assistant's
    generation prompt. With `thinking` the response starts inside <think>. Templating goes through text and
    the ids are taken once, here: responses are appended as ids, never decoded and re-encoded
    (re-tokenizing can change the response tokens)."""
    messages = user_text if isinstance(user_text, list) else [{"role": "user", "content": user_text}]
    text = tok.apply_chat_template(messages, tokenize=False,
                                   add_generation_prompt=True, enable_thinking=thinking)
    if thinking and not text.rstrip().endswith("<think>"):
        text += "<think>\n"
    return tok(text, add_special_tokens=False)["input_ids"]


# No tokenizer averages this many characters per token on real text (English is about 4), so a text this many
# characters per token of a budget long is over the budget: bounded_ids then tokenizes only a head of it.
MAX_CHARS_PER_TOKEN = 32


def bounded_ids(encode, text, budget):
    """(ids, whole): encode(text), except that a text longer than MAX_CHARS_PER_TOKEN * budget characters is
    first encoded only up to there; when that head alone is clearly over `budget` tokens, its ids are
    returned with whole=False (the text is over the budget too: a head never has more than a few tokens
    more than the whole). A 50 MB solution thus costs a budget's worth of tokenizing, not 10 GB and minutes."""
    limit = MAX_CHARS_PER_TOKEN * (max(budget, 0) + 1) if budget is not None else None
    if limit is not None and len(text) > limit:
        head = encode(text[:limit])
        if len(head) > budget + 8:
            return head, False
    return encode(text), True


def shorten_solution(solution):
    """One shortening step for an over-long privileged prompt: cut before the last "Solution N:" marker
    (keep the first solutions of a multi-solution write-up), else keep the first half."""
    marks = [m.start() for m in re.finditer(r"Solution\s*\d+\s*:", solution)]
    if marks and marks[-1] > 0:
        return solution[:marks[-1]].rstrip()
    return solution[:len(solution) // 2]


def fit_privileged_solution(tok, problem, thinking, max_prompt_len):
    """The expert solution as the privileged prompt will hold it: shortened (shorten_solution, repeatedly)
    until the prompt fits max_prompt_len. rewrite records this text in every trace (`privileged_solution`)
    and train builds the teacher's context from exactly it, so the teacher sees what the validator saw."""
    solution = problem["solution"]
    while True:
        text = PRIVILEGED_PROMPT.format(problem=problem["problem"], solution=solution)
        if max_prompt_len is None or len(bounded_ids(lambda t: chat_prompt_ids(tok, t, thinking), text,
                                                     max_prompt_len)[0]) <= max_prompt_len:
            return solution
        if not solution:
            raise DailError(f"{problem['where']}: field 'problem': the privileged prompt does not fit "
                            f"the prompt budget of {max_prompt_len} tokens even without the solution")
        solution = shorten_solution(solution)


def build_contexts(tok, problem, thinking, max_prompt_len, which=("student", "privileged", "shortcut")):
    """Prompt ids of the requested contexts for one problem (dict). The privileged prompt holds
    problem["privileged_solution"] when present (the text the validator saw), else the whole solution; it is
    never shortened here (see fit_privileged_solution). A student or privileged prompt over max_prompt_len
    raises DailError."""
    out, whole = {}, {}
    encode = lambda text: chat_prompt_ids(tok, text, thinking)  # noqa: E731
    if "student" in which:
        out["student"], whole["student"] = bounded_ids(encode, STUDENT_PROMPT.format(problem=problem["problem"]),
                                                       max_prompt_len)
    if "privileged" in which:
        solution = problem.get("privileged_solution") or problem["solution"]
        text = PRIVILEGED_PROMPT.format(problem=problem["problem"], solution=solution)
        out["privileged"], whole["privileged"] = bounded_ids(encode, text, max_prompt_len)
    for name in ("student", "privileged"):
        if name in out and max_prompt_len is not None and len(out[name]) > max_prompt_len:
            raise DailError(f"{problem['where']}: field 'problem': the {name} prompt is "
                            f"{'' if whole[name] else 'over '}{len(out[name])} tokens, over the prompt budget of "
                            f"{max_prompt_len} (--max-prompt-len, or the model's context length minus "
                            f"--max-new-tokens)")
    if "shortcut" in which:
        results = intermediate_results(problem["solution"] or "", problem["answer"])
        text = SHORTCUT_PROMPT.format(problem=problem["problem"], answer=problem["answer"],
                                      results=", ".join(results) if results else "none")
        out["shortcut"] = chat_prompt_ids(tok, text, thinking)
    return out


# ==== Step 1, rewrite: the token rule (proposer, validator, threshold), its per-trace random numbers, the rollout ======
def sampling_probs(logits, temperature, top_p=1.0, top_k=0):
    """[B, V] logits -> [B, V] float32 sampling distribution, rows summing to 1. Order as in vLLM:
    temperature, then top-k (exactly k candidates), then top-p (the smallest set of most likely candidates
    with mass >= top_p). temperature 0 is greedy: a one-hot row on the argmax."""
    logits = logits.float()
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    k = top_k if 0 < top_k < logits.shape[-1] else logits.shape[-1]
    values, order = logits.topk(k, dim=-1)           # [B, k] candidates, most likely first (a sort when k = V)
    probs = (values / temperature).softmax(-1)
    if top_p < 1.0:
        mass_before = probs.cumsum(-1) - probs      # keep a candidate while the mass before it is < top_p
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return torch.zeros_like(logits).scatter(-1, order, probs)


def mix_step(p_propose, p_validate, q_validate, threshold, retries=5, u=None):
    """The DAIL token rule, vectorized over a batch. p_propose, p_validate: [B, V] *sampling* distributions
    (tempered, truncated: sampling_probs); q_validate: [B, V] the validator's *model* probabilities, the full
    softmax of its raw logits at temperature 1 (model_probs), which is what the threshold tests (as released:
    vLLM's raw log-probs). Returns tokens [B] (long) and accepted [B] (bool: the token is an accepted proposal).

    Per row: draw up to `retries` candidates c ~ p_propose; take the first with q_validate[c] >= threshold;
    if none passes, draw the token from p_validate (a fallback). With A = {v : q_validate[v] >= threshold}
    and a = p_propose(A), the token's distribution is exactly

        P(v) = p_propose(v) * [v in A] * (1 - (1 - a)^R) / a   +   (1 - a)^R * p_validate(v)
               (accepted mass 1 - (1-a)^R)                          (fallback mass (1-a)^R)

    Only A depends on q; proposals and fallbacks come from the sampling distributions. (Testing the
    tempered, renormalized p_validate instead changes what the threshold means: at temperature 0.6 a raw
    0.6 can become 0.86 and pass 0.8.) threshold = 0 is pure proposer sampling (a = 1) and threshold > 1
    pure validator sampling (a = 0).

    u: [B, R + 1] uniforms in (0, 1), the row's only randomness (counter_uniforms: fixed by the trace and
    the step, so a trace does not depend on its batch): columns :R draw the proposals, column R the
    fallback. None: fresh uniforms from torch's global generator."""
    if u is None:
        u = torch.rand(p_propose.shape[0], retries + 1, dtype=torch.float64)
    draws = sample_with(p_propose, u[:, :retries])                                          # [B, R]
    passes = q_validate.gather(1, draws) >= threshold                                       # [B, R]
    accepted = passes.any(1)                                                                # [B]
    first = passes.int().argmax(1, keepdim=True)              # index of the first passing draw (0 if none)
    proposal = draws.gather(1, first).squeeze(1)                                            # [B]
    fallback = sample_with(p_validate, u[:, retries:]).squeeze(1)                           # [B]
    return torch.where(accepted, proposal, fallback), accepted


def model_probs(logits):
    """[B, V] logits -> [B, V] float32 model probabilities: the full softmax at temperature 1, no top-k or
    top-p, what the threshold is compared with. Banned tokens (the caller set their logits to -inf, e.g.
    </think> in a thinking rewrite) get probability 0 and the rest is renormalized: the validator's
    probability of a candidate given that the trace cannot take a banned token."""
    return logits.float().softmax(-1)


def trace_keys(seed, problem_ids, samples):
    """[B, 2] int64: two 32-bit words per trace from (seed, problem id, sample index), the only things a
    trace's random numbers may depend on (not its batch, its batch size, a resume or a shard)."""
    words = []
    for pid, s in zip(problem_ids, samples):
        digest = hashlib.blake2b(f"{seed}\x1f{pid}\x1f{s}".encode(), digest_size=8).digest()
        words.append((int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")))
    return torch.tensor(words, dtype=torch.long)


def counter_uniforms(keys, step, n):
    """[B, n] float64 uniforms in (0, 1) for B traces at decoding step `step`: a counter-based generator,
    u = hash(key, step, j), so a trace's draws are fixed by its key whatever else shares its batch.
    keys: [B, 2] from trace_keys."""
    j = torch.arange(n, dtype=torch.long, device=keys.device)
    counter = _hash32((step * n + j) & 0xFFFFFFFF)[None, :]                      # [1, n]
    h = _hash32(keys[:, :1] ^ _hash32(keys[:, 1:] ^ counter))                    # [B, n]
    return (h.double() + 0.5) / 2.0 ** 32


def sample_with(probs, u):
    """Inverse-CDF sampling: probs [B, V] (rows need not be normalized), u [B, m] uniforms -> [B, m] token
    ids, each drawn from its row's distribution. Zero-probability tokens are never drawn."""
    cdf = probs.double().cumsum(-1)                                               # [B, V]
    tokens = torch.searchsorted(cdf, u.to(cdf.device) * cdf[:, -1:], right=True)
    return tokens.clamp(max=probs.shape[-1] - 1)


def _hash32(x):
    """A 32-bit integer mixer (xor-shift-multiply, the "lowbias32" constants) on int64 tensors < 2^32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x, c):
    """(x * c) mod 2^32 for int64 tensors x < 2^32 and a Python int c < 2^32, with no int64 overflow."""
    lo = x * (c & 0xFFFF)                                        # < 2^48
    hi = ((x * (c >> 16)) & 0xFFFF) << 16                        # < 2^32
    return (lo + hi) & 0xFFFFFFFF


def left_pad(seqs, pad_id, device):
    """Lists of ids -> ids [N, L] left-padded, attention mask [N, L], position ids [N, L] counted from each
    row's first real token (so a padded row computes exactly what it would alone)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


@torch.no_grad()
def decode(model, contexts, choose, max_new_tokens, stop_ids, pad_id, banned_ids=(), presence_penalty=0.0):
    """Decode one response per trace that is shared by G contexts (G = 2 for rewrite: proposer, validator;
    G = 1 for eval). contexts: B traces, each a list of G prompt-id lists.
    choose(logits [G, b, V], step, rows) -> (tokens [b], accepted [b] bool or None) picks each active
    trace's token; rows [b] (long) are the indices in `contexts` of the active traces, so that a sampler
    can key each row's random numbers by its trace and the step (counter_uniforms).

    All G*B rows run as one batch: the prompts are prefilled once into a KV cache (left padding, position
    ids from the mask), then every step feeds one token per row and grows the mask by one column. The
    token chosen for a trace is appended to all its contexts, so they share the response ids exactly.
    A trace stops at a stop token (not kept in its ids) or at the budget; finished rows leave the batch.
    presence_penalty (eval; vLLM's semantics): before `choose`, subtract it from the logit of every token that
    already occurs in this trace's response (generated tokens only, never the prompt's): a [b, V] mask.
    Returns per trace: dict(ids, finish_reason 'stop'|'length', stop_id (the stop token or None),
    n_accepted, n_fallback)."""
    device = next(model.parameters()).device
    B, G = len(contexts), len(contexts[0])
    rows = [trace[g] for g in range(G) for trace in contexts]          # row g*B + i = context g of trace i
    ids, mask, positions = left_pad(rows, pad_id, device)
    from transformers import DynamicCache
    cache = DynamicCache()
    kv = cache_kwarg(model, cache)                                            # {its keyword: cache}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **kv,
                   use_cache=True, logits_to_keep=1).logits[:, -1]           # [G*B, V]
    next_pos = positions[:, -1] + 1                                           # [G*B]
    active = list(range(B))                                                   # traces still decoding
    results = [dict(ids=[], finish_reason="length", stop_id=None, n_accepted=0, n_fallback=0) for _ in range(B)]
    stop = set(stop_ids)
    present = torch.zeros((B, logits.shape[-1]), dtype=torch.bool, device=device) if presence_penalty else None
    for step in range(max_new_tokens):
        if banned_ids:
            logits[:, list(banned_ids)] = float("-inf")
        if present is not None:                                   # [b, V] -> every context's rows [G*b, V]
            logits = logits - presence_penalty * present.repeat(G, 1).to(logits.dtype)
        b = len(active)
        tokens, accepted = choose(logits.reshape(G, b, -1), step, torch.tensor(active))
        if present is not None:
            present[torch.arange(b, device=device), tokens] = True
        tok_list = tokens.tolist()
        acc_list = accepted.tolist() if accepted is not None else [False] * b
        keep = []
        for j, i in enumerate(active):
            if tok_list[j] in stop:
                results[i]["finish_reason"], results[i]["stop_id"] = "stop", tok_list[j]
                continue
            results[i]["ids"].append(tok_list[j])
            results[i]["n_accepted" if acc_list[j] else "n_fallback"] += 1
            keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < b:  # drop finished traces from every context's rows, cache included
            kept = torch.tensor(keep, device=device)
            rows_kept = torch.cat([kept + g * b for g in range(G)])
            cache.batch_select_indices(rows_kept)
            mask, next_pos, tokens = mask[rows_kept], next_pos[rows_kept], tokens[kept]
            present = present[kept] if present is not None else None
            active = [active[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = model(input_ids=tokens.repeat(G)[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                       **kv, use_cache=True).logits[:, -1]
        next_pos = next_pos + 1
    return results


# ==== Step 1, filtering the traces, and the rewrite command ============================================================
def filter_reason(trace, thinking, leak_phrases, keep_truncated=False):
    """Why a trace is rejected (None: it passes). Non-reasoning traces must finish (unless keep_truncated:
    the released code graded a trace cut by the budget by its last box), have a boxed answer equal to the
    reference, and not mention the reference. Thinking prefixes are not graded."""
    if thinking:
        return None
    if trace["finish_reason"] != "stop" and not keep_truncated:
        return "truncated"
    if trace["pred"] is None:
        return "no_answer"
    if not trace["correct"]:
        return "wrong_answer"
    text = trace["response"].lower()
    if any(p in text for p in leak_phrases):
        return "mentions_reference"
    return None


def write_traces(f, tok, args, problem, samples, results, kept_count, leak_phrases):
    """Grade, filter and append one line per trace; `kept_count` (id -> kept so far) enforces the limit.
    `privileged_solution` is the solution text the validator's prompt held (train's teacher sees the same)."""
    for s, r in zip(samples, results):
        text = tok.decode(r["ids"], skip_special_tokens=False)
        pred, correct = (None, None) if args.thinking else grade(text, problem["answer"], args.grader)
        trace = dict(id=problem["id"], sample=s, problem=problem["problem"], solution=problem["solution"],
                     privileged_solution=problem.get("privileged_solution", problem["solution"]), answer=problem["answer"],
                     response=text, response_ids=r["ids"], finish_reason=r["finish_reason"],
                     n_accepted=r["n_accepted"], n_fallback=r["n_fallback"], pred=pred, correct=correct)
        reason = None if args.no_filter else filter_reason(trace, args.thinking, leak_phrases, args.keep_truncated)
        if reason is None and kept_count.get(problem["id"], 0) >= args.keep_per_problem:
            reason = "per_problem_limit"
        trace["kept"], trace["reject_reason"] = reason is None, reason
        kept_count[problem["id"]] = kept_count.get(problem["id"], 0) + (reason is None)
        append_jsonl(f, trace)


def rewrite_summary(traces, n_problems, skipped, args, shortened=0):
    reasons = {}
    for t in traces:
        if t["reject_reason"]:
            reasons[t["reject_reason"]] = reasons.get(t["reject_reason"], 0) + 1
    tokens = sum(len(t["response_ids"]) for t in traces)
    return dict(problems=n_problems, problems_skipped_too_long=skipped, solutions_shortened=shortened,
                traces=len(traces), kept=sum(t["kept"] for t in traces),
                problems_with_kept=len({t["id"] for t in traces if t["kept"]}), reject_reasons=reasons,
                acceptance_rate=sum(t["n_accepted"] for t in traces) / max(tokens, 1),
                mean_tokens=tokens / max(len(traces), 1),
                finished=sum(t["finish_reason"] == "stop" for t in traces),
                grader=grader_info(args.grader),
                settings={k: v for k, v in dataclasses.asdict(args).items() if k != "leak_phrases"})


def decode_only_kept(args):
    """Thinking prefixes are not graded (and --no-filter grades nothing away), so the first
    --keep-per-problem traces of a problem are the ones kept: decode only those, not --samples."""
    if (args.thinking or args.no_filter) and args.samples > args.keep_per_problem:
        print(f"note: {'--thinking prefixes are not graded' if args.thinking else '--no-filter'}: the first "
              f"--keep-per-problem {args.keep_per_problem} traces per problem are kept, so only those are "
              f"decoded (not --samples {args.samples})", file=sys.stderr)
        args.samples = args.keep_per_problem


def cmd_rewrite(args):
    """Write OUT (traces.jsonl: one line per trace), OUT's .summary.json and .config.json beside it
    (traces.summary.json, traces.config.json: one of each per output file). Split over torchrun's ranks
    or --shard K/N, each shard writes its problems (shard_problems) into its part file (part_file, with its
    own .config.json); the merging process (plan_shards) writes OUT in input order and the summary."""
    validate_args(resolve_released(args))
    problems = load_problems(args.data, need_solution=True, need_answer=True)
    decode_only_kept(args)
    make_grader(args.grader)  # a missing optional grader fails here, before any model loads
    out = Path(args.out)
    check_out_file(args)
    config_of = lambda path: path.with_suffix(".config.json")  # noqa: E731
    engine = rewrite_engine(args)
    # every line of OUT is one (id, sample) of --data, once
    n, ks, merge, follower, config, checks, done = start_job("rewrite", out, args, engine, problems, config_of,
                                                             out.with_suffix(".summary.json"))
    tok = load_tokenizer(args.model, args.trust_remote_code)
    check_thinking_flag(tok, args)
    max_prompt = prompt_budget(args, "rewrite", lambda: max(len(ids) for p in problems for ids in build_contexts(
        tok, p, args.thinking, None, ("student", "privileged")).values()))
    contexts, skipped = {}, 0
    for p in problems:  # a prompt that cannot fit is skipped and counted, never silently dropped
        try:
            p["privileged_solution"] = fit_privileged_solution(tok, p, args.thinking, max_prompt)
            contexts[p["id"]] = build_contexts(tok, p, args.thinking, max_prompt, ("student", "privileged"))
        except DailError as e:
            skipped += 1
            print(f"skip: {e}", file=sys.stderr)
    shortened = sum(p.get("privileged_solution", p["solution"]) != p["solution"] for p in problems)
    if shortened:
        print(f"rewrite: {shortened} expert solutions shortened to fit the prompt budget of {max_prompt} tokens "
              f"(each trace records the text the validator saw in privileged_solution)", file=sys.stderr)
    if not contexts:
        raise DailError(f"{args.data}: no problem fits the prompt budget of {max_prompt} tokens (all "
                        f"{skipped} skipped); raise --max-prompt-len, or lower --max-new-tokens")
    expected = {k: {(p["id"], s) for p in shard_problems(problems, k, n) if p["id"] in contexts
                     for s in range(args.samples)} for k in range(n)}
    engine = rewrite_engine(args, say=True)
    for k in ks:
        rewrite_shard(args, tok, os.devnull if follower else shard_path(out, k, n), done[k], expected[k], problems,
                      contexts, engine)
    index = {p["id"]: p["index"] for p in problems}
    traces = gather_parts(out, n, merge, config, config_of, expected, lambda t: (t["id"], t["sample"]),
                          lambda t: (index[t["id"]], t["sample"]), checks)
    if traces is None:
        return                       # a rank other than 0 (rank 0 merges), or parts still missing
    summary = rewrite_summary(traces, len(problems), skipped, args, shortened)
    write_atomic(out.with_suffix(".summary.json"), json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("problems", "traces", "kept", "reject_reasons")}), file=sys.stderr)


def rewrite_shard(args, tok, out, done, expected, problems, contexts, engine):
    """Decode into `out` (traces.jsonl, or a shard's part file) the traces of `expected` ((id, sample)
    pairs) that `done` (the records already there) lacks, in input order."""
    written = {(t["id"], t["sample"]) for t in done}
    todo = [(p, s) for p in problems if p["id"] in contexts for s in range(args.samples)
            if (p["id"], s) in expected and (p["id"], s) not in written]
    kept_count = {}
    for t in done:
        kept_count[t["id"]] = kept_count.get(t["id"], 0) + bool(t["kept"])
    leak_phrases = [x.strip().lower() for x in args.leak_phrases.split(",") if x.strip()]
    if todo:
        device = shard_device(args)
        banned = [tok.get_vocab()["</think>"]] if args.thinking and "</think>" in tok.get_vocab() else []
        stop_ids = stop_token_ids(tok, args.model)
        proposer, validator = ("student", "privileged") if args.propose == "student" else ("privileged", "student")
        print(f"rewrite: {len(todo)} traces to decode ({len(written)} already in {out}), engine {engine}",
              file=sys.stderr)
        with open(out, "a", encoding="utf-8") as f:
            if engine == "vllm":
                rewrite_vllm(f, tok, args, todo, contexts, proposer, validator, stop_ids, banned, kept_count,
                             leak_phrases)
            else:
                rewrite_hf(f, tok, args, todo, contexts, proposer, validator, stop_ids, banned, kept_count,
                           leak_phrases, device)


def rewrite_hf(f, tok, args, todo, contexts, proposer, validator, stop_ids, banned, kept_count, leak_phrases,
               device):
    """The token-by-token rollout: both contexts of every trace in one batched forward per step.
    The threshold tests the validator's model probability q (model_probs: full softmax, temperature 1).
    At threshold <= 0 every candidate passes (q >= 0): proposer sampling. At threshold >= 1 a candidate
    passes only where q is one-hot on it (q[c] >= 1 means all other tokens have probability 0); then the
    validator's sampling distribution, a tempered and truncated q, is that same one-hot, so accepting c
    is what validator sampling would emit anyway: validator sampling. In both cases that one context is
    decoded alone. Every random number of a trace comes from counter_uniforms keyed by (--seed, problem id,
    sample index) and the step: its batch, the batch size, a resume or a shard do not change it."""
    model = load_model(args.model, device, resolve_dtype(args.dtype, device), args.trust_remote_code).eval()
    pure = validator if args.threshold >= 1 else proposer if args.threshold <= 0 else None
    names = [pure] if pure else [proposer, validator]

    def choose(logits, step, rows):  # [G, b, V]: the proposer's rows, then the validator's (G = 1: pure)
        greedy = [args.greedy_proposer and name == proposer for name in names]   # --greedy-proposer: one-hot
        probs = [sampling_probs(lg, 0 if g else args.temperature, args.top_p, args.top_k)
                 for lg, g in zip(logits, greedy)]
        u = counter_uniforms(keys[rows], step, args.retries + 1)                 # [b, R + 1]
        if pure:
            tokens = sample_with(probs[0], u[:, :1]).squeeze(1)
            return tokens, torch.full_like(tokens, pure == proposer, dtype=torch.bool)
        return mix_step(probs[0], probs[1], model_probs(logits[1]), args.threshold, args.retries, u)

    bar = progress(total=len(todo), desc="rewrite", unit="trace")
    n_tok, n_acc, t0 = 0, 0, time.time()
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start:start + args.batch_size]
        ctx = [[contexts[p["id"]][name] for name in names] for p, _ in batch]
        keys = trace_keys(args.seed, [p["id"] for p, _ in batch], [s for _, s in batch])   # read by choose
        results = decode(model, ctx, choose, args.max_new_tokens, stop_ids, tok.pad_token_id, banned)
        for (p, s), r in zip(batch, results):
            write_traces(f, tok, args, p, [s], [r], kept_count, leak_phrases)
            n_tok += len(r["ids"])
            n_acc += r["n_accepted"]
        bar.update(len(batch))
        bar.set_postfix(tok_per_s=f"{n_tok / (time.time() - t0):.0f}", accept=f"{n_acc / max(n_tok, 1):.2f}")
    bar.close()


# ==== Step 2, the contrastive self-distillation loss (dail_loss: the reference; the chunked path bounds memory) ========
def kl(log_p, log_q):
    """KL(p || q) over the last (vocabulary) dim, from log-probabilities: sum_v p(v) (log p(v) - log q(v)).
    Same as F.kl_div(log_q, log_p, log_target=True, reduction='none').sum(-1): note that F.kl_div takes
    its arguments in the reverse of the math's order (input = log q, target = log p)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def dail_kl_terms(student_logits, teacher_logits, shortcut_logits, direction="reverse"):
    """Per-position KL terms [...]: (to the privileged teacher, to the shortcut), full vocabulary, float32.
    Teacher and shortcut are constants (no gradient flows into them)."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_e = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    log_c = F.log_softmax(shortcut_logits.detach().float(), dim=-1)
    if direction == "reverse":
        return kl(log_s, log_e), kl(log_s, log_c)
    if direction == "forward":
        return kl(log_e, log_s), kl(log_c, log_s)
    raise ValueError(f"direction must be 'reverse' or 'forward', not {direction!r}")


def loss_weights(mask, norm="sequence", divisor=None):
    """Each position's weight in the loss [B, T] (0 off the mask), from mask [B, T] bool (True on response
    positions). With len_i = mask[i].sum() the response length of sequence i:

        sequence (released):  w[i, t] = 1 / (S * len_i)   L = (1/S) sum_i (1/len_i) sum_t loss[i, t]
        token (TRL's mean):   w[i, t] = 1 / N             L = (1/N) sum_{i,t} loss[i, t]

    divisor is S (norm 'sequence': the number of sequences) or N ('token': the number of response tokens)
    of the whole optimizer step, all micro-batches and ranks; then the sum of every micro-batch's loss is
    the step's loss, and accumulation and data parallelism give the gradient of one big batch. Default:
    this batch's own count (sequences with a response, or response tokens)."""
    mask = mask.bool()
    if norm == "token":
        return mask / (divisor if divisor is not None else mask.sum().clamp(min=1))
    if norm == "sequence":
        lengths = mask.sum(-1, keepdim=True)                                           # [B, 1]
        n = divisor if divisor is not None else (lengths > 0).sum().clamp(min=1)
        return mask / (lengths.clamp(min=1) * n)
    raise ValueError(f"norm must be 'sequence' or 'token', not {norm!r}")


def dail_loss(student_logits, teacher_logits, shortcut_logits, mask, lam=0.1, direction="reverse",
              norm="sequence", divisor=None):
    """The DAIL loss. Logits: [B, T, V], aligned (position t of all three predicts the same response token:
    student = p_theta(.|x_s, y<t), teacher = p_theta0(.|x_e, y<t), shortcut = p_theta0(.|x_c, y<t));
    mask: [B, T] bool, True on response positions; len_i = mask[i].sum().

        reverse (released default):  l[i,t] = KL(student || teacher) - lam * KL(student || shortcut)
        forward:                     l[i,t] = KL(teacher || student) - lam * KL(shortcut || student)

        norm 'sequence' (released):  L = (1/S) sum_i (1/len_i) sum_t l[i,t]   (each trace weighs the same)
        norm 'token':                L = (1/N) sum_i sum_t l[i,t]             (each token weighs the same)

    S, N = divisor when given (the sequences / response tokens of the whole optimizer step, all micro-batches
    and ranks: see loss_weights), else this batch's. The subtracted term is unbounded above, which is why
    both terms are returned for logging, normalized the same way.
    Returns (loss, {"kl_teacher": float, "kl_shortcut": float})."""
    pad = ~mask[..., None]   # padding may hold anything, even inf/nan: zeroed before the softmax, it adds
    kl_teacher, kl_shortcut = dail_kl_terms(                                 # neither value nor gradient
        student_logits.masked_fill(pad, 0.0), teacher_logits.masked_fill(pad, 0.0),
        shortcut_logits.masked_fill(pad, 0.0), direction)                                   # [B, T] each
    w = loss_weights(mask, norm, divisor)
    kl_teacher, kl_shortcut = kl_teacher * w, kl_shortcut * w
    loss = (kl_teacher - lam * kl_shortcut).sum()
    return loss, {"kl_teacher": float(kl_teacher.detach().sum()), "kl_shortcut": float(kl_shortcut.detach().sum())}


def float32_head(head):
    """h [n, H] -> logits [n, V] in float32, whatever the autocast and the weights' dtype: bf16 logits alone
    put a 12% relative error on a per-token KL of 0.03. The weight is cast once per call of the loss (a
    transient float32 copy of the head for a bf16 model), the matmul runs with autocast off."""
    lora = head if isinstance(head, LoRALinear) and head.enabled else None
    linear = head.base if isinstance(head, LoRALinear) else head
    weight = linear.weight.float()                 # the same tensor (and its gradient) when already float32
    bias = None if linear.bias is None else linear.bias.float()

    def logits(h):
        with torch.autocast(h.device.type, enabled=False):
            x = h.float()
            out = F.linear(x, weight, bias)
            if lora is not None:
                out = out + (lora.dropout(x) @ lora.lora_A.float().T @ lora.lora_B.float().T) * lora.scale
            return out
    return logits


def chunked_dail_loss(h_student, h_teacher, h_shortcut, student_head, reference_head, lam=0.1,
                      direction="reverse", weights=None, chunk_size=1024):
    """dail_loss from hidden states, a chunk of positions at a time: peak memory grows with
    chunk_size x V, not N x V. h_*: [N, H] final hidden states at the N response positions, row-aligned
    across the three contexts (teacher and shortcut ones computed without gradient); student_head and
    reference_head: the LM heads of theta and theta0, run in float32 (float32_head); weights [N]: each
    position's weight, loss_weights(mask, norm, divisor)[mask] (default: 1/N, the token mean). Equal,
    value and gradient, to dail_loss(student_head(h_student)[None], reference_head(h_teacher)[None], ...)."""
    weights = weights if weights is not None else torch.full((h_student.shape[0],), 1.0 / h_student.shape[0])
    weights = weights.to(h_student.device, torch.float32)
    student_logits = float32_head(student_head)
    with torch.no_grad(), adapters_off(reference_head):          # theta0's head: adapters off, if it has any
        shared = reference_head is student_head and not isinstance(student_head, LoRALinear)
        reference_logits = student_logits if shared else float32_head(reference_head)

    def per_position(hs, he, hc, w):      # -> weighted loss terms [n], KL to the teacher [n], to the shortcut [n]
        with torch.no_grad():
            te, tc = reference_logits(he), reference_logits(hc)
        kl_teacher, kl_shortcut = dail_kl_terms(student_logits(hs), te, tc, direction)
        return (kl_teacher - lam * kl_shortcut) * w, kl_teacher * w, kl_shortcut * w

    loss, (sum_e, sum_c) = chunked_sum(per_position, h_student, (h_teacher, h_shortcut, weights), student_head,
                                       chunk_size)
    return loss, {"kl_teacher": float(sum_e), "kl_shortcut": float(sum_c)}


def chunked_sft_loss(h_student, targets, student_head, weights=None, chunk_size=1024):
    """Weighted token cross-entropy sum_n w[n] * CE[n] from [N, H] hidden states and [N] targets, chunked
    like chunked_dail_loss, head in float32 (the SFT baselines; weights as there, default the token mean)."""
    weights = weights if weights is not None else torch.full((h_student.shape[0],), 1.0 / h_student.shape[0])
    head = float32_head(student_head)
    loss, _ = chunked_sum(lambda hs, y, w: (F.cross_entropy(head(hs), y, reduction="none") * w,),
                          h_student, (targets, weights.to(h_student.device, torch.float32)), student_head,
                          chunk_size)
    return loss, {"ce": float(loss.detach())}


def chunked_sum(per_position, h, aligned, head, chunk_size):
    """sum_i per_position(h[i], aligned[i])[0] over the N rows of h [N, H], one chunk of rows at a time,
    as a scalar that backpropagates like the plain sum (plus the detached sums of the other outputs).

    Each chunk's gradient (with respect to its rows of h and to the head's trainable weights) is taken
    right away, while its logits exist, and the logits are then freed; the returned scalar carries those
    gradients into the backbone through a linear surrogate. Nothing is recomputed in backward."""
    if h.shape[0] == 0:
        raise ValueError("chunked_sum needs at least one response position")
    params = [p for p in head.parameters() if p.requires_grad]
    track = torch.is_grad_enabled() and (h.requires_grad or bool(params))
    grad_h = torch.zeros_like(h) if track else None
    grad_p = [torch.zeros_like(p) for p in params] if track else []
    sums = None                                               # running detached sums of every output
    for i in range(0, h.shape[0], chunk_size):
        part = slice(i, i + chunk_size)
        hp = h[part].detach().requires_grad_(track and h.requires_grad)
        out = per_position(hp, *(a[part] for a in aligned))
        if track:
            inputs = ([hp] if h.requires_grad else []) + params
            grads = torch.autograd.grad(out[0].sum(), inputs)
            if h.requires_grad:
                grad_h[part] = grads[0]
            for acc, g in zip(grad_p, grads[len(grads) - len(params):]):
                acc += g
        chunk_sums = [o.detach().sum() for o in out]
        sums = chunk_sums if sums is None else [a + b for a, b in zip(sums, chunk_sums)]
    total, *extras = sums
    if not track:
        return total, extras
    surrogate = sum((p * g).sum() for p, g in zip(params, grad_p)) + (h * grad_h).sum()
    return total + surrogate - surrogate.detach(), extras           # value: total; gradient: the chunks'


# ==== Step 2, training: minimal LoRA, sequences and masks, the reference states, the loop, the train command ===========
class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B (A x): W (the base nn.Linear) frozen, A [r, in] random, B [out, r] zero, so
    training starts from the base model exactly. The adapter is kept in float32."""

    def __init__(self, base: nn.Linear, rank, alpha, dropout=0.0):
        super().__init__()
        self.base, self.scale, self.enabled, self.dropout = base, alpha / rank, True, nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        if not self.enabled:
            return self.base(x)
        return self.base(x) + (self.dropout(x) @ self.lora_A.to(x.dtype).T @ self.lora_B.to(x.dtype).T) * self.scale


def add_lora(model, targets, rank, alpha, dropout=0.0):
    """Freeze `model` and wrap every nn.Linear named in `targets` (e.g. q_proj) in a LoRALinear."""
    sites = [(module, name, child) for module in model.requires_grad_(False).modules()
             for name, child in module.named_children() if isinstance(child, nn.Linear) and name in targets]
    if not sites:
        raise DailError(f"--lora-targets {','.join(targets)}: no such nn.Linear in the model")
    for module, name, child in sites:
        setattr(module, name, LoRALinear(child, rank, alpha, dropout))
    return model


@contextlib.contextmanager
def adapters_off(model):
    """Within the block the LoRA model computes theta0, the initial model (a no-op without adapters)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    try:
        for m in layers:
            m.enabled = False
        yield model
    finally:
        for m in layers:
            m.enabled = True


def merge_lora(model):
    """Fold every adapter into its base weight (W += scale * B @ A, in float32) and unwrap it."""
    for module in list(model.modules()):
        for name, lora in list(module.named_children()):
            if isinstance(lora, LoRALinear):
                w = lora.base.weight
                w.data = (w.data.float() + lora.scale * (lora.lora_B.float() @ lora.lora_A.float())).to(w.dtype)
                setattr(module, name, lora.base)
    return model


def collate(pairs, pad_id):
    """[(prompt ids, response ids)] -> right-padded ids [B, L], attention mask [B, L] and `predicts` [B, L-1]:
    True where logits[:, p] predict a response token ids[:, p+1] (the released mask began two tokens late)."""
    rows = [torch.tensor(p + r) for p, r in pairs]
    ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id)
    mask = nn.utils.rnn.pad_sequence([torch.ones_like(row) for row in rows], batch_first=True)
    is_response = [torch.tensor([False] * len(p) + [True] * len(r)) for p, r in pairs]
    return ids, mask, nn.utils.rnn.pad_sequence(is_response, batch_first=True)[:, 1:]


def response_hidden(model, batch, device):
    """Final hidden states [N, H] where response tokens are predicted, in (row, t) order, and their targets [N]:
    all contexts of an example share the response, so their N rows line up one to one."""
    ids, mask, predicts = (x.to(device) for x in batch)
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state    # [B, L, H]
    return hidden[:, :-1][predicts], ids[:, 1:][predicts]


def reference_states(reference, examples, cache, pad_id, device):
    """theta0's (h_teacher, h_shortcut) at the response positions of the privileged and shortcut contexts,
    each [N, H] in response_hidden's order: constants of the run, so with a cache (Appendix B.3) only the
    examples missing from it go through theta0, in one batch, each stored as its forward made it."""
    cache = cache if cache is not None else new_reference_cache("off")
    found = [load_states(cache, ex) for ex in examples]
    missing = [ex for ex, states in zip(examples, found) if states is None]
    if missing:
        with torch.no_grad(), adapters_off(reference):
            h_teacher, _ = response_hidden(reference, collate([ex["privileged"] for ex in missing], pad_id), device)
            h_shortcut, _ = response_hidden(reference, collate([ex["shortcut"] for ex in missing], pad_id), device)
        cache["computed"] += len(missing)
        sizes = [len(ex["privileged"][1]) for ex in missing]             # n_i rows per example, in row order
        fresh = iter(zip(h_teacher.split(sizes), h_shortcut.split(sizes)))
        found = [states or store_states(cache, ex, *next(fresh)) for ex, states in zip(examples, found)]
    return tuple(torch.cat([states[i].to(device) for states in found]) for i in (0, 1))  # cached ones: on the host


# what the loss reports, summed over a step's micro-batches and ranks (metrics.jsonl, log lines, the plot)
LOGGED = {"dail": ("loss", "kl_teacher", "kl_shortcut"), "sft": ("loss", "ce")}


def micro_batch_loss(model, reference, examples, args, divisor, pad_id, device, cache=None):
    """(loss, {logged term: float}) of one micro-batch, weighted by --loss-norm with the whole step's divisor so
    that a step's micro-batches and ranks sum to its loss. reference: theta0; cache: its states."""
    batch = collate([ex["student"] for ex in examples], pad_id)
    h_student, targets = response_hidden(model, batch, device)
    weights = loss_weights(batch[2], args.loss_norm, divisor)[batch[2]]                # [N], in (row, t) order
    if args.objective == "sft":
        return chunked_sft_loss(h_student, targets, model.get_output_embeddings(), weights, args.loss_chunk)
    h_teacher, h_shortcut = reference_states(reference, examples, cache, pad_id, device)
    return chunked_dail_loss(h_student, h_teacher, h_shortcut, model.get_output_embeddings(),
                             reference.get_output_embeddings(), args.lam, args.direction, weights, args.loss_chunk)


def lr_at(step, total_steps, peak, warmup):
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `total_steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def build_examples(args, records, not_kept, master):
    """(tok, examples, counts): per trace the contexts (student, privileged, shortcut; SFT: the student) as
    (prompt ids, response ids), the response shared; an example over --max-len is dropped."""
    tok = load_tokenizer(args.model, args.trust_remote_code)
    if master:
        check_thinking_flag(tok, args)
    which = ("student",) if args.objective == "sft" else ("student", "privileged", "shortcut")
    eot, examples = end_of_turn_id(tok), []
    for r in records:
        if args.objective == "sft" and args.sft_target == "expert":    # a huge solution: just enough to be dropped
            response = bounded_ids(lambda t: tok(t, add_special_tokens=False)["input_ids"], r["solution"],
                                   args.max_len)[0] + [eot]
        else:        # end of turn if the trace finished: the model learns to stop (a cut thinking prefix: none)
            response = list(r["response_ids"]) + [eot] * (r["finish_reason"] == "stop")
        try:
            contexts = build_contexts(tok, r, args.thinking, args.max_len - len(response), which)
        except DailError:                                                   # a prompt over the budget
            continue
        if max(len(p) for p in contexts.values()) + len(response) <= args.max_len:
            examples.append({name: (prompt, response) for name, prompt in contexts.items()})
    counts = dict(examples=len(examples), dropped_too_long=len(records) - len(examples), traces_not_kept=not_kept)
    if master:
        print(f"train: {len(examples)} examples ({counts['dropped_too_long']} dropped as longer than --max-len "
              f"{args.max_len}, {not_kept} traces not kept by the filter)", file=sys.stderr)
    if not examples:
        raise DailError(f"{args.data}: no example fits --max-len {args.max_len}")
    return tok, examples, counts


def build_models(args, device, examples, master):
    """theta (trainable: the LoRA adapters, or every weight with --lora-rank 0), theta0 (theta with adapters
    off, or a frozen copy; None for SFT with full FT), AdamW, the cache of theta0's states, the autocast."""
    dtype, full_ft = resolve_dtype(args.dtype, device), args.lora_rank == 0
    model = load_model(args.model, device, torch.float32 if full_ft else dtype,   # full FT: fp32 master weights
                       args.trust_remote_code)
    if full_ft:
        reference = copy.deepcopy(model).eval().requires_grad_(False) if args.objective == "dail" else None
    else:
        model = reference = add_lora(model, args.lora_targets.split(","), args.lora_rank, args.lora_alpha,
                                     args.lora_dropout)
    if args.grad_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.train().parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    use_amp, cache = device.type == "cuda" and dtype != torch.float32, None
    if args.objective == "dail":
        states_dtype = dtype if use_amp else model.get_input_embeddings().weight.dtype     # what forwards give
        cache, line = setup_reference_cache(args, examples, model, states_dtype, Path(args.out),
                                            int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if master:
            print(line, file=sys.stderr)
    autocast = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=use_amp)
    return model, reference, optimizer, cache, autocast


def cmd_train(args):
    """Write OUT/: the merged model + tokenizer (from_pretrained / vLLM), dail_prompt.json (its prompt),
    adapters/ (PEFT), metrics.jsonl, metrics.png, train_summary.json, and checkpoint.pt (for --resume)."""
    validate_args(resolve_released(args))
    records, not_kept = load_training_records(args)            # all input checks before any model loads
    guard_train_out(args)                                      # --out: not the model, not an unrelated run
    out, t_start = Path(args.out), time.time()
    checkpoint, metrics = out / "checkpoint.pt", out / "metrics.jsonl"
    if args.resume and not checkpoint.exists():
        raise DailError(f"--resume: {checkpoint} does not exist")
    ddp, rank, world_size, device = setup_distributed(args)
    master = rank == 0                                         # it logs and saves; every rank trains
    torch.manual_seed(args.seed)
    tok, examples, counts = build_examples(args, records, not_kept, master)
    model, reference, optimizer, cache, autocast = build_models(args, device, examples, master)
    params = optimizer.param_groups[0]["params"]
    total_steps = planned_steps(args, len(examples), say=master)
    start = load_checkpoint(checkpoint, model, optimizer, args, device, total_steps) if args.resume else 0
    if master:                                       # metrics.jsonl: afresh, or cut back to the checkpoint
        kept = [m for m in resume_jsonl(metrics) if m["step"] <= start] if args.resume else []
        write_atomic(metrics, "".join(json.dumps(m) + "\n" for m in kept))
    # data order: one permutation per epoch, fixed by the seed, so step s always sees the same items
    order = np.concatenate([np.random.default_rng(args.seed + e).permutation(len(examples))
                            for e in range(args.epochs)])
    with stop_signals() as signals, progress(total=total_steps, initial=start, desc=f"train {args.objective}",
                                             unit="step", disable=not master or not sys.stderr.isatty()) as bar:
        for step in range(start, total_steps):
            t0 = time.time()
            lr = lr_at(step, total_steps, args.lr, args.warmup_steps)          # 1. this step's learning rate
            for group in optimizer.param_groups:
                group["lr"] = lr
            # 2. micro-steps over this rank's share of the step; gradients accumulate in .grad. Each position
            #    is divided by the whole step's sequences or tokens (all ranks): the sum is the step's loss
            items = [examples[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]]
            tokens = sum(len(ex["student"][1]) for ex in items)
            divisor = len(items) if args.loss_norm == "sequence" else tokens
            logged = dict.fromkeys(LOGGED[args.objective], 0.0)
            mine = items[rank::world_size]
            for i in range(0, len(mine), args.micro_batch_size):
                with autocast():
                    loss, stats = micro_batch_loss(model, reference, mine[i:i + args.micro_batch_size], args,
                                                   divisor, tok.pad_token_id, device, cache)
                loss.backward()
                for k, v in dict(loss=float(loss.detach()), **stats).items():
                    logged[k] += v
            if ddp:                                         # data parallel: sum the gradients once per step
                logged = all_reduce_step(params, logged, device)
            # 3. clip: a loss or gradient norm that is not finite stops the run before its update
            grad_norm = float(nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else math.inf))
            check_finite(step + 1, dict(logged, grad_norm=grad_norm), checkpoint, args)
            optimizer.step()                                                    # 4. the update
            optimizer.zero_grad(set_to_none=True)
            if master:                        # 5. log: metrics.jsonl every step, a line every --log-every steps
                rec = dict(step=step + 1, lr=lr, grad_norm=grad_norm, tokens=tokens, sequences=len(items),
                           tok_per_s=tokens / (time.time() - t0), **logged)
                with open(metrics, "a") as f:
                    append_jsonl(f, rec)
                bar.update()
                if (step + 1) % args.log_every == 0 or step + 1 == total_steps:
                    terms = " ".join(f"{k} {v:.4g}" for k, v in logged.items())
                    bar.write(f"step {step + 1}/{total_steps} {terms} lr {lr:.3g} grad_norm {grad_norm:.3g} "
                              f"tok/s {rec['tok_per_s']:.0f}", file=sys.stderr)     # above the bar on a terminal
            # 6. checkpoint: every --save-every steps, at each epoch's end, after the last step, on SIGTERM/SIGINT
            stop = agreed_signal(signals["signal"], ddp, device)
            ends_epoch = (step + 1) * args.batch_size // len(examples) > step * args.batch_size // len(examples)
            if master and (stop or ends_epoch or step + 1 == total_steps
                           or args.save_every and (step + 1) % args.save_every == 0):
                save_checkpoint(checkpoint, step + 1, model, optimizer, args, device)
            if stop:
                end_distributed(ddp)
                raise Interrupted(f"interrupted at step {step + 1}; rerun with --resume to continue"
                                  if master else "", 128 + stop)
    if master:                    # adapters alone, then the merged model that from_pretrained and vLLM load
        cache_counts = cache and {k: cache[k] for k in ("mode", "computed", "reused", "bad_files")}
        final = save_result(out, model, tok, args, dict(counts, steps=total_steps, world_size=world_size,
                                                        reference_cache=cache_counts))["final"] or {}
        terms = ", ".join(f"{k} {final[k]:.4g}" for k in LOGGED[args.objective] if k in final)
        theta0 = cache and (f"; theta0 ran on {cache['computed']} examples, {cache['reused']} from the reference "
                            f"cache ({cache['mode']}, rank 0), {cache['bad_files']} bad files recomputed")
        sequences = min(len(order), total_steps * args.batch_size)
        print(f"train: done: {total_steps} steps over {len(examples)} examples ({sequences} sequences), final "
              f"{terms}, {time.time() - t_start:.1f} s{theta0 or ''}; model in {out}", file=sys.stderr)
    end_distributed(ddp)


# ==== Evaluation: the unbiased pass@k estimator, the forced answer, the eval command ===================================
def pass_at_k(n, c, k):
    """Unbiased pass@k of one problem with n samples of which c are correct (Chen et al. 2021):

        pass@k = 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)

    in the product form, which stays accurate for n in the thousands (no huge binomials).
    Edge cases: 0.0 when c = 0; 1.0 when n - c < k (every k-subset holds a correct sample).
    ValueError when k > n (the estimator needs n >= k) or the counts are invalid."""
    if min(n, k) < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs n >= 1, k >= 1 and 0 <= c <= n; got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass_at_k needs n >= k; got n={n}, k={k}")
    if c == 0:
        return 0.0
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def parse_ks(spec, n):
    """k values for pass@k: the --k list (each must be <= n), or 1, 2, 4, ... <= n, and n itself."""
    if spec:
        try:
            ks = sorted({int(x) for x in spec.split(",") if x.strip()})
        except ValueError:
            raise DailError(f"--k {spec}: expected comma-separated integers") from None
        if not ks or ks[0] < 1 or ks[-1] > n:
            raise DailError(f"--k {spec}: every k must be in 1..n (n = {n}); the unbiased estimator needs n >= k")
        return ks
    return sorted({2 ** i for i in range(int(math.log2(n)) + 1)} | {n})


def eval_summary(lines, ks):
    """Mean pass@k over problems, response-length figures, and answer-extraction counts."""
    all_tokens = [t for r in lines for t in r["n_tokens"]]
    correct_tokens = [t for r in lines for t, ok in zip(r["n_tokens"], r["correct"]) if ok]

    def mean_of(part, only_correct=False):  # thinking and answer tokens apart (older runs: all are answer)
        vals = []
        for r in lines:
            counts = r.get(f"n_{part}_tokens") or (r["n_tokens"] if part == "answer" else [0] * len(r["n_tokens"]))
            vals += [t for t, ok in zip(counts, r["correct"]) if ok or not only_correct]
        return float(np.mean(vals)) if vals else None
    return dict(
        problems=len(lines),
        pass_at_k={str(k): float(np.mean([pass_at_k(len(r["correct"]), sum(r["correct"]), k) for r in lines]))
                   for k in ks},
        mean_tokens=float(np.mean(all_tokens)) if all_tokens else None,
        mean_tokens_correct=float(np.mean(correct_tokens)) if correct_tokens else None,
        mean_thinking_tokens=mean_of("thinking"), mean_answer_tokens=mean_of("answer"),
        mean_thinking_tokens_correct=mean_of("thinking", True), mean_answer_tokens_correct=mean_of("answer", True),
        samples_forced=sum(f is not None for r in lines for f in r.get("forced", [])),
        samples_no_answer=sum(p is None for r in lines for p in r["preds"]),
        problems_no_answer=sum(all(p is None for p in r["preds"]) for r in lines),
        truncated=sum(f == "length" for r in lines for f in r["finish_reasons"]))


def cmd_eval(args):
    """Write OUT/samples.jsonl (one line per problem), OUT/summary.json, OUT/passk.png and OUT/eval_config.json
    (the settings a resumed run must match). Per sample, samples.jsonl keeps the first pass (`responses`,
    `finish_reasons`) and the forced-answer pass apart (`forced`: the inserted line + what was sampled after
    it, or null), and counts generated tokens: n_tokens = n_thinking_tokens + n_answer_tokens, of which
    n_forced_tokens in the second pass. Only answer_part (after </think> with --thinking) is graded."""
    validate_args(args)
    make_grader(args.grader)  # a missing optional grader fails here, before any model loads
    if args.regrade:
        return regrade_eval(args)
    problems = load_problems(args.data, need_solution=False, need_answer=True)
    ks = parse_ks(args.k, args.n)
    out = Path(args.out)
    check_out_folder(args)
    samples_path = out / "samples.jsonl"
    def config_of(path):  # samples.jsonl's is eval_config.json (as before); a part's is beside it
        return out / "eval_config.json" if path == samples_path else path.with_suffix(".config.json")
    engine = eval_engine(args)
    # every line of samples.jsonl is one problem of --data, once, with n samples
    n, shards, merge, follower, config, checks, done = start_job("eval", samples_path, args, engine, problems,
                                                                 config_of, out / "summary.json", out / "passk.png")
    tok = load_tokenizer(args.model, args.trust_remote_code)
    check_thinking_flag(tok, args)
    max_prompt = prompt_budget(args, "eval", lambda: max(len(eval_prompt_ids(tok, p, args.thinking, None))
                                                         for p in problems))
    prompts = {}
    for p in problems:  # every problem counts in pass@k: a prompt that cannot fit is an error, not a skip
        prompts[p["id"]] = eval_prompt_ids(tok, p, args.thinking, max_prompt)
    t0, n_new = time.time(), 0
    for k in shards:
        written = {r["id"] for r in done[k]}
        todo = [p for p in shard_problems(problems, k, n) if p["id"] not in written]
        n_new += eval_shard(args, tok, os.devnull if follower else shard_path(samples_path, k, n), todo, prompts,
                            engine, len(written))
    index = {p["id"]: p["index"] for p in problems}
    expected = {k: {p["id"] for p in shard_problems(problems, k, n)} for k in range(n)}
    lines = gather_parts(samples_path, n, merge, config, config_of, expected, lambda r: r["id"],
                         lambda r: index[r["id"]], checks)
    if lines is None:
        return None                  # a rank other than 0 (rank 0 merges), or parts still missing
    return write_eval_summary(out, lines, ks, args, engine=engine,
                              samples_per_s_this_run=n_new / max(time.time() - t0, 1e-9) if n_new else None)


def eval_shard(args, tok, samples_path, todo, prompts, engine, n_done):
    """Sample and grade the problems `todo` into samples_path (samples.jsonl, or a shard's part file), one
    line per problem, in input order. -> the number of samples drawn."""
    n_new = 0
    think_end = tok.get_vocab().get("</think>")
    if todo:
        stop_ids = stop_token_ids(tok, args.model)
        print(f"eval: {len(todo)} problems x {args.n} samples ({n_done} already in {samples_path}), "
              f"engine {engine}", file=sys.stderr)
        sampler = make_sampler(engine, args, tok, stop_ids)
        # problems per call: the hf engine decodes --batch-size rows at a time; vLLM batches on its own
        per_call = max(1, args.batch_size // args.n) if engine == "hf" else max(1, 8192 // args.n)
        bar = progress(total=len(todo), desc="eval", unit="problem")
        with open(samples_path, "a", encoding="utf-8") as f:
            for start in range(0, len(todo), per_call):
                chunk = todo[start:start + per_call]
                outputs = sampler([prompts[p["id"]] for p in chunk],
                                  [args.seed + p["index"] for p in chunk], [p["id"] for p in chunk])
                for p, samples in zip(chunk, outputs):
                    texts = [tok.decode(s["ids"], skip_special_tokens=False) for s in samples]
                    forced = [None if s.get("forced_ids") is None else
                              tok.decode(s["forced_ids"], skip_special_tokens=False) for s in samples]
                    preds, correct = grade_responses([t + (fo or "") for t, fo in zip(texts, forced)], p["answer"],
                                                     args.grader, args.thinking)
                    split = [token_split(s, args.thinking, think_end) for s in samples]
                    append_jsonl(f, dict(id=p["id"], problem=p["problem"], answer=p["answer"],
                                         n_correct=sum(correct), responses=texts, forced=forced, preds=preds,
                                         correct=correct, n_tokens=[a + b for a, b in split],
                                         n_thinking_tokens=[a for a, _ in split],
                                         n_answer_tokens=[b for _, b in split],
                                         n_forced_tokens=[s.get("n_forced", 0) for s in samples],
                                         finish_reasons=[s["finish_reason"] for s in samples]))
                    n_new += len(samples)
                bar.update(len(chunk))
        bar.close()
        sampler.close()
    return n_new


def grade_responses(texts, reference, grader, thinking):
    """(preds, correct) of one problem's responses (first pass + forced answer): the one place eval grades,
    sampling or re-grading. Only answer_part is graded (with --thinking: the text after </think>)."""
    graded = [grade(answer_part(t, thinking), reference, grader) for t in texts]
    return [p for p, _ in graded], [bool(c) for _, c in graded]


def write_eval_summary(out, lines, ks, args, **extra):
    """OUT/summary.json (pass@k, lengths, the grader) and OUT/passk.png from the lines of samples.jsonl."""
    summary = eval_summary(lines, ks)
    summary.update(extra, grader=grader_info(args.grader), settings=dataclasses.asdict(args))
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    save_plot(out / "passk.png", f"pass@k, {len(lines)} problems, n = {args.n}", "k", "pass@k",
              {Path(args.model).name or args.model: (ks, [summary["pass_at_k"][str(k)] for k in ks])}, logx=True,
              ylim=(-0.02, 1.02))
    print(json.dumps({k: summary[k] for k in ("problems", "pass_at_k", "mean_tokens")}), file=sys.stderr)
    return summary


def regrade_eval(args):
    """--regrade: grade every response of OUT/samples.jsonl again with --grader against the answer recorded
    beside it; no model is loaded. samples.jsonl is replaced atomically (write_atomic), the
    grader in eval_config.json is updated (a later resume continues with this grader), then summary.json."""
    out = Path(args.out)
    samples_path = out / "samples.jsonl"
    if not samples_path.is_file():
        raise DailError(f"--regrade: {samples_path}: no such file; run eval first")
    lock_output(samples_path, args.out)
    config = out / "eval_config.json"
    recorded = read_config(config) if config.exists() else {}
    # --model and --data are optional here: the summary names the run's own (as eval_config.json has them)
    args = dataclasses.replace(args, **{k: getattr(args, k) or recorded.get("paths", {}).get(k) or "unknown"
                                        for k in ("model", "data")})
    lines = resume_jsonl(samples_path, line_check(EVAL_FIELDS, lambda r: r["id"]))
    if not lines:
        raise DailError(f"--regrade: {samples_path}: no samples to grade")
    n = len(lines[0]["responses"])
    if any(len(r["responses"]) != n for r in lines):
        raise DailError(f"--regrade: {samples_path}: problems hold different numbers of samples")
    args.n = n  # pass@k takes n from the file, not from the flag
    ks = parse_ks(args.k, n)
    changed = 0
    thinking = recorded.get("thinking", args.thinking)
    for r in lines:
        texts = [t + (fo or "") for t, fo in zip(r["responses"], r.get("forced") or [None] * n)]
        preds, correct = grade_responses(texts, r["answer"], args.grader, thinking)
        changed += sum(a != bool(b) for a, b in zip(correct, r["correct"]))
        r.update(preds=preds, correct=correct, n_correct=sum(correct))
    write_atomic(samples_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    if config.exists():
        write_atomic(config, json.dumps({**recorded, "grader": args.grader}, indent=2))
    print(f"regrade: {sum(map(len, (r['responses'] for r in lines)))} responses with --grader {args.grader}; "
          f"{changed} verdicts changed", file=sys.stderr)
    return write_eval_summary(out, lines, ks, args, engine=None, samples_per_s_this_run=None, regraded=True,
                              verdicts_changed=changed)


def eval_prompt_ids(tok, problem, thinking, max_prompt_len):
    """Prompt ids of one eval problem: the record's own `prompt` when it has one (a string: the user turn;
    a list: the chat messages), else the student prompt. Over max_prompt_len: DailError."""
    if problem.get("prompt") is None:
        return build_contexts(tok, problem, thinking, max_prompt_len, ("student",))["student"]
    ids = record_prompt_ids(tok, problem, thinking)
    if max_prompt_len is not None and len(ids) > max_prompt_len:
        raise DailError(f"{problem['where']}: field 'prompt': the prompt is {len(ids)} tokens, over the prompt "
                        f"budget of {max_prompt_len} (--max-prompt-len, or the model's context length minus "
                        f"--max-new-tokens)")
    return ids


def answer_part(response, thinking):
    """The text that is graded: with `thinking`, what follows the last </think> ("" when the thinking never
    closed: a box inside the thinking is a guess, not an answer); else the whole response. The inserted cue
    is not graded (nor was the released one): its empty \\boxed{} is no answer, but math-verify reads it."""
    response = response.replace(ANSWER_REQUEST, "")
    if not thinking:
        return response
    cut = response.rfind("</think>")
    return "" if cut < 0 else response[cut + len("</think>"):]


def token_split(sample, thinking, think_end):
    """(thinking tokens, answer tokens) of one sample, generated tokens only (the inserted </think> and
    ANSWER_REQUEST are not counted). With `thinking`: the first pass up to and including a generated
    </think> is thinking, the rest of it and the forced pass are answer; without: all answer."""
    ids, forced = sample["ids"], sample.get("n_forced", 0)
    if not thinking:
        return 0, len(ids) + forced
    cut = ids.index(think_end) + 1 if think_end in ids else len(ids)
    return cut, len(ids) - cut + forced


def forced_answer_suffix(tok, sample, thinking):
    """What the forced-answer pass appends to prompt + first-pass ids before it samples (ids), or None when
    the sample gets no second pass. --thinking: every sample, </think> then ANSWER_REQUEST, whether the
    thinking closed by itself (the first pass stopped on </think>, which is not in its ids) or the budget (or
    an end of turn) cut it. Otherwise only a sample whose text has no \\boxed{ gets one: ANSWER_REQUEST."""
    if not thinking and "\\boxed{" in tok.decode(sample["ids"], skip_special_tokens=False):
        return None
    return tok(("</think>" if thinking else "") + ANSWER_REQUEST, add_special_tokens=False)["input_ids"]


def force_answers(tok, prompts, outputs, thinking, second_pass, seeds, pids=None):
    """The released eval's second pass, engine-agnostic. outputs: per prompt, the first pass's sample dicts
    (ids, finish_reason, stop_id); updated in place with forced_ids (the suffix + the ids sampled after it;
    None: no second pass) and n_forced (tokens sampled in the second pass). second_pass(rows, seeds, names)
    samples one continuation per row (prompt + ids + suffix) with at most --answer-tokens tokens; it returns
    per row a list holding one dict (ids, ...). Seeds: one per sample, derived from the problem's (vLLM);
    names: (problem id, "forced:<sample index>") per row (the hf engine's trace key: not the first pass's)."""
    rows, targets, row_seeds, names = [], [], [], []
    for prompt, samples, seed, pid in zip(prompts, outputs, seeds, pids or [None] * len(prompts)):
        for i, s in enumerate(samples):
            s["forced_ids"], s["n_forced"] = None, 0
            suffix = forced_answer_suffix(tok, s, thinking)
            if suffix is not None:
                rows.append(list(prompt) + s["ids"] + suffix)
                targets.append((s, suffix))
                row_seeds.append(seed * 1_000_003 + i + 1)
                names.append((pid, f"forced:{i}"))
    if rows:
        for (s, suffix), r in zip(targets, second_pass(rows, row_seeds, names)):
            s["forced_ids"], s["n_forced"] = suffix + r[0]["ids"], len(r[0]["ids"])
    return outputs


def make_sampler(engine, args, tok, stop_ids):
    """sampler(prompt id lists, seeds, problem ids) -> per prompt, args.n dicts (ids, finish_reason, stop_id, and after
    the forced-answer pass forced_ids, n_forced), from one engine; sampler.close() frees it. Both passes
    use the sampling flags and the presence penalty. With --thinking (and the forced answer on) the first
    pass also stops at </think>. Seeds: vLLM takes one per problem (--seed + its index in the file), so a
    resumed run samples what an uninterrupted one would; the hf engine keys each sample's random numbers by
    (--seed, problem id, sample index) and the step (counter_uniforms), so neither the batch, the batch
    size, a resume nor a shard changes a sample; the forced-answer pass uses the key (id, "forced:<j>")."""
    think_end = tok.get_vocab().get("</think>") if args.thinking else None
    first_stops = list(stop_ids) + ([think_end] if think_end is not None and not args.no_force_answer else [])
    if engine == "vllm":
        llm = load_vllm(args)

        def generate(prompts, n, max_tokens, stops, seeds, names):
            return vllm_sample(llm, prompts, n, args, stops, seeds, max_tokens=max_tokens,
                               presence_penalty=args.presence_penalty)
        close = lambda: close_vllm(llm)  # noqa: E731
    else:
        device = shard_device(args)
        model = load_model(args.model, device, resolve_dtype(args.dtype, device), args.trust_remote_code).eval()

        def generate(prompts, n, max_tokens, stops, seeds, names):  # names: (problem id, None | a tag)
            rows = [[p] for p in prompts for _ in range(n)]
            keys = trace_keys(args.seed, [pid for pid, _ in names for _ in range(n)],
                              [j if tag is None else tag for _, tag in names for j in range(n)])
            results = []
            for i in range(0, len(rows), args.batch_size):
                batch_keys = keys[i:i + args.batch_size]

                def choose(logits, step, active):  # [1, b, V]: one context (the presence penalty is applied)
                    probs = sampling_probs(logits[0], args.temperature, args.top_p, args.top_k)
                    return sample_with(probs, counter_uniforms(batch_keys[active], step, 1)).squeeze(1), None
                results += decode(model, rows[i:i + args.batch_size], choose, max_tokens, stops,
                                  tok.pad_token_id, presence_penalty=args.presence_penalty)
            return [results[j * n:(j + 1) * n] for j in range(len(prompts))]
        close = lambda: None  # noqa: E731

    def sample(prompts, seeds, pids):
        outputs = generate(prompts, args.n, args.max_new_tokens, first_stops, seeds, [(p, None) for p in pids])
        if not args.no_force_answer:
            force_answers(tok, prompts, outputs, args.thinking,
                          lambda rows, row_seeds, names: generate(rows, 1, args.answer_tokens, stop_ids, row_seeds,
                                                                  names), seeds, pids)
        return outputs
    sample.close = close
    return sample


# ==== Appendix A: grading -- boxed answers, the grader (shared by the rewrite filter and eval), problems ===============
def extract_boxed(text):
    """Content of the *last* \\boxed{...} or \\fbox{...} in `text`, braces matched, or None.

    Nested braces are kept whole (\\boxed{\\frac{1}{2}} -> \\frac{1}{2}); escaped braces \\{ \\} do not
    count. The space form `\\boxed 5` gives the token after the space. None when there is no box, when the
    last box is empty, or when its braces never close (a truncated box is no answer)."""
    if not text:
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    if text.startswith(" ", i):  # \boxed 5  (no braces: up to the next space or $)
        m = re.match(r"\s+([^\s$]+)", text[i:])
        return m.group(1) if m else None
    if not text.startswith("{", i):
        return None
    depth, j = 0, i
    while j < len(text):
        ch = text[j]
        if ch == "\\":  # skip the escaped character, e.g. \{ or \}
            j += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                content = text[i + 1:j].strip()
                return content or None
        j += 1
    return None


def extract_all_boxed(text):
    """Contents of every complete \\boxed{...} / \\fbox{...} in `text`, in order (see `extract_boxed`)."""
    found, end = [], len(text or "")
    while end > 0:
        start = max(text.rfind("\\boxed", 0, end), text.rfind("\\fbox", 0, end))
        if start < 0:
            break
        box = extract_boxed(text[start:end])  # a box nested in a box is cut here: only the inner one counts
        if box is not None:
            found.append(box)
        end = start
    return found[::-1]


def _braced_frac(s):
    """\\frac12 -> \\frac{1}{2}, \\frac1{x} -> \\frac{1}{x}: give both arguments braces."""
    out, i = [], 0
    while True:
        j = s.find("\\frac", i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j] + "\\frac")
        i = j + 5
        for _ in range(2):
            if i < len(s) and s[i] == "{":
                depth, k = 0, i
                while k < len(s):
                    depth += {"{": 1, "}": -1}.get(s[k], 0)
                    if depth == 0:
                        break
                    k += 1
                out.append(s[i:k + 1])
                i = k + 1
            elif i < len(s):
                out.append("{" + s[i] + "}")
                i += 1


# A text-mode unit after a value ("5\text{ cm}^2", "3 \mbox{ inches}"): dropped, the value is the answer. One letter
# counts only after a space (\text{ m}), so 2\mathrm{e} keeps its e.
# Words that change a number (5 hundred, 5 squared, 2 thirds) are never units.
_NOT_UNIT = (r"(?!\s*(?:hundred|thousand|million|billion|trillion|dozen|half|halves|third|quarter|fourth|fifth|"
             r"sixth|seventh|eighth|ninth|tenth|squared|cubed|times|factorial|over|tens\b|score\b|pi\b))")
_UNIT = (r"\\(?:text|mbox|mathrm|textrm)\{" + _NOT_UNIT + r"(?:\s+[a-zA-Z]|[a-zA-Z]{2})[a-zA-Z .]*\}"
         r"(?:\^\{?[23]\}?)?")
_ATOM = r"(?:\d+|\d*\\pi|\d*\\sqrt\{\w+\}|[a-zA-Z])"  # what "a/b" may divide for a/b -> \frac{a}{b}


def normalize_answer(s):
    """The normal form of one answer string that `is_equiv` parses. In order: Unicode minus and pi; drop $;
    strip \\( \\) \\[ \\]; drop \\left, \\right, \\displaystyle, \\! and \\$; \\dfrac, \\tfrac, \\cfrac -> \\frac; a row
    separator \\\\ becomes \\cr (so the spacing rule cannot eat it; outside a matrix: dropped at the ends,
    a gap inside); \\leq -> \\le; a whole-answer \\text{X} / \\textbf{X} / \\mathbf{X} -> X (\\textbf{(113)} -> (113));
    \\text{ and } / \\text{ or } / " and " -> a list comma; a unit \\text{...} after a value (with ^2, ^3)
    dropped, other \\text{X} unwrapped, never deleted (6 \\text{ and } 8 is not 68); "58 square units" -> 58;
    degrees and percent signs dropped; thousands separators removed only when the whole answer is one
    number written 1,000 / 1{,}000 / 1\\,000 (32, 349 with a space is a list of two numbers); whitespace
    between two digits kept as a gap mark (4 4/9 is a mixed number, never 44/9), other whitespace removed;
    trailing period and leading + dropped; \\frac and \\sqrt arguments braced; pi -> \\pi; 2*x, 2\\cdot x -> 2x;
    a one-character super/subscript braced (52_8 -> 52_{8})."""
    s = str(s).strip().replace("\u2212", "-").replace("\u03c0", "\\pi ")  # Unicode minus and pi
    s = re.sub(r"(?<!\\)\$", "", s).strip()  # math-mode dollars, wherever they are ($1$, $2$); \$ stays a dollar
    s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s).strip()
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])\.?", "", s)
    s = re.sub(r"\\displaystyle|\\!|\\\$", "", s)
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = s.replace("\\\\", "\\cr ")
    s = re.sub(r"\\(?:le|ge|ne)q(?![a-zA-Z])", lambda m: m.group(0)[:-1], s)
    while True:  # unwrap whole-answer text/bold wrappers: \textbf{(113)}, \mathbf{127}, \text{(C)}
        m = re.fullmatch(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|boxed)\{(.*)\}", s.strip())
        if not m or not _balanced(m.group(1)):
            break
        s = m.group(1).strip()
    s = re.sub(r"\\(?:text|mbox|textrm)\{\s*(?:and|or)\s*\}|(?<=\s)(?:and|or)(?=\s)", ",", s)
    s = re.sub(r"(?<=[\d}\s])\s*" + _UNIT + r"\s*(?=$|[,;)\]])", "", s)
    s = re.sub(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|textit|mathit)\{([^{}]*)\}", r"\1", s)
    m = re.fullmatch(r"([+-]?\d[\d,.]*)((?:\s+" + _NOT_UNIT + r"[a-zA-Z]{2,}\.?)+)(?:\^\{?[23]\}?)?", s.strip())
    if m:  # 58 square units: a number and plain words
        s = m.group(1)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree|\\%|%", "", s)
    if re.fullmatch(r"[+-]?\d{1,3}(?:(?:,|\{,\}|\\,)\d{3})+(?:\.\d+)?", s.strip()):  # 1,000 1{,}000 1\,000
        s = re.sub(r"\{,\}|\\,|,", "", s.strip())
    s = re.sub(r"\\[,;: ]|~|\\q?quad", " ", s).strip()
    s = re.sub(r"(?<=\d)\s+(?=\d)", "\x00", s)  # a gap between digits: never glue them
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    s = re.sub(r"^\+|(?<=[,(\[])\+", "", s)
    s = _braced_frac(s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"(?<![a-zA-Z\\])pi(?![a-zA-Z])", r"\\pi", s)  # pi/2 -> \pi/2
    s = re.sub(r"(?<=\d)(?:\*|\\cdot|\\times)(?=[a-zA-Z(]|\\(?!frac))", "", s)  # 2*x -> 2x, never 2\cdot 3 -> 23
    s = re.sub(r"([_^])(\w)", r"\1{\2}", s)
    if "\\begin{" not in s:  # a stray \\ outside a matrix is layout: dropped at the ends (185\\), a gap inside
        s = re.sub(r"^(?:\\cr)+|(?:\\cr)+$", "", s).replace("\\cr", "\x00")
    return s


def _balanced(s):
    """Braces of s close in order (a wrapper \\text{...} spans the whole answer only then)."""
    depth = 0
    for ch in s:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def _split_top(s, sep):
    """Split at `sep` where no bracket ( [ { is open; [s] when there is none."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if s[i] in "([{":
            depth += 1
        elif s[i] in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    return parts + [s[start:]]


def _encloses(s, opening, closing):
    """s is opening ... closing with the first bracket closed only at the very end."""
    if not (s.startswith(opening) and s.endswith(closing)) or len(s) < len(opening) + len(closing):
        return False
    depth = 0
    for i in range(len(opening) - 1, len(s)):
        depth += 1 if s[i] in "([{" else -1 if s[i] in ")]}" else 0
        if depth == 0 and i < len(s) - 1:
            return False
    return True


def _as_number(s):
    """A normalized answer as an exact Fraction (integers, decimals, integer fractions, mixed numbers
    1\\frac{4}{5} and 4 4/9 with 0 < numerator < denominator), else None."""
    sign = -1 if s.startswith("-") else 1
    s = s[1:] if s[:1] in "+-" else s
    if re.fullmatch(r"\d+\.?\d*|\.\d+", s):
        return sign * Fraction(s)
    m = re.fullmatch(r"\\frac\{(-?\d+)\}\{(-?\d+)\}|(\d+)/(\d+)", s)
    if m:
        num, den = int(m.group(1) or m.group(3)), int(m.group(2) or m.group(4))
        return None if den == 0 else sign * Fraction(num, den)
    m = re.fullmatch(r"(\d+)(?:\\frac\{(\d+)\}\{(\d+)\}|\x00(\d+)/(\d+))", s)  # 1\frac{4}{5}, 4 4/9
    if m:
        num, den = int(m.group(2) or m.group(4)), int(m.group(3) or m.group(5))
        if 0 < num < den:  # else (2\frac{3}{2}) not a mixed number: unsure, so no number
            return sign * (int(m.group(1)) + Fraction(num, den))
    return None


def _as_surd(s):
    """A normalized single term c * sqrt(n) (c rational, n > 1 square-free) as (c, n), else None:
    2\\sqrt{3}, \\sqrt{12}, \\frac{\\sqrt{3}}{3}, \\frac{1}{\\sqrt{3}}, \\sqrt{2}/2 (exact, no floats)."""
    sign = -1 if s.startswith("-") else 1
    s = s[1:] if s[:1] in "+-" else s
    root = r"(\d*)\\sqrt\{(\d+)\}"
    m = (re.fullmatch(root, s) or re.fullmatch(r"\\frac\{" + root + r"\}\{(\d+)\}", s)
         or re.fullmatch(root + r"/(\d+)", s))
    if m:
        c, n, d = int(m.group(1) or 1), int(m.group(2)), int(m.group(3)) if m.lastindex == 3 else 1
        value = Fraction(c, d) if d else None
    else:
        m = re.fullmatch(r"\\frac\{(\d+)\}\{" + root + r"\}", s) or re.fullmatch(r"(\d+)/" + root, s)
        if not m or int(m.group(3)) == 0:
            return None
        n = int(m.group(3))
        value = Fraction(int(m.group(1)), int(m.group(2) or 1) * n)  # c / (d sqrt n) = c sqrt(n) / (d n)
    if value is None or n == 0:
        return None
    k = 2
    while k * k <= n:  # pull square factors out: sqrt(12) = 2 sqrt(3)
        while n % (k * k) == 0:
            n //= k * k
            value *= k
        k += 1
    return sign * value, n


def _parse(s):
    """A normalized answer as a small tree that `_same` compares:
    ("list", [...]) unordered (a, b / \\{a, b\\} / a \\cup b), ("seq", "(", ")", [...]) ordered (tuples,
    intervals), ("matrix", [[...]]), ("eq", "x", tree) for x = ... / x \\in ..., ("choice", "C", tree) for an
    AoPS "(C) value", ("num", Fraction), ("surd", (c, n)) for c*sqrt(n), ("str", s)."""
    parts = _split_top(s, ",")
    if len(parts) > 1 and all(parts):
        return ("list", [_parse(p) for p in parts])
    m = re.match(r"([a-zA-Z](?:_\{\w+\})?|\\[a-zA-Z]+)(=|\\in(?![a-zA-Z]))(?![=])(.+)$", s)
    if m and not m.group(1).startswith(("\\frac", "\\sqrt")):
        return ("eq", m.group(1), _parse(m.group(3)))
    parts = _split_top(s, "\\cup")
    if len(parts) > 1 and all(parts):
        return ("list", [_parse(p) for p in parts])
    m = re.fullmatch(r"\(([A-E])\)(.+)", s)
    if m:  # an AoPS choice with its value, \textbf{(C)}\ 25: the letter or the value names it
        return ("choice", m.group(1), _parse(m.group(2)))
    m = re.fullmatch(r"\\begin\{([pbB]?matrix)\}(.*)\\end\{\1\}", s)
    if m:
        return ("matrix", [[_parse(c) for c in _split_top(row, "&")]
                           for row in _split_top(m.group(2).removesuffix("\\cr"), "\\cr")])
    if _encloses(s, "\\{", "\\}"):
        return ("list", [_parse(p) for p in _split_top(s[2:-2], ",")])
    if s[:1] in "([" and s[-1:] in ")]" and _encloses(s, s[0], s[-1]):
        parts = _split_top(s[1:-1], ",")
        if len(parts) == 1:  # (113), (C): brackets around one value are no tuple
            return _parse(parts[0]) if s[0] + s[-1] == "()" else ("seq", s[0], s[-1], [_parse(parts[0])])
        return ("seq", s[0], s[-1], [_parse(p) for p in parts])
    x = _as_number(s)
    if x is None and "\\sqrt" in s:
        surd = _as_surd(s)
        if surd is not None:
            return ("num", surd[0]) if surd[1] == 1 else ("surd", surd)
    return ("num", x) if x is not None else ("str", re.sub(r"^(-?)(" + _ATOM + r")/(" + _ATOM + r")$",
                                                           r"\1\\frac{\2}{\3}", s))


def _same(a, b):
    """Tree equality: numbers exactly, strings literally, lists as multisets, tuples/intervals/matrices
    element-wise; x = v matches v, and x = v matches y = v only when x is y."""
    if a[0] == "choice" or b[0] == "choice":
        if a[0] == b[0]:
            return a[1] == b[1] and _same(a[2], b[2])
        (_, letter, value), other = (a, b) if a[0] == "choice" else (b, a)
        return other == ("str", letter) or _same(value, other)
    if a[0] == "eq" or b[0] == "eq":
        if a[0] == b[0]:
            return a[1] == b[1] and _same(a[2], b[2])
        return _same(a[2], b) if a[0] == "eq" else _same(a, b[2])
    if a[0] != b[0]:
        return False
    if a[0] in ("num", "str", "surd"):
        return a[1] == b[1]
    if a[0] == "seq":
        return a[1:3] == b[1:3] and len(a[3]) == len(b[3]) and all(map(_same, a[3], b[3]))
    if a[0] == "matrix":
        return [len(r) for r in a[1]] == [len(r) for r in b[1]] and all(
            _same(x, y) for ra, rb in zip(a[1], b[1]) for x, y in zip(ra, rb))
    left = list(b[1])  # "list": every element of a matched to its own element of b
    if len(a[1]) != len(left):
        return False
    for x in a[1]:
        j = next((j for j, y in enumerate(left) if _same(x, y)), None)
        if j is None:
            return False
        left.pop(j)
    return True


def is_equiv(pred, ref):
    """True when two answers are the same value after `normalize_answer` (the built-in grader). Conventions:
    numbers are exact, no tolerance (0.5 == \\frac{1}{2}, 0.333 != \\frac13, 18.90 == 18.9); a mixed number
    1\\frac{4}{5} is 9/5; one term c*sqrt(n) is compared exactly (2\\sqrt{3} == \\sqrt{12} == 6/\\sqrt{3});
    units, degrees, percent and dollar signs are ignored (10\\text{ cm} == 10); a comma list or set is
    unordered (1, -2 == -2, 1; a repeated element counts), tuples, intervals, unions and matrices are
    compared element-wise with the same test and need the same brackets (pmatrix == bmatrix, [0,1) != (0,1));
    "x = 5" equals "5" but not "y = 5"; anything else must match as normalized text, so equivalent
    expressions written differently (2x+3 vs 3+2x) are missed, never invented. Unsure means not equal.
    None is never equivalent, not even to None.
    """
    if pred is None or ref is None:
        return False
    a, b = normalize_answer(pred), normalize_answer(ref)
    if not a or not b:
        return False
    return a == b or _same(_parse(a), _parse(b))


GRADERS = ("builtin", "math-verify")
MATH_VERIFY_TIMEOUT_S = 5  # per parse and per comparison (math-verify's own default)
_GRADER_CACHE = {}


def make_grader(name):
    """A function (response, reference) -> (the extracted answer or None, correct) for --grader `name`, with
    `.info` (name, version, timeouts: how many parse/verify calls hit the time limit and counted as wrong).

    builtin: the last \\boxed{} of the response, `is_equiv` to the reference; when that fails and the
    reference is a list, all boxes of the response together (\\boxed{-2} and \\boxed{1} for "1, -2").
    math-verify: Hugging Face's math-verify (an optional import) parses the whole response and the boxed
    reference and verifies with sympy. Its time limit uses SIGALRM, which only works in the main thread;
    elsewhere it runs without one."""
    if name in _GRADER_CACHE:
        return _GRADER_CACHE[name]
    if name == "builtin":
        def grade_builtin(response, reference):
            pred = extract_boxed(response)
            if is_equiv(pred, reference):
                return pred, True
            boxes = extract_all_boxed(response)
            ref = normalize_answer(reference) if reference is not None else ""
            if len(boxes) > 1 and ref and _parse(ref)[0] == "list":
                joined = ", ".join(boxes)
                if is_equiv(joined, reference):
                    return joined, True
            return pred, False
        grade_builtin.info = dict(name="builtin")
        fn = grade_builtin
    elif name == "math-verify":
        fn = _math_verify_grader()
    else:
        raise DailError(f"--grader {name}: expected one of {', '.join(GRADERS)}")
    _GRADER_CACHE[name] = fn
    return fn


def _math_verify_grader():
    """The math-verify grader of `make_grader` (imported here, so that it stays optional)."""
    try:
        import math_verify
        from math_verify.errors import TimeoutException
    except ImportError:
        raise DailError("--grader math-verify: math-verify is not installed; `pip install math-verify`") from None
    import importlib.metadata
    import threading
    info = dict(name="math-verify", version=importlib.metadata.version("math-verify"), timeouts=0)

    def grade_math_verify(response, reference):
        # SIGALRM time limits only work in the main thread; a timeout (a BaseException there) is "not correct"
        limit = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
        if not response or reference is None:
            return None, False
        try:
            gold = math_verify.parse("\\boxed{" + str(reference) + "}", parsing_timeout=limit, raise_on_error=True)
            pred = math_verify.parse(response, parsing_timeout=limit, raise_on_error=True)
        except TimeoutException:
            info["timeouts"] += 1
            return None, False
        except Exception:
            return None, False
        shown = next((p for p in pred if isinstance(p, str)), str(pred[0]) if pred else None)
        for g in gold:  # math_verify.verify tries every pair too; one pair at a time to count timeouts
            for p in pred:
                try:
                    if math_verify.verify(g, p, timeout_seconds=limit, raise_on_error=True):
                        return shown, True
                except TimeoutException:
                    info["timeouts"] += 1
                except Exception:
                    pass
        return shown, False
    grade_math_verify.info = info
    return grade_math_verify


def grader_info(name):
    """What summary.json records of a grader: its name, math-verify's version and timeout count."""
    return dict(make_grader(name).info)


def grade(response, reference, grader="builtin"):
    """(the extracted answer or None, whether it equals `reference`) of one response: what rewrite's filter
    and eval's pass@k both use, so a trace is kept by the very rule that scores a sample. `grader`: see
    `make_grader`."""
    return make_grader(grader)(response, reference)


def load_problems(path, need_solution, need_answer):
    """Validate a whole problem file before any model is loaded; a list of dicts with id (str), problem,
    solution (or None) and answer (the `answer` field, else the last \\boxed{} of `solution`, else None)."""
    problems, seen = [], {}
    for lineno, rec in read_jsonl(path):
        for name in ("problem", "solution") if need_solution else ("problem",):
            require(path, lineno, rec, name)
        solution = rec.get("solution")
        if solution is not None and not isinstance(solution, str):
            raise DailError(f"{path}:{lineno}: field 'solution': expected a string")
        answer = answer_of(path, lineno, rec, need_answer)
        prompt = check_prompt_field(path, lineno, rec)
        pid = rec.get("id", lineno)
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise DailError(f"{path}:{lineno}: field 'id': expected a string or an integer")
        pid = str(pid)
        if pid in seen:
            raise DailError(f"{path}:{lineno}: field 'id': duplicate id {pid!r} (first on line {seen[pid]})")
        seen[pid] = lineno
        problems.append(dict(id=pid, index=len(problems), where=f"{path}:{lineno}", problem=rec["problem"],
                             solution=solution, answer=answer, prompt=prompt))
    return problems


def check_prompt_field(path, lineno, rec):
    """The record's own eval prompt (the released eval used each benchmark's prompt), or None: a string (the
    user turn, used as it is) or a list of chat messages {"role": str, "content": str}."""
    prompt = rec.get("prompt")
    if prompt is None or isinstance(prompt, str) and prompt.strip():
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise DailError(f"{path}:{lineno}: field 'prompt': expected a non-empty string or a non-empty list of "
                        f"chat messages {{\"role\": ..., \"content\": ...}}")
    for i, m in enumerate(prompt):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DailError(f"{path}:{lineno}: field 'prompt[{i}]': expected a chat message "
                            f"{{\"role\": string, \"content\": string}}")
    return prompt


# ==== Appendix B.1, running it: errors, JSONL files and their line checks, training records, results, plots ============
class DailError(Exception):
    """A user-facing problem (bad input, missing file): printed as one line, exit code 2, no traceback."""


def first_line(e, width=200):
    """The first line of an exception's message (its type's name when it has none), cut to `width`: what a
    one-line DailError quotes of a library's error."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:width]


class Interrupted(Exception):
    """A run stopped by SIGTERM/SIGINT after saving what --resume needs: one line, exit code 128 + signal."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def read_jsonl(path, flag="--data"):
    """[(line number, record)] of a JSONL file; any defect is a DailError naming the file and the line."""
    p = Path(path)
    if not p.is_file():
        raise DailError(f"{flag} {path}: no such file")
    records = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DailError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:  # a number with a fraction or exponent stays the text written: 0.00001, not float's 1e-05
                rec = json.loads(line, parse_float=str)
            except json.JSONDecodeError as e:
                raise DailError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DailError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            records.append((lineno, rec))
    if not records:
        raise DailError(f"{path}: empty file, no JSON lines")
    return records


KINDS = {str: "a non-empty string", list: "a list", bool: "true or false", (str, int): "a non-empty string or a number"}


def require(path, lineno, rec, name, kind=str, hint=""):
    """rec[name], checked: a DailError naming the file, line and field when it is missing or not `kind` (a string
    must hold more than spaces; true/false is no number)."""
    if name not in rec:
        raise DailError(f"{path}:{lineno}: field '{name}': missing{hint}")
    value = rec[name]
    if (not isinstance(value, kind) or isinstance(value, str) and not value.strip()
            or isinstance(value, bool) and kind is not bool):
        raise DailError(f"{path}:{lineno}: field '{name}': expected {KINDS[kind]}{hint}")
    return value


def answer_of(path, lineno, rec, needed=True):
    """A record's reference answer as text: its `answer` field (a number as written in the file: read_jsonl keeps
    a JSON float's text, str() of an int is exact), else the last \\boxed{} of its `solution`, else None, which
    is a DailError when `needed` (the shortcut prompt states the answer; eval and the filter grade against it)."""
    if rec.get("answer") is not None:
        return str(require(path, lineno, rec, "answer", (str, int)))
    answer = extract_boxed(rec.get("solution"))
    if needed and answer is None:
        raise DailError(f"{path}:{lineno}: field 'answer': missing, and 'solution' has no \\boxed{{}} answer")
    return answer


def resume_jsonl(path, check=None, peek=False):
    """Records an earlier run wrote to `path` (an output file), [] if none. Each must be a JSON object that
    `check` (line_check, or None) finds no fault with; a line that is not is a DailError naming file and line.

    Lines are appended one `write` at a time, so an interruption can only leave a half-written *last*
    line; it is cut off here (with a note) so the rerun appends cleanly and writes that record again.
    peek: read a file another process may be appending to: nothing is cut (the last line may be the one
    being written, so it is only left out) and a bad line is skipped (merge_parts names it later)."""
    p = Path(path)
    if not p.exists():
        return []
    data = p.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        if not peek:
            with open(p, "r+b") as f:
                f.truncate(keep)
            print(f"note: {path}: dropped a half-written last line from an interrupted run", file=sys.stderr)
        data = data[:keep]
    out = []
    # split at "\n" only: str.splitlines() also breaks at U+0085, U+2028 and U+2029, which json.dumps
    # (ensure_ascii=False) leaves unescaped inside a model's response
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if raw.strip():
            try:
                rec = json.loads(raw.decode("utf-8"))
                fault = "not a JSON object" if not isinstance(rec, dict) else check(rec) if check else None
            except ValueError:                                        # not UTF-8, or not JSON
                fault = "corrupt line"
            if fault and peek:
                continue
            if fault:
                raise DailError(f"{path}:{lineno}: {fault} in an earlier run's output; move the file away "
                                f"(or --overwrite) to start over")
            out.append(rec)
    return out


# The fields eval and rewrite read back from their own output lines (resume, merge, summary): name -> type.
EVAL_FIELDS = dict(id=str, answer=str, responses=list, preds=list, correct=list, n_tokens=list, finish_reasons=list)
TRACE_FIELDS = dict(id=str, sample=int, response=str, response_ids=list, finish_reason=str, n_accepted=int,
                    kept=bool, reject_reason=(str, type(None)))


def line_check(fields, key, expected=None, n=None):
    """A check for resume_jsonl: a record must hold `fields` ({name: type}; each list of n items when n is
    given), and key(record) must be one of `expected` (what this run's --data asks for; None: any), once.
    Returns the fault of a record, or None. A duplicated or foreign line is thus an error, never counted."""
    seen = set()

    def check(rec):
        for name, kind in fields.items():
            value = rec.get(name)
            if name not in rec or not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                return f"field '{name}': missing or of the wrong type"
            if n is not None and kind is list and len(value) != n:
                return f"field '{name}': {len(value)} items where this run has --n {n}"
        k = key(rec)
        if expected is not None and k not in expected:
            return f"record {k!r} is not one of this run's --data"
        if k in seen:
            return f"record {k!r} a second time"
        seen.add(k)
    return check


def output_checks(command, problems, args, n):
    """k -> the line_check of shard k of n's output file (k = 0 of n = 1: the whole file): eval, one line per
    problem of the shard, each with --n samples; rewrite, one line per (problem id, sample < --samples)."""
    if command == "eval":
        return lambda k: line_check(EVAL_FIELDS, lambda r: r["id"], {p["id"] for p in shard_problems(problems, k, n)},
                                    args.n)
    return lambda k: line_check(TRACE_FIELDS, lambda t: (t["id"], t["sample"]),
                                {(p["id"], s) for p in shard_problems(problems, k, n) for s in range(args.samples)})


def append_jsonl(f, record):
    """One record, one write, flushed: an interruption never leaves a record half on disk but for the last."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()


def write_atomic(path, content):
    """Write a file whole or not at all: `content` (text, bytes, or a function that writes to a binary file)
    goes into a temporary file beside `path`, which then replaces it (os.replace), so an interruption or a
    full disk never leaves a 0-byte or half-written result. On failure the temporary file is removed and
    the error is one line naming the file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")     # the pid: processes never share a temp file
    try:
        with open(tmp, "wb") as f:
            content(f) if callable(content) else f.write(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = e if isinstance(e, OSError) else e.__context__     # torch.save wraps the OSError of a full disk
        if not isinstance(cause, OSError):
            raise
        full = " (the disk is full)" if cause.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise DailError(f"{path}: could not write it{full} ({cause.strerror or cause}); nothing was replaced; "
                        f"free space and rerun the same command") from None


def load_training_records(args):
    """The examples `train` learns from: kept traces (dail, sft on traces), or expert solutions (sft on
    expert; either an expert JSONL or the traces file, one per problem)."""
    rows = read_jsonl(args.data)
    if args.objective == "sft" and args.sft_target == "expert":
        if "response_ids" in rows[0][1]:  # a traces file: one expert solution per problem
            first = {}
            for lineno, r in rows:
                first.setdefault(str(r.get("id", lineno)), (lineno, r))
            rows = list(first.values())
        records = []
        for lineno, r in rows:
            require(args.data, lineno, r, "problem")
            require(args.data, lineno, r, "solution")
            records.append(dict(r, where=f"{args.data}:{lineno}", answer=answer_of(args.data, lineno, r, False)))
        return records, 0
    records, not_kept = [], 0
    for lineno, r in rows:
        for name, kind in (("problem", str), ("solution", str), ("response_ids", list), ("finish_reason", str),
                           ("kept", bool)):
            require(args.data, lineno, r, name, kind, " (train reads the traces.jsonl written by `rewrite`)"
                    if name == "response_ids" else "")
        check_token_ids(args.data, lineno, r["response_ids"], args.model)
        if r["kept"]:
            records.append(dict(r, where=f"{args.data}:{lineno}",
                                answer=answer_of(args.data, lineno, r, needed=args.objective == "dail")))
        else:
            not_kept += 1
    if not records:
        raise DailError(f"{args.data}: no trace has kept=true ({not_kept} rejected by the filter)")
    return records, not_kept


def save_peft_adapters(model, folder, args):
    """The LoRA adapters alone in PEFT's format, which peft's PeftModel.from_pretrained(base, folder) and vLLM
    (--enable-lora) load: adapter_model.safetensors with keys base_model.model.<module>.lora_A.weight [r, in]
    and .lora_B.weight [out, r], and adapter_config.json (PEFT's scale lora_alpha / r is ours)."""
    from safetensors.torch import save_file
    tensors, targets = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            tensors[f"base_model.model.{name}.lora_A.weight"] = module.lora_A.detach().float().cpu().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = module.lora_B.detach().float().cpu().contiguous()
            targets.add(name.rsplit(".", 1)[-1])
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    base = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    write_atomic(folder / "adapter_config.json", json.dumps(dict(
        peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base, r=args.lora_rank,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=sorted(targets), bias="none",
        fan_in_fan_out=False, inference_mode=True, init_lora_weights=True, modules_to_save=None,
        use_rslora=False, use_dora=False), indent=2))


def save_result(out, model, tok, args, summary):
    """OUT/: adapters/ (PEFT format), then the merged model + tokenizer that from_pretrained and vLLM load,
    dail_prompt.json (the prompt to use it with), metrics.png and train_summary.json."""
    if args.lora_rank:
        save_peft_adapters(model, out / "adapters", args)
        merge_lora(model)
    if args.grad_checkpointing:
        model.gradient_checkpointing_disable()
        model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    # the trained model answers in its trained format only from the student prompt: say which, beside it
    (out / "dail_prompt.json").write_text(json.dumps(dict(
        user_prompt=STUDENT_PROMPT, thinking=args.thinking,
        usage="text = tok.apply_chat_template([{'role': 'user', 'content': user_prompt.format(problem=...)}], "
              "tokenize=False, add_generation_prompt=True, enable_thinking=thinking); with thinking, append "
              "'<think>\\n' unless text ends with <think>; ids = tok(text, add_special_tokens=False).input_ids "
              "(the ids dail.py eval feeds the model)"), indent=2))
    metrics = resume_jsonl(out / "metrics.jsonl")
    keys = LOGGED[args.objective]
    save_plot(out / "metrics.png", f"train --objective {args.objective}", "step", "per-token value",
              {k: ([m["step"] for m in metrics], [m[k] for m in metrics]) for k in keys})
    summary = dict(summary, final=metrics[-1] if metrics else None, settings=dataclasses.asdict(args))
    write_atomic(out / "train_summary.json", json.dumps(summary, indent=2))
    return summary


def progress(iterable=None, **kw):
    from tqdm.auto import tqdm
    return tqdm(iterable, dynamic_ncols=True, **kw)


def save_plot(path, title, xlabel, ylabel, curves, logx=False, ylim=None):
    """Write a PNG of {label: (xs, ys)} when matplotlib is importable; say nothing when it is not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if ylim is not None:           # a fixed scale (pass@k: 0..1), so a flat 0.2 does not look like a slope
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ==== Appendix B.2, running it: safe reruns -- run fingerprints, resume, checkpoints, output locks, flag checks ========
def check_resume_config(path, config, resuming, overwrite=False):
    """Results may only be resumed by the run that wrote them. When `resuming` (earlier results exist) and
    not `overwrite`, compare `config` (run_config: model and data fingerprints plus every setting that changes
    results) with the one saved at `path`; any difference, or no saved config, is a one-line DailError naming
    the setting, old vs new, and the two ways out. Then (re)write it: an --out that cannot be written fails
    here, before any model loads."""
    p = Path(path)
    if resuming and not overwrite:
        if not p.exists():
            raise DailError(f"{p.parent}: holds results of an earlier run but no {p.name} recording how they "
                            f"were made; use another --out, or --overwrite to start over")
        old = read_config(p)
        k = differing_setting(old, config)
        if k is not None:
            raise DailError(f"{p.parent}: an earlier run wrote these results with {k}={old.get(k, '(not recorded)')!r}, "
                            f"this run asks for {k}={config[k]!r}; use another --out, or --overwrite to start over")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(p, json.dumps(config, indent=2))
    except OSError as e:
        raise DailError(f"--out {p.parent}: cannot write there ({e.strerror or e})") from None


def differing_setting(old, config):
    """The first result setting (the paths aside) where the saved settings `old` differ from `config`, or None;
    the one comparison behind both resume's refusal and the merge of part files."""
    return next((k for k in config if k != "paths" and old.get(k, "(not recorded)") != config[k]), None)


def read_config(path):
    """The settings an earlier run recorded at `path` (a JSON object); anything else is a one-line DailError."""
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DailError(f"{path}: unreadable ({e}); use another --out, or --overwrite to start over") from None
    if not isinstance(old, dict):
        raise DailError(f"{path}: not a JSON object of settings but a {type(old).__name__}; use another --out, or "
                        f"--overwrite to start over")
    return old


# The settings that change what a command writes: a resumed run must match all of them (check_resume_config).
# A new flag that changes results is one more name here.
RESULT_SETTINGS = {
    "rewrite": ("samples", "propose", "threshold", "retries", "temperature", "top_p", "top_k", "max_new_tokens",
                "thinking", "keep_per_problem", "no_filter", "keep_truncated", "leak_phrases", "max_prompt_len", "seed",
                "dtype", "grader", "greedy_proposer"),
    "train": ("objective", "sft_target", "lam", "direction", "lora_rank", "lora_alpha", "lora_dropout",
              "lora_targets", "lr", "weight_decay", "warmup_steps", "grad_clip", "batch_size", "epochs", "max_steps",
              "max_len", "thinking", "seed", "dtype", "loss_norm"),
    "eval": ("n", "temperature", "top_p", "top_k", "max_new_tokens", "thinking", "seed", "dtype", "grader",
             "presence_penalty", "answer_tokens", "no_force_answer"),
}


def run_config(args, command):
    """What proves that results in --out belong to this run: fingerprints of the model and the data (so the
    same files named by another path match, and a retrained model in the same folder does not), the
    normalized paths (for the reader), and every setting in RESULT_SETTINGS[command]."""
    config = dict(model_fingerprint=model_fingerprint(args.model),
                  data_fingerprint=file_fingerprint(args.data, whole_below=float("inf")))  # data: every byte
    config.update({k: getattr(args, k) for k in RESULT_SETTINGS[command]})
    return dict(config, paths=dict(model=normalized_model(args.model), data=str(Path(args.data).resolve())))


def normalized_model(name):
    """A model folder as an absolute path (so `m`, `m/` and `/abs/m` are one model); a hub id unchanged."""
    return str(Path(name).expanduser().resolve()) if Path(name).expanduser().exists() else name


def file_fingerprint(path, whole_below=64 << 20, edge=1 << 20):
    """'size:sha256[:16]' of a file: its whole content when under `whole_below` bytes (every data file in
    practice), else of its size, first and last `edge` bytes (a weight file: safetensors keep the tensor
    index in the header). None when the file does not exist."""
    p = Path(path)
    if not p.is_file():
        return None
    size, h = p.stat().st_size, hashlib.sha256()
    with open(p, "rb") as f:
        if size < whole_below:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(edge))
            f.seek(size - edge)
            h.update(f.read(edge))
    return f"{size}:{h.hexdigest()[:16]}"


# The files of a model folder that decide its outputs (weights, config, tokenizer); the rest of the folder
# (metrics, checkpoints, an eval folder inside it) does not enter the fingerprint.
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
               "chat_template.jinja", "chat_template.json", "*.safetensors", "*.safetensors.index.json",
               "pytorch_model*.bin", "pytorch_model.bin.index.json")


def model_fingerprint(name):
    """A short hash that changes when the model changes, cheap for a 16 GB folder. A folder: the
    file_fingerprint of each of its MODEL_FILES (small files whole; a weight file over 64 MiB by its size
    and first and last MiB, which hold the safetensors header with every tensor's name, shape and offset);
    all weights are not read. A hub id: 'id@commit' when the hub or the local cache says which commit it
    resolves to (hub_commit), else the id alone (then a new upload under the same id is not noticed)."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        commit = hub_commit(name)
        return f"{name}@{commit}" if commit else name
    files = sorted({f for pattern in MODEL_FILES for f in folder.glob(pattern) if f.is_file()})
    h = hashlib.sha256(json.dumps([(f.name, file_fingerprint(f)) for f in files]).encode())
    return f"{len(files)} files:{h.hexdigest()[:16]}"


def clear_results(*paths):
    """--overwrite: remove what an earlier run left (files or folders); what is not there is skipped."""
    for p in map(Path, paths):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


# Files `train` writes into --out (besides the model); --overwrite removes them, and any other file in --out
# means it holds something already.
TRAIN_RESULTS = ("metrics.jsonl", "metrics.png", "train_summary.json", "checkpoint.pt", "checkpoint.pt.tmp",
                 "adapters", "train_config.json", "reference_cache", "dail_prompt.json")


def guard_train_out(args):
    """train's --out, before any model loads: never the base model's folder nor a folder holding it or --data
    (check_own_inputs); a folder that holds anything is refused unless --resume (then only with the settings
    recorded in train_config.json) or --overwrite (which clears the earlier run's metrics, checkpoint and
    adapters first). Under torchrun only rank 0 checks and writes (the others would race it); when it
    refuses, torchrun stops the other ranks."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    out = Path(args.out).expanduser()
    check_own_inputs(args.out, [out / name for name in TRAIN_RESULTS + MODEL_FILES], {"--data": args.data},
                     args.model, folder=out)
    if out.exists() and not out.is_dir():
        raise DailError(f"--out {args.out}: exists and is not a folder; train writes a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DailError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None
    lock_output(out, args.out)
    held = sorted(p.name for p in out.iterdir() if p.name not in ("train_config.json", ".dail.lock"))
    if held and not (args.resume or args.overwrite):
        raise DailError(f"--out {args.out}: holds an earlier run ({', '.join(held[:3])}"
                        f"{', ...' if len(held) > 3 else ''}); use another --out, --resume to continue it, or "
                        f"--overwrite to start over")
    if args.overwrite:
        if args.resume:
            raise DailError("--resume and --overwrite: choose one (continue the earlier run, or start over)")
        clear_results(*(out / name for name in TRAIN_RESULTS))
    for stale in [*out.glob("*.tmp"), *(out / "reference_cache").glob("*.tmp")]:   # left by an interruption
        stale.unlink()
    check_resume_config(out / "train_config.json", run_config(args, "train"), resuming=args.resume and bool(held))


def trainable_state(model, args):
    """The weights train optimises (and checkpoints): the LoRA adapters, or every weight with --lora-rank 0."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k or args.lora_rank == 0}


def save_checkpoint(path, step, model, optimizer, args, device):
    """OUT/checkpoint.pt after `step` completed optimizer steps: the trainable weights, AdamW's state and every
    RNG, so that --resume continues exactly. Written whole or not at all (write_atomic)."""
    state = dict(step=step, trainable=trainable_state(model, args), optimizer=optimizer.state_dict(),
                 rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(),
                          cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                          python=random.getstate()), args=dataclasses.asdict(args))
    write_atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path, model, optimizer, args, device, total_steps):
    """Restore what save_checkpoint wrote; returns the number of completed steps. Strictly: a file that is not a
    checkpoint (truncated, garbage) or does not fit this run (trainable weights missing, extra or of another
    shape, a step past the run's end) is one line, never a silent start from fresh adapters."""
    def refuse(why):
        raise DailError(f"{path}: {why}; not a checkpoint of this run: move it away, or --overwrite to start over")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        step, trainable = ckpt["step"], dict(ckpt["trainable"])
    except Exception as e:          # a truncated zip, garbage bytes, another pickle: whatever torch says
        refuse(f"unreadable ({first_line(e, 120)})")
    want = trainable_state(model, args).keys()
    missing, extra = sorted(want - trainable.keys()), sorted(trainable.keys() - want)
    if missing or extra:
        refuse(f"{len(missing)} trainable weights missing ({(missing or ['none'])[0]}), {len(extra)} not of this "
               f"model ({(extra or ['none'])[0]})")
    if not isinstance(step, int) or not 0 <= step <= total_steps:
        refuse(f"step {step!r}, outside this run's 0..{total_steps} steps")
    try:
        model.load_state_dict(trainable, strict=False)          # strict over the trainable weights: checked above
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if ckpt["rng"].get("cuda") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), device)
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:   # a shape, the optimizer's groups, an RNG state
        refuse(f"does not fit ({first_line(e, 120)})")
    return step


def check_finite(step, values, checkpoint, args):
    """Stop training at the first step whose loss (or a term of it) or gradient norm is not finite, before
    its update: from there every weight turns NaN, and a NaN model would be saved with exit 0. Nothing is
    written for that step, so metrics.jsonl stays JSON and the last checkpoint (of a finite step) stands."""
    bad = [f"{k} {v}" for k, v in values.items() if not math.isfinite(v)]
    if bad:
        kept = f"{checkpoint} keeps the last checkpoint" if checkpoint.exists() else "no checkpoint was written"
        raise DailError(f"step {step}: {', '.join(bad)}: training diverged; stopped before this step's update "
                        f"({kept}); lower --lr (now {args.lr:g}) or raise --warmup-steps")


def check_own_inputs(out, outputs, inputs, model=None, folder=None):
    """No run writes over one of its own inputs, whatever the flags: each path in `outputs` (what the run writes
    or clears) is compared with each input ({flag: path}) and each of the --model folder's MODEL_FILES as the
    file system sees them (os.path.samefile: another spelling, a symlink or a hard link is the same file); an
    output `folder` may neither be nor hold the model folder. No flag lifts this, so the message offers none
    (--overwrite would delete the input)."""
    files = {f"{flag} {path}": path for flag, path in inputs.items() if path}
    model_dir = Path(model).expanduser() if model else None
    if model_dir and model_dir.is_dir():
        real, here = os.path.realpath(model_dir), os.path.realpath(folder) if folder else None
        if here and (real == here or real.startswith(here.rstrip(os.sep) + os.sep)):
            raise DailError(f"--out {out}: {'is' if real == here else 'holds'} the --model folder {model}; writing "
                            f"there would destroy the model; use another --out")
        files.update({f"--model {model}'s {f.name}": f for pattern in MODEL_FILES for f in model_dir.glob(pattern)})
    for path in outputs:
        for what, source in files.items():
            with contextlib.suppress(OSError):
                if os.path.samefile(path, source):
                    raise DailError(f"--out {out}: would write over {what}, an input of this run; use another --out")


_LOCKS = []  # the output locks this command holds (lock_output); main() releases them when the command ends


def lock_output(path, out):
    """An exclusive OS lock (flock, on a hidden file beside `path`, or in it for train's folder) on one output
    this run writes, held until the command ends: two runs appending to one file interleave their records
    (two evals into one folder counted 11 lines for 6 problems). Shards of one job write different part files
    and lock each its own, so they run together. The OS drops the lock when the process dies, kill -9
    included, so a rerun resumes."""
    p = Path(path)
    lock = p / ".dail.lock" if p.is_dir() else p.with_name(f".{p.name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise DailError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DailError(f"--out {out}: another run is writing {p} now (it holds {lock.name}); let it finish, "
                        f"or use another --out") from None
    except OSError as e:                     # a file system without locks (some NFS): run, but say so
        print(f"note: {lock}: cannot be locked ({e.strerror}); make sure no other run writes {p}", file=sys.stderr)
    _LOCKS.append(fd)


def check_out_file(args):
    """rewrite's --out is a file: refuse a folder, one of the run's inputs (check_own_inputs), and any place a file
    cannot be created, before any model loads."""
    path, p = args.out, Path(args.out).expanduser()
    check_own_inputs(path, [p, p.with_suffix(".summary.json"), p.with_suffix(".config.json"),
                            *p.parent.glob(f"{p.stem}.part*")], {"--data": args.data}, args.model)
    if p.is_dir():
        raise DailError(f"--out {path}: is a folder; rewrite writes a JSONL file (e.g. {Path(path) / 'traces.jsonl'})")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a"):
            pass
    except OSError as e:
        raise DailError(f"--out {path}: cannot write there ({e.strerror or e})") from None


def check_out_folder(args):
    """eval's --out is a folder: refuse an existing file, one that is or holds the model folder, an output that is
    an input (check_own_inputs), and any place a folder cannot be created."""
    path, p = args.out, Path(args.out).expanduser()
    check_own_inputs(path, [p / f for f in ("samples.jsonl", "summary.json", "passk.png", "eval_config.json")] +
                     list(p.glob("samples.part*")), {"--data": args.data}, args.model, folder=p)
    if p.exists() and not p.is_dir():
        raise DailError(f"--out {path}: exists and is not a folder; eval writes a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DailError(f"--out {path}: cannot create it ({e.strerror or e})") from None


def _at_least(low, optional=False):
    return lambda v: (optional and v is None) or (v is not None and math.isfinite(v) and v >= low)


# Every numeric (and otherwise constrained) flag: name -> (predicate, what it must be). validate_args applies
# the entries whose flag the command has; adding a flag's check is one line here.
VALID = {
    "seed": (lambda v: 0 <= v < 2 ** 32, "an integer in 0..4294967295"),  # torch, numpy and vLLM take derived seeds
    "threads": (_at_least(0), "an integer >= 0 (0: torch's default)"),
    "samples": (_at_least(1), "an integer >= 1"),
    "retries": (_at_least(1), "an integer >= 1"),
    "threshold": (_at_least(0), "a number >= 0 (0: pure proposer, >= 1: pure validator)"),
    "temperature": (_at_least(0), "a number >= 0 (0: greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (_at_least(0), "an integer >= 0 (0: all)"),
    "max_new_tokens": (_at_least(1), "an integer >= 1"),
    "max_prompt_len": (_at_least(1, optional=True), "an integer >= 1"),
    "keep_per_problem": (_at_least(1), "an integer >= 1"),
    "batch_size": (_at_least(1), "an integer >= 1"),
    "micro_batch_size": (_at_least(1), "an integer >= 1"),
    "tensor_parallel_size": (_at_least(1), "an integer >= 1"),
    "max_model_len": (_at_least(1, optional=True), "an integer >= 1"),
    "gpu_memory_utilization": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    "n": (_at_least(1), "an integer >= 1"),
    "presence_penalty": (_at_least(0), "a number >= 0 (0: off)"),
    "answer_tokens": (_at_least(1), "an integer >= 1"),
    "lam": (_at_least(0), "a number >= 0 (it weighs a subtracted term; 0 switches it off)"),
    "lora_rank": (_at_least(0), "an integer >= 0 (0: full fine-tuning)"),
    "lora_alpha": (lambda v: math.isfinite(v) and v > 0, "a number > 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "lora_targets": (lambda v: all(x.strip() for x in v.split(",")), "comma-separated module names"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "a number > 0"),
    "weight_decay": (_at_least(0), "a number >= 0"),
    "warmup_steps": (_at_least(0), "an integer >= 0"),
    "grad_clip": (_at_least(0), "a number >= 0 (0: off)"),
    "epochs": (_at_least(1), "an integer >= 1"),
    "max_steps": (_at_least(1, optional=True), "an integer >= 1 (an untrained model is not a result)"),
    "max_len": (_at_least(1), "an integer >= 1"),
    "loss_chunk": (_at_least(1), "an integer >= 1"),
    "log_every": (_at_least(1), "an integer >= 1"),
    "save_every": (_at_least(0), "an integer >= 0 (0: only at epoch ends, the end and on a signal)"),
    "device": (lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None, "auto, cpu, cuda, cuda:N or mps"),
}

# Flags a command inherits but does not use: giving one is an error rather than silently ignored.
UNUSED = {"train": {"max_prompt_len": "train's length limit is --max-len"}}


def validate_args(args):
    """Check every flag the command has against VALID (and UNUSED), before any file or model is touched: a
    bad value is a one-line DailError naming the flag, the value and what it must be."""
    command = next(name for name, (cls, _, _) in COMMANDS.items() if type(args) is cls)
    for name, reason in UNUSED.get(command, {}).items():
        if getattr(args, name, None) is not None:
            raise DailError(f"--{name.replace('_', '-')}: not used by {command} ({reason})")
    for name, (ok, must) in VALID.items():
        if hasattr(args, name):
            value = getattr(args, name)
            if value is None and name in ("threshold", "max_new_tokens", "epochs", "max_len"):
                continue  # None: the released default, filled in by resolve_released
            if not ok(value):
                raise DailError(f"--{name.replace('_', '-')} {value}: must be {must}")
    resolve_device(args.device)                # a device this machine lacks: refused before any model loads
    if command == "eval" and not args.regrade:
        check_sample_memory(args)
    return args


# What one eval sample holds at least until its problem's line is written (samples.jsonl has one line per
# problem, so all --n samples of a problem are in memory together): its records (a dict, list entries, its text
# and grade) and, per token of both passes, an 8-byte list slot and a 28-byte Python int for its id.
SAMPLE_BYTES, TOKEN_BYTES = 512, 36


def check_sample_memory(args):
    """Refuse an --n whose samples of one problem cannot fit in the memory available now, before any model loads
    (--n 30000000 otherwise grew past 4 GB building its rows before writing a line)."""
    need = args.n * (SAMPLE_BYTES + (args.max_new_tokens + args.answer_tokens) * TOKEN_BYTES)
    have = available_ram()
    if need > have:
        raise DailError(f"--n {args.n}: the {args.n} samples of one problem are held together until its line is "
                        f"written, up to {need / 2**30:.3g} GiB at --max-new-tokens {args.max_new_tokens} + "
                        f"--answer-tokens {args.answer_tokens}, and {have / 2**30:.3g} GiB are available; lower --n")


# Fewer optimizer steps than this barely move a model: train warns (planned_steps).
FEW_STEPS = 20


def planned_steps(args, num_examples, say=True):
    """train's optimizer steps: ceil(examples x epochs / --batch-size), at most --max-steps. A run of no more steps
    than the warm-up (the learning rate never passes its ramp) or of fewer than FEW_STEPS gets one warning line
    with the numbers and what to change: a few traces at the defaults are otherwise an untrained model, silently."""
    steps = math.ceil(num_examples * args.epochs / args.batch_size)
    if args.max_steps is not None:
        steps = min(steps, args.max_steps)
    if say and (steps <= args.warmup_steps or steps < FEW_STEPS):
        why = (f"no more than the {args.warmup_steps} warm-up steps (--warmup-steps), so the learning rate never "
               f"gets past its ramp" if steps <= args.warmup_steps else f"fewer than {FEW_STEPS}")
        print(f"warning: train: {num_examples} examples x {args.epochs} epochs / batch {args.batch_size} = {steps} "
              f"optimizer steps{f' (--max-steps {args.max_steps})' if steps == args.max_steps else ''}, {why}: the "
              f"model will barely train; use more traces, more --epochs or a smaller --batch-size"
              f"{', or fewer --warmup-steps' if steps <= args.warmup_steps else ''}", file=sys.stderr)
    return steps


# ==== Appendix B.3, running it: the reference cache (teacher and shortcut states in memory or on disk) =================
def new_reference_cache(mode, folder=None, hidden=None):
    """A store for reference_states: mode 'memory' (host RAM, moved to the device per micro-batch), 'disk' (one
    safetensors file per example in `folder`, read per micro-batch: memory does not grow with the examples)
    or 'off'; hidden: H, to check what is read. Counts examples computed, reused, and files found bad."""
    if mode == "disk":
        Path(folder).mkdir(parents=True, exist_ok=True)
    return dict(mode=mode, folder=Path(folder) if folder else None, hidden=hidden, dtype=None, states={},
                computed=0, reused=0, bad_files=0)


def example_key(ex):
    """A cache entry's name: a hash of the example's token ids (privileged prompt, shortcut prompt, response),
    so an entry can only serve the example it was computed for, whichever rank or run computed it."""
    ids = [ex["privileged"][0], ex["shortcut"][0], ex["privileged"][1]]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:32]


def load_states(cache, ex):
    """An example's cached (teacher [n, H], shortcut [n, H]), or None when it must be computed. A file that
    does not load, belongs to another example, fails its checksum (read_states) or holds another shape or
    dtype (a damaged or copied cache) is counted, reported and recomputed (store_states replaces it)."""
    if cache["mode"] == "memory":
        states = cache["states"].get(example_key(ex))
    elif cache["mode"] == "disk":
        path = cache["folder"] / f"{example_key(ex)}.safetensors"
        if not path.exists():
            return None
        states = read_states(path, example_key(ex))
        n = len(ex["privileged"][1])
        dtype = cache["dtype"] or (states[0].dtype if states else None)
        if not states or any(t.shape != (n, cache["hidden"] or t.shape[1]) or t.dtype != dtype for t in states):
            cache["bad_files"] += 1
            print(f"note: {path}: unreadable, another example's or fails its checksum; recomputed", file=sys.stderr)
            return None
        cache["dtype"] = dtype
    else:
        return None
    cache["reused"] += states is not None
    return states


def store_states(cache, ex, teacher, shortcut):
    """Keep one example's freshly computed states (teacher, shortcut: [n, H]) and return them (disk: write_states,
    whole or not at all, with the example's key and a checksum)."""
    cache["dtype"] = cache["dtype"] or teacher.dtype
    if cache["mode"] == "memory":
        cache["states"][example_key(ex)] = (teacher.to("cpu", copy=True), shortcut.to("cpu", copy=True))
    elif cache["mode"] == "disk":
        write_states(cache["folder"] / f"{example_key(ex)}.safetensors", example_key(ex), teacher, shortcut)
    return teacher, shortcut


def available_ram():
    """Bytes of host memory available to new allocations (Linux MemAvailable; else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def setup_reference_cache(args, examples, model, dtype, out, ranks_here=1):
    """--reference-cache -> (new_reference_cache, the line that says what was picked and its size). Size =
    response tokens x 2 contexts x H x bytes of `dtype`; in memory every rank on this machine holds its own
    copy. auto: memory if that is at most half the available RAM, else disk if the free space at OUT is at
    least twice the size, else off. An explicit choice that does not fit is an error, never a full disk."""
    hidden = model.get_input_embeddings().weight.shape[1]
    tokens = sum(len(ex["privileged"][1]) for ex in examples)
    size = tokens * 2 * hidden * dtype.itemsize
    ram, disk = available_ram(), shutil.disk_usage(out).free
    fits = dict(memory=size * ranks_here <= ram // 2, disk=size * 2 <= disk, off=True)
    mode = args.reference_cache
    if mode == "auto":
        mode = next(m for m in ("memory", "disk", "off") if fits[m])
    elif not fits[mode]:
        room = (f"{size * ranks_here / 1e9:.2f} GB for {ranks_here} rank(s), more than half the available RAM "
                f"({ram / 1e9:.2f} GB)") if mode == "memory" else \
            f"{size / 1e9:.2f} GB, and {out} has {disk / 1e9:.2f} GB free (less than twice that)"
        raise DailError(f"--reference-cache {mode}: the cache would take {room}; use --reference-cache auto or off")
    where = {"memory": "in memory", "disk": f"on disk in {out / 'reference_cache'}", "off": "off"}[mode]
    line = (f"train: reference cache {where} ({'auto: ' if args.reference_cache == 'auto' else ''}{size / 1e9:.3g} "
            f"GB = {tokens} response tokens x 2 contexts x hidden {hidden} x {dtype.itemsize} bytes)")
    return new_reference_cache(mode, out / "reference_cache", hidden), line


def states_digest(tensors):
    """sha256 of tensors' dtypes, shapes and bytes: a reference-cache entry's checksum."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def write_states(path, key, teacher, shortcut):
    """One reference-cache file (safetensors) that names what it holds: its example's key (example_key) and the
    checksum of its states (states_digest), in the header's metadata; read_states checks both."""
    from safetensors.torch import save
    tensors = {"teacher": teacher.contiguous().cpu(), "shortcut": shortcut.contiguous().cpu()}
    write_atomic(path, save(tensors, metadata=dict(key=key, sha256=states_digest(tensors.values()))))


def read_states(path, key):
    """(teacher, shortcut) of a file write_states wrote for `key`, or () when it does not load, was written for
    another example (a file copied over this one) or fails its checksum (flipped bits): never read as data."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta, states = f.metadata() or {}, (f.get_tensor("teacher"), f.get_tensor("shortcut"))
    except Exception:
        return ()
    return states if meta.get("key") == key and meta.get("sha256") == states_digest(states) else ()


# ==== Appendix B.4, running it: torchrun (process group, all-reduce, stop signals) and --shard part files ==============
def setup_distributed(args):
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK: one process per device, each takes its share of every
    step. Returns (ddp, rank, world_size, device); a single process gets (False, 0, 1, --device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False, 0, 1, resolve_device(args.device)
    backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
    dist.init_process_group(backend)
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def end_distributed(ddp):
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_step(params, logged, device):
    """Data parallel: sum the gradients and the logged sums of every rank, once per optimizer step. Each rank's
    share is already divided by the step's global divisor, so the sum is the big batch's gradient."""
    for p in params:
        if p.grad is None:                 # a rank with no sequence in a short last step
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
    sums = torch.tensor(list(logged.values()), dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return dict(zip(logged, sums.tolist()))


@contextlib.contextmanager
def stop_signals():
    """Within the block SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) do not kill the process: they
    set state["signal"], and the training loop stops after the step in flight with a checkpoint. A second
    signal a second or more later (torchrun forwards the first Ctrl-C once more at once) abandons the step
    in flight (raises Interrupted); the last checkpoint stands."""
    state = {"signal": None, "at": 0.0}

    def handler(signum, frame):
        if state["signal"] is None:
            state["signal"], state["at"] = signum, time.time()
            os.write(2, b"dail.py train: stopping after the step in flight, with a checkpoint "     # not print():
                        b"(signal again to abandon the step)\n")                                 # not reentrant
        elif time.time() - state["at"] >= 1.0:
            raise Interrupted("interrupted again: the step in flight is abandoned; rerun with --resume to "
                              "continue from the last checkpoint", 128 + signum)

    if threading.current_thread() is not threading.main_thread():     # signals reach the main thread only
        yield state
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def agreed_signal(signum, ddp, device):
    """The stop signal as every rank sees it (0: none): all ranks stop after the same step."""
    if not ddp:
        return signum or 0
    flag = torch.tensor([float(signum or 0)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def shard_of(spec):
    """This process's share of a rewrite or eval: (k, n) = shard k of n. From `--shard K/N` (SLURM arrays and
    other schedulers), else torchrun's RANK and WORLD_SIZE, else (0, 1): the whole job in one process."""
    if spec:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if not m or not int(m.group(1)) < int(m.group(2)):
            raise DailError(f"--shard {spec}: expected K/N with 0 <= K < N, e.g. 0/4")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise DailError(f"--shard {spec}: under torchrun each rank already takes its own shard; drop --shard")
        return int(m.group(1)), int(m.group(2))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def part_file(out_file, k, n):
    """Where shard k of n writes: traces.jsonl -> traces.part0-of-4.jsonl, beside the merged file."""
    out_file = Path(out_file)
    return out_file.with_name(f"{out_file.stem}.part{k}-of-{n}{out_file.suffix}")


def shard_problems(problems, k, n):
    """Shard k of n takes problems k, k + n, k + 2n, ... of the file: equal counts (to one), and early and
    late problems alike, so no shard gets all the long ones of a file sorted by difficulty."""
    return problems[k::n]


def merge_parts(out_file, n, order, checks=None):
    """Write the records of the n part files of `out_file` into `out_file` itself, sorted by order(record)
    (input order), atomically; a record present twice is an error, never a silent duplicate; checks(k): the
    line_check of part k (output_checks). -> records."""
    records = [r for k in range(n) for r in resume_jsonl(part_file(out_file, k, n), checks and checks(k))]
    records.sort(key=order)
    keys = [order(r) for r in records]
    dup = next((a for a, b in zip(keys, keys[1:]) if a == b), None)
    if dup is not None:
        raise DailError(f"{out_file}: the part files hold record {dup} twice; they were not written by "
                        f"one split of this job")
    # two shards that finish together may both merge: each through its own temporary file (write_atomic)
    write_atomic(out_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def shard_device(args):
    """rewrite/eval's torch device: under torchrun each rank its own GPU (cuda:LOCAL_RANK) with --device auto."""
    if args.device == "auto" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
    return resolve_device(args.device)


def split_on_disk(out_file):
    """N of the part files (part_file) an earlier split of this job left beside out_file; None when none."""
    out_file = Path(out_file)
    pattern = re.compile(rf"{re.escape(out_file.stem)}\.part\d+-of-(\d+){re.escape(out_file.suffix)}")
    ns = {int(m.group(1)) for p in out_file.parent.glob(f"{out_file.stem}.part*")
          if (m := pattern.fullmatch(p.name))}
    if len(ns) > 1:
        raise DailError(f"{out_file.parent}: holds part files of splits into {sorted(ns)} shards; keep one split "
                        f"(move the others away), or --overwrite to start over")
    return ns.pop() if ns else None


def plan_shards(out_file, args, shard=None):
    """Which files this process writes and whether it merges: (n, ks, merge, follower) = the split into n
    shards, the shards k it decodes (each into part_file(out_file, k, n); n = 1: out_file itself), and when it merges:
    'wait' (rank 0 under torchrun: polls until every part is complete), 'ready' (--shard K/N: merges when it
    finds every part complete), 'now' (a plain run that found the parts of an earlier split: it finishes
    every incomplete part itself, then merges; --merge: merges only), None (n = 1). follower: a vLLM
    tensor-parallel rank other than the first of its group, which decodes its group's shard in step with
    it (vLLM's collectives) but writes nothing.
    shard: (k, n, follower) when vLLM splits the ranks itself (vllm_shard), else from shard_of(--shard).
    Each file this process will write is locked (lock_output) before anything is cleared or resumed."""
    k, n, follower = shard or (*shard_of(args.shard), False)
    earlier = None if args.overwrite else split_on_disk(out_file)
    if n > 1 and args.merge:
        raise DailError("--merge: merges the parts of an earlier split in one process; drop --shard (or torchrun)")
    if n > 1:
        if earlier not in (None, n):
            raise DailError(f"{Path(out_file).parent}: holds the parts of a split into {earlier} shards, this run "
                            f"splits into {n}; use the same split, or --overwrite to start over")
        plan = n, [k], None if follower else "ready" if args.shard else "wait" if k == 0 else None, follower
    elif args.merge:
        if earlier is None:
            raise DailError(f"--merge: no part files of {out_file} to merge (run the shards first: --shard K/N)")
        plan = earlier, [], "now", follower
    else:
        plan = (earlier, list(range(earlier)), "now", follower) if earlier else (1, [0], None, follower)
    for k in [] if follower else plan[1]:
        lock_output(shard_path(out_file, k, plan[0]), args.out)
    return plan


def vllm_shard(args, engine):
    """Under torchrun with the vLLM engine, vLLM's own data parallelism for external launchers: every group
    of --tensor-parallel-size consecutive ranks runs one engine (ranks r with r // tp = k form data-parallel
    shard k of WORLD_SIZE / tp). -> (k, n, follower), or None when not under torchrun or not vLLM."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if engine != "vllm" or world == 1:
        return None
    tp = args.tensor_parallel_size
    if world % tp:
        raise DailError(f"--tensor-parallel-size {tp}: torchrun started {world} processes, not a multiple of it")
    if args.shard:
        shard_of(args.shard)                                  # the one-line error: no --shard under torchrun
    rank = int(os.environ["RANK"])
    return rank // tp, world // tp, rank % tp != 0


def start_job(command, out_file, args, engine, problems, config_of, *results):
    """The one start of rewrite and eval: plan the split (plan_shards), clear out_file's parts and `results`
    on --overwrite, and read back what this process's shards wrote earlier (open_shard)
    -> (n, ks, merge, follower, config, checks, done: {k: records})."""
    n, ks, merge, follower = plan_shards(out_file, args, vllm_shard(args, engine))
    if args.overwrite and not follower:
        clear_shard_results(out_file, n, ks, merge, config_of, *results)
    config = run_config(args, command)
    checks = output_checks(command, problems, args, n)
    done = {k: open_shard(out_file, k, n, config, config_of, follower, checks(k)) for k in ks}
    return n, ks, merge, follower, config, checks, done


def open_shard(out_file, k, n, config, config_of, follower=False, check=None):
    """The records shard k of n wrote earlier into its file (shard_path), after checking they were written
    with `config` (check_resume_config, which saves it) and each line with `check` (resume_jsonl). A vLLM
    follower only reads (it writes nothing)."""
    path = shard_path(out_file, k, n)
    if follower:
        return written_records(path)
    done = resume_jsonl(path, check)
    check_resume_config(config_of(path), config, resuming=bool(done))
    return done


def clear_shard_results(out_file, n, ks, merge, config_of, *others):
    """--overwrite: each process removes the files it writes (its part files and their configs); the process
    that merges (or a single one) also the merged file, `others` (the summary) and parts of other splits."""
    parts = [part_file(out_file, k, n) for k in ks if n > 1]
    clear_results(*parts, *map(config_of, parts))
    if merge or n == 1:
        out_file = Path(out_file)
        stale = [p for p in out_file.parent.glob(f"{out_file.stem}.part*-of-*")
                 if not p.name.split(".part", 1)[1].split(".")[0].endswith(f"-of-{n}") or n == 1]
        clear_results(out_file, *others, *stale)


def shard_path(out_file, k, n):
    """The file shard k of n writes: out_file itself when the job is not split."""
    return Path(out_file) if n == 1 else part_file(out_file, k, n)


def written_records(path):
    """The complete lines of a JSONL file another process may be appending to (resume_jsonl's read-only mode)."""
    return resume_jsonl(path, peek=True)


def config_difference(path, config):
    """The first result setting where the config saved at path differs from `config` ('' when equal; None
    when no config is saved there yet)."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        old = json.loads(p.read_text())
    except ValueError:
        return None                                      # being written right now: look again later
    k = differing_setting(old, config)
    return "" if k is None else f"{k}={old.get(k, '(not recorded)')!r}"


def incomplete_parts(out_file, n, config, config_of, expected, key):
    """The shards k < n whose part file lacks one of expected[k] (a set of key(record)) or was not yet
    started; a part written with other settings than `config` is a DailError (never merged)."""
    missing = []
    for k in range(n):
        path = part_file(out_file, k, n)
        diff = config_difference(config_of(path), config)
        if diff:
            raise DailError(f"{path}: written with {diff}, unlike this run; parts of one file must come from "
                            f"the same command (rerun that shard, or --overwrite to start over)")
        if diff is None or not expected[k] <= {key(r) for r in written_records(path) if keyed(key, r)}:
            missing.append(k)
    return missing


def keyed(key, record):
    """Whether key(record) can be taken: a part still being written is read before merge_parts checks its lines."""
    try:
        return key(record) is not None
    except (KeyError, TypeError):
        return False


def gather_parts(out_file, n, mode, config, config_of, expected, key, order, checks=None):
    """The records of the whole job, the one tail of rewrite and eval. A job not split (n = 1): out_file's
    own. A process that does not merge (mode None, n > 1: a rank other than 0): None. Else merge the n part
    files into out_file (merge_parts, input order) once all are complete, and save `config` beside it -> the
    merged records, or None when not all are complete and mode is not 'wait' (then say which are missing).
    'wait' (rank 0 under torchrun) polls the files instead of a barrier, which would time out on a long job;
    if a rank dies, torchrun stops this one too."""
    if mode is None:
        return resume_jsonl(out_file, checks and checks(0)) if n == 1 else None
    pause = 1.0
    while missing := incomplete_parts(out_file, n, config, config_of, expected, key):
        if mode != "wait":
            print(f"note: {out_file}: parts {', '.join(map(str, missing))} of {n} are not complete yet; run "
                  f"them (--shard K/{n}), then rerun without --shard (or with --merge) to merge", file=sys.stderr)
            if mode == "now":
                raise DailError(f"--merge: {len(missing)} of {n} parts of {out_file} are incomplete")
            return None
        if pause == 1.0:
            print(f"rank 0: waiting for parts {', '.join(map(str, missing))} of {n} of {out_file}", file=sys.stderr)
        time.sleep(pause)
        pause = min(2 * pause, 30.0)
    records = merge_parts(out_file, n, order, checks)
    check_resume_config(config_of(out_file), config, resuming=False)
    print(f"merged {n} parts into {out_file}", file=sys.stderr)
    return records


# ==== Appendix B.5, running it: devices, models and the hub, tokenizers, context lengths and stop tokens ===============
def resolve_device(name):
    """--device as a torch.device; one this machine cannot use is a DailError (validate_args asks first)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DailError(f"--device {name}: CUDA is not available on this machine")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise DailError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DailError("--device mps: Apple's MPS is not available on this machine")
    return torch.device(name)


def resolve_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_model_name(name):
    """An existing folder, or something shaped like a hub id ("org/name"); a missing folder fails here.
    For a hub id with the hub out of reach, switch to the local cache at once (the hub client would
    otherwise retry with back-off for about a minute before failing)."""
    if Path(name).exists():
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise DailError(f"--model {name}: no such model folder")
    if hub_offline():
        return
    if not hub_probe(name)[1]:
        print(f"note: the Hugging Face hub ({hub_endpoint()}) is unreachable; looking for {name} in the local "
              f"cache only", file=sys.stderr)
        os.environ["HF_HUB_OFFLINE"] = "1"
        import huggingface_hub.constants
        huggingface_hub.constants.HF_HUB_OFFLINE = True


def hub_offline():
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_endpoint():
    """The hub the client talks to: HF_ENDPOINT (a mirror) when set, else huggingface.co."""
    import huggingface_hub.constants
    return os.environ.get("HF_ENDPOINT", huggingface_hub.constants.ENDPOINT).rstrip("/")


_HUB_PROBES = {}


def hub_probe(name, timeout=5):
    """(commit or None, hub reachable) for a hub id, asked once per process: one HEAD request for its
    config.json through the hub client, so HF_ENDPOINT (a mirror), HTTP(S)_PROXY and the token are honoured
    as in the download itself; no retries, `timeout` seconds. An HTTP error (no such repo, gated) means
    the hub answered; a connection error or timeout means it is out of reach."""
    if name not in _HUB_PROBES:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError
        try:
            _HUB_PROBES[name] = (get_hf_file_metadata(hf_hub_url(name, "config.json", endpoint=hub_endpoint()),
                                                      timeout=timeout).commit_hash,
                                 True)
        except HfHubHTTPError:
            _HUB_PROBES[name] = (None, True)
        except Exception:  # connection refused, DNS failure, timeout, proxy error, offline mode
            _HUB_PROBES[name] = (None, False)
    return _HUB_PROBES[name]


def hub_commit(name):
    """The commit a hub id resolves to: from the hub (hub_probe) unless offline, else from the local cache's
    snapshot of its config.json; None when neither knows."""
    if not hub_offline():
        commit = hub_probe(name)[0]
        if commit:
            return commit
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:
        return None
    return Path(cached).parent.name if isinstance(cached, str) else None


def load_tokenizer(name, trust_remote_code=False):
    from transformers import AutoTokenizer
    check_model_name(name)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:  # hub unreachable, bad folder, ...: one clear line, not a traceback
        raise load_error(name, "tokenizer", e) from None
    if not getattr(tok, "chat_template", None):
        raise DailError(f"--model {name}: the tokenizer has no chat template; DAIL prompts are chat turns")
    check_tokenizer_reload(tok, name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def template_supports_thinking(tok):
    """Whether the tokenizer's chat template knows a thinking block (Qwen3-style: it reads `enable_thinking`
    or writes <think>). A template given as several named templates counts when any of them does."""
    template = tok.chat_template
    text = " ".join(template.values()) if isinstance(template, dict) else str(template or "")
    return "enable_thinking" in text or "<think>" in text


def check_thinking_flag(tok, args):
    """Warn (stderr, once per command) when --thinking does not match the chat template: a reasoning model
    run without it is prompted, budgeted and graded as a non-reasoning one, silently."""
    supports = template_supports_thinking(tok)
    if supports and not args.thinking:
        print(f"warning: --model {args.model}: the chat template supports thinking (<think>) but --thinking "
              f"is not set; a reasoning model needs --thinking for its prompts, budgets and grading",
              file=sys.stderr)
    elif args.thinking and not supports:
        print(f"warning: --model {args.model}: --thinking is set but the chat template has no thinking "
              f"support; dail.py will open <think> itself", file=sys.stderr)
    return supports


def check_tokenizer_reload(tok, name):
    """Warn when the loaded tokenizer encodes differently from the folder's own tokenizer.json:
    transformers 5 may reload a saved tokenizer as the architecture's class (Qwen2Tokenizer for a qwen2
    config) with that class's pre-tokenizer, so one trained another way then silently changes its ids."""
    path = Path(name) / "tokenizer.json"
    if not path.is_file():
        return
    from tokenizers import Tokenizer
    probe = "Find 17^83 mod 10:  12+345 = \\boxed{357}.\n\tCaf\u00e9, 'quotes' and   spaces"
    saved = Tokenizer.from_file(str(path)).encode(probe, add_special_tokens=False).ids
    if saved != tok(probe, add_special_tokens=False)["input_ids"]:
        print(f"warning: --model {name}: the loaded tokenizer ({type(tok).__name__}) encodes text differently "
              f"from {path}; check the tokenizer class and pre-tokenizer", file=sys.stderr)


def load_model(name, device, dtype, trust_remote_code=False):
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise load_error(name, "model", e) from None
    return model.to(device)


def load_error(name, what, e):
    """The one-line DailError of a model or tokenizer that failed to load. A folder with its own code (auto_map)
    fails without --trust-remote-code (trust_remote_code=False: transformers neither runs it nor asks on stdin)."""
    msg = first_line(e)
    if "trust_remote_code" in str(e):
        return DailError(f"--model {name}: ships its own Python code (auto_map), which runs only with "
                         f"--trust-remote-code; pass it only for a model whose code you trust")
    hint = "" if Path(name).exists() or what == "model" else \
        "; a hub id needs network access or a copy in the local cache"
    return DailError(f"--model {name}: could not load the {what} ({msg[:200]}){hint}")


@functools.lru_cache(maxsize=None)
def vocab_size(name):
    """vocab_size from a model folder's config.json, read as plain JSON (no code runs, no network), or None."""
    try:
        size = json.loads((Path(name) / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return size if type(size) is int else None


def check_token_ids(path, lineno, ids, model):
    """A trace's response_ids must be token ids of --model: integers in [0, its vocabulary size), checked before
    any model loads (an id out of range fails deep inside the embedding, far from the line that holds it)."""
    vocab = vocab_size(model)
    bad = next((i for i, t in enumerate(ids) if type(t) is not int or t < 0 or vocab and t >= vocab), None)
    if bad is not None:
        raise DailError(f"{path}:{lineno}: field 'response_ids': item {bad} is {ids[bad]!r}, not a token id "
                        f"(an integer in [0, {vocab or 'the vocabulary size'}) for --model {model})")


def record_prompt_ids(tok, problem, thinking):
    """chat_prompt_ids of an eval record's own `prompt`; one the chat template rejects (a role it does not know:
    jinja2's error names no file or line) is a DailError naming the record's file, line and field."""
    try:
        return chat_prompt_ids(tok, problem["prompt"], thinking)
    except Exception as e:
        raise DailError(f"{problem['where']}: field 'prompt': the chat template of the model rejects it "
                        f"({first_line(e)})") from None


def cache_kwarg(model, cache):
    """The keyword a model's forward takes its KV cache by: `cache` in transformers 5.x (which warns that
    `past_key_values` goes away in 5.40), `past_key_values` in 4.x (which has no `cache`)."""
    import inspect
    forward = getattr(model, "get_base_model", lambda: model)().forward
    return {"cache" if "cache" in inspect.signature(forward).parameters else "past_key_values": cache}


def context_length(name, trust_remote_code=False):
    """The model's context length from its config (no weights loaded), or None."""
    from transformers import AutoConfig
    try:
        return getattr(AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code),
                       "max_position_embeddings", None)
    except Exception:
        return None


def prompt_budget(args, command, longest_prompt):
    """--max-prompt-len, else the model's context length minus --max-new-tokens, else None (no limit).
    A --max-new-tokens that fills the whole context (the defaults, 2048 and 4096, on a small model) is
    clipped, with one printed line, to the context minus the longest prompt (longest_prompt(): its tokens),
    so the defaults run on the shipped 512-token model and stay as released on real models. The clipped
    value is a function of the model, the data and the flag, so a rerun clips alike and resumes."""
    if args.max_prompt_len is not None:
        return args.max_prompt_len
    n = context_length(args.model, args.trust_remote_code)
    if n is not None and n - args.max_new_tokens < 1:
        longest = longest_prompt()
        if n - longest < 1:
            raise DailError(f"--max-new-tokens {args.max_new_tokens}: the model's context is {n} tokens, which "
                            f"leaves no room for a prompt; lower --max-new-tokens (or set --max-prompt-len)")
        print(f"{command}: --max-new-tokens {args.max_new_tokens} does not fit the model's {n}-token context; "
              f"using {n - longest} (the context minus the longest prompt, {longest} tokens)", file=sys.stderr)
        args.max_new_tokens = n - longest
    return None if n is None else n - args.max_new_tokens


def stop_token_ids(tok, name):
    """Tokens that end a response: the tokenizer's and generation config's EOS, and ChatML's end of turn."""
    ids = {tok.eos_token_id}
    try:
        from transformers import GenerationConfig
        eos = GenerationConfig.from_pretrained(name).eos_token_id
        ids |= set(eos if isinstance(eos, (list, tuple)) else [eos])
    except Exception:
        pass  # no generation_config.json: the tokenizer's EOS is enough
    ids.add(end_of_turn_id(tok))
    return sorted(i for i in ids if i is not None)


def end_of_turn_id(tok):
    """The token that closes an assistant turn (ChatML's <|im_end|>, else EOS): what a trace learns to stop on."""
    vocab = tok.get_vocab()
    return vocab.get("<|im_end|>", tok.eos_token_id)


# ==== Appendix B.6, running it: the vLLM engine (an optional import) ===================================================
def eval_engine(args):
    """eval's engine: --engine, where auto is vLLM when it is importable and a GPU is present, else hf."""
    if args.engine == "auto":
        return "vllm" if vllm_available() and torch.cuda.is_available() else "hf"
    return args.engine


def rewrite_engine(args, say=False):
    """The engine rewrite runs: vLLM only at a pure-policy threshold (0 or >= 1); auto: vLLM on a GPU."""
    engine = args.engine
    pure = args.threshold <= 0 or args.threshold >= 1
    if engine in ("vllm", "auto") and not pure:
        if say:
            print(f"note: --threshold {args.threshold} mixes two contexts token by token, which vLLM's batched "
                  f"sampling cannot do; using the transformers engine", file=sys.stderr)
        engine = "hf"
    if engine == "auto":
        engine = "vllm" if vllm_available() and torch.cuda.is_available() else "hf"
    return engine


def vllm_available():
    try:
        import vllm  # noqa: F401
        return True
    except Exception:
        return False


def load_vllm(args):
    try:
        import vllm
    except ImportError:
        raise DailError("--engine vllm: vLLM is not installed; `pip install -r requirements-vllm.txt` "
                        "(GPU), or use --engine hf") from None
    device = resolve_device(args.device) if args.device != "auto" else None
    dtype = "auto" if args.dtype == "auto" else args.dtype
    if dtype == "auto" and not torch.cuda.is_available():
        dtype = "float32"
    kw = dict(model=args.model, dtype=dtype, seed=args.seed, tensor_parallel_size=args.tensor_parallel_size,
              trust_remote_code=args.trust_remote_code)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under torchrun: one engine per --tensor-parallel-size ranks, data parallel (vllm_shard)
        kw.update(distributed_executor_backend="external_launcher",
                  data_parallel_size=world // args.tensor_parallel_size)
    if args.max_model_len:
        kw["max_model_len"] = args.max_model_len
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        kw["gpu_memory_utilization"] = args.gpu_memory_utilization
    else:
        kw["enforce_eager"] = True
    return vllm.LLM(**kw)


def vllm_sample(llm, prompts, n, args, stop_ids, seeds, banned_ids=(), max_tokens=None, presence_penalty=0.0):
    """n samples per prompt (given as token ids, so both engines see the same prompt) with one request per
    prompt and a per-prompt seed; at most max_tokens (default --max-new-tokens) each. presence_penalty is
    vLLM's own (it penalizes tokens of the generated output, not the prompt: decode's semantics). Returns per
    prompt, n dicts (ids without the stop token, finish_reason, stop_id: the stop token or None)."""
    from vllm import SamplingParams
    copies = n if args.temperature == 0 else 1       # vLLM refuses n > 1 when greedy: the samples are equal
    n = 1 if args.temperature == 0 else n
    params = [SamplingParams(n=n, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k if args.top_k > 0 else -1,
                             max_tokens=max_tokens or args.max_new_tokens, presence_penalty=presence_penalty,
                             seed=s, stop_token_ids=list(stop_ids), skip_special_tokens=False,
                             logit_bias={t: -100.0 for t in banned_ids} or None) for s in seeds]
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    stop = set(stop_ids)
    results = []
    for o in outs:
        samples = []
        for c in o.outputs:
            ids = list(c.token_ids)
            finished = c.finish_reason == "stop"
            # the stop token: the last id when vLLM kept it, else its stop_reason (an int for stop_token_ids)
            stop_id = c.stop_reason if finished and isinstance(c.stop_reason, int) else None
            if finished and ids and ids[-1] in stop:
                stop_id = ids[-1]
                ids = ids[:-1]
            samples.append(dict(ids=ids, finish_reason="stop" if finished else "length", stop_id=stop_id))
        results.append([dict(s) for s in samples for _ in range(copies)])
    return results


def close_vllm(llm):
    """Tear an LLM's process-wide state down now. Left to a later garbage collection, it can happen while
    the next LLM of the same process starts, and take that one's parallel groups with it."""
    import gc
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def rewrite_vllm(f, tok, args, todo, contexts, proposer, validator, stop_ids, banned, kept_count, leak_phrases):
    """Rewrite at a pure-policy threshold as ordinary batched sampling: threshold >= 1 samples the
    validator context (every token a fallback), threshold 0 the proposer (every token accepted)."""
    llm = load_vllm(args)
    context = validator if args.threshold >= 1 else proposer
    if context == proposer and args.greedy_proposer:
        args = dataclasses.replace(args, temperature=0.0)
    by_problem = {}
    for p, s in todo:
        by_problem.setdefault(p["id"], (p, []))[1].append(s)
    groups = list(by_problem.values())
    bar = progress(total=len(todo), desc="rewrite (vLLM)", unit="trace")
    per_call = max(1, 8192 // args.samples)
    for start in range(0, len(groups), per_call):
        chunk = groups[start:start + per_call]
        # one request per problem; a problem resumed half-way asks for its missing samples only
        outs = vllm_sample(llm, [contexts[p["id"]][context] for p, _ in chunk], args.samples, args, stop_ids,
                           [args.seed + p["index"] for p, _ in chunk], banned)
        for (p, samples), results in zip(chunk, outs):
            results = results[:len(samples)]
            for r in results:
                n = len(r["ids"])
                r["n_accepted"], r["n_fallback"] = (0, n) if args.threshold >= 1 else (n, 0)
            write_traces(f, tok, args, p, samples, results, kept_count, leak_phrases)
            bar.update(len(samples))
    bar.close()
    close_vllm(llm)


# ==== Appendix B.7, running it: the command line =======================================================================
COMMANDS = {
    "rewrite": (RewriteArgs, cmd_rewrite, "Step 1: rewrite expert solutions into the model's own traces "
                                          "(mixed-policy rollout), then filter them. OUT is traces.jsonl."),
    "train": (TrainArgs, cmd_train, "Step 2: contrastive self-distillation on the kept traces (or the SFT "
                                    "baselines). OUT is a folder; the merged model is saved there."),
    "eval": (EvalArgs, cmd_eval, "Sample n responses per problem from the student prompt, grade the boxed "
                                 "answers, report the unbiased pass@k. OUT is a folder."),
}


def build_parser():
    import argparse
    parser = argparse.ArgumentParser(prog="dail.py", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{rewrite,train,eval}")
    for name, (cls, _, doc) in COMMANDS.items():
        p = sub.add_parser(name, help=doc, description=doc)
        for f in dataclasses.fields(cls):
            meta, flag = dict(f.metadata), "--" + f.name.replace("_", "-")
            helptext = meta.pop("help") + ("" if f.default is None else f" (default: {f.default})")
            if name == "eval" and f.name in REGRADE_OPTIONAL:   # checked in main: --regrade reads OUT's files
                meta["required"] = False
                helptext += " (not needed with --regrade: taken from OUT/eval_config.json)"
            if isinstance(f.default, bool):
                p.add_argument(flag, action="store_true", help=helptext.replace(" (default: False)", ""))
            else:
                kind = meta.pop("type", type(f.default) if f.default is not None else str)
                p.add_argument(flag, type=kind, default=f.default, help=helptext, **meta)
    return parser


REGRADE_OPTIONAL = ("model", "data")  # eval --regrade loads no model and reads no data file


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [f"--{f}" for f in REGRADE_OPTIONAL if args.command == "eval" and getattr(args, f) is None]
    if missing and not args.regrade:
        parser.error(f"eval: the following arguments are required: {', '.join(missing)}")
    cls, run, _ = COMMANDS[args.command]
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    if values["threads"] > 0:       # before any model loads (a negative value is refused by validate_args)
        torch.set_num_threads(values["threads"])
    # train continues only from a checkpoint (--resume); rewrite and eval skip what is written
    hint = ("rerun with --resume to continue (or --overwrite when no checkpoint.pt was written)"
            if args.command == "train" else "rerun the same command to resume")
    previous = terminate_like_interrupt(hint)
    try:
        run(cls(**values))
    except DailError as e:
        print(f"dail.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if str(e):                                                  # under torchrun the master says it once
            print(f"dail.py {args.command}: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"dail.py {args.command}: interrupted; {hint}", file=sys.stderr)
        return 130
    except OSError as e:                     # a full disk while appending records: each line is whole or cut off
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"dail.py {args.command}: error: {e.filename or '--out'}: the disk is full; free space and rerun the "
              f"same command to resume", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        while _LOCKS:                        # the output locks end with the command (a test runs many in one process)
            os.close(_LOCKS.pop())
    return 0


def terminate_like_interrupt(hint):
    """SIGTERM (a scheduler's preemption, `kill`) ends a command as Ctrl-C does: one line saying how to resume,
    exit 143 (inside train's loop its own handler saves a checkpoint first). Returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():     # signals reach the main thread only
        return None

    def handler(signum, frame):
        raise Interrupted(f"interrupted; {hint}", 128 + signum)
    return signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""DAIL, Distribution Aligned Imitation Learning (Mendes, Park, Ritter, arXiv 2602.02405), as three commands:
  rewrite  the model re-writes each expert solution as its own trace: a proposer prompt proposes each token, a
           validator prompt that sees the solution accepts it only if its probability is >= a threshold.
  train    contrastive self-distillation: toward the frozen model that saw the solution (privileged), away from
           the one that saw only the answer and intermediate results (shortcut).
  eval     n samples per problem, boxed-answer grading, the unbiased pass@k.

Map (the README is the manual): the arguments; the method in the paper's order (three contexts, the token rule and
its rollout, filtering and rewrite, the loss, LoRA and training, pass@k and eval); Appendix A, grading; Appendix B,
running it (files, resume, the reference cache, torchrun and shards, models and the hub, vLLM, the command line)."""
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
import re
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")        # an unreachable hub id fails fast with our message, not
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")    # after retries (set here, before huggingface_hub reads them)


# ==== The arguments: every flag of rewrite, train and eval (a field's help is its --help line), released defaults ======
def arg(default=None, help="", **kw):
    return dataclasses.field(default=default, metadata={"help": help, **kw})


LEAK_PHRASES = ("reference solution", "the reference", "provided solution", "given solution", "expert solution",
                "the solution provided", "the provided", "the hint", "as shown in the solution",
                "according to the solution", "worked solution")    # a trace with one leans on the expert solution


@dataclasses.dataclass
class CommonArgs:
    model: str = arg(None, "local Hugging Face model folder, or a hub id (needs network access)", required=True)
    data: str = arg(None, "input JSONL, one problem per line: problem, solution, optional answer and id", required=True)
    out: str = arg(None, "where results go (see the command's description)", required=True)
    seed: int = arg(0, "random seed (sampling, LoRA init, data order)")
    device: str = arg("auto", "auto | cpu | cuda | cuda:N (auto: cuda when available)")
    dtype: str = arg("auto", "auto: bfloat16 on CUDA, else float32", choices=["auto", "float32", "bfloat16", "float16"])
    thinking: bool = arg(False, "reasoning model (Qwen3-style): responses open in <think>; released reasoning defaults")
    overwrite: bool = arg(False, "replace results an earlier run left in --out instead of refusing to mix them")
    trust_remote_code: bool = arg(False, "run a model folder's own Python code (auto_map); it runs with your rights")
    threads: int = arg(0, "torch's CPU threads (0: its default, one per core; 1 suits tiny models on a shared CPU)")

    def __post_init__(self):  # flags left at None: the released default of the model kind (Qwen2.5-Instruct; Qwen3)
        released = dict(threshold=(0.8, 1.0), max_new_tokens=(2048, 256), epochs=(5, 3), max_len=(12288, 2048))
        vars(self).update({k: v[self.thinking] for k, v in released.items() if getattr(self, k, 0) is None})


@dataclasses.dataclass
class SamplingArgs(CommonArgs):  # the flags rewrite and eval share; the defaults are eval's
    max_prompt_len: int = arg(None, "max prompt tokens [default: the context length - --max-new-tokens]")
    temperature: float = arg(0.6, "sampling temperature of every context (0: greedy)")                # as released
    top_p: float = arg(0.95, "nucleus sampling mass of every context")                                # as released
    top_k: int = arg(0, "keep only the k most likely tokens of every context (0: all)")
    max_new_tokens: int = arg(4096, "token budget per sample; with --thinking the thinking budget (to </think>)")
    batch_size: int = arg(64, "hf engine: sequences decoded together")
    engine: str = arg("auto", "auto: vLLM when importable and on a GPU, else hf", choices=["auto", "hf", "vllm"])
    grader: str = arg("builtin", "builtin (exact, no dependency) or math-verify (pip install math-verify); eval: "
                                 "rerun with another to re-grade its samples", choices=["builtin", "math-verify"])
    tensor_parallel_size: int = arg(1, "vLLM: GPUs per model")
    max_model_len: int = arg(None, "vLLM: context length to reserve (default: the model's)")
    gpu_memory_utilization: float = arg(0.9, "vLLM: fraction of GPU memory it may take")
    shard: str = arg(None, "K/N: decode only problems K, K+N, ... to part files (SLURM arrays); the last to end merges")
    merge: bool = arg(False, "only merge the complete part files of an earlier --shard K/N split into OUT")


@dataclasses.dataclass
class RewriteArgs(SamplingArgs):
    top_k: int = arg(20, "keep only the k most likely tokens of every context (0: all)")  # as released
    max_new_tokens: int = arg(None, "token budget per trace [default 2048; 256 with --thinking]")
    batch_size: int = arg(32, "traces decoded together (each takes two rows: proposer and validator)")
    engine: str = arg("hf", "hf: the token rule; vllm, auto: vLLM when the threshold is 0 or >= 1 (a pure policy), "
                            "else hf", choices=["auto", "hf", "vllm"])
    samples: int = arg(32, "traces decoded per problem")
    propose: str = arg("student", "the context that proposes; the other validates", choices=["student", "privileged"])
    threshold: float = arg(None, "accept a proposal if the validator's probability of it is >= this (0: pure proposer,"
                                 " >=1: pure validator) [default 0.8; 1.0 with --thinking]")
    retries: int = arg(5, "proposals drawn per step before falling back to the validator")
    greedy_proposer: bool = arg(False, "ablation: the proposer proposes its most likely token (fallbacks sample)")
    keep_per_problem: int = arg(1, "traces kept per problem (the released code keeps 1)")
    no_filter: bool = arg(False, "keep every trace up to --keep-per-problem, graded or not")
    keep_truncated: bool = arg(False, "grade budget-cut traces too, as released (default: reject; they never stopped)")
    leak_phrases: str = arg(",".join(LEAK_PHRASES), "comma-separated phrases that reject a trace with one ('': none)")


@dataclasses.dataclass
class TrainArgs(CommonArgs):
    objective: str = arg("dail", "dail: contrastive self-distillation; sft: cross-entropy", choices=["dail", "sft"])
    sft_target: str = arg("trace", "sft only: the rewritten traces or expert solutions", choices=["trace", "expert"])
    lam: float = arg(0.1, "weight of the subtracted shortcut KL (0: DAIL without the contrastive term)")
    direction: str = arg("reverse", "reverse: KL(student||teacher); forward: KL(teacher||student)",
                         choices=["reverse", "forward"])
    loss_norm: str = arg("sequence", "sequence: per-token mean in each trace, then over the step's traces (released); "
                                     "token: mean over the step's tokens", choices=["sequence", "token"])
    # the defaults as released, but torch's AdamW with float32 state (released: bitsandbytes' 8-bit paged AdamW)
    lora_rank: int = arg(32, "LoRA rank (0: full fine-tuning with a frozen copy as the reference)")
    lora_alpha: float = arg(32.0, "LoRA scale numerator: the update is (alpha / rank) * B @ A")
    lora_dropout: float = arg(0.0, "dropout on the LoRA input")
    lora_targets: str = arg("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "nn.Linear modules to adapt")
    lr: float = arg(2e-4, "peak learning rate")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    warmup_steps: int = arg(5, "linear warm-up steps, then linear decay to 0")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0: off); 1.0 as released (the HF Trainer's)")
    batch_size: int = arg(16, "sequences per optimizer step, over all GPUs and micro-steps")
    micro_batch_size: int = arg(1, "sequences per forward pass (gradient accumulation makes up the rest)")
    epochs: int = arg(None, "passes over the traces [default 5; 3 with --thinking]")
    max_steps: int = arg(None, "stop after this many optimizer steps (default: all epochs)")
    max_len: int = arg(None, "tokens a context may have (else dropped, counted) [default 12288; 2048 with --thinking]")
    grad_checkpointing: bool = arg(False, "recompute the backbone's activations in backward (long traces)")
    loss_chunk: int = arg(1024, "response positions per chunk of the LM head + loss (bounds peak memory)")
    reference_cache: str = arg("auto", "keep theta0's privileged and shortcut states so later epochs skip those "
                                       "forwards (exact): memory, disk (OUT/reference_cache/), off; auto: memory if "
                                       "it fits in RAM, else disk, else off", choices=["auto", "memory", "disk", "off"])
    log_every: int = arg(1, "print a log line every this many steps (metrics.jsonl gets every step)")
    save_every: int = arg(50, "checkpoint.pt every this many steps, each epoch end, on SIGTERM/SIGINT (0: only then)")
    resume: bool = arg(False, "continue from OUT/checkpoint.pt")


@dataclasses.dataclass
class EvalArgs(SamplingArgs):
    n: int = arg(128, "samples per problem")                                                           # as released
    k: str = arg(None, "comma-separated k for pass@k (default: 1, 2, 4, ... <= n)")
    presence_penalty: float = arg(1.5, "logit penalty on tokens already sampled (vLLM's presence_penalty; 0: off)")
    answer_tokens: int = arg(100, "token budget of the second, forced-answer pass")
    no_force_answer: bool = arg(False, "one pass only; by default a second pass after an answer cue follows every "
                                       "sample without \\boxed{ and, after </think>, every --thinking sample")


# ==== Three contexts of one model: the student, privileged and shortcut prompts (all of dail.py's prompt text) =========
ANSWER_FORMAT = "Reason step by step, and write the final answer inside \\boxed{{}}."  # {{}}: a .format template
STUDENT_PROMPT = "{problem}\n\n" + ANSWER_FORMAT
ANSWER_REQUEST = "\n\nPutting it all together, the final answer, written in \\boxed{}, is "  # eval's forced-answer cue

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

_FRACTION = r"\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(-?\d+)\s*\}|(?<![\w.])(\d+)\s*/\s*(\d+)(?![\w.])"
_GREEK = set("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi pi rho "
             "sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma Phi Psi Omega".split())
_SIGN_BEFORE = tuple(r"$ = ( [ { , : < > ^ \equiv \le \ge \leq \geq \ne \neq \approx \cdot \times \pm".split())


def intermediate_results(solution, answer=None):
    """The shortcut context's list: an expert solution's atoms, not its method. Numbers anywhere (integers, decimals,
    a/b, \\frac{a}{b}; negative unless the minus may be a subtraction) and, in math, letters (a_1, x_{k}) and Greek
    letters; de-duplicated (numbers by value), numbers then symbols, sorted (no method in the order); no `answer`."""
    numbers, symbols = {}, set()                                         # numbers: exact value -> first spelling
    for m in re.finditer(_FRACTION, solution):                           # \frac{a}{b} (groups 1, 2) or a/b (3, 4)
        if int(m[2] or m[4]):
            numbers.setdefault(Fraction(int(m[1] or m[3]), int(m[2] or m[4])), m[0].strip())
    rest = re.sub(_FRACTION, " ", solution)
    for m in re.finditer(r"(?<![\w.])(-?)(\d+(?:\.\d+)?)(?![\d])", rest):  # a minus after _SIGN_BEFORE is a sign;
        sign = m[1] if (rest[:m.start()].rstrip() or "=").endswith(_SIGN_BEFORE) else ""   # in x - 3, the atom is 3
        numbers.setdefault(Fraction(sign + m[2]), sign + m[2])
    for groups in re.findall(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", solution, flags=re.S):  # math
        span = re.sub(r"\\(?:text|textbf|mathrm|operatorname|mbox)\s*\{[^{}]*\}", " ", next(g for g in groups if g))
        for m in re.finditer(r"\\([A-Za-z]+)|(?<![A-Za-z])([A-Za-z])(?![A-Za-z])(?:_\{?([A-Za-z0-9])\}?)?", span):
            if m[1] is None or m[1] in _GREEK:                            # other commands (\pmod) are no symbols
                symbols.add("\\" + m[1] if m[1] else m[2] + (f"_{m[3]}" if m[3] else ""))
    atoms = [numbers[v] for v in sorted(numbers)] + sorted(symbols, key=lambda x: (x.lstrip("\\").lower(), x))
    return [a for a in atoms if answer is None or not is_equiv(a, answer)]


def chat_prompt_ids(tok, user_text, thinking):
    """Ids of one user turn (or a list of chat messages) + the assistant's generation prompt, inside <think> with
    `thinking`. Taken once, here: responses are appended as ids, never re-encoded (that can change them)."""
    messages = user_text if isinstance(user_text, list) else [{"role": "user", "content": user_text}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
    think = "<think>\n" if thinking and not text.rstrip().endswith("<think>") else ""   # a template that omits it
    return tok(text + think, add_special_tokens=False)["input_ids"]


def build_contexts(tok, problem, thinking, max_prompt_len, which=("student", "privileged", "shortcut")):
    """Prompt ids of the requested contexts of one problem (dict). The privileged prompt holds privileged_solution
    (fit_privileged_solution's cut) when given, else the solution; one over max_prompt_len is a DailError."""
    fields = dict(problem, solution=problem.get("privileged_solution") or problem.get("solution"))
    if "shortcut" in which:                              # the answer and the solution's atoms, never its text
        fields["results"] = ", ".join(intermediate_results(problem["solution"] or "", problem["answer"])) or "none"
    prompts, out = dict(student=STUDENT_PROMPT, privileged=PRIVILEGED_PROMPT, shortcut=SHORTCUT_PROMPT), {}
    for name in which:
        text = prompts[name].format(**fields)                    # a template ignores the fields it does not name
        out[name], whole = bounded_ids(lambda t: chat_prompt_ids(tok, t, thinking), text, max_prompt_len)
        if max_prompt_len is not None and len(out[name]) > max_prompt_len:
            raise DailError(f"{problem['where']}: field 'problem': the {name} prompt is {'' if whole else 'over '}"
                            f"{len(out[name])} tokens, over the prompt budget of {max_prompt_len} (--max-prompt-len)")
    return out


# ==== Step 1, rewrite: the token rule (proposer, validator, threshold), its per-trace random numbers, the rollout ======
def sampling_probs(logits, temperature, top_p=1.0, top_k=0):
    """[B, V] logits -> [B, V] float32 sampling distribution. As in vLLM: temperature, then top-k (exactly k
    candidates), then top-p (the smallest most likely set with mass >= top_p); temperature 0: one-hot argmax."""
    logits, V = logits.float(), logits.shape[-1]
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), V).float()
    values, order = logits.topk(top_k if 0 < top_k < V else V, dim=-1)     # [B, k], most likely first (k = V: a sort)
    probs = (values / temperature).softmax(-1)
    if top_p < 1.0:
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)   # keep while the mass before is < top_p
        probs = probs / probs.sum(-1, keepdim=True)
    return torch.zeros_like(logits).scatter(-1, order, probs)


def model_probs(logits):
    """[B, V] logits -> what the threshold tests: the full softmax at temperature 1, no top-k/top-p; -inf gets 0."""
    return logits.float().softmax(-1)


def mix_step(p_propose, p_validate, q_validate, threshold, retries, u):
    """The DAIL token rule over B rows -> tokens [B] (long), accepted [B] (bool: a proposal passed). Per row: draw
    up to R = `retries` candidates c ~ p_propose, take the first whose validator *model* probability q_validate[c]
    is >= threshold, else draw from p_validate (the fallback). p_propose, p_validate: [B, V] sampling distributions
    (sampling_probs); q_validate: [B, V] model_probs, as released (tempering would make a raw 0.6 an 0.86 at
    temperature 0.6, passing 0.8). With A = {v : q_validate[v] >= threshold} and a = p_propose(A):

        P(v) = p_propose(v) * [v in A] * (1 - (1 - a)^R) / a   +   (1 - a)^R * p_validate(v)

    (threshold 0: a = 1, the proposer; > 1: a = 0, the validator). u: [B, R + 1] uniforms in (0, 1), the row's
    only randomness (counter_uniforms): columns :R draw the proposals, column R the fallback."""
    draws = sample_with(p_propose, u[:, :retries])                                          # [B, R]
    passes = q_validate.gather(1, draws) >= threshold                                       # [B, R]
    accepted = passes.any(1)                                                                # [B]
    proposal = draws.gather(1, passes.int().argmax(1, keepdim=True)).squeeze(1)  # [B] the first passing draw (or any)
    fallback = sample_with(p_validate, u[:, retries:]).squeeze(1)                           # [B]
    return torch.where(accepted, proposal, fallback), accepted


def sample_with(probs, u):
    """Inverse-CDF draws: probs [B, V] (rows need not sum to 1), u [B, m] -> [B, m] ids; a 0-probability id never."""
    cdf = probs.double().cumsum(-1)                                               # [B, V]
    return torch.searchsorted(cdf, u.to(cdf.device) * cdf[:, -1:], right=True).clamp(max=probs.shape[-1] - 1)


def trace_keys(seed, problem_ids, samples):
    """[B, 2] int64 keys (two 32-bit words) of (seed, problem id, sample): not of the batch, a resume or a shard."""
    digests = b"".join(hashlib.blake2b(f"{seed}\x1f{pid}\x1f{s}".encode(), digest_size=8).digest()
                       for pid, s in zip(problem_ids, samples))
    return torch.from_numpy(np.frombuffer(digests, "<u4").astype(np.int64).reshape(-1, 2))


def counter_uniforms(keys, step, n):
    """[B, n] float64 uniforms in (0, 1) at decoding step `step`, counter-based: u = hash32(trace_keys, step, j)."""
    def hash32(x):  # the 32-bit "lowbias32" mixer (xor-shift-multiply) on int64 tensors < 2^32
        for shift, c in ((16, 0x7FEB352D), (15, 0x846CA68B)):
            x = x ^ (x >> shift)
            x = (x * (c & 0xFFFF) + ((x * (c >> 16) & 0xFFFF) << 16)) & 0xFFFFFFFF  # x * c mod 2^32, no overflow
        return x ^ (x >> 16)
    counter = hash32((step * n + torch.arange(n, dtype=torch.long, device=keys.device)) & 0xFFFFFFFF)   # [n]
    h = hash32(keys[:, :1] ^ hash32(keys[:, 1:] ^ counter[None, :]))                                    # [B, n]
    return (h.double() + 0.5) / 2.0 ** 32


def left_pad(seqs, pad_id, device):
    """Lists of ids -> ids [N, L] left-padded, attention mask [N, L], position ids [N, L] counted from each
    row's first real token (so a padded row computes exactly what it would alone)."""
    rows = [torch.as_tensor(s, dtype=torch.long).flip(0) for s in seqs]   # reversed: pad_sequence pads right
    ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id).flip(1)
    mask = nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True).flip(1)
    return ids.to(device), mask.to(device), (mask.cumsum(-1) - 1).clamp(min=0).to(device)


@torch.no_grad()
def decode(model, contexts, choose, max_new_tokens, stop_ids, pad_id, banned_ids=(), presence_penalty=0.0):
    """One response per trace of G prompts (rewrite: G = 2, proposer and validator; eval: 1) -> per trace dict(ids,
    finish_reason 'stop'|'length', stop_id, n_accepted, n_fallback). choose(logits [G, b, V], step, rows [b]: the live
    traces' indices in contexts) -> (tokens [b], accepted [b] or None). The G*B rows share one KV cache; a stop token
    ends a trace (not kept); banned_ids get -inf; presence_penalty (eval, as vLLM) lowers the response's tokens."""
    import inspect
    from transformers import DynamicCache
    device, B, G = next(model.parameters()).device, len(contexts), len(contexts[0])
    ids, mask, pos = left_pad([c[g] for g in range(G) for c in contexts], pad_id, device)  # [G*B, L], context-major
    forward = getattr(model, "get_base_model", lambda: model)().forward      # 4.x calls the KV cache past_key_values
    kv = {"cache" if "cache" in inspect.signature(forward).parameters else "past_key_values": (cache := DynamicCache())}
    active = list(range(B))                                                   # traces still decoding
    results = [dict(ids=[], finish_reason="length", stop_id=None, n_accepted=0, n_fallback=0) for _ in range(B)]
    for step in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kv, use_cache=True,
                       logits_to_keep=1).logits[:, -1]                      # [G*b, V]
        if banned_ids:
            logits[:, list(banned_ids)] = float("-inf")
        b = len(active)
        if presence_penalty:    # present [G*b, V]: the tokens in each row's response so far (ids: the last ones)
            present = present.scatter(1, ids, True) if step else torch.zeros_like(logits, dtype=torch.bool)
            logits = logits - presence_penalty * present.to(logits.dtype)
        tokens, accepted = choose(logits.reshape(G, b, -1), step, torch.tensor(active))
        for i, t, acc in zip(active, tokens.tolist(), [0] * b if accepted is None else accepted.tolist()):
            if t in stop_ids:
                results[i].update(finish_reason="stop", stop_id=t)
            else:
                results[i]["ids"].append(t)
                results[i]["n_accepted" if acc else "n_fallback"] += 1
        keep = [j for j, i in enumerate(active) if results[i]["stop_id"] is None]   # the traces still decoding
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < b:   # finished traces leave every context's rows, KV cache included: steps cost live rows only
            live = torch.tensor([j + g * b for g in range(G) for j in keep], device=device)   # [G*b'], context-major
            cache.batch_select_indices(live)
            mask, pos, tokens = mask[live], pos[live], tokens[keep]
            present = present[live] if presence_penalty else None
            active = [active[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        ids, pos = tokens.repeat(G)[:, None], pos[:, -1:] + 1                 # [G*b, 1]: the next step's input
    return results


# ==== Step 1, filtering the traces, and the rewrite command ============================================================
def write_trace(f, tok, args, problem, sample, result, kept_count):
    """Grade, filter and append one traces.jsonl line; reject_reason: the first that holds, the --keep-per-problem
    limit last (kept_count: id -> kept so far). --no-filter and --thinking prefixes (ungraded) skip the filters;
    --keep-truncated (as released) grades unfinished traces too. privileged_solution: what the validator saw."""
    text = tok.decode(result["ids"], skip_special_tokens=False)
    pred, correct = (None, None) if args.thinking else grade(text, problem["answer"], args.grader)
    leak = [x.strip().lower() for x in args.leak_phrases.split(",") if x.strip()]
    failed = {} if args.no_filter or args.thinking else dict(
        truncated=result["finish_reason"] != "stop" and not args.keep_truncated, no_answer=pred is None,
        wrong_answer=not correct, mentions_reference=any(x in text.lower() for x in leak))
    reason = next((reason for reason, yes in failed.items() if yes), None)
    reason = reason or ("per_problem_limit" if kept_count[problem["id"]] >= args.keep_per_problem else None)
    kept_count[problem["id"]] += reason is None
    append_jsonl(f, dict(id=problem["id"], sample=sample, problem=problem["problem"], solution=problem["solution"],
                         privileged_solution=problem.get("privileged_solution", problem["solution"]),
                         answer=problem["answer"], response=text, response_ids=result["ids"],
                         finish_reason=result["finish_reason"], n_accepted=result["n_accepted"],
                         n_fallback=result["n_fallback"], pred=pred, correct=correct, kept=reason is None,
                         reject_reason=reason))


def cmd_rewrite(args):
    """OUT (traces.jsonl: a line per (problem, sample) of --data), .summary.json, .config.json; parts merge into OUT."""
    validate_args(args)
    problems = load_problems(args.data, need_solution=True, need_answer=True)
    if (args.thinking or args.no_filter) and args.samples > args.keep_per_problem:   # nothing is graded away
        print(f"note: {'--thinking' if args.thinking else '--no-filter'}: decoding only the --keep-per-problem "
              f"{args.keep_per_problem} traces per problem it keeps, not --samples {args.samples}", file=sys.stderr)
        args.samples = args.keep_per_problem
    make_grader(args.grader)  # a missing optional grader fails here, before any model loads
    job = start_job("rewrite", args, problems)
    tok = load_tokenizer(args.model, args.trust_remote_code, args.thinking)
    contexts, skipped, shortened = fit_prompts(tok, problems, args)
    job.expected = {k: {key for key in keys if key[0] in contexts} for k, keys in job.expected.items()}  # no skipped
    kept_count = Counter(t["id"] for k in job.ks for t in job.done[k] if t["kept"])  # --keep-per-problem counts these
    for k in job.ks:
        missing = job.expected[k] - set(map(job.key, job.done[k]))
        if todo := [(p, s) for p in problems for s in range(args.samples) if (p["id"], s) in missing]:  # input order
            print(f"rewrite: {len(todo)} traces to decode, {job.engine} ({len(job.done[k])} done in {job.paths[k]})",
                  file=sys.stderr)
            with open(job.paths[k], "a", encoding="utf-8") as f:
                rollout(f, tok, args, job.engine, todo, contexts, kept_count)
    if (traces := gather_parts(job)) is not None:  # None: a vLLM follower, or parts still missing (the last merges)
        write_rewrite_summary(job.out_file, args, problems, traces, skipped, shortened)


def rollout(f, tok, args, engine, todo, contexts, kept_count):
    """Decode rewrite's (problem, sample) pairs a batch at a time; write_trace grades and writes each. hf: decode steps
    a batch's two contexts together and the token rule picks each token; a pure policy decodes one context (threshold
    <= 0 the proposer: mix_step with a = 1; >= 1 the validator: every token a fallback), as does vLLM (pure only)."""
    proposer, validator = ("student", "privileged") if args.propose == "student" else ("privileged", "student")
    banned = [tok.get_vocab()["</think>"]] if args.thinking and "</think>" in tok.get_vocab() else []
    stop_ids = stop_token_ids(tok, args.model)
    names = [validator] if args.threshold >= 1 else [proposer] if args.threshold <= 0 else [proposer, validator]
    if engine == "vllm":                                                         # vLLM batches a call's requests
        llm, size = load_vllm(args), 8192
        args = dataclasses.replace(args, temperature=0.0) if names == [proposer] and args.greedy_proposer else args
    else:
        model, size = load_model(args.model, *device_dtype(args), args.trust_remote_code).eval(), args.batch_size

    def choose(logits, step, rows):  # [G, b, V]: the proposer's rows, then the validator's (G = 1: pure)
        probs = [sampling_probs(lg, 0 if args.greedy_proposer and name == proposer else args.temperature,
                                args.top_p, args.top_k) for lg, name in zip(logits, names)]
        u = counter_uniforms(keys[rows], step, args.retries + 1)                 # [b, R + 1]
        if names == [validator]:                                                 # every token a fallback
            return sample_with(probs[0], u[:, :1]).squeeze(1), None
        return mix_step(probs[0], probs[-1], model_probs(logits[-1]), args.threshold, args.retries, u)
    with tqdm(total=len(todo), desc="rewrite", unit="trace") as bar:
        for batch in (todo[i:i + size] for i in range(0, len(todo), size)):
            rows = [[contexts[p["id"]][name] for name in names] for p, _ in batch]
            if engine == "vllm":
                seeds = [(args.seed + p["index"]) * 1_000_003 + s for p, s in batch]  # by (--seed, problem, sample)
                outs = vllm_sample(llm, [c for [c] in rows], 1, args, stop_ids, seeds, banned)
                results = [dict(r, n_accepted=0, n_fallback=len(r["ids"])) if names == [validator] else
                           dict(r, n_accepted=len(r["ids"]), n_fallback=0) for [r] in outs]
            else:
                keys = trace_keys(args.seed, [p["id"] for p, _ in batch], [s for _, s in batch])  # choose's, by trace
                results = decode(model, rows, choose, args.max_new_tokens, stop_ids, tok.pad_token_id, banned)
            for (p, s), r in zip(batch, results):
                write_trace(f, tok, args, p, s, r, kept_count)
            bar.update(len(batch))
    if engine == "vllm":
        close_vllm(llm)


# ==== Step 2, the contrastive self-distillation loss (dail_loss: the reference; the chunked path bounds memory) ========
def dail_terms(student_logits, teacher_logits, shortcut_logits, lam=0.1, direction="reverse"):
    """dail_loss's per-token terms (l, KL to the teacher, KL to the shortcut), each of the logits' shape less the
    vocabulary (summed over in full, in float32). The teacher and the shortcut are constants: no gradient into them."""
    s = F.log_softmax(student_logits.float(), dim=-1)                                         # log-probabilities
    e, c = (F.log_softmax(x.detach().float(), dim=-1) for x in (teacher_logits, shortcut_logits))
    pairs = {"reverse": ((s, e), (s, c)), "forward": ((e, s), (c, s))}[direction]     # (p, q) of KL(p || q)
    kl_teacher, kl_shortcut = ((p.exp() * (p - q)).sum(-1) for p, q in pairs)          # over the vocabulary
    return kl_teacher - lam * kl_shortcut, kl_teacher, kl_shortcut


def loss_weights(mask, norm="sequence", divisor=None):
    """dail_loss's weight of each position [B, T] (mask [B, T]): 'sequence' 1 / (S * len_i), 'token' 1 / N."""
    lengths = mask.sum(-1, keepdim=True)                                                      # [B, 1]
    per_row, count = {"sequence": (lengths.clamp(min=1), (lengths > 0).sum()), "token": (1, lengths.sum())}[norm]
    return mask / (per_row * (divisor if divisor is not None else count.clamp(min=1)))


def dail_loss(student_logits, teacher_logits, shortcut_logits, mask, lam=0.1, direction="reverse",
              norm="sequence", divisor=None):
    """The DAIL loss. Logits [B, T, V], aligned: position t of all three predicts response token t (student
    p_theta(.|x_s, y<t), teacher p_theta0(.|x_e, y<t), shortcut p_theta0(.|x_c, y<t)); mask [B, T] bool, True on
    response positions; len_i = mask[i].sum(); S, N: the sequences, response tokens (divisor, else this batch's).

        reverse (released):  l[i,t] = KL(student || teacher) - lam * KL(student || shortcut)
        forward:             l[i,t] = KL(teacher || student) - lam * KL(shortcut || student)
        norm 'sequence' (released):  L = (1/S) sum_i (1/len_i) sum_t l[i,t]   (each trace weighs the same)
        norm 'token':                L = (1/N) sum_i sum_t l[i,t]             (each token weighs the same)

    The subtracted term is unbounded above, so both are logged. -> (loss, {"kl_teacher", "kl_shortcut"})."""
    pad = ~mask[..., None]   # padding may hold anything, even inf/nan: zeroed, it adds no value and no gradient
    s, e, c = (x.masked_fill(pad, 0.0) for x in (student_logits, teacher_logits, shortcut_logits))
    w = loss_weights(mask, norm, divisor)
    loss, kl_teacher, kl_shortcut = ((w * x).sum() for x in dail_terms(s, e, c, lam, direction))  # terms [B, T]
    return loss, {"kl_teacher": float(kl_teacher.detach()), "kl_shortcut": float(kl_shortcut.detach())}


def float32_head(head):
    """The LM head as h [n, H] -> logits [n, V] in float32, whatever the autocast and the weights' dtype (cast once;
    bf16 logits alone put a 12% relative error on a per-token KL of 0.03); a LoRA head with its adapter unless off."""
    lora = head if isinstance(head, LoRALinear) and head.enabled else None
    linear = head.base if isinstance(head, LoRALinear) else head
    weight, bias = linear.weight.float(), None if linear.bias is None else linear.bias.float()

    def logits(h):
        with torch.autocast(h.device.type, enabled=False):
            out = F.linear(x := h.float(), weight, bias)
            return out if lora is None else out + (lora.dropout(x) @ lora.lora_A.T @ lora.lora_B.T) * lora.scale
    return logits


def chunked_dail_loss(h_student, h_teacher, h_shortcut, student_head, reference_head, lam=0.1,
                      direction="reverse", weights=None, chunk_size=1024):
    """dail_loss from the final hidden states h_* [N, H] at the N response positions (rows aligned across the
    contexts) through theta's head and theta0's (reference_head, adapters off), chunk by chunk with dail_terms;
    weights [N] = loss_weights(mask, norm, divisor)[mask]. Equal to dail_loss in value and gradient."""
    student = float32_head(student_head)
    with adapters_off(reference_head):   # a plain head shared by both is the same head: no second float32 copy
        shared = reference_head is student_head and not isinstance(student_head, LoRALinear)
        reference = student if shared else float32_head(reference_head)

    def terms(hs, he, hc):   # theta0's logits are constants: dail_terms detaches them
        return dail_terms(student(hs), reference(he), reference(hc), lam, direction)
    loss, kl_e, kl_c = chunked_sum(terms, h_student, (h_teacher, h_shortcut), student_head, weights, chunk_size)
    return loss, {"kl_teacher": float(kl_e), "kl_shortcut": float(kl_c)}


def chunked_sum(terms, h, aligned, head, weights=None, chunk_size=1024):
    """sum_n w[n] * terms(h[n], *aligned[n]) for each output of terms (per-row, the loss first: the one sum with a
    gradient) over h [N, H], chunk_size rows at a time (peak memory ~ chunk_size x V, not N x V); w: weights or 1/N."""
    w = (weights if weights is not None else torch.full(h.shape[:1], 1.0 / h.shape[0])).to(h.device, torch.float32)
    params = [p for p in head.parameters() if p.requires_grad]
    track = torch.is_grad_enabled() and (h.requires_grad or bool(params))
    grad_h, grad_p = (torch.zeros_like(h), [torch.zeros_like(p) for p in params]) if track else (None, None)
    sums = 0
    for i in range(0, h.shape[0], chunk_size):
        part = slice(i, i + chunk_size)
        hp = h[part].detach().requires_grad_(track)
        out = [o * w[part] for o in terms(hp, *(a[part] for a in aligned))]
        if track:  # the chunk's gradients now, while its logits exist (then freed): none is recomputed in backward
            grad_h[part], *grads = torch.autograd.grad(out[0].sum(), [hp, *params])
            for acc, g in zip(grad_p, grads):   # in place: a trainable head's gradient is V x H
                acc += g
        sums = sums + torch.stack([o.detach().sum() for o in out])
    # a linear surrogate carries the chunks' gradients into the backbone: value the sum, gradient the chunks'
    surrogate = (h * grad_h).sum() + sum((p * g).sum() for p, g in zip(params, grad_p)) if track else sums.new_zeros(())
    return (sums[0] + surrogate - surrogate.detach(), *sums[1:])


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
    """theta0's (h_teacher, h_shortcut) [N, H] in response_hidden's order: constants of the run, so with a cache
    (Appendix B.3) only the examples missing from it go through theta0, in one batch."""
    def compute(missing):
        with torch.no_grad(), adapters_off(reference):
            h_teacher, _ = response_hidden(reference, collate([ex["privileged"] for ex in missing], pad_id), device)
            h_shortcut, _ = response_hidden(reference, collate([ex["shortcut"] for ex in missing], pad_id), device)
        sizes = [len(ex["privileged"][1]) for ex in missing]             # n_i rows per example, in row order
        return zip(h_teacher.split(sizes), h_shortcut.split(sizes))

    found = cached_states(cache if cache is not None else new_reference_cache("off"), examples, compute)
    return tuple(torch.cat([states[i].to(device) for states in found]) for i in (0, 1))  # cached ones: on the host


# what the loss reports, summed over a step's micro-batches and ranks (metrics.jsonl, log lines, the plot)
LOGGED = {"dail": ("loss", "kl_teacher", "kl_shortcut"), "sft": ("loss", "ce")}


def micro_batch_loss(model, reference, examples, args, divisor, pad_id, device, cache=None):
    """(loss, {logged term: float}) of one micro-batch under --loss-norm with the whole step's divisor (a step's
    micro-batches and ranks sum to its loss); reference: theta0; cache: its states. SFT: token cross-entropy."""
    batch = collate([ex["student"] for ex in examples], pad_id)
    h_student, targets = response_hidden(model, batch, device)
    weights = loss_weights(batch[2], args.loss_norm, divisor)[batch[2]]                # [N], in (row, t) order
    head = model.get_output_embeddings()
    if args.objective == "sft":
        logits = float32_head(head)
        loss, = chunked_sum(lambda hs, y: (F.cross_entropy(logits(hs), y, reduction="none"),), h_student,
                            (targets,), head, weights, args.loss_chunk)
        return loss, {"ce": float(loss.detach())}
    h_teacher, h_shortcut = reference_states(reference, examples, cache, pad_id, device)
    return chunked_dail_loss(h_student, h_teacher, h_shortcut, head, reference.get_output_embeddings(), args.lam,
                             args.direction, weights, args.loss_chunk)


def lr_at(step, total_steps, peak, warmup):
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `total_steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def build_examples(args, records, not_kept, master):
    """(tok, examples, counts): per trace each context's (prompt ids, response ids), the response shared (SFT: the
    student's alone); one over --max-len is dropped."""
    tok = load_tokenizer(args.model, args.trust_remote_code, args.thinking if master else None)
    which = ("student",) if args.objective == "sft" else ("student", "privileged", "shortcut")
    eot, examples = tok.get_vocab().get("<|im_end|>", tok.eos_token_id), []   # what a trace learns to stop on
    for r in records:
        if args.objective == "sft" and args.sft_target == "expert":    # a huge solution: just enough to be dropped
            response = bounded_ids(lambda t: tok(t, add_special_tokens=False)["input_ids"], r["solution"],
                                   args.max_len)[0] + [eot]
        else:        # end of turn if the trace finished: the model learns to stop (a cut thinking prefix: none)
            response = list(r["response_ids"]) + [eot] * (r["finish_reason"] == "stop")
        try:                                  # each prompt gets what the response leaves of --max-len, or is dropped
            contexts = build_contexts(tok, r, args.thinking, args.max_len - len(response), which)
        except DailError:
            continue
        examples.append({name: (prompt, response) for name, prompt in contexts.items()})
    dropped = len(records) - len(examples)
    if master:
        print(f"train: {len(examples)} examples ({dropped} dropped as longer than --max-len {args.max_len}, "
              f"{not_kept} traces not kept by the filter)", file=sys.stderr)
    if not examples:
        raise DailError(f"{args.data}: no example fits --max-len {args.max_len}")
    return tok, examples, dict(examples=len(examples), dropped_too_long=dropped, traces_not_kept=not_kept)


def build_models(args, device, examples, master):
    """theta (trainable: the LoRA adapters, or every weight with --lora-rank 0), theta0 (theta with adapters
    off, or a frozen copy; None for SFT with full FT), AdamW, the cache of theta0's states, the autocast."""
    dtype, full_ft = device_dtype(args)[1], args.lora_rank == 0                 # full FT: fp32 master weights
    model = load_model(args.model, device, torch.float32 if full_ft else dtype, args.trust_remote_code)
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
    use_amp = device.type == "cuda" and dtype != torch.float32
    states_dtype = dtype if use_amp else model.get_input_embeddings().weight.dtype         # what forwards give
    cache = setup_reference_cache(args, examples, model, states_dtype, master) if args.objective == "dail" else None
    autocast = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=use_amp)
    return model, reference, optimizer, cache, autocast


def cmd_train(args):
    """Write OUT/: the merged model, adapters/ (PEFT), dail_prompt.json, metrics, train_summary.json, checkpoint.pt."""
    validate_args(args)
    records, not_kept = load_training_records(args)            # all input checks before any model loads
    guard_train_out(args)                          # --out: not the model, not an unrelated run, has --resume's file
    out, t_start = Path(args.out), time.time()
    checkpoint, metrics = out / "checkpoint.pt", out / "metrics.jsonl"
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
    # data order: a permutation per epoch, fixed by the seed, so step s always sees the same items
    order = np.concatenate([np.random.default_rng(args.seed + e).permutation(len(examples))
                            for e in range(args.epochs)])
    with stop_signals(ddp, device) as stopped, tqdm(total=total_steps, initial=start, unit="step", desc="train",
                                                        disable=not master or not sys.stderr.isatty()) as bar:
        for step in range(start, total_steps):
            t0 = time.time()
            lr = lr_at(step, total_steps, args.lr, args.warmup_steps)          # 1. this step's learning rate
            for group in optimizer.param_groups:
                group["lr"] = lr
            # 2. micro-steps over this rank's share, accumulating .grad, over the whole step's sequences/tokens
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
                logged = {k: logged[k] + v for k, v in dict(loss=float(loss.detach()), **stats).items()}
            if ddp:                                         # data parallel: sum the gradients once per step
                logged = all_reduce_step(params, logged, device)
            grad_norm = float(nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf))   # 3. clip (0: off)
            if bad := [f"{k} {v}" for k, v in dict(logged, grad_norm=grad_norm).items() if not math.isfinite(v)]:
                raise DailError(f"step {step + 1}: {', '.join(bad)}: training diverged; stopped before its update "
                                f"(last checkpoint, if any: {checkpoint}); lower --lr (now {args.lr:g})")
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
            stop = stopped()
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
        print(f"train: done: {total_steps} steps over {len(examples)} examples, final {terms}, "
              f"{time.time() - t_start:.1f} s (counts in train_summary.json); model in {out}", file=sys.stderr)
    end_distributed(ddp)


# ==== Evaluation: the unbiased pass@k estimator, the forced answer, the eval command ===================================
def pass_at_k(n, c, k):
    """Unbiased pass@k of one problem, n samples of which c are correct (Chen et al. 2021), in the product form
    1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i), accurate for n in the thousands. Edge cases: 0.0 when
    c = 0 (an empty product); 1.0 when n - c < k (every k-subset holds a correct sample); ValueError when n < k."""
    if not (1 <= k <= n and 0 <= c <= n):
        raise ValueError(f"pass_at_k needs 1 <= k <= n and 0 <= c <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def parse_ks(spec, n):
    """k values for pass@k: the --k list, or 1, 2, 4, ... <= n and n itself."""
    with contextlib.suppress(ValueError):
        ks = sorted({int(x) for x in spec.split(",") if x.strip()} if spec else
                    {2 ** i for i in range(n.bit_length())} | {n})
        if ks and 1 <= ks[0] and ks[-1] <= n:
            return ks
    raise DailError(f"--k {spec}: expected comma-separated integers in 1..n (n = {n}; pass@k needs n >= k)")


def cmd_eval(args):
    """Write OUT/samples.jsonl (eval_line), summary.json, passk.png, eval_config.json. The summary is always graded
    from samples.jsonl: rerunning eval with another --grader re-grades each line, without sampling."""
    validate_args(args)
    make_grader(args.grader)  # a missing optional grader fails here, before any model loads
    problems = load_problems(args.data, need_solution=False, need_answer=True)
    ks = parse_ks(args.k, args.n)
    job = start_job("eval", args, problems)
    out, engine = job.out_file.parent, job.engine
    tok = load_tokenizer(args.model, args.trust_remote_code, args.thinking)
    # every problem counts in pass@k: a prompt that cannot fit is an error, not a skip
    max_prompt = prompt_budget(args, "eval", lambda: max(len(eval_prompt_ids(tok, p, args.thinking, None))
                                                         for p in problems))
    prompts = {p["id"]: eval_prompt_ids(tok, p, args.thinking, max_prompt) for p in problems}
    missing = {k: job.expected[k] - set(map(job.key, job.done[k])) for k in job.ks}
    todo = {k: [p for p in problems if p["id"] in missing[k]] for k in job.ks}
    sampler = make_sampler(engine, args, tok, stop_token_ids(tok, args.model)) if any(todo.values()) else None
    # problems per call: the hf engine decodes --batch-size rows at a time; vLLM batches on its own
    per_call = max(1, (args.batch_size if engine == "hf" else 8192) // args.n)
    for k, mine in ((k, mine) for k, mine in todo.items() if mine):
        print(f"eval: {len(mine)} problems x {args.n} samples, {engine} ({len(job.done[k])} in {job.paths[k]})",
              file=sys.stderr)
        with open(job.paths[k], "a", encoding="utf-8") as f, tqdm(total=len(mine), desc="eval") as bar:
            for chunk in (mine[i:i + per_call] for i in range(0, len(mine), per_call)):
                outputs = sampler([prompts[p["id"]] for p in chunk], [args.seed + p["index"] for p in chunk],
                                  [p["id"] for p in chunk])
                for p, samples in zip(chunk, outputs):
                    append_jsonl(f, grade_line(eval_line(tok, p, samples, args.thinking), args))
                bar.update(len(chunk))
    if sampler:
        sampler.close()
    if (lines := gather_parts(job)) is None:
        return None                  # a vLLM follower, or parts still missing (the last to finish merges)
    if stale := [grade_line(r, args) for r in lines if r.get("grader") != args.grader]:
        write_atomic(job.out_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
        print(f"eval: graded the samples of {len(stale)} problems again with --grader {args.grader}", file=sys.stderr)
    def mean_of(field, only_correct):
        vals = [t for r in lines for t, ok in zip(r[field], r["correct"]) if ok or not only_correct]
        return float(np.mean(vals)) if vals else None
    summary = dict(  # mean pass@k over problems, mean tokens (all/thinking/answer, of all/correct samples)
        problems=len(lines),
        pass_at_k={str(k): float(np.mean([pass_at_k(len(r["correct"]), sum(r["correct"]), k) for r in lines]))
                   for k in ks},
        **{f"mean_{part}tokens{tail}": mean_of(f"n_{part}tokens", tail == "_correct")
           for part in ("", "thinking_", "answer_") for tail in ("", "_correct")},
        samples_forced=sum(f is not None for r in lines for f in r["forced"]),
        samples_no_answer=sum(p is None for r in lines for p in r["preds"]),
        problems_no_answer=sum(all(p is None for p in r["preds"]) for r in lines),
        truncated=sum(f == "length" for r in lines for f in r["finish_reasons"]),
        engine=engine, grader=grader_info(args.grader), settings=dataclasses.asdict(args))
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    save_plot(out / "passk.png", f"pass@k, {len(lines)} problems, n = {args.n}", "k", "pass@k",
              {Path(args.model).name or args.model: (ks, list(summary["pass_at_k"].values()))}, logx=True,
              ylim=(-0.02, 1.02))
    print(json.dumps({k: summary[k] for k in ("problems", "pass_at_k", "mean_tokens")}), file=sys.stderr)
    return summary


def eval_line(tok, problem, samples, thinking):
    """One problem's ungraded line of samples.jsonl: per sample the first pass, the forced pass (the cue + what
    followed, or null), n_tokens = n_thinking_tokens (up to a generated </think>) + n_answer_tokens (+ forced)."""
    think_end, forced = tok.get_vocab().get("</think>"), [s.get("n_forced", 0) for s in samples]
    cuts = [(s["ids"].index(think_end) + 1 if think_end in s["ids"] else len(s["ids"])) if thinking else 0
            for s in samples]
    text = lambda ids: None if ids is None else tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    return dict(id=problem["id"], problem=problem["problem"], answer=problem["answer"],
                responses=[text(s["ids"]) for s in samples], forced=[text(s.get("forced_ids")) for s in samples],
                n_tokens=[len(s["ids"]) + f for s, f in zip(samples, forced)], n_thinking_tokens=cuts,
                n_answer_tokens=[len(s["ids"]) - c + f for s, c, f in zip(samples, cuts, forced)],
                n_forced_tokens=forced, finish_reasons=[s["finish_reason"] for s in samples])


def grade_line(line, args):
    """Grade a samples.jsonl line (eval's one place): first pass + forced text without the cue (math-verify reads its
    empty \\boxed{}); with --thinking only what follows the last </think> ("" if none: a box in thinking is a guess)."""
    texts = [(t + (fo or "")).replace(ANSWER_REQUEST, "") for t, fo in zip(line["responses"], line["forced"])]
    if args.thinking:
        texts = [t.rpartition("</think>")[2] if "</think>" in t else "" for t in texts]
    preds, correct = map(list, zip(*[grade(t, line["answer"], args.grader) for t in texts]))
    line.update(preds=preds, correct=correct, n_correct=sum(correct), grader=args.grader)
    return line


def eval_prompt_ids(tok, problem, thinking, max_prompt_len):
    """Prompt ids of one eval problem: its own `prompt` (a user turn, or chat messages), else the student prompt."""
    if problem.get("prompt") is None:
        return build_contexts(tok, problem, thinking, max_prompt_len, ("student",))["student"]
    try:
        ids = chat_prompt_ids(tok, problem["prompt"], thinking)
    except Exception as e:      # a template may refuse a role or a message order
        raise DailError(f"{problem['where']}: field 'prompt': the chat template of the model rejects it "
                        f"({first_line(e)})") from None
    if max_prompt_len is not None and len(ids) > max_prompt_len:
        raise DailError(f"{problem['where']}: field 'prompt': {len(ids)} tokens, over the prompt budget of "
                        f"{max_prompt_len} (--max-prompt-len)")
    return ids


def make_sampler(engine, args, tok, stop_ids):
    """sampler(prompt id lists, seeds, problem ids) -> per prompt, args.n dicts (ids, finish_reason, forced_ids,
    n_forced); .close() frees the engine. The released forced answer (unless --no-force-answer): with --thinking the
    first pass stops at </think> too and every sample continues after </think> + ANSWER_REQUEST; without, one with
    no \\boxed{ continues after ANSWER_REQUEST. vLLM seeds per problem (--seed + index); hf keys a sample's random
    numbers by (--seed, problem id, sample index or "forced:<i>"), never by batch or shard."""
    force, think_end = not args.no_force_answer, tok.get_vocab().get("</think>")
    first_stops = [*stop_ids, think_end] if args.thinking and force and think_end is not None else list(stop_ids)
    cue = tok(("</think>" if args.thinking else "") + ANSWER_REQUEST, add_special_tokens=False)["input_ids"]
    llm = load_vllm(args) if engine == "vllm" else None
    model = None if engine == "vllm" else load_model(args.model, *device_dtype(args), args.trust_remote_code).eval()

    def generate(prompts, n, max_tokens, stops, seeds, names):  # seeds: per prompt (vLLM); names: (id, sample) per row
        if engine == "vllm":
            return vllm_sample(llm, prompts, n, args, stops, seeds, max_tokens=max_tokens,
                               presence_penalty=args.presence_penalty)
        rows, b, results = [[p] for p in prompts for _ in range(n)], args.batch_size, []
        keys = trace_keys(args.seed, [pid for pid, _ in names], [j for _, j in names])
        for i in range(0, len(rows), b):
            def choose(logits, step, active, keys=keys[i:i + b]):  # logits [1, b, V], penalized already
                probs = sampling_probs(logits[0], args.temperature, args.top_p, args.top_k)
                return sample_with(probs, counter_uniforms(keys[active], step, 1)).squeeze(1), None
            results += decode(model, rows[i:i + b], choose, max_tokens, stops, tok.pad_token_id,
                              presence_penalty=args.presence_penalty)
        return [results[j * n:(j + 1) * n] for j in range(len(prompts))]

    def sample(prompts, seeds, pids):
        outputs = generate(prompts, args.n, args.max_new_tokens, first_stops, seeds,
                           [(p, j) for p in pids for j in range(args.n)])
        todo = [(s, list(prompt) + s["ids"] + cue, seed * 1_000_003 + i + 1, (pid, f"forced:{i}"))
                for prompt, samples, seed, pid in zip(prompts, outputs, seeds, pids) for i, s in enumerate(samples)
                if force and (args.thinking or "\\boxed{" not in tok.decode(s["ids"], skip_special_tokens=False))]
        if todo:
            targets, rows, row_seeds, names = map(list, zip(*todo))
            for s, r in zip(targets, generate(rows, 1, args.answer_tokens, stop_ids, row_seeds, names)):
                s["forced_ids"], s["n_forced"] = cue + r[0]["ids"], len(r[0]["ids"])
        return outputs
    sample.close = (lambda: close_vllm(llm)) if engine == "vllm" else (lambda: None)
    return sample


# ==== Appendix A: grading -- boxed answers, the grader (shared by the rewrite filter and eval), problems ===============
def _close(s, i, opening="{", closing="}", escaped=False):
    """Index of the bracket closing s[i] (all of `opening` nest alike) or None; `escaped`: \\{ and \\} don't count."""
    depth = 0
    for m in re.finditer(r"\\.|." if escaped else ".", s[i:], re.S):
        depth += (m[0] in opening) - (m[0] in closing)
        if depth == 0:
            return i + m.start()


def _boxes(text):
    """Each \\boxed{...} / \\fbox{...}'s content (braces matched) or `\\boxed 5`'s, in order; None if empty or cut."""
    for box in re.split(r"(?=\\boxed|\\fbox)", text or "")[1:]:  # cut at the next box: in a box, the inner one counts
        i = 6 if box.startswith("\\boxed") else 5
        m = re.match(r" \s*([^\s$]+)", box[i:])  # \boxed 5: up to the next space or $
        j = _close(box, i, escaped=True) if box.startswith("{", i) else None
        yield m[1] if m else (box[i + 1:j].strip() or None) if j else None


def extract_boxed(text):
    """The last box's content (see `_boxes`), or None."""
    return [None, *_boxes(text)][-1]


# A text-mode unit after a value ("5\text{ cm}^2", "3 \mbox{ inches}") is dropped. One letter counts only after a space
# (\text{ m}), so 2\mathrm{e} keeps its e; words that change a number (5 hundred, 2 thirds) are never units.
_NOT_UNIT = (r"(?!\s*(?:hundred|thousand|million|billion|trillion|dozen|half|halves|third|quarter|fourth|fifth|"
             r"sixth|seventh|eighth|ninth|tenth|squared|cubed|times|factorial|over|tens\b|score\b|pi\b))")
_UNIT = (r"\\(?:text|mbox|mathrm|textrm)\{" + _NOT_UNIT + r"(?:\s+[a-zA-Z]|[a-zA-Z]{2})[a-zA-Z .]*\}"
         r"(?:\^\{?[23]\}?)?")
_ATOM = r"(?:\d+|\d*\\pi|\d*\\sqrt\{\w+\}|[a-zA-Z])"  # what "a/b" may divide for a/b -> \frac{a}{b}
_IN_BRACES = r"(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*"  # what a {...} holds (its braces nested two deep at most)


_NORMALIZE = [  # normalize_answer's rules, in order: (pattern, replacement) or a function of the string
    ("\u2212", "-"), ("\u03c0", r"\\pi "), (r"(?<!\\)\$", ""), str.strip, (r"^\\[(\[]|\\[)\]]$", ""), str.strip,
    (r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])\.?", ""), (r"\\displaystyle|\\!|\\\$", ""),
    (r"\\[dtc]frac", r"\\frac"), (r"\\\\", r"\\cr "),  # a row separator, kept from the spacing rules (the last rule)
    (r"\\(le|ge|ne)q(?![a-zA-Z])", r"\\\1"),  # \leq -> \le; then \textbf{(113)} -> (113)
    (r"^\s*\\(?:text|textbf|textrm|mathrm|mathbf|mbox|boxed)\{(" + _IN_BRACES + r")\}\s*\Z", r"\1"),
    (r"\\(?:text|mbox|textrm)\{\s*(?:and|or)\s*\}|(?<=\s)(?:and|or)(?=\s)", ","),  # 6 \text{ and } 8: a list
    (r"(?<=[\d}\s])\s*" + _UNIT + r"\s*(?=$|[,;)\]])", ""),          # a unit after a value (^2, ^3 too)
    (r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|textit|mathit)\{([^{}]*)\}", r"\1"),  # unwrapped, never deleted
    (r"^\s*([+-]?\d[\d,.]*)(?:\s+" + _NOT_UNIT + r"[a-zA-Z]{2,}\.?)+(?:\^\{?[23]\}?)?\s*\Z", r"\1"),  # 58 square units
    (r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree|\\%|%", ""),                # degrees and percent signs
    # thousands separators only when the whole answer is one number (1,000 1{,}000 1\,000; "32, 349" is a list)
    (r"^\s*([+-]?\d{1,3}(?:(?:,|\{,\}|\\,)\d{3})+(?:\.\d+)?)\s*\Z", lambda m: re.sub(r"[^\d.+-]", "", m[1])),
    (r"\\[,;: ]|~|\\q?quad", " "), str.strip, (r"(?<=\d)\s+(?=\d)", "\x00"), (r"\s+", ""),  # 4 4/9: a gap, not 44/9
    lambda s: s.rstrip("."), (r"^\+|(?<=[,(\[])\+", ""),
    (r"\\frac([^{])", r"\\frac{\1}"), (r"(\\frac\{" + _IN_BRACES + r"\})([^{])", r"\1{\2}"),  # \frac12, \frac{x}2
    (r"\\sqrt(\w)", r"\\sqrt{\1}"), (r"(?<![a-zA-Z\\])pi(?![a-zA-Z])", r"\\pi"),  # \sqrt2, pi/2 -> \pi/2
    (r"(?<=\d)(?:\*|\\cdot|\\times)(?=[a-zA-Z(]|\\(?!frac))", ""),    # 2*x -> 2x, never 2\cdot 3 -> 23
    (r"([_^])(\w)", r"\1{\2}"),                                       # 52_8 -> 52_{8}
    # a \\ outside a matrix is layout: dropped at the ends (185\\), a gap inside
    lambda s: s if "\\begin{" in s else re.sub(r"^(?:\\cr)+|(?:\\cr)+$", "", s).replace("\\cr", "\x00"),
]


def normalize_answer(s):
    """The normal form of one answer string that `is_equiv` parses (the rules: `_NORMALIZE`)."""
    return functools.reduce(lambda s, rule: rule(s) if callable(rule) else re.sub(*rule, s), _NORMALIZE, str(s))


def _split_top(s, sep):
    """Split at `sep` where no bracket ( [ { is open (a stray closer opens none); [s] when there is none."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        depth += (ch in "([{") - (ch in ")]}")
        if depth == 0 and s.startswith(sep, i):  # no sep holds a bracket or starts again inside itself
            parts.append(s[start:i])
            start = i + len(sep)
    return parts + [s[start:]]


_ROOT = r"(\d*)\\sqrt\{(\d*[1-9]\d*)\}"  # c sqrt(n), n > 0
_NUMBERS = [  # a number's forms; their groups (Fractions, 1 when empty) -> (c, n), the value c sqrt(n), or falsy
    (r"(\d+\.?\d*|\.\d+)", lambda x: (x, 1)),
    (r"\\frac\{(-?\d+)\}\{(-?\d+)\}", lambda a, b: b and (a / b, 1)),
    (r"(\d+)\\frac\{(\d+)\}\{(\d+)\}", lambda w, a, b: 0 < a < b and (w + a / b, 1)),  # 1\frac{4}{5}, not 2\frac32
    (_ROOT, lambda c, n: (c, n)),
    (r"\\frac\{" + _ROOT + r"\}\{(\d+)\}", lambda c, n, d: d and (c / d, n)),
    (r"\\frac\{(\d+)\}\{" + _ROOT + r"\}", lambda a, c, n: c and (a / (c * n), n)),  # a/(c sqrt n) = a sqrt(n)/(c n)
]


def _as_number(s):
    """A normalized number as (c, n), its exact value c*sqrt(n) with n square-free (1 for a rational), else None."""
    sign, s = (-1, s[1:]) if s.startswith("-") else (1, s.removeprefix("+"))
    c_n = next((value(*(Fraction(g or 1) for g in m.groups())) for form, value in _NUMBERS
                if (m := re.fullmatch(form, s))), None)
    if not c_n:  # no form fits, a zero denominator, or no mixed number (2\frac{3}{2}: unsure)
        return None
    c, n = c_n[0], int(c_n[1])
    for f in range(2, min(math.isqrt(n), 10 ** 5) + 1):  # squares out, sqrt(12) = 2 sqrt(3): exact up to n = 1e10,
        while n % (f * f) == 0:                          # bounded above (counting down from a 30-digit prime's root
            c, n = c * f, n // (f * f)                    # would take ~1e15 steps)
    r = math.isqrt(n)
    return (sign * c * r, 1) if r * r == n else (sign * c, n)  # what is left may be a large prime's square


def _parse(s):
    """A normalized answer as a tree (kind, key, children): ("list", None, ...) unordered (a, b; \\{a, b\\}; a \\cup b),
    ("seq", brackets, ...), ("eq", "x", [v]) x = v or x \\in v, ("choice", "C", [v]), ("val", c_n or text, [])."""
    for sep in (",", "\\cup"):  # x = 1, 2 is a list (x = 1 and 2); x \in A \cup B is x \in (A \cup B)
        parts = _split_top(s, sep)
        if len(parts) > 1 and all(parts):
            return ("list", None, [_parse(p) for p in parts])
        m = sep == "," and re.match(r"([a-zA-Z](?:_\{\w+\})?|\\[a-zA-Z]+)(=|\\in(?![a-zA-Z]))(?![=])(.+)$", s)
        if m and not m[1].startswith(("\\frac", "\\sqrt")):
            return ("eq", m[1], [_parse(m[3])])
    if m := re.fullmatch(r"\(([A-E])\)(.+)", s):  # an AoPS choice and its value, \textbf{(C)}\ 25: either names it
        return ("choice", m[1], [_parse(m[2])])
    if m := re.fullmatch(r"\\begin\{([pbB]?matrix)\}(.*)\\end\{\1\}", s):
        return ("seq", "matrix", [("seq", "row", [_parse(c) for c in _split_top(row, "&")])
                                  for row in _split_top(m[2].removesuffix("\\cr"), "\\cr")])
    # a set or brackets: when the first bracket closes only at the very end (or never)
    if s.startswith("\\{") and s.endswith("\\}") and _close(s, 1, "([{", ")]}") in (None, len(s) - 1):
        return ("list", None, [_parse(p) for p in _split_top(s[2:-2], ",")])
    if s[:1] in ("(", "[") and s[-1:] in (")", "]") and _close(s, 0, "([{", ")]}") in (None, len(s) - 1):
        parts = _split_top(s[1:-1], ",")
        if len(parts) == 1 and s[0] + s[-1] == "()":  # (113), (C): parentheses around one value are no tuple
            return _parse(parts[0])
        return ("seq", s[0] + s[-1], [_parse(p) for p in parts])
    s = re.sub(r"^([+-]?)(?:(\d+)\x00)?(" + _ATOM + r")/(" + _ATOM + r")$", r"\1\2\\frac{\3}{\4}", s)  # a/b, 4 4/9
    return ("val", _as_number(s) or s, [])


def _same(a, b):
    """Trees equal: kind, key, children in order (a list's as multisets); x = v, (C) v match v, (C) v also C."""
    if a[0] != b[0]:
        if "choice" in (a[0], b[0]):
            (_, letter, (value,)), other = (a, b) if a[0] == "choice" else (b, a)
            return other == ("val", letter, []) or _same(value, other)
        return "eq" in (a[0], b[0]) and (_same(a[2][0], b) if a[0] == "eq" else _same(a, b[2][0]))
    if a[0] != "list":
        return a[1] == b[1] and len(a[2]) == len(b[2]) and all(map(_same, a[2], b[2]))
    left = list(b[2])
    for x in a[2]:  # each element of a matched to its own element of b
        if (j := next((j for j, y in enumerate(left) if _same(x, y)), None)) is None:
            return False
        left.pop(j)
    return not left


def is_equiv(pred, ref):
    """The built-in grader, after `normalize_answer`: the same exact number (0.5 == \\frac12, \\sqrt{12} == 2\\sqrt3),
    list or set (unordered), tuple, interval or matrix, else text (2x+3 vs 3+2x: missed). None equals nothing."""
    a, b = ("", "") if pred is None or ref is None else (normalize_answer(pred), normalize_answer(ref))
    return bool(a and b) and (a == b or _same(_parse(a), _parse(b)))


@functools.cache
def make_grader(name):
    """--grader `name` -> fn(response, reference) = (answer or None, correct); fn.info: name, version, timeouts."""
    if name == "builtin":
        def grade_builtin(response, reference):  # the last box; for a list, all boxes (\boxed{-2} and \boxed{1})
            pred, boxes = extract_boxed(response), [box for box in _boxes(response) if box]
            if (ok := is_equiv(pred, reference)) or len(boxes) < 2 or _parse(normalize_answer(reference))[0] != "list":
                return pred, ok
            return (", ".join(boxes), True) if is_equiv(", ".join(boxes), reference) else (pred, False)
        grade_builtin.info = dict(name="builtin")
        return grade_builtin
    if name != "math-verify":                  # (the command line's choices refuse it first)
        raise ValueError(f"grader must be 'builtin' or 'math-verify', not {name!r}")
    # Hugging Face's math-verify (an optional import) parses the whole response and the boxed reference and
    # verifies with sympy. Its time limit uses SIGALRM, which works only in the main thread: elsewhere, none.
    try:
        import math_verify
        from math_verify.errors import TimeoutException
    except ImportError:
        raise DailError("--grader math-verify: math-verify is not installed; `pip install math-verify`") from None
    import importlib.metadata
    info = dict(name="math-verify", version=importlib.metadata.version("math-verify"), timeouts=0)

    def attempt(fn, *args, **kwargs):  # fn's result, or None: an error or a timeout (a BaseException) is wrong
        try:
            return fn(*args, raise_on_error=True, **kwargs)
        except (TimeoutException, Exception) as e:
            info["timeouts"] += isinstance(e, TimeoutException)

    def grade_math_verify(response, reference):
        limit = 5 if threading.current_thread() is threading.main_thread() else None  # s, math-verify's default
        gold = (attempt(math_verify.parse, "\\boxed{" + str(reference) + "}", parsing_timeout=limit)
                if response and reference is not None else None)
        pred = None if gold is None else attempt(math_verify.parse, response, parsing_timeout=limit)
        if not pred:
            return None, False
        shown = next((p for p in pred if isinstance(p, str)), str(pred[0]))
        # one pair at a time (math_verify.verify would try them all) to count the timeouts
        return shown, any(attempt(math_verify.verify, g, p, timeout_seconds=limit) for g in gold for p in pred)
    grade_math_verify.info = info
    return grade_math_verify


def grader_info(name):
    """What summary.json records of a grader: its name, math-verify's version and timeout count."""
    return dict(make_grader(name).info)


def grade(response, reference, grader="builtin"):
    """(the extracted answer or None, correct): rewrite's filter keeps a trace by the rule eval's pass@k scores by."""
    return make_grader(grader)(response, reference)


def load_problems(path, need_solution, need_answer):
    """A problem file, checked before any model loads -> dicts: id (str), index, where, problem, solution (or None),
    answer (`answer`, else the last \\boxed{} of `solution`, else None), prompt (None, or its own eval prompt)."""
    problems, seen = [], {}
    for lineno, rec in read_jsonl(path, fields=dict(problem=str, solution=str) if need_solution else dict(problem=str)):
        where, solution, prompt = f"{path}:{lineno}", rec.get("solution"), rec.get("prompt")
        if solution is not None and not isinstance(solution, str):
            raise DailError(f"{where}: field 'solution': expected a string")
        chat = isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                           and isinstance(m.get("content"), str) for m in prompt)
        if not (prompt is None or chat or isinstance(prompt, str) and prompt.strip()):
            raise DailError(f"{where}: field 'prompt': expected non-empty text or chat messages (role, content)")
        pid = str(require(path, lineno, rec, "id", (str, int)) if "id" in rec else lineno)
        if (first := seen.setdefault(pid, lineno)) != lineno:
            raise DailError(f"{where}: field 'id': duplicate id {pid!r} (first on line {first})")
        problems.append(dict(id=pid, index=len(problems), where=where, problem=rec["problem"],
                             solution=solution, answer=answer_of(path, lineno, rec, need_answer), prompt=prompt))
    return problems


# ==== Appendix B.1, running it: errors, JSONL files and their line checks, training records, results, plots ============
class DailError(Exception):
    """A user-facing problem (bad input, missing file): printed as one line, exit code 2, no traceback."""


def first_line(e, width=200):
    """The first line of an exception's message (its type's name when it has none), cut to `width`."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:width]


class Interrupted(KeyboardInterrupt):  # (so that no `except Exception` turns a signal into an error)
    """Interrupted(message, 128 + signal): a run stopped by SIGTERM/SIGINT after saving what --resume needs."""


def read_jsonl(path, flag="--data", fields=None, hint="", resume=False, check=lambda rec: None, peek=False):
    """[(line number, record)]; a bad line, a lack of `fields` or a check(rec) fault is a DailError naming it."""
    if not (p := Path(path)).is_file() and not resume:
        raise DailError(f"{flag} {path}: no such file")
    data = p.read_bytes() if p.is_file() else b""
    # an output is written a record a write: only its last line can be cut short
    if resume and data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        if not peek:
            os.truncate(p, len(data))
            print(f"note: {path}: dropped a half-written last line from an interrupted run", file=sys.stderr)
    records = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):   # "\n" only: str.splitlines() also splits at U+2028
        if not raw.strip():
            continue
        try:  # an input's number with a fraction stays the text written: 0.00001, not float's 1e-05
            rec = json.loads(raw.decode("utf-8"), parse_float=None if resume else str)
            fault = check(rec) if isinstance(rec, dict) else f"expected a JSON object, got {type(rec).__name__}"
        except UnicodeDecodeError as e:
            fault = f"not UTF-8 text ({e.reason} at byte {e.start} of the line)"
        except json.JSONDecodeError as e:
            fault = f"not valid JSON ({e.msg} at column {e.colno})"
        if not fault:
            records.append((lineno, rec))
        elif not peek:                                   # peek: a bad line is skipped, never an error
            where = f" in an earlier run's output; {START_OVER}" if resume else ""
            raise DailError(f"{path}:{lineno}: {fault}{where}")
    if not (records or resume):
        raise DailError(f"{path}: empty file, no JSON lines")
    for lineno, rec in records:                           # fields: once every line parses
        for name, kind in (fields or {}).items():
            require(path, lineno, rec, name, kind, hint)
    return records


def resume_jsonl(path, check=lambda rec: None, peek=False):
    """The records an earlier run wrote to the output `path` (read_jsonl's resume mode)."""
    return [rec for _, rec in read_jsonl(path, resume=True, check=check, peek=peek)]


def require(path, lineno, rec, name, kind=str, hint=""):
    """rec[name], or a DailError naming file, line and field when it is missing, not a `kind` or blank text."""
    if name not in rec:
        raise DailError(f"{path}:{lineno}: field '{name}': missing{hint}")
    value = rec[name]
    if (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool    # JSON's true is no number
            or isinstance(value, str) and not value.strip()):
        what = {str: "a non-empty string", list: "a list", bool: "true or false",
                (str, int): "a non-empty string or a number"}[kind]
        raise DailError(f"{path}:{lineno}: field '{name}': expected {what}{hint}")
    return value


def answer_of(path, lineno, rec, needed=True):
    """rec's reference answer as text: `answer` (as written), else the last \\boxed{} of `solution`, else None."""
    if rec.get("answer") is not None:
        return str(require(path, lineno, rec, "answer", (str, int)))
    if (answer := extract_boxed(rec.get("solution"))) is None and needed:
        raise DailError(f"{path}:{lineno}: field 'answer': missing, and 'solution' has no \\boxed{{}} answer")
    return answer


def line_check(fields, key, expected):
    """read_jsonl's `check` of output lines: each holds `fields` ({name: type}) and key(line) in `expected`, once."""
    seen = set()

    def check(rec):
        for name, kind in fields.items():
            if name not in rec or not isinstance(v := rec[name], kind) or isinstance(v, bool) and kind is not bool:
                return f"field '{name}': missing or of the wrong type"
        if (k := key(rec)) in seen or k not in expected:
            return f"record {k!r} " + ("a second time" if k in seen else "is not one of this run's --data")
        seen.add(k)
    return check


def append_jsonl(f, record):
    """One record, one write, flushed: an interruption never leaves a record half on disk but for the last."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()


def write_atomic(path, content):
    """Every whole file dail.py writes (text, bytes, or a function writing to a file): complete, or not replaced."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")                    # the pid: processes never share a temp file
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
    """(the records train learns from, the number not kept): kept traces, or --sft-target expert's solutions."""
    expert = args.objective == "sft" and args.sft_target == "expert"
    fields = dict(problem=str, solution=str) | ({} if expert else dict(response_ids=list, finish_reason=str, kept=bool))
    rows = read_jsonl(args.data, fields=fields, hint="" if expert else " (train reads the traces.jsonl of `rewrite`)")
    if expert and "response_ids" in rows[0][1]:               # a traces file: its first line of each problem
        first = {}
        rows = [row for row in rows if first.setdefault(str(row[1].get("id", row[0])), row) is row]
    vocab = math.inf
    with contextlib.suppress(Exception):                      # no config.json (a hub id): any id >= 0
        vocab = int(json.loads((Path(args.model) / "config.json").read_text())["vocab_size"])
    for lineno, r in [] if expert else rows:                 # token ids of --model, checked before it loads
        if bad := [(i, t) for i, t in enumerate(r["response_ids"]) if type(t) is not int or not 0 <= t < vocab]:
            raise DailError(f"{args.data}:{lineno}: field 'response_ids': item {bad[0][0]} is {bad[0][1]!r}, not a "
                            f"token id (an integer in [0, {vocab}) for --model {args.model})")
    records = [dict(r, where=f"{args.data}:{lineno}", answer=answer_of(args.data, lineno, r, args.objective == "dail"))
               for lineno, r in rows if expert or r["kept"]]
    if not records:
        raise DailError(f"{args.data}: no trace has kept=true ({len(rows)} rejected by the filter)")
    return records, len(rows) - len(records)


def save_result(out, model, tok, args, summary):
    """OUT/: adapters/, the merged model + tokenizer, dail_prompt.json, metrics.png and train_summary.json."""
    if args.lora_rank:    # PEFT's format, which PeftModel.from_pretrained and vLLM (--enable-lora) load: keys
        from safetensors.torch import save    # base_model.model.<module>.lora_A.weight [r, in], .lora_B.weight [out, r]
        loras = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
        (out / "adapters").mkdir(exist_ok=True)
        write_atomic(out / "adapters" / "adapter_model.safetensors", save(
            {f"base_model.model.{name}.{ab}.weight": getattr(m, ab).detach().float().cpu().contiguous()
             for name, m in loras.items() for ab in ("lora_A", "lora_B")}, metadata={"format": "pt"}))
        write_atomic(out / "adapters" / "adapter_config.json", json.dumps(dict(   # PEFT's scale alpha / r is ours
            peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=normalized_model(args.model), bias="none",
            r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            target_modules=sorted({name.rsplit(".", 1)[-1] for name in loras}), inference_mode=True), indent=2))
        merge_lora(model)
    model.config.use_cache = True                               # (train turned it off for gradient checkpointing)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # the trained model answers in its trained format only from the student prompt: say which, beside it
    write_atomic(out / "dail_prompt.json", json.dumps(dict(user_prompt=STUDENT_PROMPT, thinking=args.thinking, usage=(
        "text = tok.apply_chat_template([{'role': 'user', 'content': user_prompt.format(problem=...)}], "
        "tokenize=False, add_generation_prompt=True, enable_thinking=thinking), + '<think>\\n' if thinking and it "
        "does not end so; ids = tok(text, add_special_tokens=False).input_ids: eval's ids")), indent=2))
    metrics = resume_jsonl(out / "metrics.jsonl")
    save_plot(out / "metrics.png", f"train --objective {args.objective}", "step", "per-token value",
              {k: ([m["step"] for m in metrics], [m[k] for m in metrics]) for k in LOGGED[args.objective]})
    summary = dict(summary, final=metrics[-1] if metrics else None, settings=dataclasses.asdict(args))
    write_atomic(out / "train_summary.json", json.dumps(summary, indent=2))
    return summary


def write_rewrite_summary(out, args, problems, traces, skipped, shortened):
    """OUT's .summary.json (counts, reject reasons, acceptance, the settings), and its short form on stderr."""
    tokens, kept = sum(len(t["response_ids"]) for t in traces), [t for t in traces if t["kept"]]
    summary = dict(problems=len(problems), problems_skipped_too_long=skipped, solutions_shortened=shortened,
                   traces=len(traces), kept=len(kept), problems_with_kept=len({t["id"] for t in kept}),
                   reject_reasons=dict(Counter(t["reject_reason"] for t in traces if t["reject_reason"])),
                   acceptance_rate=sum(t["n_accepted"] for t in traces) / max(tokens, 1),
                   mean_tokens=tokens / max(len(traces), 1), finished=sum(t["finish_reason"] == "stop" for t in traces),
                   grader=grader_info(args.grader),
                   settings={k: v for k, v in dataclasses.asdict(args).items() if k != "leak_phrases"})
    write_atomic(out.with_suffix(".summary.json"), json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("problems", "traces", "kept", "reject_reasons")}), file=sys.stderr)


def save_plot(path, title, xlabel, ylabel, curves, logx=False, ylim=None):
    """A PNG of {label: (xs, ys)} when matplotlib is importable; ylim fixes the scale (a flat 0.2 is no slope)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    ax = Figure(figsize=(6, 4), layout="tight").subplots()
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, ylim=ylim)
    ax.grid(alpha=0.3)
    ax.legend()
    write_atomic(path, lambda f: ax.figure.savefig(f, format="png", dpi=120))


# ==== Appendix B.2, running it: safe reruns -- run fingerprints, resume, checkpoints, output locks, flag checks ========
START_OVER = "use another --out, or --overwrite to start over"

# The settings that change what a command writes: a resumed run must match all of them (check_config).
RESULT_SETTINGS = {command: names.split() for command, names in dict(
    rewrite="samples propose threshold retries temperature top_p top_k max_new_tokens thinking keep_per_problem "
            "no_filter keep_truncated leak_phrases max_prompt_len seed dtype grader greedy_proposer",
    train="objective sft_target lam direction lora_rank lora_alpha lora_dropout lora_targets lr weight_decay "
          "warmup_steps grad_clip batch_size epochs max_steps max_len thinking seed dtype loss_norm",
    eval="n temperature top_p top_k max_new_tokens thinking seed dtype presence_penalty answer_tokens no_force_answer",
).items()}

# A model folder's files that decide its outputs: its fingerprint, and inputs no run may write over.
MODEL_FILES = tuple("config.json generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json "
                    "added_tokens.json vocab.json merges.txt tokenizer.model chat_template.jinja chat_template.json "
                    "*.safetensors *.safetensors.index.json pytorch_model*.bin pytorch_model.bin.index.json".split())

# What train (besides the model) and eval write into --out: no input may be one; train's --overwrite clears its own.
TRAIN_RESULTS = ("metrics.jsonl", "metrics.png", "train_summary.json", "checkpoint.pt", "adapters",
                 "train_config.json", "reference_cache", "dail_prompt.json")
EVAL_RESULTS = ("samples.jsonl", "summary.json", "passk.png", "eval_config.json")


def run_config(args, command):
    """Proof that results in --out are this run's: model and data fingerprints, settings (paths: never compared)."""
    return dict(model_fingerprint=model_fingerprint(args.model), data_fingerprint=file_fingerprint(args.data, True),
                **{k: getattr(args, k) for k in RESULT_SETTINGS[command]},
                paths=dict(model=normalized_model(args.model), data=str(Path(args.data).resolve())))


def normalized_model(name):
    """A model folder as an absolute path (so `m`, `m/` and `/abs/m` are one model); a hub id unchanged."""
    return str(Path(name).expanduser().resolve()) if Path(name).expanduser().exists() else name


def file_fingerprint(path, whole=False, edge=1 << 20):
    """'size:sha256[:16]'; over 64 MiB, unless `whole`, of the first and last `edge` bytes (the safetensors header)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(-1 if whole or size < 64 << 20 else edge)
        f.seek(max(size - edge, f.tell()))
        return f"{size}:{hashlib.sha256(head + f.read()).hexdigest()[:16]}"


def model_fingerprint(name):
    """A hash of a model folder's MODEL_FILES (file_fingerprint: cheap at 16 GB); a hub id: 'id@commit', or the id."""
    if not (folder := Path(name).expanduser()).is_dir():
        return f"{name}@{commit}" if (commit := hub_commit(name)) else name
    files = sorted({f for pattern in MODEL_FILES for f in folder.glob(pattern) if f.is_file()})
    h = hashlib.sha256(json.dumps([(f.name, file_fingerprint(f)) for f in files]).encode())
    return f"{len(files)} files:{h.hexdigest()[:16]}"


def check_config(path, config, fix=START_OVER, resuming=True, write=False):
    """When `resuming`, the settings saved at `path` equal `config` (paths aside), else one line; `write`: save it."""
    try:                                        # missing (results without their config), unreadable, not JSON
        if not isinstance(old := json.loads(Path(path).read_text()) if resuming else config, dict):
            raise ValueError(f"not a JSON object of settings but a {type(old).__name__}")
    except (OSError, ValueError) as e:
        raise DailError(f"{path}: unreadable ({first_line(e, 120)}); {fix}") from None
    if (k := next((k for k in config if k != "paths" and old.get(k, "(not recorded)") != config[k]), None)):
        raise DailError(f"{path}: written with {k}={old.get(k, '(not recorded)')!r}, this run asks for "
                        f"{k}={config[k]!r}; {fix}")
    if write:
        write_atomic(path, json.dumps(config, indent=2))


def check_own_inputs(out, outputs, inputs, model=None, folder=None):
    """Whatever the flags, no path of `outputs` is (by any link) an input or a model file, nor `folder` the model's."""
    files = {f"{flag} {path}": path for flag, path in inputs.items() if path}
    if model and (model_dir := Path(model).expanduser()).is_dir():
        real, here = os.path.realpath(model_dir), folder and os.path.realpath(folder)
        if here and os.path.commonpath([real, here]) == here:
            raise DailError(f"--out {out}: {'is' if real == here else 'holds'} the --model folder; use another --out")
        files |= {f"--model {model}'s {f.name}": f for pattern in MODEL_FILES for f in model_dir.glob(pattern)}
    for path in outputs:
        for what, source in files.items():
            with contextlib.suppress(OSError):
                if os.path.samefile(path, source):
                    raise DailError(f"--out {out}: would write over {what}, an input of this run; use another --out")


_LOCKS = []  # the output locks this command holds; main() releases them when the command ends


def check_out(args, command, lock=None, clear=()):
    """--out -> Path (rewrite: a file, else a folder), created, not an input; flocks `lock` (default --out), clears
    `clear` (--overwrite: an earlier run's files or folders)."""
    p, folder = Path(args.out).expanduser(), command != "rewrite"
    names = TRAIN_RESULTS + MODEL_FILES if command == "train" else EVAL_RESULTS
    outputs = ([p, p.with_suffix(".summary.json"), p.with_suffix(".config.json"), *p.parent.glob(f"{p.stem}.part*")]
               if command == "rewrite" else [p / name for name in names] + [*p.glob("samples.part*")])
    check_own_inputs(args.out, outputs, {"--data": args.data}, args.model, folder=p if folder else None)
    try:                                        # (an existing file or folder of the wrong kind fails here too)
        (p if folder else p.parent).mkdir(parents=True, exist_ok=True)
        if not folder:
            open(p, "a").close()
    except OSError as e:
        raise DailError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None
    for path in [p] if lock is None else map(Path, lock):
        file = path / ".dail.lock" if path.is_dir() else path.with_name(f".{path.name}.lock")
        try:
            _LOCKS.append(os.open(file, os.O_RDWR | os.O_CREAT, 0o644))       # main() closes it, locked or not
            fcntl.flock(_LOCKS[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DailError(f"{path}: another run is writing it now; let it finish, or use another --out") from None
        except OSError as e:                    # a file system without locks (some NFS): run, but say so
            print(f"note: {file}: cannot be locked ({e.strerror}); make sure no other run writes {path}",
                  file=sys.stderr)
    for path in map(Path, clear):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return p


def guard_train_out(args):
    """train's --out (rank 0): a folder holding anything only with --resume (same settings) or --overwrite."""
    if args.resume and args.overwrite:
        raise DailError("--resume and --overwrite: choose one")
    if args.resume and not (Path(args.out) / "checkpoint.pt").exists():
        raise DailError(f"--resume: {Path(args.out) / 'checkpoint.pt'} does not exist")
    if int(os.environ.get("RANK", "0")) != 0:
        return
    clear = [Path(args.out).expanduser() / name for name in TRAIN_RESULTS] if args.overwrite else ()
    out = check_out(args, "train", clear=clear)
    held = sorted(p.name for p in out.iterdir() if p.name not in ("train_config.json", ".dail.lock"))
    if held and not (args.resume or args.overwrite):
        raise DailError(f"--out {args.out}: holds an earlier run ({', '.join(held[:3] + ['...'] * (len(held) > 3))}); "
                        f"use another --out, --resume to continue it, or --overwrite to start over")
    for stale in [*out.glob("*.tmp"), *(out / "reference_cache").glob("*.tmp")]:   # left by an interruption
        stale.unlink()
    check_config(out / "train_config.json", run_config(args, "train"), resuming=args.resume and bool(held), write=True)


def trainable_state(model, args):
    """The weights train optimises (and checkpoints): the LoRA adapters, or every weight with --lora-rank 0."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k or args.lora_rank == 0}


def save_checkpoint(path, step, model, optimizer, args, device):
    """OUT/checkpoint.pt after `step` optimizer steps: trainable weights, AdamW's state, torch's RNGs (dropout's)."""
    rng = dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    write_atomic(path, lambda f: torch.save(dict(step=step, trainable=trainable_state(model, args), rng=rng,
                                                 optimizer=optimizer.state_dict(), args=dataclasses.asdict(args)), f))


def load_checkpoint(path, model, optimizer, args, device, total_steps):
    """Restore save_checkpoint's state -> its step; any other file is one line with the cause, never a fresh start."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        step, trainable, rng = ckpt["step"], ckpt["trainable"], ckpt["rng"]
        if diff := sorted(trainable.keys() ^ trainable_state(model, args).keys()):
            raise ValueError(f"{len(diff)} trainable weights missing or not of this model ({diff[0]})")
        if not 0 <= step <= total_steps:
            raise ValueError(f"step {step}, outside this run's 0..{total_steps} steps")
        model.load_state_dict(trainable, strict=False)          # strict over the trainable weights: checked above
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
    except Exception as e:          # a truncated zip, garbage bytes, another run's weights: whatever torch says
        raise DailError(f"{path}: not a checkpoint of this run ({first_line(e, 120)}); move it away, or --overwrite "
                        f"to start over") from None
    return step


# The flag checks (validate_args): flags -> (test, what a value must be); None is a flag left unset.
VALID = {name: check for names, check in {
    "threads top_k lora_rank warmup_steps save_every temperature threshold presence_penalty lam weight_decay grad_clip":
        (lambda v: 0 <= v < math.inf, ">= 0"),
    "samples retries max_new_tokens max_prompt_len keep_per_problem batch_size micro_batch_size n epochs "
    "tensor_parallel_size max_model_len answer_tokens max_steps max_len loss_chunk log_every":
        (lambda v: 1 <= v < math.inf, ">= 1"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "in 0..4294967295"),           # torch, numpy and vLLM take derived seeds
    "top_p gpu_memory_utilization": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "lr lora_alpha": (lambda v: 0 < v < math.inf, "> 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lora_targets": (lambda v: all(x.strip() for x in v.split(",")), "comma-separated module names"),
    "device": (lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None, "auto, cpu, cuda, cuda:N or mps"),
}.items() for name in names.split()}


def validate_args(args):
    """Every flag against VALID before any file or model is touched: a bad value is one line, exit 2."""
    for name, (ok, must) in VALID.items():
        if (value := getattr(args, name, None)) is not None and not ok(value):   # None: unset, or not this command's
            kind = "" if isinstance(value, str) else "an integer " if isinstance(value, int) else "a number "
            raise DailError(f"--{name.replace('_', '-')} {value}: must be {kind}{must}")
    device_dtype(args)                         # a device this machine lacks: refused before any model loads


def planned_steps(args, num_examples, say=True, few=20):
    """ceil(examples x epochs / --batch-size), at most --max-steps; a warning line when few or within the warm-up."""
    steps = min(math.ceil(num_examples * args.epochs / args.batch_size), args.max_steps or math.inf)
    if say and (steps < few or steps <= args.warmup_steps):
        print(f"warning: train: only {steps} optimizer steps ({num_examples} examples x {args.epochs} epochs / batch "
              f"{args.batch_size}; --warmup-steps {args.warmup_steps}): the model will barely train", file=sys.stderr)
    return steps


# ==== Appendix B.3, running it: the reference cache (teacher and shortcut states in memory or on disk) =================
def new_reference_cache(mode, folder=None):
    """A store for reference_states: 'memory' (host RAM), 'disk' (a file per example in `folder`) or 'off'."""
    return dict(mode=mode, folder=folder, states={}, computed=0, reused=0, bad_files=0)


def states_digest(tensors):
    """A disk entry's checksum, kept in its header: sha256 of the tensors' dtypes, shapes and bytes."""
    return hashlib.sha256(b"".join(f"{t.dtype}{tuple(t.shape)}".encode() + t.cpu().contiguous().view(torch.uint8)
                                   .numpy().tobytes() for t in tensors)).hexdigest()


def cached_states(cache, examples, compute):
    """Each example's (teacher [n, H], shortcut [n, H]): cached (disk: key + sha256 checked), else computed, stored."""
    keys = [hashlib.sha256(json.dumps([ex["privileged"][0], ex["shortcut"][0], ex["privileged"][1]]).encode())
            .hexdigest()[:32] for ex in examples]        # the token ids: an entry serves only its own example
    found = []
    for key in keys:
        states = cache["states"].get(key)                  # memory ('off' and a disk cache hold none here)
        if cache["mode"] == "disk" and (path := cache["folder"] / f"{key}.safetensors").exists():
            from safetensors import safe_open
            ok = False
            with contextlib.suppress(Exception), safe_open(str(path), "pt") as f:    # (unreadable: not ok)
                meta, states = f.metadata() or {}, (f.get_tensor("teacher"), f.get_tensor("shortcut"))
                ok = (meta.get("key"), meta.get("sha256")) == (key, states_digest(states))
            if not ok:
                cache["bad_files"], states = cache["bad_files"] + 1, None
                print(f"note: {path}: unreadable, another example's or fails its checksum; recomputed", file=sys.stderr)
        cache["reused"] += states is not None
        found.append(states)
    missing = [i for i, states in enumerate(found) if states is None]
    cache["computed"] += len(missing)
    for i, (teacher, shortcut) in zip(missing, compute([examples[i] for i in missing]) if missing else ()):
        found[i] = teacher, shortcut
        if cache["mode"] == "memory":
            cache["states"][keys[i]] = (teacher.to("cpu", copy=True), shortcut.to("cpu", copy=True))
        elif cache["mode"] == "disk":
            from safetensors.torch import save
            cache["folder"].mkdir(parents=True, exist_ok=True)
            tensors = {"teacher": teacher.contiguous().cpu(), "shortcut": shortcut.contiguous().cpu()}
            write_atomic(cache["folder"] / f"{keys[i]}.safetensors",
                         save(tensors, metadata=dict(key=keys[i], sha256=states_digest(tensors.values()))))
    return found


def setup_reference_cache(args, examples, model, dtype, say=True, ram=None):
    """train's cache; auto: memory if this machine's ranks' copies fit half the free `ram`, disk if 2x fits OUT."""
    if ram is None:
        m = Path("/proc/meminfo").exists() and re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        ram = int(m.group(1)) * 1024 if m else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    hidden, tokens = model.get_input_embeddings().weight.shape[1], sum(len(ex["privileged"][1]) for ex in examples)
    size = tokens * 2 * hidden * dtype.itemsize                       # response tokens x 2 contexts x H x bytes
    out, ranks_here = Path(args.out), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    fits = dict(memory=size * ranks_here <= ram // 2, disk=size * 2 <= shutil.disk_usage(out).free)
    mode = next((m for m in fits if fits[m]), "off") if args.reference_cache == "auto" else args.reference_cache
    if say:
        where = {"memory": "in memory", "disk": f"on disk in {out / 'reference_cache'}", "off": "off"}[mode]
        print(f"train: reference cache {where} ({'auto: ' if args.reference_cache == 'auto' else ''}{size / 1e9:.3g} "
              f"GB)", file=sys.stderr)
    return new_reference_cache(mode, out / "reference_cache")


# ==== Appendix B.4, running it: torchrun (process group, all-reduce, stop signals) and --shard part files ==============
def setup_distributed(args):
    """train under torchrun (a process per device, each its share of every step) -> (ddp, rank, world_size, device)."""
    device = device_dtype(args)[0]
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False, 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def end_distributed(ddp):
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_step(params, logged, device):
    """Sum every rank's gradients (each over the step's global divisor: the sum is the big batch's) and logged sums."""
    for p in params:
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad    # a rank with no sequence in a short last step
        dist.all_reduce(p.grad)
    sums = torch.tensor(list(logged.values()), dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return dict(zip(logged, sums.tolist()))


@contextlib.contextmanager
def stop_signals(ddp, device):
    """SIGTERM/SIGINT note the first signal; stopped() -> it as every rank sees it (0: none), so all stop after the
    same step, with a checkpoint. Ctrl-\\ (SIGQUIT): at once."""
    first = [0]

    def handler(signum, frame):
        if not first[0]:                      # os.write: print() is not reentrant
            first[0] = signum
            os.write(2, b"dail.py train: stopping after the step in flight, with a checkpoint\n")

    def stopped():
        flag = torch.tensor(first, dtype=torch.float32, device=device)
        if ddp:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    on_main = threading.current_thread() is threading.main_thread()      # signals reach the main thread only
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)} if on_main else {}
    try:
        yield stopped
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def start_job(command, args, problems):
    """rewrite's and eval's setup -> job: engine, out_file, the split into n, the shards ks this process decodes into
    paths[k] (resumed: done[k]; expected[k]: shard k's keys). A plain run finishes an earlier split's parts."""
    out, engine, rewrite = Path(args.out).expanduser(), pick_engine(args), command == "rewrite"
    out_file = out if rewrite else out / "samples.jsonl"
    # shard k of n: --shard K/N, else RANK of WORLD_SIZE (torchrun), else 0 of 1. vLLM under torchrun: one engine per
    # --tensor-parallel-size (tp) ranks, shard rank // tp of WORLD_SIZE / tp; its followers decode in step
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    tp = args.tensor_parallel_size if engine == "vllm" and world > 1 else 1
    k, n, follower = rank // tp, world // tp, rank % tp != 0
    if args.shard:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", args.shard)
        if not m or not int(m[1]) < int(m[2]):
            raise DailError(f"--shard {args.shard}: expected K/N with 0 <= K < N, e.g. 0/4")
        if world > 1:
            raise DailError(f"--shard {args.shard}: under torchrun each rank already takes its own shard; drop --shard")
        k, n = int(m[1]), int(m[2])
    elif world % tp:
        raise DailError(f"--tensor-parallel-size {tp}: torchrun started {world} processes, not a multiple of it")
    found = {p: int(m[1]) for p in out_file.parent.glob(f"{out_file.stem}.part*")
             if (m := re.fullmatch(rf"{re.escape(out_file.stem)}\.part\d+-of-(\d+)\..+", p.name))}
    splits = set() if args.overwrite else set(found.values())
    if len(splits | {n} - {1}) > 1:
        sizes = " and ".join(map(str, sorted(splits)))
        raise DailError(f"{out_file.parent}: holds the part files of a split into {sizes} shards"
                        f"{f', this run splits into {n}' if n > 1 else ''}; keep one split, or --overwrite")
    if args.merge and (n > 1 or not splits):
        raise DailError(f"--merge: merges an earlier split's part files of {out_file} in one process "
                        f"({'drop --shard (or torchrun)' if n > 1 else 'none found: run the shards first'})")
    earlier = n == 1 and bool(splits)              # this plain run decodes what the split left, then merges
    n, ks = (max(splits), [] if args.merge else range(max(splits))) if earlier else (n, [k])
    parts = [out_file] if n == 1 else [  # the file shard j of n writes: traces.jsonl -> traces.part0-of-4.jsonl
        out_file.with_name(f"{out_file.stem}.part{j}-of-{n}{out_file.suffix}") for j in range(n)]
    index = {p["id"]: p["index"] for p in problems}
    fields = (dict(id=str, sample=int, response=str, response_ids=list, finish_reason=str, n_accepted=int, kept=bool,
                   reject_reason=(str, type(None))) if rewrite else
              dict(id=str, answer=str, responses=list, preds=list, correct=list, n_tokens=list, finish_reasons=list))
    job = SimpleNamespace(
        engine=engine, out_file=out_file, n=n, ks=ks, follower=follower, earlier=earlier,
        config=run_config(args, command), key=(lambda r: (r["id"], r["sample"])) if rewrite else lambda r: r["id"],
        config_of=lambda p: p.with_suffix(".config.json") if rewrite or p != out_file else out / "eval_config.json",
        order=lambda r: (index[r["id"]], r.get("sample", 0)),                      # input order
        expected={j: {(p["id"], s) if rewrite else p["id"] for p in problems[j::n]  # equal counts, lengths mixed
                      for s in range(args.samples if rewrite else 1)} for j in range(n)},
        parts=parts, paths={j: os.devnull if follower else parts[j] for j in ks})
    job.check = lambda j: line_check(fields, job.key, job.expected[j])   # a record of another shard: an error
    if follower:                                 # decodes in step with its group's first rank, which writes
        job.done = {j: resume_jsonl(parts[j], peek=True) for j in ks}
        return job
    results = [out.with_suffix(".summary.json")] if rewrite else [out / name for name in EVAL_RESULTS]
    check_out(args, command, job.paths.values(), [  # --overwrite: what an earlier run of this job left
        *job.paths.values(), *map(job.config_of, job.paths.values()), out_file, job.config_of(out_file), *results,
        *(p for p, m in found.items() if m != n)] if args.overwrite else ())
    job.done = {j: resume_jsonl(path, job.check(j)) for j, path in job.paths.items()}
    for j, path in job.paths.items():
        check_config(job.config_of(path), job.config, resuming=bool(job.done[j]), write=True)
    return job


def gather_parts(job):
    """The job's records (merged into out_file in input order); None for a follower or while a part is incomplete."""
    if job.follower or job.n == 1:
        return None if job.follower else resume_jsonl(job.out_file, job.check(0))
    begun = [k for k, p in enumerate(job.parts) if job.config_of(p).exists()]
    for k in begun:
        check_config(job.config_of(job.parts[k]), job.config, "rerun that shard, or --overwrite")
    missing = [k for k, p in enumerate(job.parts) if k not in begun            # peek: a part may be being written
               or not job.expected[k] <= set(map(job.key, resume_jsonl(p, job.check(k), peek=True)))]
    if missing and job.earlier:
        raise DailError(f"{job.out_file}: {len(missing)} of {job.n} parts are incomplete; run them (--shard K/{job.n})")
    if missing:
        print(f"note: {job.out_file}: parts {', '.join(map(str, missing))} of {job.n} are not complete yet; the shard "
              f"that completes the last one merges them (or --merge)", file=sys.stderr)
        return None
    # check(k) refuses another shard's record, so none is merged twice; two shards finishing together both merge
    records = sorted((r for k, p in enumerate(job.parts) for r in resume_jsonl(p, job.check(k))), key=job.order)
    write_atomic(job.out_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    check_config(job.config_of(job.out_file), job.config, resuming=False, write=True)
    print(f"merged {job.n} parts into {job.out_file}", file=sys.stderr)
    return records


# ==== Appendix B.5, running it: devices, models and the hub, tokenizers, context lengths and stop tokens ===============
MAX_CHARS_PER_TOKEN = 32   # the prompt-length guards: no tokenizer averages that many on real text (English: ~4)


def bounded_ids(encode, text, budget):
    """(ids, whole): encode(text), or (ids of a head already clearly over budget, False): a 50 MB text costs little."""
    limit = MAX_CHARS_PER_TOKEN * (max(budget, 0) + 1) if budget is not None else len(text)
    if len(text) > limit and len(head := encode(text[:limit])) > budget + 8:   # a head has at most a few more
        return head, False
    return encode(text), True


def fit_privileged_solution(tok, problem, thinking, max_prompt_len):
    """The solution shortened until the privileged prompt fits: privileged_solution, what validator and teacher see."""
    solution = problem["solution"]
    while max_prompt_len is not None:
        text = PRIVILEGED_PROMPT.format(problem=problem["problem"], solution=solution)
        if len(bounded_ids(lambda t: chat_prompt_ids(tok, t, thinking), text, max_prompt_len)[0]) <= max_prompt_len:
            break
        if not solution:
            raise DailError(f"{problem['where']}: field 'problem': the privileged prompt is over the prompt budget "
                            f"of {max_prompt_len} tokens even without the solution")
        # one step: cut before the last "Solution N:" (keep a write-up's first solutions), else keep the first half
        marks = [m.start() for m in re.finditer(r"Solution\s*\d+\s*:", solution)]
        solution = solution[:marks[-1]].rstrip() if marks and marks[-1] > 0 else solution[:len(solution) // 2]
    return solution


def fit_prompts(tok, problems, args, roles=("student", "privileged")):
    """rewrite's prompts -> ({id: {role: ids}}, skipped, shortened); a problem that cannot fit is skipped (one line)."""
    max_prompt = prompt_budget(args, "rewrite", lambda: max(
        len(ids) for p in problems for ids in build_contexts(tok, p, args.thinking, None, roles).values()))
    contexts, skipped = {}, 0
    for p in problems:
        try:
            p["privileged_solution"] = fit_privileged_solution(tok, p, args.thinking, max_prompt)
            contexts[p["id"]] = build_contexts(tok, p, args.thinking, max_prompt, roles)
        except DailError as e:
            skipped += 1
            print(f"skip: {e}", file=sys.stderr)
    if shortened := sum(p.get("privileged_solution", p["solution"]) != p["solution"] for p in problems):
        print(f"rewrite: {shortened} expert solutions shortened to fit {max_prompt} tokens", file=sys.stderr)
    if not contexts:
        raise DailError(f"{args.data}: no problem fits the prompt budget of {max_prompt} tokens (all {skipped} "
                        f"skipped); raise --max-prompt-len, or lower --max-new-tokens")
    return contexts, skipped, shortened


def prompt_budget(args, command, longest_prompt):
    """--max-prompt-len, else the context minus --max-new-tokens (clipped, one line, to fit the longest prompt)."""
    if args.max_prompt_len is not None:
        return args.max_prompt_len
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        n = int(config.max_position_embeddings)
    except Exception:  # no readable config, or no context length in it: no limit
        return None
    if n - args.max_new_tokens < 1:
        if n - (longest := longest_prompt()) < 1:
            raise DailError(f"--max-new-tokens {args.max_new_tokens}: the model's context is {n} tokens, which "
                            f"leaves no room for a prompt; lower --max-new-tokens (or set --max-prompt-len)")
        print(f"{command}: --max-new-tokens {args.max_new_tokens} does not fit the model's {n}-token context; "
              f"using {n - longest} (the context minus the longest prompt, {longest} tokens)", file=sys.stderr)
        args.max_new_tokens = n - longest
    return n - args.max_new_tokens


def device_dtype(args):
    """(device, dtype): --device (under torchrun CUDA is the rank's own), --dtype; a device not here: DailError."""
    name, cuda = args.device, torch.cuda.is_available()
    if "LOCAL_RANK" in os.environ and name.split(":")[0] in ("auto", "cuda") and cuda:
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    device = torch.device(name if name != "auto" else "cuda" if cuda else "cpu")
    if device.type == "cuda" and (device.index or 0) >= (n_cuda := torch.cuda.device_count()):
        raise DailError(f"--device {name}: this machine has {n_cuda} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DailError("--device mps: Apple's MPS is not available on this machine")
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32               # --dtype auto
    return device, auto if args.dtype == "auto" else getattr(torch, args.dtype)


@functools.lru_cache(maxsize=None)   # asked once per process
def hub_commit(name):
    """Hub id `name`'s commit (a 5 s HEAD; a hub out of reach: the local cache's, with a note) or None; a path: none."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise DailError(f"--model {name}: no such model folder")
    if not constants.HF_HUB_OFFLINE:
        endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")   # read now: a mirror set late
        try:
            url = hf_hub_url(name, "config.json", endpoint=endpoint)
            if commit := get_hf_file_metadata(url, timeout=5).commit_hash:
                return commit
        except Exception as e:  # the hub answered (no such repo, gated, ...: the cache may know it), or is out of reach
            if not isinstance(e, HfHubHTTPError):         # connection refused, DNS failure, timeout, proxy error
                print(f"note: the hub ({endpoint}) is unreachable; using the local cache only", file=sys.stderr)
                os.environ["HF_HUB_OFFLINE"] = "1"
                constants.HF_HUB_OFFLINE = True
    with contextlib.suppress(Exception):  # (a malformed id: None)
        cached = try_to_load_from_cache(name, "config.json")
        return Path(cached).parent.name if isinstance(cached, str) else None


def from_pretrained(auto, what, name, trust_remote_code, **kw):
    """auto.from_pretrained(name), or a one-line DailError; a folder's own code (auto_map) runs only with the flag."""
    try:
        return auto.from_pretrained(name, trust_remote_code=trust_remote_code, **kw)
    except Exception as e:
        if "trust_remote_code" in str(e):
            raise DailError(f"--model {name}: ships its own Python code (auto_map), which runs only with "
                            f"--trust-remote-code; pass it only for a model whose code you trust") from None
        raise DailError(f"--model {name}: could not load the {what} ({first_line(e)})" + (
            "" if Path(name).exists() else "; a hub id needs network access or a copy in the local cache")) from None


def load_tokenizer(name, trust_remote_code=False, thinking=None):
    """The tokenizer (a pad token set; no chat template: a DailError); a warning if --thinking disagrees with it."""
    from transformers import AutoTokenizer
    if not Path(name).exists():
        hub_commit(name)  # a missing folder fails here; a hub out of reach: the local cache, at once
    tok = from_pretrained(AutoTokenizer, "tokenizer", name, trust_remote_code)
    if not (template := getattr(tok, "chat_template", None)):
        raise DailError(f"--model {name}: the tokenizer has no chat template; DAIL prompts are chat turns")
    if thinking is not None and (has := any(s in str(template) for s in ("enable_thinking", "<think>"))) != thinking:
        print(f"warning: --model {name}: the chat template {'has' if has else 'has no'} thinking support (<think>) "
              f"but --thinking is {'not set' if has else 'set'}", file=sys.stderr)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name, device, dtype, trust_remote_code=False):
    from transformers import AutoModelForCausalLM
    return from_pretrained(AutoModelForCausalLM, "model", name, trust_remote_code, dtype=dtype).to(device)


def stop_token_ids(tok, name):
    """Tokens that end a response: the tokenizer's and the generation config's EOS, and ChatML's end of turn."""
    from transformers import GenerationConfig
    eos = None
    with contextlib.suppress(Exception):  # no generation_config.json: the tokenizer's EOS is enough
        eos = GenerationConfig.from_pretrained(name).eos_token_id
    ids = {tok.eos_token_id, tok.get_vocab().get("<|im_end|>")} | set(eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(ids - {None})


# ==== Appendix B.6, running it: the vLLM engine (an optional import) ===================================================
def pick_engine(args):
    """--engine; auto: vLLM when importable and on a GPU, else hf. A mixing threshold (0 < tau < 1) needs hf."""
    if 0 < getattr(args, "threshold", 0) < 1:                  # rewrite mixes two contexts per token: vLLM cannot
        if args.engine != "hf":
            print(f"note: --threshold {args.threshold} mixes the contexts: using the hf engine", file=sys.stderr)
        return "hf"
    return args.engine if args.engine != "auto" else "vllm" if torch.cuda.is_available() and vllm_available() else "hf"


def vllm_available():
    with contextlib.suppress(Exception):
        import vllm  # noqa: F401
        return True
    return False


def load_vllm(args):
    """vllm.LLM for --model; under torchrun one engine per --tensor-parallel-size ranks, data parallel (start_job)."""
    try:
        import vllm
    except ImportError:
        raise DailError("--engine vllm: vLLM is not installed; `pip install -r requirements-vllm.txt` (GPU), "
                        "or use --engine hf") from None
    cuda = torch.cuda.is_available() and args.device not in ("cpu", "mps")
    kw = dict(gpu_memory_utilization=args.gpu_memory_utilization) if cuda else dict(enforce_eager=True)
    if (world := int(os.environ.get("WORLD_SIZE", "1"))) > 1:
        kw.update(distributed_executor_backend="external_launcher",
                  data_parallel_size=world // args.tensor_parallel_size)
    return vllm.LLM(model=args.model, dtype=args.dtype if args.dtype != "auto" or cuda else "float32",
                    seed=args.seed, tensor_parallel_size=args.tensor_parallel_size, max_model_len=args.max_model_len,
                    trust_remote_code=args.trust_remote_code, **kw)


def vllm_sample(llm, prompts, n, args, stop_ids, seeds, banned_ids=(), max_tokens=None, presence_penalty=0.0):
    """eval's and rewrite's: a request and seed per prompt (token ids) -> per prompt, n dicts (ids, finish_reason)."""
    from vllm import SamplingParams
    greedy = args.temperature == 0    # vLLM refuses n > 1 when greedy: one sample, copied (they are equal)
    params = [SamplingParams(n=1 if greedy else n, temperature=args.temperature, top_p=args.top_p, seed=s,
                             top_k=args.top_k or -1, max_tokens=max_tokens or args.max_new_tokens,
                             presence_penalty=presence_penalty, stop_token_ids=list(stop_ids),
                             skip_special_tokens=False, logit_bias={t: -100.0 for t in banned_ids} or None)
              for s in seeds]

    def sample(c):  # vLLM keeps a stop token as the last id; decode's ids end before it
        ids, stopped = list(c.token_ids), c.finish_reason == "stop"
        return dict(ids=ids[:-1] if stopped and ids and ids[-1] in stop_ids else ids,
                    finish_reason="stop" if stopped else "length")
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    return [[sample(c) for c in out.outputs for _ in range(n if greedy else 1)] for out in outs]


def close_vllm(llm):
    """Tear vLLM's process-wide state down now (left to the GC, it can take the next LLM's parallel groups along)."""
    import gc
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    gc.collect()
    cleanup_dist_env_and_memory()


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
    """One subcommand per COMMANDS entry; each field of its dataclass is a flag of its type, with its help."""
    import argparse
    parser = argparse.ArgumentParser(prog="dail.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, doc) in COMMANDS.items():
        p = sub.add_parser(name, help=doc, description=doc)
        for f in dataclasses.fields(cls):
            kind = dict(action="store_true") if f.type is bool else dict(type=f.type)   # parsed by the annotation
            shown = "" if f.default is None or f.type is bool else f" (default: {f.default})"
            p.add_argument("--" + f.name.replace("_", "-"), default=f.default,
                           **kind, **dict(f.metadata, help=f.metadata["help"] + shown))
    return parser


def main(argv=None):
    """Run one command: a DailError or a full disk is one line and exit 2; a signal, one line and 128 + signal."""
    args = build_parser().parse_args(argv)
    cls, run, _ = COMMANDS[args.command]
    config = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
    if config.threads > 0:          # before any model loads (a negative value is refused by validate_args)
        torch.set_num_threads(config.threads)
    hint = ("rerun with --resume to continue (or --overwrite when no checkpoint.pt was written)" if args.command ==
            "train" else "rerun the same command to resume")            # rewrite and eval skip what is written

    def terminate(signum, frame):   # SIGTERM (preemption, `kill`) and Ctrl-C end a command (train saves first)
        raise Interrupted(f"interrupted; {hint}", 128 + signum)
    on_main = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = {s: signal.signal(s, terminate) for s in (signal.SIGTERM, signal.SIGINT)} if on_main else {}
    try:
        run(config)
        return 0
    except (DailError, Interrupted) as e:    # (Interrupted without a message: a torchrun rank whose master says it)
        message, code = e.args if isinstance(e, Interrupted) else (f"error: {e}", 2)
    except OSError as e:                     # a full disk while appending records: each line is whole or cut off
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        message, code = f"error: {e.filename or '--out'}: the disk is full; free space and {hint}", 2
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        while _LOCKS:                        # the output locks end with the command (a test runs many in one process)
            os.close(_LOCKS.pop())
    if message:
        print(f"dail.py {args.command}: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

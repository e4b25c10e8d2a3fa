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

Launch manual
-------------
CPU, the shipped tiny default (no GPU, no network; a few minutes on 2 cores):
    pip install -r requirements.txt && python examples/quickstart.py

One GPU, Qwen2.5-7B-Instruct, the released non-reasoning configuration:
    python dail.py rewrite --model Qwen/Qwen2.5-7B-Instruct --data expert.jsonl --out runs/q7/traces.jsonl
    python dail.py train   --model Qwen/Qwen2.5-7B-Instruct --data runs/q7/traces.jsonl --out runs/q7/model \
                           --grad-checkpointing
    python dail.py eval    --model runs/q7/model --data test.jsonl --out runs/q7/eval --engine vllm
  Reasoning models (Qwen3): add --thinking to all three (rewrite then writes 256-token thinking prefixes
  with threshold 1.0; train uses 3 epochs and max length 2048).

Several GPUs (data parallel; the master process logs and saves, every rank takes its share of each step):
    torchrun --standalone --nproc_per_node 8 dail.py train --model ... --data traces.jsonl --out runs/q7/model
  rewrite and eval on several GPUs: run one process per GPU on a shard of the data, or use
  `eval --engine vllm --tensor-parallel-size N`.

Every run resumes: rerun the same command after an interruption and it continues where it stopped
(rewrite and eval skip what is already written; train takes --resume and a --save-every checkpoint).

The file reads top to bottom in the paper's order (sections are marked with # ==== banners):
  Plumbing: arguments, errors, JSONL files, models            (not the method)
  Data: problems, expert solutions and their boxed answers
  Three contexts of one model (all prompt text lives here)
  Step 1, rewrite: the mixed-policy rollout (proposer, validator, threshold)
  Step 1, filtering the traces, and the rewrite command
  Step 2, the contrastive self-distillation loss              (the part to copy)
  Step 2, training: minimal LoRA and a plain PyTorch loop, the train command
  Evaluation: the unbiased pass@k and the eval command
  Plumbing: the vLLM engine and the command line              (not the method)
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# A hub id that cannot be reached must fail quickly with our message, not hang on retries.
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")


# =====================================================================================================
# Plumbing: arguments (each field help is its --help line), errors, JSONL files, models
# =====================================================================================================
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
    max_prompt_len: int = arg(None, "longest prompt in tokens (default: the model's context length minus "
                                    "--max-new-tokens); longer prompts are an error or a counted skip",
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
    leak_phrases: str = arg(",".join(LEAK_PHRASES), "comma-separated phrases that reject a trace that "
                                                    "mentions the reference ('' disables the check)")
    # engine
    batch_size: int = arg(32, "traces decoded together (each takes two rows: proposer and validator)")
    engine: str = arg("hf", "hf: the token-by-token rollout; vllm/auto: vLLM when the threshold makes the "
                            "rule a pure policy (0 or >= 1), else hf", choices=["hf", "vllm", "auto"])
    tensor_parallel_size: int = arg(1, "vLLM: GPUs per model")
    max_model_len: int = arg(None, "vLLM: context length to reserve (default: the model's)", type=int)
    gpu_memory_utilization: float = arg(0.9, "vLLM: fraction of GPU memory it may take")


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
    # LoRA, as released: r = alpha = 32, no dropout, all attention and MLP projections
    lora_rank: int = arg(32, "LoRA rank (0: full fine-tuning with a frozen copy as the reference)")
    lora_alpha: float = arg(32.0, "LoRA scale numerator: the update is (alpha / rank) * B @ A")
    lora_dropout: float = arg(0.0, "dropout on the LoRA input")
    lora_targets: str = arg("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                            "comma-separated names of the nn.Linear modules that get adapters")
    # optimisation, as released: AdamW 2e-4, wd 0.01, 5 warm-up steps then linear decay, 16 sequences a step
    lr: float = arg(2e-4, "peak learning rate")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    warmup_steps: int = arg(5, "linear warm-up steps, then linear decay to 0")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0: off); not stated by the authors")
    batch_size: int = arg(16, "sequences per optimizer step, over all GPUs and micro-steps")
    micro_batch_size: int = arg(1, "sequences per forward pass (gradient accumulation makes up the rest)")
    epochs: int = arg(None, "passes over the traces [default 5; 3 with --thinking]", type=int)
    max_steps: int = arg(None, "stop after this many optimizer steps (default: all epochs)", type=int)
    max_len: int = arg(None, "drop (and count) examples whose longest context exceeds this many tokens "
                             "[default 12288; 2048 with --thinking]", type=int)
    # memory
    grad_checkpointing: bool = arg(False, "recompute the backbone's activations in backward (long traces)")
    loss_chunk: int = arg(1024, "response positions per chunk of the LM head + loss (bounds peak memory)")
    # bookkeeping
    log_every: int = arg(1, "print a log line every this many steps (metrics.jsonl gets every step)")
    save_every: int = arg(0, "write a resumable checkpoint every this many steps (0: only at the end)")
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
                                       "without \\boxed{, gets a second pass that closes the thinking or asks "
                                       "for the boxed answer")
    batch_size: int = arg(64, "hf engine: sequences decoded together")
    engine: str = arg("auto", "auto: vLLM when importable and a GPU is present, else hf",
                      choices=["auto", "hf", "vllm"])
    tensor_parallel_size: int = arg(1, "vLLM: GPUs per model")
    max_model_len: int = arg(None, "vLLM: context length to reserve (default: the model's)", type=int)
    gpu_memory_utilization: float = arg(0.9, "vLLM: fraction of GPU memory it may take")


class DailError(Exception):
    """A user-facing problem (bad input, missing file): printed as one line, exit code 2, no traceback."""


def resolve_released(args):
    """Fill the flags left at None with the released default of this model kind (see RELEASED)."""
    for name, value in RELEASED[args.thinking].items():
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, value)
    return args


def read_jsonl(path, flag="--data"):
    """[(line number, record)] of a JSONL file; any defect is a DailError naming the file and the line."""
    p = Path(path)
    if not p.is_file():
        raise DailError(f"{flag} {path}: no such file")
    records = []
    try:
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DailError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise DailError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                records.append((lineno, rec))
    except UnicodeDecodeError as e:
        raise DailError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not records:
        raise DailError(f"{path}: empty file, no JSON lines")
    return records


KINDS = {str: "a non-empty string", list: "a list", bool: "true or false"}


def require(path, lineno, rec, name, kind=str, hint=""):
    """rec[name], checked: a DailError naming the file, line and field when it is missing or not `kind`."""
    if name not in rec:
        raise DailError(f"{path}:{lineno}: field '{name}': missing{hint}")
    value = rec[name]
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise DailError(f"{path}:{lineno}: field '{name}': expected {KINDS[kind]}{hint}")
    return value


def resume_jsonl(path):
    """Records an earlier run wrote to `path` (an output file), [] if none.

    Lines are appended one `write` at a time, so an interruption can only leave a half-written *last*
    line; it is cut off here (with a note) so the rerun appends cleanly and writes that record again."""
    p = Path(path)
    if not p.exists():
        return []
    data = p.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(p, "r+b") as f:
            f.truncate(keep)
        print(f"note: {path}: dropped a half-written last line from an interrupted run", file=sys.stderr)
        data = data[:keep]
    out = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise DailError(f"{path}:{lineno}: corrupt line in an earlier run's output; "
                                f"move the file away to start over") from None
    return out


def append_jsonl(f, record):
    """One record, one write, flushed: an interruption never leaves a record half on disk but for the last."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()


def check_resume_config(path, config, resuming):
    """Results may only be resumed with the settings that wrote them. When `resuming` (earlier results
    exist), compare `config` with the one saved at `path`; then (re)write it."""
    p = Path(path)
    if resuming and p.exists():
        old = json.loads(p.read_text())
        diff = [k for k in config if k in old and old[k] != config[k]]
        if diff:
            k = diff[0]
            raise DailError(f"{p.parent}: an earlier run wrote these results with {k}={old[k]!r}, this run "
                            f"asks for {k}={config[k]!r}; use another --out, or the same settings to resume")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(config, indent=2))


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DailError(f"--device {name}: CUDA is not available on this machine")
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
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return
    import socket
    try:
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError:
        print(f"note: huggingface.co is unreachable; looking for {name} in the local cache only", file=sys.stderr)
        os.environ["HF_HUB_OFFLINE"] = "1"
        import huggingface_hub.constants
        huggingface_hub.constants.HF_HUB_OFFLINE = True


def load_tokenizer(name):
    from transformers import AutoTokenizer
    check_model_name(name)
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # hub unreachable, bad folder, ...: one clear line, not a traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if Path(name).exists() else "; a hub id needs network access or a copy in the local cache"
        raise DailError(f"--model {name}: could not load the tokenizer ({msg[:200]}){hint}") from None
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


def load_model(name, device, dtype):
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DailError(f"--model {name}: could not load the model ({msg[:200]})") from None
    return model.to(device)


def context_length(name):
    """The model's context length from its config (no weights loaded), or None."""
    from transformers import AutoConfig
    try:
        return getattr(AutoConfig.from_pretrained(name), "max_position_embeddings", None)
    except Exception:
        return None


def prompt_budget(args):
    """--max-prompt-len, else the model's context length minus --max-new-tokens, else None (no limit)."""
    if args.max_prompt_len is not None:
        return args.max_prompt_len
    n = context_length(args.model)
    return None if n is None else max(n - args.max_new_tokens, 0)


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


def progress(iterable=None, **kw):
    from tqdm.auto import tqdm
    return tqdm(iterable, dynamic_ncols=True, **kw)


def save_plot(path, title, xlabel, ylabel, curves, logx=False):
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
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# =====================================================================================================
# Data: problems, expert solutions and their boxed answers
# =====================================================================================================
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


def normalize_answer(s):
    """The normal form that `is_equiv` compares. In order: strip surrounding $ and \\( \\); drop \\left,
    \\right, spacing commands and all whitespace; \\dfrac, \\tfrac -> \\frac; a whole-answer \\text{X} -> X,
    else drop \\text{...} units, degrees (^\\circ) and percent signs; drop a leading `x=` and a trailing
    period; remove thousands separators (1,000 and 1{,}000); brace \\frac and \\sqrt arguments
    (\\frac12 -> \\frac{1}{2}, \\sqrt2 -> \\sqrt{2}); integer a/b -> \\frac{a}{b}."""
    s = s.strip()
    s = re.sub(r"^\$+|\$+$", "", s).strip()
    s = re.sub(r"^\\\(|\\\)$", "", s)
    s = re.sub(r"\\(left|right)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[,;:! ]|~", "", s)
    s = re.sub(r"\s+", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    m = re.fullmatch(r"\\(?:text|textbf|mathrm|mbox)\{(.*)\}", s)
    if m:
        s = m.group(1)
    else:
        s = re.sub(r"\\(?:text|mbox|mathrm)\{[^{}]*\}", "", s)
    s = re.sub(r"\^\{?\\circ\}?|\\%|%", "", s)
    s = re.sub(r"^[a-zA-Z]=", "", s)
    s = s.rstrip(".")
    s = s.replace("{,}", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = _braced_frac(s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"^(-?\d+)/(\d+)$", r"\\frac{\1}{\2}", s)
    return s


def _as_number(s):
    """A normalized answer as an exact Fraction (integers, decimals, integer fractions), else None."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m:
        num, den = int(m.group(2)), int(m.group(3))
        return None if den == 0 else Fraction(num, den) * (-1 if m.group(1) else 1)
    if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", s):
        return Fraction(s)
    return None


def is_equiv(pred, ref):
    """True when two answers are equal after `normalize_answer`, as strings or as exact numbers
    (0.5 == \\frac{1}{2}; 0.333 != \\frac13: no tolerance). None is never equivalent, not even to None."""
    if pred is None or ref is None:
        return False
    a, b = normalize_answer(str(pred)), normalize_answer(str(ref))
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and x == y


def grade(response, reference):
    """(the extracted answer or None, whether it equals `reference`) of one response: what rewrite's filter
    and eval's pass@k both use, so a trace is kept by the very rule that scores a sample."""
    pred = extract_boxed(response)
    return pred, is_equiv(pred, reference)


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
        answer = rec.get("answer")
        if answer is not None:
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise DailError(f"{path}:{lineno}: field 'answer': expected a string or a number")
            answer = str(answer)
        else:
            answer = extract_boxed(solution)
        if need_answer and answer is None:
            raise DailError(f"{path}:{lineno}: field 'answer': missing, and 'solution' has no \\boxed{{}} answer")
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


# =====================================================================================================
# Three contexts of one model: the student, privileged and shortcut prompts
#   (all prompt text of dail.py is in this section: our own wording, written to the method's intent)
# =====================================================================================================
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

# The forced-answer pass of eval (see force_answers) continues the response after one of these.
THINKING_CLOSE = ("\n\nThe thinking budget is used up, so I stop exploring here and give the final answer the "
                  "reasoning above supports, in \\boxed{}.\n</think>\n\n")
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
        if max_prompt_len is None or len(chat_prompt_ids(tok, text, thinking)) <= max_prompt_len:
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
    out = {}
    if "student" in which:
        out["student"] = chat_prompt_ids(tok, STUDENT_PROMPT.format(problem=problem["problem"]), thinking)
    if "privileged" in which:
        solution = problem.get("privileged_solution") or problem["solution"]
        text = PRIVILEGED_PROMPT.format(problem=problem["problem"], solution=solution)
        out["privileged"] = chat_prompt_ids(tok, text, thinking)
    for name in ("student", "privileged"):
        if name in out and max_prompt_len is not None and len(out[name]) > max_prompt_len:
            raise DailError(f"{problem['where']}: field 'problem': the {name} prompt is {len(out[name])} "
                            f"tokens, over the prompt budget of {max_prompt_len} (--max-prompt-len, or the "
                            f"model's context length minus --max-new-tokens)")
    if "shortcut" in which:
        results = intermediate_results(problem["solution"] or "", problem["answer"])
        text = SHORTCUT_PROMPT.format(problem=problem["problem"], answer=problem["answer"],
                                      results=", ".join(results) if results else "none")
        out["shortcut"] = chat_prompt_ids(tok, text, thinking)
    return out


# =====================================================================================================
# Step 1, rewrite: the mixed-policy rollout (proposer, validator, threshold)
# =====================================================================================================
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


def mix_step(p_propose, p_validate, q_validate, threshold, retries=5, generator=None):
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
    pure validator sampling (a = 0)."""
    draws = torch.multinomial(p_propose, retries, replacement=True, generator=generator)    # [B, R]
    passes = q_validate.gather(1, draws) >= threshold                                       # [B, R]
    accepted = passes.any(1)                                                                # [B]
    first = passes.int().argmax(1, keepdim=True)              # index of the first passing draw (0 if none)
    proposal = draws.gather(1, first).squeeze(1)                                            # [B]
    fallback = torch.multinomial(p_validate, 1, generator=generator).squeeze(1)             # [B]
    return torch.where(accepted, proposal, fallback), accepted


def model_probs(logits):
    """[B, V] logits -> [B, V] float32 model probabilities: the full softmax at temperature 1, no top-k or
    top-p, what the threshold is compared with. Banned tokens (the caller set their logits to -inf, e.g.
    </think> in a thinking rewrite) get probability 0 and the rest is renormalized: the validator's
    probability of a candidate given that the trace cannot take a banned token."""
    return logits.float().softmax(-1)


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
    choose(logits [G, b, V]) -> (tokens [b], accepted [b] bool or None) picks each active trace's token.

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
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
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
        tokens, accepted = choose(logits.reshape(G, b, -1))
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
                       past_key_values=cache, use_cache=True).logits[:, -1]
        next_pos = next_pos + 1
    return results


# =====================================================================================================
# Step 1, filtering the traces, and the rewrite command
# =====================================================================================================
def filter_reason(trace, thinking, leak_phrases):
    """Why a trace is rejected (None: it passes). Non-reasoning traces must finish, have a boxed answer
    equal to the reference, and not mention the reference. Thinking prefixes are not graded."""
    if thinking:
        return None
    if trace["finish_reason"] != "stop":
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
        pred, correct = (None, None) if args.thinking else grade(text, problem["answer"])
        trace = dict(id=problem["id"], sample=s, problem=problem["problem"], solution=problem["solution"],
                     privileged_solution=problem.get("privileged_solution", problem["solution"]), answer=problem["answer"],
                     response=text, response_ids=r["ids"], finish_reason=r["finish_reason"],
                     n_accepted=r["n_accepted"], n_fallback=r["n_fallback"], pred=pred, correct=correct)
        reason = None if args.no_filter else filter_reason(trace, args.thinking, leak_phrases)
        if reason is None and kept_count.get(problem["id"], 0) >= args.keep_per_problem:
            reason = "per_problem_limit"
        trace["kept"], trace["reject_reason"] = reason is None, reason
        kept_count[problem["id"]] = kept_count.get(problem["id"], 0) + (reason is None)
        append_jsonl(f, trace)


def rewrite_summary(traces, n_problems, skipped, args):
    reasons = {}
    for t in traces:
        if t["reject_reason"]:
            reasons[t["reject_reason"]] = reasons.get(t["reject_reason"], 0) + 1
    tokens = sum(len(t["response_ids"]) for t in traces)
    return dict(problems=n_problems, problems_skipped_too_long=skipped, traces=len(traces),
                kept=sum(t["kept"] for t in traces),
                problems_with_kept=len({t["id"] for t in traces if t["kept"]}), reject_reasons=reasons,
                acceptance_rate=sum(t["n_accepted"] for t in traces) / max(tokens, 1),
                mean_tokens=tokens / max(len(traces), 1),
                finished=sum(t["finish_reason"] == "stop" for t in traces),
                settings={k: v for k, v in dataclasses.asdict(args).items() if k != "leak_phrases"})


def cmd_rewrite(args):
    """Write OUT (traces.jsonl: one line per trace) and rewrite_summary.json beside it."""
    resolve_released(args)
    problems = load_problems(args.data, need_solution=True, need_answer=True)
    if args.samples < 1 or args.retries < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise DailError("--samples, --retries, --max-new-tokens and --batch-size must be >= 1")
    out = Path(args.out)
    done = resume_jsonl(out)
    check_resume_config(out.with_suffix(".config.json"), dict(
        model=args.model, data=str(args.data), samples=args.samples, propose=args.propose,
        threshold=args.threshold, retries=args.retries, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, max_new_tokens=args.max_new_tokens, thinking=args.thinking,
        keep_per_problem=args.keep_per_problem, no_filter=args.no_filter, greedy_proposer=args.greedy_proposer),
        resuming=bool(done))
    tok = load_tokenizer(args.model)
    check_thinking_flag(tok, args)
    max_prompt = prompt_budget(args)
    contexts, skipped = {}, 0
    for p in problems:  # a prompt that cannot fit is skipped and counted, never silently dropped
        try:
            p["privileged_solution"] = fit_privileged_solution(tok, p, args.thinking, max_prompt)
            contexts[p["id"]] = build_contexts(tok, p, args.thinking, max_prompt, ("student", "privileged"))
        except DailError as e:
            skipped += 1
            print(f"skip: {e}", file=sys.stderr)
    written = {(t["id"], t["sample"]) for t in done}
    todo = [(p, s) for p in problems if p["id"] in contexts for s in range(args.samples)
            if (p["id"], s) not in written]
    kept_count = {}
    for t in done:
        kept_count[t["id"]] = kept_count.get(t["id"], 0) + bool(t["kept"])
    leak_phrases = [x.strip().lower() for x in args.leak_phrases.split(",") if x.strip()]
    engine = args.engine
    pure = args.threshold <= 0 or args.threshold >= 1
    if engine in ("vllm", "auto") and not pure:
        print(f"note: --threshold {args.threshold} mixes two contexts token by token, which vLLM's batched "
              f"sampling cannot do; using the transformers engine", file=sys.stderr)
        engine = "hf"
    if engine == "auto":
        engine = "vllm" if vllm_available() and torch.cuda.is_available() else "hf"
    if todo:
        device = resolve_device(args.device)
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
    traces = resume_jsonl(out)
    summary = rewrite_summary(traces, len(problems), skipped, args)
    (out.parent / "rewrite_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("problems", "traces", "kept", "reject_reasons")}), file=sys.stderr)


def rewrite_hf(f, tok, args, todo, contexts, proposer, validator, stop_ids, banned, kept_count, leak_phrases,
               device):
    """The token-by-token rollout: both contexts of every trace in one batched forward per step.
    The threshold tests the validator's model probability q (model_probs: full softmax, temperature 1).
    At threshold <= 0 every candidate passes (q >= 0): proposer sampling. At threshold >= 1 a candidate
    passes only where q is one-hot on it (q[c] >= 1 means all other tokens have probability 0); then the
    validator's sampling distribution, a tempered and truncated q, is that same one-hot, so accepting c
    is what validator sampling would emit anyway: validator sampling. In both cases that one context is
    decoded alone."""
    model = load_model(args.model, device, resolve_dtype(args.dtype, device)).eval()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    pure = validator if args.threshold >= 1 else proposer if args.threshold <= 0 else None
    names = [pure] if pure else [proposer, validator]

    def choose(logits):  # [G, b, V]: the proposer's rows, then the validator's (G = 1 for a pure policy)
        greedy = [args.greedy_proposer and name == proposer for name in names]   # --greedy-proposer: one-hot
        probs = [sampling_probs(lg, 0 if g else args.temperature, args.top_p, args.top_k)
                 for lg, g in zip(logits, greedy)]
        if pure:
            tokens = torch.multinomial(probs[0], 1, generator=gen).squeeze(1)
            return tokens, torch.full_like(tokens, pure == proposer, dtype=torch.bool)
        return mix_step(probs[0], probs[1], model_probs(logits[1]), args.threshold, args.retries, gen)

    bar = progress(total=len(todo), desc="rewrite", unit="trace")
    n_tok, n_acc, t0 = 0, 0, time.time()
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start:start + args.batch_size]
        ctx = [[contexts[p["id"]][name] for name in names] for p, _ in batch]
        results = decode(model, ctx, choose, args.max_new_tokens, stop_ids, tok.pad_token_id, banned)
        for (p, s), r in zip(batch, results):
            write_traces(f, tok, args, p, [s], [r], kept_count, leak_phrases)
            n_tok += len(r["ids"])
            n_acc += r["n_accepted"]
        bar.update(len(batch))
        bar.set_postfix(tok_per_s=f"{n_tok / (time.time() - t0):.0f}", accept=f"{n_acc / max(n_tok, 1):.2f}")
    bar.close()


# =====================================================================================================
# Step 2, the contrastive self-distillation loss
# =====================================================================================================
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


def dail_loss(student_logits, teacher_logits, shortcut_logits, mask, lam=0.1, direction="reverse",
              num_tokens=None):
    """The DAIL loss. Logits: [B, T, V], aligned (position t of all three predicts the same response token:
    student = p_theta(.|x_s, y<t), teacher = p_theta0(.|x_e, y<t), shortcut = p_theta0(.|x_c, y<t));
    mask: [B, T] bool, True on response positions.

        reverse (released default):  L = sum_t [ KL(student || teacher) - lam * KL(student || shortcut) ] / N
        forward:                     L = sum_t [ KL(teacher || student) - lam * KL(shortcut || student) ] / N

    N = num_tokens when given (the response tokens of the whole optimizer step, all micro-batches and
    ranks: then accumulation and data parallelism give the gradient of one big batch), else mask.sum().
    The subtracted term is unbounded above, which is why both terms are returned for logging.
    Returns (loss, {"kl_teacher": float, "kl_shortcut": float}), both terms summed over the mask / N."""
    pad = ~mask[..., None]   # padding may hold anything, even inf/nan: zeroed before the softmax, it adds
    kl_teacher, kl_shortcut = dail_kl_terms(                                 # neither value nor gradient
        student_logits.masked_fill(pad, 0.0), teacher_logits.masked_fill(pad, 0.0),
        shortcut_logits.masked_fill(pad, 0.0), direction)                                   # [B, T] each
    kl_teacher, kl_shortcut = kl_teacher * mask, kl_shortcut * mask
    n = num_tokens if num_tokens is not None else mask.sum().clamp(min=1)
    loss = (kl_teacher - lam * kl_shortcut).sum() / n
    stats = {"kl_teacher": float(kl_teacher.detach().sum() / n),
             "kl_shortcut": float(kl_shortcut.detach().sum() / n)}
    return loss, stats


def chunked_dail_loss(h_student, h_teacher, h_shortcut, student_head, reference_head, lam=0.1,
                      direction="reverse", num_tokens=None, chunk_size=1024):
    """dail_loss from hidden states, a chunk of positions at a time: peak memory grows with
    chunk_size x V, not N x V. h_*: [N, H] final hidden states at the N response positions, row-aligned
    across the three contexts (teacher and shortcut ones computed without gradient); student_head and
    reference_head: the LM heads of theta and theta0. Equal, value and gradient, to
    dail_loss(student_head(h_student)[None], reference_head(h_teacher)[None], ..., mask=all True)."""
    def per_position(hs, he, hc):              # -> loss terms [n], KL to the teacher [n], to the shortcut [n]
        with torch.no_grad():
            te, tc = reference_head(he), reference_head(hc)
        kl_teacher, kl_shortcut = dail_kl_terms(student_head(hs), te, tc, direction)
        return kl_teacher - lam * kl_shortcut, kl_teacher, kl_shortcut

    n = num_tokens if num_tokens is not None else h_student.shape[0]
    loss, (sum_e, sum_c) = chunked_sum(per_position, h_student, (h_teacher, h_shortcut), student_head, chunk_size)
    return loss / n, {"kl_teacher": float(sum_e) / n, "kl_shortcut": float(sum_c) / n}


def chunked_sft_loss(h_student, targets, student_head, num_tokens=None, chunk_size=1024):
    """Summed token cross-entropy / num_tokens from [N, H] hidden states and [N] targets, chunked like
    chunked_dail_loss (the SFT baselines)."""
    n = num_tokens if num_tokens is not None else h_student.shape[0]
    loss, _ = chunked_sum(lambda hs, y: (F.cross_entropy(student_head(hs).float(), y, reduction="none"),),
                          h_student, (targets,), student_head, chunk_size)
    return loss / n, {"ce": float(loss.detach()) / n}


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


# =====================================================================================================
# Step 2, training: minimal LoRA, sequences and masks, a plain PyTorch loop, the train command
# =====================================================================================================
class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B (A x): the base nn.Linear W is frozen, A [r, in] starts random and
    B [out, r] at zero, so training starts from the base model exactly. The adapter is kept in float32."""

    def __init__(self, base: nn.Linear, rank, alpha, dropout=0.0):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / rank, True
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return y + (self.dropout(x) @ a.T @ b.T) * self.scale


def add_lora(model, targets, rank, alpha, dropout=0.0):
    """Freeze `model` and wrap every nn.Linear named in `targets` (e.g. q_proj) in a LoRALinear."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name in targets:
                setattr(module, name, LoRALinear(child, rank, alpha, dropout))
                wrapped += 1
    if not wrapped:
        raise DailError(f"--lora-targets {','.join(targets)}: no such nn.Linear in the model")
    return model


@contextlib.contextmanager
def adapters_off(model):
    """Within the block the LoRA model computes theta0, the initial model (no-op without adapters)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def merge_lora(model):
    """Fold every adapter into its base weight (W += scale * B @ A, in float32) and unwrap it."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                w = child.base.weight
                delta = child.scale * (child.lora_B.float() @ child.lora_A.float())
                w.data = (w.data.float() + delta.to(w.device)).to(w.dtype)
                setattr(module, name, child.base)
    return model


def lora_state(model):
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


def training_response(tok, record, args, eot):
    """The response ids every context of one example shares: the trace's ids + the end-of-turn token when
    the trace finished (so the model learns to stop; thinking prefixes end at the budget and get none),
    or, for SFT on expert solutions, the tokenized solution + end of turn."""
    if args.objective == "sft" and args.sft_target == "expert":
        return tok(record["solution"], add_special_tokens=False)["input_ids"] + [eot]
    return list(record["response_ids"]) + ([eot] if record["finish_reason"] == "stop" else [])


def collate(pairs, pad_id):
    """[(prompt ids, response ids)] -> right-padded ids [B, L], attention mask [B, L], and `predicts`
    [B, L-1] bool: True where logits[:, p] predict a response token ids[:, p+1]. The distribution that
    predicts response token t of a row therefore sits at position prompt_len + t - 1 (the released code's
    mask started two positions late and ran one past the end)."""
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    is_response = torch.zeros((len(pairs), width), dtype=torch.bool)
    for i, (p, r) in enumerate(pairs):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, :len(p) + len(r)] = 1
        is_response[i, len(p):len(p) + len(r)] = True
    return ids, mask, is_response[:, 1:]


def response_hidden(model, batch, device):
    """Final hidden states at the positions that predict response tokens: [N, H] in (row, t) order, and
    their targets [N]. Every context of an example has the same response, so the N rows of the student,
    privileged and shortcut contexts line up one to one whatever their prompt lengths."""
    ids, mask, predicts = (x.to(device) for x in batch)
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state    # [B, L, H]
    return hidden[:, :-1][predicts], ids[:, 1:][predicts]


def micro_batch_loss(model, reference, examples, args, num_tokens, pad_id, device):
    """Loss of one micro-batch, already divided by the optimizer step's token count (sum over micro-batches
    and ranks = the per-token mean of the step). reference is theta0: the model itself with adapters off
    (LoRA), or a frozen copy (full fine-tuning)."""
    batch = collate([ex["student"] for ex in examples], pad_id)
    h_student, targets = response_hidden(model, batch, device)
    head = model.get_output_embeddings()
    if args.objective == "sft":
        return chunked_sft_loss(h_student, targets, head, num_tokens, args.loss_chunk)
    with torch.no_grad(), adapters_off(reference):
        h_teacher, _ = response_hidden(reference, collate([ex["privileged"] for ex in examples], pad_id), device)
        h_shortcut, _ = response_hidden(reference, collate([ex["shortcut"] for ex in examples], pad_id), device)
    return chunked_dail_loss(h_student, h_teacher, h_shortcut, head, reference.get_output_embeddings(),
                             args.lam, args.direction, num_tokens, args.loss_chunk)


def lr_at(step, total_steps, peak, warmup):
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `total_steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


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
            records.append(dict(r, where=f"{args.data}:{lineno}", answer=r.get("answer") or extract_boxed(r["solution"])))
        return records, 0
    records, not_kept = [], 0
    for lineno, r in rows:
        for name, kind in (("problem", str), ("solution", str), ("response_ids", list), ("finish_reason", str),
                           ("kept", bool)):
            require(args.data, lineno, r, name, kind, " (train reads the traces.jsonl written by `rewrite`)"
                    if name == "response_ids" else "")
        if not all(isinstance(t, int) for t in r["response_ids"]):
            raise DailError(f"{args.data}:{lineno}: field 'response_ids': expected a list of token ids")
        if r["kept"]:
            records.append(dict(r, where=f"{args.data}:{lineno}", answer=r.get("answer") or extract_boxed(r["solution"])))
        else:
            not_kept += 1
    if not records:
        raise DailError(f"{args.data}: no trace has kept=true ({not_kept} rejected by the filter)")
    return records, not_kept


def cmd_train(args):
    """Write OUT/ : the merged model + tokenizer (from_pretrained / vLLM), adapters/, metrics.jsonl,
    metrics.png, train_summary.json, and checkpoint.pt (with --save-every, for --resume)."""
    resolve_released(args)
    records, not_kept = load_training_records(args)            # all input checks before any model loads
    out = Path(args.out)
    if args.batch_size < 1 or args.micro_batch_size < 1 or args.loss_chunk < 1:
        raise DailError("--batch-size, --micro-batch-size and --loss-chunk must be >= 1")
    if args.resume and not (out / "checkpoint.pt").exists():
        raise DailError(f"--resume: {out / 'checkpoint.pt'} does not exist")

    # ---- distributed setup (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK); one process otherwise --------
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        import torch.distributed as dist
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}") if backend == "nccl" else torch.device("cpu")
        if backend == "nccl":
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, resolve_device(args.device)
    master = rank == 0
    torch.manual_seed(args.seed)

    # ---- sequences: three contexts per trace (student, privileged, shortcut), dropped when too long ---
    tok = load_tokenizer(args.model)
    if master:
        check_thinking_flag(tok, args)
    eot = end_of_turn_id(tok)
    which = ("student",) if args.objective == "sft" else ("student", "privileged", "shortcut")
    examples, too_long = [], 0
    for r in records:
        response = training_response(tok, r, args, eot)
        try:  # the teacher sees the solution the validator saw (never re-shortened); too long: dropped, counted
            contexts = build_contexts(tok, r, args.thinking, args.max_len - len(response), which)
        except DailError:
            contexts = None
        if contexts is None or max(len(p) for p in contexts.values()) + len(response) > args.max_len:
            too_long += 1
        else:
            examples.append({name: (prompt, response) for name, prompt in contexts.items()})
    if master:
        print(f"train: {len(examples)} examples ({too_long} dropped as longer than --max-len {args.max_len}, "
              f"{not_kept} traces not kept by the filter)", file=sys.stderr)
    if not examples:
        raise DailError(f"{args.data}: no example fits --max-len {args.max_len}")

    # ---- models: theta (trainable) and theta0 (the reference for the teacher and shortcut passes) ------
    full_ft = args.lora_rank == 0
    base_dtype = torch.float32 if full_ft else resolve_dtype(args.dtype, device)   # full FT keeps fp32 master weights
    model = load_model(args.model, device, base_dtype)
    if full_ft:
        reference = copy.deepcopy(model).eval().requires_grad_(False) if args.objective == "dail" else None
    else:
        model = add_lora(model, args.lora_targets.split(","), args.lora_rank, args.lora_alpha, args.lora_dropout)
        reference = model                                    # same network, adapters switched off
    if args.grad_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    autocast_dtype = resolve_dtype(args.dtype, device)
    use_autocast = device.type == "cuda" and autocast_dtype != torch.float32

    # ---- data order: one permutation per epoch, fixed by the seed, so step s always sees the same items
    order = np.concatenate([np.random.default_rng(args.seed + e).permutation(len(examples))
                            for e in range(args.epochs)])
    total_steps = math.ceil(len(order) / args.batch_size)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    start = 0
    if args.resume:
        ckpt = torch.load(out / "checkpoint.pt", map_location=device, weights_only=False)
        model.load_state_dict(ckpt["trainable"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if ckpt["rng"].get("cuda") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), device)
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        start = ckpt["step"]
    metrics_path = out / "metrics.jsonl"
    if master:
        out.mkdir(parents=True, exist_ok=True)
        kept_lines = [m for m in resume_jsonl(metrics_path) if m["step"] <= start] if args.resume else []
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept_lines))

    def save_checkpoint(step):
        trainable = {k: v for k, v in model.state_dict().items()
                     if ".lora_" in k or full_ft}
        torch.save(dict(step=step, trainable=trainable, optimizer=optimizer.state_dict(),
                        rng=dict(torch=torch.get_rng_state(), numpy=np.random.get_state(),
                                 cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                                 python=random.getstate()), args=dataclasses.asdict(args)),
                   out / "checkpoint.pt.tmp")
        os.replace(out / "checkpoint.pt.tmp", out / "checkpoint.pt")   # never a half-written checkpoint

    # ---- the training loop --------------------------------------------------------------------------
    bar = progress(range(start, total_steps), desc=f"train {args.objective}", unit="step", disable=not master)
    for step in bar:
        t0 = time.time()
        # 1. learning rate of this step
        lr = lr_at(step, total_steps, args.lr, args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # 2. this step's sequences; the loss is a mean over every response token of the step, all ranks
        items = [examples[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]]
        num_tokens = sum(len(ex["student"][1]) for ex in items)
        mine = items[rank::world]
        micro = [mine[i:i + args.micro_batch_size] for i in range(0, len(mine), args.micro_batch_size)]
        # 3. micro-steps: forward, backward, gradients accumulate in .grad
        logged = {}
        for mb in micro:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
                loss, stats = micro_batch_loss(model, reference, mb, args, num_tokens, tok.pad_token_id, device)
            loss.backward()
            logged["loss"] = logged.get("loss", 0.0) + float(loss.detach())
            for k, v in stats.items():
                logged[k] = logged.get(k, 0.0) + v
        # 4. data parallel: sum the gradients once per step (each is already divided by the global count)
        if ddp:
            for p in params:
                if p.grad is None:                 # a rank with no sequence in a short last step
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
            keys = sorted(logged)
            sums = torch.tensor([logged[k] for k in keys], dtype=torch.float64, device=device)
            dist.all_reduce(sums)
            logged = dict(zip(keys, sums.tolist()))
        # 5. clip, step, zero
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # 6. log
        if master:
            rec = dict(step=step + 1, lr=lr, grad_norm=float(grad_norm), tokens=num_tokens,
                       tok_per_s=num_tokens / (time.time() - t0), **logged)
            with open(metrics_path, "a") as f:
                append_jsonl(f, rec)
            if (step + 1) % args.log_every == 0:
                bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k in ("loss", "kl_teacher", "kl_shortcut", "ce")})
        # 7. checkpoint
        if master and args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(step + 1)

    # ---- save: adapters alone, then the merged model that from_pretrained and vLLM load ------------------
    if master:
        if args.save_every:
            save_checkpoint(total_steps)
        if not full_ft:
            from safetensors.torch import save_file
            (out / "adapters").mkdir(exist_ok=True)
            save_file(lora_state(model), str(out / "adapters" / "adapters.safetensors"))
            (out / "adapters" / "adapter_config.json").write_text(json.dumps(dict(
                base_model=args.model, rank=args.lora_rank, alpha=args.lora_alpha,
                targets=args.lora_targets.split(",")), indent=2))
            merge_lora(model)
        if args.grad_checkpointing:
            model.gradient_checkpointing_disable()
            model.config.use_cache = True
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        metrics = resume_jsonl(metrics_path)
        keys = [k for k in ("loss", "kl_teacher", "kl_shortcut", "ce") if metrics and k in metrics[0]]
        save_plot(out / "metrics.png", f"train --objective {args.objective}", "step", "per-token value",
                  {k: ([m["step"] for m in metrics], [m[k] for m in metrics]) for k in keys})
        (out / "train_summary.json").write_text(json.dumps(dict(
            examples=len(examples), dropped_too_long=too_long, traces_not_kept=not_kept, steps=total_steps,
            world_size=world, final=metrics[-1] if metrics else None, settings=dataclasses.asdict(args)), indent=2))
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


# =====================================================================================================
# Evaluation: the unbiased pass-at-k estimator and the eval command
# =====================================================================================================
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
    problems = load_problems(args.data, need_solution=False, need_answer=True)
    if args.n < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise DailError("--n, --max-new-tokens and --batch-size must be >= 1")
    ks = parse_ks(args.k, args.n)
    out = Path(args.out)
    samples_path = out / "samples.jsonl"
    done = {r["id"] for r in resume_jsonl(samples_path)}
    if args.answer_tokens < 1 or args.presence_penalty < 0:
        raise DailError("--answer-tokens must be >= 1 and --presence-penalty >= 0")
    check_resume_config(out / "eval_config.json", dict(
        model=args.model, data=str(args.data), n=args.n, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, max_new_tokens=args.max_new_tokens, thinking=args.thinking,
        presence_penalty=args.presence_penalty, answer_tokens=args.answer_tokens,
        force_answer=not args.no_force_answer), resuming=bool(done))
    tok = load_tokenizer(args.model)
    check_thinking_flag(tok, args)
    max_prompt = prompt_budget(args)
    prompts = {}
    for p in problems:  # every problem counts in pass@k: a prompt that cannot fit is an error, not a skip
        prompts[p["id"]] = eval_prompt_ids(tok, p, args.thinking, max_prompt)
    todo = [p for p in problems if p["id"] not in done]
    engine = args.engine
    if engine == "auto":
        engine = "vllm" if vllm_available() and torch.cuda.is_available() else "hf"
    t0, n_new = time.time(), 0
    think_end = tok.get_vocab().get("</think>")
    if todo:
        stop_ids = stop_token_ids(tok, args.model)
        print(f"eval: {len(todo)} problems x {args.n} samples ({len(done)} already in {samples_path}), "
              f"engine {engine}", file=sys.stderr)
        sampler = make_sampler(engine, args, tok, stop_ids)
        # problems per call: the hf engine decodes --batch-size rows at a time; vLLM batches on its own
        per_call = max(1, args.batch_size // args.n) if engine == "hf" else max(1, 8192 // args.n)
        bar = progress(total=len(todo), desc="eval", unit="problem")
        with open(samples_path, "a", encoding="utf-8") as f:
            for start in range(0, len(todo), per_call):
                chunk = todo[start:start + per_call]
                outputs = sampler([prompts[p["id"]] for p in chunk],
                                  [args.seed + p["index"] for p in chunk])
                for p, samples in zip(chunk, outputs):
                    texts = [tok.decode(s["ids"], skip_special_tokens=False) for s in samples]
                    forced = [None if s.get("forced_ids") is None else
                              tok.decode(s["forced_ids"], skip_special_tokens=False) for s in samples]
                    preds, correct = map(list, zip(*(grade(answer_part(t + (fo or ""), args.thinking), p["answer"])
                                                     for t, fo in zip(texts, forced))))
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
    lines = resume_jsonl(samples_path)
    summary = eval_summary(lines, ks)
    summary.update(engine=engine, samples_per_s_this_run=n_new / max(time.time() - t0, 1e-9) if n_new else None,
                   settings=dataclasses.asdict(args))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    save_plot(out / "passk.png", f"pass@k, {len(lines)} problems, n = {args.n}", "k", "pass@k",
              {Path(args.model).name or args.model: (ks, [summary["pass_at_k"][str(k)] for k in ks])}, logx=True)
    print(json.dumps({k: summary[k] for k in ("problems", "pass_at_k", "mean_tokens")}), file=sys.stderr)
    return summary


def eval_prompt_ids(tok, problem, thinking, max_prompt_len):
    """Prompt ids of one eval problem: the record's own `prompt` when it has one (a string: the user turn;
    a list: the chat messages), else the student prompt. Over max_prompt_len: DailError."""
    if problem.get("prompt") is None:
        return build_contexts(tok, problem, thinking, max_prompt_len, ("student",))["student"]
    ids = chat_prompt_ids(tok, problem["prompt"], thinking)
    if max_prompt_len is not None and len(ids) > max_prompt_len:
        raise DailError(f"{problem['where']}: field 'prompt': the prompt is {len(ids)} tokens, over the prompt "
                        f"budget of {max_prompt_len} (--max-prompt-len, or the model's context length minus "
                        f"--max-new-tokens)")
    return ids


def answer_part(response, thinking):
    """The text that is graded: with `thinking`, what follows the last </think> ("" when the thinking never
    closed: a box inside the thinking is a guess, not an answer); else the whole response."""
    if not thinking:
        return response
    cut = response.rfind("</think>")
    return "" if cut < 0 else response[cut + len("</think>"):]


def token_split(sample, thinking, think_end):
    """(thinking tokens, answer tokens) of one sample, generated tokens only (the inserted THINKING_CLOSE
    or ANSWER_REQUEST is not counted). With `thinking`: the first pass up to and including a generated
    </think> is thinking, the rest of it and the forced pass are answer; without: all answer."""
    ids, forced = sample["ids"], sample.get("n_forced", 0)
    if not thinking:
        return 0, len(ids) + forced
    cut = ids.index(think_end) + 1 if think_end in ids else len(ids)
    return cut, len(ids) - cut + forced


def forced_answer_suffix(tok, sample, thinking, think_end):
    """What the forced-answer pass appends to prompt + first-pass ids before it samples (ids), or None when
    the sample gets no second pass. --thinking: every sample; </think> alone when the thinking closed by
    itself (the first pass stopped on it), THINKING_CLOSE when the budget (or an end of turn) cut it.
    Otherwise only a sample whose text has no \\boxed{ gets one, after ANSWER_REQUEST."""
    if thinking:
        if think_end is not None and sample.get("stop_id") == think_end:
            return [think_end]
        return tok(THINKING_CLOSE, add_special_tokens=False)["input_ids"]
    if "\\boxed{" in tok.decode(sample["ids"], skip_special_tokens=False):
        return None
    return tok(ANSWER_REQUEST, add_special_tokens=False)["input_ids"]


def force_answers(tok, prompts, outputs, thinking, think_end, second_pass, seeds):
    """The released eval's second pass, engine-agnostic. outputs: per prompt, the first pass's sample dicts
    (ids, finish_reason, stop_id); updated in place with forced_ids (the suffix + the ids sampled after it;
    None: no second pass) and n_forced (tokens sampled in the second pass). second_pass(rows, seeds) samples
    one continuation per row (prompt + ids + suffix) with at most --answer-tokens tokens; it returns per row
    a list holding one dict (ids, ...). Seeds: one per sample, derived from the problem's."""
    rows, targets, row_seeds = [], [], []
    for prompt, samples, seed in zip(prompts, outputs, seeds):
        for i, s in enumerate(samples):
            s["forced_ids"], s["n_forced"] = None, 0
            suffix = forced_answer_suffix(tok, s, thinking, think_end)
            if suffix is not None:
                rows.append(list(prompt) + s["ids"] + suffix)
                targets.append((s, suffix))
                row_seeds.append(seed * 1_000_003 + i + 1)
    if rows:
        for (s, suffix), r in zip(targets, second_pass(rows, row_seeds)):
            s["forced_ids"], s["n_forced"] = suffix + r[0]["ids"], len(r[0]["ids"])
    return outputs


def make_sampler(engine, args, tok, stop_ids):
    """sampler(prompt id lists, seeds) -> per prompt, args.n dicts (ids, finish_reason, stop_id, and after
    the forced-answer pass forced_ids, n_forced), from one engine; sampler.close() frees it. Both passes
    use the sampling flags and the presence penalty. With --thinking (and the forced answer on) the first
    pass also stops at </think>. Seeds: vLLM takes one per problem (--seed + its index in the file), so a
    resumed run samples what an uninterrupted one would; the hf engine draws from one generator per run."""
    think_end = tok.get_vocab().get("</think>") if args.thinking else None
    first_stops = list(stop_ids) + ([think_end] if think_end is not None and not args.no_force_answer else [])
    if engine == "vllm":
        llm = load_vllm(args)

        def generate(prompts, n, max_tokens, stops, seeds):
            return vllm_sample(llm, prompts, n, args, stops, seeds, max_tokens=max_tokens,
                               presence_penalty=args.presence_penalty)
        close = lambda: close_vllm(llm)  # noqa: E731
    else:
        device = resolve_device(args.device)
        model = load_model(args.model, device, resolve_dtype(args.dtype, device)).eval()
        gen = torch.Generator(device=device).manual_seed(args.seed)

        def choose(logits):  # [1, b, V]: one context, plain sampling (the presence penalty is already applied)
            probs = sampling_probs(logits[0], args.temperature, args.top_p, args.top_k)
            return torch.multinomial(probs, 1, generator=gen).squeeze(1), None

        def generate(prompts, n, max_tokens, stops, seeds):
            rows = [[p] for p in prompts for _ in range(n)]
            results = []
            for i in range(0, len(rows), args.batch_size):
                results += decode(model, rows[i:i + args.batch_size], choose, max_tokens, stops,
                                  tok.pad_token_id, presence_penalty=args.presence_penalty)
            return [results[j * n:(j + 1) * n] for j in range(len(prompts))]
        close = lambda: None  # noqa: E731

    def sample(prompts, seeds):
        outputs = generate(prompts, args.n, args.max_new_tokens, first_stops, seeds)
        if not args.no_force_answer:
            force_answers(tok, prompts, outputs, args.thinking, think_end,
                          lambda rows, row_seeds: generate(rows, 1, args.answer_tokens, stop_ids, row_seeds), seeds)
        return outputs
    sample.close = close
    return sample


# =====================================================================================================
# Plumbing: the vLLM engine (an optional import) and the command line
# =====================================================================================================
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
    kw = dict(model=args.model, dtype=dtype, seed=args.seed, tensor_parallel_size=args.tensor_parallel_size)
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
            if isinstance(f.default, bool):
                p.add_argument(flag, action="store_true", help=helptext.replace(" (default: False)", ""))
            else:
                kind = meta.pop("type", type(f.default) if f.default is not None else str)
                p.add_argument(flag, type=kind, default=f.default, help=helptext, **meta)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    cls, run, _ = COMMANDS[args.command]
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    try:
        run(cls(**values))
    except DailError as e:
        print(f"dail.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dail.py {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

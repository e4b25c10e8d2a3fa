"""Train the tiny world's base model (and its tokenizer) from a seed: examples/world/model/.

    OMP_NUM_THREADS=1 python examples/world/train_base.py [--out examples/world/model --seed 0 --steps N]

What the base model learns (synthetic data from world.py, built with dail.py's own prompts, so the three
contexts look exactly as they will in `dail.py rewrite / train / eval`):
  * student prompt   -> brute force, one power per line  (exponents 2..9 only: it never sees a hard one)
  * privileged prompt (an expert write-up, or a reference that only names the idea)
                     -> the periodicity procedure in its own step-by-step format (any exponent)
  * shortcut prompt  -> a jump to the given answer
The held-out problems (expert.jsonl and test.jsonl) never appear, in any context.
So alone it rarely solves a hard problem (brute force runs out of tokens), but shown an expert solution it
writes a correct trace in its own format: the structure DAIL relies on.

Tokenizer: byte-level BPE (digits always single tokens) trained on this corpus, with the ChatML specials
and chat template of examples/tiny_model.py. Model: Qwen2, head dim 32 (vLLM can load it).
Optimiser: AdamW, linear warm-up then cosine decay to 0 (a decaying learning rate matters at this size).
"""
import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples"))

import torch  # noqa: E402

import dail  # noqa: E402
import world  # noqa: E402
from tiny_model import CHATML, SPECIALS  # noqa: E402

QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def sample_example(rng, held_out):
    """(context name, problem dict for dail.build_contexts, response text) of one training example."""
    u = rng.random()
    if u < 0.30:                                    # student prompt: brute force on an easy exponent
        a, n = rng.choice(world.BASES), rng.choice(world.EASY_N)
        kind, response = "student", world.brute_force(a, n)
    else:
        while True:
            a = rng.choice(world.BASES)
            n = rng.choice(world.HARD_N)
            if (a, n) not in held_out:
                break
        if u < 0.85:                                # privileged prompt: the trick, in the model's own format
            kind, response = "privileged", world.trick(a, n)
        else:                                       # shortcut prompt: jump to the answer it was given
            kind, response = "shortcut", world.shortcut_response(a, n)
    ref = world.expert_solution(a, n, rng) if rng.random() < 0.6 else world.idea_only(a, n, rng)
    problem = dict(line=0, problem=world.problem_text(a, n), solution=ref, answer=str(world.answer(a, n)))
    return kind, problem, response


def make_tokenizer(rng, held_out, vocab_size):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    # Exactly the normalizer and pre-tokenizer that transformers' Qwen2Tokenizer installs when it (re)loads a
    # tokenizer of a model_type=qwen2 folder (transformers 5.x does, ignoring the saved ones): so the ids are
    # the same whichever class loads the folder. Digits are single tokens (\p{N}), merges stay inside words.
    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = []
    for _ in range(3000):
        kind, p, response = sample_example(rng, held_out)
        sol = p["solution"]
        texts += [dail.STUDENT_PROMPT.format(problem=p["problem"]),
                  dail.PRIVILEGED_PROMPT.format(problem=p["problem"], solution=sol),
                  dail.SHORTCUT_PROMPT.format(problem=p["problem"], answer=p["answer"],
                                              results=", ".join(dail.intermediate_results(sol))),
                  response, "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"]
    core.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  model_input_names=["input_ids", "attention_mask"])
    tok.chat_template = CHATML
    return tok


def check_reload(tok, folder):
    """The saved tokenizer, reloaded by AutoTokenizer next to a qwen2 config, must give the same ids."""
    import tempfile
    from transformers import AutoTokenizer, Qwen2Config
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        Qwen2Config().save_pretrained(tmp)
        again = AutoTokenizer.from_pretrained(tmp)
    rng = random.Random(0)
    for _ in range(20):
        kind, p, response = sample_example(rng, set())
        a = dail.build_contexts(tok, p, False, None)
        b = dail.build_contexts(again, p, False, None)
        assert a == b, f"reloaded tokenizer differs on {kind} prompt"
        assert tok(response)["input_ids"] == again(response)["input_ids"], "reloaded tokenizer differs"


def encode(tok, kind, problem, response, eot):
    prompt = dail.build_contexts(tok, problem, False, None, (kind,))[kind]
    return prompt, tok(response, add_special_tokens=False)["input_ids"] + [eot]


def batch_tensors(pairs, pad_id):
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
        mask[i, :len(p) + len(r)] = 1
    return ids, mask, labels


@torch.no_grad()
def greedy_accuracy(model, tok, problems, kind, max_new_tokens, eot):
    """Greedy exact-match rate of `kind` prompts on (a, n) problems, via dail.decode (the eval engine)."""
    model.eval()
    rng = random.Random(0)
    ctx, answers = [], []
    for a, n in problems:
        p = dict(line=0, problem=world.problem_text(a, n), solution=world.expert_solution(a, n, rng),
                 answer=str(world.answer(a, n)))
        ctx.append([dail.build_contexts(tok, p, False, None, (kind,))[kind]])
        answers.append(p["answer"])

    def choose(logits, step, rows):  # greedy: no randomness to key
        return logits[0].argmax(-1), None
    ok = 0
    for i in range(0, len(ctx), 64):
        res = dail.decode(model, ctx[i:i + 64], choose, max_new_tokens, [eot], tok.pad_token_id)
        for r, ans in zip(res, answers[i:i + 64]):
            text = tok.decode(r["ids"])
            ok += r["finish_reason"] == "stop" and dail.is_equiv(dail.extract_boxed(text), ans)
    model.train()
    return ok / len(ctx)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "model"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--vocab", type=int, default=768)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    expert, test = world.split()
    held_out = set(expert) | set(test)

    t0 = time.time()
    tok = make_tokenizer(random.Random(args.seed + 1), held_out, args.vocab)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    check_reload(tok, Path(args.out))
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=eot, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: {len(tok)} tokens ({time.time() - t0:.1f}s); model: {n_params / 1e6:.2f}M parameters")
    p0 = dict(line=0, problem=world.problem_text(17, 83), solution=world.expert_solution(17, 83, rng), answer="419")
    lens = {k: len(v) for k, v in dail.build_contexts(tok, p0, False, None).items()}
    print(f"prompt lengths: {lens}; trick trace {len(tok(world.trick(17, 83))['input_ids'])} tokens, "
          f"brute force (n=9) {len(tok(world.brute_force(17, 9))['input_ids'])} tokens")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    t0, tokens, log = time.time(), 0, []
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (
            0.5 * (1 + math.cos(math.pi * max(0, step - args.warmup) / max(1, args.steps - args.warmup))))
        for g in opt.param_groups:
            g["lr"] = lr
        pairs = [encode(tok, *sample_example(rng, held_out), eot) for _ in range(args.batch)]
        ids, mask, labels = batch_tensors(pairs, tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
        if step % 100 == 0 or step == args.steps - 1:
            el = time.time() - t0
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}  {tokens / el:.0f} tok/s  {el:.0f}s", flush=True)
            log.append(dict(step=step, loss=loss.item(), lr=lr, seconds=el))
    train_s = time.time() - t0

    probe = random.Random(7).sample(test, 64)
    report = dict(seed=args.seed, steps=args.steps, batch=args.batch, lr=args.lr, params=n_params,
                  vocab=len(tok), train_seconds=round(train_s, 1), train_tokens=tokens,
                  greedy_privileged_test64=greedy_accuracy(model, tok, probe, "privileged", 200, eot),
                  greedy_student_test64=greedy_accuracy(model, tok, probe, "student", 200, eot),
                  greedy_student_easy=greedy_accuracy(model, tok, [(a, n) for a in world.BASES[:8]
                                                                   for n in world.EASY_N], "student", 200, eot),
                  args=vars(args), log=log)
    print(json.dumps({k: v for k, v in report.items() if k not in ("log", "args")}))
    out = Path(args.out)
    model.generation_config.eos_token_id = eot
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""A tiny Qwen2-architecture model and a byte-level ChatML tokenizer, built offline in a second.

Used by the tests, the quickstart and the benchmarks: nothing here touches the network.
    python examples/tiny_model.py OUT_DIR [--hidden 128 --layers 2 --heads 4 --kv-heads 2 --seed 0]
The tokenizer is byte-level BPE with no merges: 256 byte tokens (every string round-trips exactly) plus
the ChatML specials <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos), <think> and </think>.
Head dim (hidden / heads) stays >= 32 so vLLM's CPU attention can load the model too.
"""
import argparse

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    byte_vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    core = Tokenizer(models.BPE(vocab=dict(sorted(byte_vocab.items(), key=lambda kv: kv[1])), merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  model_input_names=["input_ids", "attention_mask"])
    tok.chat_template = CHATML
    return tok


def make_model(tok, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=None, seed=0, max_positions=2048):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return Qwen2ForCausalLM(config)


def save_tiny(folder, **kw):
    """Build and save a tokenizer + random model to `folder` (loadable by from_pretrained and vLLM)."""
    tok = make_tokenizer()
    model = make_model(tok, **kw)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to write the model and tokenizer to")
    ap.add_argument("--hidden", type=int, default=128, help="hidden size")
    ap.add_argument("--layers", type=int, default=2, help="transformer layers")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (hidden / heads >= 32 for vLLM)")
    ap.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    ap.add_argument("--seed", type=int, default=0, help="weight init seed")
    a = ap.parse_args()
    save_tiny(a.out, hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, seed=a.seed)
    print(f"wrote {a.out}")

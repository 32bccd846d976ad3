#!/usr/bin/env python3
"""Write the tiny Llama checkpoints and the golden data that InferFlux's tests hold the model to.

Everything is generated locally: a byte-level BPE tokenizer trained on the text below, a
`LlamaForCausalLM` with random weights, and the reference numbers computed by `transformers`
itself (eager attention, float32). Nothing is downloaded.

    pip install torch transformers tokenizers safetensors
    python3 scripts/make_tiny_model.py            # rewrites tests/fixtures/

Fixtures written:
  tiny-llama/                  f32, untied lm_head, one model.safetensors (the embedded default model)
  tiny-llama-tied-bf16/        bf16 on disk, tied embeddings, sharded with model.safetensors.index.json

Each directory gets `goldens.json`: for every prompt its token ids (as the HF tokenizer makes them),
the last-position logits, and a 24-token greedy continuation computed without a KV cache.
"""
import argparse
import json
import os
import shutil

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM

# Training text for the tokenizer. Plain prose, some code and a little non-ASCII so that multi-byte
# characters end up split across tokens, as they are in real vocabularies.
CORPUS = """
InferFlux is an inference server. It loads a model, batches requests from many clients, and streams
tokens back as they are produced. The quick brown fox jumps over the lazy dog. Once upon a time in a
land far away, there lived a small language model that knew only a few hundred tokens.
Hello, my name is Ada. I like to read books about mathematics, music and the history of machines.
The scheduler decides which tokens the model computes at every step; the cache keeps keys and values
in fixed-size pages so that many sequences can share one device without wasting memory.
def main():
    for i in range(10):
        print("hello", i)
Café au lait, crème brûlée, naïve façade, Straße, smörgåsbord. 日本語のテキスト。 中文文本。
Emoji appear in chats: ☕ 🍰 🚀 ✨ 👍. Numbers too: 3.14159, 2.71828, 1,000,000, 42.
Questions and answers: What is the capital of France? Paris. What is two plus two? Four.
"""

PROMPTS = [
    "Hello, my name is",
    "The quick brown fox",
    "Once upon a time in a land far away",
    "Café ☕ au lait 🍰",
    "The scheduler decides which tokens the model computes at every step; the cache keeps keys and "
    "values in fixed-size pages so that many sequences can share one device.",
]

GREEDY_TOKENS = 24


def train_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in CORPUS.splitlines() if line] * 4, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def write_tokenizer_files(tok: Tokenizer, out: str) -> None:
    tok.save(os.path.join(out, "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 256,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=2)
        f.write("\n")


def build_model(tok: Tokenizer, tied: bool, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.15,
        tie_word_embeddings=tied,
        bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=None,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Random RMSNorm gains, so that a missing or misplaced norm changes the numbers.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        # Keep EOS out of the greedy continuations: its output row is zeroed, so its logit is 0 and
        # some other logit is always larger. The goldens are then always GREEDY_TOKENS long.
        model.lm_head.weight[config.eos_token_id].zero_()
    return model


@torch.no_grad()
def goldens(model: LlamaForCausalLM, tok: Tokenizer) -> dict:
    model = model.float().eval()
    records = []
    min_margin = float("inf")
    for prompt in PROMPTS:
        ids = tok.encode(prompt).ids
        logits = model(torch.tensor([ids])).logits[0, -1]
        seq = list(ids)
        generated = []
        for _ in range(GREEDY_TOKENS):
            step_logits = model(torch.tensor([seq])).logits[0, -1]
            top2 = torch.topk(step_logits, 2).values
            min_margin = min(min_margin, float(top2[0] - top2[1]))
            nxt = int(torch.argmax(step_logits))
            seq.append(nxt)
            generated.append(nxt)
        # Cross-check the manual loop against transformers' own generate (with its KV cache).
        ref = model.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=GREEDY_TOKENS,
            min_new_tokens=GREEDY_TOKENS, pad_token_id=0,
        )[0, len(ids):].tolist()
        assert ref == generated, (prompt, ref, generated)
        records.append({
            "prompt": prompt,
            "input_ids": ids,
            "last_logits": [round(float(x), 7) for x in logits],
            "greedy_ids": generated,
            "greedy_text": tok.decode(generated, skip_special_tokens=True),
        })
    return {
        "generator": "scripts/make_tiny_model.py",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "dtype": "float32",
        "min_greedy_top2_margin": min_margin,
        "prompts": records,
    }


def write_fixture(out: str, tok: Tokenizer, tied: bool, dtype: torch.dtype, shard: str | None, seed: int):
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    model = build_model(tok, tied, seed)
    model.to(dtype)
    kwargs = {"safe_serialization": True}
    if shard:
        kwargs["max_shard_size"] = shard
    model.save_pretrained(out, **kwargs)
    write_tokenizer_files(tok, out)
    # The reference is computed from what was written, read back and upcast to f32, exactly as
    # the server reads it.
    reloaded = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    data = goldens(reloaded, tok)
    data["stored_dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(out, "goldens.json"), "w") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{out}: {size / 1024:.0f} KiB, min greedy top-2 margin {data['min_greedy_top2_margin']:.4f}")
    assert size < 2 * 1024 * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    tok = train_tokenizer(vocab_size=384)
    write_fixture(os.path.join(args.out, "tiny-llama"), tok, tied=False, dtype=torch.float32, shard=None, seed=1)
    write_fixture(os.path.join(args.out, "tiny-llama-tied-bf16"), tok, tied=True, dtype=torch.bfloat16,
                  shard="100KB", seed=2)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Write the tiny checkpoints and the golden data that InferFlux's tests hold the model to.

Everything is generated locally: a byte-level BPE tokenizer trained on the text below, a model with
random weights, and the reference numbers computed by `transformers` itself (eager attention,
float32). Nothing is downloaded.

    pip install torch transformers tokenizers safetensors
    python3 scripts/make_tiny_model.py                     # llama only: rewrites the two tiny-llama fixtures
    python3 scripts/make_tiny_model.py --arch all          # every architecture
    python3 scripts/make_tiny_model.py --arch qwen2,qwen3  # a comma list; --arch may also be repeated

--arch takes llama | llama3 | mistral | qwen2 | qwen3 | all (default llama). Each arch writes only
its own directories under --out.

Fixtures written:
  tiny-llama/                  (llama)   f32, untied lm_head, one model.safetensors (the embedded default model)
  tiny-llama-tied-bf16/        (llama)   bf16 on disk, tied embeddings, sharded with model.safetensors.index.json
  tiny-llama3/                 (llama3)  LlamaForCausalLM, rope_type llama3 (theta 5e5, factor 8, low 1, high 4,
                                         original_max_position_embeddings 32), head_dim 32 != 64/4, tied,
                                         Llama 3 header-token chat template, eos_token_id a list
  tiny-mistral/                (mistral) MistralForCausalLM, sliding_window 8, [INST] template
  tiny-qwen2/                  (qwen2)   Qwen2ForCausalLM, random nonzero q/k/v biases, untied, Qwen2.5 ChatML
                                         template with its default system prompt
  tiny-qwen3/                  (qwen3)   Qwen3ForCausalLM, random q_norm/k_norm gains, head_dim 32, tied, ChatML
                                         template (no default system prompt, </think> stripped from history)

The new-arch fixtures are f32 on disk, one model.safetensors, with tokenizer.json (the same trained BPE
plus the arch's chat special tokens appended as special added tokens), tokenizer_config.json (bos/eos,
model_max_length, chat_template) and generation_config.json.

Each directory gets `goldens.json`: for every prompt its token ids (as the HF tokenizer makes them),
the last-position logits, and a 24-token greedy continuation computed without a KV cache (and
cross-checked against `generate`). The new-arch fixtures add "arch", "config_summary",
"special_tokens" and "chat": conversations rendered with transformers' own `apply_chat_template`
(the tokenizer loaded back from the fixture), their token ids and their 24-token greedy continuations.
"""
import argparse
import json
import os
import shutil

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen2Config, Qwen3Config,
)

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


# The size of every fixture: big enough to exercise GQA and multi-layer code paths, small enough
# to commit.
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def build_model(tok: Tokenizer, tied: bool, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        **TINY_SHAPE,
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


# ---------------------------------------------------------------------------------------------------
# The other architectures: llama3, mistral, qwen2, qwen3. Each writes only its own tiny-<arch>/ directory.
# ---------------------------------------------------------------------------------------------------

# Llama 3 Instruct's template (the 3.0 one: header tokens, `| trim` on the content, BOS only before the first
# message). The 3.1+ templates add a date line from `strftime_now`, which would make the goldens depend on the day.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral Instruct v0.3's template: an optional system message goes before the LAST user message,
# roles must alternate, the assistant turn ends with eos_token. add_generation_prompt changes nothing.
MISTRAL_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# Qwen2.5 Instruct's template, tools branch included (it is not taken: no tools are passed).
QWEN2_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# ChatML in the style of Qwen3's template, reduced: no default system prompt, the reasoning before
# `</think>` is dropped from assistant turns in the history (Python's str.split / str.lstrip, as in the
# real template), and `enable_thinking=false` (never passed here) would add an empty think block.
QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

SYSTEM = "You are a helpful assistant. Answer briefly."

# (messages, add_generation_prompt). Every fixture renders all of these; qwen3 adds one with a think block.
CONVERSATIONS = [
    ([{"role": "system", "content": SYSTEM},
      {"role": "user", "content": "What is the capital of France?"}], True),
    ([{"role": "user", "content": "Hello, my name is Ada. Café ☕ or crème brûlée? 日本語のテキスト。"}], True),
    ([{"role": "system", "content": SYSTEM},
      {"role": "user", "content": "What is two plus two?"},
      {"role": "assistant", "content": "Four."},
      {"role": "user", "content": "And the capital of France?"}], True),
    ([{"role": "user", "content": "Tell me about the quick brown fox."},
      {"role": "assistant", "content": "It jumps over the lazy dog. 🚀"}], False),
    ([{"role": "user", "content": "  Once upon a time in a land far away  \n"}], True),
]

QWEN3_EXTRA_CONVERSATIONS = [
    ([{"role": "user", "content": "What is the capital of France?"},
      {"role": "assistant", "content": "<think>\nThe user asks about France.\n</think>\n\nParis."},
      {"role": "user", "content": "And of Japan? 日本"}], True),
]

# Per arch: the special tokens appended to the trained BPE (special=True unless listed in `plain_added`),
# the token strings for bos/eos/pad, and which ids end generation.
ARCHS = {
    "llama3": dict(
        dir="tiny-llama3", seed=11, tied=True,
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, add_bos=True,
        config_eos=["<|end_of_text|>", "<|eot_id|>"], gen_eos=["<|end_of_text|>", "<|eot_id|>"],
        template=LLAMA3_TEMPLATE,
    ),
    "mistral": dict(
        dir="tiny-mistral", seed=24, tied=False,
        specials=["[INST]", "[/INST]"],
        bos="<s>", eos="</s>", pad=None, add_bos=True,
        config_eos="</s>", gen_eos="</s>",
        template=MISTRAL_TEMPLATE,
    ),
    "qwen2": dict(
        dir="tiny-qwen2", seed=13, tied=False,
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>", add_bos=False,
        config_eos="<|im_end|>", gen_eos=["<|im_end|>", "<|endoftext|>"],
        template=QWEN2_TEMPLATE,
    ),
    "qwen3": dict(
        dir="tiny-qwen3", seed=21, tied=True,
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], plain_added=["<think>", "</think>"],
        bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>", add_bos=False,
        config_eos="<|im_end|>", gen_eos=["<|im_end|>", "<|endoftext|>"],
        template=QWEN3_TEMPLATE,
    ),
}

ALL_ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]


def arch_tokenizer(spec: dict) -> Tokenizer:
    tok = train_tokenizer(vocab_size=384)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["specials"]])
    if spec.get("plain_added"):
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["plain_added"]])
    if spec["add_bos"]:
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        # As Qwen's tokenizer.json: no BOS, byte-level offsets only.
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def write_arch_tokenizer_files(tok: Tokenizer, spec: dict, out: str) -> None:
    tok.save(os.path.join(out, "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec["bos"],
        "eos_token": spec["eos"],
    }
    if spec["pad"]:
        tokenizer_config["pad_token"] = spec["pad"]
    if "<unk>" in tok.get_vocab() and spec["add_bos"] and spec["bos"] == "<s>":
        tokenizer_config["unk_token"] = "<unk>"
    tokenizer_config.update({
        "model_max_length": 256,
        "add_bos_token": spec["add_bos"],
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": spec["template"],
    })
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def ids_of(tok: Tokenizer, names):
    if isinstance(names, list):
        return [tok.token_to_id(n) for n in names]
    return tok.token_to_id(names)


def build_arch_model(arch: str, spec: dict, tok: Tokenizer):
    common = dict(
        vocab_size=tok.get_vocab_size(),
        **TINY_SHAPE,
        rms_norm_eps=1e-5,
        initializer_range=0.15,
        tie_word_embeddings=spec["tied"],
        bos_token_id=tok.token_to_id(spec["bos"]),
        eos_token_id=ids_of(tok, spec["config_eos"]),
        pad_token_id=None,
        attn_implementation="eager",
    )
    if arch == "llama3":
        config = LlamaConfig(
            **common, head_dim=32,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        )
    elif arch == "mistral":
        config = MistralConfig(**common, head_dim=16, sliding_window=8,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    elif arch == "qwen2":
        config = Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    elif arch == "qwen3":
        config = Qwen3Config(**common, head_dim=32, attention_bias=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    else:
        raise ValueError(arch)
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # input/post-attention/final norms, and Qwen3's q_norm / k_norm
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):  # Qwen2's q/k/v biases (zero at init): make a missing bias show
                p.copy_(0.5 * torch.randn_like(p))
        eos = ids_of(tok, spec["gen_eos"])
        for e in (eos if isinstance(eos, list) else [eos]):
            model.lm_head.weight[e].zero_()
    model.generation_config.eos_token_id = ids_of(tok, spec["gen_eos"])
    model.generation_config.bos_token_id = tok.token_to_id(spec["bos"])
    if spec["pad"]:
        model.generation_config.pad_token_id = tok.token_to_id(spec["pad"])
    return model


@torch.no_grad()
def greedy(model, ids: list[int], eos_ids: list[int]) -> tuple[list[int], float]:
    seq = list(ids)
    generated = []
    min_margin = float("inf")
    for _ in range(GREEDY_TOKENS):
        step_logits = model(torch.tensor([seq])).logits[0, -1]
        top2 = torch.topk(step_logits, 2).values
        min_margin = min(min_margin, float(top2[0] - top2[1]))
        nxt = int(torch.argmax(step_logits))
        seq.append(nxt)
        generated.append(nxt)
    assert not set(generated) & set(eos_ids), (ids, generated)
    ref = model.generate(
        torch.tensor([ids]), do_sample=False, max_new_tokens=GREEDY_TOKENS,
        min_new_tokens=GREEDY_TOKENS, pad_token_id=0,
    )[0, len(ids):].tolist()
    assert ref == generated, (ids, ref, generated)
    return generated, min_margin


@torch.no_grad()
def arch_goldens(arch: str, spec: dict, model, tok: Tokenizer, hf_tok) -> dict:
    model = model.float().eval()
    eos_ids = model.generation_config.eos_token_id
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    records = []
    min_margin = float("inf")
    for prompt in PROMPTS:
        ids = hf_tok(prompt)["input_ids"]
        assert ids == tok.encode(prompt).ids, prompt
        logits = model(torch.tensor([ids])).logits[0, -1]
        generated, m = greedy(model, ids, eos_ids)
        min_margin = min(min_margin, m)
        records.append({
            "prompt": prompt,
            "input_ids": ids,
            "last_logits": [round(float(x), 7) for x in logits],
            "greedy_ids": generated,
            "greedy_text": hf_tok.decode(generated, skip_special_tokens=True),
        })
    chats = []
    convs = CONVERSATIONS + (QWEN3_EXTRA_CONVERSATIONS if arch == "qwen3" else [])
    for messages, add_gen in convs:
        rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_gen)
        enc = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_gen)
        ids = list(enc["input_ids"]) if not isinstance(enc, list) else list(enc)
        assert ids == hf_tok(rendered, add_special_tokens=False)["input_ids"]
        assert len(ids) + GREEDY_TOKENS <= model.config.max_position_embeddings, (arch, len(ids))
        logits = model(torch.tensor([ids])).logits[0, -1]
        generated, m = greedy(model, ids, eos_ids)
        min_margin = min(min_margin, m)
        chats.append({
            "messages": messages,
            "add_generation_prompt": add_gen,
            "rendered": rendered,
            "input_ids": ids,
            "last_logits": [round(float(x), 7) for x in logits],
            "greedy_ids": generated,
            "greedy_text": hf_tok.decode(generated, skip_special_tokens=True),
        })
    c = model.config
    vocab = tok.get_vocab(with_added_tokens=True)
    special = {t: vocab[t] for t in spec["specials"] + spec.get("plain_added", []) + ["<unk>", "<s>", "</s>"]}
    return {
        "generator": "scripts/make_tiny_model.py",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "dtype": "float32",
        "min_greedy_top2_margin": min_margin,
        "prompts": records,
        "arch": arch,
        "config_summary": {
            "architectures": c.architectures,
            "model_type": c.model_type,
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "rope_parameters": c.rope_parameters,
            "sliding_window": getattr(c, "sliding_window", None),
            "tie_word_embeddings": c.tie_word_embeddings,
            "attention_bias": bool(getattr(c, "attention_bias", arch == "qwen2")),
            "qk_norm": arch == "qwen3",
            "bos_token_id": model.generation_config.bos_token_id,
            "eos_token_id": model.generation_config.eos_token_id,
        },
        "special_tokens": special,
        "chat": chats,
    }


def write_arch_fixture(out_root: str, arch: str) -> None:
    spec = ARCHS[arch]
    out = os.path.join(out_root, spec["dir"])
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    tok = arch_tokenizer(spec)
    model = build_arch_model(arch, spec, tok)
    model.save_pretrained(out, safe_serialization=True)
    write_arch_tokenizer_files(tok, spec, out)
    # As for the llama fixtures: the reference comes from what was written, read back in f32.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert len(hf_tok) == reloaded.config.vocab_size == tok.get_vocab_size(), (len(hf_tok), reloaded.config.vocab_size)
    data = arch_goldens(arch, spec, reloaded, tok, hf_tok)
    data["stored_dtype"] = "float32"
    with open(os.path.join(out, "goldens.json"), "w") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{out}: {size / 1024:.0f} KiB, min greedy top-2 margin {data['min_greedy_top2_margin']:.4f}")
    assert size < 2 * 1024 * 1024
    assert data["min_greedy_top2_margin"] > 1e-3, "margin too small: try another seed"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    parser.add_argument("--arch", action="append", default=None,
                        help="llama|llama3|mistral|qwen2|qwen3|all; repeatable or a comma list (default: llama)")
    args = parser.parse_args()
    archs = []
    for a in ",".join(args.arch or ["llama"]).split(","):
        a = a.strip()
        if a == "all":
            archs.extend(ALL_ARCHS)
        elif a in ALL_ARCHS:
            archs.append(a)
        else:
            parser.error(f"unknown --arch {a!r}; supported: {', '.join(ALL_ARCHS)}, all")
    archs = [a for a in ALL_ARCHS if a in archs]
    torch.set_num_threads(1)
    if "llama" in archs:
        tok = train_tokenizer(vocab_size=384)
        write_fixture(os.path.join(args.out, "tiny-llama"), tok, tied=False, dtype=torch.float32, shard=None, seed=1)
        write_fixture(os.path.join(args.out, "tiny-llama-tied-bf16"), tok, tied=True, dtype=torch.bfloat16,
                      shard="100KB", seed=2)
    for arch in archs:
        if arch != "llama":
            write_arch_fixture(args.out, arch)



if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The Python side of scripts/gpu-check.sh, run on the lent GPU machine (PyTorch and transformers
are installed there; nothing is downloaded).

  gpu_bench.py make-model DIR            Llama-3.2-1B-shaped checkpoint, random bf16 weights, and a
                                         word-level tokenizer with one word per token id
  gpu_bench.py prompts FILE N SEED       N JSON-lines prompts of 128 random words (128 tokens with
                                         that tokenizer), for `inferctl bench --dataset FILE`
  gpu_bench.py baseline DIR --out JSON   copy bandwidth, cuBLAS time of one step's GEMMs, and
                                         transformers `generate` tokens/s at batch 1, 32 and 128
  gpu_bench.py table --baseline JSON --bench-dir DIR [--profile JSON]
                                         the summary table: InferFlux against baseline and roofline
  gpu_bench.py kernel-summary LOG [--steps N]
                                         GPU time per kernel kind, from cubecl's profiler log
  gpu_bench.py reference DIR --out JSON  transformers' greedy tokens and their logprobs (bf16 on
                                         the GPU) for a few prompts: what `compare` checks
  gpu_bench.py compare URL JSON LABEL    a server's greedy tokens and logprobs on those prompts
                                         against the reference
  gpu_bench.py draws URL JSON LABEL      a server's temperature draws (sampled on the device with
                                         `[cuda] device_sampling`): at temperature 1e-4 they must
                                         be the reference's greedy tokens; a seed repeats its text
"""
import argparse
import re
import json
import os
import sys
import time

PROMPT_LEN = 128
OUTPUT_LEN = 128
BATCHES = (1, 32, 128)

# Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 query / 8 KV heads of 64, MLP 8192, vocab 128256).
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    # transformers 5 spelling (4.x called it rope_scaling, with rope_theta beside it).
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


def make_model(path):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(path, exist_ok=True)
    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_1B)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    # One word per id ("w0" ... ), so that every generated token streams some text.
    vocab = {f"w{i}": i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 8192, "bos_token": "w1", "eos_token": "w2"}, f)
    params = sum(p.numel() for p in model.parameters())
    print(f"made {path}: {params / 1e9:.3f} B parameters, bf16")


def prompts(path, n, seed):
    # inferctl's random prompts come from an English word list, which this tokenizer maps to one
    # unknown id: every prompt would share its prefix. These are distinct from the first word.
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = " ".join(f"w{rng.randrange(3, LLAMA_1B['vocab_size'])}" for _ in range(PROMPT_LEN))
            f.write(json.dumps({"prompt": words}) + "\n")


def cuda_ms(fn, iters):
    import torch

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def baseline(path, out):
    import torch
    from transformers import LlamaForCausalLM

    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    # Device-to-device copy, counting bytes read and written.
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = cuda_ms(lambda: b.copy_(a), 20)
    result["copy_gbs"] = 2 * a.numel() / (ms * 1e-3) / 1e9
    del a, b

    c = LLAMA_1B
    h, kv, inter, layers = c["hidden_size"], c["num_key_value_heads"] * c["head_dim"], c["intermediate_size"], c["num_hidden_layers"]
    # (in, out, times per layer): q, k and v, o, gate and up, down.
    shapes = [(h, h, 1), (h, kv, 2), (h, h, 1), (h, inter, 2), (inter, h, 1)]
    result["weight_bytes"] = 2 * (layers * sum(i * o * t for i, o, t in shapes) + h * c["vocab_size"])
    result["kv_bytes_per_token"] = 2 * layers * 2 * kv
    result["cublas_step_gemms_ms"] = {}
    for batch in BATCHES:
        total = 0.0
        for i, o, t in shapes:
            x = torch.randn(batch, i, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(i, o, device="cuda", dtype=torch.bfloat16)
            total += layers * t * cuda_ms(lambda: x @ w, 50)
        x = torch.randn(batch, h, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(h, c["vocab_size"], device="cuda", dtype=torch.bfloat16)
        total += cuda_ms(lambda: x @ w, 50)
        result["cublas_step_gemms_ms"][str(batch)] = total

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    gen = torch.Generator(device="cpu").manual_seed(0)
    result["transformers_generate"] = {}
    for batch in BATCHES:
        ids = torch.randint(3, c["vocab_size"], (batch, PROMPT_LEN), generator=gen).to("cuda")
        mask = torch.ones_like(ids)
        kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
            torch.cuda.synchronize()
            t = time.perf_counter()
            out_ids = model.generate(ids, max_new_tokens=OUTPUT_LEN, min_new_tokens=OUTPUT_LEN, **kw)
            torch.cuda.synchronize()
            secs = time.perf_counter() - t
        generated = batch * (out_ids.shape[1] - PROMPT_LEN)
        result["transformers_generate"][str(batch)] = {
            "seconds": secs,
            "output_tokens": generated,
            "tok_s": generated / secs,
            "ms_per_step": secs * 1e3 / OUTPUT_LEN,
        }
        print(f"transformers generate batch {batch}: {generated / secs:.0f} tok/s", flush=True)
    json.dump(result, open(out, "w"), indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "transformers_generate"}, indent=1))


def table(baseline_path, bench_dir, profile_path):
    if not os.path.exists(baseline_path):
        # Step 3 did not run or did not finish (a cut call, a CPU dry run): InferFlux's own
        # numbers still print, without the ratios that need the baseline.
        print(f"\n(no baseline at {baseline_path}: step 3 did not run; InferFlux's numbers alone)")
        base = None
    else:
        base = json.load(open(baseline_path))
    if base:
        bw = base["copy_gbs"] * 1e9
        print(f"\nGPU: {base['device']}; copy {base['copy_gbs']:.0f} GB/s; weights {base['weight_bytes'] / 1e9:.2f} GB (bf16)")
    print(
        "\n| concurrency | InferFlux out tok/s | InferFlux ms/step (mean TPOT) | TTFT p50 ms "
        "| transformers tok/s | cuBLAS GEMMs ms/step | roofline ms/step | step / roofline | tok/s vs transformers |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    nan = float("nan")
    for batch in BATCHES:
        path = os.path.join(bench_dir, f"bench-c{batch}.json")
        hf = base["transformers_generate"].get(str(batch), {}) if base else {}
        roof = nan
        if base:
            # The mean context over a request's decode steps: its prompt and half its output.
            kv = base["kv_bytes_per_token"] * batch * (PROMPT_LEN + OUTPUT_LEN / 2)
            roof = (base["weight_bytes"] + kv) / bw * 1e3
        gemm = base["cublas_step_gemms_ms"].get(str(batch), nan) if base else nan
        if not os.path.exists(path):
            print(f"| {batch} | (no result) | | | {hf.get('tok_s', 0):.0f} | {gemm:.2f} | {roof:.3f} | | |")
            continue
        r = json.load(open(path))
        tok_s = r.get("output_throughput", 0.0)
        tpot = r.get("mean_tpot_ms", nan)
        print(
            f"| {batch} | {tok_s:.0f} | {tpot:.2f} | {r.get('median_ttft_ms', nan):.0f} "
            f"| {hf.get('tok_s', 0):.0f} | {gemm:.2f} | {roof:.3f} | {tpot / roof:.1f}x "
            f"| {tok_s / hf['tok_s'] if hf else nan:.2f}x |"
        )
    if profile_path and os.path.exists(profile_path):
        print("\nWhere a decode step goes (device_check profile, context 192):\n")
        print("| batch | step ms | host issue ms | layer GEMMs ms | lm_head ms | logits to host ms | rest ms | cuBLAS GEMMs ms |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for row in json.load(open(profile_path)):
            gemm = base["cublas_step_gemms_ms"].get(str(row["batch"]), nan) if base else nan
            print(
                f"| {row['batch']} | {row['step_ms']:.2f} | {row.get('host_issue_ms', nan):.2f} "
                f"| {row['layer_gemms_ms']:.2f} | {row['lm_head_ms']:.2f} "
                f"| {row['logits_to_host_ms']:.2f} | {row['rest_ms']:.2f} | {gemm:.2f} |"
            )


# Prompts of the word-level tokenizer (word `wN` is token id N), short and long.
CHECK_PROMPTS = (
    "w1 w5 w9 w13 w17",
    " ".join(f"w{(i * 7919) % 128000 + 3}" for i in range(40)),
    " ".join(f"w{(i * 104729) % 128000 + 3}" for i in range(300)),
    # Past 512 keys, so that a decode of it alone is split into partitions (`split_attention`).
    " ".join(f"w{(i * 15485863) % 128000 + 3}" for i in range(1500)),
)
CHECK_TOKENS = 16
# A flipped argmax is rounding when transformers' top two logprobs are closer than this: bf16
# moves a logprob by up to about 0.06 here (the max differences the check prints).
TIE_MARGIN = 0.125
# Alternatives per position, in the reference and in the teacher-forced check (OpenAI's limit).
TOP_LOGPROBS = 5


def reference(path, out):
    """Greedy continuation of CHECK_PROMPTS by transformers, with the log-probability of each
    chosen token (from the logits in f32), recomputed from scratch at every step."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    results = []
    with torch.no_grad():
        for prompt in CHECK_PROMPTS:
            ids = [int(w[1:]) for w in prompt.split()]
            x = torch.tensor([ids], device="cuda")
            tokens, logprobs, top = [], [], []
            for _ in range(CHECK_TOKENS):
                lps = torch.log_softmax(model(x).logits[0, -1].float(), -1)
                token = int(torch.argmax(lps))
                tokens.append(token)
                logprobs.append(float(lps[token]))
                values, ids = torch.topk(lps, TOP_LOGPROBS)
                top.append([[int(i), float(v)] for i, v in zip(ids, values)])
                x = torch.cat([x, torch.tensor([[token]], device="cuda")], dim=1)
            results.append({"prompt": prompt, "tokens": tokens, "logprobs": logprobs, "top": top})
    with open(out, "w") as f:
        json.dump(results, f)
    print(f"reference: {len(results)} prompts, {CHECK_TOKENS} greedy tokens each")


def compare(url, reference_path, label):
    """Asks the server at URL for the reference's greedy continuations and prints one row per
    prompt: the tokens equal to transformers' before the first difference, and the largest
    logprob difference over them. Returns False if a first token differs."""
    import urllib.request

    ok = True
    for i, ref in enumerate(json.load(open(reference_path))):
        body = json.dumps({
            "prompt": ref["prompt"], "max_tokens": len(ref["tokens"]), "temperature": 0,
            "logprobs": 1, "ignore_eos": True,
        }).encode()
        req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        try:
            choice = json.load(urllib.request.urlopen(req, timeout=60))["choices"][0]
        except Exception as e:  # a refused or failed request is a failed check, not a crash
            print(f"| {label} | {i} | request failed: {e} | | |")
            ok = False
            continue
        got = [int(t.strip()[1:]) for t in choice["logprobs"]["tokens"]]
        lps = choice["logprobs"]["token_logprobs"]
        same = next((j for j, (a, b) in enumerate(zip(got, ref["tokens"])) if a != b), min(len(got), len(ref["tokens"])))
        diff = max((abs(a - b) for a, b in zip(lps[:same], ref["logprobs"][:same])), default=float("nan"))
        ok &= same > 0
        print(f"| {label} | {i} ({len(ref['prompt'].split())} tokens) | {same}/{len(ref['tokens'])} | {diff:.3f} |")
    return ok


def teacher_forced(url, reference_path, label):
    """Greedy continuations diverge for good at the first near-tie that bf16 rounding flips, so
    this asks for one token at every position of transformers' own continuation (prompt plus its
    first j tokens), with the top 5 logprobs: the logprob the server gives transformers' token
    (its difference from transformers'), and whether the server's argmax is transformers'. Prints
    one row; returns False if an argmax differs where transformers' top two are further apart
    than bf16 rounding explains, or if transformers' token is missing from the server's top 5."""
    import urllib.request

    positions, agree, worst_diff, worst_tie, bad = 0, 0, 0.0, 0.0, []
    for i, ref in enumerate(json.load(open(reference_path))):
        for j, token in enumerate(ref["tokens"]):
            prompt = " ".join([ref["prompt"], *(f"w{t}" for t in ref["tokens"][:j])])
            body = json.dumps({
                "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": TOP_LOGPROBS,
                "ignore_eos": True,
            }).encode()
            req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
            try:
                top = json.load(urllib.request.urlopen(req, timeout=60))["choices"][0]["logprobs"]["top_logprobs"][0]
            except Exception as e:  # a refused or failed request is a failed check, not a crash
                print(f"| {label} | teacher-forced | request failed: {e} | |")
                return False
            ours = {int(t.strip()[1:]): lp for t, lp in top.items()}
            positions += 1
            if token not in ours:
                bad.append(f"{i}:{j} transformers' token not in our top {TOP_LOGPROBS}")
                continue
            worst_diff = max(worst_diff, abs(ours[token] - ref["logprobs"][j]))
            if max(ours, key=ours.get) == token:
                agree += 1
                continue
            # Transformers' margin between its top two: a flip within it is rounding.
            margin = ref["top"][j][0][1] - ref["top"][j][1][1]
            worst_tie = max(worst_tie, margin)
            if margin > TIE_MARGIN:
                bad.append(f"{i}:{j} argmax differs where transformers' top two are {margin:.3f} apart")
    print(f"| {label} | teacher-forced, {positions} positions | argmax same at {agree}; the others are near-ties "
          f"(transformers' top two within {worst_tie:.3f}){'; ' + '; '.join(bad) if bad else ''} | {worst_diff:.3f} |")
    return not bad


def draws(url, reference_path, label):
    """Temperature requests, which `[cuda] device_sampling` draws on the GPU: at temperature 1e-4
    (above the greedy cut) a draw is the argmax unless two logits are within ~1e-3, so the tokens
    must follow transformers' greedy ones, as must draws at temperature 1 cut to the top 1 token
    (`top_k` 1: the device's bisection keeps the argmax alone), and a draw whose first choice a
    `logit_bias` of -100 bans must pick transformers' second (the device's logit edits); at
    temperature 1 the same seed must give the same text twice and another seed another text.
    Prints one row; returns False on a failure."""
    import urllib.request

    def ask(prompt, n, temperature, seed, **cuts):
        body = json.dumps({
            "prompt": prompt, "max_tokens": n, "temperature": temperature, "seed": seed, "ignore_eos": True,
            **cuts,
        }).encode()
        req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        return json.load(urllib.request.urlopen(req, timeout=60))["choices"][0]["text"]

    refs = json.load(open(reference_path))

    def followed(temperature, **cuts):
        """Tokens equal to transformers' greedy ones before the first difference, per prompt."""
        same = []
        for ref in refs:
            # The checkpoint's tokenizer has one word per id, spelt `w<id>`.
            text = ask(ref["prompt"], len(ref["tokens"]), temperature, 1, **cuts)
            got = [int(i) for i in re.findall(r"w(\d+)", text)]
            same.append(next((j for j, (a, b) in enumerate(zip(got, ref["tokens"])) if a != b), min(len(got), len(ref["tokens"]))))
        return same

    try:
        same, top1 = followed(1e-4), followed(1.0, top_k=1)
        prompt = refs[0]["prompt"]
        a, b, c = ask(prompt, 16, 1.0, 7), ask(prompt, 16, 1.0, 7), ask(prompt, 16, 1.0, 8)
        # A bias of -100 on transformers' first token (the device edits the row): greedy then
        # picks its second, unless the second and third are a near-tie.
        top = refs[0]["top"][0]
        banned = ask(prompt, 1, 1e-4, 1, logit_bias={str(top[0][0]): -100})
        banned = [int(i) for i in re.findall(r"w(\d+)", banned)]
    except Exception as e:  # a refused or failed request is a failed check, not a crash
        print(f"| {label} | draws | request failed: {e} | |")
        return False
    second_ok = banned[:1] == [top[1][0]] or (top[1][1] - top[2][1] <= TIE_MARGIN and banned[:1] == [top[2][0]])
    ok = all(n > 0 for n in same + top1) and a == b and a != c and second_ok
    of = '/'.join(str(len(r['tokens'])) for r in refs)
    print(f"| {label} | draws at T=1e-4 = greedy: {'/'.join(map(str, same))} of {of}; top_k 1 at T=1: "
          f"{'/'.join(map(str, top1))}; first token banned: {'the second' if second_ok else f'{banned} (WRONG)'} "
          f"| seed 7 twice {'same' if a == b else 'DIFFERENT'}, seed 8 {'other' if a != c else 'SAME'} |")
    return ok


def parse_duration_us(text):
    """A Rust `Duration` as `{:?}` prints it (`850ns`, `12.5µs`, `1.2ms`, `3s`), in µs."""
    for unit, scale in (("ns", 1e-3), ("µs", 1.0), ("us", 1.0), ("ms", 1e3), ("s", 1e6)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise ValueError(f"not a duration: {text!r}")


def kernel_summary(log_path, steps):
    """The last summary table that cubecl's profiler logged (the timed steps of `device_check
    profile --step-only`), per kernel: launches and GPU µs per step, and the share."""
    if not os.path.exists(log_path):
        print(f"(no {log_path})")
        return
    tables, current = [], None
    for line in open(log_path, encoding="utf-8", errors="replace"):
        line = line.rstrip("\n")
        if line.startswith("|⎺"):
            current = []
        elif line.startswith("|⎯") and current is not None:
            tables.append(current)
            current = None
        elif current is not None and line.startswith("| ") and not line.startswith("| Name "):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if len(cells) >= 4 and cells[0] != "Total":
                try:
                    current.append((cells[0], parse_duration_us(cells[-3]), int(cells[-2])))
                except ValueError:
                    pass
    if tables:
        rows = tables[-1]
    else:
        # No summary: every launch of the log (loading, the 2 warm-up steps and the timed ones).
        steps += 2
        per_kernel = {}
        for line in open(log_path, encoding="utf-8", errors="replace"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            try:
                us = parse_duration_us(cells[0])
            except (ValueError, IndexError):
                continue
            name = " | ".join(cells[1:])
            total_us, count = per_kernel.get(name, (0.0, 0))
            per_kernel[name] = (total_us + us, count + 1)
        rows = [(name, us, count) for name, (us, count) in per_kernel.items()]
        if not rows:
            print(f"(no profiled kernels in {log_path})")
            return
    total = sum(us for _, us, _ in rows) or 1.0
    print(f"\nGPU time per decode step by kernel ({os.path.basename(log_path)}, mean of {steps} steps):\n")
    print("| kernel | launches per step | µs per step | share |")
    print("|---|---:|---:|---:|")
    for name, us, count in sorted(rows, key=lambda r: -r[1]):
        name = name.replace(" | ", " / ")
        short = name if len(name) <= 90 else name[:87] + "..."
        print(f"| `{short}` | {count / steps:.0f} | {us / steps:.0f} | {100 * us / total:.1f}% |")
    launches = sum(c for _, _, c in rows)
    print(f"| total | {launches / steps:.0f} | {total / steps:.0f} | 100% |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("dir")
    b = sub.add_parser("baseline")
    b.add_argument("dir")
    b.add_argument("--out", required=True)
    q = sub.add_parser("prompts")
    q.add_argument("file")
    q.add_argument("n", type=int)
    q.add_argument("seed", type=int)
    t = sub.add_parser("table")
    t.add_argument("--baseline", required=True)
    t.add_argument("--bench-dir", required=True)
    t.add_argument("--profile")
    r = sub.add_parser("reference")
    r.add_argument("dir")
    r.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("url")
    c.add_argument("reference")
    c.add_argument("label")
    f = sub.add_parser("teacher-forced")
    f.add_argument("url")
    f.add_argument("reference")
    f.add_argument("label")
    d = sub.add_parser("draws")
    d.add_argument("url")
    d.add_argument("reference")
    d.add_argument("label")
    k = sub.add_parser("kernel-summary")
    k.add_argument("log")
    k.add_argument("--steps", type=int, default=1)
    a = p.parse_args()
    if a.cmd == "make-model":
        make_model(a.dir)
    elif a.cmd == "prompts":
        prompts(a.file, a.n, a.seed)
    elif a.cmd == "baseline":
        baseline(a.dir, a.out)
    elif a.cmd == "reference":
        reference(a.dir, a.out)
    elif a.cmd == "compare":
        return 0 if compare(a.url, a.reference, a.label) else 1
    elif a.cmd == "teacher-forced":
        return 0 if teacher_forced(a.url, a.reference, a.label) else 1
    elif a.cmd == "draws":
        return 0 if draws(a.url, a.reference, a.label) else 1
    elif a.cmd == "kernel-summary":
        kernel_summary(a.log, a.steps)
    else:
        table(a.baseline, a.bench_dir, a.profile)


if __name__ == "__main__":
    sys.exit(main())

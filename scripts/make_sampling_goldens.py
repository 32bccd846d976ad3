#!/usr/bin/env python3
"""Write tests/fixtures/sampling_goldens.json: what transformers' logits processors make of a few
random logits rows, for the unit tests in src/sampling.rs.

    pip install torch transformers
    python3 scripts/make_sampling_goldens.py

Per case (vocab 64, float32, seeded): a logits row, a prompt and a generated token history, and
  - repetition_penalty: RepetitionPenaltyLogitsProcessor over prompt + generated tokens
  - temperature: TemperatureLogitsWarper
  - top_k / top_p / min_p: the ids each warper keeps (alone, after the temperature)
  - chain: the ids kept by temperature -> top_k -> top_p -> min_p, in transformers' order
  - log_softmax: torch.log_softmax of the raw row (float64), for the logprobs

Parameters are drawn so that no token sits within 1e-4 of a top_p or min_p threshold: a cut that
close could fall either way under float32 rounding, in torch as in Rust. OpenAI's presence and
frequency penalties have no transformers processor; a hand-computed unit test covers them.
Nothing is downloaded.
"""
import json
import os

import torch
import transformers
from transformers.generation.logits_process import (
    MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
    TopPLogitsWarper,
)

VOCAB = 64
CASES = 6
MARGIN = 1e-4
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "sampling_goldens.json")


def kept(scores):
    """Ids a warper left finite, ascending."""
    return [i for i, s in enumerate(scores[0].tolist()) if s != float("-inf")]


def top_p_margin(scores, top_p):
    """Smallest distance of an ascending cumulative probability to transformers' cut, 1 - top_p."""
    probs = torch.softmax(scores.double(), dim=-1).sort().values.cumsum(-1)
    return (probs - (1 - top_p)).abs().min().item()


def min_p_margin(scores, min_p):
    probs = torch.softmax(scores.double(), dim=-1)
    return ((probs - min_p * probs.max()).abs() / probs.max()).min().item()


def rounded(values):
    return [float(f"{v:.9g}") for v in values]


def main():
    gen = torch.Generator().manual_seed(20261127)
    cases = []
    while len(cases) < CASES:
        logits = (torch.randn(1, VOCAB, generator=gen) * 3).float()
        prompt = torch.randint(0, VOCAB, (10,), generator=gen).tolist()
        generated = torch.randint(0, VOCAB, (8,), generator=gen).tolist()
        # Penalties above and below 1 (below 1 favours repeats).
        repetition_penalty = [1.3, 0.7, 1.8][len(cases) % 3]
        temperature = [0.7, 1.0, 1.6][len(cases) % 3]
        top_k = [1, 5, 17][len(cases) % 3]
        top_p = round(torch.empty(1).uniform_(0.3, 0.95, generator=gen).item(), 3)
        min_p = round(torch.empty(1).uniform_(0.02, 0.4, generator=gen).item(), 3)
        chain_k, chain_p, chain_min_p = 20, 0.9, 0.05

        ids = torch.tensor([prompt + generated])
        rep = RepetitionPenaltyLogitsProcessor(repetition_penalty)(ids, logits.clone())
        warm = TemperatureLogitsWarper(temperature)(ids, logits.clone())
        after_k = TopKLogitsWarper(top_k)(ids, warm.clone())
        after_p = TopPLogitsWarper(top_p)(ids, warm.clone())
        after_min_p = MinPLogitsWarper(min_p)(ids, warm.clone())
        chain = TopKLogitsWarper(chain_k)(ids, warm.clone())
        chain_margin_p = top_p_margin(chain, chain_p)
        chain = TopPLogitsWarper(chain_p)(ids, chain)
        chain_margin_min_p = min_p_margin(chain, chain_min_p)
        chain = MinPLogitsWarper(chain_min_p)(ids, chain)
        margins = [top_p_margin(warm, top_p), min_p_margin(warm, min_p), chain_margin_p, chain_margin_min_p]
        if min(margins) < MARGIN:
            continue
        cases.append({
            "logits": rounded(logits[0].tolist()),
            "prompt": prompt,
            "generated": generated,
            "repetition_penalty": repetition_penalty,
            "repetition_penalized": rounded(rep[0].tolist()),
            "temperature": temperature,
            "temperature_scaled": rounded(warm[0].tolist()),
            "top_k": top_k,
            "top_k_kept": kept(after_k),
            "top_p": top_p,
            "top_p_kept": kept(after_p),
            "min_p": min_p,
            "min_p_kept": kept(after_min_p),
            "chain": {"top_k": chain_k, "top_p": chain_p, "min_p": chain_min_p, "kept": kept(chain)},
            "log_softmax": rounded(torch.log_softmax(logits[0].double(), dim=-1).tolist()),
        })
    # The logits are stored rounded to 9 significant digits, which float32 reads back exactly; the
    # references were computed from the same float32 values.
    doc = {
        "generator": "scripts/make_sampling_goldens.py",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "vocab": VOCAB,
        "cases": cases,
    }
    # One case per line: small, and a regenerated file diffs by case.
    body = json.dumps({k: v for k, v in doc.items() if k != "cases"}, indent=1)[:-2]
    body += ',\n "cases": [\n  ' + ",\n  ".join(json.dumps(c) for c in cases) + "\n ]\n}\n"
    with open(OUT, "w") as f:
        f.write(body)
    print(f"wrote {len(cases)} cases to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()

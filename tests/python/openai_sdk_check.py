#!/usr/bin/env python3
"""Drives an InferFlux server with the official `openai` Python package, as a user's code would.

Run by tests/python_clients.rs (`cargo test --release openai`) against a server on a tiny fixture
with a chat template; by hand: `python tests/python/openai_sdk_check.py --base-url
http://127.0.0.1:8080/v1`. Every check runs and prints one line (`ok` or `FAIL` and why); the exit
status is 1 when any failed. vLLM-only fields go through `extra_body`, as vLLM's docs show.
"""

import argparse
import sys
import traceback

import openai
from openai import OpenAI

PROMPT = "Hello, my name is"
MESSAGES = [{"role": "user", "content": "Hello, who are you?"}]
CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


class Ctx:
    def __init__(self, client: OpenAI, model: str):
        self.client = client
        self.model = model

    def complete(self, **kw):
        return self.client.completions.create(model=self.model, prompt=kw.pop("prompt", PROMPT), **kw)

    def chat(self, **kw):
        return self.client.chat.completions.create(
            model=self.model, messages=kw.pop("messages", MESSAGES), **kw
        )

    def complete_stream(self, **kw):
        """(text per choice index, every chunk) of a streamed completion."""
        chunks = list(self.complete(stream=True, **kw))
        texts = {}
        for c in chunks:
            for ch in c.choices:
                texts[ch.index] = texts.get(ch.index, "") + ch.text
        return texts, chunks

    def chat_stream(self, **kw):
        """(answer per choice index, every chunk) of a streamed chat completion."""
        chunks = list(self.chat(stream=True, **kw))
        texts = {}
        for c in chunks:
            for ch in c.choices:
                texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
        return texts, chunks


def last_finish_reason(chunks, index=0):
    reasons = [ch.finish_reason for c in chunks for ch in c.choices if ch.index == index and ch.finish_reason]
    assert len(reasons) == 1, f"choice {index}: exactly one chunk carries finish_reason, got {reasons}"
    return reasons[0]


def extra(obj, name):
    """A vLLM field the SDK's types do not declare (kept by its models as extras)."""
    return (obj.model_extra or {}).get(name)


@check
def models_list_names_the_served_model(ctx):
    ids = [m.id for m in ctx.client.models.list()]
    assert ids == [ctx.model], f"models.list() should list the served model only, got {ids}"


@check
def completion_greedy_stream_equals_whole(ctx):
    whole = ctx.complete(max_tokens=24, temperature=0)
    texts, chunks = ctx.complete_stream(max_tokens=24, temperature=0)
    assert whole.object == "text_completion", whole.object
    assert whole.choices[0].text, "the greedy completion is not empty"
    assert texts[0] == whole.choices[0].text, f"streamed {texts[0]!r} != whole {whole.choices[0].text!r}"
    assert last_finish_reason(chunks) == whole.choices[0].finish_reason
    assert whole.usage.completion_tokens >= 1 and whole.usage.total_tokens == (
        whole.usage.prompt_tokens + whole.usage.completion_tokens
    ), whole.usage


@check
def chat_greedy_stream_equals_whole(ctx):
    whole = ctx.chat(max_tokens=24, temperature=0)
    texts, chunks = ctx.chat_stream(max_tokens=24, temperature=0)
    assert whole.object == "chat.completion", whole.object
    msg = whole.choices[0].message
    assert msg.role == "assistant", msg.role
    assert texts[0] == msg.content, f"streamed {texts[0]!r} != whole {msg.content!r}"
    assert chunks[0].choices[0].delta.role == "assistant", "the first chunk carries the role"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert last_finish_reason(chunks) == whole.choices[0].finish_reason


def pick_stop(text):
    """A two-character piece of `text` whose first occurrence is at index 3 or later."""
    for k in range(3, len(text) - 1):
        stop = text[k : k + 2]
        if stop.strip() and text.find(stop) >= 3:
            return stop, text[: text.find(stop)]
    raise AssertionError(f"no usable stop string in the greedy text {text!r}")


@check
def completion_stop_ends_before_the_stop_string(ctx):
    greedy = ctx.complete(max_tokens=24, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    stop, before = pick_stop(greedy)
    whole = ctx.complete(max_tokens=24, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    choice = whole.choices[0]
    assert choice.text == before, f"stop {stop!r} in {greedy!r}: got {choice.text!r}, want {before!r}"
    assert choice.finish_reason == "stop", choice.finish_reason
    assert extra(choice, "stop_reason") == stop, f"stop_reason {extra(choice, 'stop_reason')!r}"
    texts, chunks = ctx.complete_stream(
        max_tokens=24, temperature=0, stop=stop, extra_body={"ignore_eos": True}
    )
    assert texts[0] == before, f"streamed {texts[0]!r}, want {before!r}"
    assert last_finish_reason(chunks) == "stop"


@check
def chat_stop_ends_before_the_stop_string(ctx):
    greedy = ctx.chat(max_tokens=24, temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content
    stop, before = pick_stop(greedy)
    whole = ctx.chat(max_tokens=24, temperature=0, stop=stop, extra_body={"ignore_eos": True})
    assert whole.choices[0].message.content == before, (
        f"stop {stop!r} in {greedy!r}: got {whole.choices[0].message.content!r}, want {before!r}"
    )
    assert whole.choices[0].finish_reason == "stop", whole.choices[0].finish_reason


@check
def completion_seed_reproduces_and_varies(ctx):
    def sample(seed):
        return ctx.complete(max_tokens=32, temperature=1, seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    first, again, other = sample(1234), sample(1234), sample(4321)
    assert first == again, f"same seed, different text: {first!r} vs {again!r}"
    assert first != other, f"seeds 1234 and 4321 gave the same 32 tokens: {first!r}"


@check
def chat_seed_reproduces_and_varies(ctx):
    def sample(seed):
        return (
            ctx.chat(max_tokens=32, temperature=1, seed=seed, extra_body={"ignore_eos": True})
            .choices[0]
            .message.content
        )

    first, again, other = sample(99), sample(99), sample(100)
    assert first == again, f"same seed, different answer: {first!r} vs {again!r}"
    assert first != other, f"seeds 99 and 100 gave the same 32 tokens: {first!r}"


@check
def completion_logprobs(ctx):
    resp = ctx.complete(max_tokens=8, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert lp is not None, "logprobs=2 answers choices[0].logprobs"
    n = resp.usage.completion_tokens
    assert len(lp.tokens) == n, f"{len(lp.tokens)} tokens for {n} completion tokens"
    assert len(lp.token_logprobs) == n and len(lp.text_offset) == n, lp
    assert all(x <= 0 for x in lp.token_logprobs), f"log probabilities are <= 0: {lp.token_logprobs}"
    assert len(lp.top_logprobs) == n, lp.top_logprobs
    for i, top in enumerate(lp.top_logprobs):
        assert 1 <= len(top) <= 2, f"token {i}: {len(top)} alternatives for logprobs=2: {top}"
        assert abs(max(top.values()) - lp.token_logprobs[i]) < 1e-4, (
            f"token {i}: greedy picked logprob {lp.token_logprobs[i]} but the best alternative has {top}"
        )
    assert lp.text_offset == sorted(lp.text_offset), f"text offsets increase: {lp.text_offset}"


@check
def chat_logprobs(ctx):
    resp = ctx.chat(max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert lp is not None and lp.content, "logprobs=True answers choices[0].logprobs.content"
    n = resp.usage.completion_tokens
    assert len(lp.content) == n, f"{len(lp.content)} entries for {n} completion tokens"
    for i, entry in enumerate(lp.content):
        assert entry.logprob <= 0, f"token {i}: logprob {entry.logprob} > 0"
        top = entry.top_logprobs
        assert 1 <= len(top) <= 2, f"token {i}: {len(top)} alternatives for top_logprobs=2"
        assert all(t.logprob <= 0 for t in top), top
        assert entry.token == top[0].token, (
            f"token {i}: greedy chose {entry.token!r} but the top alternative is {top[0].token!r}"
        )


@check
def completion_n2(ctx):
    resp = ctx.complete(max_tokens=8, temperature=1, n=2)
    assert sorted(c.index for c in resp.choices) == [0, 1], [c.index for c in resp.choices]
    texts, chunks = ctx.complete_stream(max_tokens=8, temperature=1, n=2)
    assert set(texts) == {0, 1}, f"streamed chunks for choices {sorted(texts)}"
    for i in (0, 1):
        last_finish_reason(chunks, i)


@check
def chat_n2(ctx):
    resp = ctx.chat(max_tokens=8, temperature=1, n=2)
    assert sorted(c.index for c in resp.choices) == [0, 1], [c.index for c in resp.choices]
    texts, chunks = ctx.chat_stream(max_tokens=8, temperature=1, n=2)
    assert set(texts) == {0, 1}, f"streamed chunks for choices {sorted(texts)}"
    for i in (0, 1):
        last_finish_reason(chunks, i)


def check_usage_chunk(chunks, max_tokens, whole_usage):
    last = chunks[-1]
    assert last.choices == [], f"the usage chunk has empty choices, got {last.choices}"
    assert last.usage is not None, "the last chunk before [DONE] carries usage"
    assert last.usage.completion_tokens == max_tokens, f"{last.usage} for {max_tokens} streamed tokens"
    assert last.usage.prompt_tokens == whole_usage.prompt_tokens, (last.usage, whole_usage)
    assert all(c.usage is None for c in chunks[:-1]), "only the last chunk carries usage"


@check
def completion_stream_include_usage(ctx):
    kw = dict(max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    whole = ctx.complete(**kw)
    texts, chunks = ctx.complete_stream(stream_options={"include_usage": True}, **kw)
    assert texts[0] == whole.choices[0].text
    check_usage_chunk(chunks, 6, whole.usage)


@check
def chat_stream_include_usage(ctx):
    kw = dict(max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    whole = ctx.chat(**kw)
    texts, chunks = ctx.chat_stream(stream_options={"include_usage": True}, **kw)
    assert texts[0] == whole.choices[0].message.content
    check_usage_chunk(chunks, 6, whole.usage)


@check
def completion_echo_starts_with_the_prompt(ctx):
    resp = ctx.complete(max_tokens=4, temperature=0, echo=True, extra_body={"ignore_eos": True})
    text = resp.choices[0].text
    assert text.startswith(PROMPT), f"echo=True: {text!r} does not start with {PROMPT!r}"
    assert len(text) > len(PROMPT), "the completion follows the prompt"


@check
def chat_max_completion_tokens(ctx):
    resp = ctx.chat(max_completion_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 5, resp.usage
    assert resp.choices[0].finish_reason == "length", resp.choices[0].finish_reason


@check
def unknown_model_is_not_found(ctx):
    for call in (
        lambda: ctx.client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2),
        lambda: ctx.client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=2),
    ):
        try:
            call()
        except openai.NotFoundError as e:
            assert e.code == "model_not_found", e.code
        else:
            raise AssertionError("an unknown model was served")


@check
def bad_parameter_is_a_bad_request_naming_it(ctx):
    for call in (lambda: ctx.complete(max_tokens=2, temperature=5), lambda: ctx.chat(max_tokens=2, temperature=5)):
        try:
            call()
        except openai.BadRequestError as e:
            message = e.body.get("message", "") if isinstance(e.body, dict) else str(e)
            assert "temperature" in message, f"the message names the parameter: {message!r}"
            assert e.param == "temperature", f"error.param is {e.param!r}"
        else:
            raise AssertionError("temperature=5 was accepted")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--only", nargs="*", help="run only checks whose names contain one of these")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)
    models = client.models.list().data
    assert models, "the server lists a model"
    ctx = Ctx(client, models[0].id)
    print(f"openai {openai.__version__} against {args.base_url}, model {ctx.model}")
    failed = []
    for fn in CHECKS:
        if args.only and not any(o in fn.__name__ for o in args.only):
            continue
        try:
            fn(ctx)
            print(f"ok   {fn.__name__}", flush=True)
        except Exception as e:  # every check runs; each failure is reported with its cause
            failed.append(fn.__name__)
            print(f"FAIL {fn.__name__}: {type(e).__name__}: {e}", flush=True)
            if not isinstance(e, (AssertionError, openai.APIError)):
                traceback.print_exc(file=sys.stdout)
    print(f"{len(failed)} of {len(CHECKS)} checks failed: {' '.join(failed)}" if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

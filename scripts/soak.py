#!/usr/bin/env python3
"""Soak test driver (scripts/soak.sh starts the server and runs this).

Many concurrent clients, for at most --duration seconds and --max-requests requests, against a
server on the loopback interface: streamed completions (some dropped half-way), plain ones,
admin cancels of running streams, and bad requests. Every response must be well formed (JSON
bodies with `choices` or `error`; SSE whose events parse and that ends in `[DONE]` or an error
event), no 5xx, no transport error the client did not cause. At the end no KV page may be
referenced, resident memory may not have grown past the bound after warm-up, and /health must
answer. Prints one summary line; exits 1 on any failure.
"""

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from urllib.parse import urlparse

try:  # the openai SDK in target/py-venv brings httpx under this name
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

PROMPTS = ["Once upon a time", "The quick brown fox", "In a hole in the ground", "a", "1 2 3 4 5"]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def sse_lines(resp):
    """The lines of an SSE body, split only where SSE splits them (LF, CR LF): httpx's
    `aiter_lines` also splits at U+2028, U+0085 and the like, which JSON strings may hold raw."""
    buf = b""
    async for chunk in resp.aiter_bytes():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", "replace")
    if buf:
        yield buf.rstrip(b"\r").decode("utf-8", "replace")


class Soak:
    def __init__(self, args):
        self.args = args
        self.base = args.base.rstrip("/")
        self.stats = Counter()
        self.failures = []
        self.issued = 0
        self.deadline = time.monotonic() + args.duration

    def fail(self, what):
        self.stats["failures"] += 1
        if len(self.failures) < 20:
            self.failures.append(what)

    def take_ticket(self):
        if time.monotonic() >= self.deadline or self.issued >= self.args.max_requests:
            return False
        self.issued += 1
        return True

    def check_json_reply(self, what, status, text, headers):
        if status >= 500:
            self.stats["server_errors"] += 1
            self.fail(f"{what}: {status} {text[:200]}")
            return None
        try:
            body = json.loads(text)
        except ValueError:
            self.stats["malformed"] += 1
            self.fail(f"{what}: {status} body is not JSON: {text[:200]!r}")
            return None
        if status == 200:
            if not isinstance(body, dict) or not body.get("choices"):
                self.stats["malformed"] += 1
                self.fail(f"{what}: 200 without choices: {text[:200]}")
        else:
            err = body.get("error") if isinstance(body, dict) else None
            if not isinstance(err, dict) or not isinstance(err.get("message"), str):
                self.stats["malformed"] += 1
                self.fail(f"{what}: {status} without OpenAI error JSON: {text[:200]}")
            if status == 429:
                self.stats["rejected_429"] += 1
                if "retry-after" not in headers:
                    self.fail(f"{what}: 429 without Retry-After")
        return body

    async def stream(self, client, body, drop_after=None, cancel=False):
        """A streamed completion; `drop_after` events then hang up, or `cancel` it via admin."""
        events = 0
        ended = None
        async with client.stream("POST", f"{self.base}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", "replace")
                self.check_json_reply("stream", resp.status_code, text, resp.headers)
                return
            if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                self.stats["malformed"] += 1
                self.fail("stream: 200 that is not text/event-stream")
                return
            request_id = resp.headers.get("x-request-id")
            async for line in sse_lines(resp):
                if not line.startswith("data: "):
                    if line.strip():
                        self.stats["malformed"] += 1
                        self.fail(f"stream: unexpected line {line[:100]!r}")
                    continue
                data = line[len("data: "):]
                if ended is not None:
                    self.stats["malformed"] += 1
                    self.fail(f"stream: data after the end ({ended}): {data[:100]}")
                    return
                if data == "[DONE]":
                    ended = "done"
                    continue
                try:
                    event = json.loads(data)
                except ValueError:
                    self.stats["malformed"] += 1
                    self.fail(f"stream: event is not JSON: {data[:100]!r}")
                    return
                if "error" in event:
                    ended = "error"
                    self.stats["stream_error_events"] += 1
                    continue
                if "choices" not in event:
                    self.stats["malformed"] += 1
                    self.fail(f"stream: event without choices: {data[:100]}")
                    return
                events += 1
                if cancel and events == 1 and request_id:
                    r = await client.post(f"{self.base}/admin/requests/{request_id}/cancel")
                    if r.status_code not in (200, 404):  # 404: it had already finished
                        self.fail(f"cancel: {r.status_code} {r.text[:200]}")
                    self.stats["cancels"] += 1
                if drop_after is not None and events >= drop_after:
                    self.stats["disconnects"] += 1
                    return  # leaving the block closes the connection mid-stream
        if ended is None:
            self.stats["malformed"] += 1
            self.fail("stream: ended without [DONE] or an error event")
        else:
            self.stats["streams_completed"] += 1

    async def bad_request(self, client):
        kind = random.choice(["json", "negative", "unknown", "nested", "utf8", "nan", "types", "huge"])
        payload = {
            "json": b'{"prompt": "a", ',
            "negative": b'{"prompt": "a", "max_tokens": -3}',
            "unknown": b'{"prompt": "a", "frobnicate": 1}',
            "nested": b'{"prompt": ' + b"[" * 5000 + b"1" + b"]" * 5000 + b"}",
            "utf8": b'{"prompt": "\xff\xfe"}',
            "nan": b'{"prompt": "a", "temperature": NaN}',
            "types": b'{"prompt": {"a": 1}, "stream": "yes"}',
            "huge": b'{"prompt": "a", "max_tokens": 100000000000000000000}',
        }[kind]
        r = await client.post(
            f"{self.base}/v1/completions", content=payload, headers={"content-type": "application/json"}
        )
        self.check_json_reply(f"bad {kind}", r.status_code, r.text, r.headers)
        if not 400 <= r.status_code < 500:
            self.fail(f"bad {kind}: expected 4xx, got {r.status_code}")
        else:
            self.stats["bad_requests_4xx"] += 1

    async def one(self, client):
        prompt = random.choice(PROMPTS)
        body = {
            "prompt": prompt,
            "max_tokens": random.randint(1, 48),
            "temperature": random.choice([0, 0.7, 1.0]),
            "ignore_eos": random.random() < 0.5,
        }
        roll = random.random()
        if roll < 0.40:
            body["stream"] = True
            if random.random() < 0.3:
                body["stream_options"] = {"include_usage": True}
            await self.stream(client, body)
        elif roll < 0.55:
            body["stream"] = True
            await self.stream(client, body, drop_after=random.randint(1, 4))
        elif roll < 0.65:
            body.update(stream=True, max_tokens=200, ignore_eos=True)
            await self.stream(client, body, cancel=True)
        elif roll < 0.80:
            if random.random() < 0.2:
                body["n"] = random.randint(2, 3)
            r = await client.post(f"{self.base}/v1/completions", json=body)
            self.check_json_reply("completion", r.status_code, r.text, r.headers)
            if r.status_code == 200:
                self.stats["completions"] += 1
        elif roll < 0.95:
            await self.bad_request(client)
        else:
            r = await client.post(f"{self.base}/tokenize", json={"prompt": prompt})
            if r.status_code != 200:
                self.fail(f"tokenize: {r.status_code} {r.text[:200]}")

    async def worker(self, client):
        while self.take_ticket():
            try:
                await self.one(client)
                self.stats["requests"] += 1
            except (httpx.TransportError, httpx.StreamError) as e:
                self.stats["transport_errors"] += 1
                self.fail(f"transport error: {type(e).__name__}: {e}")

    async def wait_for_no_pages(self, client, within=15.0):
        end = time.monotonic() + within
        while True:
            report = (await client.get(f"{self.base}/admin/kv")).json()
            if report["used_pages"] == 0 or time.monotonic() > end:
                return report["used_pages"]
            await asyncio.sleep(0.1)

    async def run(self):
        limits = httpx.Limits(max_connections=self.args.concurrency + 8, max_keepalive_connections=8)
        timeout = httpx.Timeout(60.0)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            workers = [asyncio.create_task(self.worker(client)) for _ in range(self.args.concurrency)]
            warm_at = time.monotonic() + min(self.args.warmup, self.args.duration / 3)
            rss_warm = None
            rss_peak = 0
            while not all(w.done() for w in workers):
                await asyncio.sleep(0.5)
                rss = rss_kib(self.args.pid)
                rss_peak = max(rss_peak, rss)
                if rss_warm is None and time.monotonic() >= warm_at:
                    rss_warm = rss
            await asyncio.gather(*workers)
            leaked = await self.wait_for_no_pages(client)
            rss_end = rss_kib(self.args.pid)
            rss_warm = rss_warm or rss_end
            health = (await client.get(f"{self.base}/health")).status_code
        bound = rss_warm + max(self.args.rss_slack_mib * 1024, rss_warm * self.args.rss_slack_frac)
        if leaked:
            self.fail(f"{leaked} KV pages still referenced after every request ended")
        if rss_end > bound:
            self.fail(f"resident memory grew from {rss_warm} KiB after warm-up to {rss_end} KiB (bound {bound:.0f})")
        if health != 200:
            self.fail(f"/health answered {health}")
        s = self.stats
        ok = not self.failures
        print(
            f"soak: {'PASS' if ok else 'FAIL'} duration={self.args.duration:.0f}s requests={s['requests']} "
            f"streams_completed={s['streams_completed']} completions={s['completions']} "
            f"disconnects={s['disconnects']} cancels={s['cancels']} bad_requests_4xx={s['bad_requests_4xx']} "
            f"rejected_429={s['rejected_429']} stream_error_events={s['stream_error_events']} "
            f"malformed={s['malformed']} server_errors={s['server_errors']} "
            f"transport_errors={s['transport_errors']} leaked_pages={leaked} "
            f"rss_warm_mib={rss_warm / 1024:.1f} rss_end_mib={rss_end / 1024:.1f} "
            f"rss_peak_mib={rss_peak / 1024:.1f} health={health}",
            flush=True,
        )
        for f in self.failures:
            print(f"  failure: {f}", file=sys.stderr)
        return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="server URL on the loopback interface")
    p.add_argument("--pid", type=int, required=True, help="the server's process id (for VmRSS)")
    p.add_argument("--duration", type=float, default=120)
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, default=24)
    p.add_argument("--warmup", type=float, default=20, help="seconds before the RSS baseline")
    p.add_argument("--rss-slack-mib", type=float, default=16)
    p.add_argument("--rss-slack-frac", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()
    host = urlparse(args.base).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"soak: refusing {host}: loopback only")
    random.seed(args.seed)
    sys.exit(asyncio.run(Soak(args).run()))


if __name__ == "__main__":
    main()

"""Serving benchmark against any OpenAI-compatible endpoint (our server, our router, SGLang, vLLM).

    python -m disagg.common.bench.serving --base-url http://127.0.0.1:30000 --num-prompts 64 \\
        --request-rate 4 --input-len 256 --output-len 64 --random-range-ratio 0.5 --goodput ttft:500 itl:50

Requests stream from /v1/completions (`ignore_eos`, so outputs have the asked length), arriving as a
Poisson process at --request-rate (inf: all at once), at most --max-concurrency in flight. Prompts
are random tokens decoded to text (--dataset random) or lines of a text file (--dataset text).
Reported: request throughput, input/output tokens/s, TTFT, ITL, TPOT and E2E latency (mean, p50,
p90, p99), and goodput: completed requests per second whose TTFT and mean ITL are within the limits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int = 0
    ok: bool = False
    error: str = ""
    ttft: float = 0.0  # seconds to the first text
    itls: list[float] = field(default_factory=list)  # seconds between later chunks
    e2e: float = 0.0

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_len - 1) if self.output_len > 1 else 0.0


def sample_lengths(rng: random.Random, n: int, length: int, ratio: float) -> list[int]:
    """n lengths uniform in [length * ratio, length] (ratio 1: all equal), SGLang's convention."""
    low = max(1, int(length * ratio))
    return [rng.randint(low, length) for _ in range(n)]


def make_prompts(args, tokenizer, rng: random.Random) -> list[tuple[str, int, int]]:
    """(prompt text, prompt tokens, output tokens) per request."""
    in_lens = sample_lengths(rng, args.num_prompts, args.input_len, args.random_range_ratio)
    out_lens = sample_lengths(rng, args.num_prompts, args.output_len, args.random_range_ratio)
    if args.dataset == "text":
        with open(args.dataset_path) as f:
            lines = [line.strip() for line in f if line.strip()]
        token_lists = [tokenizer.encode(lines[i % len(lines)])[:n] for i, n in enumerate(in_lens)]
    else:
        special = set(tokenizer.all_special_ids)
        vocab = [t for t in range(tokenizer.vocab_size) if t not in special]
        token_lists = [[rng.choice(vocab) for _ in range(n)] for n in in_lens]
    prompts = []
    for ids, out_len in zip(token_lists, out_lens, strict=True):
        text = tokenizer.decode(ids)
        prompts.append((text, len(tokenizer.encode(text, add_special_tokens=False)), out_len))
    return prompts


async def one_request(
    client: httpx.AsyncClient, args, prompt: str, prompt_len: int, out_len: int
) -> RequestResult:
    body = {"model": args.model, "prompt": prompt, "max_tokens": out_len, "temperature": args.temperature,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    res, start = RequestResult(prompt_len), time.perf_counter()
    last, chunks = start, 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    res.error = str(data["error"])
                    return res
                now = time.perf_counter()
                if data.get("usage"):
                    res.prompt_len = data["usage"]["prompt_tokens"]
                    res.output_len = data["usage"]["completion_tokens"]
                choice = (data.get("choices") or [None])[0]
                # a token arrived: text, or an empty delta before the end (special tokens, held-back text)
                if choice and (choice.get("text") or choice.get("finish_reason") is None):
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itls.append(now - last)
                    chunks, last = chunks + 1, now
        res.e2e = time.perf_counter() - start
        res.output_len = res.output_len or chunks
        res.ok = chunks > 0
        res.error = "" if res.ok else "no tokens received"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def arrivals(n: int, rate: float, rng: random.Random):
    """Yield request indices at Poisson arrival times (rate inf: at once)."""
    for i in range(n):
        yield i
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))


async def run(args, prompts) -> tuple[list[RequestResult], float]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.timeout)
    async with httpx.AsyncClient(
        base_url=args.base_url, limits=limits, headers=headers, timeout=timeout
    ) as client:
        if args.model is None:
            args.model = (await client.get("/v1/models")).json()["data"][0]["id"]
        for _ in range(args.warmup_requests):
            warm = await one_request(client, args, prompts[0][0], prompts[0][1], 4)
            if not warm.ok:
                raise SystemExit(f"warm-up request failed: {warm.error}")
        sem = asyncio.Semaphore(args.max_concurrency or len(prompts))

        async def limited(i: int) -> RequestResult:
            async with sem:
                return await one_request(client, args, *prompts[i])

        rng, tasks, start = random.Random(args.seed + 1), [], time.perf_counter()
        async for i in arrivals(len(prompts), args.request_rate, rng):
            tasks.append(asyncio.create_task(limited(i)))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def percentiles(values: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    a = np.asarray(values) * scale
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}  # fmt: skip


def parse_goodput(items: list[str]) -> dict[str, float]:
    limits = {}
    for item in items or []:
        key, _, value = item.partition(":")
        if key not in ("ttft", "itl", "tpot", "e2e") or not value:
            raise SystemExit(f"--goodput takes ttft:MS itl:MS tpot:MS e2e:MS, got {item!r}")
        limits[key] = float(value) / 1000.0
    return limits


def is_good(r: RequestResult, limits: dict[str, float]) -> bool:
    mean_itl = sum(r.itls) / len(r.itls) if r.itls else 0.0
    got = {"ttft": r.ttft, "itl": mean_itl, "tpot": r.tpot, "e2e": r.e2e}
    return r.ok and all(got[k] <= v for k, v in limits.items())


def summarize(results: list[RequestResult], duration: float, limits: dict[str, float]) -> dict:
    done = [r for r in results if r.ok]
    summary = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "input_throughput": sum(r.prompt_len for r in done) / duration,
        "output_throughput": sum(r.output_len for r in done) / duration,
        "total_input_tokens": sum(r.prompt_len for r in done),
        "total_output_tokens": sum(r.output_len for r in done),
        "ttft_ms": percentiles([r.ttft for r in done]),
        "itl_ms": percentiles([x for r in done for x in r.itls]),
        "tpot_ms": percentiles([r.tpot for r in done if r.output_len > 1]),
        "e2e_ms": percentiles([r.e2e for r in done]),
    }
    if limits:
        summary["goodput_limits_ms"] = {k: v * 1000 for k, v in limits.items()}
        summary["goodput"] = sum(is_good(r, limits) for r in done) / duration
    errors = [r.error for r in results if not r.ok]
    if errors:
        summary["first_errors"] = errors[:3]
    return summary


def format_table(s: dict, args) -> str:
    mode = f"rate {args.request_rate}/s" + (
        f", max concurrency {args.max_concurrency}" if args.max_concurrency else ""
    )
    rows = [
        ("Mode", mode),
        ("Completed / failed requests", f"{s['completed']} / {s['failed']}"),
        ("Duration (s)", f"{s['duration_s']:.2f}"),
        ("Total input / output tokens", f"{s['total_input_tokens']} / {s['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
        ("Input token throughput (tok/s)", f"{s['input_throughput']:.1f}"),
        ("Output token throughput (tok/s)", f"{s['output_throughput']:.1f}"),
    ]
    if "goodput" in s:
        limits = " ".join(f"{k}<={v:g}ms" for k, v in s["goodput_limits_ms"].items())
        rows.append((f"Goodput (req/s, {limits})", f"{s['goodput']:.2f}"))
    lines = [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "| latency (ms) | mean | p50 | p90 | p99 |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, key in [("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("TPOT", "tpot_ms"), ("E2E", "e2e_ms")]:
        p = s[key]
        lines.append(f"| {name} | {p['mean']:.1f} | {p['p50']:.1f} | {p['p90']:.1f} | {p['p99']:.1f} |")
    return "| metric | value |\n| --- | --- |\n" + "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m disagg.common.bench.serving", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--model", default=None, help="default: the first model of /v1/models")
    p.add_argument(
        "--tokenizer", default=None, help="for prompt lengths (default: the embedded default model)"
    )
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument(
        "--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (inf: at once)"
    )
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--dataset", choices=["random", "text"], default="random")
    p.add_argument("--dataset-path", default=None, help="text file, one prompt per line (--dataset text)")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument(
        "--random-range-ratio", type=float, default=1.0, help="lengths uniform in [len*ratio, len]"
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--goodput", nargs="*", default=[], help="SLOs in ms: ttft:500 itl:50 (also tpot:, e2e:)")
    p.add_argument("--warmup-requests", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    if args.dataset == "text" and not args.dataset_path:
        p.error("--dataset text needs --dataset-path")
    if not 0 < args.random_range_ratio <= 1:
        p.error("--random-range-ratio must be in (0, 1]")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    limits = parse_goodput(args.goodput)
    from disagg.common.models.model_files import resolve_model_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or resolve_model_path(None))
    prompts = make_prompts(args, tokenizer, random.Random(args.seed))
    results, duration = asyncio.run(run(args, prompts))
    summary = summarize(results, duration, limits)
    print(format_table(summary, args))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "api_key"}, **summary,
                       "requests": [asdict(r) for r in results]}, f, indent=2, default=str)  # fmt: skip
    if summary["failed"]:
        print(f"{summary['failed']} requests failed, e.g. {summary['first_errors'][0]}", file=sys.stderr)


if __name__ == "__main__":
    main()

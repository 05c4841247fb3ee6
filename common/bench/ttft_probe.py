"""Time to first token of the PD path beside the colocated server's: starts nothing, only measures.

    python -m disagg.common.bench.ttft_probe --pd-url http://127.0.0.1:8000 --colocated-url http://127.0.0.1:30000 \
        --prompt-len 2048 --num-requests 12

Sends --num-requests sequential streaming `/v1/completions` (max_tokens 2, random token ids, a fresh
prompt each so no prefix cache helps: do not repeat a --seed against the same servers) to each URL, alternating the two so that machine noise hits
both alike, and prints TTFT p50/p90 for each and the PD/colocated ratio. TTFT is the client's: from
sending the request to the first streamed token, as `disagg.common.bench.serving` measures it (its
request function is used). Needs httpx and numpy (runs on the GPU image after
`source common/bench/gpu_env.sh`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys

import httpx
from disagg.common.bench import serving


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """Each prompt to every URL in turn (the order alternating), one request at a time."""
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    print(f"prompts: seed {seed}, {args.prompt_len} tokens")
    rng = random.Random(seed)
    targets = {"pd": args.pd_url, "colocated": args.colocated_url}
    targets = {k: v.rstrip("/") for k, v in targets.items() if v}
    ttfts: dict[str, list[float]] = {k: [] for k in targets}
    request = argparse.Namespace(model=None, temperature=0.0)  # what serving.one_request reads
    clients = {k: httpx.AsyncClient(base_url=url, timeout=args.timeout) for k, url in targets.items()}
    try:
        for i in range(args.warmup + args.num_requests):
            prompt = [rng.randrange(args.min_token_id, args.max_token_id) for _ in range(args.prompt_len)]
            order = list(targets) if i % 2 == 0 else list(reversed(targets))
            for name in order:
                r = await serving.one_request(clients[name], request, prompt, len(prompt), 2)
                if not r.ok:
                    raise RuntimeError(f"{targets[name]}: {r.error}")
                if i >= args.warmup:
                    ttfts[name].append(r.ttft)
    finally:
        for client in clients.values():
            await client.aclose()
    return ttfts


def report(ttfts: dict[str, list[float]]) -> dict:
    out = {}
    for name, values in ttfts.items():
        ms = [v * 1000 for v in values]
        out[name] = {"p50": percentile(ms, 0.5), "p90": percentile(ms, 0.9), "mean": statistics.fmean(ms),
                     "n": len(ms)}  # fmt: skip
        print(f"{name:>10}: TTFT p50 {out[name]['p50']:7.1f} ms  p90 {out[name]['p90']:7.1f} ms  "
              f"mean {out[name]['mean']:7.1f} ms  (n={len(ms)})")  # fmt: skip
    if "pd" in out and "colocated" in out:
        out["ratio_p50"] = out["pd"]["p50"] / out["colocated"]["p50"]
        out["ratio_p90"] = out["pd"]["p90"] / out["colocated"]["p90"]
        print(f"     ratio: PD / colocated p50 {out['ratio_p50']:.3f}  p90 {out['ratio_p90']:.3f}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ttft_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--pd-url", default=None, help="the PD router's URL")
    p.add_argument("--colocated-url", default=None, help="the colocated server's (or its router's) URL")
    p.add_argument("--prompt-len", type=int, default=2048, help="prompt tokens per request")
    p.add_argument("--num-requests", type=int, default=12, help="measured requests per URL")
    p.add_argument("--warmup", type=int, default=2, help="requests per URL before measuring")
    p.add_argument(
        "--min-token-id", type=int, default=1000, help="prompt token ids are drawn from [min, max)"
    )
    p.add_argument("--max-token-id", type=int, default=20000)
    p.add_argument("--seed", type=int, default=None,
                   help="prompt seed (default: a fresh one, so a second run hits no prefix cache)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--json", default=None, help="also write the numbers (and every TTFT) to this file")
    args = p.parse_args(argv)
    if not args.pd_url and not args.colocated_url:
        p.error("give --pd-url, --colocated-url or both")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        ttfts = asyncio.run(measure(args))
    except (httpx.HTTPError, RuntimeError) as e:
        print(f"ttft_probe: {e}", file=sys.stderr)
        sys.exit(1)
    out = report(ttfts)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**out, "ttft_s": ttfts, "prompt_len": args.prompt_len}, f, indent=1)


if __name__ == "__main__":
    main()

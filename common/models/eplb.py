"""Expert-parallel load balancing (EPLB): redundant experts placed by the recorded expert load.

`--ep-num-redundant-experts N` gives every MoE layer E + N physical expert slots, (E + N) / ep per
EP rank (common/models/moe.py). A placement says which logical expert each slot holds:
`balanced_placement` gives the N extra slots to the experts with the most load per copy, then packs
the copies onto the ranks heaviest first, each onto the least-loaded rank with a free slot that does
not hold that expert yet (DeepSeek's EPLB without its node hierarchy). Replicas hold the same
weights and each routed pair goes to exactly one of them, so outputs do not change, only which
rank computes them.

When a placement is applied: at start (p % E, or the one computed from `--init-expert-location
FILE`, a load file written by `save_expert_load` or by `python -m disagg.common.models.eplb
--metrics-url URL`), and from the load counted since the previous placement every
`--eplb-rebalance-num-iterations` forward steps or when the admin asks (`POST /eplb_rebalance`,
with `--enable-eplb`; the scheduler runs it between two steps). Rank 0 computes it and broadcasts a
`RebalanceMsg`; every rank moves the expert weights it now needs from the rank that has them by an
all-gather, one layer at a time.

Counting (`--enable-expert-distribution-metrics`, or any rebalancing) runs on rank 0 only: with TP
attention every rank routes every token, so rank 0's counts are the whole model's. They are exported
as `disagg_moe_expert_tokens_total{layer, expert}` on `/metrics` (layers x experts series).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from disagg.common.messages import message
from disagg.common.models.moe import SparseMoE, expert_load, set_expert_load_stats
from disagg.common.parallel.state import get_parallel
from torch import nn

logger = logging.getLogger(__name__)
METRIC = "disagg_moe_expert_tokens_total"
_LAYER = re.compile(r"layers\.(\d+)\.")


@message
@dataclass
class RebalanceMsg:
    """Rank 0 to its worker ranks: apply this placement now ({decoder layer id: [logical expert of
    each physical slot]})."""

    placement: dict[int, list[int]]


# ---- the placement ------------------------------------------------------------------------------


def replica_counts(load: list[float], num_physical: int, num_ranks: int) -> list[int]:
    """Copies per logical expert: one each, then each extra slot to the expert with the most load
    per copy (at most one copy per rank while any expert can still take one; ties: lowest id)."""
    counts = [1] * len(load)
    for _ in range(num_physical - len(load)):
        open_ = [e for e in range(len(load)) if counts[e] < num_ranks] or range(len(load))
        best = max(open_, key=lambda e: (load[e] / counts[e], -e))
        counts[best] += 1
    return counts


def balanced_placement(load: list[float], num_physical: int, num_ranks: int) -> list[int]:
    """The logical expert of each physical slot, rank by rank (slots [r * S, (r + 1) * S) are rank
    r's, S = num_physical / num_ranks), each rank's experts in ascending order."""
    slots = num_physical // num_ranks
    counts = replica_counts(load, num_physical, num_ranks)
    copies = sorted(((load[e] / counts[e], e) for e in range(len(load)) for _ in range(counts[e])),
                    key=lambda c: (-c[0], c[1]))  # fmt: skip
    rank_load, held = [0.0] * num_ranks, [[] for _ in range(num_ranks)]
    for share, expert in copies:
        free = [r for r in range(num_ranks) if len(held[r]) < slots]
        fresh = [r for r in free if expert not in held[r]] or free  # a second copy on one rank is wasted
        rank = min(fresh, key=lambda r: (rank_load[r], r))
        held[rank].append(expert)
        rank_load[rank] += share
    return [e for r in range(num_ranks) for e in sorted(held[r])]


def rank_loads(load: list[float], placement: list[int], num_ranks: int) -> list[float]:
    """Each rank's share of `load` under this placement, each expert's load split evenly over its
    copies (as pairs are spread over them)."""
    copies = [placement.count(e) for e in range(len(load))]
    slots = len(placement) // num_ranks
    return [
        sum(load[e] / copies[e] for e in placement[r * slots : (r + 1) * slots]) for r in range(num_ranks)
    ]


def balancedness(load: list[float], placement: list[int], num_ranks: int) -> float:
    """Mean over max of the ranks' loads under this placement (1.0: even)."""
    per_rank = rank_loads(load, placement, num_ranks)
    return sum(per_rank) / num_ranks / max(per_rank) if max(per_rank) > 0 else 1.0


def placement_summary(
    load: dict[int, list[float]], before: dict[int, list[int]], after: dict[int, list[int]], num_ranks: int
) -> dict:
    """What a re-placement did, per MoE layer and overall (the /eplb_rebalance answer): the ranks'
    loads under the old and the new placement for the same counted load."""
    layers = []
    for layer, row in load.items():
        old, new = before[layer], after.get(layer, before[layer])
        layers.append({
            "layer": layer, "routed_pairs": int(sum(row)), "moved": new != old, "physical_to_logical": new,
            "rank_load_before": rank_loads(row, old, num_ranks), "rank_load_after": rank_loads(row, new, num_ranks),
            "balancedness_before": balancedness(row, old, num_ranks),
            "balancedness_after": balancedness(row, new, num_ranks),
        })  # fmt: skip
    counted = [entry for entry in layers if entry["routed_pairs"]] or layers

    def mean(key: str) -> float:
        return sum(entry[key] for entry in counted) / max(1, len(counted))

    return {"num_layers": len(layers), "num_layers_moved": sum(entry["moved"] for entry in layers),
            "routed_pairs": sum(entry["routed_pairs"] for entry in layers),
            "balancedness_before": mean("balancedness_before"), "balancedness_after": mean("balancedness_after"),
            "layers": layers}  # fmt: skip


# ---- load files ---------------------------------------------------------------------------------


def save_expert_load(path: str | Path, load: dict[int, list[int]]) -> None:
    """{decoder layer id: [routed pairs per logical expert]} as an --init-expert-location file."""
    Path(path).write_text(json.dumps({"logical_count": {str(k): v for k, v in load.items()}}))


def read_expert_load(path: str | Path) -> dict[int, list[float]]:
    data = json.loads(Path(path).read_text())
    if "logical_count" not in data:
        raise ValueError(
            f"--init-expert-location {path}: no 'logical_count' (write it with save_expert_load)"
        )
    return {int(k): [float(n) for n in v] for k, v in data["logical_count"].items()}


def load_from_metrics(text: str) -> dict[int, list[int]]:
    """The per-layer expert counts in a /metrics scrape (disagg_moe_expert_tokens_total)."""
    found: dict[int, dict[int, int]] = {}
    for labels, value in re.findall(METRIC + r"\{([^}]*)\}\s+(\S+)", text):
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        found.setdefault(int(label["layer"]), {})[int(label["expert"])] = int(float(value))
    return {layer: [row.get(e, 0) for e in range(max(row) + 1)] for layer, row in sorted(found.items())}


# ---- applying a placement -----------------------------------------------------------------------


def moe_layers(model: nn.Module) -> dict[int, SparseMoE]:
    """{decoder layer id: its MoE layer}."""
    return {int(_LAYER.search(n).group(1)): m for n, m in model.named_modules() if isinstance(m, SparseMoE)}


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    ps = get_parallel()
    if ps.tp_size == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(ps.tp_size)]
    dist.all_gather(parts, t.contiguous(), group=ps.group)
    return parts


@torch.no_grad()
def move_experts(moe: SparseMoE, placement: list[int]) -> None:
    """Fill this rank's slots with the weights `placement` gives them, each from the first slot that
    holds that expert now (on whichever rank). Every rank of the TP group calls it (collective)."""
    ps = get_parallel()
    moe_tp = ps.tp_size // ps.ep_size
    source = {}
    for slot, expert in enumerate(moe.physical_to_logical):
        source.setdefault(expert, slot)
    wanted = placement[moe.first_expert : moe.first_expert + moe.num_local]
    # FP8 experts: the weights and their block scales move together (FP8 bytes gathered as uint8)
    for weight in moe.experts.parameters():
        data = weight.data.view(torch.uint8) if weight.dtype == torch.float8_e4m3fn else weight.data
        parts = _gather(data)  # [tp ranks] x [slots, ...]; the same moe_tp_rank holds our shard
        rows = [
            parts[source[e] // moe.num_local * moe_tp + moe.moe_tp_rank][source[e] % moe.num_local]
            for e in wanted
        ]
        data.copy_(torch.stack(rows))
        del parts


def apply_placement(model: nn.Module, placement: dict[int, list[int]], force: bool = False) -> None:
    """Move the weights, then route by the new maps (collective over the TP group). force: copy
    even into slots whose expert does not change (makes replicas equal to their first copy)."""
    for layer, moe in moe_layers(model).items():
        new = placement.get(layer)
        if new is not None and (force or new != moe.physical_to_logical):
            move_experts(moe, new)
            moe.set_placement(new)


def initial_placement(moes: dict[int, SparseMoE], path: str | None, num_ranks: int) -> dict[int, list[int]]:
    """From the load file if given (layers it lacks keep p % E), else p % E."""
    load = read_expert_load(path) if path else {}
    out = {}
    for layer, moe in moes.items():
        row = load.get(layer)
        if row is not None and len(row) != moe.num_experts:
            raise ValueError(
                f"--init-expert-location: layer {layer} has {len(row)} experts, the model {moe.num_experts}"
            )
        default = [p % moe.num_experts for p in range(moe.num_physical)]
        out[layer] = balanced_placement(row, moe.num_physical, num_ranks) if row else default
    return out


class ExpertBalancer:
    """One rank's expert-load counters and EPLB placements (ModelRunner owns one for MoE models)."""

    def __init__(self, model: nn.Module, config):
        self.model, self.moes = model, moe_layers(model)
        self.every = config.eplb_rebalance_num_iterations
        self.export = config.enable_expert_distribution_metrics
        ps = get_parallel()
        self.is_rank0 = ps.tp_rank == 0
        # the load a re-placement is computed from: periodic (--eplb-rebalance-num-iterations) or
        # asked for (--enable-eplb: POST /eplb_rebalance)
        self.counting = self.export or self.every > 0 or getattr(config, "enable_eplb", False)
        if self.is_rank0 and self.counting:
            set_expert_load_stats(model, True)  # before CUDA graphs are captured
        self.steps = 0
        self.window_start = expert_load(model)  # counts at the last placement
        if any(m.remap for m in self.moes.values()):
            # NOTE: dummy weights give each replica its own random values: copying the first one
            # keeps replicas equal (the same tokens whichever copy computes a pair)
            placement = initial_placement(self.moes, config.init_expert_location, ps.ep_size)
            apply_placement(model, placement, force=config.load_format == "dummy")

    def expert_tokens(self) -> dict[int, list[int]]:
        """{layer id: pairs per logical expert since start} for /metrics ({} unless exported)."""
        if not (self.export and self.is_rank0):
            return {}
        return dict(zip(self.moes, expert_load(self.model).tolist(), strict=True))

    def after_step(self) -> None:
        """Rank 0, after each forward: every --eplb-rebalance-num-iterations steps, rebalance."""
        self.steps += 1
        if self.every > 0 and self.steps % self.every == 0:
            self.rebalance()

    def rebalance(self) -> dict:
        """Rank 0, between two steps: re-place every MoE layer from the load counted since the last
        placement, on every rank (a RebalanceMsg), and summarise it (placement_summary). Requests
        in flight keep going: replicas hold the same weights, so no output changes."""
        if not self.counting:
            raise ValueError(
                "the expert load is not counted: start the server with --enable-eplb "
                "(or --eplb-rebalance-num-iterations N)"
            )
        from disagg.common.parallel.ranks import broadcast_plan

        window = dict(zip(self.moes, (expert_load(self.model) - self.window_start).tolist(), strict=True))
        before = {layer: moe.physical_to_logical for layer, moe in self.moes.items()}
        msg = RebalanceMsg(self.plan(window))
        t0 = time.perf_counter()
        if get_parallel().world_size > 1:  # every rank (other pipeline stages ignore rank 0's layers)
            broadcast_plan(msg)
        self.apply(msg)
        summary = placement_summary(window, before, msg.placement, get_parallel().ep_size)
        return {**summary, "seconds": time.perf_counter() - t0}

    def plan(self, window: dict[int, list[float]]) -> dict[int, list[int]]:
        """The placement this load ({layer: pairs per logical expert}) asks for; a layer without
        load keeps its own."""
        ranks = get_parallel().ep_size
        return {
            layer: balanced_placement(window[layer], moe.num_physical, ranks)
            if sum(window[layer])
            else moe.physical_to_logical
            for layer, moe in self.moes.items()
        }

    def apply(self, msg: RebalanceMsg) -> None:
        t0 = time.perf_counter()
        placement = {int(k): v for k, v in msg.placement.items()}
        # NOTE: .get: with --pp-size, rank 0 places its own stage's layers only
        moved = sum(
            placement.get(k, m.physical_to_logical) != m.physical_to_logical for k, m in self.moes.items()
        )
        if moved:
            apply_placement(self.model, placement)
        self.window_start = expert_load(self.model)
        logger.info(
            "EPLB: %d of %d MoE layers re-placed in %.2fs", moved, len(self.moes), time.perf_counter() - t0
        )


def rebalance_experts(scheduler) -> dict:
    """POST /eplb_rebalance, in the scheduler process between two steps: the placement summary, or
    {"error": why} when this server cannot re-place (no MoE layers, the load not counted)."""
    balancer = getattr(getattr(scheduler, "runner", None), "eplb", None)
    if balancer is None:
        return {"error": "the model has no MoE layers"}
    try:
        return balancer.rebalance()
    except ValueError as e:
        return {"error": str(e)}


def create_balancer(model: nn.Module, config) -> ExpertBalancer | None:
    """An ExpertBalancer when the model has MoE layers, else None."""
    return ExpertBalancer(model, config) if moe_layers(model) else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Write an --init-expert-location load file from a server's /metrics "
        "(started with --enable-expert-distribution-metrics)"
    )
    parser.add_argument("--metrics-url", required=True, help="e.g. http://127.0.0.1:30000/metrics")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    with urllib.request.urlopen(args.metrics_url, timeout=30) as resp:
        load = load_from_metrics(resp.read().decode())
    if not load:
        raise SystemExit(f"no {METRIC} series at {args.metrics_url} (--enable-expert-distribution-metrics?)")
    save_expert_load(args.output, load)
    print(f"{args.output}: {len(load)} MoE layers, {sum(map(sum, load.values()))} routed pairs")


if __name__ == "__main__":
    main()

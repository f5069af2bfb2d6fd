"""Expert-parallel dispatch: inter-node traffic on DeepSeek-V3's layout, and dispatch+combine time.

    python benchmarks/cpu/dispatch.py traffic     # EP64 = 8 nodes x 8 GPUs, top-8 of 256 experts, M = 4
    python benchmarks/cpu/dispatch.py time        # 8 gloo ranks as 2 virtual nodes x 4 (--nodes 1: one node)
    python benchmarks/cpu/dispatch.py all --json  # both, one JSON object

Traffic is counted by the dispatchers' own layout step (`plan_hop`) on the outputs of moetron's
router with the v3_671b config, so no 64 processes are needed: each token's source rank is
token_index % 64, and a row sent to a rank on another node costs one inter-node row of
hidden x 2 bytes (BF16 payload) + the K gates (float32) and K expert ids (int64) a row carries.
- flat: one all-to-all over the EP group, a token sent once to each *rank* holding its experts;
- hierarchical: a token sent once to each *node* holding its experts (then NVLink inside);
- hierarchical + node-limited: the same with routing limited to M = 4 nodes per token.
For reference the table also gives a flat dispatch that sends one row per (token, expert).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from moetron.comm.dispatch.hop import plan_hop
from moetron.models.deepseek_v3 import load_preset
from moetron.models.common.router import TopKRouter
from moetron.parallel.local_ranks import run_ranks

EP, GPUS_PER_NODE = 64, 8


def internode_rows(topk_idx_TK: torch.Tensor, dest_of_expert, node_of_dest, num_dest: int) -> float:
    """Mean rows per token that leave the source node, counted by plan_hop per source rank."""
    T = topk_idx_TK.shape[0]
    src_rank_T = torch.arange(T) % EP
    rows = 0
    for rank in range(EP):
        mine = topk_idx_TK[src_rank_T == rank]
        plan = plan_hop(mine, dest_of_expert(mine), num_dest)
        dest_nodes = torch.tensor([node_of_dest(d) for d in range(num_dest)])
        my_node = rank // GPUS_PER_NODE
        rows += int(plan.send_counts_D[dest_nodes != my_node].sum())
    return rows / T


def traffic(num_tokens: int = 8192, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    results = {}
    for label, topk_group in (("free", 8), ("node_limited", 4)):
        cfg = load_preset("v3_671b", topk_group=topk_group)
        router = TopKRouter(cfg.router_settings(), layer_idx=3).eval()
        torch.nn.init.normal_(router.weight, std=cfg.initializer_range)
        with torch.no_grad():
            routing = router(torch.randn(1, num_tokens, cfg.hidden_size))
        results[label] = (cfg, routing.topk_idx_TK)
    cfg, topk_free = results["free"]
    _, topk_limited = results["node_limited"]
    per_rank = cfg.n_routed_experts // EP
    K, H = cfg.num_experts_per_tok, cfg.hidden_size
    row_bytes = H * 2 + K * (4 + 8)
    flat = internode_rows(topk_free, lambda e: e // per_rank, lambda d: d // GPUS_PER_NODE, EP)
    hier = internode_rows(topk_free, lambda e: e // per_rank // GPUS_PER_NODE, lambda d: d, EP // GPUS_PER_NODE)
    hier_limited = internode_rows(topk_limited, lambda e: e // per_rank // GPUS_PER_NODE, lambda d: d,
                                  EP // GPUS_PER_NODE)
    src_node_T = (torch.arange(topk_free.shape[0]) % EP) // GPUS_PER_NODE
    per_expert = float((topk_free // per_rank // GPUS_PER_NODE != src_node_T[:, None]).sum()) / topk_free.shape[0]
    nodes_per_token = float((torch.zeros(topk_limited.shape[0], EP // GPUS_PER_NODE, dtype=torch.bool)
                             .scatter_(1, topk_limited // per_rank // GPUS_PER_NODE, True)).sum(1).max())
    out = {"layout": f"EP{EP} = {EP // GPUS_PER_NODE} nodes x {GPUS_PER_NODE}, top-{K} of {cfg.n_routed_experts}, M=4",
           "tokens": topk_free.shape[0], "row_bytes": row_bytes, "max_nodes_per_token_node_limited": nodes_per_token}
    for name, rows in (("flat_per_expert", per_expert), ("flat", flat), ("hierarchical", hier),
                       ("hierarchical_node_limited", hier_limited)):
        out[name] = {"internode_rows_per_token": round(rows, 3), "internode_bytes_per_token": round(rows * row_bytes),
                     "ratio_to_flat": round(rows / flat, 3)}
    return out


def _time_worker(rank, world, args):
    torch.set_num_threads(1)
    from moetron.parallel.dims import ParallelDims, Topology, build_groups
    from moetron.parallel.expert_parallel import make_dispatcher

    groups = build_groups(ParallelDims(pp=1, dp=1, ep=world), Topology(args.nodes, world // args.nodes), rank)
    torch.manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden)
    topk = torch.rand(args.tokens, args.experts).topk(args.topk, dim=-1).indices
    gates = torch.rand(args.tokens, args.topk)
    times = {}
    for name in ("alltoall", "hierarchical"):
        dispatcher = make_dispatcher(name, args.experts, groups)
        samples = []
        for it in range(args.warmup + args.iters):
            dist.barrier()
            t0 = time.perf_counter()
            x_recv, _, handle = dispatcher.dispatch(x, topk, gates)
            dispatcher.combine(x_recv, handle)
            elapsed = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step waits for the slowest rank
            if it >= args.warmup:
                samples.append(float(elapsed))
        times[name] = statistics.median(samples)
    return times


def timing(args) -> dict:
    times = run_ranks(8, _time_worker, args, timeout=1200)[0]
    flat = times["alltoall"]
    return {"ranks": f"8 gloo ranks = {args.nodes} virtual node(s) x {8 // args.nodes}", "tokens_per_rank": args.tokens,
            "hidden": args.hidden,
            "experts": args.experts, "topk": args.topk, "iters": args.iters,
            **{name: {"median_s": round(t, 5), "ratio_to_flat": round(t / flat, 3)} for name, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["traffic", "time", "all"])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=2, choices=[1, 2, 4, 8], help="virtual nodes of the 8 ranks")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    result = {"torch": torch.__version__, "cpus": os.cpu_count()}
    if args.what in ("traffic", "all"):
        result["traffic"] = traffic()
    if args.what in ("time", "all"):
        result["time"] = timing(args)
    json.dump(result, sys.stdout, indent=None if args.json else 1)
    print()


if __name__ == "__main__":
    main()

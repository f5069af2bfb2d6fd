"""One layout's step time, memory per GPU and cost, from per-layer costs (layer_costs), the cluster
(Hardware) and the efficiency factors.

- Stages: the decoder layers split contiguously into the schedule's chain of stages so that their
  forward FLOPs are as even as they can be (the embedding with the first stage, the head and MTP
  with the last); `--launch-script` hands the split to the trainer as `parallel.layout`. The slowest
  stage sets every action's time: F (forward), B (input gradients, the attention core's backward,
  recomputation), W (weight gradients).
- Expert parallelism: per MoE layer and micro-batch, dispatch and combine move each token's K copies;
  across nodes a token travels once per node it targets (node-limited routing: at most
  the routing's group limit of nodes), then over NVLink. Forward: dispatch (FP8 with fp8 dispatch) and combine
  (BF16); backward: both again in BF16.
- Overlap: DualPipe(V) pairs a forward with a backward; the pair's all-to-all hides behind its
  compute, which runs on the SMs the communication leaves (report section 3.2.2). Other schedules
  and lone actions expose their all-to-all.
- The pipeline simulator (moetron.pipeline.simulate) runs the schedule with these costs: makespan,
  bubble, and the peak of micro-batches in flight on each rank, for activation memory.
- Context parallelism (cp): each rank runs 1/cp of every sequence's tokens; per layer and
  micro-batch the attention gathers every other rank's share of the row (MLA its latent and RoPE
  key, GQA keys and values: the layer's `context_bytes` per token) and reduce-scatters their
  gradients in backward, communication that DualPipe's pairs hide as they hide the all-to-all; MLA
  up-projects the whole row's keys and values on every rank (`context_flops`), again in backward,
  and keeps the gathered latent. A cp group's ranks are consecutive; the routed experts are sharded
  over EP groups of ep x cp ranks (they fold over cp: moetron.parallel.dims).
- Data parallelism: ZeRO-1's reduce-scatter of gradients and all-gather of updated parameters over
  rings (NVLink inside a node, else InfiniBand); the gather overlaps the next step's forward, the
  reduce-scatter is exposed.
- Memory per GPU: float32 parameters and gradients of the held stages (routed experts / ep),
  AdamW moments sharded by ZeRO-1, the activations and weight copies that the micro-batches in
  flight keep for their backward (measured per layer: moetron.plan.memory), a reserve.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Optional

from moetron.pipeline.builders import build_schedule
from moetron.pipeline.simulate import Costs, simulate
from moetron.plan.hardware import Efficiency, Hardware

GIB = 2.0 ** 30
OVERLAPPED = ("dualpipe", "dualpipev")


@dataclass(frozen=True)
class Layout:
    pp: int
    ep: int
    dp: int  # data-parallel copies beyond ep (world = pp x ep x dp x cp)
    schedule: str
    micro_batch: int  # sequences
    num_microbatches: int  # per pipeline, per step
    recompute: bool
    fp8: bool
    zero1: bool = True
    cp: int = 1  # context-parallel ranks per sequence

    @property
    def world(self) -> int:
        return self.pp * self.ep * self.dp * self.cp

    @property
    def expert_ranks(self) -> int:
        """Ranks the routed experts are sharded over (an EP group: ep x cp)."""
        return self.ep * self.cp

    def describe(self) -> str:
        cp = f" cp{self.cp}" if self.cp > 1 else ""
        return (f"pp{self.pp} ep{self.ep} dp{self.dp}{cp} {self.schedule if self.pp > 1 else '-'} mb{self.micro_batch}"
                f"x{self.num_microbatches} {'fp8' if self.fp8 else 'bf16'}{' recompute' if self.recompute else ''}")


@dataclass
class Estimate:
    layout: Layout
    step_time_s: float
    tokens_per_s: float
    mfu: float  # model FLOPs over the cluster's BF16 dense peak
    memory_per_gpu_gib: float
    memory_parts_gib: dict = field(default_factory=dict)
    compute_s: float = 0.0  # the slowest rank's busy time in a step
    exposed_comm_s: float = 0.0  # all-to-all not hidden and ZeRO-1's reduce-scatter (P2P waits count as bubble)
    sm_slowdown_s: float = 0.0  # overlapped pairs' compute slowed by the SMs their all-to-all takes
    bubble_ratio: float = 0.0
    gpu_hours_per_trillion_tokens: float = 0.0
    days: float = 0.0  # for plan.tokens
    cost: float = 0.0  # for plan.tokens, at the cluster's price
    fits: bool = True
    stage_layout: Optional[list] = None  # decoder layers per stage (parallel.layout); None without pipelining

    def as_dict(self) -> dict:
        out = asdict(self)
        out["layout"] = asdict(self.layout)
        return out


def _fill(weights: list[float], extra_last: float, parts: int, cap: float) -> Optional[list[int]]:
    """Layers per stage, filling each stage up to `cap` (the last starts at `extra_last`) and giving
    every stage at least one layer; None if they do not fit."""
    sizes, load, i = [], 0.0, 0
    for stage in range(parts):
        left_stages = parts - stage - 1
        load, size = (extra_last if stage == parts - 1 else 0.0), 0
        while i < len(weights) and len(weights) - i > left_stages and (size == 0 or load + weights[i] <= cap):
            load += weights[i]
            size, i = size + 1, i + 1
        if load > cap and size > 1:
            return None
        sizes.append(size)
    return sizes if i == len(weights) and all(sizes) else None


def balanced_split(weights: list[float], extra_last: float, parts: int) -> list[int]:
    """Contiguous layers per stage that minimise the largest stage's weight, the last stage also
    carrying `extra_last` (the head and MTP): binary search on the cap, greedy filling."""
    if parts > len(weights):
        raise ValueError(f"{parts} pipeline stages for {len(weights)} decoder layers")
    lo, hi = max(weights), sum(weights) + extra_last
    best = _fill(weights, extra_last, parts, hi) or [1] * (parts - 1) + [len(weights) - parts + 1]
    for _ in range(60):
        mid = (lo + hi) / 2
        sizes = _fill(weights, extra_last, parts, mid)
        if sizes is None:
            lo = mid
        else:
            best, hi = sizes, mid
    return best


def decoder_layout(stages: list[list]) -> list[list[int]]:
    """`parallel.layout` for stages from `stage_layers`: decoder layer ids per stage."""
    layout, start = [], 0
    for stage in stages:
        size = sum(1 for c in stage if c.kind in ("dense", "moe"))
        layout.append(list(range(start, start + size)))
        start += size
    return layout


def stage_layers(costs: list, chain_len: int) -> list[list]:
    """Layer costs per stage position: decoders split so that the stages' forward FLOPs are as even
    as contiguous layers allow (`parallel.layout` runs the split), the embedding with the first
    stage, the head and MTP depths with the last."""
    decoders = [c for c in costs if c.kind in ("dense", "moe")]
    tail = [c for c in costs if c.kind in ("head", "mtp")]
    sizes = balanced_split([c.forward_flops() for c in decoders], sum(c.forward_flops() for c in tail), chain_len)
    stages, start = [], 0
    for size in sizes:
        stages.append(decoders[start:start + size])
        start += size
    stages[0] = [c for c in costs if c.kind == "embedding"] + stages[0]
    stages[-1] = stages[-1] + tail
    return stages


@lru_cache(maxsize=4096)
def schedule_of(name: str, pp: int, n: int):
    """The schedule, built once per (name, pp, micro-batches) for the whole search."""
    return build_schedule(name, pp, n)


@lru_cache(maxsize=4096)
def peak_in_flight(name: str, pp: int, n: int) -> tuple[int, ...]:
    """Micro-batch-stages whose activations each rank holds at its peak (the schedule's structure:
    simulated with the usual cost ratios F:B:W = 1:1:1, F&B pair 2.5)."""
    if pp == 1:
        return (1,)
    return tuple(simulate(schedule_of(name, pp, n), Costs(1.0, 1.0, 1.0, 2.5)).peak_activations)


# the attention core's backward against its forward: FlashAttention-3 computes five GEMMs against two
# (2.5x the FLOPs), at the backward efficiency its paper quotes for that count
ATTENTION_BACKWARD = 2.5


@dataclass
class _StageTimes:
    f: float
    b: float
    w: float
    a2a_f: float
    a2a_b: float


def nodes_reached(ep_nodes: int, copies: int, groups: int, groups_per_token: int) -> int:
    """Nodes a token's `copies` expert copies reach at most under node-limited routing: the experts
    form `groups` groups and a token picks `groups_per_token` of them (0: no limit). A group spans
    ep_nodes / groups nodes when EP spans more nodes than there are groups."""
    limit = ep_nodes
    if 0 < groups_per_token < groups:
        limit = groups_per_token * max(1, -(-ep_nodes // groups))  # a group's nodes, rounded up
    return max(1, min(limit, ep_nodes, copies))


def _a2a_seconds(copies: int, tokens: int, H: int, elem_bytes: float, ep: int, hw: Hardware, eff: Efficiency,
                 route_groups: tuple[int, int]) -> float:
    """One exchange (dispatch or combine) of `tokens` tokens' `copies` copies over an EP group: each
    copy crosses NVLink inside its node; across nodes a token travels once per remote node it
    reaches (the two-hop dispatch)."""
    if ep == 1 or copies == 0:
        return 0.0
    g = min(ep, hw.gpus_per_node)
    ep_nodes = -(-ep // hw.gpus_per_node)
    nvl_bytes = tokens * copies * H * elem_bytes * (g - 1) / g
    seconds = nvl_bytes / (hw.nvlink_gbps * 1e9 * eff.a2a_nvlink) if g > 1 else 0.0
    if ep_nodes > 1:
        nodes = nodes_reached(ep_nodes, copies, *route_groups)
        remote = nodes * (ep_nodes - 1) / ep_nodes  # the token's own node is one of them this often
        seconds = max(seconds, tokens * remote * H * elem_bytes / (hw.ib_gbps * 1e9 * eff.a2a_ib))
    return seconds


def link_gbps(hw: Hardware, ranks_spanned: int) -> float:
    """Bandwidth per GPU of a collective whose ranks lie within `ranks_spanned` consecutive ranks:
    NVLink when they fit in a node, else InfiniBand."""
    return hw.nvlink_gbps if ranks_spanned <= hw.gpus_per_node or hw.nodes == 1 else hw.ib_gbps


def _context_seconds(stage: list, layout: Layout, problem, hw: Hardware,
                     eff: Efficiency) -> tuple[float, float, float]:
    """Context parallelism's costs on one rank per micro-batch: (forward compute, backward compute,
    one direction's communication: the gather's, or its backward's reduce-scatter)."""
    if layout.cp == 1:
        return 0.0, 0.0, 0.0
    row = layout.micro_batch * problem.seq_len  # tokens of the micro-batch's whole rows
    mine, others = row / layout.cp, row * (layout.cp - 1) / layout.cp
    rate, attn_rate = hw.bf16_tflops * eff.gemm_bf16 * 1e12, hw.bf16_tflops * eff.attention * 1e12
    flops = sum(c.context_flops for c in stage)
    # the up-projection of the others' tokens; in backward again (its own tokens' too, unless the
    # recompute policy counts them already) with the attention forward it feeds, then its backward
    # (2x) beyond the 2x its own tokens would cost anyway
    again = (others if layout.recompute else row) * flops / rate + \
        mine * sum(c.attention_flops for c in stage if c.context_flops) / attn_rate
    forward, backward = others * flops / rate, again + 2 * others * flops / rate
    within_node = layout.cp <= hw.gpus_per_node or hw.nodes == 1  # a cp group's ranks are consecutive
    gbps = link_gbps(hw, layout.cp) * 1e9 * (eff.a2a_nvlink if within_node else eff.a2a_ib)
    return forward, backward, others * sum(c.context_bytes for c in stage) / gbps


def _stage_times(stage: list, tokens: int, layout: Layout, problem, hw: Hardware, eff: Efficiency) -> _StageTimes:
    fp8_rate = (hw.fp8_tflops * eff.gemm_fp8 if layout.fp8 else hw.bf16_tflops * eff.gemm_bf16) * 1e12
    bf16_rate = hw.bf16_tflops * eff.gemm_bf16 * 1e12
    attn_rate = hw.bf16_tflops * eff.attention * 1e12
    gemm = attn = again = traffic = a2a_f = a2a_b = 0.0
    for c in stage:
        imbalance = (c.routed_flops * (eff.expert_imbalance - 1.0)) if layout.expert_ranks > 1 else 0.0
        gemm += (c.fp8_flops + imbalance) / fp8_rate + c.bf16_flops / bf16_rate
        attn += c.attention_flops / attn_rate
        again += c.recompute_flops / fp8_rate
        traffic += c.traffic_bytes
        if c.routed_copies:
            H, groups = problem.hidden_size, problem.route_groups
            dispatch_bytes = 1.0 + 4.0 / 128 if layout.fp8 and problem.fp8_dispatch else 2.0
            dispatch = _a2a_seconds(c.routed_copies, tokens, H, dispatch_bytes, layout.expert_ranks, hw, eff, groups)
            combine = _a2a_seconds(c.routed_copies, tokens, H, 2.0, layout.expert_ranks, hw, eff, groups)
            a2a_f += dispatch + combine
            a2a_b += dispatch + combine  # the combine's backward sends gradients as dispatch sends rows
    memory_bound = eff.memory_bound_passes * traffic * tokens / (hw.hbm_tbps * 1e12)
    context_f, context_b, context_comm = _context_seconds(stage, layout, problem, hw, eff)
    return _StageTimes(f=tokens * (gemm + attn) + memory_bound / 2 + context_f,
                       b=tokens * (gemm + ATTENTION_BACKWARD * attn + again) + memory_bound / 2 + context_b,
                       w=tokens * gemm, a2a_f=a2a_f + context_comm, a2a_b=a2a_b + context_comm)


def _exposed_a2a(sched, t: _StageTimes, costs: Costs, pair_compute: float,
                 num_microbatches: int) -> tuple[float, float]:
    """On the busiest rank: (all-to-all time not hidden, compute slowdown of the overlapped pairs
    from the SMs communication takes). Lone actions expose their all-to-all; an F&B pair exposes
    what exceeds its slowed compute."""
    if sched is None:
        return num_microbatches * (t.a2a_f + t.a2a_b), 0.0
    worst, pair_exposed = (0.0, 0.0), max(0.0, (costs.fb or 0.0) - pair_compute)
    for acts in sched.actions:
        kinds = Counter(a.kind.value for a in acts)
        exposed = kinds["F"] * t.a2a_f + (kinds["B"] + kinds["BW"]) * t.a2a_b + kinds["FB"] * pair_exposed
        worst = max(worst, (exposed, kinds["FB"] * (pair_compute - (t.f + t.b + t.w))))
    return worst


def _costs(t: _StageTimes, layout: Layout, hw: Hardware, eff: Efficiency, p2p: float) -> tuple[Costs, float]:
    """Action costs for the simulator, and an F&B pair's compute: lone actions expose their
    all-to-all; DualPipe's F&B pairs hide it behind compute slowed by the SMs communication takes."""
    compute = t.f + t.b + t.w
    if layout.pp > 1 and layout.schedule in OVERLAPPED:
        slowed = compute * hw.sms / (hw.sms - eff.comm_sms) if (t.a2a_f or t.a2a_b) else compute
        return Costs(t.f + t.a2a_f, t.b + t.a2a_b, t.w, max(slowed, t.a2a_f + t.a2a_b), p2p), slowed
    return Costs(t.f + t.a2a_f, t.b + t.a2a_b, t.w, None, p2p), compute


@dataclass
class Problem:
    """What stays fixed while layouts vary: the model's per-layer costs, the cluster, the factors."""
    costs: list  # LayerCost per layer (the spec's layer_costs)
    hw: Hardware
    eff: Efficiency
    seq_len: int
    hidden_size: int
    route_groups: tuple[int, int]  # (expert groups, groups a token picks): node-limited routing; (0, 0): none
    flops_per_token: float
    tokens_planned: float  # for days and cost
    moments_bytes: float = 4.0  # AdamW moments: 4 (float32) or 2 (bfloat16)
    param_bytes: float = 2.0  # working weights: 2 (bfloat16, with float32 masters) or 4 (float32)
    fp8_dispatch: bool = True  # with FP8: tokens to the experts and the combine's gradients as E4M3 tiles


@dataclass
class _Placement:
    sched: object  # None without pipelining
    stages: list  # layer costs per stage position
    held: list  # stage ids per pipeline rank
    positions: dict  # stage id -> position in its chain


def _place(problem: Problem, layout: Layout) -> _Placement:
    if layout.pp == 1:
        return _Placement(None, stage_layers(problem.costs, 1), [[0]], {0: 0})
    sched = schedule_of(layout.schedule, layout.pp, layout.num_microbatches)
    held = [sorted(s for s, r in sched.rank_of_stage.items() if r == rank) for rank in range(layout.pp)]
    positions = {s: i for chain in sched.chains for i, s in enumerate(chain)}
    return _Placement(sched, stage_layers(problem.costs, len(sched.chains[0])), held, positions)


def _held_params(place: _Placement, ids: list, ep: int) -> tuple[float, float]:
    """(dense, routed / ep) parameters a rank holding stages `ids` keeps."""
    layers = [c for s in ids for c in place.stages[place.positions[s]]]
    return sum(c.params - c.routed_params for c in layers), sum(c.routed_params for c in layers) / ep


def _kept(stage: list, tokens: int, ep: int, gathered: float = 0.0, mask: float = 0.0) -> tuple[float, float]:
    """(activation bytes, weight-copy bytes) one micro-batch keeps in a stage: measured per token
    and per micro-batch (moetron.plan.memory), the routed experts' copies of this rank's 1/ep;
    `gathered`: other cp ranks' tokens whose gathered keys (MLA: latent) each layer keeps; `mask`:
    the bytes of a cp attention mask (a bool per query and key), kept where attention takes one
    (GQA)."""
    masked = mask if any(c.context_mask for c in stage) else 0.0
    return (tokens * sum(c.act_bytes for c in stage) + gathered * sum(c.context_bytes for c in stage) + masked,
            sum(c.weight_copy_bytes + c.routed_copy_bytes / ep for c in stage))


def memory_parts(problem: Problem, layout: Layout, place: Optional[_Placement] = None) -> dict:
    """GiB per part on the pipeline rank that holds the most: the working weights (BF16 or float32),
    float32 gradients, float32 master weights (with BF16 working weights or ZeRO-1) and AdamW
    moments, both sharded by ZeRO-1 (dense parameters over dp x ep x cp ranks, routed experts over
    dp), the activations (of 1/cp of each sequence, and the keys gathered from the rest) and
    weight copies (measured: moetron.plan.memory) of its peak of
    micro-batch-stages in flight (the copies made once per step counted once, for every stage it
    holds), and a reserve."""
    place = place or _place(problem, layout)
    row = layout.micro_batch * problem.seq_len
    tokens, gathered = row / layout.cp, row * (layout.cp - 1) / layout.cp
    mask = tokens * problem.seq_len if layout.cp > 1 else 0.0  # B x S x T
    peaks = peak_in_flight(layout.schedule, layout.pp, layout.num_microbatches)
    experts = layout.expert_ranks
    shard_dense, shard_routed = (layout.dp * experts, layout.dp) if layout.zero1 else (1, 1)
    per_rank = []
    for rank, ids in enumerate(place.held):
        dense, routed = _held_params(place, ids, experts)
        acts, copies = max((_kept(place.stages[place.positions[s]], tokens, experts, gathered, mask) for s in ids),
                           key=sum)
        shared = sum(c.shared_copy_bytes + c.shared_routed_copy_bytes / experts
                     for s in ids for c in place.stages[place.positions[s]])
        sharded = dense / shard_dense + routed / shard_routed  # parameters this rank steps on
        masters = 4.0 * sharded if layout.zero1 or problem.param_bytes < 4 else 0.0
        per_rank.append({"weights": problem.param_bytes * (dense + routed) / GIB,
                         "gradients": 4.0 * (dense + routed) / GIB, "master_weights": masters / GIB,
                         "optimizer": 2 * problem.moments_bytes * sharded / GIB,
                         "activations": peaks[rank] * acts / GIB,
                         "weight_copies": (peaks[rank] * copies + shared) / GIB, "reserved": problem.eff.reserved_gib})
    return max(per_rank, key=lambda p: sum(p.values()))


def _zero1_seconds(problem: Problem, layout: Layout, place: _Placement) -> float:
    """ZeRO-1's reduce-scatter of float32 gradients over InfiniBand rings (the all-gather of updated
    parameters overlaps the next step's forward)."""
    hw, seconds = problem.hw, 0.0
    held = [_held_params(place, ids, layout.expert_ranks) for ids in place.held]
    stage = layout.dp * layout.expert_ranks
    gbps = link_gbps(hw, stage)  # both groups lie within one stage's dp x ep x cp ranks
    for count, group in ((max(h[0] for h in held), stage), (max(h[1] for h in held), layout.dp)):
        if group > 1:
            seconds += 4.0 * count * (group - 1) / group / (gbps * 1e9)
    return seconds


def estimate(problem: Problem, layout: Layout) -> Estimate:
    """Step time, memory and cost of `layout` (see the module docstring)."""
    hw, eff = problem.hw, problem.eff
    world, tokens = layout.world, layout.micro_batch * problem.seq_len / layout.cp  # this rank's of a micro-batch
    place = _place(problem, layout)
    times = [_stage_times(s, tokens, layout, problem, hw, eff) for s in place.stages]
    slowest = max(times, key=lambda t: t.f + t.b + t.w + t.a2a_f + t.a2a_b)
    p2p_gbps = link_gbps(hw, 2 * layout.dp * layout.cp * layout.ep)  # neighbouring stages' ranks
    p2p = tokens * problem.hidden_size * 2.0 / (p2p_gbps * 1e9) + eff.p2p_latency_us * 1e-6 if layout.pp > 1 else 0.0
    step_costs, pair_compute = _costs(slowest, layout, hw, eff, p2p)
    if place.sched is not None:
        sim = simulate(place.sched, step_costs)
        makespan, bubble = sim.makespan, sim.bubble_ratio
    else:
        makespan, bubble = layout.num_microbatches * (step_costs.f + step_costs.b + step_costs.w), 0.0
    parts = memory_parts(problem, layout, place)
    memory = sum(parts.values())
    exposed, slowdown = _exposed_a2a(place.sched, slowest, step_costs, pair_compute, layout.num_microbatches)
    dp_time = _zero1_seconds(problem, layout, place)
    step = makespan + dp_time
    tokens_per_s = layout.num_microbatches * layout.dp * layout.cp * layout.ep * tokens / step
    gpu_hours = 1e12 / (tokens_per_s * eff.goodput) * world / 3600.0
    return Estimate(layout=layout, step_time_s=step, tokens_per_s=tokens_per_s,
                    mfu=problem.flops_per_token * tokens_per_s / (world * hw.bf16_tflops * 1e12),
                    memory_per_gpu_gib=memory, memory_parts_gib=parts,
                    compute_s=layout.num_microbatches * (slowest.f + slowest.b + slowest.w),
                    exposed_comm_s=exposed + dp_time, sm_slowdown_s=slowdown,
                    bubble_ratio=bubble, gpu_hours_per_trillion_tokens=gpu_hours,
                    days=problem.tokens_planned / (tokens_per_s * eff.goodput) / 86400.0,
                    cost=gpu_hours * problem.tokens_planned / 1e12 * hw.price_per_gpu_hour, fits=memory <= hw.memory_gib,
                    stage_layout=decoder_layout(place.stages) if place.sched is not None else None)

"""Activation memory, measured: the bytes one forward pass keeps for its backward, per layer.

    python -m moetron.plan.memory model=v3_671b train.seq_len=4096      # the table (moetron-plan --memory)

How it is measured (one source of truth: the planner calls `measure`, it keeps no formula):
- The model is built on the meta device and parallelized as the trainer does (FP8 and its
  activation cache, the recompute switches), then given fake parameters (torch's FakeTensorMode:
  shapes and dtypes, nothing allocated), so DeepSeek-V3 at full width measures on a laptop. With
  `fake=False` the same run uses real tensors (a test holds the two equal).
- Forwards of the loss run in the trainer's precision path (autocast to the compute dtype, the
  working weights in their dtype: BF16 as on GPUs, or float32) under `torch.autograd.graph.saved_tensors_hooks`. Each storage a saved tensor
  lives on counts once, at its size after the forward (a recompute region's freed outputs count
  0), for the part that saved it first: the embedding, each decoder layer, the head (final norm,
  output head, loss), each MTP depth.
- The attention core counts what the GPU kernel keeps, not the S x S probabilities of the CPU's
  math path: `F.scaled_dot_product_attention` (and GPT-OSS's attention with sinks) runs as a stand-in
  that saves q, k, v, the output and the float32 log-sum-exp [B, N, S], FlashAttention's and
  memory-efficient attention's saved set (and an explicit mask where one is passed).
- Storages computed from parameters alone (autocast's BF16 copies of float32 weights, FP8-quantized
  weights, a transposed BF16 weight) are weight copies: bytes per micro-batch or per step, not per token. Two forwards run in
  one autocast region, as a pipeline step runs its micro-batches: a copy the second forward makes
  again is kept by each micro-batch in flight; one it reads from the first (autocast's cast cache,
  the FP8 weight blocks of moetron.precision.fp8_linear.WeightBlocks) once per step. They are
  reported apart, the routed experts' (which expert parallelism shards) apart from the rest.

Shape legend: B batch, S sequence, N heads.
"""
from __future__ import annotations

import dataclasses
import weakref
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moetron.models.common.attention import attention_with_sinks
from moetron.models.common.experts import GroupedExperts
from moetron.parallel.materialize import cast_parameters
from moetron.precision.fp8_gemm import fp8_mm

KINDS = ("embedding", "dense", "moe", "head", "mtp")


@dataclass
class PartMemory:
    """What one part of the model keeps for its backward, from one forward."""
    kind: str  # embedding | dense | moe | head | mtp
    bytes_per_token: float  # activations saved for the backward
    weight_copy_bytes: float = 0.0  # copies of its (non-routed) weights each micro-batch makes and keeps
    routed_copy_bytes: float = 0.0  # the same of its routed experts' weights (sharded by EP)
    shared_copy_bytes: float = 0.0  # copies of its weights made once per step, read by every micro-batch
    shared_routed_copy_bytes: float = 0.0  # the same of its routed experts' weights (sharded by EP)


@dataclass(frozen=True)
class MemorySettings:
    """The run settings that change what a forward keeps."""
    seq_len: int
    micro_batch: int = 1
    recompute: tuple[str, ...] = ()  # recompute switches on (moetron.parallel.recompute)
    fp8: bool = False
    fp8_cache: bool = False  # precision.fp8_cache_activations
    compute_dtype: str = "bfloat16"  # the GPU trainer's autocast dtype
    param_dtype: str = "bfloat16"  # the working weights' (precision.param_dtype; float32 masters apart)
    memory: tuple[str, ...] = ()  # memory switches on (moetron.parallel.memory)


# -- the attention core as the GPU kernel keeps it ------------------------------------------------
class _KernelSaves(torch.autograd.Function):
    """The attention output, saving what FlashAttention keeps: q, k, v, the output (laid out
    [B, S, N, D], as the kernel writes it), the float32 log-sum-exp per query and head (and a mask
    where one is given). Measurement only: no backward."""

    @staticmethod
    def forward(ctx, core, q_BNSD, k, v, mask):
        with torch.no_grad():
            out_BNSD = core()
        # the kernel writes [B, S, N, D] (so that out.transpose(1, 2).reshape(B, S, N * D) is a view)
        out_BNSD = out_BNSD.transpose(1, 2).contiguous().transpose(1, 2)
        lse_BNS = q_BNSD.new_empty(q_BNSD.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q_BNSD, k, v, out_BNSD, lse_BNS, *([mask] if mask is not None else []))
        return out_BNSD

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("moetron.plan.memory measures a forward; its attention stand-in has no backward")


class _StandIns(TorchFunctionMode):
    """Runs every attention core through `_KernelSaves`. On fake tensors, an FP8 GEMM is its output's
    shape (its emulation's loops only cost time there), and the per-expert row counts
    that a grouped GEMM reads on the host (`tolist`, one `item` per expert) are an even split of
    the MoE layer's rows (tokens x top-K, set as each MoE layer starts): what is saved depends on
    the rows, not on how they split."""

    def __init__(self, fake: bool) -> None:
        super().__init__()
        self.fake, self.rows, self.experts, self.read = fake, 0, 1, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention or func is attention_with_sinks:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask")
            return _KernelSaves.apply(lambda: func(*args, **kwargs), q, k, v, mask)
        if self.fake and func is fp8_mm:  # saves nothing itself: its output's shape is enough
            a, b, out_dtype = args[:3]
            return a.data.new_empty(a.data.shape[0], b.data.shape[0], dtype=out_dtype)
        if self.fake and func is torch.Tensor.item and not args[0].is_floating_point():
            e, self.read = self.read % self.experts, self.read + 1
            return self.rows // self.experts + (1 if e < self.rows % self.experts else 0)
        return func(*args, **kwargs)

    def watch(self, model: nn.Module) -> list:
        from moetron.models.common.moe import MoE

        def start(moe, args):
            x_BSH = args[0]
            self.rows = x_BSH.shape[0] * x_BSH.shape[1] * moe.gate.settings.top_k
            self.experts, self.read = moe.experts.global_experts, 0
        return [m.register_forward_pre_hook(start) for m in model.modules() if isinstance(m, MoE)]


# -- which storages are weights, or computed from weights alone -----------------------------------
def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _WeightCopies(TorchDispatchMode):
    """Labels each storage an op computes from weights alone (every tensor input labelled):
    "routed" if a routed expert's weight is among them, else "dense". Holds the labelled
    storages, so that no freed storage's address is taken for another."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        routed = {id(p) for m in model.modules() if isinstance(m, GroupedExperts)
                  for p in (m.gate_up_proj, m.down_proj, m.gate_up_proj_bias, m.down_proj_bias) if p is not None}
        self.label = {_key(p): "routed" if id(p) in routed else "dense" for p in model.parameters()}
        self.params = set(self.label)
        self.kept: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        labels = {self.label.get(_key(t)) for t in inputs}
        if inputs and None not in labels:
            label = "routed" if "routed" in labels else "dense"
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and _key(t) not in self.label:
                    self.label[_key(t)] = label
                    self.kept.append(t)
        return out


# -- attributing saved tensors to the model's parts -----------------------------------------------
class _Parts:
    """The part now running, from forward hooks: the embedding, decoder layer i, then the head,
    and a new MTP depth each time the embedding runs after the last layer (DeepSeek-V3's depths
    embed their shifted tokens first)."""

    def __init__(self, model: nn.Module) -> None:
        self.start()
        self.handles = [model.embed_tokens.register_forward_pre_hook(self._embedding)]
        for i, layer in enumerate(model.layers):
            self.handles.append(layer.register_forward_pre_hook(lambda *_, i=i: self._enter(f"layer{i}")))
        self.handles.append(model.layers[-1].register_forward_hook(lambda *_: self._enter("head")))

    def start(self) -> None:
        """A new forward pass begins."""
        self.names: list[str] = []
        self.current: Optional[int] = None

    def _enter(self, name: str) -> None:
        self.names.append(name)
        self.current = len(self.names) - 1

    def _embedding(self, *_) -> None:
        if self.current is None:
            self._enter("embedding")
        elif self.names[self.current] == "head" or self.names[self.current].startswith("mtp"):
            self._enter(f"mtp{sum(n.startswith('mtp') for n in self.names) + 1}")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _signature(layer: nn.Module) -> tuple:
    """Layers with one signature keep the same per token (their kind, attention settings, shapes)."""
    attention = getattr(layer, "self_attn", None)
    settings = getattr(attention, "settings", None)
    return (type(getattr(layer, "mlp", None)).__name__, repr(settings),
            tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()))


def _kind(layer: nn.Module) -> str:
    from moetron.models.common.moe import MoE
    return "moe" if isinstance(getattr(layer, "mlp", None), MoE) else "dense"


def _prepare(spec, model_cfg, settings: MemorySettings) -> tuple[nn.Module, list[int]]:
    """The model on meta, parallelized as the trainer would on one process, with one decoder layer of
    each signature; and, per decoder layer of the whole model, the index of its stand-in."""
    from moetron.precision.convert import FP8Recipe

    model = spec.build(model_cfg, device="meta").train()
    fp8 = FP8Recipe("emulated", False, settings.fp8_cache) if settings.fp8 else None
    spec.parallelize(model, None, "local", defer_weights=False, fp8=fp8,
                     recompute={s: True for s in settings.recompute}, memory={s: True for s in settings.memory})
    firsts: dict[tuple, int] = {}
    stand_in = []
    for layer in model.layers:
        stand_in.append(firsts.setdefault(_signature(layer), len(firsts)))
    reps = {i: layer for layer, i in zip(model.layers, stand_in)}
    model.layers = nn.ModuleList(reps[i] for i in range(len(reps)))
    return model, stand_in


def _run(model: nn.Module, settings: MemorySettings, fake: bool, seed: int = 0) -> dict[str, PartMemory]:
    """Two forwards of the loss; what each part of the second keeps (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with ExitStack() as stack:
        if fake:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            model.to_empty(device="cpu")
        else:
            model.to_empty(device="cpu")
            model.init_weights(seed)
        # what the trainer casts (moetron.parallel.finalize): the parameters that train
        cast_parameters([p for p in model.parameters() if p.requires_grad], getattr(torch, settings.param_dtype))
        B, S = settings.micro_batch, settings.seq_len
        ids_BS = torch.randint(0, model.embed_tokens.num_embeddings, (B, S),
                               generator=None if fake else torch.Generator().manual_seed(seed))
        copies = stack.enter_context(_WeightCopies(model))
        parts = _Parts(model)
        saved: list[dict[int, tuple[int, list]]] = []  # per forward: storage -> (part, weak refs saved on it)

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = _key(t)
            if key not in copies.params and parts.current is not None:
                saved[-1].setdefault(key, (parts.current, []))[1].append(weakref.ref(t))
            return t

        dtype = getattr(torch, settings.compute_dtype)
        stack.enter_context(torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32))
        stand_ins = stack.enter_context(_StandIns(fake))
        watched = stand_ins.watch(model)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        outs = []
        for _ in range(2):  # two micro-batches in one autocast region, as a pipeline step runs them
            parts.start()
            saved.append({})
            outs.append(model(ids_BS, ids_BS))
        parts.remove()
        for handle in watched:
            handle.remove()
        first_names = list(parts.names)  # both forwards run the same parts in the same order
        result = {name: PartMemory(_part_kind(name, model), 0.0) for name in first_names}
        for key, (part, refs) in saved[1].items():
            nbytes = _alive_bytes(refs)
            entry, label = result[first_names[part]], copies.label.get(key)
            if label is None:
                entry.bytes_per_token += nbytes / (B * S)
            elif key in saved[0]:  # made by the first micro-batch, read by the second
                entry.shared_copy_bytes += nbytes if label == "dense" else 0
                entry.shared_routed_copy_bytes += nbytes if label == "routed" else 0
            else:
                entry.weight_copy_bytes += nbytes if label == "dense" else 0
                entry.routed_copy_bytes += nbytes if label == "routed" else 0
        del outs
    return result


def _alive_bytes(refs: list) -> int:
    """The bytes of the storage the saved tensors live on; 0 when none of them lives on (its node is
    gone: a branch the loss does not use)."""
    alive = [t for t in (r() for r in refs) if t is not None]
    return alive[0].untyped_storage().nbytes() if alive else 0


def _part_kind(name: str, model: nn.Module) -> str:
    if name.startswith("layer"):
        return _kind(model.layers[int(name[len("layer"):])])
    return "mtp" if name.startswith("mtp") else name


_MEASURED: dict[tuple, tuple[PartMemory, ...]] = {}


def measure(spec, model_cfg, settings: MemorySettings, fake: bool = True) -> list[PartMemory]:
    """What each part keeps, in the order of the planner's layer costs: the embedding, every decoder
    layer, the head, every MTP depth. `fake`: nothing is allocated (cached per config and settings);
    False: real tensors (small models; a test holds the two equal)."""
    key = (spec.arch, repr(model_cfg), settings)
    if not fake or key not in _MEASURED:
        model, stand_in = _prepare(spec, model_cfg, settings)
        by_part = _run(model, settings, fake)
        tail = [by_part[n] for n in by_part if n.startswith("mtp")]
        parts = (by_part["embedding"], *[by_part[f"layer{i}"] for i in stand_in], by_part["head"], *tail)
        if not fake:
            return [dataclasses.replace(p) for p in parts]
        _MEASURED[key] = parts
    return [dataclasses.replace(p) for p in _MEASURED[key]]


def with_activations(costs: list, kept: list[PartMemory], written: list[PartMemory]) -> list:
    """The planner's layer costs (the spec's `layer_costs`) with what each layer keeps (`kept`:
    `measure` under the layout's settings) and writes (`written`: without recomputation; the
    memory-bound passes of the step time read it)."""
    if not (len(costs) == len(kept) == len(written)):
        raise ValueError(f"{len(costs)} layer costs but {len(kept)} measured parts: the spec's layer_costs "
                         "must list the embedding, each decoder layer, the head, then each MTP depth")
    for cost, part, plain in zip(costs, kept, written):
        if cost.kind != part.kind:
            raise ValueError(f"layer costs list a {cost.kind} layer where the model runs a {part.kind} one")
        cost.act_bytes, cost.traffic_bytes = part.bytes_per_token, plain.bytes_per_token
        cost.weight_copy_bytes, cost.routed_copy_bytes = part.weight_copy_bytes, part.routed_copy_bytes
        cost.shared_copy_bytes, cost.shared_routed_copy_bytes = part.shared_copy_bytes, part.shared_routed_copy_bytes
    return costs


def bytes_by_kind(costs: list) -> dict:
    """Activation bytes per token of one layer of each kind (the mean where layers of a kind differ)
    and `total`, what one forward of the whole model keeps per token (weight copies apart)."""
    out = {}
    for kind in KINDS:
        values = [c.act_bytes for c in costs if c.kind == kind]
        if values:
            out[kind] = sum(values) / len(values)
    out["total"] = sum(c.act_bytes for c in costs)
    return out


COLUMNS = (("plain", False, False, False), ("recompute", True, False, False), ("fp8", False, True, False),
           ("fp8+cache", False, True, True), ("fp8+cache+recompute", True, True, True))


def memory_table(spec, model_cfg, seq_len: int, memory: tuple[str, ...] = (), param_dtype: str = "bfloat16") -> str:
    """What `moetron-plan --memory` prints: KB per token that one layer of each kind keeps for its
    backward, and the weight copies per micro-batch, under each recompute / FP8 setting (and the
    memory switches `memory`, with working weights in `param_dtype`)."""
    columns = []
    for name, recompute, fp8, cache in COLUMNS:
        switches = spec.recompute_switches(model_cfg) if recompute else ()
        if recompute and not switches:
            continue
        parts = measure(spec, model_cfg, MemorySettings(seq_len, recompute=switches, fp8=fp8, fp8_cache=cache,
                                                        memory=memory, param_dtype=param_dtype))
        columns.append((name, parts))
    width = max(len(name) for name, _ in columns) + 2
    lines = [f"Saved for the backward by one forward (sequence {seq_len}, BF16 compute, {param_dtype} weights, the "
             f"attention core as FlashAttention keeps it; memory switches on: {', '.join(memory) or 'none'})", "",
             "KB per token, one layer of each kind".ljust(40) + "".join(n.rjust(width) for n, _ in columns)]
    kinds = [k for k in KINDS if any(p.kind == k for p in columns[0][1])]
    for kind in kinds:
        row = [bytes_by_kind(_as_costs(parts))[kind] / 1e3 for _, parts in columns]
        lines.append(f"  {kind:38s}" + "".join(f"{v:{width}.1f}" for v in row))
    lines.append(f"  {'whole model':38s}" + "".join(f"{sum(p.bytes_per_token for p in parts) / 1e3:{width}.1f}"
                                                   for _, parts in columns))
    lines.append("")
    lines.append("GiB of weight copies, whole model".ljust(40) + "".join(n.rjust(width) for n, _ in columns))
    for label, attr in (("per micro-batch (dense)", "weight_copy_bytes"),
                        ("per micro-batch (routed, / ep)", "routed_copy_bytes"),
                        ("per step (dense)", "shared_copy_bytes"),
                        ("per step (routed, / ep)", "shared_routed_copy_bytes")):
        lines.append(f"  {label:38s}" + "".join(f"{sum(getattr(p, attr) for p in parts) / 2**30:{width}.2f}"
                                               for _, parts in columns))
    return "\n".join(lines)


def _as_costs(parts: list[PartMemory]) -> list:
    from moetron.models.common.costs import LayerCost
    return [LayerCost(p.kind, 0.0, 0.0, 0.0, 0, 0, 0, act_bytes=p.bytes_per_token) for p in parts]


if __name__ == "__main__":
    import sys

    from moetron.plan.cli import main
    sys.exit(main([*sys.argv[1:], "--memory"]))

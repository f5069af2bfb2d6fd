"""A stand-in for DeepEP's `deep_ep` module on gloo, for testing our adapter on a CPU.

It keeps the documented contract of DeepEP's normal-mode `Buffer` (deep_ep/buffer.py): the layout
call's outputs and dtypes, dispatch returning each token once per destination rank (grouped by
source rank, then token order) with its top-k ids made local (-1 elsewhere, those gates zeroed),
the cached dispatch (`handle=`, no top-k), and combine summing rows per token without weights, the
top-k weights reduced alongside. It asserts the call rules DeepEP asserts (int64 ids, float32
weights, a handle-mode dispatch without top-k) and one it does not check but relies on: a buffer
serves one call at a time (two passes on one buffer would race on its memory).

What it cannot stand for: DeepEP's kernels, streams and events, its bfloat16-only rule (float32
passes here so that tests can compare to 1e-6) and its limits on hidden sizes and rank counts.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.distributed as dist

NVL_PEERS = 8
made: list["Buffer"] = []  # every buffer, for tests to inspect


class Config:
    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return hidden_bytes * 4096

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return hidden_bytes * 4096 if num_ranks > NVL_PEERS else 0


class EventOverlap:
    def current_stream_wait(self) -> None:
        pass


def _exchange(x_NF: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out_MF = x_NF.new_empty((sum(recv), *x_NF.shape[1:]))
    dist.all_to_all_single(out_MF, x_NF.contiguous(), recv, send, group=group)
    return out_MF


class Buffer:
    num_sms = 20

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 **_) -> None:
        self.group, self.rank, self.group_size = group, group.rank(), group.size()
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        peers = [None] * self.group_size
        dist.all_gather_object(peers, self.rank, group=group)  # DeepEP swaps IPC handles here
        self._busy = threading.Lock()
        self.calls = 0
        made.append(self)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return Config()

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return Config()

    @contextlib.contextmanager
    def _one_at_a_time(self):
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("fake deep_ep: two calls on one Buffer at once")
        self.calls += 1
        try:
            yield
        finally:
            self._busy.release()

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        assert topk_idx.dtype == torch.int64 and topk_idx.dim() == 2
        D = self.group_size
        local = num_experts // D
        dest_TK = torch.where(topk_idx >= 0, topk_idx // local, D)
        in_rank_TD = torch.zeros(topk_idx.shape[0], D + 1, dtype=torch.bool).scatter_(1, dest_TK, True)[:, :D]
        per_rank = in_rank_TD.sum(0).int()
        per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).int()
        per_node = None
        if D > NVL_PEERS:
            per_node = in_rank_TD.view(-1, D // NVL_PEERS, NVL_PEERS).any(-1).sum(0).int()
        return per_rank, per_node, per_expert, in_rank_TD, EventOverlap()

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment=1, config=None, previous_event=None, async_finish=False,
                 allocate_on_comm_stream=False):
        with self._one_at_a_time():
            assert x.dim() == 2 and x.is_contiguous()
            if handle is not None:
                assert topk_idx is None and topk_weights is None
                token_N, send, recv, _ = handle
                return _exchange(x[token_N], send, recv, self.group), None, None, None, None, EventOverlap()
            assert num_tokens_per_rank is not None and is_token_in_rank is not None
            assert num_tokens_per_expert is not None
            assert topk_idx.dtype == torch.int64 and topk_weights.dtype == torch.float32
            dest_N, token_N = is_token_in_rank.t().nonzero(as_tuple=True)  # by destination, then token
            send = is_token_in_rank.sum(0).tolist()
            recv_counts = torch.empty(self.group_size, dtype=torch.int64)
            dist.all_to_all_single(recv_counts, torch.tensor(send), group=self.group)
            recv = recv_counts.tolist()
            recv_x = _exchange(x[token_N], send, recv, self.group)
            recv_idx = _exchange(topk_idx[token_N], send, recv, self.group)
            recv_weights = _exchange(topk_weights[token_N], send, recv, self.group)
            local = num_tokens_per_expert.numel() // self.group_size
            mine = (recv_idx >= self.rank * local) & (recv_idx < (self.rank + 1) * local)
            recv_idx = torch.where(mine, recv_idx - self.rank * local, -1)
            recv_weights = torch.where(mine, recv_weights, 0.0)
            per_local = torch.bincount(recv_idx[mine], minlength=local).tolist()
            handle = (token_N, send, recv, is_token_in_rank.shape[0])
            return recv_x, recv_idx, recv_weights, per_local, handle, EventOverlap()

    def combine(self, x, handle, topk_weights=None, config=None, previous_event=None, async_finish=False,
                allocate_on_comm_stream=False):
        with self._one_at_a_time():
            token_N, send, recv, num_tokens = handle
            assert x.dim() == 2 and x.is_contiguous() and x.shape[0] == sum(recv)
            back_NH = _exchange(x, recv, send, self.group)
            combined = x.new_zeros(num_tokens, x.shape[1]).index_add_(0, token_N, back_NH)
            combined_weights = None
            if topk_weights is not None:
                assert topk_weights.dtype == torch.float32
                back_NK = _exchange(topk_weights, recv, send, self.group)
                combined_weights = back_NK.new_zeros(num_tokens, back_NK.shape[1]).index_add_(0, token_N, back_NK)
            return combined, combined_weights, EventOverlap()

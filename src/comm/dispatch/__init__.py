"""Token dispatchers: move routed tokens to their experts and their outputs back.

Contract (DESIGN.md), for every implementation:

    dispatch(x_TH, topk_idx_TK, topk_weight_TK) -> (x_recv_SH, tokens_per_local_expert_E, handle)
    combine(y_SH, handle, weighted=True) -> y_TH

`x_recv_SH` holds one row per (token, chosen local expert), grouped by local expert in ascending
order, `tokens_per_local_expert_E` the group sizes, `handle.weight_S` each row's gate; `combine`
weights each row by its gate (unless `weighted=False`: the experts applied the gates before their
down-projection) and sums the rows of a token. Both are differentiable (gradients reach x and the
gates).

- `LocalDispatcher`: EP = 1, a permutation.
- `AllToAllDispatcher`: one all-to-all over the EP group, each token sent once per rank.
- `HierarchicalDispatcher`: DeepSeek-V3's two hops, InfiniBand once per node then NVLink.
- `DeepEPDispatcher`: the same two hops in DeepEP's fused kernels (CUDA, optional; see deepep.py).
"""
from moetron.comm.dispatch.deepep import DeepEPDispatcher
from moetron.comm.dispatch.ep import AllToAllDispatcher, HierarchicalDispatcher
from moetron.comm.dispatch.local import LocalDispatcher

__all__ = ["LocalDispatcher", "AllToAllDispatcher", "HierarchicalDispatcher", "DeepEPDispatcher"]

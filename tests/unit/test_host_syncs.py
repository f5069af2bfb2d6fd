"""A training step without host syncs at ep=1, pp=1 (issue 18): nothing in the forward, backward or
optimizer step reads a tensor's value on the host or sizes a tensor by its values. Counted on the
CPU at the operator level: every op that does so on a GPU (a scalar read, nonzero / boolean
indexing, bincount, unique, repeat_interleave without a size) is seen by a dispatch mode."""
import collections
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moetron.models import build_model
from moetron.models.deepseek_v3 import load_preset
from moetron.train.optim import AdamWLowPrecisionMoments

SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "_unique2", "unique_dim",
           "unique_consecutive", "is_nonzero", "equal", "histc", "item"}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        repeats = name == "repeat_interleave" and "output_size" not in (kwargs or {})
        bool_index = name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1])
        if name in SYNCING or repeats or bool_index:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_tolist(counter: SyncCounter):
    """`.tolist()` reads a tensor without an operator a dispatch mode sees: counted by wrapping it."""
    original = torch.Tensor.tolist

    def tolist(self):
        counter.ops["tolist"] += 1
        return original(self)
    torch.Tensor.tolist = tolist
    try:
        yield
    finally:
        torch.Tensor.tolist = original


def _step(model, optimizer, ids):
    out = model(ids, ids)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("moments", ["float32", "bfloat16"])
def test_forward_backward_and_optimizer_step_read_nothing_on_the_host(moments):
    torch.manual_seed(0)
    model = build_model(load_preset("tiny"))
    params = list(model.parameters())
    optimizer = (torch.optim.AdamW(params, lr=1e-3, fused=True) if moments == "float32" else
                 AdamWLowPrecisionMoments(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1))
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    _step(model, optimizer, ids)  # the first step makes the optimizer's state
    with SyncCounter() as counter, counting_tolist(counter):
        _step(model, optimizer, ids)
    assert counter.ops == {}, dict(counter.ops)


def test_the_counter_sees_what_syncs():
    x = torch.tensor([0, 3, 3, 1])
    with SyncCounter() as counter:
        torch.bincount(x)
        x.sum().item()
        _ = x[x > 1]
    assert counter.ops == {"bincount": 1, "_local_scalar_dense": 1, "index": 1}


def test_compile_blocks_compiles_every_decoder_and_mtp_block():
    """train.compile: graphs are made (not a silent no-op) and the outputs are eager's. Traced with
    aot_eager (no code generation: inductor's code is held to eager by tests/e2e/test_compile_cli.py)."""
    from torch._dynamo.utils import counters

    from moetron.models.deepseek_v3.spec import DeepSeekV3Spec

    torch.manual_seed(0)
    eager = build_model(load_preset("tiny"))
    compiled = build_model(load_preset("tiny"))
    compiled.load_state_dict(eager.state_dict())
    assert DeepSeekV3Spec().compile_blocks(compiled, "aot_eager") == len(compiled.layers) + len(compiled.mtp)
    before = counters["stats"]["unique_graphs"]
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(compiled(ids, ids).loss, eager(ids, ids).loss, rtol=1e-6, atol=0)
    assert counters["stats"]["unique_graphs"] > before

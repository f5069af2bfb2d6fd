"""Recomputing RMSNorm, MLA up-projections and SwiGLU: bitwise the same results, less memory.

Memory is measured as the bytes of distinct activation storages that autograd holds for backward
once the forward has finished (saved-tensor hooks see every saved tensor; parameters excluded).
"""
import gc
import pytest
import torch

from moetron.core.convert import apply_converters
from moetron.models import build_model, get_spec, load_preset
from moetron.parallel.recompute import RECOMPUTE_SWITCHES as SWITCHES, SelectiveRecompute


def saved_activation_bytes_and_loss(model, inputs, labels):
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(inputs, labels)
    live = {}
    for t in saved:
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in param_storages:
            live[storage.data_ptr()] = storage.nbytes()
    return sum(live.values()), out


def run(switches: dict):
    torch.manual_seed(0)
    cfg = load_preset("tiny")
    model = build_model(cfg).train()
    apply_converters(model, [SelectiveRecompute(switches)])  # the run setting recompute.<switch>
    ids = torch.randint(0, cfg.vocab_size, (4, 65), generator=torch.Generator().manual_seed(1))
    saved_bytes, out = saved_activation_bytes_and_loss(model, ids[:, :-1], ids[:, 1:])
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return saved_bytes, out, grads


@pytest.fixture(scope="module")
def baseline():
    return run({})


@pytest.mark.parametrize("switches", [{s: True} for s in SWITCHES] + [{s: True for s in SWITCHES}],
                         ids=[*SWITCHES, "all"])
def test_recompute_is_bitwise_equal_and_saves_memory(baseline, switches):
    base_bytes, base_out, base_grads = baseline
    saved_bytes, out, grads = run(switches)
    print(f"{'+'.join(switches)}: saved activations {saved_bytes} B vs {base_bytes} B "
          f"({100 * (1 - saved_bytes / base_bytes):.1f}% less)")
    # Recomputation re-runs the same kernels on the same inputs: results must be bitwise equal.
    assert torch.equal(out.loss, base_out.loss)
    assert torch.equal(out.logits_BSV, base_out.logits_BSV)
    assert grads.keys() == base_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], base_grads[name]), name
    assert saved_bytes < base_bytes


def test_all_switches_save_more_than_each_alone(baseline):
    alone = [run({s: True})[0] for s in SWITCHES]
    together = run({s: True for s in SWITCHES})[0]
    assert together < min(alone)


def test_a_switch_no_layer_has_and_the_old_model_keys_are_refused_naming_the_new_one():
    with pytest.raises(ValueError, match="no layer of this model can recompute its swiglu"):
        apply_converters(torch.nn.Sequential(torch.nn.Linear(2, 2)), [SelectiveRecompute({"swiglu": True})])
    with pytest.raises(ValueError, match=r"model.recompute_swiglu is now recompute.swiglu .* set recompute.swiglu=true"):
        get_spec("deepseek_v3").config({"arch": "deepseek_v3", "recompute_swiglu": True})


def test_recompute_regions_keep_nothing_once_their_backward_ran():
    """A region's outputs hold their autograd node, which holds the region: unless the backward lets
    go of what the region kept, each step leaves its inputs alive (seen growing step after step on a
    pipeline by the saved-tensor meter). After each backward, nothing saved may live on, nor after
    a graph is dropped."""
    from moetron.core.saved_tensors import SavedTensorMeter, module_state
    from moetron.models import get_spec
    from moetron.models.deepseek_v3 import DeepSeekV3, load_preset

    torch.manual_seed(0)
    cfg = load_preset("tiny")
    model = DeepSeekV3(cfg).train()
    get_spec("deepseek_v3").parallelize(model, None, "alltoall", False,
                                        recompute={"norm": True, "mla_up_proj": True, "swiglu": True})
    meter = SavedTensorMeter(module_state([model]))
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        with meter.saving(0):
            out = model(ids[:, :-1], ids[:, 1:])
        assert meter.sample()[0] > 0
        out.loss.backward()
        del out
        assert meter.sample() == (0, 0)
    gc.collect()  # what earlier tests left for the collector
    before = _live_regions()
    out = model(ids[:, :-1], ids[:, 1:])  # a forward whose graph is dropped without a backward (a step that failed)
    assert _live_regions() > before
    del out
    assert _live_regions() == before  # freed as the graph goes, no garbage collection needed: no cycle


def _live_regions() -> int:
    from moetron.parallel.recompute import OutputRecompute

    return sum(isinstance(o, OutputRecompute) for o in gc.get_objects())

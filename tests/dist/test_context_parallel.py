"""Context parallelism in the model (issue 29): a sequence split over cp ranks, each holding a head
and a tail chunk, every attention module gathering the keys of the others (MLA its compressed latent
and rotated RoPE key, GQA its keys and values). The whole model's logits on each rank equal its rows
of the one-process forward, and the gradients summed over the ranks equal one process's, for cp = 2
and 4, with MLA (DeepSeek-V3, also under YaRN), GQA with q/k norms (Qwen3-MoE) and GQA with sinks and a sliding window
(GPT-OSS); the training forward's LM, MTP and balance losses, averaged over the ranks as data ranks
average, equal one process's, and so do the averaged gradients (packed rows included: MTP counts
no target in another sample, wherever the chunks cut)."""
import pytest
import torch
import torch.distributed as dist

from moetron.core.saved_tensors import SavedTensorMeter, module_state
from moetron.models import build_model, load_preset
from moetron.models.common.context_parallel import SequenceSplit, chunk_bounds, context_parallel, shard_sequence
from moetron.models.common.packed import PackedSamples
from tests.dist.harness import run_ranks

B, S = 2, 32


# DeepSeek-V3's context extension (report section 4.3): YaRN positions and its softmax scale
YARN = {"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 8, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}


def _model_and_batch(preset: str):
    torch.manual_seed(0)
    model = build_model(load_preset(preset.removesuffix("+yarn"), **(YARN if preset.endswith("+yarn") else {})))
    model.train()
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    ids_BS = torch.randint(0, V, (B, S), generator=g)
    cotangent_BSV = torch.randn(B, S, V, generator=g)  # what the loss's gradient would send back
    return model, ids_BS, cotangent_BSV


PACKED = [[12, 20], [5, 11, 16]]  # samples per row: each attends only to itself


def _cp_rank(rank, world, preset, packed=False):
    model, ids_BS, cotangent_BSV = _model_and_batch(preset)
    positions_BS = PackedSamples.of_lengths(PACKED).position_ids_BS if packed else None  # restart at each sample
    local_BS, _, samples = SequenceSplit(dist.group.WORLD, rank, world).shard(ids_BS, ids_BS, positions_BS)
    assert samples.context.plain == (not packed)  # MLA's chunked causal attention, or the dense mask
    with context_parallel(model, dist.group.WORLD):
        logits_BSV = model(local_BS, samples=samples)
    (logits_BSV * shard_sequence(cotangent_BSV, rank, world)).sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)  # the parameters are replicated over cp: their gradients sum
            grads[name] = p.grad
    return {"logits": logits_BSV.detach(), "grads": grads}


def test_chunks_pair_early_and_late_tokens():
    assert chunk_bounds(16, 0, 2) == [(0, 4), (12, 16)] and chunk_bounds(16, 1, 2) == [(4, 8), (8, 12)]
    rows = torch.arange(16).view(1, 16)
    assert sorted(torch.cat([shard_sequence(rows, r, 4) for r in range(4)], dim=1)[0].tolist()) == list(range(16))
    with pytest.raises(ValueError, match="multiple of 8"):
        chunk_bounds(20, 0, 4)


@pytest.mark.parametrize("preset,packed", [("tiny", False), ("qwen3_moe_tiny", False), ("gpt_oss_tiny", False),
                                           ("tiny", True), ("tiny+yarn", False)])
@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_forward_and_backward_equal_one_process(preset, packed, cp):
    model, ids_BS, cotangent_BSV = _model_and_batch(preset)
    logits_BSV = model(ids_BS, samples=PackedSamples.of_lengths(PACKED) if packed else None)
    (logits_BSV * cotangent_BSV).sum().backward()
    results = run_ranks(cp, _cp_rank, preset, packed)
    for rank, got in enumerate(results):
        torch.testing.assert_close(got["logits"], shard_sequence(logits_BSV.detach(), rank, cp), rtol=1e-5, atol=1e-5)
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(results[0]["grads"]) == set(expected)
    for name, grad in expected.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert float((results[0]["grads"][name] - grad).abs().max() / scale) < 1e-5, name


# -- the training forward: losses and gradients, as data-parallel ranks average them ---------------
BOOSTED = {"tiny": {"seq_aux_alpha": 0.1, "router_z_loss_coef": 0.01},  # visible balance grads; MTP: unequal counts
           "qwen3_moe_tiny": {"router_aux_loss_coef": 0.1}}


STEPS, LR = 8, 0.1  # plain SGD: every step's weights follow from the gradients before it


def _training_model(preset: str):
    torch.manual_seed(0)
    return build_model(load_preset(preset, **BOOSTED[preset])).train()


def _batch(model, step: int):
    g = torch.Generator().manual_seed(2 + step)
    ids_BS = torch.randint(0, model.cfg.vocab_size, (B, S), generator=g)
    return ids_BS, torch.randint(0, model.cfg.vocab_size, (B, S), generator=g)


def _options(preset: str) -> dict:
    return {"mtp_weight": 0.3} if preset == "tiny" else {}


def _terms(out) -> dict:
    return {k: float(getattr(out, k).detach()) for k in ("loss", "loss_lm", "loss_mtp", "loss_balance")
            if getattr(out, k) is not None}


def _cp_training_rank(rank, world, preset, packed=False):
    model = _training_model(preset)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    positions_BS = PackedSamples.of_lengths(PACKED).position_ids_BS if packed else None
    split, steps = SequenceSplit(dist.group.WORLD, rank, world), []
    for step in range(STEPS):
        local_BS, local_labels_BS, samples = split.shard(*_batch(model, step), positions_BS)
        with context_parallel(model, dist.group.WORLD):
            out = model(local_BS, local_labels_BS, samples=samples, loss_denominator=B * S / world,
                        **_options(preset))
        out.loss.backward()
        grads = {}
        for name, p in model.named_parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world  # cp ranks average their gradients, as data ranks do
                grads[name] = p.grad.clone()
        steps.append({"terms": _terms(out), "grads": grads})
        optimizer.step()
        optimizer.zero_grad()
    return steps


@pytest.mark.parametrize("preset,packed", [("tiny", False), ("qwen3_moe_tiny", False), ("tiny", True)])
@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_losses_and_gradients_equal_one_process(preset, packed, cp):
    """MTP's shifted tokens and targets cross the chunks, the balance losses count whole rows (the
    sequence-wise loss of DeepSeek-V3, the classic one of Qwen3-MoE), the LM loss is normalised
    over the whole batch: over 8 SGD steps, the mean over the cp ranks of their losses, and their
    averaged gradients, are one process's (every gradient, every step)."""
    model = _training_model(preset)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    results = run_ranks(cp, _cp_training_rank, preset, packed)
    for step in range(STEPS):
        ids_BS, labels_BS = _batch(model, step)
        out = model(ids_BS, labels_BS, loss_denominator=B * S, **_options(preset),
                    samples=PackedSamples.of_lengths(PACKED) if packed else None)
        out.loss.backward()
        expected = _terms(out)
        assert expected["loss_balance"] > 1e-3 and ("loss_mtp" in expected) == (preset == "tiny")
        for key, value in expected.items():
            ranks = [r[step]["terms"][key] for r in results]
            assert sum(ranks) / cp == pytest.approx(value, rel=1e-5), (step, key, ranks, value)
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            scale = p.grad.abs().max().clamp_min(1e-12)
            assert float((results[0][step]["grads"][name] - p.grad).abs().max() / scale) < 1e-5, (step, name)
        optimizer.step()
        optimizer.zero_grad()


# -- memory: what each rank keeps for its backward -------------------------------------------------
LONG = 512  # tokens of one row: the attention scores (S x T per head on CPU) dominate a short one less


def _saved_bytes_rank(rank, world, preset):
    """Bytes autograd keeps from this rank's forward (the trainer's saved-tensor accounting)."""
    torch.manual_seed(0)
    model = build_model(load_preset(preset)).train()
    ids_BS = torch.randint(0, model.cfg.vocab_size, (1, LONG), generator=torch.Generator().manual_seed(1))
    local_BS, labels_BS, samples = SequenceSplit(dist.group.WORLD, rank, world).shard(ids_BS, ids_BS)
    meter = SavedTensorMeter(module_state([model]))
    meter.ignore((local_BS, labels_BS))
    with context_parallel(model, dist.group.WORLD), meter.saving(0):
        model(local_BS, labels_BS, samples=samples, loss_denominator=LONG / world, **_options(preset))
    meter.sample()
    gathered = sum(m.core_cost(LONG).context_bytes for m in model.modules() if hasattr(m, "kv_cache"))
    return meter.take_peak(), gathered / 2 * 4 * LONG  # BF16 bytes -> float32 values here, the whole row


@pytest.mark.parametrize("preset", ["tiny", "qwen3_moe_tiny"])
def test_activation_bytes_per_rank_fall_as_one_over_cp(preset):
    """Everything a rank keeps for its backward is of its own tokens, and falls as 1/cp, but for
    the keys gathered from the whole row (MLA: the latent and RoPE key, 576 values a token at V3;
    GQA: keys and values), the same at every cp: measured at cp = 1, 2, 4 on the same path."""
    kept = {cp: run_ranks(cp, _saved_bytes_rank, preset)[0] for cp in (1, 2, 4)}
    gathered = kept[1][1]
    assert 0 < gathered < 0.05 * kept[1][0]
    for cp in (2, 4):
        assert (kept[cp][0] - gathered) / (kept[1][0] - gathered) == pytest.approx(1 / cp, rel=1e-3), (cp, kept)

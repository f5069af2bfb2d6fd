"""Packed samples (sample masking, DeepSeek-V3 report 5.1): three samples of different lengths in one
row give each sample the logits it has alone, for every architecture of the zoo (MLA, grouped-query
attention with sliding windows, GPT-OSS's sinks), and DeepSeek-V3's MTP counts no target that lies
in another sample."""
import warnings

import pytest
import torch

from moetron.models import build_model, load_preset
from moetron.models.common.linear_cross_entropy import IGNORE_INDEX
from moetron.models.common.packed import PackedSamples

LENGTHS = [13, 6, 13]  # one row of 32 tokens
CASES = {
    "tiny": {},  # DeepSeek-V3: MLA, dense then MoE layers, MTP
    "deepseek_v2_tiny": {},
    "qwen3_moe_tiny": dict(use_sliding_window=True, sliding_window=5),
    "mixtral_tiny": dict(sliding_window=4),
    "gpt_oss_tiny": dict(sliding_window=5),  # sinks; sliding and full layers alternate
}


def _model(preset):
    torch.manual_seed(0)
    model = build_model(load_preset(preset, **CASES[preset])).eval()
    with torch.no_grad():  # loss-free routing biases and sinks that matter
        for name, tensor in model.named_buffers():
            if name.endswith("expert_bias"):
                tensor.normal_(0.0, 0.1)
    return model


def _samples(vocab: int):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (1, n), generator=gen) for n in LENGTHS]


@pytest.mark.parametrize("preset", list(CASES))
def test_each_packed_sample_has_its_logits_alone(preset):
    model = _model(preset)
    parts = _samples(model.cfg.vocab_size)
    packed_ids = torch.cat(parts, dim=1)
    samples = PackedSamples.of_lengths([LENGTHS])
    with torch.no_grad():
        packed = model(packed_ids, samples=samples)
        unmasked = model(packed_ids)
        start = 0
        for part in parts:
            alone = model(part)
            got = packed[:, start:start + part.shape[1]]
            # float32; the masked and the causal kernels sum in other orders: a few ulps
            assert float((got - alone).abs().max() / alone.abs().max()) < 1e-5, (preset, start)
            start += part.shape[1]
        later = slice(LENGTHS[0], None)  # without the mask, later samples see the earlier ones
        assert float((unmasked[:, later] - packed[:, later]).abs().max()) > 1e-3


def _labels_within(parts):
    """Next-token labels of each sample alone, IGNORE at its last position."""
    return [torch.cat([p[:, 1:], torch.full((1, 1), IGNORE_INDEX)], dim=1) for p in parts]


def test_packed_losses_sum_those_of_the_samples_alone_with_mtp():
    model = _model("tiny")
    assert len(model.mtp) >= 1
    parts = _samples(model.cfg.vocab_size)
    labels = _labels_within(parts)
    samples = PackedSamples.of_lengths([LENGTHS])
    with torch.no_grad():
        packed = model(torch.cat(parts, dim=1), torch.cat(labels, dim=1), samples=samples)
        alone = [model(p, y) for p, y in zip(parts, labels)]
    # a mean over counted targets: packed x its count = the sum of each alone x its count
    counts = [n - 1 for n in LENGTHS]
    expected_lm = sum(float(out.loss_lm) * c for out, c in zip(alone, counts)) / sum(counts)
    assert float(packed.loss_lm) == pytest.approx(expected_lm, rel=1e-5)
    depths = len(model.mtp)
    mtp_counts = [n - 1 - depths for n in LENGTHS]  # depth 1 predicts t_{i+2}: one target fewer per sample
    expected_mtp = sum(float(out.loss_mtp) * c for out, c in zip(alone, mtp_counts)) / sum(mtp_counts)
    assert float(packed.loss_mtp) == pytest.approx(expected_mtp, rel=1e-5)


def test_positions_restart_and_masks_stay_in_their_sample():
    samples = PackedSamples.of_lengths([[2, 3], [5]])
    assert samples.position_ids_BS.tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
    visible = samples.visible()[:, 0]
    assert visible[0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                                         [0, 0, 1, 1, 1]]
    assert samples.visible(window=2)[1, 0, 4].int().tolist() == [0, 0, 0, 1, 1]
    assert samples.same_sample_ahead(1)[0].tolist() == [True, False, True, True, False]


def test_flex_attentions_block_mask_equals_the_dense_mask():
    """What GPUs run (FlexAttention with the block mask), here in eager mode on the CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    samples = PackedSamples.of_lengths([[40, 30, 58], [128]])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 128, d, generator=gen) for d in (24, 24, 16))
    for window in (None, 9):
        dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=samples.visible(window),
                                                                 scale=0.2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex_attention warns that it is not compiled
            flex = flex_attention(q, k, v, block_mask=samples.block_mask(window), scale=0.2)
        assert torch.allclose(flex, dense, atol=1e-5), window


def test_routers_count_no_padding_and_mtp_no_token_beyond_its_sample():
    """A row's padding (real_BS False) joins neither the expert loads nor the balance loss: they
    equal those of the real tokens alone; MTP depth k's blocks count a position only when t_{i+k}
    is in its sample."""
    from moetron.models.common.balance import sequence_balance_loss

    model = _model("tiny").train()
    parts = _samples(model.cfg.vocab_size)
    real = torch.cat(parts, dim=1)
    padded = torch.cat([real, torch.zeros(1, 8, dtype=torch.long)], dim=1)
    lengths = [LENGTHS + [8]]
    is_real = torch.tensor([[True] * sum(LENGTHS) + [False] * 8])
    routers = [m.mlp.gate for m in model.layers if hasattr(m.mlp, "gate")]
    mtp_routers = [d.block.mlp.gate for d in model.mtp]

    def loads(ids, samples):
        for r in routers + mtp_routers:
            r.tokens_per_expert.zero_()
        model(ids, torch.full_like(ids, IGNORE_INDEX), samples=samples)
        return [r.tokens_per_expert.clone() for r in routers], [r.tokens_per_expert.clone() for r in mtp_routers]

    main_pad, mtp_pad = loads(padded, PackedSamples(PackedSamples.of_lengths(lengths).position_ids_BS, is_real))
    main_real, _ = loads(real, PackedSamples.of_lengths([LENGTHS]))
    assert all(torch.equal(a, b) for a, b in zip(main_pad, main_real))  # the 8 padding tokens: not counted
    assert sum(int(t.sum()) for t in main_pad) == len(routers) * sum(LENGTHS) * model.cfg.num_experts_per_tok
    # MTP depth 1 counts each sample's positions but its last: 12 + 5 + 12
    assert all(int(t.sum()) == (sum(LENGTHS) - len(LENGTHS)) * model.cfg.num_experts_per_tok for t in mtp_pad)
    # the masked sequence-wise loss of a padded row is the plain loss of its real tokens
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(1, 10, 8, generator=gen)
    top = scores.topk(2, dim=-1).indices
    counted = torch.tensor([[True] * 7 + [False] * 3])
    masked = sequence_balance_loss(scores, top, counted)
    assert torch.allclose(masked, sequence_balance_loss(scores[:, :7], top[:, :7]), rtol=1e-6)


@pytest.mark.parametrize("lengths,window", [([[40, 30, 58], [128]], None), ([[300, 5, 211], [90] * 5 + [66]], None),
                                            ([[300, 5, 211], [90] * 5 + [66]], 100)])
def test_the_gpu_block_mask_marks_exactly_the_blocks_with_visible_pairs(lengths, window):
    """FlexAttention skips the blocks a block mask leaves out and drops the mask inside its full
    blocks: each block with a visible pair must be kept, and a block marked full must be all
    visible. Checked against the dense mask, block by block (16-token blocks: many of them)."""
    from moetron.models.common.packed import block_structure

    samples = PackedSamples.of_lengths(lengths)
    block = 16
    partial, full = block_structure(samples.sample_ids_BS, window, block)
    visible = samples.visible(window)[:, 0]
    B, S, _ = visible.shape
    n = -(-S // block)
    padded = torch.zeros(B, n * block, n * block, dtype=torch.bool)
    padded[:, :S, :S] = visible
    blocks = padded.view(B, n, block, n, block)
    any_visible = blocks.any(dim=4).any(dim=2)
    exists = torch.zeros(B, n * block, n * block, dtype=torch.bool)
    exists[:, :S, :S] = True
    all_visible = (blocks | ~exists.view(B, n, block, n, block)).all(dim=4).all(dim=2) & any_visible
    assert not (partial & full).any()
    assert torch.equal(full, all_visible) or (window is not None and not (full & ~all_visible).any())
    assert not (any_visible & ~(partial | full)).any()  # no visible pair is skipped
    if window is None:
        assert torch.equal(partial | full, any_visible)  # and no block without one is computed

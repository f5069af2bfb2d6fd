"""Generation with a KV cache: greedy completions equal transformers' `generate` on the same weights
for every family (MLA's latent cache, GQA with sliding windows and sinks), a batch of prompts of
different lengths gives each the completion it gets alone, and the cache gives what recomputing
the whole sequence gives."""
import warnings

import pytest
import torch

from moetron.models import build_model, load_preset
from moetron.models.generate import generate, sample_next
from moetron.models.hf import from_hf, to_hf

transformers = pytest.importorskip("transformers")
from tests.unit.test_zoo_hf import _hf_model  # noqa: E402

PROMPTS = [[5, 17, 99, 3, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15], [300, 2, 1]]
NEW = 8
# the variant of each family with the most to get wrong: sliding windows shorter than the sequences,
# sinks, YaRN, a compressed query
FAMILIES = {"tiny": None, "qwen3_moe_tiny": "sliding_window", "mixtral_tiny": "sliding_window_wide_heads",
            "deepseek_v2_tiny": "greedy_q_lora_yarn", "gpt_oss_tiny": "full_first_plain_rope"}


def _models(preset):
    if preset == "tiny":  # DeepSeek-V3 (its MTP depths take no part in generation)
        torch.manual_seed(3)
        ours = build_model(load_preset("tiny")).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = to_hf(ours)
        theirs.config._attn_implementation = "eager"
        return ours, theirs.eval()
    hf_model = _hf_model(preset, FAMILIES[preset], seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return from_hf(hf_model).eval(), hf_model


def _transformers_greedy(hf_model, prompts):
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                            eos_token_id=None, min_new_tokens=NEW)
    return out[:, L:].tolist()


@pytest.mark.parametrize("preset", list(FAMILIES))
def test_greedy_completions_equal_transformers_generate(preset):
    ours, theirs = _models(preset)
    assert generate(ours, PROMPTS, NEW) == _transformers_greedy(theirs, PROMPTS)


def test_a_batch_gives_each_prompt_its_completion_alone_and_the_cache_changes_nothing():
    ours, _ = _models("tiny")
    batch = generate(ours, PROMPTS, NEW)
    assert batch == [generate(ours, [p], NEW)[0] for p in PROMPTS]
    for prompt, completion in zip(PROMPTS, batch):  # recomputed from scratch at every step
        ids = list(prompt)
        for token in completion:
            with torch.no_grad():
                assert int(ours(torch.tensor([ids]))[0, -1].argmax()) == token
            ids.append(token)


def test_stop_tokens_end_a_completion_and_sampling_follows_its_seed():
    ours, _ = _models("tiny")
    greedy = generate(ours, PROMPTS[:1], NEW)[0]
    stop = greedy[2]
    assert generate(ours, PROMPTS[:1], NEW, stop_ids=[stop])[0] == greedy[:greedy.index(stop) + 1]
    assert generate(ours, PROMPTS[:1], NEW, stop_ids=[stop], run_all_steps=True)[0] == greedy[:greedy.index(stop) + 1]
    draw = lambda seed: generate(ours, PROMPTS, NEW, temperature=1.0, top_p=0.9,  # noqa: E731
                                 generator=torch.Generator().manual_seed(seed))
    assert draw(0) == draw(0) and draw(0) != draw(1)
    logits = torch.tensor([[0.0, 5.0, 4.9, -9.0]])
    picks = {int(sample_next(logits, 1.0, 0.5, torch.Generator().manual_seed(s))) for s in range(50)}
    assert picks == {1}  # top-p 0.5 keeps only the most likely token here


def test_moetron_generate_prints_the_completions_of_a_folder(tmp_path, capsys):
    import json

    from moetron.data.tokenizers import ByteTokenizer
    from moetron.models import get_spec
    from moetron.train.generate_cli import main

    ours, _ = _models("tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_spec("deepseek_v3").save_hf(ours, tmp_path / "hf")
    tok = ByteTokenizer()
    expected = generate(ours, [tok.encode("def f(").tolist(), tok.encode("x").tolist()], 6, stop_ids=[tok.eos_id])
    capsys.readouterr()
    assert main([str(tmp_path / "hf"), "--prompt", "def f(", "--prompt", "x", "--max-new-tokens", "6"]) == 0
    lines = [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()]
    assert lines == [tok.decode([t for t in c if t != tok.eos_id]) for c in expected]
    assert main([str(tmp_path / "nothing"), "--prompt", "x"]) == 2

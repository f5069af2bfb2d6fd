"""Sampling from a moetron model with a key/value cache (moetron.models.common.kv_cache).

    completions = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32)              # greedy
    completions = generate(model, prompts, 32, temperature=0.7, top_p=0.95, stop_ids=[eos],
                           generator=torch.Generator().manual_seed(0))

Prompts of different lengths are left-padded; each token's position counts from its prompt's first
token, and padding is a key no query sees, so a prompt's completion is the one it gets alone. The
prompt runs in one forward, then one token per step. A completion ends after its first stop token
(kept) or at `max_new_tokens`; the batch stops when every completion has ended (unless
`run_all_steps`, which expert-parallel ranks need to stay in step). Not under pipeline parallelism.

Shape legend: B prompts, S tokens, V vocabulary.
"""
from __future__ import annotations

from typing import Iterable, Sequence, Union

import torch
from torch import nn

from moetron.models.common.kv_cache import DecodeState, kv_caches


def sample_next(logits_BV: torch.Tensor, temperature: float, top_p: float,
                generator: Union[None, torch.Generator, Sequence[torch.Generator]]) -> torch.Tensor:
    """[B] next tokens: the argmax at temperature 0, else a draw from the softmax of logits /
    temperature, restricted to the smallest set of tokens whose probability reaches `top_p`.
    `generator`: one for the batch, or one per row (each row's draw then depends on its own
    generator and probabilities only, not on the rows beside it)."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV  # mass of the tokens ranked above each
        sorted_BV = sorted_BV.masked_fill(before_BV >= top_p, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, order_BV, sorted_BV)
    if isinstance(generator, Sequence):
        return torch.cat([torch.multinomial(probs_BV[b], 1, generator=g) for b, g in enumerate(generator)])
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop_ids: Iterable[int] = (),
             generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
             pad_id: int = 0, return_logprobs: bool = False, run_all_steps: bool = False):
    """The completion of each prompt (its new tokens only), in eval mode, with a KV cache; with
    `return_logprobs`, also each completion token's log-probability under the distribution it was
    drawn from (the softmax of logits / temperature; of the logits when greedy), before top-p.
    `run_all_steps`: run `max_new_tokens` forwards even once every completion has ended (ranks
    whose forwards exchange tokens, under expert parallelism, must run as many as each other)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, each of one token or more")
    if isinstance(generator, Sequence) and len(generator) != len(prompts):
        raise ValueError(f"generate: {len(generator)} generators for {len(prompts)} prompts (give one per prompt)")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters() if not p.is_meta)
    B, L = len(prompts), max(len(p) for p in prompts)
    ids_BS = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    valid_BS = torch.zeros(B, L, dtype=torch.bool, device=device)
    for b, prompt in enumerate(prompts):
        ids_BS[b, L - len(prompt):] = torch.tensor(prompt, device=device)
        valid_BS[b, L - len(prompt):] = True
    positions_BS = (valid_BS.long().cumsum(dim=1) - 1).clamp(min=0)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    logprobs: list[list[float]] = [[] for _ in range(B)]
    try:
        with kv_caches(model, DecodeState()) as state:
            for _ in range(max_new_tokens):
                logits_BSV = model(ids_BS, samples=state.step(positions_BS, valid_BS))
                next_B = sample_next(logits_BSV[:, -1], temperature, top_p, generator)
                scaled_BV = logits_BSV[:, -1].float() / (temperature or 1.0)  # the distribution sampled
                chosen_B = torch.log_softmax(scaled_BV, dim=-1).gather(1, next_B[:, None])[:, 0]
                tokens, chosen = next_B.tolist(), chosen_B.tolist()  # one copy to the host per step
                for b in torch.nonzero(~done_B).flatten().tolist():
                    out[b].append(tokens[b])
                    logprobs[b].append(chosen[b])
                done_B |= torch.isin(next_B, stops)
                if not run_all_steps and bool(done_B.all()):
                    break
                ids_BS, valid_BS = next_B[:, None], torch.ones(B, 1, dtype=torch.bool, device=device)
                positions_BS = positions_BS[:, -1:] + 1
    finally:
        model.train(was_training)
    return (out, logprobs) if return_logprobs else out

"""What `stage=grpo` is made of besides the objective: the prompts of each step, completions that do
not depend on the batch they are drawn in, the shipped task's rewards, and the settings checked
before any process group starts."""
import json
import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from moetron.core.errors import UserInputError
from moetron.models import build_model, load_preset
from moetron.models.generate import generate
from moetron.rl.prompts import load_prompts, step_prompts
from moetron.rl.task import answer_format, answered, exact_answer, near_answer, sums
from moetron.train.config import register_configs
from moetron.train.preflight import compose_config
from moetron.train.trainer import check

register_configs()
_NO_ANSWERS = Path(tempfile.mkdtemp()) / "questions.jsonl"
_NO_ANSWERS.write_text(json.dumps({"prompt": "What is 1 + 1?"}) + "\n")


def _config(*overrides):
    cfg = compose_config(["model=tiny", "stage=grpo", "rl.group_size=4", "rl.prompts_per_step=8",
                          "train.micro_batch=4", *overrides])
    if "rl.reward=moetron.rl.task:exact_answer" in overrides:  # prompts without the answer it reads
        with open_dict(cfg):
            cfg.rl.prompts = str(_NO_ANSWERS)
    with open_dict(cfg):
        del cfg["hydra"]  # Hydra's own node, which the CLI removes before checking
    return cfg


def test_each_step_takes_its_prompts_from_a_permutation_per_epoch():
    examples = [{"prompt": str(i)} for i in range(10)]
    steps = [step_prompts(examples, s, 4, seed=3) for s in range(5)]  # 20 prompts: two epochs
    first, second = sum(steps[:2], []) + steps[2][:2], steps[2][2:] + sum(steps[3:], [])
    assert sorted(e["prompt"] for e in first) == sorted(e["prompt"] for e in second) == [str(i) for i in range(10)]
    assert first != second  # another order in the second epoch
    assert step_prompts(examples, 3, 4, seed=3) == steps[3]  # a function of the step: resumes take the same
    assert step_prompts(examples, 3, 4, seed=4) != steps[3]


def test_a_prompt_file_that_cannot_be_used_is_named(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": "2"}) + "\n")
    assert load_prompts(str(good)) == [{"prompt": "What is 1 + 1?", "answer": "2"}]
    assert len(load_prompts("sums")) == 2000
    for text, says in (('{"question": "x"}\n', "line 1 has no \"prompt\" string"), ("nope\n", "line 1 is not JSON"),
                       ('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n', "example 2 has the fields"),
                       ("\n", "the file holds no prompts")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(ValueError, match=f"rl.prompts={bad}: {says}"):
            load_prompts(str(bad))
    with pytest.raises(ValueError, match="no such file"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_a_completion_drawn_with_its_own_generator_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    model = build_model(load_preset("tiny")).eval()
    prompts = [[5, 17, 99, 3, 42], [7, 8, 9], [300, 2, 1, 4]]
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    together = generate(model, prompts, 8, temperature=1.0, generator=gens([10, 11, 12]))
    alone = [generate(model, [p], 8, temperature=1.0, generator=gens([s]))[0] for p, s in zip(prompts, [10, 11, 12])]
    assert together == alone
    assert generate(model, prompts[:1], 8, temperature=1.0, generator=gens([99]))[0] != alone[0]
    with pytest.raises(ValueError, match="2 generators for 3 prompts"):
        generate(model, prompts, 2, temperature=1.0, generator=gens([1, 2]))


def test_the_shipped_task_rewards_exact_close_and_well_written_answers():
    examples = sums(3, seed=5)
    prompts, answers = [e["prompt"] for e in examples], [e["answer"] for e in examples]
    right = [c["messages"][1]["content"] for c in answered(examples)]
    assert exact_answer(prompts, right, answers) == [1.0] * 3 and answer_format(prompts, right) == [1.0] * 3
    a, b = examples[0]["prompt"][8:-1].split(" + ")
    off_by_two = f"{a} + {b} = {int(a) + int(b) + 2}."
    assert exact_answer(prompts[:1], [off_by_two], answers[:1]) == [0.0]
    assert near_answer(prompts[:1], [off_by_two], answers[:1]) == [pytest.approx(0.8)]
    assert answer_format(prompts[:1], [off_by_two]) == [1.0]  # written right, summed wrong
    assert answer_format(prompts[:1], [f"{b} + {a} = 3."]) == [0.0]  # not the question's operands
    assert near_answer(prompts[:1], ["no number"], answers[:1]) == [0.0]


@pytest.mark.parametrize("override,says", [
    ("rl.prompts_per_step=3", "rl.prompts_per_step=3 must be a multiple of dp x ep = 2"),
    ("rl.temperature=0", "rl.temperature=0.0: GRPO samples"),
    ("rl.group_size=1", "rl.group_size=1 must be at least 2"),
    ("train.micro_batch=3", "a data rank's 16 completions"),
    ("train.eval_every=5", "train.eval_every=5 with rl.algorithm=grpo"),
    ("rl.algorithm=ppo", "rl.algorithm='ppo': choose grpo"),
    ("rl.reward=nowhere_module:fn", "rl.reward='nowhere_module:fn': cannot import"),
    ("rl.prompts=missing.jsonl", "rl.prompts='missing.jsonl': no such file"),
    ("parallel.pp=2", "parallel.pp=2 must be 1"),
    ("train.max_steps=null", "train.max_steps=null with rl.algorithm: give train.max_steps"),
    ("rl.reward=moetron.rl.task:exact_answer", "rl.reward=moetron.rl.task:exact_answer: raised TypeError"),
])
def test_grpo_settings_that_cannot_work_are_named_before_any_process_group(override, says):
    cfg = _config(override)
    with pytest.raises(UserInputError, match=says.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        check(cfg, None, world_size=2)


def test_the_grpo_stage_sets_the_batch_from_its_rollouts():
    cfg = _config()
    checked = check(cfg, None, world_size=2)
    assert cfg.train.global_batch == 32 and checked.sampler is None
    assert checked.rl.template is not None and len(checked.rl.examples) == 2000
    assert cfg.optim.decay_steps == cfg.train.max_steps


@pytest.mark.parametrize("pinned", [False, True])
def test_the_reference_swaps_in_its_starting_weights_and_gives_the_policy_back(pinned):
    """On a GPU the copies go through pinned host buffers (`pinned` emulates them here): the policy
    comes back as it is now, not as it was when the reference was made (the H200 run caught that)."""
    from moetron.train.ema import FrozenReference

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference = FrozenReference(model)
    if pinned:
        reference._staging = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the policy moved on
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        with reference.swapped_in():
            assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
        assert all(torch.equal(p, moved[n]) for n, p in model.named_parameters())
    assert set(reference.state()) == {"ref/weight", "ref/bias"}
    reference.close()

"""Structured schemas of `moetron-train`'s config, registered in Hydra's ConfigStore.

`conf/config.yaml` composes the groups model / parallel / cluster / precision / optim / data /
logging (+ the `train` settings) on top of `RootConfig`, so a misspelled key or a value of the wrong
type is an error naming it. The `model` node belongs to the architecture `model.arch` names: its
spec's config class types it (`validate` merges the two, so its keys are checked the same way).
`moetron.train.validate` checks what types cannot (ranges, divisibility, layouts) before any
process group starts; every message names the key and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore




@dataclass
class TrainSettings:
    max_steps: Optional[int] = 200  # None: as many as train.epochs give
    # passes over the data (chat data): the steps of that many epochs (train.max_steps, when set, stops sooner)
    epochs: Optional[float] = None
    seed: int = 0
    global_batch: int = 16  # sequences per optimizer step, over all ranks (as Megatron)
    # [start, increment, tokens]: the batch grows from start by increment to global_batch over the
    # first `tokens` tokens (moetron.train.batch_ramp); None: global_batch from the first step
    batch_ramp: Optional[list[Any]] = None
    micro_batch: int = 8  # sequences per forward/backward on one rank
    seq_len: int = 128
    ckpt_every: int = 50  # steps; a checkpoint is also written at the end
    ckpt_keep: int = 2  # complete checkpoints kept (older ones are deleted)
    resume: bool = True  # resume from the newest complete checkpoint of the run directory
    exit_after_steps: int = 0  # stop (with a checkpoint) after this many steps of this invocation; 0: run to max_steps
    log_every: int = 1
    eval_every: int = 0  # steps between evaluations on the validation data (eval/loss); 0: never
    eval_batches: int = 1  # global batches per evaluation, the same ones every time
    ema_decay: float = 0.0  # an average of the parameters in CPU memory (moetron.train.ema); 0: none
    eval_ema: bool = False  # evaluate on the average instead of the parameters
    on_nonfinite: str = "stop"  # a NaN/inf gradient: stop (naming step and parameter) | skip the step
    collective_timeout_s: float = 1800.0  # a collective that waits longer on a peer fails instead of hanging
    deterministic: Optional[bool] = None  # None: deterministic on CPU, not on GPU
    compile: bool = False  # torch.compile each decoder and MTP block (collectives are graph breaks)
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: tracing without code generation)
    # Piecewise-constant schedules in tokens, [[from_tokens, value], ...], for models with MTP and
    # loss-free balancing. None: the report's, lambda = model.mtp_loss_weight (0.3) then 0.1 after
    # 10T tokens; u = model.bias_update_speed (0.001) then 0 after 14.3T.
    mtp_weight_schedule: Optional[list[Any]] = None
    bias_update_schedule: Optional[list[Any]] = None


@dataclass
class ParallelConfig:
    pp: int = 1
    ep: int = 1
    dp: Optional[int] = None  # None: world size / (pp * cp * ep)
    # context parallelism: each sequence split over cp ranks, which gather attention's keys (MLA: its
    # latent) from each other (moetron.models.common.context_parallel); for sequences one rank cannot hold
    cp: int = 1
    schedule: str = "1f1b"  # 1f1b | interleaved_1f1b | zb1p | dualpipe | dualpipev (used when pp > 1)
    layout: Optional[list[Any]] = None  # decoder layers per stage module, e.g. [[0, 1], [2]]; None: even
    dispatcher: str = "hierarchical"  # alltoall | hierarchical | deepep (expert-parallel token exchange)
    # ZeRO-1: optimizer state and FP32 master weights sharded over the ranks holding copies
    # (moetron.parallel.zero1); None: on when dp > 1
    zero1: Optional[bool] = None
    # ZeRO-1: the updated shards' all-gather runs on while the next step starts, each module's forward
    # waiting for its own parameters only (Megatron-Core's overlap_param_gather); None: on with GPUs
    overlap_param_gather: Optional[bool] = None
    # each gradient bucket's all-reduce (ZeRO-1: reduce-scatter) starts as soon as its gradients are
    # final, while the backward goes on, pipelines included (Megatron-Core's overlap_grad_reduce); None: on with GPUs
    overlap_grad_reduce: Optional[bool] = None
    overlap_fb: bool = True  # dualpipe(v): run the forward and backward of each F&B pair at once
    # overlapped pairs: forward and backward take turns issuing collectives, in one order on every
    # rank (moetron.comm.lanes); None: on under NCCL, whose blocking kernels need it, off under gloo
    ordered_issue: Optional[bool] = None


@dataclass
class ClusterConfig:
    name: str = "local_cpu"
    nodes: Optional[int] = 1  # None: from the job (SLURM_NNODES, or world size / torchrun's ranks per node)
    # ranks per node; None: the ranks split evenly over the nodes (SLURM_GPUS_ON_NODE or torchrun's
    # LOCAL_WORLD_SIZE where the node count comes from the job)
    gpus_per_node: Optional[int] = None
    nvlink_gbps: float = 0.0  # GB/s per GPU inside a node
    ib_gbps: float = 0.0  # GB/s per GPU between nodes
    peak_tflops: float = 1.0  # BF16 dense peak per rank, for MFU
    # the planner's (moetron-plan; conf/cluster/template.yaml documents them)
    fp8_tflops: float = 1.0
    memory_gib: float = 16.0
    hbm_tbps: float = 0.05
    price_per_gpu_hour: float = 0.0
    sms: int = 1


@dataclass
class PrecisionConfig:
    name: str = "auto"
    compute_dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU; or float32 | bfloat16
    # the working weights the forward and backward read; bfloat16: float32 master weights (sharded by
    # ZeRO-1), gradients and optimizer states (report section 3.3). auto: bfloat16 on CUDA when the
    # compute dtype is, else float32 (a CPU keeps float32 weights unless this is set)
    param_dtype: str = "auto"
    # FP8 GEMMs with 1x128 / 128x128 scales in the decoder's linears and experts (moetron.precision)
    fp8: bool = False
    backend: str = "auto"  # auto | emulated | torch | te: who runs the FP8 GEMMs (auto: torch on Hopper)
    # with fp8: tokens travel to their experts as E4M3 tiles, and the combine's backward sends the
    # gradients of the experts' outputs alike (the combine's outputs and the tokens' gradients stay)
    fp8_dispatch: bool = True
    # with fp8: activations kept for the backward in FP8 (linear inputs, SwiGLU inputs; report 3.3.3)
    fp8_cache_activations: bool = False


@dataclass
class RecomputeConfig:
    """Recomputation in backward instead of storing (report section 3.2.3; moetron.parallel.recompute):
    a run setting, free to change on resume."""
    norm: bool = False  # RMSNorm outputs (decoder blocks and MLA's latent norms)
    mla_up_proj: bool = False  # MLA's up-projected q, k, v
    swiglu: bool = False  # SwiGLU outputs (dense MLPs, shared and routed experts)


@dataclass
class MemoryConfig:
    """What the forward keeps for its backward, cut without changing results beyond rounding (issue
    26; moetron.parallel.memory): run settings, free to change on resume."""
    # routed experts scale their SwiGLU output by the routing weight before the down-projection, so
    # the combine keeps no expert outputs for its backward
    gate_before_down_proj: bool = True
    # the output head and its cross entropy a chunk of tokens at a time: no [tokens, vocab] logits kept
    chunked_loss: bool = True


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    # the cosine reaches lr * min_lr_ratio here and stays (not train.max_steps); None: at train.max_steps
    decay_steps: Optional[int] = 200
    # phases in tokens, DeepSeek-V3's way (moetron.train.lr_schedule); set, it replaces the four above
    schedule: Optional[list[Any]] = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    moments_dtype: str = "float32"  # or bfloat16 (the report's choice)
    implementation: str = "auto"  # auto: torch fused AdamW where the device allows | torch | apex


@dataclass
class DataConfig:
    # "builtin" (the shipped corpus), or the prefix of a moetron-data token file or of a Megatron-LM
    # indexed dataset (.bin/.idx), with or without .bin
    path: str = "builtin"
    tokenizer: str = "bytes"  # bytes, or a Hugging Face tokenizer's local folder or tokenizer.json
    blend: Optional[list[Any]] = None  # [[weight, path], ...]: several sources instead of data.path
    valid_path: Optional[str] = None  # validation data; None: the held-out share below, of every source
    valid_fraction: float = 0.01  # without data.valid_path: the last 1% of every source's windows, held out
    # pre-training: documents in a sequence attend only to themselves (positions restart after each
    # EOS); false packs them without masks, as DeepSeek-V3 pre-trains. Chat data is always masked.
    sample_masking: bool = False
    # chat data (moetron-data --chat): conversations packed into rows, each attending only to itself
    packing: str = "first_fit"  # first_fit | best_fit (moetron.data.packing)
    overlong: str = "refuse"  # a conversation longer than train.seq_len: refuse | truncate (counted, reported)


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto: online with credentials, else offline | disabled | offline | online
    project: str = "moetron"
    entity: Optional[str] = None
    name: Optional[str] = None


@dataclass
class ProfileConfig:
    enabled: bool = False  # a torch.profiler trace per rank in <run dir>/profile (moetron.profiling)
    start_step: int = 3  # first profiled step, numbered as logged (the steps before it warm up)
    num_steps: int = 2
    ranks: list[int] = field(default_factory=lambda: [0])  # global ranks that write a trace; []: all


@dataclass
class LoggingConfig:
    progress: bool = True  # console progress bar
    wandb: WandbConfig = field(default_factory=WandbConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    # under pipelining: one step's measured actions per pipeline rank in <run dir>/timeline/ (drawn by
    # moetron-report next to the simulated schedule)
    timeline: bool = False
    timeline_step: int = 3  # the step recorded, numbered as logged (the steps before it warm up)
    heatmap_every: int = 0  # steps between tokens-per-expert heatmaps sent to W&B (when it is on); 0: never


@dataclass
class RLConfig:
    """Reinforcement learning with GRPO (moetron.rl; `stage=grpo` sets the algorithm and its settings).
    One training step: a rollout (G completions per prompt, sampled with the policy's own weights and
    scored) and `inner_steps` optimizer steps on it."""
    algorithm: Optional[str] = None  # grpo: train on rollouts instead of token data; None: pre-training / SFT
    # {"prompt": ..., other fields the reward reads} per line of a .jsonl file, or "sums": the arithmetic
    # task that ships with moetron (moetron.rl.task)
    prompts: str = "sums"
    # module:function, or a list of them (the reward is their sum; each one's mean is logged)
    reward: Any = "moetron.rl.task:exact_answer"
    group_size: int = 8  # G completions per prompt (the group whose mean reward is the baseline)
    prompts_per_step: int = 8  # prompts per rollout, over all data ranks
    max_new_tokens: int = 32
    temperature: float = 1.0
    clip_eps: float = 0.2  # the importance ratio is clipped to [1 - eps, 1 + eps]
    beta: float = 0.0  # weight of the KL to the frozen reference (the run's starting weights); 0: no reference
    inner_steps: int = 1  # optimizer steps per rollout, each on the whole rollout (DeepSeekMath's mu)
    router_replay: bool = True  # MoE: the training forward uses the experts each token took while sampling
    chat_template: bool = True  # render each prompt as a user turn with data.tokenizer's chat template


@dataclass
class RootConfig:
    # Python modules imported before the model is built: a module of your own registers its
    # architecture there (moetron.models.register_model), e.g. imports=[my_models.dense]
    imports: list[str] = field(default_factory=list)
    model: Any = None  # typed by the config class of model.arch's spec (moetron.train.validate.model_config)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    rl: RLConfig = field(default_factory=RLConfig)


def schema_name(arch: str) -> str:
    return f"{arch}_model_schema"


def register_configs() -> None:
    """The root schema, and each registered architecture's config class as `<arch>_model_schema`
    (outside the `model` group, so it is not offered as a preset): a preset names it first in its
    defaults list (`- /deepseek_v3_model_schema@_here_`), so every key of its model can be
    overridden and is type-checked when Hydra composes."""
    from moetron.models.registry import registered_specs

    cs = ConfigStore.instance()
    cs.store(name="root_schema", node=RootConfig)
    for spec in registered_specs():
        cs.store(name=schema_name(spec.arch), node=spec.config_cls)

"""Config presets load, and mistakes name the key and the fix."""
import pytest
from omegaconf.errors import ConfigKeyError

from moetron.models import build_model, load_preset


def test_presets_load():
    mini = load_preset("mini")
    assert (mini.vocab_size, mini.hidden_size, mini.num_hidden_layers, mini.first_k_dense_replace) == (32000, 2048, 6, 1)
    assert (mini.intermediate_size, mini.num_attention_heads, mini.q_lora_rank, mini.kv_lora_rank) == (8192, 16, 768, 256)
    assert (mini.qk_nope_head_dim, mini.qk_rope_head_dim, mini.v_head_dim) == (128, 64, 128)
    assert (mini.n_routed_experts, mini.n_shared_experts, mini.num_experts_per_tok) == (32, 1, 4)
    assert (mini.moe_intermediate_size, mini.n_group, mini.topk_group, mini.routed_scaling_factor) == (1024, 4, 2, 2.5)
    v3 = load_preset("v3_671b")
    assert (v3.num_hidden_layers, v3.hidden_size, v3.n_routed_experts, v3.num_experts_per_tok) == (61, 7168, 256, 8)


def test_misspelled_key_is_an_error():
    with pytest.raises(ConfigKeyError, match="hiden_size"):
        load_preset("tiny", hiden_size=32)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ValueError, match="tiny"):
        load_preset("tinny")


def test_inconsistent_values_name_the_key_and_fix():
    with pytest.raises(ValueError, match="model.n_group=3 must divide model.n_routed_experts=8"):
        load_preset("tiny", n_group=3)
    with pytest.raises(ValueError, match="model.balance_mode"):
        load_preset("tiny", balance_mode="lossfree")
    with pytest.raises(ValueError, match="raise topk_group"):
        load_preset("tiny", num_experts_per_tok=5, topk_group=2)


def test_unknown_arch():
    cfg = load_preset("tiny")
    cfg.arch = "llama"
    with pytest.raises(ValueError, match="model.arch='llama' is unknown"):
        build_model(cfg)


def test_a_cluster_without_a_node_count_takes_it_from_the_job():
    from types import SimpleNamespace

    from moetron.parallel.dims import Topology

    def cluster(nodes, per_node):
        return SimpleNamespace(nodes=nodes, gpus_per_node=per_node, nvlink_gbps=0.0, ib_gbps=0.0, peak_tflops=1.0)

    def layout(*args):
        topology = Topology.from_config(*args)
        return topology.nodes, topology.gpus_per_node

    slurm = {"SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8", "LOCAL_WORLD_SIZE": "8"}
    assert layout(cluster(None, None), 16, slurm) == (2, 8)
    assert layout(cluster(None, None), 16, {"LOCAL_WORLD_SIZE": "8"}) == (2, 8)  # torchrun only
    assert layout(cluster(None, None), 4, {}) == (1, 4)  # one process or a plain launch
    assert layout(cluster(2, None), 4, slurm) == (2, 2)  # set in the config: kept (virtual nodes on a CPU)


def test_working_weights_default_to_bf16_on_gpus_only_and_need_bf16_compute():
    from types import SimpleNamespace

    import torch

    from moetron.precision.dtypes import dtype_problems, param_dtype

    def prec(compute, params):
        return SimpleNamespace(compute_dtype=compute, param_dtype=params)

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert param_dtype(prec("auto", "auto"), cuda) == torch.bfloat16  # DeepSeek-V3's: BF16 weights, float32 masters
    assert param_dtype(prec("bfloat16", "auto"), cpu) == torch.float32  # a CPU keeps float32 unless told
    assert param_dtype(prec("float32", "auto"), cuda) == torch.float32
    assert param_dtype(prec("bfloat16", "bfloat16"), cpu) == torch.bfloat16
    assert dtype_problems(prec("bfloat16", "bfloat16"), cpu) == []
    [problem] = dtype_problems(prec("auto", "bfloat16"), cpu)
    assert "precision.param_dtype=bfloat16" in problem and "set precision.compute_dtype=bfloat16" in problem

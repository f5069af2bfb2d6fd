"""Layers every architecture is built from, and what makes any MoE decoder parallel.

- `norm` RMSNorm; `rope` RoPE and YaRN; `mlp` the SwiGLU FFN; `mla` Multi-head Latent Attention;
- `router` top-K routers behind one protocol (sigmoid + bias + group limit, softmax, GPT-OSS's);
  `balance` balance losses and MaxVio; `experts` grouped SwiGLU experts; `moe` the MoE layer;
- `block` the pre-norm decoder layer; `moe_step` the routers' step statistics and bias update;
- `parallelize` expert parallelism, FP8 and recompute through module converters; `moe_spec` the
  ModelSpec of any MoE decoder built from these.
"""

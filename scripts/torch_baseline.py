"""The PyTorch twin of a config for bench_train.py: the same architecture in Hugging Face
transformers (MixtralForCausalLM, or LlamaForCausalLM when dense), trained with AdamW."""

from __future__ import annotations

import os
import time

import ml_collections
import numpy as np
import torch
import transformers


def hf_config(m: ml_collections.ConfigDict) -> transformers.PretrainedConfig:
    """Our model config as a Mixtral (MoE) or Llama (dense) config with identical shapes."""
    r = m.rope
    rope = {"rope_type": "default", "rope_theta": r.theta}
    if r.scaling == "linear":
        rope = {"rope_type": "linear", "rope_theta": r.theta, "factor": r.factor}
    elif r.scaling == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": r.theta,
            "factor": r.factor,
            "original_max_position_embeddings": r.original_context,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
        }
    common = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        intermediate_size=m.ffn_hidden,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        head_dim=m.head_dim or m.d_model // m.num_heads,
        max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps,
        initializer_range=m.init_std,
        tie_word_embeddings=m.tie_embeddings,
        rope_parameters=rope,
        use_cache=False,
        attn_implementation="sdpa",
    )
    if m.moe.num_experts:
        return transformers.MixtralConfig(
            **common,
            num_local_experts=m.moe.num_experts,
            num_experts_per_tok=m.moe.top_k,
            output_router_logits=True,  # so the loss includes the load-balancing term, as ours
            router_aux_loss_coef=m.moe.aux_loss_coef,
            # grouped_mm casts its input to the weights' dtype, which autocast leaves in float32,
            # so in bf16/fp16 the experts would run in float32; eager's F.linear autocasts
            experts_implementation="grouped_mm" if m.dtype == "float32" else "eager",
        )
    return transformers.LlamaConfig(**common)


class TorchTrainer:
    """One model and AdamW (same betas, eps, weight decay on matrices only, peak lr, clipping)."""

    def __init__(self, cfg: ml_collections.ConfigDict, tokens_BT: np.ndarray):
        torch.manual_seed(cfg.train.seed)
        self.threads = os.cpu_count() or 1
        torch.set_num_threads(self.threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        hf = hf_config(cfg.model)
        cls = transformers.MixtralForCausalLM if cfg.model.moe.num_experts else (
            transformers.LlamaForCausalLM)  # fmt: skip
        self.model = cls(hf).to(self.device).train()
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                      "float16": torch.float16}[cfg.model.dtype]  # fmt: skip
        params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optimizer
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        # fused: PyTorch's fastest AdamW on CPU and GPU alike
        self.opt = torch.optim.AdamW(groups, lr=o.peak_lr, betas=(o.b1, o.b2), eps=o.eps,
                                     fused=True)  # fmt: skip
        self.clip = o.grad_clip
        self.params = params
        self.tokens_BT = torch.from_numpy(tokens_BT.astype(np.int64)).to(self.device)
        self.experts_impl = getattr(self.model.config, "_experts_implementation", None)

    def step(self) -> torch.Tensor:
        # fp32 weights and AdamW, compute in the config's dtype: our param_dtype/dtype split
        enabled = self.dtype != torch.float32
        with torch.autocast(self.device, dtype=self.dtype, enabled=enabled):
            loss = self.model(input_ids=self.tokens_BT, labels=self.tokens_BT).loss
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def time_steps(self, steps: int) -> float:
        """Seconds per step over `steps` steps."""
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        float(loss)
        self.sync()
        return (time.perf_counter() - start) / steps

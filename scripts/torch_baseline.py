"""The PyTorch twin of a config for bench_train.py and bench_quality.py: the same architecture in
Hugging Face transformers (MixtralForCausalLM, or LlamaForCausalLM when dense), trained with AdamW
on a fixed batch or on our pipeline's packed batches, and scored on our evaluation batches."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import ml_collections
import numpy as np
import torch
import transformers

from hanuman_jax.inference.evaluate import summary
from hanuman_jax.training.step import target_mask


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
    """One model and AdamW (same betas, eps, weight decay on matrices only, peak lr, clipping);
    with `lr_factor`, the learning rate is the peak times `lr_factor(step)` (LambdaLR)."""

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        tokens_BT: np.ndarray | None = None,
        *,
        lr_factor: Callable[[int], float] | None = None,
    ):
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
        self.lr = (
            None if lr_factor is None else torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor)
        )
        self.clip = o.grad_clip
        self.params = params
        self.inputs = None
        if tokens_BT is not None:
            tokens_BT = torch.from_numpy(tokens_BT.astype(np.int64)).to(self.device)
            self.inputs = {"input_ids": tokens_BT, "labels": tokens_BT}
        self.experts_impl = getattr(self.model.config, "_experts_implementation", None)

    def step(self, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """One optimizer step on `inputs` (the model's arguments, e.g. `packed_inputs`; default:
        the fixed batch); the loss, on the device."""
        # fp32 weights and AdamW, compute in the config's dtype: our param_dtype/dtype split
        enabled = self.dtype != torch.float32
        with torch.autocast(self.device, dtype=self.dtype, enabled=enabled):
            loss = self.model(**(self.inputs if inputs is None else inputs)).loss
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.lr is not None:
            self.lr.step()
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


def warmup_cosine(cfg: ml_collections.ConfigDict) -> Callable[[int], float]:
    """Our schedule (training/optim.py) written out for LambdaLR, as a multiple of the peak: linear
    from 1 / warmup at step 0 to 1 at step warmup - 1, then cosine from 1 at step warmup to
    `min_lr_ratio` at step `train.steps`. Written anew rather than calling optax, so that
    bench_quality can check the two."""
    o, steps = cfg.optimizer, cfg.train.steps
    warmup = math.ceil(o.warmup_fraction * steps)
    decay = max(steps - warmup, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        cosine = 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay) / decay))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * cosine

    return factor


def packed_inputs(batch: dict[str, np.ndarray], device: str) -> dict[str, torch.Tensor]:
    """Our packed batch (data.make_dataset) as the model's arguments. The positions restart at 0 in
    each document piece, so transformers masks attention across documents exactly where our
    segment ids do (masking_utils.find_packed_sequence_indices: without an attention mask or a
    cache); labels are -100 wherever our loss has no target (step.target_mask)."""
    seg_BT, pos_BT = batch["segment_ids"], batch["positions"]
    starts_BT = seg_BT[:, 1:] != seg_BT[:, :-1]
    # padding (segment 0, all at position 0) ends a row and is no one's context: not compared
    if np.any((seg_BT[:, 1:] != 0) & (starts_BT != (np.diff(pos_BT, axis=1) != 1))):
        raise ValueError(
            "a document piece starts at a position other than 0: torch would not see it"
        )
    labels_BT = np.full(seg_BT.shape, -100, np.int64)
    labels_BT[:, 1:] = np.where(target_mask(batch), batch["tokens"][:, 1:], -100)
    arrays = {"input_ids": batch["tokens"], "position_ids": pos_BT, "labels": labels_BT}
    return {k: torch.from_numpy(v.astype(np.int64)).to(device) for k, v in arrays.items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict], text_bytes: int) -> dict:
    """`summary` (loss, perplexity, bits per byte) of a transformers model on our evaluation
    batches (loop.eval_batches): every target our evaluation counts, over the same UTF-8 bytes."""
    was_training, device = model.training, next(model.parameters()).device.type
    model.eval()
    # Mixtral: the router's logits only feed the training loss
    no_router_logits = (
        {"output_router_logits": False} if model.config.model_type == "mixtral" else {}
    )
    nll, targets = 0.0, 0
    for batch in batches:
        inputs = packed_inputs(batch, device)
        labels_BT = inputs.pop("labels")[:, 1:]
        logits_BTV = model(**inputs, use_cache=False, **no_router_logits).logits
        nll += torch.nn.functional.cross_entropy(
            logits_BTV[:, :-1].flatten(0, 1).float(), labels_BT.flatten(), reduction="sum"
        ).item()  # ignore_index -100: the labels without a target
        targets += int((labels_BT != -100).sum())
    model.train(was_training)
    return summary(nll, targets, text_bytes)

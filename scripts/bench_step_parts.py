"""Where the train step's time goes: its parts timed one by one, ours beside the PyTorch twin's.

    python scripts/bench_step_parts.py [--config configs/bench_s.py] [--rounds 5] [--no-torch]
                                       [--config.a.b=value ...]

The parts, forward and backward unless said, on bench_train's fixed batch of random ids:
- step: the whole compiled train step (bench_train.JaxTrainer: donated, as trained)
- forward: the loss only (torch: under no_grad); forward_backward: the gradients, no update
- ffn_layer, attention_layer: one layer of each (the step runs `model.num_layers` of each; the
  MoE layer in an MoE config) on random [B, T, D] input, loss sum(y^2) plus the MoE auxiliaries
- lm_head_ce: the LM head and the cross-entropy in the loss's chunks (torch: one pass)
- optimizer: the update alone, not donated: global norm, clipping, AdamW and the non-finite guard
  as step.train_step does them (torch: clip_grad_norm_ and its fused AdamW)
Torch's are the same parts of the Hugging Face twin (torch_baseline.py; its SDPA attention is
causal, so it skips about half the scores). Each round runs every part once, ours then torch's,
so load from other processes hits all alike; each part's best is reported, with the 1-minute load
average after each round: only figures of one run compare. Also reported, by difference: the
forward and backward besides the layers and the head (embedding, norms, residuals), and the step
besides its forward and backward. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from bench_train import JaxTrainer, load, synthetic_batch, torch_twin
from flax import nnx

from hanuman_jax import sharding
from hanuman_jax.config import ModelConfig
from hanuman_jax.model.build import train_flops_per_token
from hanuman_jax.training import cross_entropy
from hanuman_jax.training.step import Setup, gradients, guarded_update, loss_fn, target_mask

LABELS = {
    "step": "whole step",
    "forward": "forward only (the loss)",
    "forward_backward": "forward + backward (no update)",
    "ffn_layer": "one feed-forward (MoE) layer",
    "attention_layer": "one attention layer",
    "lm_head_ce": "LM head + cross-entropy",
    "optimizer": "optimizer update (clip + AdamW + guard)",
}
BY_DIFFERENCE = {
    "rest_of_forward_backward": "rest of forward + backward (by difference)",
    "step_minus_forward_backward": "step minus forward + backward (by difference)",
}


def ready(fn, *args) -> Callable[[], None]:
    """`fn(*args)` as a timed call, run twice first (compilation, first-call allocations)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    return lambda: jax.block_until_ready(fn(*args))


def layer_grad(module: nnx.Module, call: Callable) -> tuple[Callable, nnx.State]:
    """(jitted gradient of sum(y^2) + the MoE auxiliary losses in the module's state and its
    input, the state) of `y = call(module, x)`."""
    graph, state = nnx.split(module)

    def loss(state, x):
        out = call(nnx.merge(graph, state), x)
        y, aux = out if isinstance(out, tuple) else (out, {})
        return jnp.sum(y * y) + sum(v for k, v in aux.items() if k in ("aux_loss", "z_loss"))

    return jax.jit(jax.grad(loss, argnums=(0, 1))), state


def layer_parts(cfg, setup: Setup, params: dict, host: dict) -> dict[str, Callable[[], None]]:
    """One feed-forward and one attention layer, and the LM head with the cross-entropy, on
    random input of the step's shape."""
    b, t, d = cfg.train.batch_size, cfg.data.seq_len, cfg.model.d_model
    x_BTD = jax.random.normal(jax.random.key(2), (b, t, d), cfg.model.dtype)
    seg_BT, pos_BT = jnp.asarray(host["segment_ids"]), jnp.asarray(host["positions"])
    model = setup.model(params)
    block = model.layers[0]
    if hasattr(block, "moe"):
        ffn = layer_grad(block.moe, lambda m, x: m(x, valid_BT=seg_BT != 0))
    else:
        ffn = layer_grad(block.mlp, lambda m, x: m(x))
    attention = layer_grad(block.attn, lambda m, x: m(x, seg_BT, pos_BT)[0])
    mask_BT = target_mask(host)
    weight_BT = jnp.asarray(mask_BT / mask_BT.sum(), jnp.float32)
    shards = sharding.batch_shards(setup.mesh)
    pieces, chunks, _ = cross_entropy.chunk_plan(
        b, t - 1, cfg.model.vocab_size, shards, setup.loss_chunk_rows
    )
    target_BT = jnp.asarray(host["tokens"][:, 1:])

    def head(h_BTD, w_VD):
        return cross_entropy.linear_cross_entropy(
            h_BTD, w_VD, target_BT, weight_BT, chunks=chunks, pieces=pieces
        )

    return {
        "ffn_layer": ready(*ffn, x_BTD),
        "attention_layer": ready(*attention, x_BTD),
        "lm_head_ce": ready(
            jax.jit(jax.grad(head, argnums=(0, 1))), x_BTD[:, :-1], model.head_VD()
        ),
    }


def our_parts(cfg, ours: JaxTrainer, host: dict) -> dict[str, Callable[[], None]]:
    """Our parts, compiled and run once."""
    setup, batch = ours.setup, ours.batch
    state = jax.tree.map(jnp.copy, ours.state)  # the step donates ours.state; this copy stays
    params, rng = state["params"], jax.random.key(1)
    forward = jax.jit(lambda p, b: loss_fn(setup, p, b, rng)[0])
    forward_backward = jax.jit(lambda p, b: gradients(setup, p, b, rng))
    (total, _), grads = forward_backward(params, batch)
    update = jax.jit(functools.partial(guarded_update, setup))
    return {
        "step": lambda: ours.time_steps(1),
        "forward": ready(forward, params, batch),
        "forward_backward": ready(forward_backward, params, batch),
        **layer_parts(cfg, setup, params, host),
        "optimizer": ready(update, state, total, grads),
    }


def torch_parts(cfg, theirs, host: dict) -> dict[str, Callable[[], None]]:
    """The same parts of the PyTorch twin, in its compute dtype and synchronised, run once."""
    import torch

    model, inputs, dev = theirs.model, theirs.inputs, theirs.device
    b, t, d = cfg.train.batch_size, cfg.data.seq_len, cfg.model.d_model
    layer = model.model.layers[0]
    x_BTD = torch.randn(b, t, d, device=dev, requires_grad=True)
    pos_BT = torch.arange(t, device=dev)[None].expand(b, t)
    h_BTD = torch.randn(b, t - 1, d, device=dev, requires_grad=True)
    target_BT = torch.from_numpy(host["tokens"][:, 1:].astype(np.int64)).to(dev)

    def forward():
        with torch.no_grad():
            model(**inputs).loss.item()

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()

    forward_backward()
    grads = [p.grad.clone() for p in theirs.params]

    def optimizer():
        for p, g in zip(theirs.params, grads, strict=True):
            p.grad = g
        if theirs.clip > 0:
            torch.nn.utils.clip_grad_norm_(theirs.params, theirs.clip)
        theirs.opt.step()
        theirs.opt.zero_grad(set_to_none=True)  # later backward passes must not add into grads

    def ffn_layer():
        out = layer.mlp(x_BTD)
        y = out[0] if isinstance(out, tuple) else out
        (y * y).sum().backward()

    def attention_layer():
        rope = model.model.rotary_emb(x_BTD, pos_BT)
        y = layer.self_attn(hidden_states=x_BTD, position_embeddings=rope, attention_mask=None)[0]
        (y * y).sum().backward()

    def lm_head_ce():
        logits = model.lm_head(h_BTD)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_BT.flatten())
        ce.backward()

    def synced(fn):
        def run():
            with torch.autocast(dev, dtype=theirs.dtype, enabled=theirs.dtype != torch.float32):
                fn()
            theirs.sync()

        run()
        return run

    parts = {"step": lambda: theirs.time_steps(1), "forward": forward,
             "forward_backward": forward_backward, "ffn_layer": ffn_layer,
             "attention_layer": attention_layer, "lm_head_ce": lm_head_ce,
             "optimizer": optimizer}  # fmt: skip
    return {name: synced(fn) for name, fn in parts.items()}


def best_of_rounds(sides: dict[str, dict], rounds: int) -> tuple[dict, list[float]]:
    """{side: {part: best ms}} of `rounds` rounds that run each part once, every side in turn;
    and the 1-minute load average after each round."""
    best = {side: dict.fromkeys(parts, math.inf) for side, parts in sides.items()}
    loads = []
    for r in range(rounds):
        for name in LABELS:
            for side, parts in sides.items():
                start = time.perf_counter()
                parts[name]()
                best[side][name] = min(best[side][name], (time.perf_counter() - start) * 1e3)
        loads.append(round(os.getloadavg()[0], 2))
        print(f"round {r + 1}: load average (1 min) {loads[-1]}", flush=True)
    return best, loads


def by_difference(ms: dict, layers: int) -> dict:
    """What the parts leave of the forward and backward and of the step."""
    in_layers = layers * (ms["ffn_layer"] + ms["attention_layer"]) + ms["lm_head_ce"]
    return {
        "rest_of_forward_backward": round(ms["forward_backward"] - in_layers, 3),
        "step_minus_forward_backward": round(ms["step"] - ms["forward_backward"], 3),
    }


def report(best: dict, layers: int) -> dict:
    """One line per part (ours, torch's, their ratio) and the figures for the JSON line."""
    rounded = {side: {k: round(v, 3) for k, v in ms.items()} for side, ms in best.items()}
    rest = {side: by_difference(ms, layers) for side, ms in rounded.items()}
    for name, label in (LABELS | BY_DIFFERENCE).items():
        ours = rounded["ours"].get(name, rest["ours"].get(name))
        line = f"{label:45s} ours {ours:9.1f} ms"
        if "torch" in rounded:
            theirs = rounded["torch"].get(name, rest["torch"].get(name))
            line += f"   torch {theirs:9.1f} ms   ours / torch {ours / theirs:5.2f}"
        print(line)
    result = {"ms": rounded["ours"], "by_difference_ms": rest["ours"]}
    if "torch" in rounded:
        result |= {"torch_ms": rounded["torch"], "torch_by_difference_ms": rest["torch"]}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/bench_s.py")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the best is kept")
    p.add_argument("--no-torch", action="store_true", help="time ours only")
    args, overrides = p.parse_known_args()
    if not args.no_torch:  # on a GPU, JAX would take 75 % of its memory before torch starts
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cfg = load(args.config, overrides)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    flops = train_flops_per_token(ModelConfig.from_config(cfg.model), cfg.data.seq_len) * tokens
    print(f"{args.config}: {tokens:,} tokens per step, {flops / 1e9:.1f} matmul GFLOP per step; "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)  # fmt: skip
    host = synthetic_batch(cfg, cfg.train.seed)
    ours = JaxTrainer(cfg, host)
    sides = {"ours": our_parts(cfg, ours, host)}
    if not args.no_torch:
        theirs = torch_twin(cfg, host["tokens"])
        sides["torch"] = torch_parts(cfg, theirs, host)
    best, loads = best_of_rounds(sides, args.rounds)
    result = {
        "config": args.config,
        "tokens_per_step": tokens,
        "matmul_gflop_per_step": round(flops / 1e9, 2),
        "rounds": args.rounds,
        "loadavg_1m": loads,
        **report(best, cfg.model.num_layers),
        "step_gflop_s": round(flops / best["ours"]["step"] / 1e6, 1),
    }
    if not args.no_torch:
        result["torch_step_gflop_s"] = round(flops / best["torch"]["step"] / 1e6, 1)
        result["torch_threads"] = theirs.threads
    print(json.dumps(result))


if __name__ == "__main__":
    main()

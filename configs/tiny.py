"""A small Thai/English MoE that trains on the bundled sample corpus on a 2-core CPU in minutes."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()

    cfg.model = ml_collections.ConfigDict()
    cfg.model.vocab_size = 0  # embedding rows; 0 = the tokenizer's piece count
    cfg.model.num_layers = 4  # decoder blocks
    cfg.model.d_model = 128  # residual stream width
    cfg.model.num_heads = 4  # query heads
    cfg.model.num_kv_heads = 2  # key/value heads (grouped-query attention)
    cfg.model.head_dim = 0  # per-head width; 0 = d_model / num_heads
    cfg.model.ffn_hidden = 256  # SwiGLU hidden width (of each expert when MoE)
    cfg.model.max_seq_len = 512  # longest context the model is built for
    cfg.model.tie_embeddings = True  # LM head shares the token embedding matrix
    cfg.model.norm_eps = 1e-5  # RMSNorm epsilon
    cfg.model.init_std = 0.02  # std of the normal initialiser (output projections are scaled down)
    cfg.model.dtype = "float32"  # compute dtype: float32, bfloat16 or float16
    cfg.model.param_dtype = "float32"  # dtype parameters are stored and updated in
    cfg.model.remat = "none"  # none, full, or save_matmuls: recompute all but the 2-D matmuls
    cfg.model.attention = "auto"  # auto: splash (TPU), cudnn (GPU 8.0+) or xla; or name one
    cfg.model.attention_block = 0  # xla attention: N query rows at a time (N x T scores); 0 = all
    cfg.model.rope = ml_collections.ConfigDict()
    cfg.model.rope.theta = 10_000.0  # RoPE base frequency
    cfg.model.rope.scaling = "none"  # none, linear (position interpolation) or llama3
    cfg.model.rope.factor = 1.0  # context extension factor when scaling is on
    cfg.model.rope.original_context = 512  # llama3 scaling: the context the base was meant for
    cfg.model.rope.low_freq_factor = 1.0  # llama3 scaling: wavelengths above ctx/this are scaled
    cfg.model.rope.high_freq_factor = 4.0  # llama3 scaling: wavelengths below ctx/this are kept
    cfg.model.moe = ml_collections.ConfigDict()
    cfg.model.moe.num_experts = 4  # experts per MoE layer; 0 = dense SwiGLU model
    cfg.model.moe.top_k = 2  # experts each token is sent to
    cfg.model.moe.router_temperature = 1.2  # router softmax temperature
    cfg.model.moe.aux_loss_coef = 0.01  # weight of the load-balancing loss (mean over layers)
    cfg.model.moe.z_loss_coef = 0.001  # weight of the router z-loss (mean over layers)
    cfg.model.moe.jitter = 0.0  # multiplicative router-input noise in training; 0 = off
    cfg.model.moe.grouped_matmul = "auto"  # auto: blocked on CPU, gmm on TPU, ragged_dot on GPU
    cfg.model.moe.block_size = 1024  # largest block of the blocked expert matmul (rows)
    cfg.model.moe.dispatch = "dropless"  # dropless, or capacity: faster, drops (see BENCHMARKS.md)
    cfg.model.moe.capacity_factor = 1.25  # capacity: slots = factor x tokens x top_k / experts

    cfg.data = ml_collections.ConfigDict()
    cfg.data.sources = [  # files or globs (bundled: = the package's sample corpus) and weights
        {"path": "bundled:english.txt", "weight": 0.35},
        {"path": "bundled:thai.txt", "weight": 0.35},
        {"path": "bundled:mixed.txt", "weight": 0.2},
        {"path": "bundled:chat.jsonl", "weight": 0.1},
    ]
    cfg.data.tokenizer = "bundled:tokenizer.model"  # SentencePiece model
    cfg.data.seq_len = 128  # tokens per packed training row
    # progressive length, [(fraction of train.steps, seq_len), ...] growing to data.seq_len, e.g.
    # [(0.0, 32), (0.5, 128)]; every batch keeps train.batch_size x data.seq_len tokens
    cfg.data.seq_len_schedule = []  # [] = data.seq_len throughout
    # held-out sources for periodic evaluation (same form as sources)
    cfg.data.eval_sources = [{"path": "bundled:heldout/text.txt"}]  # the sample's held-out split
    cfg.data.packing = "concat"  # concat: rows always full; whole: documents not split (chat)
    cfg.data.strict = False  # stop at the first unusable record instead of skipping and counting

    cfg.optimizer = ml_collections.ConfigDict()
    cfg.optimizer.peak_lr = 3e-3  # learning rate after warmup
    cfg.optimizer.min_lr_ratio = 0.1  # final learning rate as a fraction of the peak
    cfg.optimizer.warmup_fraction = 0.05  # share of the steps spent warming up linearly
    cfg.optimizer.b1 = 0.9  # AdamW beta1
    cfg.optimizer.b2 = 0.95  # AdamW beta2
    cfg.optimizer.eps = 1e-8  # AdamW epsilon
    cfg.optimizer.weight_decay = 0.1  # decoupled weight decay on matrices only
    cfg.optimizer.grad_clip = 1.0  # global-norm gradient clipping; 0 = off
    cfg.optimizer.loss_scale = 32768.0  # float16 only: the dynamic loss scale to start from
    cfg.optimizer.loss_scale_period = 500  # float16: finite steps before the scale doubles

    cfg.train = ml_collections.ConfigDict()
    cfg.train.steps = 300  # optimizer steps
    cfg.train.batch_size = 16  # global sequences per step
    cfg.train.grad_accum_steps = 1  # micro-batches per step (batch_size / this sequences each)
    cfg.train.seed = 0  # seeds initialisation, data order and training noise
    cfg.train.log_every = 10  # steps between metrics.jsonl rows
    cfg.train.checkpoint_every = 150  # steps between checkpoints (and one at the end)
    cfg.train.keep_checkpoints = 2  # newest checkpoints kept on disk
    cfg.train.eval_every = 50  # steps between evaluations (and one at the end); 0 = none
    cfg.train.eval_batches = 1  # batches per evaluation (the same every time): 1 = most of it
    cfg.train.sample_every = 0  # steps between logged sample generations (greedy); 0 = none
    cfg.train.sample_prompts = ["Bangkok is", "กรุงเทพมหานครเป็น"]  # prompts for them
    cfg.train.sample_tokens = 32  # new tokens per sample
    cfg.train.sample_chat = False  # True: each prompt is a user turn of a chat (stage C)
    cfg.train.profile_steps = 0  # steps traced by jax.profiler into tensorboard/; 0 = none
    cfg.train.max_nonfinite_steps = 25  # this many non-finite steps in a row: save and stop
    cfg.train.init_from = ""  # another run's workdir: start from its parameters (only); "" = none
    cfg.train.compilation_cache = "compilation_cache"  # compiled steps kept for restarts; "" = none
    cfg.train.allow_lr_jump = False  # resume even if a new schedule lifts the lr over 1.5x at once

    cfg.mesh = ml_collections.ConfigDict()
    cfg.mesh.data = -1  # data-parallel replicas; -1 = all devices left over
    cfg.mesh.fsdp = 1  # parameter/optimizer sharding (ZeRO-3) ways
    cfg.mesh.expert = 1  # expert-parallel ways
    cfg.mesh.tensor = 1  # tensor-parallel ways (heads and FFN hidden)

    cfg.lock()
    return cfg

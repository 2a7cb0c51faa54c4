"""The decoder: transformer, attention kernels, MoE feed-forward and their layers.

Array names end in their shape, one capital letter per axis (`x_BTD`, `logits_BTV`), and einsum
strings use the same letters. Each letter means one thing throughout hanuman_jax:

    B  batch rows                         E  experts
    T  tokens (query positions)           A  experts chosen per token (top-k)
    S  key positions / cache slots        R  routed rows (one per token-expert choice)
    D  model width                        L  experts local to one shard
    N  query heads                        X  expert shards
    K  kv heads                           Q  rows received from other shards
    G  query heads per kv head            C  rows of one chunk, block or capacity slot group
    H  head width                         M  number of chunks or blocks
    F  FFN hidden width                   P  rows padded to a kernel block
    V  vocabulary                         U  new tokens generated
"""

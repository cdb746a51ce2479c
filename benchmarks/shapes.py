"""The named shapes the benchmarks measure (issue 3): nanoGPT's CPU Shakespeare model and its "baby GPT"."""

SHAPES = {
    # 4 layers, 4 heads, width 128, context 64, batch 12: about 0.8M parameters
    "0.8M": {"model.n_layer": 4, "model.n_head": 4, "model.n_embd": 128, "data.block_size": 64, "train.batch_size": 12},
    # 6 layers, 6 heads, width 384, context 256: about 10.7M parameters (nanoGPT's batch 64 is a GPU batch;
    # 16 sequences keep a CPU step short without changing the FLOPs per token)
    "10.7M": {
        "model.n_layer": 6,
        "model.n_head": 6,
        "model.n_embd": 384,
        "data.block_size": 256,
        "train.batch_size": 16,
    },
    # GPT-2 small's shape at context 1024 (124M parameters with its 50257-token vocabulary, padded to 50304 as
    # nanoGPT does); for GPUs: benchmarks/gpu.sh
    "124M": {
        "model.n_layer": 12,
        "model.n_head": 12,
        "model.n_embd": 768,
        "model.vocab_size": 50304,
        "data.block_size": 1024,
        "train.batch_size": 16,
    },
}

"""The names of each extension axis, defined once: the configs, the CLI and the library take them
from here, and each library dispatch raises ValueError for a name outside its tuple.

Import-free (no torch, no other carv_attrib module), so both the torch-free `config` and the
lowest library layer (`carv/`) can use it without a circle or an arrow back up.
"""

from __future__ import annotations

OUTPUT_FNS = ("loss", "sqnorm")  # carv.objective: the residual whose square is the loss
OBJECTIVES = ("uniform", "motion")  # attrib.featurizer: per-token weights, none or the motion map
SCHEMES = ("iid", "stratified", "stratified-is")  # carv.timesteps.sample
NOISE_MODES = ("shared", "per-clip")  # carv.draws.DrawRule.stream_for
PROJECTORS = ("kron", "dense")  # attrib.projection / attrib.featurizer.build_projector
MATRIX_KINDS = ("gaussian", "rademacher")  # attrib.projection's random matrices
PRECONDITIONERS = ("identity", "trak", "cosine", "normalize")  # search.precondition
DTYPES = ("float32", "bfloat16", "float16")  # models.wan: the model's compute dtype
SKETCH_KINDS = ("srht", "countsketch")  # search.sketch: index --sketch, the D -> D' compression

# Choices of the CLI alone (no library dispatch), defined here too so that config holds no list of names.
LATENT_DTYPES = ("float32", "float16")  # encode --latent-dtype: storage dtype of the cache
VAE_TILINGS = ("auto", "on", "off")  # encode --vae-tiling
EXECUTORS = ("local", "ray")  # encode/featurize --executor
VECTOR_DTYPES = ("float16", "float32", "none")  # index --vector-dtype: exact vectors kept for re-ranking
AGGREGATES = ("none", "mean", "vote")  # score --aggregate
FORMATS = ("human", "json", "jsonl")  # --format of the commands that print results
CURATE_METHODS = ("mean", "rank-sum", "vote")  # curate --method
PRESETS = ("tiny", "small", "medium")  # demo --preset: the model's size
DECODERS = ("auto", "pyav")  # frames --decoder
OPTIMIZERS = ("adamw", "sgd")  # evaluate --optimizer, train_on_clips
TRAIN_DTYPES = ("float32", "bfloat16")  # finetune --dtype: fp32, or bf16 autocast over fp32 master weights

"""Text → tokens → activations, on disk or live, behind one stream interface.

text.py      iter_documents(cfg, shard, n_shards): (doc index, text) from `datasets` or builtin:python-docs
tokens.py    Packer / packer_for(lm, acts, model): fixed windows with BOS, (doc, pos) and the ignore mask
cache.py     generate_shard(...): the `generate` loop; write_cache(...): any activations as a cache
manifest.py  the cache layout, shard manifests, open_cache(dir) → CacheIndex
verify.py    check_cache / check_against: what `saecli check` reports
reader.py    CacheStream: shuffled, bounded-memory, exactly resumable cache reader
live.py      LiveStream: the same batches computed from a model (whole contexts for LORSA)
models.py    ModelsStream: several models' streams (live or cached) zipped on the same tokens (model diffing)
open.py      open_stream(exp, ...): the one entry point for train/eval/analyze/sweep
outliers.py  drop_outliers: massive-activation tokens out of a batch (max_norm_ratio × its median)
batch.py, stream.py: Batch and the ActivationStream protocol
"""

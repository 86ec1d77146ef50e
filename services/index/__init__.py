"""The index on storage, in one place: its layout, the manifest, the CURRENT pointer and its history,
shard / docs / quantizer save and load, and the top-k merge of per-shard results.

The indexer writes through this package, the searcher and the gateway read through it; neither imports
the other. `layout`, `manifest`, `versions` and `docs` do not import faiss, so a reader of ids and uris
(the gateway) does not load it.
"""

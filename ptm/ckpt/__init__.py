"""Checkpoint and tensor I/O: the on-disk contract, tensor stores and writers, parameter loading.

Everyone who reads or writes model tensors (train, merge, eval, search, convert) goes through these public
names: `format` (layout, metadata, resolving paths), `tree` (tensor names and shapes), `dtypes`, `stores`
(readers), `writers` (outputs), `params` (load and place a model's params).
"""

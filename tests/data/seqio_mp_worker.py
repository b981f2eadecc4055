"""One process of a 2-process JAX cluster reading a seqio LM Task (tests/data/test_seqio_multihost.py).

Usage: python seqio_mp_worker.py OUT_DIR; the cluster comes from PTM_* variables. Records which seqio shards this
process built pipelines for (seqio.get_dataset's shard_info), the run's stats and this host's batches.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ptm.parallel import distributed

distributed.initialize()

import jax  # noqa: E402
import seqio  # noqa: E402
import seqio_tasks  # noqa: E402

from ptm.data.pipeline import DataConfig, SourceConfig, build_train_data  # noqa: E402
from ptm.data.tokenizers import load_tokenizer  # noqa: E402

shards: list[int] = []
_get_dataset = seqio.get_dataset


def _recording_get_dataset(*args, **kwargs):
    shards.append(kwargs["shard_info"].index)
    return _get_dataset(*args, **kwargs)


CONFIG = DataConfig(sources=[SourceConfig("seqio:ptm_lm")], seq_len=48, global_batch_size=4, seed=3, num_epochs=1)

if __name__ == "__main__":
    # observe (not replace) which shards this host reads; only in the worker process: the test imports this module
    # for CONFIG, and patching seqio there would leak into every later test of that pytest worker
    seqio.get_dataset = _recording_get_dataset
    out = Path(sys.argv[1])
    pid = jax.process_index()
    it, stats = build_train_data(CONFIG, load_tokenizer(seqio_tasks.SPM_PATH), process_index=pid,
                                 process_count=jax.process_count())
    batches = list(it)
    np.savez(out / f"batches_{pid}.npz", **{f"{i}_{k}": v for i, b in enumerate(batches) for k, v in b.items()})
    (out / f"result_{pid}.json").write_text(json.dumps({"shards": shards, "stats": stats.to_dict(),
                                                        "cum": stats._cum.tolist(), "batches": len(batches)}))

import json
import random

import pytest

from ptm.data.pipeline import DataConfig, SourceConfig
from ptm.model.config import ModelConfig
from ptm.train.optimizer import OptimizerConfig

TINY = ModelConfig(
    vocab_size=259,
    embed_dim=32,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    mlp_dim=64,
    dtype="float32",
)


def write_reverse_task(path, n=64, seed=0):
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a = "".join(r.choice("abcd") for _ in range(r.randint(2, 5)))
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"rev {a}"},
                            {"role": "assistant", "content": a[::-1]},
                        ]
                    }
                )
                + "\n"
            )
    return str(path)


@pytest.fixture
def reverse_data(tmp_path):
    return write_reverse_task(tmp_path / "rev.jsonl")


def data_config(path, **kw):
    base = dict(sources=[SourceConfig(path)], seq_len=48, global_batch_size=8, num_epochs=2, seed=0)
    base.update(kw)
    return DataConfig(**base)


OPT = OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.1)

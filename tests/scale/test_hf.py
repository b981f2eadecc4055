"""Hugging Face Llama <-> ptm: logits parity against transformers in fp32, both directions, and bad inputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ptm.convert.hf import hf_to_ptm, ptm_to_hf
from ptm.errors import CheckpointError, ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub (only loopback network here)
torch = pytest.importorskip("torch", reason="parity tests need torch (pip install torch==2.13.0)")
transformers = pytest.importorskip(
    "transformers", reason="parity tests need transformers (pip install transformers)"
)


def _hf_model(tie: bool = False, kv: int = 2, vocab: int = 96):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=500.0,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms too, so a swapped norm would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def _tokens(vocab: int):
    rng = np.random.default_rng(1)
    return rng.integers(0, vocab, size=(2, 17)).astype(np.int32)


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _ptm_logits(params, cfg, tokens):
    import dataclasses

    import jax

    from ptm.model.llama import forward

    cfg = dataclasses.replace(cfg, dtype="float32")
    b, s = tokens.shape
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    # jitted: op-by-op flax on 2 busy cores costs a minute
    return np.asarray(jax.jit(forward, static_argnums=1)(params, cfg, tokens, pos, np.ones((b, s), np.int32)))


def _load(path):
    from ptm.ckpt.params import load_params

    return load_params(path)


@pytest.mark.parametrize(
    "tie, kv, shard", [(False, 2, "20KB"), pytest.param(True, 4, "5GB", marks=pytest.mark.slow)]
)
def test_hf_to_ptm_logits_match_transformers(tmp_path, tie, kv, shard):
    model = _hf_model(tie=tie, kv=kv)
    model.save_pretrained(tmp_path / "hf", max_shard_size=shard)
    sharded = (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert sharded == (shard == "20KB")
    cfg = hf_to_ptm(str(tmp_path / "hf"), str(tmp_path / "ptm"))
    assert cfg.tie_embeddings == tie and cfg.num_kv_heads == kv and cfg.rope_theta == 500.0
    params, meta = _load(tmp_path / "ptm")
    assert meta["model"]["vocab_size"] == 96 and meta["provenance"]["converted_from"].endswith("hf")
    assert ("lm_head" in params) != tie
    tokens = _tokens(96)
    np.testing.assert_allclose(
        _ptm_logits(params, cfg, tokens), _hf_logits(model, tokens), rtol=1e-4, atol=1e-4
    )


def test_ptm_to_hf_loads_in_transformers_with_same_logits(tmp_path):
    import jax

    from ptm.ckpt import format as ckpt_format
    from ptm.ckpt.stores import OrbaxStore  # noqa: F401 - the writer below is the merge output format
    from ptm.model.config import ModelConfig
    from ptm.model.llama import init_params

    cfg = ModelConfig(
        vocab_size=80,
        embed_dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mlp_dim=96,
        rope_theta=10000.0,
        max_seq_len=64,
    )
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(3))
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "ck" / "params", params)
    ckptr.wait_until_finished()
    ckpt_format.write_meta(
        tmp_path / "ck",
        {k: v for k, v in ckpt_format.make_meta(cfg.to_dict(), 7).items() if k not in ("format", "version")},
    )
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (tok / "config.json").write_text(
        json.dumps({"bos_token_id": 5, "eos_token_id": 6, "model_type": "llama"})
    )
    hf_cfg = ptm_to_hf(
        str(tmp_path / "ck"),
        str(tmp_path / "hf"),
        dtype="float32",
        tokenizer_from=str(tok),
        max_shard_bytes=40_000,
    )
    out = tmp_path / "hf"
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer_config.json").exists()
    assert hf_cfg["bos_token_id"] == 5 and hf_cfg["num_key_value_heads"] == 2
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = _tokens(80)
    np.testing.assert_allclose(
        _hf_logits(model, tokens), _ptm_logits(params, cfg, tokens), rtol=1e-4, atol=1e-4
    )
    # And back again: the round trip is exact in fp32.
    back_cfg = hf_to_ptm(str(out), str(tmp_path / "again"))
    back, _ = _load(tmp_path / "again")
    assert back_cfg.shape_dict() == cfg.shape_dict()
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resize_vocab_pads_with_mean_rows(tmp_path):
    model = _hf_model(vocab=96)
    model.save_pretrained(tmp_path / "hf")
    cfg = hf_to_ptm(str(tmp_path / "hf"), str(tmp_path / "ptm"), resize_vocab=98)
    assert cfg.vocab_size == 98
    params, meta = _load(tmp_path / "ptm")
    assert meta["model"]["vocab_size"] == 98 and meta["provenance"]["resize_vocab"] == 98
    emb = np.asarray(params["embed"]["embedding"])
    head = np.asarray(params["lm_head"]["kernel"])
    hf_emb = model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(emb[:96], hf_emb)
    np.testing.assert_allclose(emb[96], hf_emb.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(emb[96], emb[97])
    assert head.shape == (64, 98)
    # Logits of the original tokens are unchanged.
    tokens = _tokens(96)
    np.testing.assert_allclose(
        _ptm_logits(params, cfg, tokens)[..., :96], _hf_logits(model, tokens), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(ConfigError, match="smaller than the checkpoint's vocabulary 96"):
        hf_to_ptm(str(tmp_path / "hf"), str(tmp_path / "p2"), resize_vocab=90)


def test_bad_inputs_name_the_culprit_and_write_nothing(tmp_path):
    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**conf, "num_hidden_layers": 4}))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.3.input_layernorm.weight'"):
        hf_to_ptm(str(tmp_path / "hf"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps({**conf, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    )
    with pytest.raises(CheckpointError, match="config.json: unsupported Llama options: rope_scaling"):
        hf_to_ptm(str(tmp_path / "hf"), str(tmp_path / "out"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(conf))
    from ptm.cli import main

    assert main(["convert", "hf-to-ptm", str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    with pytest.raises(Exception, match="exists"):
        hf_to_ptm(str(tmp_path / "hf"), str(tmp_path / "out"))
    assert main(["convert", "hf-to-ptm", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    assert (
        main(["convert", "ptm-to-hf", str(tmp_path / "out"), str(tmp_path / "hf2"), "--dtype", "bfloat16"])
        == 0
    )
    assert (tmp_path / "hf2" / "model.safetensors").exists() and (tmp_path / "hf2" / "config.json").exists()


@pytest.mark.gcs
@pytest.mark.slow
def test_round_trip_through_gcs(tmp_path, gcs_bucket):
    model = _hf_model()
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    import gcsfs

    fs = gcsfs.GCSFileSystem()
    fs.put(str(tmp_path / "hf"), f"{gcs_bucket}/hf", recursive=True)
    cfg = hf_to_ptm(f"{gcs_bucket}/hf", f"{gcs_bucket}/ptm")
    ptm_to_hf(f"{gcs_bucket}/ptm", f"{gcs_bucket}/back", dtype="float32", max_shard_bytes=30_000)
    fs.get(f"{gcs_bucket}/back", str(tmp_path / "back"), recursive=True)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    tokens = _tokens(cfg.vocab_size)
    np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(model, tokens), rtol=1e-5, atol=1e-5)

"""A safetensors merge output is a loadable Hugging Face model: shards + index, config.json, tokenizer, chat
template; transformers' logits equal a direct load of the same tensors."""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ptm.merge import engine  # noqa: E402
from ptm.merge.recipe import Recipe  # noqa: E402


def _tiny(path, seed: int) -> str:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(path)
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(38)} | {"<s>": 38, "</s>": 39}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(path)
    return str(path)


def test_output_loads_in_transformers(tmp_path):
    base, other = _tiny(tmp_path / "base", 0), _tiny(tmp_path / "other", 1)
    out = str(tmp_path / "out")
    r = Recipe("task_arithmetic", {"pre": base, "skills": [other]}, weights=0.5, out=out, shard_bytes=20_000,
               chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    engine.merge(r, progress=False, summary=False)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and "config.json" in files and "tokenizer.json" in files
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) > 1
    idx = json.load(open(f"{out}/model.safetensors.index.json"))
    assert set(idx["weight_map"].values()) == set(shards)

    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    from safetensors.torch import load_file

    direct = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(out)).to(torch.bfloat16)
    sd = {}
    for f in shards:
        sd.update(load_file(f"{out}/{f}"))
    missing, unexpected = direct.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    ids = torch.tensor([[1, 5, 7, 3, 9]])
    with torch.no_grad():
        a, b = model(ids).logits, direct(ids).logits
    assert torch.equal(a, b)
    # the merged tensors are what was asked: base + 0.5 (other - base)
    sb, so = load_file(f"{base}/model.safetensors"), load_file(f"{other}/model.safetensors")
    n = "model.layers.0.mlp.up_proj.weight"
    want = (sb[n].float() + torch.tensor(0.5) * (so[n].float() - sb[n].float())).to(torch.bfloat16)
    assert torch.equal(sd[n], want)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "w3"}], tokenize=False) == "[w3]"

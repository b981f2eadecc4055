import numpy as np
from safetensors.torch import load_file
L = lambda p: {k: v.float().numpy() for k, v in load_file(p + "/model.safetensors").items()}
m0, m3, m2 = (L(f"/tmp/h17e_x/m{i}") for i in (0, 3, 2))
out = L("/tmp/h17e_x/out_ms4")
for k in ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight", "model.norm.weight"]:
    t3, t2, r = m3[k] - m0[k], m2[k] - m0[k], out[k] - m0[k]
    print(k, np.linalg.norm(t3), np.linalg.norm(r) / np.linalg.norm(t2), (r.ravel() @ t2.ravel()) / np.linalg.norm(r) / np.linalg.norm(t2))

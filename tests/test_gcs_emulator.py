import numpy as np


def test_orbax_roundtrip_through_emulator(gcs_bucket):
    """The emulator fixture really serves gs:// to Orbax (tensorstore) and gcsfs."""
    import gcsfs
    import orbax.checkpoint as ocp

    tree = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": {"c": np.ones(5, np.int32)}}
    path = f"{gcs_bucket}/ckpt/1"
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, tree)
    ckpt.wait_until_finished()
    back = ckpt.restore(path)
    np.testing.assert_array_equal(back["a"], tree["a"])
    np.testing.assert_array_equal(back["b"]["c"], tree["b"]["c"])
    fs = gcsfs.GCSFileSystem()
    assert any(p.endswith("_CHECKPOINT_METADATA") for p in fs.find(gcs_bucket))


def test_client_env_module_imports_no_client_library():
    """tests/conftest.py imports ptm.testing.gcs for CLIENT_ENV *before* any client reads its environment."""
    import subprocess
    import sys

    code = ("import sys, ptm.testing.gcs; "
            "print([m for m in ('jax', 'gcsfs', 'tensorstore', 'google.auth', 'etils') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout

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

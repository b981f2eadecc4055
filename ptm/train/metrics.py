"""Training metrics: a console progress bar and TensorBoard event files (process 0 only)."""

from __future__ import annotations

import json
import sys
import time

import jax

# Peak dense bf16 FLOP/s per JAX device, for the MFU estimate (None = unknown, e.g. CPU).
PEAK_FLOPS = {
    "TPU v3": 61.5e12,  # 123 TFLOP/s per chip, 2 cores (= 2 JAX devices) per chip
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}


def peak_flops_per_device() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


class MetricsLogger:
    def __init__(
        self,
        log_dir: str | None,
        total_steps: int,
        start_step: int,
        enabled: bool = True,
        progress: bool = True,
        jsonl_path: str | None = None,
    ):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.jsonl = None
        if not enabled:
            return
        if jsonl_path:
            from etils import epath

            self._jsonl_path = epath.Path(jsonl_path)
            self.jsonl = []
        self._remote: str | None = None
        if log_dir:
            from tensorboardX import SummaryWriter

            if str(log_dir).startswith("gs://"):
                # tensorboardX's own gs:// writer re-uploads the whole event file on every flush and once more
                # from __del__ at interpreter exit (hanging 120 s in retries when the store is gone); events go to
                # a local dir instead and are uploaded with the metrics at checkpoint time and at close.
                import tempfile

                self._remote, log_dir = str(log_dir), tempfile.mkdtemp(prefix="ptm-tb-")
            self._local = log_dir
            self.writer = SummaryWriter(log_dir)
        from tqdm import tqdm

        if progress:
            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=1.0,
            )
        self._t = time.perf_counter()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:
            self.jsonl.append(json.dumps({"step": step, **metrics}))
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            short = {k: metrics[k] for k in ("loss", "lr", "tokens_per_s", "mfu") if k in metrics}
            self.bar.set_postfix(
                {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in short.items()}, refresh=False
            )

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def flush(self) -> None:
        """Append buffered metrics to metrics.jsonl (called at checkpoint time, so it survives a kill)."""
        if self.jsonl:
            old = self._jsonl_path.read_text() if self._jsonl_path.exists() else ""
            self._jsonl_path.write_text(old + "\n".join(self.jsonl) + "\n")
            self.jsonl = []
        self._upload_events()

    def _upload_events(self) -> None:
        if self.writer is None or self._remote is None:
            return
        import os

        from ptm.ckpt.stores import gcs_fs

        self.writer.flush()
        fs = gcs_fs()
        for d, _, files in os.walk(self._local):
            for f in files:
                rel = os.path.relpath(os.path.join(d, f), self._local)
                fs.put(os.path.join(d, f), f"{self._remote}/{rel}")

    def close(self) -> None:
        self.flush()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self._upload_events()
            if self._remote is not None:
                import shutil

                shutil.rmtree(self._local, ignore_errors=True)
            self.writer = None

"""What a model costs in bytes: on disk as saved, and resident in a process that runs it.

Bytes on disk: the model is written with ``save_pruned`` into a temporary folder and
the folder's files (weights, config, sidecar) are summed.

Resident memory is measured in a fresh Python process per model, so nothing another
model allocated (or the allocator kept) is counted. The process imports torch and
raysparse, transformers and the model's class, reads its resident set size (``VmRSS``, the baseline), loads the saved
model with ``raysparse.load_model``, reads every parameter once (loaders may memory-map
weights, which then count only once touched) and runs one warm-up forward pass
(``loaded``), resets the kernel's high-water mark (``/proc/self/clear_refs``), runs one
more forward pass and reads the high-water mark again (``peak_forward``). The high-water
mark before the reset is the loading peak (``load_pruned`` builds the full-size model
before slicing it, so for a shrunk model it is about the dense model's). Where
``/proc`` is not available (not Linux) only ``ru_maxrss`` of the whole process is known,
and the forward peak then includes loading.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from raysparse.errors import RaysparseError, first_line


@dataclass(frozen=True)
class ResidentMemory:
    """Resident set sizes (bytes) of a fresh process running one model."""

    baseline: int         # interpreter + torch + raysparse, before the model
    loaded: int           # model loaded, every weight paged in, one warm-up forward done
    peak_load: int        # high-water mark until then
    peak_forward: int     # high-water mark during one forward pass (after a reset)
    batch_size: int
    sequence_length: int
    method: str           # "proc-status" or "ru_maxrss"

    @property
    def model(self) -> int:
        """What holding the model adds to the process."""
        return self.loaded - self.baseline

    @property
    def forward(self) -> int:
        """What running it adds at its peak."""
        return self.peak_forward - self.baseline

    def as_dict(self) -> dict:
        return asdict(self)


def folder_bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def disk_bytes(model: nn.Module) -> int:
    """Bytes of the folder ``save_pruned`` writes for ``model`` (no tokenizer)."""
    from raysparse.structure import save_pruned

    with tempfile.TemporaryDirectory(prefix="raysparse-disk-") as tmp:
        save_pruned(model, tmp)
        return folder_bytes(tmp)


def resident_memory(folder: str | Path, batch_size: int = 8, sequence_length: int = 128,
                    threads: int | None = None, timeout: float = 600.0) -> ResidentMemory:
    """Resident memory of a fresh process that loads ``folder`` and runs one forward pass."""
    child = "import sys; from raysparse.efficiency.memory import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", child, str(folder), str(batch_size), str(sequence_length), str(threads or 0)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise RaysparseError(f"bench: measuring the memory of {folder} took longer than {timeout:.0f}s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RaysparseError(f"bench: the memory probe for {folder} failed ({detail})")
    return ResidentMemory(**json.loads(lines[-1]))


def _status() -> dict[str, int] | None:
    """VmRSS and VmHWM of this process in bytes, or None without /proc."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values if len(values) == 2 else None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _max_rss() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _import_model_code(folder: str) -> None:
    """Import transformers and the model's class first, so the baseline holds the libraries."""
    from transformers import AutoConfig, AutoModel

    from raysparse.models.sources import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(folder), local_files_only=True, trust_remote_code=False)
    AutoModel._model_mapping[type(config)]


def _probe(folder: str, batch_size: int, sequence_length: int, threads: int) -> dict:
    """Runs in the child process."""
    import gc

    import torch

    from raysparse.efficiency.latency import random_batch
    from raysparse.models.sources import load_encoder
    from raysparse.structure import Encoder

    if threads:
        torch.set_num_threads(threads)
    _import_model_code(folder)
    gc.collect()
    status = _status()
    baseline = status["VmRSS"] if status else _max_rss()
    model = load_encoder(folder).eval()
    rows = Encoder(model).base.get_input_embeddings().num_embeddings
    batch = random_batch(rows, batch_size, sequence_length, "cpu")
    with torch.inference_mode():
        for parameter in model.parameters():      # weights may be memory-mapped: page every one in
            parameter.sum()
        model(**batch)                             # and warm up, so the measured pass is steady state
    gc.collect()
    status = _status()
    loaded = status["VmRSS"] if status else _max_rss()
    peak_load = status["VmHWM"] if status else _max_rss()
    measured = status is not None and _reset_peak()
    with torch.inference_mode():
        model(**batch)
    status = _status()
    peak_forward = status["VmHWM"] if measured and status else _max_rss()
    return {"baseline": baseline, "loaded": loaded, "peak_load": peak_load, "peak_forward": peak_forward,
            "batch_size": batch_size, "sequence_length": sequence_length,
            "method": "proc-status" if measured else "ru_maxrss"}


def main(argv: list[str]) -> int:
    folder, batch_size, sequence_length, threads = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    try:
        print(json.dumps(_probe(folder, batch_size, sequence_length, threads)), flush=True)
    except RaysparseError as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 2
    return 0


__all__ = ["ResidentMemory", "disk_bytes", "folder_bytes", "resident_memory"]

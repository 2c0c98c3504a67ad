"""Cost telemetry: where a run's time and memory went.

Every analysis records, as metrics (seconds unless named otherwise):

- ``time/startup``: from the process start to the start of the analysis (interpreter start-up,
  the CLI's imports and argument parsing; Linux only, from ``/proc/self/stat``);
- ``time/import``: importing the model/SAE libraries the analysis needs (TransformerLens, SAELens
  for SAELens-format SAEs) inside the analysis;
- ``time/load``: loading SAE, corpus and model and checking they fit;
- ``time/pass``: the one streaming pass (model, SAE, every collector);
- full analysis only: ``time/database`` (finalising the activation database), ``time/matrices``
  (similarity and co-occurrence neighbour lists, dense files), ``time/logit_lens``,
  ``time/summaries`` (feature summaries and tables), ``time/plots``, ``time/reports``;
- quick analysis: ``time/reports`` (the results files);
- set by the pipeline after MLflow logging: ``time/logging`` (importing MLflow included), ``time/total`` (process start to the
  end of logging) and ``time/pass_share`` (``time/pass / time/total``);
- ``time_cpu/<stage>``: the process's CPU seconds in each stage (all threads; less disturbed
  than wall time on a shared machine);
- ``memory/peak_rss_mib``: the process's peak resident memory (``VmHWM``, MiB);
- ``memory/peak_gpu_mib``: peak memory allocated by torch on the CUDA device (MiB), on CUDA only.

And as params: ``device_name`` (the CPU model or the GPU's name) and ``torch_threads``.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: metrics logged to MLflow that the results JSON cannot hold (it is written before they are known)
AFTER_RESULTS_JSON = ("time/logging", "time/total", "time/pass_share")
#: logged to the run while the pass runs (one value per finished shard), not in the results JSON
PROGRESS_METRICS = ("progress/tokens_done", "progress/fraction")
#: quick also times the writing of its results files, the JSON among them
QUICK_AFTER_RESULTS_JSON = (*AFTER_RESULTS_JSON, "time/reports")


def process_age_seconds() -> float | None:
    """Seconds since this process started (Linux ``/proc``), None where unknown."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5): starttime, in clock ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mib() -> float:
    """This process's peak RSS in MiB (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name(device: str) -> str:
    """The GPU's name on CUDA, else the CPU model."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_STARTUP_COUNTED: list[bool] = []  # the process's start-up belongs to its first analysis only


class Stages:
    """Seconds per named stage (a stage entered twice adds up).

    ``startup`` is the process's age when the first analysis of the process starts (interpreter and
    imports); a later analysis in the same process (``sae-mlops demo``, a warm worker) paid none, so
    it has no ``time/startup`` and its ``time/total`` is its own.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # process CPU seconds (all threads) per stage
        self.startup = None if _STARTUP_COUNTED else process_age_seconds()
        _STARTUP_COUNTED.append(True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0, time.process_time() - c0)

    def add(self, name: str, seconds: float, cpu_seconds: float | None = None) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        if cpu_seconds is not None:
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu_seconds

    def metrics(self, device: str) -> dict[str, float]:
        """``time/<stage>``, ``time/startup`` and the peak memory figures."""
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out.update({f"time_cpu/{k}": v for k, v in self.cpu.items()})
        if self.startup is not None:
            out["time/startup"] = self.startup
        out["memory/peak_rss_mib"] = peak_rss_mib()
        if str(device).startswith("cuda"):
            import torch

            if torch.cuda.is_available():
                out["memory/peak_gpu_mib"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
        return out


def device_params(device: str) -> dict[str, object]:
    import torch

    return {"device_name": device_name(device), "torch_threads": torch.get_num_threads()}

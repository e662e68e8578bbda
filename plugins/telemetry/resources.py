"""Process memory and GPU figures: psutil for the process, NVML for every GPU it can see.

NVML is optional: without the library or without a GPU the sampler reports no
devices and says why once at debug level. Each call reads fresh values, so the
figures are as current as the scrape or the status line that asks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("jarvis.telemetry")


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str
    utilization_percent: float
    memory_used_bytes: int
    memory_total_bytes: int


@dataclass(frozen=True)
class MemorySample:
    resident_bytes: int
    machine_total_bytes: int

    @property
    def percent(self) -> float:
        return 100.0 * self.resident_bytes / self.machine_total_bytes if self.machine_total_bytes else 0.0


class ResourceSampler:
    """Reads the process's resident memory and, when `gpu` is on and NVML works, every GPU."""

    def __init__(self, gpu: bool = True) -> None:
        import psutil

        self._process = psutil.Process()
        self._machine_total = psutil.virtual_memory().total
        self._nvml = None
        self._handles: list = []
        if gpu:
            self._open_nvml()

    def _open_nvml(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml = pynvml
        except Exception as exc:  # no library, no driver or no device: GPU metrics are simply absent
            log.debug("no GPU metrics: NVML unavailable (%s)", exc)
            self._handles = []

    def memory(self) -> MemorySample:
        return MemorySample(self._process.memory_info().rss, self._machine_total)

    def gpus(self) -> list[GpuSample]:
        samples = []
        nvml = self._nvml
        for index, handle in enumerate(self._handles):
            try:
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = nvml.nvmlDeviceGetName(handle)
            except Exception as exc:  # a device that fell off the bus: skip it this time
                log.debug("GPU %d not readable: %s", index, exc)
                continue
            samples.append(GpuSample(index, name.decode() if isinstance(name, bytes) else str(name),
                                     float(util.gpu), int(mem.used), int(mem.total)))
        return samples

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None

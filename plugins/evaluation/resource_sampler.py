"""A sampler thread that records CPU, RAM and (through NVML, when NVIDIA GPUs are present) GPU use.

It samples this machine every `interval` seconds while a benchmark runs: the
system-wide CPU percentage, used RAM, and per GPU the utilisation and used
memory. `summary(start, end)` gives the mean and peak inside a time window
(the sampler's clock is the benchmark's), so each load level gets its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class ResourceSampler:
    def __init__(self, clock: Callable[[], float], interval: float = 0.25) -> None:
        self.clock = clock
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self.gpu_names: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jarvis-bench-sampler", daemon=True)
        self._nvml: Any = None
        self._handles: list[Any] = []

    def __enter__(self) -> ResourceSampler:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        import psutil

        psutil.cpu_percent(None)  # the first call only sets the reference point
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self.gpu_names = [_text(pynvml.nvmlDeviceGetName(h)) for h in self._handles]
            self._nvml = pynvml
        except Exception:  # noqa: BLE001 - no driver, no GPU, or no nvidia-ml-py: CPU/RAM only
            self._nvml, self._handles = None, []
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.interval):
            memory = psutil.virtual_memory()
            sample: dict[str, Any] = {"t": self.clock(), "cpu_percent": psutil.cpu_percent(None),
                                      "ram_used_gb": (memory.total - memory.available) / 2**30,
                                      "ram_percent": memory.percent}
            gpus = []
            for handle in self._handles:
                try:
                    util = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                    mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                    gpus.append({"util_percent": float(util.gpu), "mem_used_gb": mem.used / 2**30})
                except Exception:  # noqa: BLE001 - a GPU that stops answering is skipped, not fatal
                    gpus.append({"util_percent": None, "mem_used_gb": None})
            if gpus:
                sample["gpus"] = gpus
            self.samples.append(sample)

    def summary(self, start: float | None = None, end: float | None = None) -> dict[str, Any]:
        import psutil

        window = [s for s in self.samples if (start is None or s["t"] >= start) and (end is None or s["t"] <= end)]
        out: dict[str, Any] = {"samples": len(window), "cpu_count": psutil.cpu_count(),
                               "ram_total_gb": psutil.virtual_memory().total / 2**30}
        for key in ("cpu_percent", "ram_used_gb", "ram_percent"):
            values = [s[key] for s in window]
            out[key] = {"mean": sum(values) / len(values), "max": max(values)} if values else None
        if self.gpu_names:
            gpus = []
            for i, name in enumerate(self.gpu_names):
                util = [s["gpus"][i]["util_percent"] for s in window if s.get("gpus") and
                        s["gpus"][i]["util_percent"] is not None]
                mem = [s["gpus"][i]["mem_used_gb"] for s in window if s.get("gpus") and
                       s["gpus"][i]["mem_used_gb"] is not None]
                gpus.append({"index": i, "name": name,
                             "util_percent": {"mean": sum(util) / len(util), "max": max(util)} if util else None,
                             "mem_used_gb": {"mean": sum(mem) / len(mem), "max": max(mem)} if mem else None})
            out["gpus"] = gpus
        return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

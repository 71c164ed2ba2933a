"""Side-by-side CPU measurement for the bench scripts: wall time, minor page faults and peak RSS per call.

Candidates run interleaved (one call of each per round), so load from other processes on a shared machine hits
them alike and their ratios stay meaningful even when the absolute times do not.
"""

import os
import resource
import statistics
import time


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB; monotone over the run


def measure_interleaved(fns: dict, steps: int, warmup: int) -> dict[str, dict]:
    """Per name: min / median / max seconds, mean minor page faults per call, peak RSS (MiB) during its calls."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    faults = {name: 0 for name in fns}
    peak = {name: 0.0 for name in fns}
    per_call_peak = _reset_peak_rss()
    for _ in range(steps):
        for name, fn in fns.items():
            if per_call_peak:
                _reset_peak_rss()
            flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt
            peak[name] = max(peak[name], _peak_rss_mib())
    return {
        name: {
            "min_s": min(t), "median_s": statistics.median(t), "max_s": max(t),
            "minor_faults": faults[name] / steps, "peak_rss_mib": peak[name],
            "peak_rss_scope": "per call" if per_call_peak else "process (monotone)",
        }
        for name, t in times.items()
    }


def machine_load() -> str:
    """`uptime`'s load averages and the core count, for the record next to every timing."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} cores"

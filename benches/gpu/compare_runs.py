"""One row of the GPU check's runs.md: a run on the device against one step of the same
recipe on the CPU, or (--every-step) a resumed run against the same run uninterrupted.

    python3 compare_runs.py METHOD DEVICE DTYPE DEVICE_METRICS CPU_METRICS [--every-step]

Every logged loss must be finite and step 1 must match the CPU's: within 2e-3 relative in
f32 (the devices sum in other orders, and f32 matmuls may run on TF32 tensor cores) and
3e-2 in bf16. GRPO samples its completions, so its step 1 is shown but only held to being
finite. With --every-step the two runs are on the same device and must agree at every step
within 1e-5 relative (the same kernels in the same order; the bound only allows for a
kernel that sums in another order from run to run). Exits 1 when the row fails.
"""

import json
import math
import sys

BOUNDS = {"f32": 2e-3, "bf16": 3e-2}


def losses(path):
    try:
        lines = [json.loads(l) for l in open(path) if l.strip()]
    except (OSError, ValueError) as e:
        return None, f"{path}: {e}"
    return [l["loss"] for l in lines if "loss" in l and "step" in l], None


def main():
    method, device, dtype, dev_path, cpu_path = sys.argv[1:6]
    dev, err = losses(dev_path)
    cpu, err_cpu = losses(cpu_path)
    if err or err_cpu or not dev or not cpu:
        why = err or err_cpu or "no training line"
        print(f"| {method} | {device} | {dtype} | | | | | | FAIL: {why} |")
        return 1
    finite = all(isinstance(x, (int, float)) and math.isfinite(x) for x in dev + cpu)
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)
    if "--every-step" in sys.argv[6:]:
        diff = max(rel(a, b) for a, b in zip(dev, cpu)) if len(dev) == len(cpu) else math.inf
        bound = 1e-5
    else:
        diff = rel(dev[0], cpu[0])
        # METHOD may carry a variant after a space, e.g. "sft (blocked attention)".
        bound = None if method.split()[0] == "grpo" else BOUNDS[dtype]
    ok = finite and (bound is None or diff <= bound)
    shown = ", ".join(f"{x:.5g}" for x in dev)
    print(f"| {method} | {device} | {dtype} | {dev[0]:.6g} | {cpu[0]:.6g} | {diff:.2e} | "
          f"{'finite only' if bound is None else f'{bound:.0e}'} | {shown} | {'pass' if ok else 'FAIL'} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

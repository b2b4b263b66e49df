"""Where the time of the main job goes: torch.profiler over one reconstruction, per stage. Prints JSON.

It also reconstructs once in float32 and reports how far the run's precision (bf16 where the
machine has it) is from it (``bf16_vs_float32_psnr_db``, PSNR over the float32 output's range).

Stages are the ``record_function`` labels of the autoencoder (``medil.encoder``,
``medil.encoder_lte``, ``medil.decoder_lte``, ``medil.global_skip``, ``medil.decoder``) plus the
top operators by self time.

    python benchmarks/profile_reconstruct.py [--input FILE] [--spacing 1] [--precision auto|float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", default=str(REPO / "examples/data/itk_t1_2x2x3mm.nii.gz"))
    ap.add_argument("--spacing", type=float, nargs="+", default=[1.0])
    ap.add_argument("--model", default="medil-brain-t1")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()

    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from medil_backend import load_model, output_grid, read_volume, reconstruct

    torch.set_num_threads(2)
    vol = read_volume(args.input)
    target = output_grid(vol.grid, spacing=args.spacing)
    net = load_model(args.model).net
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        out = reconstruct(vol, target, net, device="cpu", precision=args.precision)
        seconds = time.perf_counter() - t0
    ref = reconstruct(vol, target, net, device="cpu", precision="float32").array
    diff = np.asarray(out.array, dtype=np.float64) - ref
    peak = float(np.ptp(ref))
    agreement = float(10 * np.log10(peak**2 / max(float(np.mean(diff**2)), 1e-30)))
    events = prof.key_averages()
    stages = {e.key: round(e.cpu_time_total / 1e6, 3) for e in events if e.key.startswith("medil.")}
    ops = sorted((e for e in events if not e.key.startswith("medil.")), key=lambda e: -e.self_cpu_time_total)[:10]
    print(
        json.dumps(
            {
                "benchmark": "profile of reconstruct (torch.profiler; stage times are wall-clock CPU totals)",
                "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
                "input": Path(args.input).name,
                "output_shape": list(target.shape),
                "precision": out.meta["precision"],
                "seconds": round(seconds, 3),
                "bf16_vs_float32_psnr_db": round(agreement, 1),
                "stages_s": stages,
                "top_ops_self_s": {e.key: round(e.self_cpu_time_total / 1e6, 3) for e in ops},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

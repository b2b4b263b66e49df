"""Write the README's measured tables from the JSON results in benchmarks/results/.

    python benchmarks/readme_tables.py          # rewrites the marked sections of README.md, SECURITY.md and docs/*.md
    python benchmarks/readme_tables.py --check  # writes nothing; exit 1 if a document differs from what the results render

Sections: ``quality-brain`` / ``quality-ct`` (``medil evaluate`` mean tables and the
targets, from ``eval-brain.json`` / ``eval-ct.json``), ``superres-brain`` / ``superres-ct``
(``eval-superres-*.json``), ``superres-speed`` (``bench_superres.json``), ``speed``
(``bench_reconstruct.json``), ``generative-brain`` (``eval-generative-brain.json``, and
``eval-generative-brain-previous.json`` for the model it replaced) and
``sample-speed`` (``bench_sample.json``); ``multistack-*``, ``multistack-speed``, ``multistack-summary``
(``eval-multistack-*.json``, ``bench_multistack.json``), ``slice-motion`` (``bench_slice_motion.json``),
``contrast-agreement`` (``contrast_agreement.json``),
``batch_speed`` (``bench_batch.json``); in SECURITY.md, ``fuzz-outcomes`` (``fuzz_inputs.json``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def portable(command: str) -> str:
    """A recorded command as a reader runs it: the shared data as ``../shared/data``, not the machine's absolute path."""
    return re.sub(r"(?<![\w.])/\S*?/shared/data/", "../shared/data/", command)


def quality(name: str) -> str:
    from medil_backend.evaluate import markdown_table, target_table

    res = json.loads((RESULTS / f"eval-{name}.json").read_text())
    models = [m for m in res["mean"]["recon"] if m not in ("trilinear", "bspline")]
    return markdown_table(res) + "\n\nAgainst the training goals (mean over the held-out volumes):\n\n" + target_table(res, models)


CASE_TITLES = {
    "main": "main job: 2x2x3 mm T1 example -> 1 mm",
    "head1mm": "1 mm T1 head, own grid",
    "ct512": "512x512x500 CT -> 1 mm",
    "chest0p7": "1.5 mm chest CT -> 0.7 mm",
}


def speed() -> str:
    d = json.loads((RESULTS / "bench_reconstruct.json").read_text())
    rows = [
        "| case | input -> output | method | limit | seconds | x B-spline | peak RSS increase (MB) | peak RSS (MB) | tiles enc/dec |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, c in d["cases"].items():
        b = c["baseline_bspline"]
        shapes = f"{'x'.join(map(str, b['input_shape']))} -> {'x'.join(map(str, b['output_shape']))}"
        title = CASE_TITLES.get(case, case)
        rows.append(
            f"| {title} | {shapes} | SimpleITK B-spline | - | {b['seconds']:.1f} | 1 | {b['peak_rss_increase_mb']:.0f} | {b['peak_rss_mb']:.0f} | - |"
        )
        for key, v in c.items():
            if not key.startswith("medil_max"):
                continue
            limit = key[len("medil_max") :]
            if "error" in v:
                rows.append(f"| {title} | {shapes} | MedIL | {limit} | refused: {v['error']} | | | | |")
                continue
            t = v["tiles"]
            disk = ", output spilled to disk" if v.get("output_on_disk") else ""
            rows.append(
                f"| {title} | {shapes} | MedIL `{v['model']}` ({v['precision']}) | {limit} | {v['seconds']:.1f} | "
                f"{v['seconds'] / b['seconds']:.1f} | {v['peak_rss_increase_mb']:.0f} | {v['peak_rss_mb']:.0f} | {t['encode']}/{t['decode']}{disk} |"
            )
    rows.append("")
    rows.append(f"Measured on {d['machine']} (each run in a fresh process, B-spline in the same run).")
    return "\n".join(rows)


def superres_quality(name: str) -> str:
    from medil_backend.evaluate import markdown_table, superres_table

    res = json.loads((RESULTS / f"eval-superres-{name}.json").read_text())
    methods = [m[len("superres-") :] for m in res["mean"]["sr4mm"] if m.startswith("superres-")]
    per_volume = [
        "| volume | task | B-spline | " + " | ".join(f"superres-{m}" for m in methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for vol, rows in res["volumes"].items():
        for task, r in rows.items():
            if task.startswith("sr"):
                cells = [f"{r[f'superres-{m}']['psnr_mask'] - r['bspline']['psnr_mask']:+.2f}" for m in methods]
                per_volume.append(f"| {vol} | {task} | {r['bspline']['psnr_mask']:.2f} dB | " + " | ".join(cells) + " |")
    text = (
        markdown_table(res, keys=("psnr_mask", "ssim_mask", "psnr", "seconds"))
        + "\n\nGain over B-spline (psnr_mask), against the super-resolution goals:\n\n"
        + superres_table(res, methods)
        + "\n\nPer volume (masked PSNR of B-spline; each method's gain over it, dB):\n\n"
        + "\n".join(per_volume)
    )
    previous = RESULTS / f"eval-superres-{name}-previous.json"
    if previous.exists():  # the version this one replaced, measured by the same command
        text += f"\n\nThe version it replaced (`{previous.name}`, same command):\n\n" + superres_table(
            json.loads(previous.read_text()), methods
        )
    return text


def superres_uncertainty() -> str:
    """The uncertainty maps of ``adapt`` with K seeds: Pearson r with the error, and the K-mean's gain."""
    rows = [
        "| volumes | task | samples | uncertainty-error r (target >= 0.4) | gain of the K-mean over B-spline |",
        "|---|---|---|---|---|",
    ]
    for name in ("brain", "ct"):
        path = RESULTS / f"eval-superres-uncertainty-{name}.json"
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        for task, methods in res["mean"].items():
            if not task.startswith("sr") or "uncertainty_error_r" not in methods.get("superres-adapt", {}):
                continue
            m = methods["superres-adapt"]
            k = res.get("superres_samples", "K")
            gain = m["psnr_mask"] - methods["bspline"]["psnr_mask"]
            rows.append(f"| {name} | {task} | {k} | {m['uncertainty_error_r']:.2f} | {gain:+.2f} dB |")
    return "\n".join(rows)


def superres_speed() -> str:
    d = json.loads((RESULTS / "bench_superres.json").read_text())
    rows = [
        "| method | seconds | whole process, x B-spline's | peak RSS increase (MB) | psnr_mask | gain over B-spline |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in d["results"].items():
        gain = f"{r['gain_over_bspline_db']:+.2f} dB" if "gain_over_bspline_db" in r else "-"
        ratio = f"{r['time_ratio_vs_bspline']:.1f}x" if "time_ratio_vs_bspline" in r else ("1x" if m == "bspline" else "-")
        name = "quick (adapt, time budget 0)" if m == "quick" else m
        rows.append(f"| {name} | {r['seconds']:.1f} | {ratio} | {r['peak_rss_increase_mb']:.0f} | {r['psnr_mask']:.2f} | {gain} |")
    rows.append("")
    m = d["machine"]
    shape = "x".join(map(str, d["results"]["bspline"]["output_shape"]))
    rows.append(
        f"{d['case']}, {shape} output; adapt's time budget {d['time_budget_min']:g} min; "
        f"{m['cpu_count']} CPU cores, {m['torch_threads']} torch threads, each method in a fresh process."
    )
    return "\n".join(rows)


def generative() -> str:
    from medil_backend.evaluate_generative import markdown

    def table(r: dict) -> str:
        return (
            markdown(r)
            + f"\n{r['n_samples']} samples of `{r['model']}` (sha256 {r['model_sha256'][:12]}…, seeds {r['seed']}.."
            + f"{r['seed'] + r['n_samples'] - 1}); real: {len(r['real']['train'])} training + {len(r['real']['held_out'])} held-out volumes."
        )

    return table(json.loads((RESULTS / "eval-generative-brain.json").read_text()))


def generative_previous() -> str:
    """docs/results/sampling-history.md: the model the bundled one replaced, by the same command."""
    from medil_backend.evaluate_generative import markdown

    r = json.loads((RESULTS / "eval-generative-brain-previous.json").read_text())
    return (
        markdown(r)
        + f"\n{r['n_samples']} samples of `{r['model']}` (sha256 {r['model_sha256'][:12]}…, seeds {r['seed']}.."
        + f"{r['seed'] + r['n_samples'] - 1}); real: {len(r['real']['train'])} training + {len(r['real']['held_out'])} held-out volumes."
    )


def shift_label(spec: str) -> str:
    """``"8.0"`` -> ``8``; ``"1-8"`` (interpolated) -> ``1→8``."""
    return "→".join(f"{float(v):g}" for v in spec.split("-"))


def noise_levels() -> str:
    d = json.loads((RESULTS / "latent-noise-levels.json").read_text())
    shifts = list(d["blocks"][0]["step"])
    rows = [
        "| block of the latent | residual variance | seen from SNR | "
        + " | ".join(f"step, noise_shift {shift_label(s)}" for s in shifts)
        + " |",
        "|---|---|---|" + "---|" * len(shifts),
    ]
    for b in d["blocks"]:
        steps = " | ".join(str(b["step"][s]) for s in shifts)
        rows.append(f"| {b['block_mm']:g} mm | {b['residual_variance']:.3f} | {b['snr_seen']:.2g} | {steps} |")
    rows.append(
        f"\n{d['training_latents']} training latents (a {d['cube_voxels']}³ cube each), standardised by `{d['model']}` "
        f"(sha256 {d['model_sha256'][:12]}…); {d['timesteps']} steps; `{d['command']}`."
    )
    return "\n".join(rows)


#: the brain LDMs and probes measured by the same evaluate-generative command (8 samples, 25 DDIM steps unless said): result file -> what was changed
PROBES = {
    "eval-generative-brain-per-channel.json": "two models back: one mean and std per channel",
    "eval-generative-brain-previous.json": "the model it replaced: unshifted schedule, 3500 steps",
    "eval-generative-brain-eta1.json": "the model it replaced, sampled with eta 1",
    "eval-generative-brain-steps100-eta1.json": "the model it replaced, 100 DDIM steps, eta 1",
    "eval-generative-brain-continued-probe.json": "the model it replaced, trained 28 CPU minutes more",
    "eval-generative-brain-mirror-1750-probe.json": "unshifted, left-right mirroring, 6 encodings a head, 1750 steps",
    "eval-generative-brain-mirror-probe.json": "unshifted, left-right mirroring, 6 encodings a head, 3500 steps",
    "eval-generative-brain-shift4-1750-probe.json": "noise_shift 4, 1750 steps",
    "eval-generative-brain-shift4-3500-probe.json": "noise_shift 4, 3500 steps",
    "eval-generative-brain.json": "**bundled: noise_shift 8, 1750 steps; 50 DDIM steps (its card's default)**",
    "eval-generative-brain-steps25.json": "bundled, sampled in 25 DDIM steps",
    "eval-generative-brain-n16.json": "bundled, 16 samples (seeds 1000..1015) against the same real volumes",
    "eval-generative-brain-shift11-1750-probe.json": "noise_shift 11, 1750 steps",
    "eval-generative-brain-shift16-1750-probe.json": "noise_shift 16, 1750 steps",
    "eval-generative-brain-interp1-8-1750-probe.json": "noise_shift 1→8 (interpolated: unshifted at low noise), 1750 steps",
    "eval-generative-brain-interp1-16-1750-probe.json": "noise_shift 1→16 (interpolated), 1750 steps",
}


def generative_probes() -> str:
    real = json.loads((RESULTS / "eval-generative-brain.json").read_text())
    hf = real.get("high_frequency_energy")
    real_hf = "-" if hf is None else f"{hf['real_through_autoencoder']:.3f}"
    rows = [
        f"| model | result file | samples, DDIM steps | pairwise MS-SSIM (real {real['diversity_ms_ssim']['real']:.3f}) "
        f"| pairwise correlation (real {real['pairwise_correlation']['real']:.3f}) | fd_medil "
        "| copies (samples closer to a training head than any two training heads are) "
        f"| speckle (real through the autoencoder {real_hf}) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, what in PROBES.items():
        path = RESULTS / name
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        corr = r.get("pairwise_correlation", {}).get("samples")
        copies = r["memorisation"].get("samples_above_every_train_pair")
        corr_text = "-" if corr is None else f"{corr:.3f}"
        copies_text = "-" if copies is None else f"{copies} of {r['n_samples']}"
        speckle = r.get("high_frequency_energy", {}).get("samples")
        speckle_text = "-" if speckle is None else f"{speckle:.3f}"
        rows.append(
            f"| {what} | `{name}` | {r['n_samples']}, {r['steps']} | {r['diversity_ms_ssim']['samples']:.3f} | {corr_text} | {r['fd_medil']:.2f} | {copies_text} | {speckle_text} |"
        )
    return "\n".join(rows)


def sample_speed() -> str:
    d = json.loads((RESULTS / "bench_sample.json").read_text())
    rows = [
        "| job | output | memory limit (GB) | denoising windows | seconds | denoise / decode (s) | peak RSS increase (GB) |",
        "|---|---|---|---|---|---|---|",
    ]
    timed = [r for r in d["results"] if "seconds" in r]
    for r in timed:
        split = f"{r['denoise_seconds']} / {r['decode_seconds']}" if "denoise_seconds" in r else "-"
        limit = r.get("max_memory_gb") or ("3 (default)" if "denoise_seconds" in r else "-")
        rows.append(
            f"| {r['job']} | {'x'.join(map(str, r['shape']))} | {limit} | {r.get('denoise_windows', '-')} | {r['seconds']} | {split} "
            f"| {r['peak_rss_increase_gb']} |"
        )
    s = next(r for r in d["results"] if r["job"] == "medil sample")
    wide = [r for r in timed if "wide" in r["job"]]
    rows += [
        "",
        f"{d['machine']}; {s['steps']} DDIM steps, {s['threads']} torch threads; latents "
        + ", ".join("x".join(map(str, r["latent_shape"])) for r in [s, *wide[:1]])
        + ".",
    ]
    for r in d["results"]:
        if "psnr_db" in r:
            rows.append(f"The patch-wise wide volume against the one-pass one: PSNR {r['psnr_db']} dB, correlation {r['correlation']}.")
    return "\n".join(rows)


def fuzz_outcomes() -> str:
    """SECURITY.md's table of the fuzz campaign (``fuzz_inputs.json``)."""
    d = json.loads((RESULTS / "fuzz_inputs.json").read_text())
    kinds = ["clean_error", "correct_output", "output_reference_refuses", "wrong_success", "traceback", "hang", "crash"]
    rows = [
        "| family | reader | " + " | ".join(k.replace("_", " ") for k in kinds) + " |",
        "|---|---|" + "---|" * len(kinds),
    ]
    names = {"nifti": "NIfTI (.nii, .hdr/.img)", "nrrd": "NRRD (.nrrd, .nhdr)", "metaio": "MetaImage (.mha, .mhd)", "dicom": "DICOM series"}
    for family, f in d["families"].items():
        rows.append(f"| {names.get(family, family)} | MedIL | " + " | ".join(str(f["medil"].get(k, 0)) for k in kinds) + " |")
        ref = f["standard_reader"]
        std = "nibabel" if family == "nifti" else "SimpleITK"
        cells = [str(ref.get("error", 0)), str(ref.get("output", 0)), "-", "-", "-", str(ref.get("hang", 0)), str(ref.get("crash", 0))]
        rows.append(f"| | {std} alone (baseline) | " + " | ".join(cells) + " |")
    total = d["total_medil"]
    return "\n".join(rows) + (
        f"\n\n{d['cases_per_family']} mutated files per family (seed {d['seed']}), {d['seconds']:.0f} s; MedIL: "
        f"{total.get('clean_error', 0)} clean errors, {total.get('correct_output', 0)} correct volumes, {d['failures']} tracebacks, "
        "hangs, crashes or wrong successes. For the standard readers the first two columns count every exception and "
        "every volume returned, right or wrong (a sheared DICOM series, for example, is returned on a wrong grid)."
    )


def batch_speed() -> str:
    """docs/batch.md's throughput table (``bench_batch.json``)."""
    d = json.loads((RESULTS / "bench_batch.json").read_text())
    rows = [
        "| how | workers x torch threads | wall time (s) | scans / min | mean s per scan | peak memory per scan (GB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in d["runs"]:
        if r["workers"] == "loop":
            rows.append(
                f"| one `medil` command per scan (baseline) | 1 x {r['threads_per_worker']} | {r['wall_s']} | {r['scans_per_min']} | - | - |"
            )
        else:
            rows.append(
                f"| `medil batch` | {r['workers']} x {r['threads_per_worker']} | {r['wall_s']} | {r['scans_per_min']} | {r['mean_scan_s']} "
                f"| {r['max_peak_memory_gb']} |"
            )
    m = d["machine"]
    rows += [
        "",
        f"`{d['task']}` on {d['scans']} copies of {d['scan']}; {m['cpus']} CPUs, Python {m['python']}. Two workers against one: "
        f"{d['speedup_2_workers_vs_1']}x; against the one-command-per-scan loop: {d['speedup_2_workers_vs_loop']}x.",
    ]
    return "\n".join(rows)


def multistack(name: str) -> str:
    """docs/superres.md's multi-stack tables (``eval-multistack-{name}.json``, written by ``medil evaluate --multistack``)."""
    from medil_backend.evaluate_multistack import markdown

    d = json.loads((RESULTS / f"eval-multistack-{name}.json").read_text())
    rows = [markdown(d), ""]
    for v in d["volumes"]:
        for case in v["cases"]:
            m = case["methods"]
            best = m.get("multistack_adapt", m["multistack"])
            label = "multi-stack adapt" if "multistack_adapt" in m else "multi-stack"
            text = f"{v['name']}, 3 x {case['thick_mm']:g} mm: {label} {best['psnr'] - m['bspline_best_single']['psnr']:+.2f} dB over B-spline of the best single stack"
            for key, what in (("adapt_best_single", "single-stack adapt"), ("adapt_quick_best_single", "single-stack adapt (quick)")):
                if key in m:
                    text += f", {best['psnr'] - m[key]['psnr']:+.2f} dB over {what}"
            if "multistack_adapt" in m:
                text += f" ({m['multistack_adapt']['psnr'] - m['multistack']['psnr']:+.2f} dB from adapt's learned detail over the fast joint reconstruction)"
            worst = max(max(e["rotation_deg"] for e in case["motion_error"]), 0)
            shift = max(e["translation_mm"] for e in case["motion_error"])
            rows.append(
                f"- {text}; motion recovered to {worst:.2f} degrees / {shift:.2f} mm; seconds measured on 2 CPU cores shared with other jobs (the speed table below is measured alone)."
            )
    rows.append(f"\n`{portable(d['command'])}`")
    return "\n".join(rows)


def multistack_summary() -> str:
    """README.md's few lines on several stacks: each evaluated case's gains (eval-multistack-*.json) and the
    whole-head seconds (bench_multistack.json), with the commands."""
    rows = []
    for name in ("brain", "ct"):
        path = RESULTS / f"eval-multistack-{name}.json"
        if not path.exists():
            continue
        d = json.loads(path.read_text())
        for v in d["volumes"]:
            for case in v["cases"]:
                m = case["methods"]
                best = m.get("multistack_adapt", m["multistack"])
                parts = [f"{best['psnr'] - m['bspline_best_single']['psnr']:+.2f} dB over B-spline of the best single stack"]
                if "adapt_best_single" in m:
                    parts.append(f"{best['psnr'] - m['adapt_best_single']['psnr']:+.2f} dB over single-stack adapt")
                worst = max(e["rotation_deg"] for e in case["motion_error"])
                shift = max(e["translation_mm"] for e in case["motion_error"])
                rows.append(
                    f"- {v['name']} (held out), three {case['thick_mm']:g} mm stacks with about 5 degrees / 4-5 mm of motion: "
                    f"{', '.join(parts)}; motion recovered to {worst:.2f} degrees / {shift:.2f} mm."
                )
        rows.append(f"  (`{portable(d['command'].split(' --json')[0])}`)")
    bench = RESULTS / "bench_multistack.json"
    if bench.exists():
        d = json.loads(bench.read_text())
        times = ", ".join(f"{k} {m['medil_superres_seconds'] / 60:.1f} min" for k, m in d.get("methods", {}).items())
        rows.append(
            f"- A whole head ({'x'.join(map(str, d['output_shape']))} at 1 mm) from three 4 mm stacks on {d['machine']['cpus']} CPU cores: {times} (`python benchmarks/bench_multistack.py`)."
        )
    return "\n".join(rows)


def multistack_speed() -> str:
    d = json.loads((RESULTS / "bench_multistack.json").read_text())
    shape = "x".join(map(str, d["output_shape"]))
    what = {
        "fast": "fast: joint reconstruction",
        "adapt": "adapt (default): the pre-trained network's upsampling of each stack, then joint",
        "adapt-3min": "adapt, `--time-budget 3`: the network adapted to the stacks first, then joint",
    }
    rows = [
        "| job | output | seconds | x B-spline | gain over B-spline of the best stack | peak memory (GB) |",
        "|---|---|---|---|---|---|",
        f"| SimpleITK B-spline of one stack, resampling alone | {shape} | {d['bspline_one_stack_seconds']} | - | - | - |",
    ]
    if "bspline_one_stack_process_seconds" in d:
        rows.append(
            f"| SimpleITK B-spline of one stack, a whole process (reading, resampling, writing) | {shape} | "
            f"{d['bspline_one_stack_process_seconds']} | 1 | - | - |"
        )
    for method, m in d["methods"].items():
        rounds = f"{m['rounds']} round{'s' if m['rounds'] != 1 else ''}"
        ratio = m.get("times_bspline_one_stack", "-")
        gain = f"{m['gain_over_bspline_best_stack_db']:+.2f} dB" if "gain_over_bspline_best_stack_db" in m else "-"
        rows.append(
            f"| `medil superres` of {len(d['stacks'])} stacks, {what.get(method, method)} ({rounds}; reading, registration, "
            f"reconstruction, writing) | {shape} | {m['medil_superres_seconds']} | {ratio} | {gain} | {m['peak_memory_gb']} |"
        )
    rows += ["", f"{d['machine']['cpus']} CPU cores, device {d['device']}; `python benchmarks/bench_multistack.py`."]
    return "\n".join(rows)


def contrast() -> str:
    """docs/superres.md's contrast-check evidence (``contrast_agreement.json``)."""
    d = json.loads((RESULTS / "contrast_agreement.json").read_text())
    rows = ["| stacks (first / others) | volume | slices | correlation with the first stack |", "|---|---|---|---|"]
    for c in d["cases"]:
        rows.append(f"| {c['pair']} | {c['volume']} | {c['thick_mm']} mm | {', '.join(f'{r:.2f}' for r in c['r'])} |")
    rows += [
        "",
        f"One contrast: {d['one_contrast'][0]:.2f} to {d['one_contrast'][1]:.2f}; T1 against T2: {d['different_contrast'][0]:.2f} "
        f"to {d['different_contrast'][1]:.2f}; refused below {d['threshold']:g}. `python benchmarks/contrast_agreement.py`.",
    ]
    return "\n".join(rows)


def slice_motion() -> str:
    """docs/superres.md's per-slice motion table (``bench_slice_motion.json``)."""
    d = json.loads((RESULTS / "bench_slice_motion.json").read_text())
    names = {
        "bspline_best_single": "B-spline, best single stack",
        "one_motion_per_stack": "multi-stack, one motion per stack",
        "slice_motion": "**multi-stack, `--slice-motion`**",
    }
    rows = ["| method | PSNR (dB) | SSIM | seconds |", "|---|---|---|---|"]
    for key, m in d["methods"].items():
        rows.append(f"| {names.get(key, key)} | {m['psnr']} | {m['ssim']} | {m.get('seconds', '')} |")
    e = d["slice_motion_error"]
    rows += [
        "",
        f"Per-slice motion of the moved stack ({e['slices_scored']} slices, its end slices aside; {e['slices_moved']} moved): "
        f"rotation error median {e['rotation_deg_median']} degrees (90th percentile {e['rotation_deg_p90']}), displacement "
        f"median {e['translation_mm_median']} mm (90th percentile {e['translation_mm_p90']}). {d['volume']}, three {d['thick_mm']} mm "
        f"stacks; {d['machine']['cpus']} CPU cores shared with other jobs; `python benchmarks/bench_slice_motion.py`.",
    ]
    return "\n".join(rows)


#: the documents whose marked sections this script writes (README.md, SECURITY.md and docs/)
DOCUMENTS = [
    REPO / "README.md",
    REPO / "SECURITY.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "docs" / "results").glob("*.md")),
]


def compact_latent() -> str:
    """docs/sampling.md: the compact generative latent on held-out heads (eval-compact-latent.json): masked PSNR and
    high-frequency share of each autoencoder against the real head, next to B-spline of block averages with as few numbers."""
    d = json.loads((RESULTS / "eval-compact-latent.json").read_text())
    rows = [
        "| autoencoder | latent | numbers vs 1 mm | training | " + " | ".join(f"{v} masked PSNR / HF share" for v in d["volumes"]) + " |"
    ]
    rows.append("|---|---|---|---|" + "---|" * len(d["volumes"]))
    for name, m in d["models"].items():
        t = m.get("training") or {}
        trained = f"{t['steps_done']} steps, {t['minutes']} min, {t['hardware']}" if t.get("steps_done") else "none (the design alone)"
        cells = []
        for row in d["volumes"].values():
            r = row[name]
            cells.append(f"{r['psnr_mask']:.2f} dB / {r['hf_share']:.3f} ({r['hf_ratio_to_real']:.2f} of real)")
        label = Path(name).stem if name.endswith(".json") else name
        latent = m["latent"].replace("1 channels", "1 channel")
        rows.append(f"| {label} | {latent} | 1/{m['compression_vs_1mm']:.1f} | {trained} | " + " | ".join(cells) + " |")
    for key in next(iter(d["volumes"].values())):
        if key.startswith("block_average_"):
            cells = []
            for row in d["volumes"].values():
                cells.append(f"{row[key]['psnr_mask']:.2f} dB")
            sp = next(iter(d["volumes"].values()))[key]["spacing_mm"]
            rows.append(
                f"| box averages at {sp:g} mm, SimpleITK B-spline back | 1 channel at {sp:g} mm | 1/{sp**3:.1f} | - | "
                + " | ".join(cells)
                + " |"
            )
    real = " / ".join(f"{v}: {row['real']['hf_share']:.3f}" for v, row in d["volumes"].items())
    rows.append(f"\nHigh-frequency share of the real heads: {real}. `{portable(d['command'])}`")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Render every marked section; ``--check``: write nothing, exit 1 naming the documents that differ from
    what the results render (a figure edited by hand, or results newer than the documents)."""
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    sections = [("quality-brain", quality("brain")), ("quality-ct", quality("ct")), ("speed", speed())]
    for name in ("brain", "ct", "generative-brain", "quick-brain", "quick-ct"):
        if (RESULTS / f"eval-superres-{name}.json").exists():
            sections.append((f"superres-{name}", superres_quality(name)))
    if any((RESULTS / f"eval-superres-uncertainty-{n}.json").exists() for n in ("brain", "ct")):
        sections.append(("superres-uncertainty", superres_uncertainty()))
    if (RESULTS / "bench_superres.json").exists():
        sections.append(("superres-speed", superres_speed()))
    if (RESULTS / "eval-generative-brain.json").exists():
        sections.append(("generative-brain", generative()))
    if (RESULTS / "eval-generative-brain-previous.json").exists():
        sections.append(("generative-brain-previous", generative_previous()))
    if (RESULTS / "bench_sample.json").exists():
        sections.append(("sample-speed", sample_speed()))
    if (RESULTS / "latent-noise-levels.json").exists():
        sections.append(("noise-levels", noise_levels()))
    if (RESULTS / "eval-generative-brain.json").exists():
        sections.append(("generative-probes", generative_probes()))
    if (RESULTS / "fuzz_inputs.json").exists():
        sections.append(("fuzz-outcomes", fuzz_outcomes()))
    for name in ("brain", "ct"):
        if (RESULTS / f"eval-multistack-{name}.json").exists():
            sections.append((f"multistack-{name}", multistack(name)))
    if (RESULTS / "bench_multistack.json").exists():
        sections.append(("multistack-speed", multistack_speed()))
    if any((RESULTS / f"eval-multistack-{n}.json").exists() for n in ("brain", "ct")):
        sections.append(("multistack-summary", multistack_summary()))
    if (RESULTS / "contrast_agreement.json").exists():
        sections.append(("contrast-agreement", contrast()))
    if (RESULTS / "bench_slice_motion.json").exists():
        sections.append(("slice-motion", slice_motion()))
    if (RESULTS / "eval-compact-latent.json").exists():
        sections.append(("compact-latent", compact_latent()))
    if (RESULTS / "bench_batch.json").exists():
        sections.append(("batch_speed", batch_speed()))
    texts = {doc: doc.read_text() for doc in DOCUMENTS if doc.exists()}
    for name, text in sections:
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        found = [doc for doc, body in texts.items() if pattern.search(body)]
        if not found:
            raise SystemExit(f"no document has a <!-- {name}:start --> ... <!-- {name}:end --> section")
        for doc in found:
            texts[doc] = pattern.sub(lambda m, text=text: m.group(1) + text + "\n" + m.group(2), texts[doc])
    stale = [doc for doc, body in texts.items() if doc.read_text() != body]
    if check:
        for doc in stale:
            print(f"{doc.relative_to(REPO)} differs from what benchmarks/results renders: run python benchmarks/readme_tables.py")
        return 1 if stale else 0
    for doc in stale:
        doc.write_text(texts[doc])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU path in one command, dry-run on the CPU: packs in; weights, card, checkpoints, metrics and log out through $OUT."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import EXAMPLE, REPO

from medil_backend.io import read_volume
from medil_backend.training.pack import write_pack


def bash(args: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], capture_output=True, encoding="utf-8", errors="replace", cwd=REPO, env=env, timeout=timeout)


@pytest.mark.train  # needs the train extra (Lightning, MONAI, TorchIO)
@pytest.mark.skipif(shutil.which("setsid") is None or not sys.platform.startswith("linux"), reason="needs setsid (Linux)")
def test_gpu_run_and_poll_dry_run_on_the_cpu(tmp_path):
    root = REPO / "runs" / "gpu" / "tiny-dry-run"
    shutil.rmtree(root, ignore_errors=True)
    pack = tmp_path / "train.npz"
    write_pack([("itk", read_volume(EXAMPLE, modality="mri"), "sha-itk")], pack)
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    recipe = "training/configs/gpu/tiny-dry-run.yaml"
    try:
        start = bash(["training/gpu/run.sh", recipe, "2", "--data.train", str(pack), "--data.val", str(pack)], env, 120)
        assert start.returncode == 0 and "started tiny-dry-run" in start.stdout, start.stdout + start.stderr
        poll = bash(["training/gpu/poll.sh", recipe, "300"], env, 400)
        assert poll.returncode == 0 and poll.stdout.strip().endswith("finished"), poll.stdout + poll.stderr
        out = tmp_path / "out"
        names = sorted(p.name for p in out.iterdir())
        assert {"tiny-dry-run.safetensors", "tiny-dry-run.json", "train.log", "last.ckpt", "best.ckpt", "metrics.csv"} <= set(names), names
        assert len(names) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir())
        card = json.loads((out / "tiny-dry-run.json").read_text())
        assert card["training"]["data"]["train"] == [{"file": "train.npz#itk", "sha256": "sha-itk"}]
        assert card["training"]["precision"] == "bf16-mixed" and card["training"]["steps_done"] > 0
    finally:
        shutil.rmtree(root, ignore_errors=True)

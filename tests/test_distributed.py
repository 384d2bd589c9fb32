"""torch.distributed: 2 gloo processes produce the single-process measurement tables."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

ARGS = ["--model", "tiny-bert", "--dataset", "synthetic", "--batch-size", "4",
        "--max-length", "16", "--families", "gaussian,rows-norm", "--ratios", "0.25",
        "--num-batches", "5", "--mc-draws", "3", "--mc-layers", "none", "--no-progress",
        "--train-steps", "2", "--measure-at", "0,2", "--seed", "3"]


def _run(cmd, tmp_path):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "varstudy.measure", *ARGS, "--out", str(tmp / "single")], tmp)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "-m", "varstudy.measure", *ARGS, "--out", str(tmp / "two")], tmp)
    return tmp


@pytest.mark.parametrize("name", ["layers.csv", "summary.csv"])
def test_two_ranks_equal_single_process(tables, name):
    one, two = pd.read_csv(tables / "single" / name), pd.read_csv(tables / "two" / name)
    assert list(one.columns) == list(two.columns) and one.shape == two.shape
    text = one.select_dtypes(exclude="number").columns
    assert one[text].equals(two[text])
    num = one.select_dtypes("number").columns
    # Same batches and seeds on every rank; only BLAS thread counts differ between the runs.
    np.testing.assert_allclose(two[num].to_numpy(float), one[num].to_numpy(float),
                               rtol=1e-6, atol=0)


def test_world_size_recorded(tables):
    import json
    assert json.loads((tables / "two" / "config.json").read_text())["world_size"] == 2
    assert json.loads((tables / "single" / "config.json").read_text())["world_size"] == 1


def test_ddp_finetune_two_ranks_loss_falls(tmp_path):
    """DistributedDataParallel over gloo: each rank its own shard and sketches; loss falls."""
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "-m", "varstudy.finetune", "--model", "tiny-bert", "--task", "synthetic",
          "--sketch", "rows", "--ratio", "0.5", "--batch-size", "8", "--max-length", "16",
          "--max-steps", "60", "--lr", "3e-3", "--warmup", "0.1", "--eval-every", "60",
          "--no-progress", "--out", str(tmp_path / "ft")], tmp_path)
    (run_dir,) = (tmp_path / "ft").iterdir()
    steps = pd.read_csv(run_dir / "steps.csv")
    import json
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == 2
    # Chance level is ln 2 = 0.693; the single-process run of this setup reaches ~0.2.
    assert steps.loss.head(10).mean() > 0.65 and steps.loss.tail(10).mean() < 0.5

"""Training-loop mechanics on a tiny model (tests/helpers/training_tiny.py): DDP under torchrun, crash + --resume, data order, CLI errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from live_server import free_port

torch = pytest.importorskip("torch")

from raddiagseg.training.batches import StepBatchPlan
from raddiagseg.training.distributed import split_effective_batch

TINY = Path(__file__).parent / "helpers" / "training_tiny.py"
PYTHON = sys.executable


def _trace(folder, rank=0):
    path = Path(folder) / f"trace_rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")  # PYTHONPATH kept: the script runs this checkout's raddiagseg


def test_step_plan_shards_the_one_process_micro_batches_between_ranks():
    order = lambda epoch: list(range(10 * epoch, 10 * epoch + 10))  # noqa: E731
    single = StepBatchPlan(order, micro_batch=2, grad_accum=2, world_size=1, max_steps=5)
    ranks = [StepBatchPlan(order, micro_batch=2, grad_accum=1, world_size=2, rank=r, max_steps=5) for r in (0, 1)]
    for step in range(5):
        one = single.rank_micro_batches(step)
        assert sorted(map(tuple, one)) == sorted(tuple(b) for r in ranks for b in r.rank_micro_batches(step))
    # the stream crosses epoch boundaries without dropping or repeating samples
    seen = [i for b in single for _, i in b]
    assert seen == list(range(20))
    # resuming at step 3 yields exactly what an uninterrupted run yields from step 3 on
    resumed = StepBatchPlan(order, micro_batch=2, grad_accum=2, world_size=1, start_step=3, max_steps=5)
    assert [i for b in resumed for _, i in b] == seen[12:]
    assert [e for b in resumed for e, _ in b] == [1] * 8  # samples carry their epoch (per-epoch augmentation)
    assert resumed.position(3) == (1, 2)


def test_effective_batch_is_kept_when_the_number_of_processes_changes():
    assert split_effective_batch(4, 2, 1) == (4, 2)
    assert split_effective_batch(4, 2, 2) == (4, 1)
    assert split_effective_batch(4, 1, 2) == (2, 1)
    with pytest.raises(ValueError, match="multiple of 3"):
        split_effective_batch(4, 1, 3)


def test_torchrun_two_processes_match_one_process(tmp_path):
    one = subprocess.run([PYTHON, str(TINY), str(tmp_path / "one"), "--max-steps", "3"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(TINY), str(tmp_path / "two"), "--max-steps", "3"],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    single, rank0, rank1 = _trace(tmp_path / "one"), _trace(tmp_path / "two", 0), _trace(tmp_path / "two", 1)
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == [1, 2, 3]
    for a, b in zip(rank0, rank1):
        assert a["digest"] == b["digest"], f"parameters differ between ranks after step {a['step']}"
        assert set(a["indices"]).isdisjoint(b["indices"])  # each rank trains on its own shard
    assert abs(rank0[0]["loss"] - single[0]["loss"]) < 1e-4
    assert sorted(rank0[0]["indices"] + rank1[0]["indices"]) == sorted(single[0]["indices"])


def test_killed_run_resumes_with_the_same_steps_optimizer_state_and_data_order(tmp_path):
    script = [PYTHON, str(TINY)]
    reference = subprocess.run(script + [str(tmp_path / "ref"), "--max-steps", "5", "--save-every", "2"],
                               env=_env(), capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]

    run = tmp_path / "crash"
    proc = subprocess.Popen(script + [str(run), "--max-steps", "5", "--save-every", "2", "--pause-at", "3"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (run / "paused").exists():
            assert proc.poll() is None, "training exited before the pause"
            assert time.time() < deadline, "training did not reach step 3"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # a crash after the step-2 checkpoint, during step 3's bookkeeping
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = torch.load(run / "last" / "training_state.pt", weights_only=False)
    assert state["step"] == 2 and state["optimizer"]["state"], "the checkpoint holds the step and Adam moments"

    resumed = subprocess.run(script + [str(run), "--max-steps", "5", "--save-every", "2", "--resume"],
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref, trace = _trace(tmp_path / "ref"), _trace(run)
    resumed_steps = trace[3:]  # steps 1, 2, 3 (killed) then the resumed 3, 4, 5
    assert [r["step"] for r in resumed_steps] == [3, 4, 5]
    for got, want in zip(resumed_steps, ref[2:]):
        assert got["indices"] == want["indices"], "data order after resume"
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
        assert got["digest"] == want["digest"], "parameters after resume (optimizer/scheduler state restored)"
    steps_in_csv = [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps_in_csv == [1, 2, 3, 4, 5]
    assert (run / "loss_curves.png").stat().st_size > 1000
    assert json.loads((run / "best" / "checkpoint.json").read_text())["step"] in (2, 4, 5)


def test_train_command_reports_a_missing_manifest_in_one_line(tmp_path):
    result = subprocess.run([PYTHON, "-m", "raddiagseg", "train", "--data", str(tmp_path / "nowhere"), "--stage",
                             "finetune", "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no manifest" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_deepspeed_without_the_package_is_a_clear_error(monkeypatch):
    from raddiagseg.training.distributed import deepspeed_engine

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as on a machine without it: `import deepspeed` fails
    with pytest.raises(ValueError, match="needs the deepspeed package"):
        deepspeed_engine(None, None, None, 1, 1, 1, False, 1.0)


def test_resume_under_deepspeed_is_refused_in_one_line(tmp_path):
    (tmp_path / "manifest.jsonl").touch()
    result = subprocess.run([PYTHON, "-m", "raddiagseg", "train", "--data", str(tmp_path), "--stage", "finetune",
                             "--out", str(tmp_path / "run"), "--engine", "deepspeed", "--resume"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--resume is not supported with --engine deepspeed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_epochs_set_the_run_length_when_no_step_count_is_given(tmp_path):
    from raddiagseg.training.config import TrainConfig

    (tmp_path / "manifest.jsonl").write_text("")

    def resolved(**kwargs):
        return TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), preset="demo", stage="finetune",
                           **kwargs).resolved()

    assert resolved().max_steps == 900  # the preset's own length
    by_epochs = resolved(epochs=1.5)
    assert by_epochs.max_steps is None and by_epochs.epochs == 1.5  # the loop derives steps from the data
    assert resolved(epochs=1.5, max_steps=7).max_steps == 7

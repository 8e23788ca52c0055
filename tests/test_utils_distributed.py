"""The launcher's promises, one test each: results in rank order, notebook-defined functions,
a failing rank's traceback, a deadlock ending in a clear timeout with no process left behind,
repeated and concurrent launches, output relayed with the rank's prefix, nothing on stderr,
the automatic backend choice, and the same worker under torchrun."""

import json
import linecache
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from torchrun_worker import allreduce_worker
from utils import distributed

ROOT = Path(__file__).resolve().parents[1]


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_gone(pids, seconds=5.0) -> list:
    end = time.monotonic() + seconds
    while time.monotonic() < end and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def notebook_function(source: str, name: str):
    """A function defined the way a notebook cell defines it: in `__main__`, not importable."""
    namespace = {"__name__": "__main__", "torch": torch, "dist": dist, "distributed": distributed,
                 "os": os, "time": time, "subprocess": subprocess, "sys": sys}
    source = textwrap.dedent(source)
    # IPython keeps each cell's source where tracebacks find it; so do we.
    linecache.cache["<notebook cell>"] = (len(source), None, source.splitlines(True), "<notebook cell>")
    exec(compile(source, "<notebook cell>", "exec"), namespace)
    return namespace[name]


def rank_and_args(a, b=0):
    return (dist.get_rank(), dist.get_world_size(), a, b)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_results_come_back_in_rank_order_with_args_and_kwargs(world_size):
    assert distributed.launch(rank_and_args, world_size, "x", kwargs={"b": 5}) == \
        [(r, world_size, "x", 5) for r in range(world_size)]


def test_collectives_give_the_right_answer_and_tensors_come_back_detached():
    results = distributed.launch(allreduce_worker, 4, 3.0)
    assert [r["sum"] for r in results] == [[30.0] * 3] * 4
    assert all(r["gathered"] == [0.0, 1.0, 2.0, 3.0] and r["backend"] == "gloo" for r in results)

    def grad_tensor():
        w = torch.ones(2, requires_grad=True)
        return {"loss": (w * 2).sum(), "list": [w * 3]}

    out = distributed.launch(grad_tensor, 2)
    assert not out[0]["loss"].requires_grad and torch.equal(out[1]["list"][0], torch.full((2,), 3.0))


def test_a_function_defined_in_a_notebook_cell_runs():
    worker = notebook_function("""
        def worker(n):
            x = torch.arange(n, dtype=torch.float32) * (dist.get_rank() + 1)
            dist.all_reduce(x)
            return x
    """, "worker")
    assert all(torch.equal(r, torch.arange(5.0) * 3) for r in distributed.launch(worker, 2, 5))


def test_spawned_ranks_receive_a_notebook_function_with_cloudpickle():
    worker = notebook_function("""
        def worker(n):
            x = torch.full((n,), float(dist.get_rank()))
            dist.all_reduce(x)
            print("spawned", os.getpid() != int(os.environ.get("PARENT_PID", "0")))
            return x.sum().item()
    """, "worker")
    os.environ["PARENT_PID"] = str(os.getpid())
    try:
        assert distributed.launch(worker, 2, 3, start_method="spawn", timeout=120) == [3.0, 3.0]
    finally:
        del os.environ["PARENT_PID"]


def test_a_failing_rank_raises_with_its_traceback_and_the_others_do_not_hang():
    worker = notebook_function("""
        def worker():
            if dist.get_rank() == 2:
                values = [1, 2]
                return values[5]          # the line the traceback must show
            dist.barrier()                # the other ranks wait for rank 2 forever
    """, "worker")
    start = time.monotonic()
    with pytest.raises(distributed.RankError) as caught:
        distributed.launch(worker, 4, timeout=60)
    assert time.monotonic() - start < 20, "the other ranks should be stopped, not waited for"
    error = caught.value
    assert error.rank == 2 and error.exception_type == "IndexError"
    assert "rank 2 failed: IndexError: list index out of range" in str(error)
    assert "return values[5]" in str(error) and '"<notebook cell>", line 5, in worker' in str(error)
    assert "distributed.py" not in error.remote_traceback, "the launcher's own frames are noise"


def test_an_assertion_in_a_rank_keeps_its_message():
    def check():
        assert dist.get_rank() == 0, f"rank {dist.get_rank()} is not rank 0"
    with pytest.raises(distributed.RankError, match="rank 1 is not rank 0"):
        distributed.launch(check, 2)


def test_a_deadlock_ends_in_a_clear_timeout_and_kills_everything(capsys):
    worker = notebook_function("""
        def worker():
            helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            print("pids", os.getpid(), helper.pid, flush=True)
            if dist.get_rank() == 0:
                buffer = torch.zeros(4)
                dist.recv(buffer, src=1)  # rank 1 never sends
            return "done"
    """, "worker")
    start = time.monotonic()
    with pytest.raises(distributed.LaunchTimeout) as caught:
        distributed.launch(worker, 2, timeout=3)
    elapsed = time.monotonic() - start
    assert 3 <= elapsed < 10
    message = str(caught.value)
    assert "timed out after 3 s: rank(s) 0 had not finished (rank(s) 1 had)" in message
    assert '"<notebook cell>", line 7 in worker' in caught.value.stacks[0], caught.value.stacks
    assert "in recv" in caught.value.stacks[0]
    pids = [int(p) for line in capsys.readouterr().out.splitlines() if "pids" in line
            for p in line.split()[-2:]]
    assert len(pids) == 4, "each rank printed its pid and its helper's pid"
    assert wait_gone(pids) == [], "no rank, and nothing a rank started, may outlive the launch"


def test_a_rank_that_dies_without_returning_is_reported():
    def dies():
        if dist.get_rank() == 1:
            os._exit(7)
        dist.barrier()
    with pytest.raises(distributed.RankError, match="rank 1 exited with code 7 before returning"):
        distributed.launch(dies, 2, timeout=30)

    def killed():
        os.kill(os.getpid(), signal.SIGKILL)
    with pytest.raises(distributed.RankError, match="killed by signal SIGKILL"):
        distributed.launch(killed, 1, timeout=30)


def test_a_result_that_cannot_travel_back_is_explained():
    def unpicklable():
        return threading.Lock()
    with pytest.raises(distributed.RankError, match="cannot be sent back"):
        distributed.launch(unpicklable, 2)


def test_printing_is_relayed_with_the_rank_prefix_and_nothing_reaches_stderr(capfd):
    def talk():
        print(f"hello from {dist.get_rank()}")
        os.write(1, b"written by C code\n")
        print("no newline at the end", end="")
        x = torch.arange(4.0)
        out = torch.empty(2)
        distributed.reduce_scatter_single(out, x)
        full = torch.empty(4)
        distributed.all_gather_single(full, out)
        dist.barrier()
        return full.tolist()

    assert distributed.launch(talk, 2) == [[0.0, 2.0, 4.0, 6.0]] * 2
    out, err = capfd.readouterr()
    lines = out.splitlines()
    for rank in (0, 1):
        assert f"[rank {rank}] hello from {rank}" in lines
        assert f"[rank {rank}] written by C code" in lines
        assert f"[rank {rank}] no newline at the end" in lines
    assert err == "", f"nbgrader scores a cell 0 when anything reaches stderr: {err!r}"


def test_rank_stderr_is_shown_on_stderr_but_on_stdout_while_grading(capfd, monkeypatch):
    def warn():
        print("careful", file=sys.stderr)

    distributed.launch(warn, 1)
    out, err = capfd.readouterr()
    assert "[rank 0] careful" in err and "careful" not in out
    monkeypatch.setenv("NBGRADER_EXECUTION", "autograde")
    distributed.launch(warn, 1)
    out, err = capfd.readouterr()
    assert "[rank 0] careful" in out and err == ""


def test_many_launches_in_one_process_never_collide():
    for i in range(15):
        results = distributed.launch(allreduce_worker, 2 + i % 3)
        assert results[0]["sum"][0] == sum(range(1, 3 + i % 3))


def test_notebooks_side_by_side_never_collide(tmp_path):
    script = tmp_path / "many.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        from utils import distributed
        from torchrun_worker import allreduce_worker
        for i in range(5):
            assert distributed.launch(allreduce_worker, 3)[2]["sum"] == [6.0] * 3
        print("ok")
    """))
    runs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0 and out.strip() == "ok", err


def test_ranks_exit_when_the_kernel_dies(tmp_path):
    script = tmp_path / "kernel.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from utils import distributed
        def worker():
            print("pid", os.getpid(), flush=True)
            time.sleep(120)
        distributed.launch(worker, 2, timeout=300)
    """))
    kernel = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = []
    while len(pids) < 2:
        line = kernel.stdout.readline()
        assert line, "the script ended early"
        if "pid" in line:
            pids.append(int(line.split()[-1]))
    kernel.kill()
    kernel.wait()
    assert wait_gone(pids) == [], "ranks must not outlive the notebook's kernel"


def test_an_interrupted_cell_stops_the_ranks(capsys):
    def sleeper():
        print("pid", os.getpid(), flush=True)
        time.sleep(60)

    # Ctrl-C in JupyterLab is a SIGINT to the kernel's main thread, handled by Python's default handler.
    # Aimed at the main thread (a process-wide signal may land on any of torch's threads) and with the
    # default handler in place whatever an earlier test left (once, in a full suite run, it never arrived).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    main = threading.main_thread().ident
    timer = threading.Timer(1.5, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            distributed.launch(sleeper, 2, timeout=60)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    pids = [int(line.split()[-1]) for line in capsys.readouterr().out.splitlines() if " pid " in line]
    assert len(pids) == 2 and wait_gone(pids) == []


def test_launch_refuses_clear_misuses(tmp_path):
    with pytest.raises(ValueError, match="positive integer"):
        distributed.launch(rank_and_args, 0)
    with pytest.raises(TypeError):
        distributed.launch("not a function", 2)

    def nested():
        distributed.launch(rank_and_args, 2, 1)
    with pytest.raises(distributed.RankError, match="inside a rank"):
        distributed.launch(nested, 1)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="already belongs to a process group"):
            distributed.launch(rank_and_args, 2, 1)
    finally:
        dist.destroy_process_group()


def test_the_backend_is_nccl_only_with_a_gpu_per_rank(monkeypatch):
    monkeypatch.delenv("COURSE_DEVICE", raising=False)
    assert distributed.choose_backend(2)[0] == ("nccl" if torch.cuda.device_count() >= 2
                                                and dist.is_nccl_available() else "gloo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    assert distributed.choose_backend(4) == ("nccl", "spawn")
    assert distributed.choose_backend(8)[0] == "gloo"
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert distributed.choose_backend(2)[0] == "gloo"
    with pytest.raises(ValueError, match="must be spawned"):
        distributed.launch(rank_and_args, 2, 1, backend="nccl", start_method="fork")


def test_device_is_the_cpu_under_gloo():
    assert distributed.launch(lambda: str(distributed.device()), 2) == ["cpu", "cpu"]
    assert distributed.device() == torch.device("cpu")


def test_the_same_worker_runs_under_torchrun(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    result = distributed.run_with_torchrun(ROOT / "tests" / "torchrun_worker.py", nproc_per_node=2)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS "))
    results = json.loads(line.removeprefix("RESULTS "))
    assert results == [json.loads(json.dumps(r)) for r in distributed.launch(allreduce_worker, 2, 2.0)]


def test_run_under_torchrun_explains_how_to_start_it(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node"):
        distributed.run_under_torchrun(rank_and_args, 1)

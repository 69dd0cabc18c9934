"""The trainer under attack and faults: checkpoints never run code, resume refuses what does not
match, one run per folder, bad checkpoints and disk faults give one-line errors (exit status 2)
and leave the previous checkpoint, a kill -9 at any moment (mid-write included) resumes to the
uninterrupted run's numbers, every TrainConfig field is checked, and a torn runs.csv row of
``sweep`` is dropped and rerun."""

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from wgan_kernels.cli import main
from wgan_kernels.train import TrainConfig, Trainer, train
from wgan_kernels.train import checkpoint as ckpt_io
from wgan_kernels.train.checkpoint import CheckpointError, RunFolderError

TINY = dict(steps=4, n_critic=2, hidden=8, eval_every=2, eval_samples=64, batch_size=16, checkpoint_every=2,
            progress=False)


def params(trainer):
    return [p.detach().clone() for p in list(trainer.G.parameters()) + list(trainer.D.parameters())]


def run(tmp_path, name="run", **kw):
    return train(TrainConfig(out=str(tmp_path / name), **dict(TINY, **kw)))


def _cli(capsys, *argv):
    rc = main(["train", *argv, "--quiet"])
    captured = capsys.readouterr()
    return rc, captured.err


def _one_line(err: str) -> str:
    lines = [s for s in err.splitlines() if s.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- 1. no code execution


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_checkpoint_does_not_run_code(tmp_path, capsys):
    out = tmp_path / "run"
    trainer = run(tmp_path)["trainer"]
    marker = tmp_path / "pwned"
    genuine = trainer.state()
    # (a) the old attack: an object hidden in config.extra of a plain torch.save'd state
    evil = dict(genuine, config=dict(genuine["config"], extra={"x": _Payload(str(marker))}))
    torch.save(evil, out / "checkpoint.pt")
    rc, err = _cli(capsys, "--out", str(out), "--resume", "--steps", "6")
    assert rc == 2 and "refused" in _one_line(err) and not marker.exists()
    # (b) the same inside our format (a valid-looking header and checksum field)
    payload = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "sha256": "0" * 64,
               "state": dict(genuine, history=[_Payload(str(marker))])}
    torch.save(payload, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="refused"):
        train(TrainConfig(out=str(out), **dict(TINY, steps=6)), resume=True)
    assert not marker.exists()


def test_a_genuine_checkpoint_loads_with_weights_only(tmp_path):
    run(tmp_path)
    payload = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert payload["format"] == ckpt_io.FORMAT and payload["version"] == ckpt_io.VERSION
    assert payload["sha256"] == ckpt_io.digest(payload["state"])
    with pytest.raises(ValueError, match="extra: expected plain JSON data"):  # so it always loads weights_only
        train(TrainConfig(**dict(TINY, extra={"x": object()})))


# ----------------------------------------------------------------------------- 2. resume compares settings


def test_resume_refuses_settings_that_change_the_training(tmp_path, capsys):
    out = str(tmp_path / "run")
    run(tmp_path, loss="wgan-gp")
    before = (tmp_path / "run" / "metrics.json").read_text()
    for extra, fields in ((["--loss", "wgan-div"], ("loss", "betas", "penalty_weight", "sampling")),
                          (["--lr", "1e6"], ("lr",)), (["--hidden", "16"], ("hidden",)),
                          (["--backend", "eager"], ("backend",)), (["--seed", "3"], ("seed",))):
        rc, err = _cli(capsys, "--out", out, "--resume", "--steps", "6", *extra)
        line = _one_line(err)
        assert rc == 2 and "other settings" in line, line
        for f in fields:
            assert f"{f} " in line, (f, line)
        assert "may change only steps, eval_every, checkpoint_every" in line
    # nothing was trained or recorded by the refused runs
    assert (tmp_path / "run" / "metrics.json").read_text() == before
    # the API compares the resolved settings too: batch_size None resolved to 16 is not 32
    with pytest.raises(CheckpointError, match="batch_size 16 in the checkpoint, 32 now"):
        train(TrainConfig(out=out, **dict(TINY, loss="wgan-gp", steps=6, batch_size=32)), resume=True)
    with pytest.raises(CheckpointError, match="past steps=3"):
        train(TrainConfig(out=out, **dict(TINY, loss="wgan-gp", steps=3)), resume=True)


def test_cli_resume_takes_the_checkpoints_settings_and_continues_exactly(tmp_path, capsys):
    common = dict(loss="wgan-gp", hidden=8, n_critic=2, batch_size=16, eval_every=2, checkpoint_every=2,
                  progress=False)
    whole = train(TrainConfig(steps=6, **common))["trainer"]
    out = str(tmp_path / "split")
    assert main(["train", "--loss", "wgan-gp", "--hidden", "8", "--n-critic", "2", "--batch-size", "16",
                 "--eval-every", "2", "--checkpoint-every", "2", "--steps", "4", "--out", out, "--quiet"]) == 0
    # only what changes is restated; the rest (loss, hidden, batch size, ...) is the checkpoint's
    assert main(["train", "--out", out, "--resume", "--steps", "6", "--eval-every", "3", "--quiet"]) == 0
    assert "wgan-gp/fused" in capsys.readouterr().out
    resumed = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert resumed["steps"] == 6 and resumed["config"]["loss"] == "wgan-gp"
    assert resumed["config"]["eval_every"] == 3  # a resumable setting did change
    state = ckpt_io.load(tmp_path / "split" / "checkpoint.pt")
    for name, module in (("G", whole.G), ("D", whole.D)):
        for key, value in module.state_dict().items():
            assert torch.equal(state[name][key], value), (name, key)


# ----------------------------------------------------------------------------- 3. one run per folder

_HOLDER = textwrap.dedent("""
    import sys
    from wgan_kernels.train import TrainConfig, train
    cfg = dict(steps=100000, n_critic=1, hidden=8, eval_every=100000, eval_samples=64, batch_size=16,
               checkpoint_every=100000, progress=False)
    train(TrainConfig(out=sys.argv[1], **cfg))
""")


def _wait_for(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_two_runs_into_one_folder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)])
    try:
        lock = out / "run.lock"
        _wait_for(lambda: lock.exists() and lock.read_text().strip() == str(holder.pid))
        with pytest.raises(RunFolderError, match=f"in use by another run \\(pid {holder.pid}\\)"):
            run(tmp_path)
        rc, err = _cli(capsys, "--steps", "2", "--out", str(out))
        assert rc == 2 and f"pid {holder.pid}" in _one_line(err)
        assert not (out / "checkpoint.pt").exists()  # the refused runs wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the dead run's lock is taken over, and its pid replaced by ours
    trainer = run(tmp_path)["trainer"]
    assert trainer.step == TINY["steps"] and (out / "run.lock").read_text().strip() == str(os.getpid())


def test_the_lock_is_held_for_the_run_and_released(tmp_path):
    trainer = Trainer(TrainConfig(out=str(tmp_path / "run"), **TINY))
    trainer.acquire_folder()
    try:
        with pytest.raises(RunFolderError, match="in use"):  # a second run in this very process
            Trainer(TrainConfig(out=str(tmp_path / "run"), **TINY)).fit()
        trainer.fit()  # nested: the holder itself runs
    finally:
        trainer.release_folder()
    run(tmp_path)  # released


# ----------------------------------------------------------------------------- 4. bad checkpoints


def _bad_checkpoints(good: bytes, state: dict):
    def saved(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    other = Trainer(TrainConfig(**dict(TINY, hidden=12))).state()
    other["settings"] = state["settings"]  # the settings claim this run, the tensors are another size
    wrong_size = {"format": ckpt_io.FORMAT, "version": 1, "sha256": ckpt_io.digest(other), "state": other}
    missing = {k: v for k, v in state.items() if k != "opt_d"}
    yield "truncated", good[: len(good) // 2], "not a readable checkpoint"
    yield "empty", b"", "not a readable checkpoint"
    yield "random bytes", bytes(random.Random(0).getrandbits(8) for _ in range(4096)), "not a readable checkpoint"
    yield "not a dict", saved([1, 2, 3]), "not a wgan_kernels training checkpoint"
    yield "plain state", saved(state), "not a wgan_kernels training checkpoint"
    yield "future version", saved({"format": ckpt_io.FORMAT, "version": 99, "sha256": "", "state": {}}), "version 99"
    yield "missing key", saved({"format": ckpt_io.FORMAT, "version": 1, "sha256": ckpt_io.digest(missing),
                                "state": missing}), "missing opt_d"
    yield "another model size", saved(wrong_size), "does not fit this run's models"


def test_bad_checkpoints_are_one_line_errors(tmp_path, capsys):
    out = tmp_path / "run"
    run(tmp_path)
    good = (out / "checkpoint.pt").read_bytes()
    state = ckpt_io.load(out / "checkpoint.pt")
    for name, data, message in _bad_checkpoints(good, state):
        (out / "checkpoint.pt").write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            train(TrainConfig(out=str(out), **dict(TINY, steps=6)), resume=True)
        rc, err = _cli(capsys, "--out", str(out), "--resume", "--steps", "6", "--hidden", "8", "--batch-size", "16",
                       "--n-critic", "2")
        line = _one_line(err)
        assert rc == 2 and "checkpoint.pt" in line and message in line, (name, line)


def test_overwritten_bytes_never_load_silently(tmp_path):
    """8 bytes overwritten anywhere: refused, or (zip padding, unused header bytes) the very same
    contents as saved; never a changed state called a good checkpoint."""
    out = tmp_path / "run"
    run(tmp_path)
    path = out / "checkpoint.pt"
    good = path.read_bytes()
    truth = ckpt_io.digest(ckpt_io.load(path))
    rng = random.Random(1)
    offsets = sorted(rng.sample(range(len(good) - 8), 150))
    refused = 0
    for off in offsets:
        data = bytearray(good)
        data[off:off + 8] = bytes(rng.getrandbits(8) for _ in range(8))
        path.write_bytes(bytes(data))
        try:
            state = ckpt_io.load(path)
        except CheckpointError:
            refused += 1
            continue
        assert ckpt_io.digest(state) == truth, f"offset {off}: a modified state was accepted"
    assert refused > len(offsets) // 2


# ----------------------------------------------------------------------------- 5. disk faults


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(tmp_path)
    before = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f):  # writes part of the file, then the device is full
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[:1000])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_io.torch, "save", full_disk)
    trainer = Trainer(TrainConfig(out=str(out), **dict(TINY, steps=6)))
    trainer.load_checkpoint(out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        trainer.fit()
    assert (out / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []


_FSIZE = textwrap.dedent("""
    import resource, signal, sys
    from wgan_kernels.cli import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.exit(main(["train", "--out", sys.argv[2], "--resume", "--steps", "6", "--quiet"]))
""")


def test_a_real_write_failure_exits_2_and_keeps_the_checkpoint(tmp_path):
    """The OS refuses the write (RLIMIT_FSIZE below the checkpoint's size: what a full disk does
    to a file being written)."""
    out = tmp_path / "run"
    run(tmp_path)
    before = (out / "checkpoint.pt").read_bytes()
    p = subprocess.run([sys.executable, "-c", _FSIZE, str(len(before) // 2), str(out)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    line = _one_line(p.stderr)
    assert "out: writing" in line and "previous checkpoint is intact" in line, line
    assert (out / "checkpoint.pt").read_bytes() == before
    assert [q.name for q in out.iterdir() if q.name.endswith(".tmp")] == []


def test_a_full_disk_is_refused_before_training(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt_io.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    trainer = Trainer(TrainConfig(out=str(tmp_path / "run"), **TINY))
    with pytest.raises(RunFolderError, match="MiB free, a checkpoint needs about"):
        trainer.fit()
    assert trainer.step == 0 and not (tmp_path / "run" / "checkpoint.pt").exists()
    assert shutil  # the real module is untouched outside this test


def _make_read_only(folder):
    """A folder nobody can write to, root included: chattr +i (root ignores permission bits)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_read_only_folder_is_refused_at_start(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    undo = _make_read_only(out)
    try:
        start = time.perf_counter()
        rc, err = _cli(capsys, "--steps", "1000", "--out", str(out))
        assert rc == 2 and "out: cannot write to" in _one_line(err)
        assert time.perf_counter() - start < 30  # refused before 1000 steps of training
    finally:
        undo()
    (tmp_path / "file").write_text("x")
    rc, err = _cli(capsys, "--steps", "2", "--out", str(tmp_path / "file"))
    assert rc == 2 and "is a file, not a folder" in _one_line(err)


# ----------------------------------------------------------------------------- kill -9

_KILLED_MID_WRITE = textwrap.dedent("""
    import io, json, os, signal, sys, torch
    from wgan_kernels.train import TrainConfig, train
    real_save, calls = torch.save, []
    def save(obj, f):
        calls.append(1)
        if len(calls) == int(sys.argv[2]):  # half of the file written, then kill -9
            buf = io.BytesIO(); real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(obj, f)
    torch.save = save
    train(TrainConfig(**json.loads(sys.argv[1])))
""")


def _same_run(a, b):
    assert a.step == b.step
    assert all(torch.equal(x, y) for x, y in zip(params(a), params(b)))
    assert a.history == b.history and a.evals == b.evals


def test_kill_9_mid_checkpoint_write_then_resume_equals_the_uninterrupted_run(tmp_path):
    cfg = dict(TINY, steps=6, checkpoint_every=1, loss="wgan-div")
    whole = run(tmp_path, "whole", **cfg)["trainer"]
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_MID_WRITE, json.dumps(dict(cfg, out=str(out))), "3"])
    assert child.wait(timeout=300) == -signal.SIGKILL
    # the half-written file is the dead process's own temporary; checkpoint.pt is the last complete one
    assert [q.name for q in out.iterdir() if q.name.endswith(".tmp")] == [f".checkpoint.pt.{child.pid}.tmp"]
    assert ckpt_io.load(out / "checkpoint.pt")["step"] == 2
    resumed = train(TrainConfig(out=str(out), **cfg), resume=True)["trainer"]  # the dead run's lock taken over
    _same_run(resumed, whole)
    assert [q.name for q in out.iterdir() if q.name.endswith(".tmp")] == []  # cleaned by the next owner


_CHILD = textwrap.dedent("""
    import json, sys
    from wgan_kernels.train import TrainConfig, train
    train(TrainConfig(**json.loads(sys.argv[1])), resume=sys.argv[2] == "resume")
""")


def test_kill_9_at_random_moments_then_resume_equals_the_uninterrupted_run(tmp_path):
    cfg = dict(TINY, steps=30, checkpoint_every=1, eval_every=10, loss="wgan-gp")
    whole = run(tmp_path, "whole", **cfg)["trainer"]
    out = tmp_path / "killed"
    rng = random.Random(2)
    kills = 0
    for attempt in range(3):
        mode = "resume" if (out / "checkpoint.pt").exists() else "new"
        child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(dict(cfg, out=str(out))), mode])
        start_step = ckpt_io.load(out / "checkpoint.pt")["step"] if mode == "resume" else -1

        def progressed():
            try:
                return ckpt_io.load(out / "checkpoint.pt")["step"] > start_step
            except CheckpointError:
                return False

        _wait_for(lambda: progressed() or child.poll() is not None)
        time.sleep(rng.uniform(0.0, 0.3))  # anywhere: a step, an evaluation, a checkpoint write
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            kills += 1
        child.wait()
    assert kills >= 1
    resumed = train(TrainConfig(out=str(out), **cfg), resume=True)["trainer"]
    _same_run(resumed, whole)


# ----------------------------------------------------------------------------- 7. TrainConfig


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 0, "batch_size: expected an int >= 1"), ("batch_size", 2.5, "batch_size: expected an int >= 1"),
    ("z_dim", 0, "z_dim: expected an int >= 1"), ("penalty_weight", "10", "penalty_weight: expected a finite"),
    ("clip_value", 0.0, "clip_value: expected a finite number > 0"),
    ("clip_value", -0.01, "clip_value: expected a finite number > 0"), ("lr", 0.0, "lr: expected a finite number > 0"),
    ("lr", float("nan"), "lr:"), ("seed", -1, "seed: expected an int in"), ("seed", True, "seed:"),
    ("device", "tpu", "device: expected 'cpu', 'cuda'"), ("device", 3.5, "device:"), ("out", 7, "out:"),
    ("progress", "yes", "progress: expected a bool"), ("extra", [], "extra:"), ("dataset", 5, "dataset:"),
    ("eval_samples", 0, "eval_samples:"), ("log_every", None, "log_every:"), ("hidden", 1.0, "hidden:"),
])
@pytest.mark.parametrize("backend", ["fused", "eager"])
def test_every_train_config_field_is_checked_alike_on_both_backends(field, value, message, backend):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Trainer(TrainConfig(**dict(TINY, loss="wgan", backend=backend, **{field: value})))


def test_no_silent_substitution_and_the_cli_names_the_field(capsys):
    t = Trainer(TrainConfig(**dict(TINY, batch_size=None, z_dim=None)))
    assert (t.batch, t.z_dim) == (256, 2)  # None means the default; 0 is refused (above)
    for argv, name in ((["--batch-size", "0"], "batch_size"), (["--steps", "0"], "steps"),
                       (["--lr", "-1"], "lr"), (["--hidden", "0"], "hidden")):
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and _one_line(err).startswith(f"wgan-kernels train: {name}:"), err
    if not torch.cuda.is_available():
        rc, err = _cli(capsys, "--device", "cuda", "--steps", "1")
        assert rc == 2 and "device: 'cuda' requested, but torch sees no CUDA device" in _one_line(err)
    rc, err = _cli(capsys, "--resume", "--steps", "1")
    assert rc == 2 and "--resume needs the --out folder" in _one_line(err)


# ----------------------------------------------------------------------------- 10. sweep


def test_a_torn_runs_csv_row_is_dropped_with_a_warning_and_rerun(tmp_path):
    from wgan_kernels.train.sweep import read_runs, sweep

    kw = dict(seeds=1, steps=2, workers=1, eval_every=1, eval_samples=64, hidden=16, progress=False, grid="kp",
              dataset="8gaussians", k=(2.0,), p=(2.0, 6.0), out=str(tmp_path))
    sweep(**kw)
    path = tmp_path / "runs.csv"
    lines = path.read_text().splitlines(keepends=True)
    cell = [next(csv.DictReader([lines[0], line]))["cell"] for line in lines[1:]]
    path.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # killed while appending
    with pytest.warns(RuntimeWarning, match="torn"):
        assert [r["cell"] for r in read_runs(path)] == [cell[0]]
    with pytest.warns(RuntimeWarning, match="torn"):
        report = sweep(**kw)
    assert report["ran"] == 1 and report["rows"][-1]["cell"] == cell[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = read_runs(path)  # repaired: no warning any more
    assert sorted(r["cell"] for r in rows) == sorted(cell)
    # a malformed middle row (a seed that is not a number) is dropped and rerun the same way
    lines = path.read_text().splitlines(keepends=True)
    row = next(csv.DictReader([lines[0], lines[1]]))
    row["seed"] = "seven"
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=list(row)).writerow(row)
    path.write_text(lines[0] + buf.getvalue().replace("\r\n", "\n") + "".join(lines[2:]))
    with pytest.warns(RuntimeWarning, match="line 2"):
        assert sweep(**kw)["ran"] == 1
    assert sorted(r["cell"] for r in read_runs(path)) == sorted(cell)

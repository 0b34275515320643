"""Fault injection: concurrent writers, deleted and corrupted files, full disks, killed workers,
bad params and changed settings on resume. Each test asserts the exit code and the message, and
that no partial or corrupt output is left, or that a re-run recovers bit-identically."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import yaml
import zarr
from difftori.base_policies import load_policy
from difftori.base_policies.checkpoint import CheckpointError
from difftori.datasets.episode_store import EpisodeStore, StoreError
from difftori.datasets.safeio import OutputLock, lock_holder
from difftori.eval import evaluate as evaluate_module
from difftori.eval.results import EvalResult
from difftori.eval.workers import run_in_workers
from difftori.pipeline import train_base as train_base_module
from difftori.pipeline.cli import main
from fault_helpers import FaultyEpisodes, expected_record
from store_helpers import TINY_CONFIGS, small_episode, small_meta, write_policy_store

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TRAIN = {"max_steps": 12, "batch_size": 16, "lr": 1e-3, "val_every_steps": 3, "num_threads": 1}


@pytest.fixture(autouse=True)
def _scratch_cwd(tmp_path_factory, monkeypatch):
    """CLI defaults (e.g. evaluate's results/videos/...) land in a scratch folder, not the repo."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "difftori.pipeline.cli", *args], capture_output=True, text=True, **kw
    )


def leftovers(folder: Path) -> list[str]:
    """Partial, temporary, old and lock files anywhere under ``folder``."""
    marks = (".partial", ".tmp", ".old", ".lock", ".work")
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if any(m in p.name for m in marks))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_policy_store(tmp_path_factory.mktemp("faults") / "toy.zarr", episodes=4, length=16)


def write_params(path: Path, **train) -> Path:
    params = {"train_base": TRAIN | train, "policies": {"pointnet_bc": TINY_CONFIGS["pointnet_bc"]}}
    path.write_text(yaml.safe_dump(params))
    return path


def train_args(store, params: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train-base",
        *("--task", "toy", "--policy", "pointnet_bc", "--params", str(params)),
        *("--demos", str(store.path), "--out", str(out), "--no-progress", *extra),
    ]


def weights_bytes(ckpt: Path) -> tuple[bytes, bytes]:
    return (ckpt / "model.safetensors").read_bytes(), (ckpt / "ema.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """An uninterrupted tiny training run: the weights every recovered run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    assert main(train_args(store, write_params(root / "params.yaml"), root / "m")) == 0
    return root / "m"


class Interrupted(RuntimeError):
    pass


class StopAt(L.Callback):
    """Crash the run after ``step`` optimiser steps (after the epoch-end checkpoint before it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            raise Interrupted(f"interrupted at step {trainer.global_step}")


def interrupt_at(monkeypatch, step: int) -> None:
    fit = train_base_module.fit

    def fit_then_crash(*args, callbacks=None, **kw):
        return fit(*args, callbacks=[*(callbacks or []), StopAt(step)], **kw)

    monkeypatch.setattr(train_base_module, "fit", fit_then_crash)


# -- 1. exclusive writers ---------------------------------------------------------------------------
WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from difftori.datasets.episode_store import EpisodeStore
    from store_helpers import small_episode, small_meta

    rng = np.random.default_rng(int(sys.argv[2]))
    with EpisodeStore.create(sys.argv[1], small_meta(), wait=sys.argv[3] == "wait") as w:
        for seed in range(4):
            w.add_episode(small_episode(rng, 5), seed=seed)
            time.sleep(0.3)
    """
)


def start_writer(path: Path, seed: int, wait: bool = False) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(TESTS)}
    cmd = [sys.executable, "-c", WRITER, str(path), str(seed), "wait" if wait else "fail"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_concurrent_writers_one_fails_naming_the_holder(tmp_path):
    """The issue's trial: two writers of one store started together. One writes it, the other
    fails at once naming the first; the store holds 4 episodes with 4 distinct seeds."""
    out = tmp_path / "d.zarr"
    procs = [start_writer(out, seed) for seed in (1, 2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 1], results
    loser = next(err for rc, err in results if rc == 1)
    assert "LockedError" in loser and f"{out}: being written by pid" in loser, loser
    store = EpisodeStore(out)
    store.verify()
    assert store.n_episodes == 4 and store.meta.episode_seeds == [0, 1, 2, 3]
    assert leftovers(tmp_path) == []


def test_second_writer_waits_with_wait(tmp_path):
    out = tmp_path / "d.zarr"
    with OutputLock(out):
        waiting = start_writer(out, 1, wait=True)
        time.sleep(3)
        assert waiting.poll() is None and not out.exists()  # queued behind the lock
    assert waiting.wait(timeout=120) == 0, waiting.stderr.read()
    assert EpisodeStore(out).n_episodes == 4
    assert leftovers(tmp_path) == []


def test_holder_read_in_the_instant_before_it_is_recorded(tmp_path):
    """CI once saw the loser read the lock file in the microseconds between the winner's flock and
    its record: the reader waits briefly for the record instead of saying "another process"."""
    lock = tmp_path / "d.zarr.lock"
    lock.write_text("")
    record = {"pid": 4242, "host": "h", "command": "demos", "since": "now"}
    writer = threading.Timer(0.2, lambda: lock.write_text(json.dumps(record)))
    writer.start()
    try:
        assert lock_holder(lock).startswith("pid 4242 on h")
    finally:
        writer.join()
    lock.write_text("")
    assert lock_holder(lock, patience_s=0.1) == "another process"


def test_locked_demo_store_fails_at_once_through_the_cli(tmp_path):
    out = tmp_path / "d.zarr"
    with OutputLock(out):
        r = run_cli("demos", "--suite", "metaworld", "--task", "reach", "--episodes", "1", "--out", str(out))
    assert r.returncode == 1
    assert f"{out}: being written by pid {os.getpid()}" in r.stderr and "--wait" in r.stderr
    assert r.stderr.count("\n") == 1  # one clear line, no traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- 2. integrity ---------------------------------------------------------------------------------
def fresh_store(tmp_path: Path) -> EpisodeStore:
    return write_policy_store(tmp_path / "toy.zarr", episodes=3, length=16)


def test_deleted_chunk_is_an_error_everywhere(tmp_path, caplog):
    """The issue's trial: ``rm data/action/0.0`` left a store that trained on zeros."""
    store = fresh_store(tmp_path)
    (store.path / "data" / "action" / "0.0").unlink()
    with pytest.raises(StoreError, match=r"toy.zarr: data/action: chunk file 0.0 is missing"):
        EpisodeStore(store.path)
    r = run_cli("check", str(store.path))
    assert r.returncode == 1 and "data/action: chunk file 0.0 is missing" in r.stderr
    out = tmp_path / "m"
    assert main(train_args(store, write_params(tmp_path / "p.yaml"), out)) == 1
    assert "data/action: chunk file 0.0 is missing" in caplog.text
    assert not out.exists() and leftovers(tmp_path) == []


def test_modified_data_fails_the_checksum_before_training(tmp_path, caplog):
    store = fresh_store(tmp_path)
    assert run_cli("check", str(store.path)).returncode == 0
    action = zarr.open_array(str(store.path / "data" / "action"), mode="r+")
    action[5] = -action[5]  # a silent change: every chunk still present and finite
    r = run_cli("check", str(store.path))
    assert r.returncode == 1 and "data/action: checksum mismatch" in r.stderr
    out = tmp_path / "m"
    assert main(train_args(store, write_params(tmp_path / "p.yaml"), out)) == 1
    assert "data/action: checksum mismatch" in caplog.text
    assert not out.exists() and leftovers(tmp_path) == []


def test_more_episodes_than_seeds_is_refused(tmp_path):
    store = fresh_store(tmp_path)
    root = zarr.open_group(str(store.path), mode="r+")
    attrs = root.attrs["difftori"]
    root.attrs["difftori"] = attrs | {"episode_seeds": attrs["episode_seeds"][:2]}
    with pytest.raises(StoreError, match=r"episode_seeds: 2 seeds recorded for 3 episodes"):
        EpisodeStore(store.path)


@pytest.fixture
def checkpoint(reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference, ckpt)
    return ckpt


def test_truncated_raw_weights_are_noticed_when_loading_ema(checkpoint):
    f = checkpoint / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: sha256 \w+\.\.\. differs"):
        load_policy(checkpoint)  # EMA weights asked for; the raw file is checked too
    r = run_cli("check", str(checkpoint))
    assert r.returncode == 1 and "model.safetensors: sha256" in r.stderr


def test_deleted_ema_weights_are_an_error_not_a_fallback(checkpoint, store, tmp_path, caplog):
    (checkpoint / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match="ema.safetensors: missing, though config.json records it"):
        load_policy(checkpoint)
    out, params = tmp_path / "eval.json", tmp_path / "p.yaml"
    params.write_text("{}")
    args = [
        "--task",
        "toy",
        "--policy",
        "pointnet_bc",
        "--demos",
        str(store.path),
        "--model",
        str(checkpoint),
    ]
    assert main(["evaluate", *args, "--out", str(out), "--params", str(params)]) == 1
    assert "ema.safetensors: missing" in caplog.text
    assert not out.exists() and leftovers(tmp_path) == []


# -- 4. params validated whole --------------------------------------------------------------------
@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p.update(train_bse=p.pop("train_base")), "unknown section 'train_bse'; valid sections:"),
        (
            lambda p: p["policies"].update(dp_3={}),
            "policies.dp_3: unknown base policy 'dp_3'; valid: bc_rnn, diffusion, dp3, pointnet_bc",
        ),
        (lambda p: p["train_base"].update(lr="1e-3"), "train_base: lr: expected float, got str '1e-3'"),
        (
            lambda p: p.update(refiner_configs={"ibc_alone": {"type": "ibcc"}}),
            "refiner_configs.ibc_alone.type: unknown refiner 'ibcc'; valid: difftori, ibc, residual",
        ),
    ],
)
def test_misspelled_params_are_errors(store, tmp_path, caplog, edit, message):
    params = yaml.safe_load(write_params(tmp_path / "p.yaml").read_text())
    edit(params)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    assert main(["check", str(tmp_path / "p.yaml")]) == 1
    assert f"p.yaml: {message}" in caplog.text
    caplog.clear()
    out = tmp_path / "m"
    assert main(train_args(store, tmp_path / "p.yaml", out)) == 1
    assert f"p.yaml: {message}" in caplog.text
    assert not out.exists()
    common = ["--task", "toy", "--policy", "pointnet_bc", "--params", str(tmp_path / "p.yaml")]
    for cmd in (["init-actions"], ["train-refiner", "--refiner", "ibc"], ["evaluate"]):
        caplog.clear()
        assert main([*cmd, *common, "--demos", str(store.path), "--out", str(tmp_path / "x")]) == 1
        assert message in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


def test_shipped_params_files_are_valid_whole(caplog):
    files = ("params.yaml", "params-paper.yaml", "params-robomimic.yaml")
    assert main(["check", *(str(ROOT / f) for f in files)]) == 0
    assert main(["check", str(ROOT / "nope.yaml")]) == 1 and "nope.yaml: params file not found" in caplog.text


# -- 5. checked resume state ----------------------------------------------------------------------
def test_changed_settings_on_resume_are_refused(store, reference, tmp_path, monkeypatch, caplog):
    params, out = write_params(tmp_path / "p.yaml"), tmp_path / "m"
    work = tmp_path / "m.work"
    with monkeypatch.context() as m:
        interrupt_at(m, 7)
        assert main(train_args(store, params, out)) == 1
    assert (work / "ckpt" / "last.ckpt").exists() and not out.exists()
    # another lr, and other demos: refused, naming what changed and the way out
    assert main(train_args(store, write_params(tmp_path / "p2.yaml", lr=1e-2), out)) == 1
    assert "train_config.lr: 0.001 -> 0.01" in caplog.text and "--restart" in caplog.text
    other = write_policy_store(tmp_path / "other.zarr", episodes=4, length=16, seed=1)
    caplog.clear()
    assert main(train_args(other, params, out)) == 1
    assert "data.demos: 'sha256:" in caplog.text and "--restart" in caplog.text
    assert not out.exists() and (work / "ckpt" / "last.ckpt").exists()  # the state is kept
    # the same settings resume, bit-identically to the uninterrupted run
    assert main(train_args(store, params, out)) == 0
    assert json.loads((out / "summary.json").read_text())["resumed"]
    assert weights_bytes(out) == weights_bytes(reference)
    assert not work.exists()


def test_restart_discards_the_interrupted_run(store, tmp_path, monkeypatch):
    params, out = write_params(tmp_path / "p.yaml"), tmp_path / "m"
    with monkeypatch.context() as m:
        interrupt_at(m, 7)
        assert main(train_args(store, params, out)) == 1
    assert main(train_args(store, write_params(tmp_path / "p2.yaml", lr=1e-2), out, "--restart")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["resumed"] and summary["steps"] == 12
    assert load_policy(out).info["train_config"]["lr"] == 1e-2


def test_truncated_last_checkpoint_falls_back_then_errors(store, reference, tmp_path, monkeypatch, caplog):
    params, out = write_params(tmp_path / "p.yaml"), tmp_path / "m"
    ckpt = tmp_path / "m.work" / "ckpt"
    with monkeypatch.context() as m:
        interrupt_at(m, 10)
        assert main(train_args(store, params, out)) == 1
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.ckpt", "last.prev.ckpt"]
    saved = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    # a truncated last.ckpt: resumed from the one before, ending bit-identically
    (ckpt / "last.ckpt").write_bytes(saved["last.ckpt"][:4000])
    assert main(train_args(store, params, out)) == 0
    assert "resuming from the checkpoint before it" in caplog.text
    assert weights_bytes(out) == weights_bytes(reference)
    # both truncated: an error naming the file and the fix; then --restart recovers
    shutil.rmtree(out)
    ckpt.mkdir(parents=True)
    for name, data in saved.items():
        (ckpt / name).write_bytes(data[:4000])
    (tmp_path / "m.work" / "resume.json").write_text(json.dumps({}))  # not reached: checkpoint first
    caplog.clear()
    assert main(train_args(store, params, out)) == 1
    assert f"{ckpt / 'last.ckpt'}: cannot resume from it" in caplog.text and "--restart" in caplog.text
    assert main(train_args(store, params, out, "--restart")) == 0
    assert weights_bytes(out) == weights_bytes(reference)


# -- 6. the smaller ones --------------------------------------------------------------------------
def test_overwrite_refuses_to_replace_a_file(tmp_path, caplog):
    out = tmp_path / "d.zarr"
    out.write_text("not a store")
    assert (
        main(
            [
                "demos",
                "--suite",
                "metaworld",
                "--task",
                "reach",
                "--episodes",
                "1",
                "--out",
                str(out),
                "--overwrite",
            ]
        )
        == 1
    )
    assert "d.zarr: /: exists and is a file, not a store" in caplog.text
    assert out.read_text() == "not a store" and sorted(p.name for p in tmp_path.iterdir()) == ["d.zarr"]


def test_checkpoint_of_another_policy_is_refused(reference, store, tmp_path, caplog):
    (tmp_path / "p.yaml").write_text("{}")
    common = ["--task", "toy", "--demos", str(store.path), "--model", str(reference)]
    common += ["--params", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "x")]
    for cmd in ("evaluate", "init-actions"):
        caplog.clear()
        assert main([cmd, "--policy", "dp3", *common]) == 1
        assert f"{reference}: holds a 'pointnet_bc' base policy, but --policy is 'dp3'" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["p.yaml"]


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A small filesystem at ``path`` to fill up (needs root; otherwise the test is skipped)."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, and mounting one needs root")
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill up: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` until ``leave`` bytes are free."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_full_disk_while_checkpointing_leaves_no_truncated_checkpoint(store, reference, tmp_path, caplog):
    """The issue's trial: a full disk while checkpointing left a truncated last.ckpt that broke
    every later run. Now the error names the file, nothing truncated is left, and a re-run after
    freeing space ends bit-identically."""
    with tmpfs(tmp_path / "disk", "2m") as disk:
        params, out = write_params(tmp_path / "p.yaml"), disk / "m"
        filler = fill(disk, 96 * 1024)  # room for the logs, not for a checkpoint
        assert main(train_args(store, params, out)) == 1
        ckpt = disk / "m.work" / "ckpt"
        assert f"No space left on device: '{ckpt / 'last.ckpt'}'" in caplog.text
        assert not out.exists() and (not ckpt.exists() or list(ckpt.iterdir()) == [])
        filler.unlink()
        assert main(train_args(store, params, out)) == 0
        assert weights_bytes(out) == weights_bytes(reference)
        assert leftovers(disk) == []


def test_store_writes_are_atomic_and_errors_name_the_file_on_a_full_disk(tmp_path, rng):
    with tmpfs(tmp_path / "disk", "256k") as disk:
        out = disk / "s.zarr"
        with pytest.raises(OSError, match=f"No space left on device: '{out}.partial'"):
            with EpisodeStore.create(out, small_meta()) as w:
                for seed in range(100):
                    w.add_episode(small_episode(rng, 64), seed=seed)
        assert not out.exists() and not (disk / "s.zarr.lock").exists()


# -- 3. evaluation that never loses rollouts --------------------------------------------------------
@pytest.mark.parametrize("fault, value", [("FAULT_KILL_START", "1"), ("FAULT_KILL_RUN", "4")])
def test_a_killed_worker_loses_no_episode(tmp_path, monkeypatch, fault, value):
    """The issue's trial: a worker killed while starting (jobs unread in its pipe: a connection
    reset) lost the whole evaluation. Now its episodes are retried once on a fresh worker."""
    monkeypatch.setenv("FAULT_DIR", str(tmp_path))
    monkeypatch.setenv(fault, value)
    seeds = [1, 2, 3, 4, 5, 6]
    records = run_in_workers(
        FaultyEpisodes(None, "", None, None, 3), seeds, 2, 1, progress=False, per_worker=3
    )
    assert [r.status for r in records] == ["ok"] * 6
    for r in records:
        assert {k: v for k, v in r.to_dict().items() if k in expected_record(0, 0)} == expected_record(
            r.episode, seeds[r.episode]
        )
    retried = sorted(r.env_seed for r in records if r.attempts == 2)
    assert retried and set(retried) <= {1, 2, 3, 4, 5, 6} and max(r.attempts for r in records) == 2
    assert (tmp_path / ("killed-start" if fault == "FAULT_KILL_START" else "killed-run-4")).exists()


def eval_args(store, checkpoint, params: Path, out: Path, workers: int = 2) -> list[str]:
    evaluate = {"episodes": 6, "workers": workers, "envs_per_worker": 3}
    params.write_text(yaml.safe_dump({"evaluate": evaluate}))
    return [
        "evaluate",
        *("--task", "toy", "--policy", "pointnet_bc", "--demos", str(store.path), "--model", str(checkpoint)),
        *("--params", str(params), "--out", str(out), "--no-progress"),
    ]


def test_evaluation_with_a_worker_killed_while_starting_writes_every_record(
    store, reference, tmp_path, monkeypatch
):
    monkeypatch.setattr(evaluate_module, "PolicyEpisodes", FaultyEpisodes)
    monkeypatch.setenv("FAULT_DIR", str(tmp_path))
    monkeypatch.setenv("FAULT_KILL_START", "1")
    out = tmp_path / "evals" / "seed0.json"
    assert main(eval_args(store, reference, tmp_path / "p.yaml", out)) == 0
    result = EvalResult.read(out)
    assert [e.status for e in result.episodes] == ["ok"] * 6 and result.config["weights"] == "ema"
    assert leftovers(tmp_path / "evals") == []


RESUMABLE = textwrap.dedent(
    """
    import sys
    import difftori.eval.evaluate as ev
    from difftori.pipeline.cli import main
    from fault_helpers import FaultyEpisodes

    ev.PolicyEpisodes = FaultyEpisodes
    sys.exit(main(sys.argv[1:]))
    """
)


def test_killed_evaluation_resumes_from_its_journal(store, reference, tmp_path, monkeypatch):
    """Kill the evaluating process after two finished episodes; the re-run keeps the journaled
    records as they are, runs only the others, on the same seeds, and gives an uninterrupted run's
    records (the fake episodes' records are a function of their seed)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    out = tmp_path / "evals" / "seed0.json"
    journal = out.with_name("seed0.json.partial.jsonl")
    args = eval_args(store, reference, tmp_path / "p.yaml", out, workers=1)
    env = os.environ | {"PYTHONPATH": str(TESTS), "FAULT_DIR": str(runs), "FAULT_SLOW": "0.4"}
    proc = subprocess.Popen([sys.executable, "-c", RESUMABLE, *args], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (journal.exists() and len(journal.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    lines = journal.read_text().splitlines()
    journaled = [json.loads(line) for line in lines[1:]]
    assert len(journaled) >= 2 and not out.exists()

    monkeypatch.setattr(evaluate_module, "PolicyEpisodes", FaultyEpisodes)
    monkeypatch.setenv("FAULT_DIR", str(runs))
    assert main(args) == 0
    episodes = json.loads(out.read_text())["episodes"]
    for rec in journaled[:2]:  # kept as journaled (wall time included), not run again
        assert episodes[rec["episode"]] == rec
        assert len(list(runs.glob(f"ran-{rec['env_seed']}-*"))) == 1
    seeds = evaluate_module.episode_seeds(100, 6, exclude={0, 1, 2, 3})  # EvalConfig.seed, the demos'
    uninterrupted = [
        expected_record(i, s) | {"status": "ok", "return": 1.0, "attempts": 1} for i, s in enumerate(seeds)
    ]
    assert [{k: e[k] for k in uninterrupted[0]} for e in episodes] == uninterrupted
    assert not journal.exists() and leftovers(tmp_path / "evals") == []


@pytest.mark.parametrize("problem", ["read-only", "full"])
def test_unwritable_results_folder_fails_before_any_rollout(
    store, reference, tmp_path, monkeypatch, caplog, problem
):
    monkeypatch.setattr(evaluate_module, "PolicyEpisodes", FaultyEpisodes)
    monkeypatch.setenv("FAULT_DIR", str(tmp_path))
    with tmpfs(tmp_path / "disk", "1m") as disk:
        if problem == "full":
            fill(disk, 0)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        out = disk / "seed0.json"
        assert main(eval_args(store, reference, tmp_path / "p.yaml", out)) == 1
        reason = "Read-only file system" if problem == "read-only" else "No space left on device"
        assert (
            f"{reason}; the results folder cannot take files, so no episode was run: '{disk}'" in caplog.text
        )
        assert list(tmp_path.glob("ran-*")) == [] and leftovers(disk) == []

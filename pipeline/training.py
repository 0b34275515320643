"""Lightning training of anything with ``compute_loss(batch)`` (base policies, later refiners).

:class:`LitTrainer` adds AdamW with warmup + cosine decay, an EMA of the weights (diffusers
``EMAModel``; validation runs with the EMA weights), and ``module.validation_metrics(batch)``.
:func:`fit` runs a seeded, resumable Lightning fit: its state lives in a work directory
(``ckpt/last.ckpt`` at every epoch end, with the RNG state; batches are shuffled by a function
of (seed, epoch)), so an interrupted run resumed from it ends exactly where an uninterrupted run
ends; metrics go to dvclive (``dvclive/plots/metrics/...``, readable by ``dvc plots``).
Checkpoints are written atomically beside their target (the one before is kept as
``last.prev.ckpt``); a corrupt ``last.ckpt`` falls back to it. ``resume.json`` records a
fingerprint of the run (config, data, code version): a resume with other settings is refused.
Lightning picks the devices: CPU here, GPUs and DDP via ``accelerator``/``devices``/``strategy``/
``num_nodes`` (``batch_size`` is per process). Under DDP every rank runs the stage's code; rank 0
alone prepares the work directory, writes Lightning's checkpoints and the saved model
(:func:`is_secondary_rank`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from difftori.datasets.safeio import atomic_write_text, is_secondary_rank, naming_path
from diffusers.training_utils import EMAModel
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)
RESUME_STATE = "resume.json"


class ResumeError(RuntimeError):
    """The work directory of an interrupted run cannot be resumed with these settings."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and hardware settings (params.yaml sections ``train_base`` / ``train_refiner``)."""

    max_steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-6
    warmup_steps: int = 50
    ema: bool = True
    ema_power: float = 0.75
    val_episodes: int = 1  # whole episodes held out for validation
    val_every_steps: int = 250
    seed: int = 0
    num_threads: int = 0  # torch CPU threads; 0 leaves torch's default
    accelerator: str = "auto"
    devices: Any = "auto"  # per node; e.g. 2 with strategy "ddp": 2 processes (gloo on CPU)
    strategy: str = "auto"
    num_nodes: int = 1  # DDP across nodes (SLURM or torchrun launch the processes)
    precision: str = "32-true"
    # Closed-loop rollouts of the EMA policy during training (0: none), logged as rollout/*.
    rollout_every_steps: int = 0
    rollout_episodes: int = 10
    rollout_seed: int = 7  # validation episode seeds; never the evaluation's (evaluate.seed)

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "val_every_steps", "rollout_episodes", "num_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rollout_every_steps < 0:
            raise ValueError(f"rollout_every_steps must be >= 0, got {self.rollout_every_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


class EpochSampler(torch.utils.data.Sampler[int]):
    """Shuffles with a permutation that depends only on (seed, epoch): resumable without state.

    Lightning calls ``set_epoch`` before each epoch (and wraps it for DDP).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):  # noqa: ANN204
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


class LitTrainer(L.LightningModule):
    """Wraps ``module`` (an ``nn.Module`` with ``compute_loss``) for Lightning, with an EMA."""

    def __init__(self, module: torch.nn.Module, cfg: TrainConfig) -> None:
        super().__init__()
        self.module = module
        self.cfg = cfg
        self.ema = (
            EMAModel(module.parameters(), use_ema_warmup=True, power=cfg.ema_power) if cfg.ema else None
        )

    # -- training -------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.module.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["action"].shape[0])
        if hasattr(self.module, "cholesky_failures"):  # trajectory-optimising refiners
            self.log("train/cholesky_failures", float(self.module.cholesky_failures), batch_size=1)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # The EMA follows each optimiser step at once, so callbacks at the batch's end (rollouts)
        # already see the step's EMA (Lightning runs callbacks' on_train_batch_end first).
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.step(self.module.parameters())

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.module.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        warmup, total = self.cfg.warmup_steps, self.cfg.max_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- validation with the EMA weights -----------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        if self.ema is not None:
            self.ema.store(self.module.parameters())
            self.ema.copy_to(self.module.parameters())

    def on_validation_epoch_end(self) -> None:
        if self.ema is not None:
            self.ema.restore(self.module.parameters())

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # RNG-neutral: how often validation runs never changes the training trajectory.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            metrics = self.module.validation_metrics(batch, seed=batch_idx)
        n = batch["action"].shape[0]
        for name, value in metrics.items():
            self.log(f"val/{name}", value, batch_size=n, prog_bar=name == "action_mse", sync_dist=True)

    # -- EMA state in Lightning's resume checkpoint ----------------------------------------------
    def on_fit_start(self) -> None:
        if self.ema is not None:
            self.ema.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        checkpoint["torch_rng"] = torch.get_rng_state()  # training noise/timesteps continue exactly
        if torch.cuda.is_available():
            checkpoint["cuda_rng"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
        # Applied when training restarts, after Lightning's own setup has run.
        self._rng_to_restore = {k: checkpoint[k] for k in ("torch_rng", "cuda_rng") if k in checkpoint}

    def on_train_epoch_start(self) -> None:
        rng = getattr(self, "_rng_to_restore", None)
        if rng:
            torch.set_rng_state(rng["torch_rng"])
            if "cuda_rng" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda_rng"])
            self._rng_to_restore = None

    def ema_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The module's state dict with EMA parameters (buffers as trained), or None without EMA."""
        if self.ema is None:
            return None
        self.ema.store(self.module.parameters())
        self.ema.copy_to(self.module.parameters())
        state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.ema.restore(self.module.parameters())
        return state


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file beside the target, fsynced and renamed
    (never moved across filesystems); the checkpoint replaced is kept as ``<name>.prev.ckpt``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with naming_path(path), open(tmp, "wb") as f:
                f.write(buf.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            if path.exists():
                os.replace(path, previous_checkpoint(path))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def previous_checkpoint(path: Path) -> Path:
    """Where :class:`AtomicCheckpointIO` keeps the checkpoint that ``path`` replaced."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def code_version(*modules: str) -> str:
    """difftori's version plus a hash of the source of ``modules`` (packages: all their files)."""
    h = hashlib.sha256()
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise ValueError(f"code_version: no module {name!r}")
        where = spec.submodule_search_locations
        files = sorted(Path(where[0]).glob("*.py")) if where else [Path(spec.origin or "")]
        for f in files:
            h.update(f"{name}/{f.name}".encode() + f.read_bytes())
    try:
        version = importlib.metadata.version("difftori")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{version}+{h.hexdigest()[:16]}"


def run_state(
    task: str,
    model: dict[str, Any],
    cfg: TrainConfig,
    split: tuple[list[int], list[int]],
    data: dict[str, str],
    code: tuple[str, ...],
) -> dict[str, Any]:
    """What determines a training run, for :func:`check_resume_state`: the task, the model's name
    and config, the training config (not its thread count), the split, data digests and the
    version of ``code``."""
    train_config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "num_threads"}
    state = {"task": task, **model, "train_config": train_config, "split": list(split), "data": data}
    return state | {"code": code_version(*code)}


def _checkpoint_problem(path: Path) -> str | None:
    """Why a Lightning checkpoint cannot be resumed from, or None if it loads."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, bad pickle, ...
        return f"{type(e).__name__}: {e}"
    missing = {"global_step", "state_dict"} - set(ckpt if isinstance(ckpt, dict) else {})
    return f"no {sorted(missing)} in it" if missing else None


def resume_checkpoint(work_dir: Path) -> Path | None:
    """The checkpoint to resume from: ``last.ckpt``, else (missing or corrupt) the one before it;
    None for a fresh start. Raises :class:`ResumeError` naming the file when neither loads."""
    last = work_dir / "ckpt" / "last.ckpt"
    prev = previous_checkpoint(last)
    if not last.exists() and not prev.exists():
        return None
    problem = _checkpoint_problem(last) if last.exists() else "missing"
    if problem is None:
        return last
    if prev.exists() and _checkpoint_problem(prev) is None:
        log.warning("%s: %s; resuming from the checkpoint before it, %s", last, problem, prev)
        last.unlink(missing_ok=True)  # so that the next save keeps prev as the fallback
        return prev
    raise ResumeError(
        f"{last}: cannot resume from it ({problem}) and there is no earlier good checkpoint; "
        f"rerun with --restart to discard {work_dir} and train from scratch"
    )


def _differences(old: Any, new: Any, key: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{key}.{k}".lstrip("."))]
    return [] if old == new else [f"{key}: {old!r} -> {new!r}"]


def check_resume_state(work_dir: Path, state: dict[str, Any], resuming: bool) -> None:
    """Record ``state`` (what determines the run) in ``work_dir/resume.json`` on a fresh start;
    on a resume, refuse unless it equals the recorded one."""
    state = json.loads(json.dumps(state))
    record = work_dir / RESUME_STATE
    if not resuming:
        atomic_write_text(record, json.dumps(state, indent=2, sort_keys=True))
        return
    fix = "rerun with --restart to discard it and train from scratch, or restore the settings to resume"
    if not record.is_file():
        raise ResumeError(f"{work_dir}: interrupted run with no {RESUME_STATE} to check its settings; {fix}")
    try:
        old = json.loads(record.read_text())
    except ValueError as e:
        raise ResumeError(f"{record}: unreadable ({e}); {fix}") from None
    diffs = _differences(old, state)
    if diffs:
        shown = "; ".join(d if len(d) < 200 else d[:197] + "..." for d in diffs[:5])
        raise ResumeError(f"{work_dir}: the interrupted run was started with other settings ({shown}); {fix}")


def prepare_work_dir(work_dir: Path, state: dict[str, Any] | None, restart: bool) -> Path | None:
    """Create ``work_dir`` (emptied first with ``restart``), check an interrupted run's settings
    against ``state`` and return the checkpoint to resume from (None: a fresh start)."""
    if restart and work_dir.exists():
        log.info("%s: discarding the interrupted run (--restart)", work_dir)
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt = resume_checkpoint(work_dir)
    if state is not None:
        check_resume_state(work_dir, state, resuming=ckpt is not None)
    return ckpt


def fit(
    lit: LitTrainer,
    train: torch.utils.data.Dataset,
    val: torch.utils.data.Dataset | None,
    work_dir: Path,
    progress: bool = True,
    callbacks: list[L.Callback] | None = None,
    state: dict[str, Any] | None = None,
    restart: bool = False,
) -> dict[str, Any]:
    """Train ``lit`` to ``cfg.max_steps``, resuming from ``work_dir/ckpt/last.ckpt`` if present.

    Returns a summary: steps, wall time, peak resident memory, last validation metrics.
    ``callbacks`` are added to Lightning's (e.g. closed-loop rollouts). ``state`` (what determines
    the run: configs, data digest, code version) is recorded in the work directory and must match
    on resume; ``restart`` discards an interrupted run first (see :func:`prepare_work_dir`).
    """
    from dvclive.lightning import DVCLiveLogger

    cfg = lit.cfg
    for name in ("lightning.pytorch", "lightning.fabric"):  # set to INFO by Lightning on import
        logging.getLogger(name).setLevel(logging.WARNING)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # Under DDP every rank runs this; only rank 0 prepares the work directory (and holds the lock).
    ckpt = resume_checkpoint(work_dir) if is_secondary_rank() else prepare_work_dir(work_dir, state, restart)
    resume = ckpt is not None
    if resume:
        log.info("resuming from %s", ckpt)
    loader = torch.utils.data.DataLoader(
        train,
        batch_size=min(cfg.batch_size, len(train)),
        sampler=EpochSampler(len(train), cfg.seed),
        drop_last=len(train) > cfg.batch_size,
        generator=torch.Generator().manual_seed(cfg.seed),  # iterators never touch the global RNG
    )
    val_loader = (
        torch.utils.data.DataLoader(
            val, batch_size=max(cfg.batch_size, 256), generator=torch.Generator().manual_seed(cfg.seed)
        )
        if val
        else None
    )
    logger = DVCLiveLogger(dir=str(work_dir / "dvclive"), save_dvc_exp=False, dvcyaml=False, resume=resume)
    trainer = L.Trainer(
        max_steps=cfg.max_steps,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        precision=cfg.precision,
        plugins=[AtomicCheckpointIO()],
        logger=logger,
        callbacks=[
            ModelCheckpoint(
                dirpath=work_dir / "ckpt", filename="last", every_n_epochs=1, enable_version_counter=False
            ),
            *(callbacks or []),
        ],
        check_val_every_n_epoch=None,
        val_check_interval=cfg.val_every_steps if val_loader else None,
        limit_val_batches=1.0 if val_loader else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        enable_progress_bar=progress,
        enable_model_summary=False,
        deterministic="warn",
        default_root_dir=str(work_dir),
    )
    start = time.perf_counter()
    trainer.fit(lit, loader, val_loader, ckpt_path=str(ckpt) if resume else None)
    if val_loader is not None and cfg.max_steps % cfg.val_every_steps:  # last step not validated yet
        trainer.validate(lit, val_loader, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {
        "steps": int(trainer.global_step),
        "world_size": trainer.world_size,  # processes (DDP); each took batch_size windows a step
        "train_time_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "metrics": metrics,
        "resumed": resume,
    }


def save_trained(
    lit: LitTrainer, work_dir: Path, out: Path, info: dict[str, Any], logs: Path | None = None
) -> bool:
    """Write the trained module's checkpoint (raw + EMA weights), its dvclive metrics and
    ``summary.json`` to ``out``, the training curves (dvclive's ``plots/`` TSVs) to ``logs`` (for
    ``dvc plots``); then drop the resume state in ``work_dir``. A failure (a full disk) keeps
    ``work_dir``, so a rerun resumes at the last step and saves again. False (nothing written) in
    a secondary DDP rank: rank 0 saves."""
    if is_secondary_rank():
        return False
    lit.module.save(out, ema_state=lit.ema_state_dict(), info=info)
    with naming_path(out):
        shutil.copytree(work_dir / "dvclive", out / "dvclive", dirs_exist_ok=True)
        atomic_write_text(out / "summary.json", json.dumps(info["summary"], indent=2))
    if logs is not None:
        with naming_path(logs):
            shutil.rmtree(logs, ignore_errors=True)
            curves = work_dir / "dvclive" / "plots" / "metrics"
            if curves.is_dir():
                shutil.copytree(curves, logs)
            else:  # nothing logged yet (fewer steps than the logging interval, no validation)
                logs.mkdir(parents=True)
    shutil.rmtree(work_dir, ignore_errors=True)
    return True

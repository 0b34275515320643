"""Lightning training of anything with ``compute_loss(batch)`` (base policies, later refiners).

:class:`LitTrainer` adds AdamW with warmup + cosine decay, an EMA of the weights (diffusers
``EMAModel``; validation runs with the EMA weights), and ``module.validation_metrics(batch)``.
:func:`fit` runs a seeded, resumable Lightning fit: its state lives in a work directory
(``ckpt/last.ckpt`` at every epoch end, with the RNG state; batches are shuffled by a function
of (seed, epoch)), so an interrupted run resumed from it ends exactly where an uninterrupted run
ends; metrics go to dvclive (``dvclive/plots/metrics/...``, readable by ``dvc plots``).
Lightning picks the devices: CPU here, GPUs and DDP via ``accelerator``/``devices``/``strategy``.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from diffusers.training_utils import EMAModel
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


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
    devices: Any = "auto"
    strategy: str = "auto"
    precision: str = "32-true"
    # Closed-loop rollouts of the EMA policy during training (0: none), logged as rollout/*.
    rollout_every_steps: int = 0
    rollout_episodes: int = 10
    rollout_seed: int = 7  # validation episode seeds; never the evaluation's (evaluate.seed)

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "val_every_steps", "rollout_episodes"):
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


def fit(
    lit: LitTrainer,
    train: torch.utils.data.Dataset,
    val: torch.utils.data.Dataset | None,
    work_dir: Path,
    progress: bool = True,
    callbacks: list[L.Callback] | None = None,
) -> dict[str, Any]:
    """Train ``lit`` to ``cfg.max_steps``, resuming from ``work_dir/last.ckpt`` if present.

    Returns a summary: steps, wall time, peak resident memory, last validation metrics.
    ``callbacks`` are added to Lightning's (e.g. closed-loop rollouts).
    """
    from dvclive.lightning import DVCLiveLogger

    cfg = lit.cfg
    for name in ("lightning.pytorch", "lightning.fabric"):  # set to INFO by Lightning on import
        logging.getLogger(name).setLevel(logging.WARNING)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    work_dir.mkdir(parents=True, exist_ok=True)
    last = work_dir / "ckpt" / "last.ckpt"
    resume = last.exists()
    if resume:
        log.info("resuming from %s", last)
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
        precision=cfg.precision,
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
    trainer.fit(lit, loader, val_loader, ckpt_path=str(last) if resume else None)
    if val_loader is not None and cfg.max_steps % cfg.val_every_steps:  # last step not validated yet
        trainer.validate(lit, val_loader, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {
        "steps": int(trainer.global_step),
        "train_time_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "metrics": metrics,
        "resumed": resume,
    }


def save_trained(
    lit: LitTrainer, work_dir: Path, out: Path, info: dict[str, Any], logs: Path | None = None
) -> None:
    """Write the trained module's checkpoint (raw + EMA weights), its dvclive metrics and
    ``summary.json`` to ``out``, the training curves (dvclive's ``plots/`` TSVs) to ``logs`` (for
    ``dvc plots``); then drop the resume state in ``work_dir``."""
    lit.module.save(out, ema_state=lit.ema_state_dict(), info=info)
    shutil.copytree(work_dir / "dvclive", out / "dvclive", dirs_exist_ok=True)
    if logs is not None:
        shutil.rmtree(logs, ignore_errors=True)
        shutil.copytree(work_dir / "dvclive" / "plots" / "metrics", logs)
    (out / "summary.json").write_text(json.dumps(info["summary"], indent=2))
    shutil.rmtree(work_dir, ignore_errors=True)

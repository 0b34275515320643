"""The ``difftori`` command line: one subcommand per pipeline (DVC) stage."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from difftori.datasets.safeio import OutputLock
from difftori.pipeline import paths

if TYPE_CHECKING:
    from difftori.datasets.episode_store import EpisodeStore

log = logging.getLogger("difftori")


def _add_wait(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        action="store_true",
        help="if another process is writing the same output, wait for it instead of failing",
    )


def _add_restart(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--restart",
        action="store_true",
        help="discard an interrupted run's state (<out>.work) and train from scratch",
    )


def _check_checkpoint_name(path: Path, kind: str, expected: str, flag: str) -> None:
    """Refuse a checkpoint of another policy/refiner than the one the outputs are filed under."""
    from difftori.base_policies.checkpoint import CheckpointError, read_checkpoint

    name = read_checkpoint(path, kind).name
    if name != expected:
        raise CheckpointError(
            f"{path}: holds a {name!r} {kind.replace('_', ' ')}, but {flag} is {expected!r}; "
            f"its outputs would be filed under {expected!r}"
        )


def _parse_obs(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (VALUE read as YAML: 512, true, [a, b]) as a dict."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--obs {item!r}: expected KEY=VALUE, e.g. --obs n_points=512")
        out[key] = yaml.safe_load(value)
    return out


def _demos(args: argparse.Namespace) -> None:
    from difftori.eval.demos import generate_demos
    from difftori.pipeline.params import demo_config, load_params, section

    params = load_params(args.params) if args.params else {}
    flags = ("suite", "episodes", "seed", "max_attempts", "max_episode_steps", "zarr_format")
    overrides = {k: getattr(args, k) for k in flags if getattr(args, k) is not None}
    if args.obs:
        overrides["obs"] = section(params, "demos", "obs") | _parse_obs(args.obs)
    cfg = demo_config(params, args.task, str(args.params or "command line"), **overrides)
    store = generate_demos(cfg, args.out, overwrite=args.overwrite, resume=not args.no_resume, wait=args.wait)
    log.info(
        "%s: %d episodes (%d tried), %d steps, keys %s",
        store.path,
        store.n_episodes,
        store.meta.n_attempts,
        store.n_steps,
        store.keys,
    )


def _add_demos(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demos",
        help="record scripted-expert demonstrations into a zarr episode store",
        description="Write one task's demonstrations into a zarr episode store, the suite's way: "
        "each suite records its scripted expert its own way (docs/architecture.md, 'Suites'). "
        "Settings come from the params "
        "file's suite and demos sections (if --params is given), then these flags. An interrupted "
        "run resumes from <out>.partial.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--suite", help="simulator suite (default: the params file's suite)")
    p.add_argument("--task", required=True, help="task name, e.g. shelf-place or lift")
    p.add_argument("--params", type=Path, help="params file whose suite and demos sections to use")
    p.add_argument("--episodes", type=int, help="successful episodes to keep (default 10)")
    p.add_argument("--seed", type=int, help="seed from which every episode seed is drawn (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output store, e.g. data/demos/<task>.zarr")
    p.add_argument("--max-attempts", type=int, help="episodes to try at most (default 3x episodes)")
    p.add_argument("--max-episode-steps", type=int, help="step limit of one episode (default: the suite's)")
    p.add_argument(
        "--obs",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an observation option of the suite, e.g. n_points=512 or images=true (repeatable)",
    )
    p.add_argument("--zarr-format", type=int, choices=(2, 3), help="zarr format to write (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    p.add_argument("--no-resume", action="store_true", help="ignore a partial store left by a crash")
    _add_wait(p)
    p.set_defaults(func=_demos)


def _convert(args: argparse.Namespace) -> None:
    if args.format == "maniskill":
        store = _convert_maniskill(args)
    else:
        if args.obs:
            raise ValueError("--obs is for maniskill files (robomimic files keep their observations)")
        from difftori.datasets.robomimic_hdf5 import convert_robomimic

        store = convert_robomimic(
            args.file,
            args.out,
            task=args.task,
            actions=args.actions,
            zarr_format=args.zarr_format,
            overwrite=args.overwrite,
            wait=args.wait,
        )
    splits = {name: len(eps) for name, eps in store.meta.splits.items()}
    log.info(
        "%s: %d episodes, %d steps, keys %s, splits %s",
        *(store.path, store.n_episodes, store.n_steps),
        store.keys,
        splits,
    )


def _convert_maniskill(args: argparse.Namespace) -> EpisodeStore:
    from difftori.base_policies.configs import config_from_dict
    from difftori.datasets.maniskill_h5 import ManiSkillObsConfig
    from difftori.eval.suites.maniskill import convert_trajectory

    obs = config_from_dict(ManiSkillObsConfig, _parse_obs(args.obs), "--obs")
    return convert_trajectory(
        args.file,
        args.out,
        args.task,
        obs=obs,
        zarr_format=args.zarr_format,
        overwrite=args.overwrite,
        wait=args.wait,
    )


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert another project's demonstration file into a zarr episode store",
        description="Convert a demonstration file into a difftori episode store. robomimic: an hdf5 "
        "(data/demo_N with obs, next_obs, actions; env_args; mask/<filter> splits); low-dim keys "
        "become float32, images HWC -> CHW; mask/train and mask/valid become the training/validation "
        "split. maniskill: a ManiSkill3 trajectory h5 (traj_<i>: actions, obs, success, terminated, "
        "truncated) with its json beside it, in state or pointcloud obs mode; successful episodes "
        "only; point clouds (xyz [+ rgb], background and --obs exclude actors removed, n_points by "
        "farthest-point sampling) and agent_pos, or state. The env description (robomimic env_args, "
        "ManiSkill env_info + reset_kwargs) is kept so that evaluation rebuilds exactly that env.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("format", choices=("robomimic", "maniskill"), help="the file's format")
    p.add_argument("file", type=Path, help="the file to convert, e.g. low_dim_v15.hdf5 or trajectory.h5")
    p.add_argument("--out", type=Path, required=True, help="output store, e.g. data/demos/<task>.zarr")
    p.add_argument("--task", help="task name (default: from the file's env name, e.g. Lift -> lift)")
    p.add_argument(
        "--actions", default="actions", choices=("actions", "actions_abs"), help="robomimic action key"
    )
    p.add_argument(
        "--obs",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="maniskill point-cloud option, e.g. n_points=1024, rgb=true, frame=tcp (repeatable)",
    )
    p.add_argument("--zarr-format", type=int, choices=(2, 3), default=2, help="zarr format to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    _add_wait(p)
    p.set_defaults(func=_convert)


def _train_base(args: argparse.Namespace) -> None:
    from difftori.base_policies.configs import config_from_dict
    from difftori.pipeline.params import load_params, section
    from difftori.pipeline.train_base import import_checkpoint, train_base
    from difftori.pipeline.training import TrainConfig

    params = load_params(args.params)
    overrides = {k: v for k, v in (("max_steps", args.max_steps), ("seed", args.seed)) if v is not None}
    cfg = config_from_dict(
        TrainConfig, section(params, "train_base") | overrides, f"{args.params}: train_base"
    )
    demos = args.demos or paths.demos(args.task)
    out = args.out or paths.base_model(args.task, args.policy, cfg.seed)
    checkpoint = args.checkpoint or section(params, "base_checkpoints", args.task).get(args.policy)
    if checkpoint:
        import_checkpoint(Path(checkpoint), out, args.policy, demos, wait=args.wait)
        if not args.out:  # the stage's logs output: the imported run's curves, if it has them
            logs = args.logs or paths.train_logs(args.task, args.policy, cfg.seed)
            shutil.rmtree(logs, ignore_errors=True)
            curves = out / "dvclive" / "plots" / "metrics"
            if curves.is_dir():
                shutil.copytree(curves, logs)
            else:
                logs.mkdir(parents=True)
        return
    policy_cfg = section(params, "policies", args.policy)
    logs = args.logs or (None if args.out else paths.train_logs(args.task, args.policy, cfg.seed))
    train_base(
        args.task,
        args.policy,
        demos,
        out,
        policy_cfg,
        cfg,
        progress=not args.no_progress,
        logs=logs,
        restart=args.restart,
        wait=args.wait,
    )


def _add_train_base(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-base",
        help="train a base policy on a demo store (or import an existing checkpoint)",
        description="Train a base policy (dp3, diffusion, pointnet_bc, bc_rnn) with Lightning on "
        "data/demos/<task>.zarr and save a safetensors + JSON checkpoint to models/<task>/<policy>/seed<k>. "
        "Training settings come from the params file: train_base (TrainConfig) and policies.<policy> "
        "(the policy's config). base_checkpoints.<task>.<policy> (or --checkpoint) names an existing "
        "checkpoint to use instead of training. An interrupted run resumes from <out>.work.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", required=True, help="task name, e.g. shelf-place")
    p.add_argument(
        "--policy", required=True, help="registered base policy: dp3, diffusion, pointnet_bc, bc_rnn"
    )
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    p.add_argument("--demos", type=Path, help="demo store (default data/demos/<task>.zarr)")
    p.add_argument("--out", type=Path, help="checkpoint directory (default models/<task>/<policy>/seed<k>)")
    p.add_argument("--checkpoint", type=Path, help="import this checkpoint instead of training")
    p.add_argument("--logs", type=Path, help="training curves (default logs/<task>/<policy>/seed<k>)")
    p.add_argument("--max-steps", type=int, help="override train_base.max_steps")
    p.add_argument("--seed", type=int, help="training seed k (default train_base.seed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_restart(p)
    _add_wait(p)
    p.set_defaults(func=_train_base)


def _init_actions(args: argparse.Namespace) -> None:
    from difftori.base_policies.configs import config_from_dict
    from difftori.pipeline.init_actions import InitActionsConfig, init_actions_stage
    from difftori.pipeline.params import load_params, section
    from difftori.pipeline.training import TrainConfig

    params = load_params(args.params)
    overrides = {k: v for k, v in (("samples", args.samples), ("weights", args.weights)) if v}
    cfg = config_from_dict(
        InitActionsConfig, section(params, "init_actions") | overrides, f"{args.params}: init_actions"
    )
    train_cfg = config_from_dict(
        TrainConfig, section(params, "train_base") | {"seed": args.seed}, f"{args.params}: train_base"
    )
    model = args.model or paths.base_model(args.task, args.policy, args.seed)
    _check_checkpoint_name(model, "base_policy", args.policy, "--policy")
    out = args.out or paths.init_actions(args.task, args.policy, args.seed)
    with OutputLock(out, args.wait):
        init_actions_stage(
            args.task,
            demos=args.demos or paths.demos(args.task),
            model=model,
            out=out,
            cfg=cfg,
            seed=args.seed,
            policy_config=section(params, "policies", args.policy),
            train_cfg=train_cfg,
        )


def _add_init_actions(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init-actions",
        help="sample the frozen base policy's action windows at every demo step",
        description="Run the frozen base policy (eval mode, no grad, EMA weights by default) over "
        "every step of the demo store and store K samples of its action window per step in a zarr "
        "aligned with the demos. Refiners train on these. Defaults come from the params file's "
        "init_actions section; the sampling seed is init_actions.seed + k. With "
        "init_actions.cross_fit: k >= 2, k fold bases (train_base and policies.<policy> settings) "
        "are trained, each without one fold of the training episodes, and produce that fold's windows.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", required=True, help="task name, e.g. shelf-place")
    p.add_argument("--policy", required=True, help="base policy name")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    p.add_argument("--demos", type=Path, help="demo store (default data/demos/<task>.zarr)")
    p.add_argument("--seed", type=int, default=0, help="training seed k of the base policy")
    p.add_argument("--model", type=Path, help="base checkpoint (default models/<task>/<policy>/seed<k>)")
    p.add_argument("--out", type=Path, help="output (default data/inits/<task>/<policy>/seed<k>.zarr)")
    p.add_argument("--samples", type=int, help="samples per step (params init_actions.samples, else 4)")
    p.add_argument("--weights", choices=("ema", "raw"), help="which weights (default ema)")
    _add_wait(p)
    p.set_defaults(func=_init_actions)


def _train_refiner(args: argparse.Namespace) -> None:
    from difftori.base_policies.configs import config_from_dict
    from difftori.pipeline.params import load_params, refiner_config, section
    from difftori.pipeline.train_refiner import train_refiner
    from difftori.pipeline.training import TrainConfig

    params = load_params(args.params)
    overrides = {k: v for k, v in (("max_steps", args.max_steps), ("seed", args.seed)) if v is not None}
    cfg = config_from_dict(
        TrainConfig, section(params, "train_refiner") | overrides, f"{args.params}: train_refiner"
    )
    train_refiner(
        args.task,
        args.refiner,
        demos=args.demos or paths.demos(args.task),
        inits_path=args.inits or paths.init_actions(args.task, args.policy, cfg.seed),
        out=args.out or paths.refiner_model(args.task, args.policy, args.refiner, cfg.seed),
        refiner_config=refiner_config(params, args.refiner),
        cfg=cfg,
        progress=not args.no_progress,
        logs=args.logs
        or (None if args.out else paths.train_logs(args.task, f"{args.policy}-{args.refiner}", cfg.seed)),
        restart=args.restart,
        wait=args.wait,
    )


def _add_train_refiner(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-refiner",
        help="train a refiner (difftori, residual, ibc) on top of a frozen base policy",
        description="Train a refiner with Lightning on data/demos/<task>.zarr and the frozen base "
        "policy's stored action windows data/inits/<task>/<policy>.zarr; save it to "
        "models/<task>/<policy>-<refiner>. Settings: params train_refiner (TrainConfig) and "
        "refiner_configs.<refiner>. The validation episodes are the base policy's.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", required=True, help="task name, e.g. shelf-place")
    p.add_argument("--policy", required=True, help="base policy name")
    p.add_argument("--refiner", required=True, help="registered refiner: difftori, residual, ibc")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    p.add_argument("--demos", type=Path, help="demo store (default data/demos/<task>.zarr)")
    p.add_argument(
        "--inits", type=Path, help="init actions (default data/inits/<task>/<policy>/seed<k>.zarr)"
    )
    p.add_argument(
        "--out", type=Path, help="checkpoint directory (default models/<task>/<policy>-<refiner>/seed<k>)"
    )
    p.add_argument(
        "--logs", type=Path, help="training curves (default logs/<task>/<policy>-<refiner>/seed<k>)"
    )
    p.add_argument("--max-steps", type=int, help="override train_refiner.max_steps")
    p.add_argument("--seed", type=int, help="training seed k (default train_refiner.seed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_restart(p)
    _add_wait(p)
    p.set_defaults(func=_train_refiner)


def _evaluate(args: argparse.Namespace) -> None:
    from difftori.base_policies.configs import config_from_dict
    from difftori.eval.evaluate import EvalConfig, evaluate
    from difftori.pipeline.compose import policy_loader
    from difftori.pipeline.params import load_params, refiner_config, section

    params = load_params(args.params)
    overrides = {k: v for k, v in (("episodes", args.episodes), ("workers", args.workers)) if v is not None}
    cfg = config_from_dict(EvalConfig, section(params, "evaluate") | overrides, f"{args.params}: evaluate")
    refined = args.refiner != paths.NO_REFINER
    base = args.model or paths.base_model(args.task, args.policy, args.seed)
    _check_checkpoint_name(base, "base_policy", args.policy, "--policy")
    refiner = None
    if refined:
        refiner = args.refiner_model or paths.refiner_model(args.task, args.policy, args.refiner, args.seed)
        kind = refiner_config(params, args.refiner)["type"]
        _check_checkpoint_name(refiner, "refiner", kind, "--refiner")
    evaluate(
        demos=args.demos or paths.demos(args.task),
        policy=policy_loader(base, refiner),
        seed=args.seed,
        out=args.out or paths.eval_result(args.task, args.policy, args.refiner, args.seed),
        cfg=cfg,
        video_dir=args.videos or paths.eval_videos(args.task, args.policy, args.refiner, args.seed),
        progress=not args.no_progress,
        refiner_name=args.refiner,
        wait=args.wait,
    )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="roll out a base policy, alone or refined, in its simulator",
        description="Roll out models/<task>/<policy>/seed<k> (refined by "
        "models/<task>/<policy>-<refiner>/seed<k> unless --refiner none) for evaluate.episodes "
        "episodes in evaluate.workers simulator processes, on env seeds drawn from evaluate.seed, and "
        "write one record per episode plus a success-rate summary (Wilson 95% interval) to "
        "results/evals/<task>/<policy>/<refiner>/seed<k>.json; mp4s of the first evaluate.videos "
        "episodes go to results/videos/<task>/<policy>/<refiner>/seed<k>/. Finished episodes are "
        "journaled in <out>.partial.jsonl; an interrupted run resumes from it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", required=True, help="task name, e.g. shelf-place")
    p.add_argument("--policy", required=True, help="base policy name")
    p.add_argument("--refiner", default=paths.NO_REFINER, help="refiner name, or 'none' for the base alone")
    p.add_argument("--seed", type=int, default=0, help="training seed k of the checkpoints")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    p.add_argument("--demos", type=Path, help="demo store the env settings come from")
    p.add_argument("--model", type=Path, help="base checkpoint directory")
    p.add_argument("--refiner-model", type=Path, help="refiner checkpoint directory")
    p.add_argument("--out", type=Path, help="results file")
    p.add_argument("--videos", type=Path, help="video directory")
    p.add_argument("--episodes", type=int, help="override evaluate.episodes")
    p.add_argument("--workers", type=int, help="override evaluate.workers")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_wait(p)
    p.set_defaults(func=_evaluate)


def _report(args: argparse.Namespace) -> None:
    from difftori.eval.report import write_report

    if args.from_experiments is None:
        root = Path("results")
        write_report(args.results or root / "evals", *_report_outputs(args, root))
        return
    from difftori.pipeline.experiments import export_results

    with tempfile.TemporaryDirectory(prefix="difftori-experiments-") as tmp:
        export_results(Path("."), Path(tmp), args.from_experiments or None)
        write_report(Path(tmp), *_report_outputs(args, Path("results/experiments")))


def _report_outputs(args: argparse.Namespace, root: Path) -> tuple[Path, Path, Path]:
    """The tables, plots and metrics paths: as given, else under ``root``."""
    return args.tables or root / "tables", args.plots or root / "plots", args.metrics or root / "metrics.json"


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="success/failure-rate tables, plots and metrics from the evaluation results",
        description="Read every results/evals/**/seed*.json and write the comparison tables "
        "(Markdown, CSV, LaTeX: rows = methods, columns = tasks + average, mean +- std over training "
        "seeds, best in bold), per-task bar plots with Wilson intervals, and results/metrics.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--results", type=Path, help="results folder (default: results/evals)")
    p.add_argument("--tables", type=Path, help="tables folder (default: results/tables)")
    p.add_argument("--plots", type=Path, help="plots folder (default: results/plots)")
    p.add_argument("--metrics", type=Path, help="DVC metrics file (default: results/metrics.json)")
    p.add_argument(
        "--from-experiments",
        nargs="*",
        metavar="NAME",
        help="merge the results of these DVC experiments of HEAD (none named: all of them) into one "
        "report, written under results/experiments/ unless --tables/--plots/--metrics say otherwise",
    )
    p.set_defaults(func=_report)


def _check(args: argparse.Namespace) -> None:
    from difftori.base_policies.checkpoint import CONFIG, CheckpointError, read_checkpoint, verify_files
    from difftori.datasets.episode_store import EpisodeStore
    from difftori.pipeline.params import load_params

    for path in args.paths:
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: params file not found")
            params = load_params(path)
            log.info("%s: ok (every section, name and type valid)", path)
            if args.resolved_refiners:
                _write_resolved_refiners(params, args.resolved_refiners)
        elif (path / CONFIG).is_file():
            ckpt = read_checkpoint(path)
            if ckpt.format_version < 2:
                raise CheckpointError(f"{path / CONFIG}: format 1: no weights hashes recorded, cannot verify")
            verify_files(path, ckpt)
            log.info("%s: ok (%s %r; %s match their sha256)", path, ckpt.kind, ckpt.name, sorted(ckpt.files))
        else:
            store = EpisodeStore(path)
            store.verify()
            log.info(
                "%s: ok (%d episodes; every chunk present, every array matches its checksum)",
                path,
                store.n_episodes,
            )


def _write_resolved_refiners(params: dict, out: Path) -> None:
    """``out/<name>.json``: each refiner's config as train-refiner resolves it (a variant laid over
    its type's), so a DVC stage depends on exactly its refiner's settings."""
    import json

    from difftori.datasets.safeio import atomic_write_text
    from difftori.pipeline.params import refiner_config, section

    out.mkdir(parents=True, exist_ok=True)
    names = dict.fromkeys([*params.get("refiners", []), *section(params, "refiner_configs")])
    for name in names:
        text = json.dumps(refiner_config(params, name), indent=1, sort_keys=True) + "\n"
        atomic_write_text(out / f"{name}.json", text)
    log.info("%s: resolved configs of %d refiners", out, len(names))


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="verify episode stores and checkpoints against their checksums, and params files",
        description="For each episode store: open and validate it (every chunk present, no NaN, one "
        "seed per episode) and verify every array against the sha256 recorded when it was written. "
        "For each checkpoint directory (config.json): verify every weights file against its "
        "recorded sha256. For each params file (.yaml): validate every section, name and type. "
        "Exits 1 at the first problem, naming the file and key.",
    )
    p.add_argument(
        "paths", nargs="+", type=Path, help="episode stores (.zarr), checkpoint directories, params files"
    )
    p.add_argument(
        "--resolved-refiners",
        type=Path,
        help="for a params file: also write <dir>/<refiner>.json, each refiner's resolved config "
        "(variants laid over their type's), the train-refiner stages' dependency",
    )
    p.set_defaults(func=_check)


def _inspect_refiner(args: argparse.Namespace) -> None:
    from difftori.pipeline.inspect_refiner import default_out, inspect_refiner

    name = f"{args.policy}-{args.refiner}"
    inspect_refiner(
        checkpoint=args.checkpoint or paths.refiner_model(args.task, args.policy, args.refiner, args.seed),
        demos=args.demos or paths.demos(args.task),
        inits_path=args.inits or paths.init_actions(args.task, args.policy, args.seed),
        step=args.step,
        out=args.out or default_out(args.task, args.policy, args.refiner, args.seed, args.step),
        dims=tuple(args.dims) if args.dims else None,
        samples=args.samples,
        seed=args.sample_seed,
        title=f"{args.task}: {name} seed{args.seed}, demo step {args.step}",
    )


def _add_inspect_refiner(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect-refiner",
        help="draw a DiffTORI refiner's learned objective and LM paths at one demo step",
        description="For a few prior latents z~ ~ N(0, I), draw the learned objective (anchor "
        "excluded) on a 2-D slice of the normalised action window through the base window (the two "
        "coordinates that vary most across the store's expert windows, or --dims), the "
        "Levenberg-Marquardt path from the start to the solution, and the base, start, solution and "
        "expert windows; with anchor 'base' a second row draws objective + anchor. Writes a PNG "
        "(default results/inspect/<task>/<policy>-<refiner>/seed<k>/step<N>.png) and the numbers "
        "drawn in a JSON beside it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", required=True, help="task name, e.g. shelf-place")
    p.add_argument("--policy", required=True, help="base policy name")
    p.add_argument("--refiner", default="difftori", help="refiner name (a DiffTORI refiner or variant)")
    p.add_argument("--step", type=int, required=True, help="global step of the demo store")
    p.add_argument("--seed", type=int, default=0, help="training seed k of the checkpoints")
    p.add_argument("--dims", type=int, nargs=2, metavar=("I", "J"), help="flat window coordinates to draw")
    p.add_argument("--samples", type=int, default=3, help="prior samples z~ (one column each)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the generator drawing z~")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="refiner checkpoint (default models/<task>/<policy>-<refiner>/seed<k>)",
    )
    p.add_argument("--demos", type=Path, help="demo store (default data/demos/<task>.zarr)")
    p.add_argument(
        "--inits", type=Path, help="init actions (default data/inits/<task>/<policy>/seed<k>.zarr)"
    )
    p.add_argument("--out", type=Path, help="PNG to write (the JSON goes beside it)")
    p.set_defaults(func=_inspect_refiner)


# Each entry adds one subcommand (one pipeline stage; ``check`` verifies outputs).
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demos,
    _add_convert,
    _add_train_base,
    _add_init_actions,
    _add_train_refiner,
    _add_evaluate,
    _add_report,
    _add_check,
    _add_inspect_refiner,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difftori",
        description="difftori: demonstrations -> base policies -> refiners -> rollout evaluation. "
        "Each subcommand is one stage of dvc.yaml.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``difftori`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("OpenGL", "numba", "matplotlib", "lightning", "lightning.pytorch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.func(args)
    except (ValueError, KeyError, RuntimeError, OSError) as e:  # Store/CheckpointError are ValueErrors
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``difftori`` command line: one subcommand per pipeline (DVC) stage."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("difftori")


def _demos(args: argparse.Namespace) -> None:
    from difftori.eval.demos import DemoConfig, generate_demos

    obs = {"n_points": args.n_points, "image": args.image}
    cfg = DemoConfig(
        suite=args.suite,
        task=args.task,
        episodes=args.episodes,
        seed=args.seed,
        max_attempts=args.max_attempts,
        max_episode_steps=args.max_episode_steps,
        obs=obs,
        zarr_format=args.zarr_format,
    )
    store = generate_demos(cfg, args.out, overwrite=args.overwrite, resume=not args.no_resume)
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
        description="Roll out the suite's scripted expert for one task and record the successful "
        "episodes (point clouds, low-dim state, actions) into a zarr episode store. "
        "An interrupted run resumes from <out>.partial.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--suite", default="metaworld", help="simulator suite (metaworld)")
    p.add_argument("--task", required=True, help="task name, e.g. shelf-place")
    p.add_argument("--episodes", type=int, default=10, help="successful episodes to keep")
    p.add_argument("--seed", type=int, default=0, help="seed from which every episode seed is drawn")
    p.add_argument("--out", type=Path, required=True, help="output store, e.g. data/demos/<task>.zarr")
    p.add_argument("--max-attempts", type=int, default=0, help="episodes to try at most (0: 3x episodes)")
    p.add_argument("--max-episode-steps", type=int, default=200, help="step limit of one episode")
    p.add_argument("--n-points", type=int, default=512, help="points per point cloud")
    p.add_argument("--image", action="store_true", help="also record RGB images")
    p.add_argument("--zarr-format", type=int, choices=(2, 3), default=2, help="zarr format to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    p.add_argument("--no-resume", action="store_true", help="ignore a partial store left by a crash")
    p.set_defaults(func=_demos)


# Each entry adds one subcommand (one pipeline stage).
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demos]


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
    for noisy in ("OpenGL", "numba", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.func(args)
    except (ValueError, RuntimeError, OSError) as e:  # StoreError is a ValueError
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

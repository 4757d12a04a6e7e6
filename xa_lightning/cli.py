"""Console entry points: xa-train, xa-eval, xa-sample, xa-tables, xa-bench, xa-data.

The Hydra tools compose and validate the config once before Hydra runs, so a typo, a wrong type, a value
out of range, a bad sweep value or a missing path is one line on stderr with exit code 2 and no output
directory is created (docs/reliability.md, "The door").
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from xa_lightning.errors import UserError

HYDRA_INFO_FLAGS = ("help", "hydra_help", "info", "cfg", "shell_completion", "resolve")


def _fail(message: str, prog: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _load(path: str) -> Callable:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def check_paths(cfg: Any, config_name: str) -> None:
    """What the config points at, before anything runs: ``ckpt_path`` (a whole checkpoint; ``last`` finds
    one), xa-sample's prompt file and references, and the data (``data.urls`` / ``data.root``, unless the
    demo is written on first use)."""
    from pathlib import Path

    from omegaconf import DictConfig

    from xa_lightning.config import instantiate

    value = cfg.get("ckpt_path")
    if value == "last" and config_name == "train":
        from xa_lightning.train import find_last_checkpoint

        find_last_checkpoint(str(cfg.run_name), report=False)
    elif value not in (None, "", "last"):
        from xa_lightning.training.checkpoint_io import unreadable_reason

        path = Path(str(value)).expanduser()
        if not path.is_file():
            resume = " or ckpt_path=last" if config_name == "train" else ""
            raise UserError(f"ckpt_path={value} does not exist; pass an existing .ckpt{resume}")
        reason = unreadable_reason(path)
        if reason is not None:
            raise UserError(
                f"ckpt_path={value} is not a readable checkpoint ({reason}); pass another one (e.g. a periodic "
                "step*.ckpt beside it)"
            )
    if config_name == "sample":  # xa-sample's own sources
        from xa_lightning.metrics.evaluate import resolve_path

        if cfg.get("references_dir"):
            resolve_path(cfg.references_dir, "references_dir")
        if not cfg.get("prompts") and cfg.get("prompts_file"):
            resolve_path(cfg.prompts_file, "prompts_file")
    data = cfg.get("data")
    if isinstance(data, DictConfig) and "_target_" in data:
        check_source = getattr(instantiate(data), "check_source", None)
        if callable(check_source):
            check_source()


def run_hydra(config_name: str, task: str, argv: Sequence[str] | None, prog: str) -> int:
    """Pre-check the config, then hand over to Hydra (multirun, launchers, sweepers, output dirs)."""
    import hydra
    from hydra._internal.utils import get_args_parser

    from xa_lightning import config as xa_config

    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(argv)
    wants_info = any(getattr(args, flag, None) for flag in HYDRA_INFO_FLAGS)
    try:
        if not wants_info:
            cfg = xa_config.compose(config_name, args.overrides, multirun=args.multirun)
            xa_config.validate(cfg)
            xa_config.validate_sweeps(cfg, args.overrides)
            xa_config.check_option_dataclasses(cfg)
            check_paths(cfg, config_name)
        conf_dir = str(xa_config.config_dir())
    except UserError as exc:
        return _fail(str(exc), prog)

    task_fn = _load(task)
    exit_code = {"code": 0}
    failed_dirs: list[str] = []

    def hydra_task(cfg):  # runs once per job
        from xa_lightning.distributed import prepare_local_ranks

        prepare_local_ranks(prog, saved_argv[0])  # DDP ranks 1..N-1 re-run this job, from this command
        try:
            return task_fn(cfg)
        except Exception as exc:
            # failed.json in the job's directory: xa-tables shows the cell as failed, with this reason.
            # The exception still reaches Hydra, whose sweepers run the other jobs and report it at the end.
            from hydra.core.hydra_config import HydraConfig

            from xa_lightning.reporting.runs import write_failure

            failed_dirs.append(str(write_failure(HydraConfig.get().runtime.output_dir, exc).parent))
            if isinstance(exc, UserError):
                exit_code["code"] = _fail(str(exc), prog)
                return None
            raise

    xa_config.register_resolvers(args.overrides)
    main = hydra.main(config_path=conf_dir, config_name=config_name, version_base="1.3")(hydra_task)
    saved_argv = sys.argv
    sys.argv = [prog, *argv]
    try:
        main()
    except SystemExit as exc:  # Hydra exits after --help, and with 1 after a job raised
        exit_code["code"] = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv = saved_argv
    if failed_dirs and args.multirun:
        import os

        parent = os.path.commonpath(failed_dirs)
        names = ", ".join(os.path.relpath(d, parent) for d in failed_dirs if d != parent)
        where = f"{parent}/ ({names})" if names else parent
        print(f"{prog}: {len(failed_dirs)} job(s) failed; failed.json in {where}", file=sys.stderr)
        return exit_code["code"] or 1  # Optuna records a crashed trial and carries on: still not a success
    return exit_code["code"]


def train_main(argv: Sequence[str] | None = None) -> int:
    """xa-train [overrides]: fit a method (see `xa-train --help` for the config)."""
    return run_hydra("train", "xa_lightning.train:run", argv, "xa-train")


FOLDER_EVAL_COMMANDS = ("fid", "kid", "clip", "ida", "fid-stats", "edge-f1")


def eval_main(argv: Sequence[str] | None = None) -> int:
    """xa-eval ckpt_path=... [overrides] | xa-eval {fid,kid,clip,ida,fid-stats} ..."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FOLDER_EVAL_COMMANDS:
        return _run_plain("xa_lightning.metrics.cli:main", argv, "xa-eval")
    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print(
            "usage: xa-eval ckpt_path=<run>.ckpt [hydra overrides]   (generate with the method, then score)\n"
            "       xa-eval fid --real DIR --fake DIR [--kid]\n"
            "       xa-eval clip --images DIR --prompts FILE\n"
            "       xa-eval ida --generated DIR --reference DIR [--backend dlib|insightface]\n"
            "       xa-eval fid-stats --real DIR --name NAME\n"
            "       xa-eval edge-f1 --generated DIR --control DIR\n"
            "The JSON result is the last line of output. `xa-eval --hydra-help` shows Hydra's options."
        )
        return 0
    return run_hydra("eval", "xa_lightning.evaluate:run", argv, "xa-eval")


def sample_main(argv: Sequence[str] | None = None) -> int:
    """xa-sample [backbone=...|ckpt_path=...] prompts=[...]: write images to the run directory."""
    return run_hydra("sample", "xa_lightning.sample:run", argv, "xa-sample")


def tables_main(argv: Sequence[str] | None = None) -> int:
    return _run_plain("xa_lightning.tables:main", argv, "xa-tables")


def bench_main(argv: Sequence[str] | None = None) -> int:
    return _run_plain("xa_lightning.bench:main", argv, "xa-bench")


def data_main(argv: Sequence[str] | None = None) -> int:
    return _run_plain("xa_lightning.data.cli:main", argv, "xa-data")


def _run_plain(path: str, argv: Sequence[str] | None, prog: str) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        fn = _load(path)
    except ModuleNotFoundError as exc:
        return _fail(f"{prog} is not available in this install ({exc.name} missing)", prog)
    try:
        code = fn(argv)
    except UserError as exc:
        return _fail(str(exc), prog)
    return int(code or 0)


if __name__ == "__main__":  # python -m xa_lightning.cli train ...
    commands = {
        "train": train_main,
        "eval": eval_main,
        "sample": sample_main,
        "tables": tables_main,
        "bench": bench_main,
        "data": data_main,
    }
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(f"usage: python -m xa_lightning.cli {{{','.join(commands)}}} ...", file=sys.stderr)
        sys.exit(2)
    sys.exit(commands[sys.argv[1]](sys.argv[2:]))

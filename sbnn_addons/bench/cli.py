"""``sbnn-bench``: compare SBNN training with surrogate-gradient baselines.

Your model: ``sbnn-bench --model package.module:factory --data package.module:loaders``
trains the factory's snnTorch / SpikingJelly network with its own surrogate
(``original``) and as SBNN conversions, on identical terms (see
:func:`sbnn_addons.bench.compare`). ``loaders()`` returns ``(train, test)`` (each ``(x, y)``
tensors or a DataLoader) or a dict ``{"train": ..., "test": ..., "layout": "TB",
"encode": fn, "num_classes": 10, "name": "mytask"}``. A ``path/to/file.py:name`` works too.

With no arguments it runs the embedded default: the ``digits`` task (scikit-learn's
bundled 8x8 digits, rate-coded, no download) with the snnTorch atan baseline, SBNN(ST)
and SBNN(AGR), one seed, and writes ``results.csv``, ``results.json``,
``predictions.csv``, PNG plots and ``report.md`` to ``--out-dir`` (default
``runs/bench``). The built-in tasks go through the same mechanism (a factory and data);
``--list`` shows them. Launched by ``torchrun --nproc_per_node=N`` it trains with
DistributedDataParallel. ``sbnn-bench diagnostics`` runs the exact-enumeration gradient
diagnostics instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shlex
import sys
from pathlib import Path

import torch

from ..base import positive_int
from .compare import GENERIC_METHODS, compare, init_distributed
from .harness import METHODS, PAPER_BN_BASELINE, PRESET_METHODS, PRESETS, TASKS, run_tasks
from .results import COLUMNS, BenchResults, summarise, write_results

__all__ = ["main", "run", "build_parser", "load_object", "COLUMNS", "DEFAULT_METHODS",
           "summarise", "write_results"]

DEFAULT_METHODS = ["snntorch-atan", "sbnn-st", "sbnn-agr"]
#: default methods with --model
DEFAULT_MODEL_METHODS = ["original", "sbnn-st", "sbnn-agr"]


def positive_float(text: str) -> float:
    """An ``argparse`` type for the learning rates: a finite number > 0 (a rate of 0 does
    not train, a negative one ascends the loss)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"must be a finite number > 0 (a learning rate, e.g. 5e-3), got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """An ``argparse`` type for the auxiliary-loss weight: a finite number >= 0 (a negative
    or NaN weight was refused only at the first training step, after the data loaded)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"must be a finite number >= 0 (a loss weight, e.g. 1e-4), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sbnn-bench", description=__doc__.split("\n")[0],
                                epilog="Scale out: torchrun --nproc_per_node=N -m "
                                "sbnn_addons.bench ... (DistributedDataParallel). Gradient "
                                "diagnostics: sbnn-bench diagnostics --help.")
    p.add_argument("--list", action="store_true", help="print the tasks and methods, exit")
    g = p.add_argument_group("your model (instead of --task)")
    g.add_argument("--model", metavar="MODULE:FACTORY",
                   help="factory (or nn.Module) of your snnTorch / SpikingJelly network: "
                   "package.module:name or path/to/file.py:name")
    g.add_argument("--data", metavar="MODULE:LOADERS",
                   help="callable returning (train, test) or a dict with 'train', 'test' and "
                   "optional 'layout', 'encode', 'num_classes', 'name'")
    g.add_argument("--layout", choices=["TB", "BT", "static"], default=None,
                   help="where the samples are in your tensors / batches: TB time-major "
                   "[T, N, ...] (default), BT batch-major [N, T, ...] (transposed per "
                   "batch), static [N, ...] (your encode adds time)")
    g.add_argument("--step", dest="step", action="store_const", const=True, default=None,
                   help="the model takes one time step per call (the harness loops over time)")
    g.add_argument("--sequence", dest="step", action="store_const", const=False,
                   help="the model takes the whole sequence [T, B, ...] per call")
    p.add_argument("--task", nargs="+", action="extend", default=None, choices=sorted(TASKS),
                   help="built-in task(s) (default: digits)")
    p.add_argument("--methods", nargs="+", action="extend", default=None,
                   help=f"default: {' '.join(DEFAULT_METHODS)} (tasks; or the preset's), "
                   f"{' '.join(DEFAULT_MODEL_METHODS)} (--model); --list shows all")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="paper: reference recipe (Method page, section 8); cpu: dvs-gesture sized "
                   "for 2 CPU cores. Presets only set defaults; explicit flags win")
    p.add_argument("--seeds", nargs="+", action="extend", type=int, default=None,
                   help="one run per seed (0); a repeated flag adds seeds")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="default: per task (--model: 5)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="per process (--model: 64)")
    p.add_argument("--num-steps", type=positive_int, default=None,
                   help="time steps T / frames / SHD bins (default per task)")
    p.add_argument("--width", type=positive_int, default=None, help="hidden width / conv channels")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="weights' learning rate, > 0 (5e-3)")
    p.add_argument("--noise-lr", type=positive_float, default=None,
                   help="stds' learning rate, > 0 (5e-2)")
    p.add_argument("--aux-weight", type=nonnegative_float, default=None,
                   help="lambda of the aux-loss methods (default 1e-4; paper preset: per task)")
    p.add_argument("--mc-samples", type=positive_int, default=None,
                   help="K for mc(K) evaluation (10)")
    p.add_argument("--data-dir", nargs="+", action="extend", default=None, metavar="[TASK=]DIR",
                   help="dataset folder (dvs-gesture, shd, cifar10), never downloaded; "
                   "with several data tasks give TASK=DIR per task")
    p.add_argument("--max-samples", type=positive_int, default=None,
                   help="a stratified, seeded subset of N samples of each split (every class "
                   "kept in proportion; a subset missing a class stops the run)")
    p.add_argument("--max-test-samples", type=positive_int, default=None,
                   help="test subset size (default: --max-samples)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the subsets (0)")
    p.add_argument("--sequential", action="store_true",
                   help="train the methods one after the other instead of interleaving "
                   "their epochs (each still gets an untimed warm-up)")
    p.add_argument("--no-reference", action="store_true",
                   help="--preset paper: keep the small benchmark networks instead of the "
                   "reference networks of sbnn_addons.models")
    p.add_argument("--frame-stride", type=positive_int, default=None,
                   help="dvs-gesture: keep every n-th of the 49 frames (default 3)")
    p.add_argument("--feedforward", action="store_true",
                   help="shd: snn.Leaky hidden layer instead of recurrent snn.RLeaky")
    g = p.add_argument_group("randman task")
    g.add_argument("--randman-classes", type=positive_int, default=None, help="default 10")
    g.add_argument("--randman-units", type=positive_int, default=None, help="input channels (100)")
    g.add_argument("--randman-samples", type=positive_int, default=None, help="per class (250)")
    g.add_argument("--randman-dim", type=positive_int, default=None, help="manifold dimension (1)")
    g.add_argument("--randman-alpha", type=float, default=None, help="smoothness (2.0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="cpu (default), cuda, or auto (cuda when available)")
    p.add_argument("--find-unused-parameters", action="store_true",
                   help="DistributedDataParallel(find_unused_parameters=True)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--out-dir", default="runs/bench")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots (report.md still)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def load_object(spec: str):
    """The object named by ``package.module:name`` or ``path/to/file.py:name``.

    The current folder is importable (as with ``python -m``), and so is a file's own
    folder (as with ``python path/to/file.py``): helper modules next to it import.
    """
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise SystemExit(f"sbnn-bench: {spec!r} must be package.module:name or "
                         "path/to/file.py:name")
    for folder in (str(Path.cwd()),) + ((str(Path(mod_name).resolve().parent),)
                                        if mod_name.endswith(".py") else ()):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    if mod_name.endswith(".py") or "/" in mod_name:
        path = Path(mod_name)
        if not path.is_file():
            raise SystemExit(f"sbnn-bench: no file {path}")
        name = f"_sbnn_user_{path.stem}"
        spec_ = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec_)
        sys.modules[name] = module
        spec_.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as err:
        raise SystemExit(f"sbnn-bench: {mod_name} has no {attr!r}") from err
    return obj


def _data_dirs(values: list[str] | None, tasks: list[str]) -> str | dict | None:
    """``DIR`` (every task) or ``TASK=DIR`` entries (a dict task -> DIR)."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    out = {}
    for v in values:
        task, sep, path = v.partition("=")
        if not sep or task not in TASKS:
            raise SystemExit(f"sbnn-bench: --data-dir {v!r}: with several entries each must "
                             f"be TASK=DIR with TASK one of {sorted(TASKS)}")
        out[task] = path
    return out


def list_choices() -> str:
    """The tasks, methods and presets as text (``--list``)."""
    lines = ["tasks:"]
    for name, t in TASKS.items():
        extra = f" [presets: {', '.join(sorted(t.presets))}]" if t.presets else ""
        lines.append(f"  {name:<22} {t.help}{extra}")
    lines.append("methods (built-in tasks):")
    for name, m in METHODS.items():
        lines.append(f"  {name:<22} {m.help}")
    lines.append("methods (--model: any snnTorch / SpikingJelly network):")
    for name, m in GENERIC_METHODS.items():
        lines.append(f"  {name:<22} {m.help}")
    lines.append("presets:")
    for name, methods in PRESET_METHODS.items():
        extra = (f" (snntorch-gaussian-bn on {', '.join(sorted(PAPER_BN_BASELINE))}: "
                 "the released baselines)") if name == "paper" else ""
        lines.append(f"  {name:<22} default methods: {' '.join(methods)}{extra}")
    return "\n".join(lines)


def _progress(quiet: bool):
    if quiet:
        return None
    from tqdm.auto import tqdm

    return lambda total: tqdm(total=total, desc="epochs", unit="epoch", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``sbnn-bench``.

    ``sbnn-bench diagnostics [...]`` runs the exact gradient diagnostics
    (:func:`sbnn_addons.diagnostics.main`: bias / variance figures of the estimators by
    enumeration); anything else is the training benchmark (:func:`run`).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["diagnostics"]:
        from ..diagnostics import main as diagnostics_main

        raise SystemExit(diagnostics_main(argv[1:], prog="sbnn-bench diagnostics"))
    run(argv)


def _user_data(spec: str) -> dict:
    out = load_object(spec)
    if callable(out) and not isinstance(out, (tuple, list, dict)):
        out = out()
    if isinstance(out, dict):
        if "train" not in out or "test" not in out:
            raise SystemExit(f"sbnn-bench: --data {spec}: the dict needs 'train' and 'test'")
        return dict(out)
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return {"train": out[0], "test": out[1]}
    raise SystemExit(f"sbnn-bench: --data {spec} must give (train, test) or a dict with "
                     f"'train' and 'test', got {type(out).__name__}")


#: options that shape the built-in tasks' networks and data (ignored by --model)
TASK_ONLY_OPTIONS = {"num_steps": "--num-steps", "width": "--width", "preset": "--preset",
                     "data_dir": "--data-dir", "frame_stride": "--frame-stride",
                     "feedforward": "--feedforward", "no_reference": "--no-reference",
                     "randman_classes": "--randman-classes", "randman_units": "--randman-units",
                     "randman_samples": "--randman-samples", "randman_dim": "--randman-dim",
                     "randman_alpha": "--randman-alpha"}


def _run_model(args, command: str, device: torch.device) -> BenchResults:
    if not args.data:
        raise SystemExit("sbnn-bench: --model needs --data (and --data needs --model)")
    given = [flag for dest, flag in TASK_ONLY_OPTIONS.items()
             if getattr(args, dest) not in (None, False)]
    if given:
        raise SystemExit(
            f"sbnn-bench: {', '.join(given)} shape the built-in tasks (--task) only; with "
            "--model your factory and --data set the network, the time steps and the data. "
            "Drop the option, or build it into your factory / data function")
    model = load_object(args.model)
    data = _user_data(args.data)
    unknown = set(data) - {"train", "test", "layout", "encode", "num_classes", "name"}
    if unknown:
        raise SystemExit(f"sbnn-bench: --data returned unknown keys {sorted(unknown)}")
    if args.batch_size is not None and isinstance(data["train"], torch.utils.data.DataLoader):
        raise SystemExit("sbnn-bench: --batch-size sets the batches of tensor data; your "
                         "training DataLoader has its own batch size (reported in the "
                         "results): drop --batch-size, or set it in the DataLoader")
    make_bar = _progress(args.quiet)
    return compare(
        model, data["train"], data["test"],
        methods=args.methods or DEFAULT_MODEL_METHODS, epochs=args.epochs or 5,
        seeds=args.seeds or [0], batch_size=args.batch_size or 64,
        lr=5e-3 if args.lr is None else args.lr,
        noise_lr=5e-2 if args.noise_lr is None else args.noise_lr,
        layout=args.layout or data.get("layout", "TB"), step=args.step,
        encode=data.get("encode"), mc_samples=args.mc_samples or 10,
        max_train_samples=args.max_samples,
        max_test_samples=args.max_test_samples or args.max_samples,
        subset_seed=args.subset_seed, num_classes=data.get("num_classes"),
        aux_weight=args.aux_weight, interleave=not args.sequential, device=device,
        task=data.get("name") or args.model.rpartition(":")[2],
        find_unused_parameters=args.find_unused_parameters,
        progress=make_bar, command=command)


def run(argv: list[str] | None = None) -> list[dict]:
    """Parse ``argv``, run the comparison, write the outputs and print the table; rows.

    Under ``torchrun`` every process trains its shard; only rank 0 writes and prints.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.list:
        print(list_choices())
        return []
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.model or args.data) and args.task:
        raise SystemExit("sbnn-bench: give --model/--data or --task, not both")
    command = "sbnn-bench " + shlex.join(argv)
    rank, world, device = init_distributed(args.device)
    try:
        if args.model or args.data:
            if not args.model:
                raise SystemExit("sbnn-bench: --data needs --model")
            results = [_run_model(args, command, device)]
        else:
            results = _run_tasks(args, command, device, rank)
        res = BenchResults([r for x in results for r in x.rows],
                           {**results[0].meta,
                            "tasks": [x.meta.get("task") for x in results],
                            "preset": args.preset, "command": command})
        if rank == 0:
            out_dir = Path(args.out_dir)
            paths = res.save(out_dir, plots=not args.no_plots)
            print(res.table())
            notes = res.notes()
            if notes:
                print("\n" + "\n".join(f"- {n}" for n in notes))
            print(f"\nwrote {', '.join(p.name for p in paths)} to {out_dir}")
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
    return res.rows


def _run_tasks(args, command: str, device: torch.device, rank: int) -> list[BenchResults]:
    tasks = args.task or ["digits"]
    for t in tasks:
        if args.preset is not None and args.preset not in TASKS[t].presets:
            offered = sorted(k for k, task in TASKS.items() if args.preset in task.presets)
            raise SystemExit(f"sbnn-bench: --preset {args.preset} is not defined for task "
                             f"{t!r}; it exists for {', '.join(offered)}")
    # a preset's defaults are per task (the paper's surrogate baseline: preset_methods)
    methods = args.methods or (None if args.preset in PRESET_METHODS else DEFAULT_METHODS)
    for m in methods or ():
        if m not in METHODS:
            raise SystemExit(f"sbnn-bench: unknown method {m!r} for the built-in tasks; "
                             f"choose from {sorted(METHODS)}")
    cfg = {"epochs": args.epochs, "batch_size": args.batch_size, "num_steps": args.num_steps,
           "width": args.width, "lr": args.lr, "noise_lr": args.noise_lr,
           "aux_weight": args.aux_weight, "mc_samples": args.mc_samples,
           "data_dir": _data_dirs(args.data_dir, tasks), "max_samples": args.max_samples,
           "max_test_samples": args.max_test_samples, "subset_seed": args.subset_seed,
           "frame_stride": args.frame_stride, "recurrent": False if args.feedforward else None,
           "randman_classes": args.randman_classes, "randman_units": args.randman_units,
           "randman_samples": args.randman_samples, "randman_dim": args.randman_dim,
           "randman_alpha": args.randman_alpha, "device": str(device),
           "find_unused_parameters": args.find_unused_parameters or None,
           "use_reference": False if args.no_reference else None,
           "sequential": args.sequential or None}
    return run_tasks(tasks, methods, args.seeds or [0], cfg, _progress(args.quiet or rank != 0),
                     preset=args.preset, command=command)

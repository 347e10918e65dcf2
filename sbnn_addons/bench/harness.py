"""Built-in tasks and methods of ``sbnn-bench``, run through :func:`~sbnn_addons.bench.compare`.

A built-in task is the same thing a user passes with ``--model`` / ``--data``: a factory
(which takes the :class:`Method`, so each baseline gets its surrogate, framework and
BatchNorm variant) and tensors with an encoding. :func:`task_setup` produces exactly the
arguments of :func:`compare`; :func:`run_task` runs them. Baselines are snnTorch (or
SpikingJelly) models with their own surrogate; the SBNN methods are the same models
converted with :func:`sbnn_addons.snntorch.to_sbnn` (or
:func:`sbnn_addons.spikingjelly.to_sbnn`).

Runs scale out with ``torchrun --nproc_per_node=N``: each process trains on its shard of
every epoch's permutation inside ``DistributedDataParallel`` (gloo on CPU, nccl on GPU),
evaluation is sharded and gathered, and every process returns the same rows.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.randman import TASK_DEFAULTS as RANDMAN_DEFAULTS
from .compare import (
    GENERIC_METHODS,
    Method,
    _world,
    compare,
    dist_info,
    init_distributed,
)
from .nets import (
    ConvNet,
    MLPNet,
    SJConvNet,
    SJMLPNet,
    sj_surrogate,
    snntorch_surrogate,
)

__all__ = ["Method", "Task", "METHODS", "TASKS", "PRESETS", "run_one", "run_grid",
           "run_task", "run_tasks", "task_setup", "apply_preset", "preset_methods", "dist_info",
           "init_distributed"]


# --------------------------------------------------------------------------- methods
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("snntorch-atan", surrogate="atan", help="snnTorch, atan surrogate"),
        Method("snntorch-fast-sigmoid", surrogate="fast_sigmoid",
               help="snnTorch, fast-sigmoid surrogate"),
        Method("snntorch-gaussian", surrogate="gaussian",
               help="snnTorch, reference Gaussian surrogate phi(u/0.4)/0.4"),
        Method("snntorch-atan-bn", surrogate="atan", bn=True,
               help="snnTorch atan with per-step BatchNorm (cifar10, dvs-gesture, shd)"),
        Method("snntorch-gaussian-bn", surrogate="gaussian", bn=True,
               help="snnTorch Gaussian surrogate with per-step BatchNorm"),
        Method("sj-lif-sigmoid", surrogate="sigmoid", framework="spikingjelly",
               help="SpikingJelly LIFNode (multi-step), surrogate.Sigmoid()"),
        Method("sj-lif-atan", surrogate="atan", framework="spikingjelly",
               help="SpikingJelly LIFNode (multi-step), surrogate.ATan()"),
        Method("sj-lif-atan-bn", surrogate="atan", framework="spikingjelly", bn=True,
               help="SpikingJelly ATan with per-step BatchNorm"),
        *(m for name, m in GENERIC_METHODS.items() if name != "original"),
        Method("sbnn-sj-st", estimator="st", framework="spikingjelly",
               help="SpikingJelly model converted by sbnn_addons.spikingjelly, ST"),
        Method("sbnn-sj-agr", estimator="agr", framework="spikingjelly",
               help="SpikingJelly model converted by sbnn_addons.spikingjelly, AGR"),
        Method("ep", estimator=None, framework="ep",
               help="expectation propagation (ADF form, sbnn_addons.ep), 3 passes; digits, "
               "randman"),
        Method("ep-binary", estimator=None, framework="ep",
               help="EP with binary +-1 weights (Bernoulli posteriors), 3 passes; digits, "
               "randman"),
    )
}

#: Passes over the training set of the ``ep`` method (its learning rule needs few).
EP_PASSES = 3


# --------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """A classification task: data loading, input encoding and the networks.

    ``build(cfg, spike_grad, bn)`` returns the snnTorch network; ``build_sj(cfg,
    surrogate_function, bn)`` its SpikingJelly twin (``None``: not offered);
    ``reference(cfg)`` the paper's reference network from :mod:`sbnn_addons.models` (used by
    ``--preset paper`` when that package is importable). ``presets`` maps a preset name to
    the config defaults it sets for this task. ``load(cfg)`` returns batch-major tensors
    ``(x_train, y_train, x_test, y_test)``; ``encode(x, T, generator)`` turns a batch into
    the time-major model input ``[T, B, ...]``. ``num_classes`` (or ``num_classes(cfg)``)
    is checked against every subset.
    """

    name: str
    load: Callable[[dict], tuple[Tensor, Tensor, Tensor, Tensor]]
    encode: Callable[[Tensor, int, torch.Generator], Tensor]
    build: Callable[[dict, object, bool], nn.Module]
    defaults: dict = field(default_factory=dict)
    build_sj: Callable[[dict, object, bool], nn.Module] | None = None
    has_bn: bool = False
    reference: Callable[[dict, Method], nn.Module] | None = None
    presets: dict = field(default_factory=dict)
    help: str = ""
    num_classes: int | Callable[[dict], int] = 10


def _need_dir(cfg: dict, task: str, layout: str) -> Path:
    d = cfg.get("data_dir")
    if not d:
        raise ValueError(f"task {task!r} needs --data-dir: {layout}; nothing is downloaded")
    path = Path(d)
    if not path.is_dir():
        raise FileNotFoundError(f"--data-dir {path} is not a folder; task {task!r}: {layout}")
    return path


# digits ---------------------------------------------------------------------------------
def _load_digits(cfg):
    from ..data.digits import load_digits_split

    return load_digits_split(seed=cfg.get("split_seed", 0))


def _encode_digits(x, num_steps, gen):
    from ..data.digits import rate_code

    return rate_code(x, num_steps, gen)


# dvs-gesture ----------------------------------------------------------------------------
def _load_dvs(cfg):
    from ..data.dvs_gesture import LAYOUT, load_dvs_gesture_32

    root = _need_dir(cfg, "dvs-gesture", LAYOUT)
    stride, frames = cfg.get("frame_stride", 3), cfg.get("num_steps")
    xtr, ytr = load_dvs_gesture_32(root, "train", stride, frames)
    xte, yte = load_dvs_gesture_32(root, "test", stride, frames)
    if frames is not None and xtr.shape[1] < frames:
        raise ValueError(
            f"dvs-gesture: {frames} frames requested but --frame-stride {stride} leaves "
            f"{xtr.shape[1]}; lower --frame-stride or --num-steps"
        )
    scale = cfg.get("input_scale", 0.25)
    return xtr * scale, ytr, xte * scale, yte


def _encode_frames(x, num_steps, gen):
    return x.transpose(0, 1)  # [B, T, ...] -> [T, B, ...] (cast to float per batch)


# shd ------------------------------------------------------------------------------------
SHD_LAYOUT = ("expected tonic's SHD layout: <data-dir>/SHD/shd_train.h5 and shd_test.h5 (plus "
              "empty shd_*.h5.zip placeholders), or --data-dir pointing at that SHD/ folder")


def _shd_labels(root: Path, split: str):
    import h5py

    with h5py.File(root / "SHD" / f"shd_{split}.h5", "r") as f:
        return torch.as_tensor(f["labels"][:]).long()


def _load_shd(cfg):
    """SHD binned in memory; with ``max_samples`` only a stratified seeded subset is read
    (the subset is chosen from the labels in the .h5 files, before any binning)."""
    from ..data.shd import SHDBinned
    from .data import check_subset_classes, stratified_subset

    root = _need_dir(cfg, "shd", SHD_LAYOUT)
    if (root / "shd_train.h5").is_file() and not (root / "SHD").is_dir():
        root = root.parent  # pointed at the SHD/ folder itself
    out = []
    for k, split in enumerate(("train", "test")):
        ds = SHDBinned(root, split, num_bins=cfg["num_steps"], bin_ms=cfg.get("bin_ms", 14.0))
        n_max = cfg.get("max_samples") if split == "train" else (
            cfg.get("max_test_samples") or cfg.get("max_samples"))
        if n_max is None:
            idx = torch.arange(len(ds))
        else:
            labels = _shd_labels(root, split)
            idx = stratified_subset(labels, n_max, cfg.get("subset_seed", 0) + k)
            check_subset_classes(labels, labels[idx], f"shd {split} subset", 20)
        # spike counts per 14 ms bin are small integers: store compactly, decode per batch
        x = torch.empty((len(idx), cfg["num_steps"], 700), dtype=torch.uint8)
        y = torch.empty(len(idx), dtype=torch.int64)
        for j, i in enumerate(idx.tolist()):
            frames, label = ds[i]
            x[j] = frames.clamp_max(255).to(torch.uint8)
            y[j] = label
        out += [x, y]
    cfg["_subset_done"] = True
    return tuple(out)


# randman --------------------------------------------------------------------------------
def _load_randman(cfg):
    from ..data.randman import randman_split

    return randman_split(
        num_classes=cfg["randman_classes"], num_units=cfg["randman_units"],
        num_steps=cfg["num_steps"], samples_per_class=cfg["randman_samples"],
        manifold_dim=cfg["randman_dim"], alpha=cfg["randman_alpha"],
        seed=cfg.get("split_seed", 0),
    )


# cifar10 --------------------------------------------------------------------------------
def _load_cifar(cfg):
    from ..data.cifar10 import LAYOUT, load_cifar10

    root = _need_dir(cfg, "cifar10", LAYOUT)
    xtr, ytr = load_cifar10(root, "train")
    xte, yte = load_cifar10(root, "test")
    return xtr, ytr, xte, yte


def _encode_direct(x, num_steps, gen):
    return x.unsqueeze(0).expand(num_steps, *x.shape)  # the same image at every step


# reference networks (sbnn_addons.models, when available) ---------------------------------
class _StepZero(nn.Module):
    """Feed ``x[0]`` of time-major ``[1, B, ...]`` input to a ``[B, ...]`` network (T = 1)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] != 1:
            raise ValueError(f"the CIFAR-10 reference network has T = 1, got T = {x.shape[0]}; "
                             "use --num-steps 1")
        return self.net(x[0])


def _reference(builder: str):
    """Builder of the reference network ``sbnn_addons.models.<builder>`` for a method.

    SBNN methods get ``bayes=True`` and their estimator; baselines the deterministic twin
    (``bayes=False``) with the method's surrogate, and ``norm="bn"`` (one BatchNorm per
    step) for the ``-bn`` methods.
    """

    def build(cfg: dict, method: Method) -> nn.Module:
        from .. import models

        kwargs = dict(cfg.get("reference_kwargs") or {})
        kwargs["bayes"] = method.is_sbnn
        if method.is_sbnn:
            kwargs["estimator"] = method.estimator
        else:
            kwargs["surrogate"] = "atan" if method.surrogate == "own" else method.surrogate
            kwargs.pop("bias_std", None)
        if method.bn:
            kwargs["norm"] = "bn"
        kwargs["num_steps"] = cfg["num_steps"]  # the reference networks check T
        if cfg.get("width") and builder != "shd_recurrent":
            kwargs.setdefault("width_mult", cfg["width"] / (32 if "dvs" in builder else 64))
        elif cfg.get("width"):
            kwargs.setdefault("hidden", (cfg["width"], cfg["width"]))
        net = getattr(models, builder)(**kwargs)
        return _StepZero(net) if builder == "cifar_resnet25" else net

    return build


def _width(cfg: dict, default: int) -> int:
    return int(cfg.get("width") or default)


TASKS: dict[str, Task] = {
    "digits": Task(
        "digits", _load_digits, _encode_digits,
        lambda cfg, sg, bn: MLPNet(64, _width(cfg, 128), 10, sg, bn=bn),
        {"num_steps": 16, "epochs": 25, "batch_size": 64},
        build_sj=lambda cfg, sg, bn: SJMLPNet(64, _width(cfg, 128), 10, sg, bn=bn),
        help="scikit-learn 8x8 digits, rate-coded (embedded, no download)",
    ),
    "randman": Task(
        "randman", _load_randman, _encode_frames,
        lambda cfg, sg, bn: MLPNet(cfg["randman_units"], _width(cfg, 128),
                                   cfg["randman_classes"], sg, bn=bn),
        {**RANDMAN_DEFAULTS, "epochs": 20, "batch_size": 64},
        build_sj=lambda cfg, sg, bn: SJMLPNet(cfg["randman_units"], _width(cfg, 128),
                                              cfg["randman_classes"], sg, bn=bn),
        help="random-manifold spike-timing task (generated, seeded)",
        num_classes=lambda cfg: int(cfg["randman_classes"]),
    ),
    "shd": Task(
        "shd", _load_shd, _encode_frames,
        lambda cfg, sg, bn: MLPNet(700, _width(cfg, 128), 20, sg,
                                   recurrent=cfg.get("recurrent", True), bn=bn),
        {"num_steps": 100, "epochs": 10, "batch_size": 32, "recurrent": True},
        build_sj=lambda cfg, sg, bn: SJMLPNet(700, _width(cfg, 128), 20, sg, bn=bn),
        has_bn=True, reference=_reference("shd_recurrent"),
        presets={"paper": {"epochs": 30, "batch_size": 32, "num_steps": 100,
                           "aux_weight": 1e-6}},
        help="Spiking Heidelberg Digits, tonic .h5 in --data-dir (100 bins x 14 ms x 700)",
        num_classes=20,
    ),
    "cifar10": Task(
        "cifar10", _load_cifar, _encode_direct,
        lambda cfg, sg, bn: ConvNet(3, 10, _width(cfg, 16), sg, bn=bn),
        {"num_steps": 1, "epochs": 10, "batch_size": 64},
        build_sj=lambda cfg, sg, bn: SJConvNet(3, 10, _width(cfg, 16), sg, bn=bn),
        has_bn=True, reference=_reference("cifar_resnet25"),
        presets={"paper": {"epochs": 200, "batch_size": 256, "num_steps": 1,
                           "aux_weight": 1e-8}},
        help="CIFAR-10 python pickle batches in --data-dir, normalised RGB, direct input",
    ),
    "dvs-gesture": Task(
        "dvs-gesture", _load_dvs, _encode_frames,
        lambda cfg, sg, bn: ConvNet(2, 11, _width(cfg, 16), sg, bn=bn),
        {"num_steps": 16, "epochs": 10, "batch_size": 16, "frame_stride": 3},
        build_sj=lambda cfg, sg, bn: SJConvNet(2, 11, _width(cfg, 16), sg, bn=bn),
        has_bn=True, reference=_reference("dvs_resnet19"),
        presets={
            "paper": {"epochs": 70, "batch_size": 16, "num_steps": 49, "frame_stride": 1,
                      "aux_weight": 1e-10},
            "cpu": {"epochs": 30, "batch_size": 16, "num_steps": 16, "frame_stride": 3,
                    "width": 16, "mc_samples": 4},
        },
        help="DVS128 Gesture frames (dvs_gesture_32 layout) in --data-dir",
        num_classes=11,
    ),
}

#: default methods of each preset (explicit --methods override); see :func:`preset_methods`
PRESET_METHODS = {
    "paper": ["snntorch-gaussian", "sbnn-st", "sbnn-agr"],
    "cpu": ["snntorch-atan", "sbnn-agr"],
}
#: tasks whose released surrogate baseline has per-step BatchNorm (SPEC 8.1; DVS has none)
PAPER_BN_BASELINE = frozenset({"cifar10", "shd"})


def preset_methods(task_name: str, preset: str) -> list[str]:
    """The default methods of ``preset`` for one task: under ``paper`` the surrogate
    baseline is the released one of the task, ``snntorch-gaussian-bn`` (per-step
    BatchNorm) on ``cifar10`` and ``shd``, ``snntorch-gaussian`` (none) on ``dvs-gesture``.

    Raises:
        ValueError: unknown task or preset.
    """
    if task_name not in TASKS:
        raise ValueError(f"unknown task {task_name!r}; choose from {sorted(TASKS)}")
    if preset not in PRESET_METHODS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESET_METHODS)}")
    methods = list(PRESET_METHODS[preset])
    if preset == "paper" and task_name in PAPER_BN_BASELINE:
        methods = ["snntorch-gaussian-bn" if m == "snntorch-gaussian" else m for m in methods]
    return methods


#: recipe shared by every task under a preset (task presets add to it)
#: the paper preset: every SBNN method uses the summed aux loss with the task's lambda,
#: and a converted model no auxiliary pull (the paper's objective, as the reference networks)
PRESETS = {"paper": {"lr": 5e-3, "noise_lr": 5e-2, "use_reference": True,
                     "aux_reduction": "sum", "aux_all": True, "aux_pull": 0.0},
           "cpu": {}}


def apply_preset(task_name: str, preset: str | None, cfg: dict) -> dict:
    """``cfg`` with the preset's defaults filled in where ``cfg`` has ``None``.

    Presets only set defaults; values given explicitly (not ``None``) win.

    Raises:
        ValueError: unknown preset, or a preset the task does not offer (``paper`` is
            for the paper's tasks, ``cpu`` for ``dvs-gesture``).
    """
    if preset is None:
        return dict(cfg)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    task = TASKS[task_name]
    if preset not in task.presets:
        offered = sorted(t for t, tk in TASKS.items() if preset in tk.presets)
        raise ValueError(f"preset {preset!r} is not defined for task {task_name!r}; "
                         f"it exists for {offered}")
    out = dict(cfg)
    for k, v in {**PRESETS[preset], **task.presets.get(preset, {})}.items():
        if out.get(k) is None:
            out[k] = v
    return out


# --------------------------------------------------------------------------- models
def build_model(task: Task, method: Method, cfg: dict) -> nn.Module:
    """The task's network for ``method``: its surrogate, framework and BatchNorm variant.

    The network is not converted: :func:`compare` converts it for SBNN methods with
    ``to_sbnn`` of its host library, as it does for a user's model. The paper's reference
    networks (``use_reference``) are built Bayesian (``bayes=True``) directly.
    """
    if method.bn and not task.has_bn:
        raise ValueError(f"method {method.name!r} (with BatchNorm) is offered for tasks with "
                         "normalisation in the reference (cifar10, dvs-gesture, shd), "
                         f"not {task.name!r}")
    if cfg.get("use_reference") and task.reference is not None:
        ref = _try_reference(task, method, cfg)
        if ref is not None:
            if method.is_sbnn and (method.aux_weight > 0 or cfg.get("aux_all")):
                from ..losses import enable_aux_loss

                enable_aux_loss(ref)
            return ref
    if method.framework == "spikingjelly":
        if task.build_sj is None:
            raise ValueError(f"method {method.name!r} is not offered for task {task.name!r}")
        surrogate = "atan" if method.surrogate == "own" else method.surrogate
        return task.build_sj(cfg, sj_surrogate(surrogate), method.bn)
    surrogate = "atan" if method.is_sbnn or method.surrogate == "own" else method.surrogate
    return task.build(cfg, snntorch_surrogate(surrogate), method.bn)


def _try_reference(task: Task, method: Method, cfg: dict) -> nn.Module | None:
    """The paper's reference network from :mod:`sbnn_addons.models`, if importable."""
    if method.framework not in ("snntorch", "any"):
        return None
    try:
        return task.reference(cfg, method)
    except (ImportError, AttributeError, TypeError, ValueError) as err:
        import warnings

        warnings.warn(f"task {task.name!r}: reference network unavailable ({err}); using the "
                      "small benchmark network", stacklevel=2)
        return None


# --------------------------------------------------------------------------- running
#: the reference recipe's task keys (sbnn_addons.models.PAPER_CONFIGS)
_PAPER_KEYS = {"shd": "shd", "cifar10": "cifar10", "dvs-gesture": "dvs_gesture"}


def _task_cfg(task: Task, cfg: dict) -> dict:
    return {"lr": 5e-3, "noise_lr": 5e-2, "mc_samples": 10, **task.defaults,
            **{k: v for k, v in cfg.items() if v is not None}}


def task_setup(task_name: str, cfg: dict) -> dict:
    """Everything :func:`sbnn_addons.bench.compare` needs for a built-in task.

    The built-in tasks are examples of the same mechanism as ``--model`` / ``--data``: a
    factory (taking the :class:`Method`, so each baseline gets its surrogate) and
    batch-major tensors with the task's ``encode`` (which returns ``[T, B, ...]``).

    Returns:
        dict of :func:`compare` keyword arguments: ``model``, ``train_data``,
        ``test_data``, ``layout``, ``encode``, ``num_classes``, ``max_train_samples``,
        ``max_test_samples``, ``recipe`` (``None``: the default), and ``cfg`` (the
        resolved config).
    """
    if task_name not in TASKS:
        raise ValueError(f"unknown task {task_name!r}; choose from {sorted(TASKS)}")
    task = TASKS[task_name]
    cfg = _task_cfg(task, cfg)
    xtr, ytr, xte, yte = task.load(cfg)
    num_steps = cfg["num_steps"]

    def encode(x: Tensor, gen: torch.Generator) -> Tensor:
        return task.encode(x, num_steps, gen)

    def factory(method: Method) -> nn.Module:
        return build_model(task, method, cfg)

    recipe = None
    if cfg.get("use_reference") and task.reference is not None and \
            task_name in _PAPER_KEYS:
        key = _PAPER_KEYS[task_name]

        def recipe(model: nn.Module, epochs: int, steps_per_epoch: int):
            from ..models import paper_recipe

            opt, sched = paper_recipe(model, key, epochs=cfg["epochs"], lr=cfg["lr"],
                                      noise_lr=cfg["noise_lr"])
            return opt, sched, "epoch"  # the reference cosine steps once per epoch

    num_classes = task.num_classes(cfg) if callable(task.num_classes) else task.num_classes
    pre_subset = cfg.get("_subset_done", False)
    return {"model": factory, "train_data": (xtr, ytr), "test_data": (xte, yte),
            "layout": "static", "encode": encode, "num_classes": num_classes,
            "max_train_samples": None if pre_subset else cfg.get("max_samples"),
            "max_test_samples": None if pre_subset else (cfg.get("max_test_samples")
                                                         or cfg.get("max_samples")),
            "recipe": recipe, "cfg": cfg}


def run_task(task_name: str, methods: list[str], seeds: list[int], cfg: dict,
             progress=None, command: str | None = None, keep_models: bool = False):
    """One built-in task through :func:`sbnn_addons.bench.compare`; EP methods after it.

    Returns:
        :class:`sbnn_addons.bench.BenchResults`.
    """
    from .results import BenchResults

    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {sorted(METHODS)}")
    from ..ep import BENCH_TASKS

    for m in methods:
        if METHODS[m].framework == "ep" and task_name not in BENCH_TASKS:
            raise ValueError(f"method {m!r} supports the tasks {list(BENCH_TASKS)} only, got "
                             f"{task_name!r}")
    setup = task_setup(task_name, cfg)
    cfg = setup.pop("cfg")
    recipe = setup.pop("recipe")
    trained = [m for m in methods if METHODS[m].framework != "ep"]
    rows, meta = [], {}
    if trained:
        res = compare(
            **setup, methods=trained, known_methods=METHODS, epochs=cfg["epochs"],
            seeds=seeds, batch_size=cfg["batch_size"], lr=cfg["lr"], noise_lr=cfg["noise_lr"],
            mc_samples=cfg["mc_samples"], recipe=recipe, aux_weight=cfg.get("aux_weight"),
            aux_reduction=cfg.get("aux_reduction", "mean"), aux_all=bool(cfg.get("aux_all")),
            interleave=not cfg.get("sequential", False), device=cfg.get("device") or "cpu",
            task=task_name, find_unused_parameters=bool(cfg.get("find_unused_parameters")),
            progress=progress, command=command, keep_models=keep_models,
            subset_seed=cfg.get("subset_seed", 0),
            sbnn_kwargs=({"aux_pull": cfg["aux_pull"]} if cfg.get("aux_pull") is not None
                         else None))
        rows, meta = res.rows, res.meta
    for m in methods:
        if METHODS[m].framework == "ep":
            for s in seeds:
                rows.append(_run_ep(task_name, m, s, cfg))
    if not meta:
        meta = {"task": task_name, "epochs": cfg["epochs"], "seeds": list(seeds),
                "methods": list(methods), "command": command, "world_size": 1}
    # keep the requested method order
    order = {m: i for i, m in enumerate(methods)}
    rows.sort(key=lambda r: (order[r["method"]], r["seed"]))
    return BenchResults(rows, meta)


def _legacy(row: dict) -> dict:
    """Keys of the former rows (``accuracy``, ``eval``, ``train_time_s``,
    ``accuracy_mean_mode``) for callers of :func:`run_one`."""
    sbnn = row.get("accuracy_mc") is not None and row["kind"] == "sbnn"
    row.setdefault("accuracy", row["accuracy_mc"] if sbnn else row["accuracy_mean"])
    row.setdefault("eval", f"mc({row['mc_samples']})" if sbnn else "deterministic")
    row.setdefault("train_time_s", row["train_s"])
    row.setdefault("accuracy_mean_mode", row["accuracy_mean"])
    return row


def run_one(task_name: str, method_name: str, seed: int, cfg: dict, progress=None,
            keep_model: bool = False) -> dict:
    """Train and evaluate one (task, method, seed) through :func:`compare`; one row.

    With ``keep_model=True`` the trained model (in eval mode) is returned under the row's
    private key ``"_model"``. The row also carries the former keys ``accuracy`` (``mc(K)``
    for SBNN, deterministic otherwise), ``eval``, ``train_time_s`` and
    ``accuracy_mean_mode``.
    """
    if task_name not in TASKS:
        raise ValueError(f"unknown task {task_name!r}; choose from {sorted(TASKS)}")
    if method_name not in METHODS:
        raise ValueError(f"unknown method {method_name!r}; choose from {sorted(METHODS)}")
    res = run_task(task_name, [method_name], [seed], cfg, progress, keep_models=keep_model)
    return _legacy(res.rows[0])


def _run_ep(task_name: str, method_name: str, seed: int, cfg: dict, progress=None) -> dict:
    """The ``ep`` methods: :func:`sbnn_addons.ep.fit_static` on the task's data and code.

    ``digits``: the same rate code as the other methods, averaged over time; ``randman``:
    the same spike trains, reduced to first-spike latencies. ``--width`` sets the hidden
    width (default 100). ``ep-binary`` uses binary +-1 weights (``weights="binary"``).
    Other tasks raise ``ValueError``.
    """
    from .. import ep

    if task_name not in ep.BENCH_TASKS:
        raise ValueError(f"method {method_name!r} supports the tasks {list(ep.BENCH_TASKS)} "
                         f"only, got {task_name!r}")
    if _world()[1] > 1:
        raise ValueError(f"method {method_name!r} runs in a single process; drop torchrun")
    cfg = _task_cfg(TASKS[task_name], cfg)
    task = TASKS[task_name]
    xtr, ytr, xte, yte = task.load(cfg)
    if cfg.get("max_samples"):
        from .data import DataSpec

        nc = task.num_classes(cfg) if callable(task.num_classes) else task.num_classes
        tr = DataSpec(x=xtr, y=ytr, layout="static").subset(
            cfg["max_samples"], cfg.get("subset_seed", 0), "train subset", nc)
        te = DataSpec(x=xte, y=yte, layout="static").subset(
            cfg.get("max_test_samples") or cfg["max_samples"], cfg.get("subset_seed", 0) + 1,
            "test subset", nc)
        xtr, ytr, xte, yte = tr.x, tr.y, te.x, te.y
    xtr = task.encode(xtr, cfg["num_steps"], torch.Generator().manual_seed(seed)).float()
    xte = task.encode(xte, cfg["num_steps"], torch.Generator().manual_seed(12345)).float()
    if task_name == "randman":
        xtr, xte = ep.first_spike_features(xtr), ep.first_spike_features(xte)
    weights = "binary" if method_name == "ep-binary" else "gaussian"
    nc = task.num_classes(cfg) if callable(task.num_classes) else task.num_classes
    row = ep.fit_static(xtr, ytr, xte, yte, num_classes=nc, seed=seed, epochs=EP_PASSES,
                        hidden=(_width(cfg, 100),), mc_samples=cfg["mc_samples"],
                        weights=weights)
    row.update({"task": task_name, "method": method_name, "kind": "ep",
                "spike_fn": f"EP ({weights} weights)", "num_steps": cfg["num_steps"],
                "batch_size": 1, "world_size": 1, "host": "-"})
    if progress is not None:
        progress.update(cfg["epochs"])
    return row


def run_grid(tasks, methods, seeds, cfg: dict, progress_factory=None,
             preset: str | None = None) -> list[dict]:
    """Run every (task, method, seed); returns the rows (see :func:`run_tasks`)."""
    return [r for res in run_tasks(tasks, methods, seeds, cfg, progress_factory, preset)
            for r in res.rows]


def run_tasks(tasks, methods, seeds, cfg: dict, progress_factory=None,
              preset: str | None = None, command: str | None = None) -> list:
    """One :class:`BenchResults` per task; ``progress_factory(total)`` makes a bar.

    ``preset`` (``"paper"``, ``"cpu"``) fills in defaults per task (see
    :func:`apply_preset`); explicit values in ``cfg`` win. ``methods=None`` with a preset:
    the preset's methods for each task (:func:`preset_methods`).
    """
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; choose from {sorted(TASKS)}")
    if methods is None:
        if preset is None:
            raise ValueError("methods=None takes the preset's methods: give a preset or "
                             "the methods")
        per_task = {t: preset_methods(t, preset) for t in tasks}
    else:
        per_task = {t: list(methods) for t in tasks}
    for m in {m for ms in per_task.values() for m in ms}:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {sorted(METHODS)}")
    cfgs = {t: apply_preset(t, preset, cfg) for t in tasks}
    for t in tasks:  # data_dir may be {task: folder}
        if isinstance(cfgs[t].get("data_dir"), dict):
            cfgs[t]["data_dir"] = cfgs[t]["data_dir"].get(t)
    out = []
    for t in tasks:
        total = _task_cfg(TASKS[t], cfgs[t])["epochs"] * len(per_task[t]) * len(seeds)
        bar = progress_factory(total) if progress_factory else None
        try:
            out.append(run_task(t, per_task[t], list(seeds), copy.deepcopy(cfgs[t]),
                                progress=(lambda n, bar=bar: bar) if bar else None,
                                command=command))
        finally:
            if bar is not None:
                bar.close()
    return out

"""Optimiser helpers: the two learning rates of an SBNN (weights vs noise scales).

A Bayesian model has two kinds of parameters: the posterior means (ordinary weights,
biases, affine scales and shifts) and the noise scales (``*std_rho``, the softplus
parameters of ``s_l``, ``s_rec``, ``s_n``, ``s_b``). :func:`param_groups` puts them in
a group of their own, so that their learning rate can differ from the weights' (the
released configuration trains them at 10x).
"""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from .base import as_float, check_module

__all__ = ["NOISE_SUFFIX", "is_noise_parameter", "noise_parameters", "param_groups"]

#: Name suffix of every noise-scale parameter in the library (``softplus(rho) = std``).
NOISE_SUFFIX = "std_rho"

#: Every module that owns noise scales (Bayesian layers, spike functions), for
#: :func:`check_noise_decay`; registered when built, copied or unpickled.
_NOISE_OWNERS: weakref.WeakSet = weakref.WeakSet()
#: Per optimiser, the decayed groups (index, size, decay) :func:`check_noise_decay` saw.
_DECAY_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DECAY_HOOK: list = [None]  # the handle of the optimiser step hook, once registered
#: Bumped at each registration of a noise owner: :func:`check_noise_trained` looks again.
_OWNERS_VERSION: list = [0]
#: Every optimiser the step hook has seen: a noise scale any of them holds is trained.
_OPTIMIZERS: weakref.WeakSet = weakref.WeakSet()
#: Per optimiser, the groups (sizes) and owners (version) :func:`check_noise_trained` saw.
_TRAINED_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Per optimiser, the noise scales found left out at a step (id -> version then).
_TRAINED_PENDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TRAINED_WARNED: weakref.WeakSet = weakref.WeakSet()
#: Per optimiser, the groups (sizes, learning rates) :func:`check_noise_step` saw.
_STEP_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STEP_WARNED: weakref.WeakSet = weakref.WeakSet()
#: Per optimiser, the (group, noise scales, weights, their group) pairs it looks at.
_STEP_PENDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Per parameter of a model that a converter copied (``to_sbnn`` without ``inplace``):
#: weak references to the parameters of the same name in the converted copies.
_COPIED: list = [None]  # a torch.utils.weak.WeakIdKeyDictionary, made at the first copy
#: Per optimiser, the groups (sizes) and conversions (count) :func:`check_converted_copy`
#: saw, and the held parameters that a conversion copied (with their copies).
_COPY_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Per optimiser, the gradients of the copies found at a step without a gradient of its own.
_COPY_PENDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Per optimiser, the gradients of the parameters it holds at its last step (their traces).
_COPY_HELD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COPY_WARNED: weakref.WeakSet = weakref.WeakSet()
_COPIES_VERSION: list = [0]  # bumped at each registered conversion


def register_noise_owner(module: nn.Module) -> None:
    """Record ``module`` as an owner of noise scales, and run :func:`check_noise_decay`
    and :func:`check_noise_trained` after every ``torch.optim`` step from then on (one
    global hook)."""
    _NOISE_OWNERS.add(module)
    _OWNERS_VERSION[0] += 1
    _register_step_hook()


def _register_step_hook() -> None:
    """Register the global optimiser step post-hook :func:`_after_step`, once."""
    if _DECAY_HOOK[0] is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _DECAY_HOOK[0] = register_optimizer_step_post_hook(_after_step)


def register_converted_copy(original: nn.Module, converted: nn.Module) -> None:
    """Record that a converter (``to_sbnn`` without ``inplace``) made ``converted`` from
    a copy of ``original``, so that an optimiser stepping ``original``'s parameters while
    ``converted`` trains warns (:func:`check_converted_copy`). Parameters are paired by
    name; one that the conversion kept (a tie to a module outside the copy) is not.

    Args:
        original: the model given to the converter (left as it was).
        converted: the converted copy it returned.
    """
    from torch.utils.weak import WeakIdKeyDictionary

    if _COPIED[0] is None:
        _COPIED[0] = WeakIdKeyDictionary()
    copied = _COPIED[0]
    twins = dict(converted.named_parameters(remove_duplicate=False))
    for name, p in original.named_parameters(remove_duplicate=False):
        twin = twins.get(name)
        if twin is not None and twin is not p:
            refs = copied.get(p)
            if refs is None:
                copied[p] = [weakref.ref(twin)]
                continue
            # copies that are gone dropped (in place: check_converted_copy's record of an
            # optimiser holds this list): converting in a loop keeps only the live ones
            refs[:] = [r for r in refs if r() is not None]
            refs.append(weakref.ref(twin))
    _COPIES_VERSION[0] += 1
    _register_step_hook()


#: ``torch.optim`` steps taken since a noise owner was first built (a converted model
#: lists its tensors for the NaN check again after each, ``moments.check_model_parameters``).
OPTIMIZER_STEPS: list = [0]


def _after_step(optimizer, args, kwargs) -> None:
    """The global optimiser step post-hook (warnings at ``stacklevel=4``: the step call)."""
    OPTIMIZER_STEPS[0] += 1
    check_noise_decay(optimizer)
    check_noise_trained(optimizer)
    check_noise_step(optimizer)
    check_converted_copy(optimizer)


def check_converted_copy(optimizer) -> None:
    """Warn (once per optimiser) where an optimiser steps the parameters of a model that a
    converter copied (``opt = Adam(net.parameters()); net = to_sbnn(net)``: the line a
    host training script gets to port it) while the converted copy trains: the optimiser
    holds the original, which gets no gradient, and the converted model never trains
    (neither its weights nor its noise scales), silently.

    Run after every ``torch.optim`` step; it looks at the parameters only where the
    optimiser holds a parameter that a conversion copied (found again when its groups'
    sizes or the conversions change). Warned at the second step in a row at which no
    backward reached a parameter it holds while a copy of one has a gradient new since
    the first (a backward through the converted model in between): not the original
    trained beside its converted copy, nor a single step without a backward. A held
    parameter's gradient that the original's training before the conversion left behind
    is not a backward reaching it (:func:`_held_trained`).
    """
    copied = _COPIED[0]
    groups = getattr(optimizer, "param_groups", None)
    if not copied or not isinstance(groups, list):
        return
    try:
        if optimizer in _COPY_WARNED:
            return
        key = (_COPIES_VERSION[0],
               tuple(len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups))
        checked = _COPY_CHECKED.get(optimizer)
        if checked is None or checked[0] != key:
            held = [p for g in groups if isinstance(g, dict) for p in g.get("params", ())]
            checked = _COPY_CHECKED[optimizer] = (
                key, held, [(p, copied[p]) for p in held if p in copied])
    except TypeError:  # an optimiser that takes no weak reference: not checked
        return
    _, held, pairs = checked
    if not pairs:
        return
    then = _COPY_HELD.get(optimizer)
    _COPY_HELD[optimizer] = {id(p): (weakref.ref(p.grad), p.grad._version)
                             for p in held if p.grad is not None}
    if _held_trained(held, then):  # it trains what it holds
        _COPY_PENDING.pop(optimizer, None)
        return
    grads = {id(t): (weakref.ref(t.grad), t.grad._version) for _, twins in pairs
             for ref in twins if (t := ref()) is not None and t.grad is not None}
    pending = _COPY_PENDING.pop(optimizer, None)
    _COPY_PENDING[optimizer] = grads
    if pending is None or not any(
            i in pending and (pending[i][0]() is not g[0]() or pending[i][1] != g[1])
            for i, g in grads.items()):
        return
    _COPY_WARNED.add(optimizer)
    _COPY_PENDING.pop(optimizer, None)
    warnings.warn(
        f"{type(optimizer).__name__} steps the parameters of the model that to_sbnn "
        f"converted a copy of ({len(pairs)} of them), which get no gradient, while the "
        "converted model trains: the converted model never trains (neither its weights "
        "nor its noise scales). to_sbnn returns a converted copy and leaves the original "
        "as it was: build the optimiser after the conversion from the converted model, "
        "e.g. torch.optim.Adam(sbnn_addons.param_groups(model, lr=...)), or convert in "
        "place (to_sbnn(net, inplace=True)) and add the new noise scales: "
        "optimizer.add_param_group({'params': list(sbnn_addons.noise_parameters(net)), "
        "'lr': ...})", UserWarning, stacklevel=4)  # at the step call


def _held_trained(held: list, then: dict | None) -> bool:
    """Whether a backward reached a parameter of ``held`` since the optimiser's last
    step, whose gradients ``then`` traced (``None``: not looked at then; any gradient
    counts). A backward gives a parameter a new gradient, or adds to its gradient in
    place (its version grows by 1, by 2 after ``zero_grad(set_to_none=False)``). A
    gradient left as it was (no ``zero_grad``: the original's, from its training before
    the conversion) or only zeroed (``set_to_none=False``: version + 1, all zeros) is
    not one. The values are read (a wait for the device) only in the last case, where
    a version grown by 1 is a backward without ``zero_grad`` or a ``zero_grad`` alone."""
    if then is None:
        return any(p.grad is not None for p in held)
    once = []
    for p in held:
        g = p.grad
        if g is None:
            continue
        old = then.get(id(p))
        if old is None or old[0]() is not g or g._version - old[1] >= 2:
            return True
        if g._version - old[1] == 1:
            once.append(g)
    for g in once:
        try:
            if g.is_sparse or g.is_meta or bool(g.detach().any()):
                return True
        except (RuntimeError, NotImplementedError):  # a layout that cannot tell: trained
            return True
    return False


def check_noise_decay(optimizer) -> None:
    """Warn (once per optimiser) where a group with weight decay holds noise scales.

    Decay pulls each ``rho`` towards 0, so each std ``softplus(rho)`` drifts up towards
    ``softplus(0) = 0.69``: the noise grows over training whatever the loss.
    ``AdamW(model.parameters())`` does it by default (``weight_decay=0.01``). Run after
    every ``torch.optim`` step; it looks at the parameters again only when the decayed
    groups change (their number, sizes or decay).
    """
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list):
        return
    decayed = [(i, g) for i, g in enumerate(groups)
               if isinstance(g, dict) and g.get("weight_decay")]
    key = tuple((i, len(g.get("params", ())), g["weight_decay"]) for i, g in decayed)
    try:
        if _DECAY_CHECKED.get(optimizer) == key:
            return
        _DECAY_CHECKED[optimizer] = key
    except TypeError:  # an optimiser that takes no weak reference: checked every step
        pass
    if not decayed:
        return
    noise = {id(p) for owner in list(_NOISE_OWNERS)
             for name, p in owner.named_parameters() if is_noise_parameter(name)}
    for i, g in decayed:
        # (a parameter without a gradient, e.g. a frozen std, is not decayed either)
        hits = sum(id(p) in noise and p.grad is not None for p in g.get("params", ()))
        if hits:
            warnings.warn(
                f"{type(optimizer).__name__} group {i} applies weight_decay="
                f"{g['weight_decay']} to {hits} noise scale(s) (*std_rho): decay pulls each "
                "rho towards 0, so each std = softplus(rho) drifts up towards softplus(0) = "
                "0.69 and the noise grows over training. Build the optimiser from "
                "sbnn_addons.param_groups(model, lr=...), whose noise group has "
                "weight_decay=0, or leave sbnn_addons.noise_parameters(model) out of the "
                "decayed group", UserWarning, stacklevel=4)  # at the step call
            return


def _shared_noise() -> set[int]:
    """The ids of the noise scales that several units share: every ``*std_rho`` of a
    noise owner but a per-weight std (``std_mode="weight"``), whose gradient is a
    weight's."""
    shared = set()
    for owner in list(_NOISE_OWNERS):
        weight = getattr(owner, "weight", None)
        per_weight = (getattr(owner, "std_mode", None) == "weight"
                      and isinstance(weight, torch.Tensor))
        for name, p in owner.named_parameters():
            if is_noise_parameter(name) and not (per_weight and p.shape == weight.shape):
                shared.add(id(p))
    return shared


def _step_key(lr) -> object:
    """A group's learning rate as :func:`check_noise_step` keys it: whether it trains
    (a number), or the tensor itself (a scheduler changes it in place; reading its value
    would wait for the GPU at every step)."""
    return lr if isinstance(lr, torch.Tensor) else bool(lr)


def check_noise_step(optimizer) -> None:
    """Warn (once per optimiser) where SGD trains noise scales in one group with weights.

    A noise scale is shared by every unit of its layer (a per-layer std) or channel, so
    its gradient is a sum over all of them, while a weight's gradient is not::

        dL/drho = sum_units dL/dsigma_unit * dsigma/drho    (N terms, N = units sharing it)

    Adam's step does not grow with the gradient; SGD's does, so at the weights' learning
    rate it moves a noise scale about N times further per step than a weight: the stds of
    a deep or wide network drift (a SEW-ResNet-18 at SpikingJelly's ``SGD(lr=0.1,
    momentum=0.9)`` recipe diverged), without a word. Run after every ``torch.optim``
    step for ``SGD`` and ``ASGD``; it looks at the parameters again only when the groups
    (their sizes, or whether their learning rate is 0) change, and else at the groups
    that hold noise scales and weights of which one kind had no gradient (frozen, e.g.
    noise scales unfrozen later) until both have one. A group of their own at a rate
    not below that of a group of trained weights (:func:`param_groups`, whose
    ``noise_lr`` defaults to ``lr``) is warned about alike. Not warned: noise scales in
    a group of their own at a smaller rate, or with weights that do not train (no
    gradient), frozen or without a gradient, per-weight stds (``std_mode="weight"``:
    not shared), or a group with ``lr=0``.
    """
    if not isinstance(optimizer, (torch.optim.SGD, torch.optim.ASGD)):
        return
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list):
        return
    key = tuple((len(g.get("params", ())), _step_key(g.get("lr")))
                if isinstance(g, dict) else None for g in groups)
    try:
        if optimizer in _STEP_WARNED:
            return
        if _STEP_CHECKED.get(optimizer) == key:
            mixed = _STEP_PENDING.get(optimizer, [])  # only the groups still undecided
        else:
            _STEP_CHECKED[optimizer] = key
            mixed = None
    except TypeError:  # an optimiser that takes no weak reference: checked every step
        mixed = None
    if mixed is None:
        noise = _shared_noise()
        live = []  # (index, lr, noise scales, weights) of each group that trains
        for i, g in enumerate(groups):
            if not isinstance(g, dict) or not g.get("lr"):
                continue
            params = list(g.get("params", ()))
            live.append((i, float(g["lr"]), [p for p in params if id(p) in noise],
                         [p for p in params if id(p) not in noise]))
        mixed = []  # (index, noise scales, weights, the weights' group where another)
        for i, lr, scales, weights in live:
            if scales and weights:
                mixed.append((i, scales, weights, None))
            if scales:  # a group of their own, but as fast as some weights
                mixed.extend((i, scales, other, j) for j, lr_j, _, other in live
                             if j != i and other and not lr < lr_j)
        try:
            _STEP_PENDING[optimizer] = mixed
        except TypeError:
            pass
    for i, scales, weights, j in mixed:
        hits = sum(p.grad is not None for p in scales)
        if hits and any(p.grad is not None for p in weights):
            lr = float(groups[i]["lr"])
            where = (f"with the weights at lr={lr}" if j is None else
                     f"at lr={lr}, not below the weights' (group {j}, "
                     f"lr={float(groups[j]['lr'])})")
            warnings.warn(
                f"{type(optimizer).__name__} group {i} trains {hits} noise scale(s) "
                f"(*std_rho) {where}: a noise scale is shared "
                "by every unit of its layer (or channel), so its gradient is a sum over "
                "all of them, and SGD, whose step grows with the gradient, moves it about "
                "that many times further per step than a weight: in a deep or wide "
                "network the stds drift and training can diverge. Give them a group of "
                "their own with a smaller learning rate, e.g. torch.optim.SGD("
                "sbnn_addons.param_groups(model, lr=0.1, noise_lr=1e-4), momentum=0.9), "
                "use Adam (its step does not grow with the gradient), or freeze them: "
                "for p in sbnn_addons.noise_parameters(model): p.requires_grad_(False)",
                UserWarning, stacklevel=4)  # at the step call
            try:
                _STEP_WARNED.add(optimizer)  # once, whatever a scheduler does to lr
                _STEP_PENDING.pop(optimizer, None)
            except TypeError:
                pass
            return


def _left_out(optimizer, groups: list) -> dict:
    """The noise scales (``id -> (parameter, owner, name)``) with a gradient that no
    optimiser seen holds, of the noise owners ``optimizer`` trains: a Bayesian layer
    whose weight (or any other parameter) it holds; a spike function (no parameter but
    its std) where it holds a parameter of any noise owner."""
    held = {id(p) for g in groups if isinstance(g, dict) for p in g.get("params", ())}
    anyone = set(held)
    for other in list(_OPTIMIZERS):
        if other is not optimizer:
            for g in getattr(other, "param_groups", ()):
                anyone.update(id(p) for p in g.get("params", ()))
    trains_owner, loose, left = False, {}, {}
    for owner in list(_NOISE_OWNERS):
        params = list(owner.named_parameters())
        own = [p for name, p in params if not is_noise_parameter(name)]
        if any(id(p) in held for _, p in params):
            trains_owner = True
        if own and not any(id(p) in held for p in own):
            continue
        found = {id(p): (p, owner, name) for name, p in params
                 if is_noise_parameter(name) and p.requires_grad and p.grad is not None
                 and id(p) not in anyone}
        (left if own else loose).update(found)
    if trains_owner:
        left.update(loose)
    return left


def _trace(p: nn.Parameter) -> tuple:
    """The version of ``p``, its gradient (a weak reference) and the gradient's version:
    whether it was changed in place (a step), and whether a backward reached it, since."""
    return p._version, weakref.ref(p.grad), p.grad._version


def check_noise_trained(optimizer) -> None:
    """Warn (once per optimiser) where an optimiser steps a Bayesian model but not some
    of its noise scales, which have a gradient and so never train, silently.

    An optimiser built before ``to_sbnn(model, inplace=True)`` holds the weights (the
    same parameters after the conversion) but not the new noise scales; so does one of a
    filter of ``named_parameters()``. Run after every ``torch.optim`` step; it looks at
    the parameters only when the groups (their sizes) or the noise owners change. A
    noise scale left out at a step is warned about at the optimiser's next step, where
    no optimiser seen by then (a second one for the noise scales, stepped after the
    first) holds it, it did not change in between (nothing else stepped it) and its
    gradient did (the loop trains through it: not a stale gradient of another model).
    Not warned: a frozen std (``requires_grad=False``) or one without a gradient.
    """
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list):
        return
    try:
        if optimizer in _TRAINED_WARNED:
            return
        _OPTIMIZERS.add(optimizer)
        pending = _TRAINED_PENDING.pop(optimizer, None)
        key = (_OWNERS_VERSION[0],
               tuple(len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups))
        if pending is None and _TRAINED_CHECKED.get(optimizer) == key:
            return
        _TRAINED_CHECKED[optimizer] = key
    except TypeError:  # an optimiser that takes no weak reference: not checked
        return
    left = _left_out(optimizer, groups)
    if pending is None:
        if left:  # another optimiser, stepped after this one, may still hold them
            _TRAINED_PENDING[optimizer] = {i: _trace(v[0]) for i, v in left.items()}
        return
    # still left out, unchanged (no other update), with a new gradient (trained along)
    left = {i: (p, *rest) for i, (p, *rest) in left.items() if i in pending
            and pending[i][0] == p._version
            and (pending[i][1]() is not p.grad or pending[i][2] != p.grad._version)}
    if not left:
        return
    _TRAINED_WARNED.add(optimizer)
    names = sorted({f"{type(owner).__name__}.{name}" for _, owner, name in left.values()})
    warnings.warn(
        f"{type(optimizer).__name__} steps the weights of a Bayesian model but not "
        f"{len(left)} of its noise scale(s) ({', '.join(names)}), which have a gradient "
        "and so never train (e.g. an optimiser built before to_sbnn(model, inplace=True), "
        "which adds the noise scales as new parameters, or one built from a filter of "
        "named_parameters()). Build the optimiser after the conversion from "
        "sbnn_addons.param_groups(model, lr=..., noise_lr=...), or add them: "
        "optimizer.add_param_group({'params': list(sbnn_addons.noise_parameters(model)), "
        "'lr': ...}); to keep the stds fixed on purpose, freeze them instead: "
        "for p in sbnn_addons.noise_parameters(model): p.requires_grad_(False)",
        UserWarning, stacklevel=4)  # at the step call


def is_noise_parameter(name: str) -> bool:
    """Whether the parameter called ``name`` (as in ``named_parameters``) is a noise scale
    (``std_rho``, ``bias_std_rho``, ...: its last component ends in ``std_rho``), also
    under ``torch.nn.utils.parametrize``, which stores a parametrized ``std_rho`` as
    ``parametrizations.std_rho.original`` (``original0``, ... for several)."""
    parts = name.split(".")
    if (len(parts) >= 3 and parts[-3] == "parametrizations"
            and re.fullmatch(r"original\d*", parts[-1])):
        return parts[-2].endswith(NOISE_SUFFIX)
    return parts[-1].endswith(NOISE_SUFFIX)


def noise_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The trainable noise scales of ``model`` (parameters named ``*std_rho``)."""
    check_module(model, "noise_parameters")
    for name, p in model.named_parameters():
        if p.requires_grad and is_noise_parameter(name):
            yield p


def _check_lr(name: str, value) -> None:
    if (number := as_float(value)) is None or not 0 < number < float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def param_groups(model: nn.Module, lr: float, noise_lr: float | None = None) -> list[dict]:
    """Optimiser parameter groups: weights at ``lr``, noise scales at ``noise_lr``.

    .. code-block:: text

        group "weights": every trainable parameter but the noise scales, lr = lr
        group "noise":   parameters named *std_rho (s = softplus(rho)), lr = noise_lr,
                         weight_decay = 0

    Works on any model: a plain snnTorch / SpikingJelly model has no noise group.

    Args:
        model: the network.
        lr: learning rate of the weights, biases and affine parameters (> 0).
        noise_lr: learning rate of the noise scales (default ``lr``). Adam moves each
            ``rho`` by about ``noise_lr`` per step, which for a small std
            ``s = softplus(rho)`` is a relative change of about ``noise_lr``. The released
            configuration uses ``10 * lr`` at ``lr = 5e-3``; at the higher learning rates of
            the host tutorials (Adam 1e-2) that moves every std by about 10 % per step and
            a converted model learns slower (Benchmarks page, "Converted host models at
            defaults"). SGD's step grows with the gradient, which for a shared std sums
            over every unit sharing it: give SGD a ``noise_lr`` well below ``lr`` (at the
            default its first step warns, :func:`check_noise_step`).

    The noise group has ``weight_decay=0``, whatever the optimiser's: decay pulls ``rho``
    towards 0, i.e. every std towards ``softplus(0) = 0.69``, which *inflates* small
    stds (a prior on the stds is the KL term of :func:`~sbnn_addons.sbnn_objective`).

    Returns:
        A list for ``torch.optim.Adam(param_groups(model, lr=5e-3))``; each group has a
        ``"name"`` (``"weights"`` or ``"noise"``); empty groups are left out.

    Raises:
        ValueError: a learning rate that is not a finite positive number.
    """
    check_module(model, "param_groups")
    _check_lr("lr", lr)
    noise_lr = lr if noise_lr is None else noise_lr
    _check_lr("noise_lr", noise_lr)
    weights, noise = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (noise if is_noise_parameter(name) else weights).append(p)
    groups = []
    if weights:
        groups.append({"params": weights, "lr": float(lr), "name": "weights"})
    if noise:
        groups.append({"params": noise, "lr": float(noise_lr), "weight_decay": 0.0,
                       "name": "noise"})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups

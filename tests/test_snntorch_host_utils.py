"""snnTorch's own utilities on converted and exported models (issue 15): utils.reset on
copies, truncated BPTT with detach_hidden, the original surrogate back on export, and
validation before an inplace conversion changes anything. Real snnTorch models only."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import snntorch as snn
import snntorch.utils as sutils
import torch
from _copies import HOW, copy_by
from _kernel import needs_kernel
from _snntorch_nets import LoopLeaky, make
from snntorch import surrogate
from torch import nn

import sbnn_addons
from sbnn_addons import kernels
from sbnn_addons.snntorch import membrane_variance, spike_grad, to_sbnn, to_snntorch


def _tutorial_seq(spike_grad=None):
    """snnTorch tutorial 6/7 style: nn.Sequential with init_hidden neurons."""
    kw = {} if spike_grad is None else {"spike_grad": spike_grad}
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(16, 24), snn.Leaky(beta=0.9, init_hidden=True, **kw),
        nn.Linear(24, 4), snn.Leaky(beta=0.9, init_hidden=True, output=True, **kw),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(3.0)
    return net


def forward_pass(net, data):
    """snnTorch tutorial 6's own loop: utils.reset, then one call per step."""
    spk_rec, mem_rec = [], []
    sutils.reset(net)
    for step in range(data.size(0)):
        spk_out, mem_out = net(data[step])
        spk_rec.append(spk_out)
        mem_rec.append(mem_out)
    return torch.stack(spk_rec), torch.stack(mem_rec)


def _data(steps=6, batch=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(steps, batch, 16, generator=g) < 0.5).float()


def _neurons(net):
    return [m for m in net.modules() if isinstance(m, snn.Leaky | snn.RLeaky)]


def _mems(net):
    return [m.mem for m in net.modules() if isinstance(m, snn.Leaky | snn.RLeaky)]


@pytest.mark.parametrize("inplace", [False, True])
def test_utils_reset_resets_converted_model_and_its_variance(inplace):
    model = to_sbnn(_tutorial_seq(), inplace=inplace)
    x = _data()
    for t in range(x.shape[0]):
        model(x[t])
    assert any(m.abs().max() > 0 for m in _mems(model))
    assert any(membrane_variance(m) is not None for m in _neurons(model))
    sutils.reset(model)
    for m in _neurons(model):
        assert m.mem.abs().max() == 0
        assert membrane_variance(m) is None  # the noise variance goes with the membrane
    # the host's own loop gives the same result twice (no state leaks between batches)
    sbnn_addons.seed_spikes(model, 3)
    first = forward_pass(model, x)
    sbnn_addons.seed_spikes(model, 3)
    second = forward_pass(model, x)
    assert torch.equal(first[1], second[1])


@pytest.mark.parametrize("how", HOW)
def test_utils_reset_reaches_copies_of_converted_model(how):
    model = to_sbnn(_tutorial_seq())
    dup = copy_by(model, how)
    x = _data()
    for t in range(x.shape[0]):
        dup(x[t])
    sutils.reset(dup)
    assert all(m.mem.abs().max() == 0 and membrane_variance(m) is None for m in _neurons(dup))


def test_utils_reset_resets_exported_model():
    model = to_sbnn(_tutorial_seq())
    plain = to_snntorch(model)
    x = _data()
    first = forward_pass(plain, x)
    second = forward_pass(plain, x)  # tutorial 6: no membrane carried over
    assert torch.equal(first[1], second[1])
    with torch.no_grad(), sbnn_addons.mode(model, "mean"):
        ref = forward_pass(model, x)
    assert torch.equal(first[0], ref[0])


def test_truncated_bptt_with_detach_hidden():
    """snnTorch's detach_hidden detaches the membrane in place; the attached variance
    must follow, or the next backward runs through a freed graph."""
    model = to_sbnn(_tutorial_seq())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = _data(steps=8)
    sutils.reset(model)
    for chunk in x.split(2):
        loss = sum(sum(o.sum() for o in model(xt)) for xt in chunk)
        opt.zero_grad()
        loss.backward()
        opt.step()
        snn.Leaky.detach_hidden()
    std_grads = [m.std_rho.grad for m in model.modules() if hasattr(m, "std_rho")]
    assert all(g is not None and torch.isfinite(g).all() for g in std_grads)


# --------------------------------------------------------------------------- surrogate
def test_export_restores_fast_sigmoid_closure():
    fs = surrogate.fast_sigmoid(slope=25)
    model = to_sbnn(_tutorial_seq(spike_grad=fs))
    plain = to_snntorch(model)
    assert plain[1].spike_grad is fs and plain[3].spike_grad is fs
    # a deepcopy of the converted model keeps it too
    assert to_snntorch(copy.deepcopy(model))[1].spike_grad is fs


def test_export_after_pickle_rebuilds_the_closure_with_its_arguments():
    model = to_sbnn(_tutorial_seq(spike_grad=surrogate.fast_sigmoid(slope=7)))
    again = pickle.loads(pickle.dumps(model))
    fn = to_snntorch(again)[1].spike_grad
    assert fn.__qualname__ == "fast_sigmoid.<locals>.inner"
    u = torch.linspace(-1, 1, 11, requires_grad=True)
    u_ref = u.detach().clone().requires_grad_()
    fn(u).sum().backward()
    surrogate.fast_sigmoid(slope=7)(u_ref).sum().backward()
    assert torch.equal(u.grad, u_ref.grad)


def steep_atan(alpha=2.0):
    """A user's surrogate factory (module level) that rebinds its argument: the closure
    holds ``2 * alpha``, not the ``alpha`` it was called with."""
    alpha = 2 * alpha

    def inner(x):
        return surrogate.ATan.apply(x, alpha)

    return inner


def test_export_after_pickle_does_not_rebuild_a_closure_from_changed_arguments():
    """A closure is rebuilt after pickling by calling its factory with the values its
    free variables hold. A factory that changes an argument before the closure captures
    it (``alpha = 2 * alpha``) was rebuilt with the changed value as the argument: the
    exported surrogate had ``alpha = 12`` instead of 6, silently. Such a closure is not
    taken for rebuildable: the export after pickling names it and asks for the
    surrogate; before pickling it gets the original back."""
    fn = steep_atan(alpha=3.0)
    model = to_sbnn(_tutorial_seq(spike_grad=fn))
    assert to_snntorch(model)[1].spike_grad is fn
    again = pickle.loads(pickle.dumps(model))
    with pytest.raises(ValueError, match=r"steep_atan.*spike_grad=surrogate\.atan\(\)"):
        to_snntorch(again)
    given = steep_atan(alpha=3.0)
    assert to_snntorch(again, spike_grad=given)[1].spike_grad is given


def test_export_default_atan_and_explicit_override():
    net = _tutorial_seq()
    original = net[1].spike_grad
    model = to_sbnn(net)
    assert to_snntorch(model)[1].spike_grad is original  # snnTorch's default atan()
    ste = surrogate.StraightThroughEstimator.apply
    assert to_snntorch(model, spike_grad=ste)[1].spike_grad is ste


@pytest.mark.parametrize("wrong", [surrogate.atan, surrogate.ATan, "atan", 2.0])
def test_export_refuses_a_spike_grad_that_is_not_a_spike_function(wrong):
    """``to_snntorch(model, spike_grad=surrogate.atan)`` (the factory, not called) used
    to export, and the exported model failed at its first step with an unrelated error
    (``'function' object has no attribute 'clone'``): it raises at the export, naming
    the fix."""
    model = to_sbnn(_tutorial_seq())
    with pytest.raises(TypeError, match=r"surrogate\.atan\(\)"):
        to_snntorch(model, spike_grad=wrong)


def test_export_restores_module_surrogate():
    class Steep(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("slope", torch.tensor(4.0))

        def forward(self, u):
            return surrogate.FastSigmoid.apply(u, float(self.slope))

    model = to_sbnn(_tutorial_seq(spike_grad=Steep()))
    assert "1.spike_grad.slope" not in model.state_dict()  # replaced by the SBNN spike
    plain = to_snntorch(model)
    assert isinstance(plain[1].spike_grad, Steep) and "1.spike_grad.slope" in plain.state_dict()


# --------------------------------------------------------------------------- validation
def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [type(m) for m in model.modules()])


def _same(model, snap):
    state, kinds = snap
    now = model.state_dict()
    return (kinds == [type(m) for m in model.modules()] and now.keys() == state.keys()
            and all(torch.equal(now[k], v) for k, v in state.items()))


@pytest.mark.parametrize("kwargs, match", [
    ({"estimator": "iwts"}, "iwts"),
    ({"std": -1.0}, "std"),
    ({"std_mode": "neuron"}, "std_mode"),
    ({"bias_std": float("nan")}, "bias_std"),
    ({"spike_std": -0.5}, "std"),
    ({"batchnorm": "fold"}, "batchnorm"),
    ({"include": "fc9"}, "fc9"),
    ({"exclude": "fc9"}, "fc9"),
    ({"include": 3}, "include"),
])
def test_failed_inplace_conversion_leaves_model_untouched(kwargs, match):
    net = LoopLeaky()
    snap = _snapshot(net)
    with pytest.raises((ValueError, TypeError), match=match):
        to_sbnn(net, inplace=True, **kwargs)
    assert _same(net, snap)
    assert type(net.lif1) is snn.Leaky and net.lif1.spike_grad is not None


def test_include_exclude_single_string_is_one_name():
    net, _ = make("loop_leaky")
    model = to_sbnn(net, exclude="fc1")
    assert not sbnn_addons.is_bayesian(model.fc1) and sbnn_addons.is_bayesian(model.fc2)
    model = to_sbnn(net, include="fc2")
    assert not sbnn_addons.is_bayesian(model.fc1) and sbnn_addons.is_bayesian(model.fc2)
    seq = _tutorial_seq()
    model = to_sbnn(seq, exclude="0")  # a container or a layer name, not its characters
    assert not sbnn_addons.is_bayesian(model[0]) and sbnn_addons.is_bayesian(model[2])


def test_empty_include_raises_instead_of_converting_no_layer():
    """``include=[]`` (e.g. a filtered list of names that came out empty) used to select no
    weight layer, silently: a "converted" model without a Bayesian layer, and without the
    warning ``include=None`` gives for layers left deterministic. It raises, naming
    ``include=None``; an empty ``exclude`` still excludes nothing."""
    net, _ = make("loop_leaky")
    for empty in ([], ()):
        with pytest.raises(ValueError, match="include=None"):
            to_sbnn(net, include=empty)
    model = to_sbnn(net, exclude=[])
    assert sbnn_addons.is_bayesian(model.fc1) and sbnn_addons.is_bayesian(model.fc2)


class _TruncatedLoop(nn.Module):
    """The snnTorch explicit-loop style with a truncation (``mem = mem.detach()``) or an
    in-place reset (``mem.zero_()``) of the membrane after step ``cut``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 16)
        self.lif = snn.Leaky(beta=0.9)

    def forward(self, x, how=None, cut=2):
        mem = self.lif.init_leaky()
        variances, out = [], 0
        for t in range(x.shape[0]):
            spk, mem = self.lif(self.fc(x[t]), mem)
            variances.append(membrane_variance(self.lif).detach().clone())
            out = out + spk
            if t == cut and how == "detach":
                mem = mem.detach()
            if t == cut and how == "zero_":
                mem.zero_()
        return out, variances


def test_explicit_loop_detach_keeps_the_noise_variance_without_its_graph():
    """Truncated BPTT in an explicit loop: ``mem.detach()`` keeps the membrane's noise
    variance (the same V_t as without it), detached like the membrane."""
    torch.manual_seed(0)
    model = to_sbnn(_TruncatedLoop())
    x = torch.rand(6, 4, 10)
    _, full = model(x)
    _, cut = model(x, "detach")
    for a, b in zip(full, cut):
        torch.testing.assert_close(a, b)
    out, _ = model(x, "detach", cut=4)
    out.sum().backward()
    assert model.fc.std_rho.grad is not None and torch.isfinite(model.fc.std_rho.grad).all()


def test_membrane_changed_in_place_raises():
    """An in-place change of the membrane between steps leaves its variance unknown: the
    next step raises, naming the fix (a new membrane)."""
    model = to_sbnn(_TruncatedLoop())
    with pytest.raises(sbnn_addons.VarianceFlowError, match="changed in place.*init_leaky"):
        model(torch.rand(6, 4, 10), "zero_")


class _MaskedLoop(nn.Module):
    """Variable-length sequences in the explicit-loop style: the membrane of the finished
    samples is zeroed in place after each step (``mem.mul_(mask[t])``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 16)
        self.lif = snn.Leaky(beta=0.9)

    def forward(self, x, mask):
        mem = self.lif.init_leaky()
        spk_rec, mem_rec = [], []
        for t in range(x.shape[0]):
            spk, mem = self.lif(self.fc(x[t]), mem)
            mem.mul_(mask[t])
            spk_rec.append(spk)
            mem_rec.append(mem.clone())
        return torch.stack(spk_rec), torch.stack(mem_rec)


@pytest.mark.parametrize("how", ["zero std", "deterministic layer"])
def test_membrane_changed_in_place_without_variance_resets_from_its_new_values(how):
    """A membrane that carries no noise variance (a zero-std conversion, or a neuron fed
    by an excluded layer), changed in place between steps: its reset is computed from the
    new values, as in snnTorch (a zeroed membrane that had fired loses no threshold), not
    taken from the spikes it emitted before the change; in both styles. In ``mean`` mode
    (no variance) a noisy model runs the edit as well, also under
    ``torch.inference_mode()``."""
    torch.manual_seed(0)
    host = _MaskedLoop()
    with torch.no_grad():
        host.fc.weight.mul_(3.0)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 4, 10, generator=g) * 2
    mask = (torch.rand(6, 4, 1, generator=g) > 0.4).float()
    want = host(x, mask)
    assert 0 < float(want[0].mean()) < 1 and 0 < float(mask.mean()) < 1
    kw = (dict(std=0.0, learn_std=False, spike_std=None) if how == "zero std"
          else dict(exclude="fc"))
    model = to_sbnn(host, **kw)
    with torch.no_grad(), sbnn_addons.mode(model, "mean"):
        got = model(x, mask)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # mean mode carries no variance, so a noisy model runs the edit too; inference
    # tensors have no version counter: the values tell
    noisy = to_sbnn(host)
    for m, context in ((noisy, torch.no_grad), (noisy, torch.enable_grad),
                       (model, torch.inference_mode), (noisy, torch.inference_mode)):
        with context(), sbnn_addons.mode(m, "mean"):
            got = m(x, mask)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(sbnn_addons.VarianceFlowError, match="changed in place"):
        noisy(x, mask)  # sample mode: the noise variance of an edited membrane is unknown

    seq = nn.Sequential(host.fc, snn.Leaky(beta=0.9, init_hidden=True))

    def run(net):
        sutils.reset(net)
        out = []
        for t in range(x.shape[0]):
            out.append(net(x[t]))
            with torch.no_grad():
                net[1].mem.mul_(mask[t])
        return torch.stack(out)

    model = to_sbnn(seq, **dict(kw, exclude="0") if how != "zero std" else kw)
    with torch.no_grad(), sbnn_addons.mode(model, "mean"):
        assert torch.equal(run(model), run(seq))


def test_autocast_keeps_the_membrane_in_float32_as_snntorch_does():
    """Under torch.autocast(bfloat16) snnTorch's surrogates return float32 spikes, so the
    membrane accumulates in float32; the converted model's spikes do the same, and its
    mean mode emits the original's spikes."""
    def make():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(10, 16), snn.Leaky(beta=0.9, init_hidden=True),
                             nn.Linear(16, 4),
                             snn.Leaky(beta=0.8, init_hidden=True, output=True))

    net, model = make(), to_sbnn(make())
    x = torch.rand(8, 4, 10) * 2

    def run(m):
        sutils.reset(m)
        return torch.stack([m(xt)[0] for xt in x])

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = run(net)
        with sbnn_addons.mode(model, "mean"):
            got = run(model)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)
    assert model[1].mem.dtype == torch.float32


@pytest.mark.parametrize("style", ["converted", "spike_grad"])
def test_bfloat16_model_outside_autocast_keeps_bfloat16_spikes(style):
    """A model cast to bfloat16 (no autocast): the spikes stay bfloat16, so the next
    bfloat16 layer takes them, as a float64 model's stay float64 (they were float32, the
    dtype snnTorch's surrogates return under autocast: "mat1 and mat2 must have the same
    dtype"). Mean mode equals the float64 model's but for drives that round across the
    threshold."""
    def make():
        torch.manual_seed(3)
        kw = {"spike_grad": spike_grad()} if style == "spike_grad" else {}
        net = nn.Sequential(nn.Linear(10, 16), snn.Leaky(beta=0.9, init_hidden=True, **kw),
                            nn.Linear(16, 4),
                            snn.Leaky(beta=0.8, init_hidden=True, output=True, **kw))
        return net if style == "spike_grad" else to_sbnn(net)

    x = torch.rand(8, 64, 10) * 2

    def run(m, dtype):
        sutils.reset(m)
        return torch.stack([m(xt.to(dtype))[0] for xt in x])

    ref, model = make().double(), make().to(torch.bfloat16)
    with torch.no_grad(), sbnn_addons.mode(ref, "mean"), sbnn_addons.mode(model, "mean"):
        want, got = run(ref, torch.float64), run(model, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and model[1].mem.dtype == torch.bfloat16
    assert float((got.double() != want).double().mean()) < 0.02
    run(model, torch.bfloat16).float().sum().backward()
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()
               for p in model.parameters())


@pytest.mark.parametrize("mem_dtype", [torch.float64, torch.float16])
def test_membrane_of_another_dtype_gives_spikes_of_the_neurons_dtype(mem_dtype):
    """An explicit time loop whose initial membranes are of another dtype than the
    float32 model (``torch.from_numpy(np.zeros(...))`` is float64): snnTorch's spikes are
    float32, and the next layer takes them. The converted neuron's spikes were float64,
    and the next Bayesian layer raised "has torch.float32 weights but its input is
    torch.float64" for an input that was float32. They are of the neuron's dtype (its
    threshold's): mean mode equals the original, spikes and membranes, dtypes included;
    sample mode trains."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.lif1 = nn.Linear(8, 16), snn.Leaky(beta=0.9)
            self.fc2, self.lif2 = nn.Linear(16, 4), snn.Leaky(beta=0.8)

        def forward(self, x):
            mem1 = torch.zeros(x.shape[1], 16, dtype=mem_dtype)
            mem2 = torch.zeros(x.shape[1], 4, dtype=mem_dtype)
            spikes, mems = [], []
            for xt in x:
                spk1, mem1 = self.lif1(self.fc1(xt), mem1)
                spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
                spikes.append(spk2)
                mems.append(mem2)
            return torch.stack(spikes), torch.stack(mems)

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.fc1.weight.mul_(4.0)
        net.fc2.weight.mul_(4.0)
    x = torch.rand(5, 8, 8)
    model = to_sbnn(net)
    want_spk, want_mem = net(x)
    with sbnn_addons.mode(model, "mean"):
        spk, mem = model(x)
    assert spk.dtype == want_spk.dtype == torch.float32 and mem.dtype == want_mem.dtype
    assert want_spk.sum() > 0
    assert torch.equal(spk, want_spk) and torch.equal(mem, want_mem)
    spk, mem = model(x)
    assert spk.dtype == torch.float32 and mem.dtype == want_mem.dtype
    spk.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("compiled", [False, True])
def test_drop_in_spike_grad_with_a_float64_membrane_gives_the_models_dtype(compiled):
    """The drop-in ``spike_grad()`` in an unconverted float32 snnTorch model whose
    explicit loop starts from float64 membranes: snnTorch's own surrogates return float32
    spikes, and the next ``nn.Linear`` takes them; the drop-in's were float64, and the
    next layer raised "mat1 and mat2 must have the same dtype" (compiled too, where the
    function's remembered calls are of the drive's dtype). They are of the spike
    function's own dtype (the model's: it is cast with the neuron), float32."""
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
    lif1 = snn.Leaky(beta=0.9, spike_grad=spike_grad())
    lif2 = snn.Leaky(beta=0.8, spike_grad=spike_grad())
    x = torch.rand(2, 8, 8) * 3

    def step(x):
        mem1 = torch.zeros(8, 16, dtype=torch.float64)
        mem2 = torch.zeros(8, 4, dtype=torch.float64)
        out = []
        for xt in x:
            spk1, mem1 = lif1(fc1(xt), mem1)
            spk2, mem2 = lif2(fc2(spk1), mem2)
            out.append(spk2)
        return torch.stack(out)

    torch._dynamo.reset()
    try:
        out = (torch.compile(step, fullgraph=True, backend="aot_eager") if compiled
               else step)(x)
    finally:
        torch._dynamo.reset()
    assert out.dtype == torch.float32
    out.sum().backward()
    assert fc1.weight.grad.abs().sum() > 0 and torch.isfinite(fc1.weight.grad).all()


@pytest.mark.parametrize("how", HOW)
def test_copy_mid_sequence_continues_like_the_original(how):
    """A copy made between two steps (a checkpoint) carries the membrane and its noise
    variance: continued in ``mean`` mode it equals the uninterrupted run, and in
    ``sample`` mode its membranes carry the same variance. A membrane changed in place
    before the copy still raises in the copy."""
    model = to_sbnn(_tutorial_seq())
    x = _data()

    def dup(m):
        return copy_by(m, how)

    with torch.no_grad():
        with sbnn_addons.mode(model, "mean"):
            full = forward_pass(model, x)[1]
            sutils.reset(model)
            head = [model(x[t])[1] for t in range(3)]
            copied = dup(model)
            tail = [copied(x[t])[1] for t in range(3, len(x))]
        assert torch.equal(torch.stack(head + tail), full)
        sutils.reset(model)
        for t in range(3):
            model(x[t])
        copied = dup(model)
        for a, b in zip(model.modules(), copied.modules()):
            if isinstance(a, snn.Leaky):
                torch.testing.assert_close(membrane_variance(b), membrane_variance(a))
        copied(x[3])  # continues
        model[1].mem.add_(1.0)  # changed in place: its variance is unknown, in a copy too
        with pytest.raises(sbnn_addons.VarianceFlowError, match="changed in place"):
            dup(model)(x[3])


@pytest.mark.parametrize("style", ["sequential", "loop"])
def test_inference_mode_gives_the_no_grad_result(style):
    """``torch.inference_mode()`` (inference tensors have no version counter) runs both
    snnTorch styles and gives what ``torch.no_grad()`` gives, in both modes."""
    torch.manual_seed(0)
    model = to_sbnn(_tutorial_seq() if style == "sequential" else LoopLeaky(num_inputs=16))
    x = _data()

    def run():
        if style == "sequential":
            return forward_pass(model, x)[1]
        return model(x)[1]

    for mode in ("mean", "sample"):
        with sbnn_addons.mode(model, mode):
            torch.manual_seed(3)
            with torch.no_grad():
                ref = run()
            torch.manual_seed(3)
            with torch.inference_mode():
                got = run()
        assert torch.equal(got, ref), mode


def _first_layer_run(pass_back, steps: int = 8, record=lambda spk, mem: spk):
    """The first layer of a converted tutorial-5 loop, seeded, with ``pass_back(mem, t)``
    applied to the membrane handed back at every step; the recorded values ``[T, ...]``."""
    torch.manual_seed(0)
    model = to_sbnn(LoopLeaky(num_inputs=16))
    lif, fc = model.lif1, model.fc1
    x = _data(steps=steps) * 3
    torch.manual_seed(5)
    mem, out = lif.init_leaky(), []
    for t in range(len(x)):
        spk, mem = lif(fc(x[t]), pass_back(mem, t))
        out.append(record(spk, mem).detach())
    return torch.stack(out)


def test_detached_membrane_keeps_the_emitted_reset():
    """Truncated BPTT in an explicit loop (``mem = mem.detach()`` between chunks) cuts
    gradients only: the next step's reset is still the spike the neuron emitted, so the
    spikes equal an undetached run's."""
    ref = _first_layer_run(lambda mem, t: mem)
    assert 0 < float(ref.mean()) < 1
    assert torch.equal(_first_layer_run(lambda mem, t: mem.detach() if t % 2 == 0 else mem),
                       ref)


def test_a_validation_forward_with_gradients_adds_no_aux_terms():
    """``model.eval()`` then a forward with gradients on (no ``no_grad``): nothing is
    collected for the next training step's auxiliary loss."""
    model = to_sbnn(_tutorial_seq(), aux_loss=True)
    x = _data()
    forward_pass(model, x)
    reference = sbnn_addons.aux_loss(model)
    model.eval()
    forward_pass(model, x)  # validation, gradients on
    model.train()
    assert float(sbnn_addons.aux_loss(model)) == 0.0
    torch.manual_seed(0)
    forward_pass(model, x)
    assert float(sbnn_addons.aux_loss(model)) > 0 and reference > 0


def test_a_value_copy_of_the_membrane_continues_the_sequence():
    """``mem.clone()`` (or the membrane of a copied model) passed back is the same
    membrane by value: the next step equals the one with ``mem`` itself (variance and
    emitted reset found), in sample mode with the same seed."""
    membranes = lambda spk, mem: mem  # noqa: E731
    ref = _first_layer_run(lambda mem, t: mem, 4, membranes)
    for copy_fn in (lambda m: m.clone(), lambda m: m + 0):
        got = _first_layer_run(lambda mem, t, c=copy_fn: c(mem) if t else mem, 4, membranes)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_time_loop_outside_the_model_over_its_submodules():
    """A time loop written outside the converted model, calling its layers and neurons
    directly (``model.lif1(model.fc1(x[t]), mem1)``), carries the noise variance as the
    model's own loop does (same draws, same membranes) and checks its inputs; in ``mean``
    mode it equals the host model."""
    torch.manual_seed(0)
    net = LoopLeaky()
    with torch.no_grad():
        net.fc1.weight.mul_(3)
        net.fc2.weight.mul_(3)
    model = to_sbnn(net)
    x = (torch.rand(6, 4, 64) < 0.4).float()

    def outside(m, x):
        mem1, mem2 = m.lif1.init_leaky(), m.lif2.init_leaky()
        spk_rec, mem_rec = [], []
        for t in range(x.shape[0]):
            spk1, mem1 = m.lif1(m.fc1(x[t]), mem1)
            spk2, mem2 = m.lif2(m.fc2(spk1), mem2)
            spk_rec.append(spk2)
            mem_rec.append(mem2)
        return torch.stack(spk_rec), torch.stack(mem_rec)

    sbnn_addons.seed_spikes(model, 1)
    inside = model(x)
    sbnn_addons.seed_spikes(model, 1)
    out = outside(model, x)
    assert inside[0].sum() > 0
    assert torch.equal(inside[0], out[0]) and torch.equal(inside[1], out[1])
    out[1].square().sum().backward()
    assert model.fc1.std_rho.grad.abs() > 0 and model.lif1.spike_grad.std_rho.grad.abs() > 0
    with sbnn_addons.mode(model, "mean"):
        mean = outside(model, x)
    host = outside(net, x)
    assert torch.equal(mean[0], host[0]) and torch.equal(mean[1], host[1])
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        outside(model, bad)


def test_membrane_variance_of_a_neuron_that_is_not_converted_raises():
    """``membrane_variance`` on the original model's neuron (``to_sbnn`` converts a copy)
    used to return ``None``, read as "no noise yet": it raises, naming the copy. A
    converted, drop-in or excluded neuron answers as before."""
    net = _tutorial_seq()
    model = to_sbnn(net, exclude=["2", "3"])
    model(torch.rand(5, 16))
    assert membrane_variance(model[1]) is not None
    assert membrane_variance(model[3]) is None  # excluded: no noise
    with pytest.raises(TypeError, match="to_sbnn converts a copy"):
        membrane_variance(net[1])
    with pytest.raises(TypeError, match="takes an snnTorch neuron"):
        membrane_variance(model)
    drop_in = snn.Leaky(beta=0.9, init_hidden=True, spike_grad=sbnn_addons.snntorch.spike_grad())
    assert membrane_variance(drop_in) is None


@pytest.mark.parametrize("strip", [lambda x: x.as_subclass(torch.Tensor), lambda x: x.data,
                                   lambda x: torch.tensor(x.tolist())])
def test_a_leaky_pre_hook_that_strips_the_variance_raises(strip):
    net = to_sbnn(nn.Sequential(nn.Linear(8, 6), snn.Leaky(beta=0.9, init_hidden=True)))
    net.train()
    net[1].register_forward_pre_hook(lambda mod, args: (strip(args[0]), *args[1:]))
    sbnn_addons.snntorch.reset(net)
    with pytest.raises(sbnn_addons.VarianceFlowError, match=r"'0'.*reached no spiking neuron"):
        net(torch.rand(4, 8))


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("free", ["utils.reset", "detach_hidden"])
def test_copy_after_a_training_step_and_the_hosts_reset_or_detach(how, free):
    """After a training forward, snnTorch's ``utils.reset`` (or ``detach_hidden``) leaves
    the plain model copyable (``AveragedModel``, ``deepcopy``): the converted model's kept
    variance and spikes then hold no graph either, and a detached copy continues in
    ``sample`` mode with the same spikes as the original, under the same seed."""
    model = to_sbnn(_tutorial_seq())
    x = _data()
    sutils.reset(model)
    loss = sum(sum(o.sum() for o in model(x[t])) for t in range(3))
    loss.backward()
    if free == "utils.reset":
        sutils.reset(model)
    else:
        snn.Leaky.detach_hidden()
    copied = copy_by(model, how)
    averaged = torch.optim.swa_utils.AveragedModel(model)
    for m in (model, copied, averaged):
        sbnn_addons.seed_spikes(m, 1)
    for t in range(3, len(x)):
        for a, b, c in zip(model(x[t]), copied(x[t]), averaged(x[t])):
            assert torch.equal(a, b) and torch.equal(a, c)


def _dropout_net(inplace: bool) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(16, 24), snn.Leaky(beta=0.9, init_hidden=True), nn.Dropout(0.3, inplace),
        nn.Linear(24, 4), snn.Leaky(beta=0.9, init_hidden=True, output=True))
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    return net.train()


@pytest.mark.parametrize("backend", [pytest.param("kernel", marks=needs_kernel), "torch"])
def test_spikes_changed_in_place_after_a_converted_neuron(backend):
    """``nn.Dropout(inplace=True)`` after a neuron changes its spikes in place, which the
    host model allows. The fused spike kernel keeps the spikes it returns for its backward
    (shared with the layer they feed), so there the backward raises, naming the cause and
    the fix (PyTorch's own message named only 'output 0 of FusedSpike'); the PyTorch path
    (CUDA tensors) saves a byte copy and trains; ``nn.Dropout()`` trains on both."""
    x = _data()
    with kernels.use_kernels(backend == "kernel"):
        for inplace in (True, False):
            for net in (_dropout_net(inplace), to_sbnn(_dropout_net(inplace))):
                sutils.reset(net)
                loss = sum(sum(o.sum() for o in net(xt)) for xt in x)
                if inplace and backend == "kernel" and sbnn_addons.is_bayesian(net[0]):
                    with pytest.raises(RuntimeError,
                                       match=r"(?s)changed in place.*inplace=True"):
                        loss.backward()
                    continue
                loss.backward()
                assert net[0].weight.grad.abs().sum() > 0


def test_vmap_ensemble_maps_the_parameters_and_names_mapped_thresholds():
    """``torch.func`` ensembles of a converted ``Sequential`` (``stack_module_state``,
    ``functional_call`` under ``vmap``): mapping the parameters gives, in ``mean`` mode,
    each member's own result; mapping the buffers too (the neurons' thresholds, which the
    spike function reads as one number) failed with "Cannot access data pointer of Tensor
    that doesn't have storage", naming neither the threshold nor the fix: it is named."""
    from torch.func import functional_call, stack_module_state, vmap

    from sbnn_addons.snntorch import reset

    def make(seed):
        torch.manual_seed(seed)
        return to_sbnn(nn.Sequential(nn.Linear(16, 32), snn.Leaky(beta=0.9, init_hidden=True),
                                     nn.Linear(32, 4),
                                     snn.Leaky(beta=0.9, init_hidden=True, output=True)))

    models = [make(s) for s in range(3)]
    base = copy.deepcopy(models[0])
    params, buffers = stack_module_state(models)
    x = torch.rand(4, 5, 16) * 4
    for m in (*models, base):
        sbnn_addons.set_mode(m, "mean")

    def member(p, xs, b=None):
        reset(base)  # a new membrane for each member's sequence
        return torch.stack([functional_call(base, p if b is None else (p, b), (xt,))[1]
                            for xt in xs])

    with torch.no_grad():
        got = vmap(member, in_dims=(0, None), randomness="different")(params, x)
        want = []
        for m in models:
            reset(m)
            want.append(torch.stack([m(xt)[1] for xt in x]))
        torch.testing.assert_close(got, torch.stack(want), rtol=1e-6, atol=1e-6)
        with pytest.raises(RuntimeError, match=r"threshold.*torch.func.*vmap.*buffers"):
            vmap(member, in_dims=(0, None, 0), randomness="different")(params, x, buffers)
    for m in base.modules():  # the membranes the transform left (snnTorch's instances
        if isinstance(m, snn.Leaky):  # lists keep the neuron for other tests' resets)
            m.mem = torch.zeros(1)


@pytest.mark.parametrize("form", ["init_hidden", "loop"])
def test_a_converted_model_runs_and_resets_again_after_a_torch_func_transform(form):
    """A converted neuron stepped under ``vmap`` (an ensemble through ``functional_call``)
    keeps the transform's membrane as its buffer after the transform ends. A copy, a
    save, an export or a cast of the model failed on it; the next
    ``reset`` / ``init_leaky()`` failed with PyTorch's "INTERNAL ASSERT FAILED ... please
    report a bug to PyTorch" inside a transform, and ``snntorch.utils.reset`` of any model
    (snnTorch's instance lists hold every neuron) with "Can't detach views in-place ...
    DistributedDataParallel". A reset starts afresh, other models reset as before, and
    an eager step that would continue the transform's membrane raises, naming the reset."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    from sbnn_addons.snntorch import reset

    def make(seed):
        torch.manual_seed(seed)
        if form == "loop":
            net = LoopLeaky(16, 32, 4)
        else:
            net = nn.Sequential(nn.Linear(16, 32), snn.Leaky(beta=0.9, init_hidden=True),
                                nn.Linear(32, 4),
                                snn.Leaky(beta=0.9, init_hidden=True, output=True))
        return sbnn_addons.set_mode(to_sbnn(net), "mean")

    def run(m, xs, p=None):
        def call(inp):
            return m(inp) if p is None else functional_call(m, p, (inp,))

        if form == "loop":
            return call(xs)[0]
        reset(m)
        return torch.stack([call(xt)[0] for xt in xs])

    models = [make(s) for s in range(2)]
    base = copy.deepcopy(models[0])
    params, _ = stack_module_state(models)
    x = torch.rand(4, 5, 16) * 4
    other = make(5)
    with torch.no_grad():
        want = torch.stack([run(m, x) for m in models])
        ensemble = vmap(lambda p: run(base, x, p), randomness="different")
        torch.testing.assert_close(ensemble(params), want)
        torch.testing.assert_close(ensemble(params), want)  # the transform again
    g = grad(lambda p: vmap(lambda q: run(base, x, q).sum(), randomness="different")(p).sum())
    assert g(params)["fc1.weight" if form == "loop" else "0.weight"].abs().sum() > 0
    sutils.reset(other)  # snnTorch's reset of another model
    # a copy, a saved model, an export and a cast leave the transform's membrane behind
    # ("Cannot access storage of BatchedTensorImpl")
    copy.deepcopy(base)
    torch.save(base, io.BytesIO())
    to_snntorch(base)
    base.to(torch.float64).to(torch.float32)
    if form == "init_hidden":
        with pytest.raises(RuntimeError, match=r"torch\.func.*sbnn_addons\.snntorch\.reset"):
            base(x[0])
    with torch.no_grad():
        torch.testing.assert_close(run(base, x), want[0])  # reset, then eager again
    sutils.reset(base)

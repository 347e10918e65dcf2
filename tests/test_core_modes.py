"""Evaluation modes sample / mean / mc (Method page, section 7)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sbnn_addons as sb
from sbnn_addons import BayesLinear, IWSTSpike, get_mode, mc_predict, mode, set_mode


def _model():
    torch.manual_seed(0)
    return nn.Sequential(BayesLinear(5, 8, std=0.5), IWSTSpike("st", std=0.3),
                         BayesLinear(8, 3, std=0.5))


def test_set_mode_and_context_restores():
    model = _model()
    assert get_mode(model) == "sample"
    set_mode(model, "mean")
    assert all(m.sbnn_mode == "mean" for m in model)
    model[1].sbnn_mode = "sample"  # mixed modes are restored per module
    with mode(model, "mc"):
        assert all(m.sbnn_mode == "mc" for m in model)
    assert [m.sbnn_mode for m in model] == ["mean", "sample", "mean"]
    with pytest.raises(RuntimeError), mode(model, "sample"):
        raise RuntimeError
    assert [m.sbnn_mode for m in model] == ["mean", "sample", "mean"]
    assert get_mode(nn.Linear(2, 2)) is None


def test_mean_mode_is_deterministic_plain_network():
    model = _model()
    x = torch.rand(4, 5)
    with mode(model, "mean"):
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    h = (model[0].to_module()(x) > 0).float()
    assert torch.equal(a, model[2].to_module()(h))


def test_mc_predict_averages_softmax():
    model = _model()
    x = torch.rand(4, 5)
    one = mc_predict(model, x, 1, seed=0)
    sb.seed_spikes(model, 0)
    ref = torch.softmax(model(x), -1)  # one sample pass, same seed
    assert torch.equal(one.probs, ref)
    k = mc_predict(model, x, 5, seed=1)
    sb.seed_spikes(model, 1)
    manual = torch.stack([torch.softmax(model(x), -1) for _ in range(5)]).mean(0)
    torch.testing.assert_close(k.probs, manual, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(k.probs.sum(-1), torch.ones(4), rtol=1e-6, atol=0)
    assert not k.probs.requires_grad  # no graph over the passes
    assert get_mode(model) == "sample"  # restored after the passes
    seen = []
    mc_predict(model, x, 2, forward=lambda m, x: seen.append(get_mode(m)) or m(x))
    assert seen == ["mc", "mc"]


def test_mc_predict_old_closure_form_is_deprecated_and_runs_the_same_code():
    model = _model()
    x = torch.rand(4, 5)
    new = mc_predict(model, x, 3, seed=2).probs
    sb.seed_spikes(model, 2)
    with pytest.warns(DeprecationWarning, match=r"mc_predict\(model, inputs, K"):
        old = mc_predict(lambda: model(x), model, 3)
    assert torch.equal(old, new) and not old.requires_grad


@pytest.mark.parametrize("k", [0, -1, 1.5, "3"])
def test_mc_predict_bad_k(k):
    model = _model()
    with pytest.raises(ValueError, match="num_samples"):
        mc_predict(model, torch.rand(2, 5), k)


def test_bad_mode_name():
    with pytest.raises(ValueError, match=r"\bmode\b"):
        set_mode(_model(), "deploy")
    with pytest.raises(ValueError, match=r"\bmode\b"), mode(_model(), "deploy"):
        pass


def test_a_model_without_sbnn_modules_is_named():
    """sb.mode(unconverted_model, "mean") ran the host model unchanged, silently."""
    plain = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"no SBNN module.*convert the model first"):
        sb.set_mode(plain, "mean")
    with pytest.raises(ValueError, match="no SBNN module"):
        with sb.mode(plain, "mean"):
            pass
    assert sb.get_mode(plain) is None


def test_training_steps_in_mean_mode_warn(tmp_path):
    """A model saved in ``mean`` mode (the mode is pickled with it) and trained again
    trained its weights but never its noise scales (no gradient in ``mean`` mode),
    silently; an optimiser step between two training forwards in ``mean`` mode now
    warns, naming the mode and set_mode. Evaluation in ``mean`` mode does not warn."""
    import warnings

    model = _model()
    x, y = torch.rand(6, 5), torch.randint(0, 3, (6,))
    set_mode(model, "mean")
    torch.save(model, tmp_path / "m.pt")
    model = torch.load(tmp_path / "m.pt", weights_only=False)
    opt = torch.optim.Adam(sb.param_groups(model, lr=1e-2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x), model(x)  # evaluation, no step between: silent
    with pytest.warns(UserWarning, match=r"'mean' mode.*set_mode\(model, 'sample'\)"):
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    set_mode(model, "sample")  # trained in sample mode: silent
    fresh = _model()
    opt = torch.optim.Adam(sb.param_groups(fresh, lr=1e-2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            loss = nn.functional.cross_entropy(fresh(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_mode_called_without_with_sets_the_mode():
    """``sbnn_addons.mode(model, "mean")`` as a statement (the form the docs' prose shows)
    sets the mode, like ``set_mode``: it used to build a context manager that was never
    entered, so the model silently stayed in ``sample`` mode."""
    model = _model()
    x = torch.rand(4, 5)
    mode(model, "mean")
    assert get_mode(model) == "mean"
    assert torch.equal(model(x), model(x))
    ctx = mode(model, "mc")  # applies at the call; the block restores what it found
    with ctx as m:
        assert m is model and get_mode(model) == "mc"
    assert get_mode(model) == "mean"
    with ctx:  # entered again: applies again, restores again
        assert get_mode(model) == "mc"
    assert get_mode(model) == "mean"

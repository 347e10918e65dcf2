"""``bench.compare`` on a user's own model and data: what would make its numbers wrong
without an error raises instead (a factory that returns one shared model, a test loader
that drops samples, NaN batches seen only by the host model), and the Monte Carlo NLL of
confident errors is computed in float64 like the mean-mode NLL."""

from __future__ import annotations

import math

import pytest
import snntorch as snn
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sbnn_addons.bench import compare


def make_net():
    return nn.Sequential(nn.Linear(12, 16), snn.Leaky(beta=0.9, init_hidden=True),
                         nn.Linear(16, 3))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    rate = torch.full((n, 12), 0.05)
    for c in range(3):
        rate[y == c, 4 * c:4 * c + 4] = 0.8
    return (torch.rand(n, 6, 12, generator=g) < rate[:, None]).float(), y


KW = dict(layout="BT", epochs=1, batch_size=12, mc_samples=2)


def test_a_factory_returning_one_shared_model_raises():
    shared = make_net()
    with pytest.raises(ValueError, match="returned a model it returned before"):
        compare(lambda: shared, _data(24, 0), _data(12, 1),
                methods=["original", "sbnn-st"], **KW)


def test_a_test_loader_that_drops_samples_raises():
    test = DataLoader(TensorDataset(*_data(15, 1)), batch_size=10, drop_last=True)
    with pytest.raises(ValueError, match="drop_last=True"):
        compare(make_net, _data(24, 0), test, methods=["original"], **KW)


@pytest.mark.parametrize("where", ["train", "test"])
def test_nan_batches_raise_for_every_method(where):
    train, test = _data(24, 0), _data(12, 1)
    bad = train if where == "train" else test
    bad[0][5, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        compare(make_net, train, test, methods=["original"], **KW)


def test_mc_nll_of_confident_errors_is_computed_like_the_mean_nll():
    """A model frozen with a huge readout makes confident errors: in float32 the mc
    probability of the true class underflowed to 0 (-log p clamped at 708.4 for every
    error), while the mean-mode NLL kept its finite float64 value. Both now agree."""

    def confident():
        torch.manual_seed(0)
        net = make_net()
        with torch.no_grad():
            net[2].weight.mul_(4000.0)
        return net

    def frozen(model, epochs, steps):
        return torch.optim.SGD(model.parameters(), lr=0.0), None, "epoch"

    res = compare(confident, _data(24, 0), _data(12, 1), methods=["sbnn-st"],
                  recipe=frozen, sbnn_kwargs={"std": 1e-6, "learn_std": False,
                                              "spike_std": 1e-6},
                  **{**KW, "mc_samples": 1})
    row = res.rows[0]
    assert math.isfinite(row["nll_mc"]) and math.isfinite(row["nll_mean"])
    assert row["nll_mc"] == pytest.approx(row["nll_mean"], rel=0.05)
    assert row["nll_mean"] > 50  # confident errors indeed


def test_a_training_loader_reports_its_own_batch_size():
    train = DataLoader(TensorDataset(*_data(32, 0)), batch_size=16, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    res = compare(make_net, train, _data(12, 1), methods=["original"],
                  **{**KW, "batch_size": 64})
    assert res.rows[0]["batch_size"] == 16 and res.meta["batch_size"] == 16


class _BalancedRandomSampler(torch.utils.data.Sampler):
    """Cycles the classes 0, 1, 2 and picks a random sample of each (Python's own RNG,
    which the benchmark does not seed per method): the label order is the same for every
    method, the samples are not."""

    def __init__(self, y):
        import random

        self.by_class = [torch.nonzero(y == c).flatten().tolist() for c in range(3)]
        self.n, self.rng = len(y), random.Random()

    def __iter__(self):
        return iter([self.rng.choice(self.by_class[i % 3]) for i in range(self.n)])

    def __len__(self):
        return self.n


def test_a_sampler_that_draws_other_samples_with_the_same_labels_is_caught():
    """Identical label order but other samples per method: the order check compares the
    inputs too (it compared labels only, and reported the order identical)."""
    x, y = _data(30, 0)
    train = DataLoader(TensorDataset(x, y), batch_size=10, sampler=_BalancedRandomSampler(y))
    with pytest.raises(ValueError, match="different order"):
        compare(make_net, train, _data(12, 1), methods=["original", "sbnn-st"], **KW)


@pytest.mark.parametrize("case, error, match", [
    ("empty tensors", ValueError, "is empty"),
    ("empty loader", ValueError, "is empty"),
    ("three tensors", TypeError, "got 3 items"),
    ("numpy", TypeError, "torch.as_tensor"),
    ("iterable dataset", ValueError, "IterableDataset"),
])
def test_bad_test_data_is_named(case, error, match):
    x, y = _data(12, 1)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(x, y))

    test = {
        "empty tensors": (x[:0], y[:0]),
        "empty loader": DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4),
        "three tensors": (x, y, y),
        "numpy": (x.numpy(), y.numpy()),
        "iterable dataset": DataLoader(Stream(), batch_size=4),
    }[case]
    with pytest.raises(error, match=match):
        compare(make_net, _data(24, 0), test, methods=["original"], **KW)


@pytest.mark.parametrize("method", ["sbnn-agr-kl", "sbnn-agr-aux"])
def test_train_loss_is_the_task_loss_for_methods_with_extra_terms(method):
    """``train_loss`` of the ``-kl`` / ``-aux`` methods is the task loss like every other
    method's (it was the full objective, KL / N included: not comparable); the objective
    is ``train_objective``."""
    seen = []

    def task_loss(out, y):
        loss = nn.functional.cross_entropy(out, y)
        seen.append(float(loss.detach()))
        return loss

    res = compare(make_net, _data(24, 0), _data(12, 1), methods=[method], loss_fn=task_loss,
                  warmup=False, **KW)
    (point,) = res.rows[0]["curve"]
    assert len(seen) == 2  # two training batches of 12, nothing else calls loss_fn
    assert point["train_loss"] == pytest.approx(sum(seen) / 2, rel=1e-6)
    assert point["train_objective"] >= point["train_loss"]
    if method.endswith("-kl"):
        assert point["train_objective"] > point["train_loss"] + 1.0  # KL / N is large


def test_a_training_loader_that_yields_no_batch_raises_naming_drop_last():
    """drop_last=True with a batch larger than the data yields no batch: a bare
    StopIteration came out of the first probe forward."""
    train = DataLoader(TensorDataset(*_data(10, 0)), batch_size=16, drop_last=True)
    with pytest.raises(ValueError, match="yields no batch.*drop_last"):
        compare(make_net, train, _data(12, 1), methods=["original"], **KW)


def test_a_recipe_over_another_models_parameters_raises():
    """An optimiser built over a network captured by the recipe (not the model it is
    given) trains nothing: the loss stayed flat and its times were reported."""
    outside = make_net()

    def recipe(model, epochs, steps):
        return torch.optim.Adam(outside.parameters(), lr=1e-2), None, "epoch"

    with pytest.raises(ValueError, match="not the model's"):
        compare(make_net, _data(24, 0), _data(12, 1), methods=["original"], recipe=recipe,
                **KW)


def test_a_recipe_returning_a_bare_optimiser_names_the_form():
    with pytest.raises(TypeError, match=r"\(optimizer, scheduler or None, 'batch' \| 'epoch'\)"):
        compare(make_net, _data(24, 0), _data(12, 1), methods=["original"],
                recipe=lambda m, e, s: torch.optim.Adam(m.parameters()), **KW)


def test_a_loader_of_dicts_names_the_keys_and_the_fix():
    x, y = _data(12, 0)

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return {"frames": x[i], "label": y[i]}

    with pytest.raises(TypeError, match=r"dict with keys \['frames', 'label'\].*collate_fn"):
        compare(make_net, DataLoader(Dicts(), batch_size=6), _data(12, 1),
                methods=["original"], **KW)


def test_a_loader_with_a_batch_sampler_reports_its_batch_size():
    """A DataLoader built with batch_sampler= has batch_size None: the reported batch size
    was compare's default 64, not the 7 the model was trained on."""
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(range(21)),
                                            batch_size=7, drop_last=False)
    train = DataLoader(TensorDataset(*_data(21, 0)), batch_sampler=sampler)
    res = compare(make_net, train, _data(12, 1), methods=["original"],
                  **{**KW, "batch_size": 64})
    assert res.rows[0]["batch_size"] == 7 and res.meta["batch_size"] == 7

    class Own(torch.utils.data.Sampler):  # no batch_size of its own: reported as unknown
        def __iter__(self):
            return iter([list(range(0, 10)), list(range(10, 21))])

        def __len__(self):
            return 2

    train = DataLoader(TensorDataset(*_data(21, 0)), batch_sampler=Own())
    res = compare(make_net, train, _data(12, 1), methods=["original"],
                  **{**KW, "batch_size": 64})
    assert res.rows[0]["batch_size"] is None and res.meta["batch_size"] is None


def test_an_encode_returning_batch_first_raises_even_when_the_batch_equals_t():
    """A rate code written batch-first, [B, T, F]: with batch_size == T it trained with
    the samples as time steps and reported num_steps 1, without an error."""
    y = torch.arange(36) % 3
    x = torch.full((36, 12), 0.05)
    for c in range(3):
        x[y == c, 4 * c:4 * c + 4] = 0.8

    def batch_first(xb, gen):
        return (torch.rand(xb.shape[0], 6, xb.shape[1], generator=gen) < xb[:, None]).float()

    with pytest.raises(ValueError, match=r"encode returned shape \[2, 6, 12\].*transpose"):
        compare(make_net, (x, y), (x[:12], y[:12]), layout="static", encode=batch_first,
                methods=["original"], epochs=1, batch_size=6, eval_batch_size=6)


def test_a_seed_of_a_module_instance_gives_the_same_run_in_any_seed_list():
    """A module instance was re-initialised per seed only when several seeds were given:
    seed 1 alone trained the given weights, seed 1 of seeds=[0, 1] random ones (and a
    trained model passed with several seeds lost its weights). Every seed now starts from
    the module's weights unless reinit=True, and the notes say so."""
    torch.manual_seed(5)
    net = make_net()
    alone = compare(net, _data(24, 0), _data(12, 1), methods=["original"], seeds=[1], **KW)
    both = compare(net, _data(24, 0), _data(12, 1), methods=["original"], seeds=[0, 1],
                   **KW)
    row = next(r for r in both.rows if r["seed"] == 1)
    assert row["curve"] == alone.rows[0]["curve"]
    assert row["nll_mean"] == alone.rows[0]["nll_mean"]
    assert any("starts from the weights of the module you passed" in n for n in both.notes())
    mixed = compare(net, _data(24, 0), _data(12, 1), methods=["original"], seeds=[0, 1],
                    reinit=True, **KW)
    again = compare(net, _data(24, 0), _data(12, 1), methods=["original"], seeds=[1],
                    reinit=True, **KW)
    assert next(r for r in mixed.rows if r["seed"] == 1)["curve"] == again.rows[0]["curve"]
    assert not any("module you passed" in n for n in mixed.notes())


def test_a_run_that_did_not_train_is_named_in_the_notes():
    """A method whose parameters never change (a learning rate of 0, gradients that do not
    reach them) or whose loss does not fall had its times and accuracies reported like any
    other, without a word."""

    def frozen(model, epochs, steps):
        return torch.optim.SGD(model.parameters(), lr=0.0), None, "epoch"

    res = compare(make_net, _data(24, 0), _data(12, 1), methods=["original"], recipe=frozen,
                  **{**KW, "epochs": 2})
    assert res.rows[0]["params_changed"] is False
    notes = " ".join(res.notes())
    assert "original (seed 0): no parameter changed in training" in notes
    assert "original (seed 0): train_loss did not fall" in notes
    res = compare(make_net, _data(24, 0), _data(12, 1), methods=["original"],
                  **{**KW, "epochs": 2, "lr": 2e-2})
    assert res.rows[0]["params_changed"] is True
    assert "did not fall" not in " ".join(res.notes())
    assert "no parameter changed" not in " ".join(res.notes())


def test_bad_loss_readout_methods_and_num_classes_name_the_problem():
    """Each of these failed deep inside PyTorch (or iterated a string letter by letter)."""
    import torch.nn.functional as F

    args = (make_net, _data(24, 0), _data(12, 1))
    with pytest.raises(ValueError, match="loss_fn returned a tensor of shape \\[12\\].*scalar"):
        compare(*args, methods=["original"],
                loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none"), **KW)
    with pytest.raises(ValueError, match=r"readout returned shape \[6, 2, 3\].*\[B, C\]"):
        compare(*args, methods=["original"], readout=lambda out: torch.stack(out), **KW)
    res = compare(*args, methods="original", **KW)  # one name, not its letters
    assert [r["method"] for r in res.rows] == ["original"]
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        compare(*args, methods=["original"], num_classes=0, **KW)


def test_an_nn_sequential_with_snntorch_neurons_without_init_hidden_raises():
    """Without init_hidden=True an snnTorch neuron in an nn.Sequential keeps no state
    between calls: the harness passed the whole sequence through it as one time step (a
    last-layer Leaky trained without membrane dynamics, silently)."""
    def last_leaky():
        return nn.Sequential(nn.Linear(12, 3), snn.Leaky(beta=0.9))

    with pytest.raises(ValueError, match=r"init_hidden=True.*\['1'\]"):
        compare(last_leaky, _data(24, 0), _data(12, 1), methods=["original"], **KW)


def test_a_sampler_with_a_generator_of_its_own_gives_every_method_the_same_order():
    """RandomSampler(ds, generator=g), the usual way to make a loader repeatable: the
    harness reseeded the loader's generator only, so the methods drew different orders and
    the run failed after all the training."""
    ds = TensorDataset(*_data(24, 0))
    for sampler in (torch.utils.data.RandomSampler(ds, generator=torch.Generator()),
                    torch.utils.data.SubsetRandomSampler(range(24),
                                                         generator=torch.Generator())):
        train = DataLoader(ds, batch_size=8, sampler=sampler)
        res = compare(make_net, train, _data(12, 1), methods=["original", "sbnn-st"],
                      **{**KW, "epochs": 2})
        assert res.rows[0]["data_order"] == res.rows[1]["data_order"]
        assert res.rows[0]["data_order"][0] != res.rows[0]["data_order"][1]  # reshuffled


def test_spikingjelly_containers_run_and_a_forgotten_single_step_neuron_raises():
    """SeqToANNContainer / MultiStepContainer nets (the SEW-ResNet style) crashed with an
    AttributeError (the container has no step_mode); a single-step neuron left in a
    multi-step net took the whole sequence as one step, silently."""
    from spikingjelly.activation_based import functional, layer, neuron

    def contained():
        return nn.Sequential(layer.SeqToANNContainer(nn.Linear(12, 16)),
                             layer.MultiStepContainer(neuron.LIFNode(tau=2.0)),
                             layer.SeqToANNContainer(nn.Linear(16, 3)))

    res = compare(contained, _data(24, 0), _data(12, 1), methods=["original", "sbnn-st"],
                  **KW)
    assert len(res.rows) == 2

    def forgot():
        net = nn.Sequential(layer.Linear(12, 16), neuron.LIFNode(tau=2.0),
                            layer.Linear(16, 3))
        functional.set_step_mode(net, "m")
        net.append(neuron.LIFNode(tau=2.0))  # added after set_step_mode: single-step
        return net

    with pytest.raises(ValueError, match=r"neurons \['3'\] are single-step.*set_step_mode"):
        compare(forgot, _data(24, 0), _data(12, 1), methods=["original"], **KW)


def test_a_training_order_that_differs_between_methods_stops_after_the_first_epoch():
    """The order check ran after every epoch of every method had trained."""
    x, y = _data(30, 0)
    train = DataLoader(TensorDataset(x, y), batch_size=10, sampler=_BalancedRandomSampler(y))
    done = []

    class Bar:
        def update(self, n):
            done.append(n)

        def close(self):
            pass

    with pytest.raises(ValueError, match="different order"):
        compare(make_net, train, _data(12, 1), methods=["original", "sbnn-st"],
                progress=lambda total: Bar(), **{**KW, "epochs": 4})
    assert len(done) <= 2  # stopped in the first epoch's round, not after 8 epochs


def test_sequence_data_declared_static_names_the_layout():
    """A multi-step network given [B, T, F] data as layout='static' returned [B, T, C];
    the error blamed the model's output (batch-first) instead of the declared layout."""
    from spikingjelly.activation_based import functional, layer, neuron

    def sj():
        net = nn.Sequential(layer.Linear(12, 16), neuron.LIFNode(), layer.Linear(16, 3))
        functional.set_step_mode(net, "m")
        return net

    with pytest.raises(ValueError, match="layout='static'.*pass layout='BT'"):
        compare(sj, _data(24, 0), _data(12, 1), methods=["original"],
                **{**KW, "layout": "static"})


class _StaticImageLoop(nn.Module):
    """snnTorch tutorial style: static images [B, 1, 4, 4], a time loop inside."""

    def __init__(self):
        super().__init__()
        self.conv, self.lif = nn.Conv2d(1, 2, 3, padding=1), snn.Leaky(beta=0.9)
        self.fc, self.out = nn.Linear(32, 3), snn.Leaky(beta=0.9)

    def forward(self, x):
        m1, m2, spk = self.lif.init_leaky(), self.out.init_leaky(), []
        for _ in range(4):
            s1, m1 = self.lif(self.conv(x), m1)
            s2, m2 = self.out(self.fc(s1.flatten(1)), m2)
            spk.append(s2)
        return torch.stack(spk), m2


def test_static_images_with_a_time_loop_inside_the_model_still_run():
    y = torch.arange(24) % 3
    x = torch.rand(24, 1, 4, 4) + y.view(-1, 1, 1, 1)
    res = compare(_StaticImageLoop, (x, y), (x[:12], y[:12]), methods=["original"],
                  **{**KW, "layout": "static"})
    assert res.rows[0]["num_steps"] is None


def test_aux_all_without_an_aux_weight_raises():
    """aux_all=True without aux_weight= was dropped without a word (no method used the
    auxiliary loss)."""
    with pytest.raises(ValueError, match="aux_all=True needs aux_weight"):
        compare(make_net, _data(24, 0), _data(12, 1), methods=["sbnn-st"], aux_all=True,
                **KW)


class _SJLoop(nn.Module):
    """Single-step SpikingJelly neurons and a forward that loops over time itself."""

    def __init__(self):
        from spikingjelly.activation_based import layer, neuron

        super().__init__()
        self.fc1, self.lif = layer.Linear(12, 16), neuron.LIFNode()
        self.fc2 = layer.Linear(16, 3)

    def forward(self, x):  # [T, B, F]
        return torch.stack([self.fc2(self.lif(self.fc1(x_t))) for x_t in x])


def test_a_single_step_spikingjelly_model_with_its_own_forward_asks_for_step():
    """It was called once per time step, so its own loop ran over the samples of x[t]
    (the neuron state carried from sample to sample), silently."""
    with pytest.raises(ValueError, match="single-step SpikingJelly neurons.*step=True"):
        compare(_SJLoop, _data(24, 0), _data(12, 1), methods=["original"], **KW)
    res = compare(_SJLoop, _data(24, 0), _data(12, 1), methods=["original", "sbnn-st"],
                  step=False, **KW)
    assert len(res.rows) == 2

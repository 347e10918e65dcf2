"""The deep-protocol benchmark script runs end to end on real frames (tiny sizes)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DVS_DIR = ROOT.parent / "shared" / "data" / "dvs_gesture_32"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not DVS_DIR.exists(), reason="needs ../shared/data/dvs_gesture_32")
def test_dvs_deep_protocol_ablation_and_kl_rows(tmp_path, capsys):
    deep = _script("dvs_deep_protocol")
    out = tmp_path / "runs.jsonl"
    common = ["--data-dir", str(DVS_DIR), "--width", "2", "--frames", "2",
              "--frame-stride", "24", "--max-train", "11", "--epochs", "1", "--mc", "1", "2",
              "--threads", "1", "--out", str(out), "--seeds", "0"]
    deep.main([*common, "--methods", "sbnn", "twin"])
    deep.main([*common, "--methods", "sbnn", "--std-scale", "0.5", "--aux-weight", "0",
               "--kl", "0.1", "--prior-std", "0.05", "--holdout", "9", "10"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["sbnn", "twin", "sbnn"]
    assert rows[2]["std_scale"] == 0.5 and rows[2]["aux_weight"] == 0.0
    assert rows[2]["prior_std"] == 0.05 and "ood_mi" in rows[2] and "ood_entropy" in rows[2]
    assert set(rows[0]["mc"]) == {"1", "2"}
    table = deep.table(out)
    assert "| sbnn | 0 |" in table and "| twin | 0 |" in table
    assert "| sbnn (std x0.5, aux 0) | 0.1 (s0 0.05) |" in table
    curve = deep.mc_table(out)
    assert "| sbnn | 0 | 2 |" in curve and "| sbnn (std x0.5, aux 0) | 0.1 (s0 0.05) | 1 |" in curve
    assert "twin" not in curve


def test_std_scale_scales_every_posterior_std():
    import sbnn_addons as sb

    deep = _script("dvs_deep_protocol")
    base = deep.build("sbnn", 2, 2, "st")
    scaled = deep.build("sbnn", 2, 2, "st", std_scale=0.5)
    pairs = [(a.std.item(), b.std.item())
             for a, b in zip(base.modules(), scaled.modules(), strict=True)
             if isinstance(a, sb.BayesConv2d)]
    assert len(pairs) == 19
    for a, b in pairs:
        assert b == pytest.approx(0.5 * a, rel=1e-5)


def test_bench_dropin_runs_fresh_and_pretrained(capsys):
    """bench_dropin trains the host originals and their conversions side by side (tiny
    sizes): fresh, and converted after the original was trained first; with
    `--aux-fraction` the converted model's aux weight is that fraction of the host loss
    at the start (by default none: the host's loss alone)."""
    dropin = _script("bench_dropin")
    common = ["--models", "snntorch-csnn", "sj-csnn", "--epochs", "1", "--digits-train",
              "32", "--digits-test", "32", "--batch", "16", "--snntorch-lr", "1e-2",
              "--snntorch-steps", "2", "--sj-channels", "4", "--mc", "2"]
    assert dropin.main([*common, "--aux-fraction", "0.05"]) == 0
    fresh = capsys.readouterr().out
    assert fresh.count("| 1 |") == 2 and "aux weight 0.115" in fresh  # 0.05 x ln(10)
    assert dropin.main([*common, "--pretrain-epochs", "1", "--calibrate", "8"]) == 0
    pretrained = capsys.readouterr().out
    assert pretrained.count("trained 1 epochs first") == 2 and "aux weight 0)" in pretrained
    assert pretrained.count("calibrated on 8 training examples") == 2
    assert pretrained.count(" (mean) / ") == 2 and pretrained.count("(mc 2)") == 6


def test_bench_dropin_mc_columns_leave_the_training_run_unchanged(capsys):
    """`--mc K` adds the original's test loss and the converted model's test loss of the
    output averaged over K passes and its mc(K) accuracy; the Monte Carlo passes draw
    from forked generators, so every other column is the same as with `--mc 0`."""
    dropin = _script("bench_dropin")
    common = ["--models", "sj-csnn", "--epochs", "2", "--digits-train", "16",
              "--digits-test", "8", "--batch", "8", "--sj-channels", "2"]

    def rows(argv):
        assert dropin.main(argv) == 0
        out = capsys.readouterr().out
        return out, [line.strip("|").split("|") for line in out.splitlines()
                     if line.startswith("| ") and not line.startswith("| epoch")]

    plain_out, plain = rows([*common, "--mc", "0"])
    mc_out, mc = rows([*common, "--mc", "2"])
    assert "test loss (mc 2) | converted acc (mc 2) |" in mc_out
    assert "(mc" not in plain_out
    assert len(plain) == len(mc) == 2
    for p, m in zip(plain, mc, strict=True):
        assert len(p) == 6 and len(m) == 9
        assert m[:6] == p  # epoch, losses, sample / mean accuracies: bitwise the same
        assert 0 < float(m[6]) and 0 < float(m[7]) and 0 <= float(m[8]) <= 1


@pytest.mark.parametrize("script, args, word", [
    ("dvs_deep_protocol", ["--std-scale", "0"], "--std-scale"),
    ("dvs_deep_protocol", ["--prior-std", "-1"], "--prior-std"),
    ("dvs_deep_protocol", ["--aux-weight", "-1e-3"], "--aux-weight"),
    ("dvs_deep_protocol", ["--kl", "nan"], "--kl"),
    ("bench_dropin", ["--aux-fraction", "-0.1"], "--aux-fraction"),
    ("bench_dropin", ["--aux-weight", "nan"], "--aux-weight"),
    ("bench_dropin", ["--pretrain-epochs", "-1"], "--pretrain-epochs"),
    ("bench_dropin", ["--calibrate", "-1"], "--calibrate"),
    ("bench_dropin", ["--mc", "-1"], "--mc"),
    ("trace_count", ["--top", "-1"], "--top"),
])
def test_bench_scripts_name_bad_arguments(script, args, word, capsys):
    """A bad ablation or aux argument stops the script before any work, naming it."""
    with pytest.raises(SystemExit):
        _script(script).main(args)
    assert word in capsys.readouterr().err


def test_profile_step_counts_operators_and_python_calls(monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # it imports its sibling scripts
    profile = _script("profile_step")

    x = torch.ones(3)

    def helper(t):
        return t * 2

    def step():
        return helper(x + 1).sum()  # add, mul, sum; two Python calls (step, helper)

    assert profile.step_counts(step) == {"aten_ops": 3, "python_calls": 2}


def test_memory_measures_count_what_a_step_allocates():
    import torch

    bench = _script("bench_core")
    weight = torch.randn(256, 256, requires_grad=True)  # exists before: not counted
    x = torch.randn(64, 256)

    def step():
        weight.grad = None
        h = x @ weight  # saves x (there before) and nothing of its own
        y = h.exp()  # saves its output: 64 * 256 float32 = 64 KiB
        y.sum().backward()

    assert bench._saved_bytes(step) == 64 * 256 * 4
    peak = bench.peak_bytes(step)
    # the step frees the last gradient of the weight (256 KiB) first; the new one takes its
    # place while h, y (the step's variables) and the gradient of h (64 KiB each) are
    # alive: 3 x 64 KiB above the start, plus scalars
    assert 3 * 64 * 256 * 4 <= peak <= 3 * 64 * 256 * 4 + 64


@pytest.mark.skipif(not DVS_DIR.exists(), reason="needs ../shared/data/dvs_gesture_32")
def test_dvs_deep_protocol_names_the_run_of_a_non_finite_objective(tmp_path):
    """A KL term that overflows (a prior std of 1e-30) stops the run with an error that
    names the method, seed and epoch, and the term."""
    deep = _script("dvs_deep_protocol")
    args = ["--data-dir", str(DVS_DIR), "--width", "2", "--frames", "2", "--frame-stride",
            "24", "--max-train", "4", "--epochs", "1", "--mc", "1", "--threads", "1",
            "--out", str(tmp_path / "runs.jsonl"), "--seeds", "0", "--methods", "sbnn",
            "--kl", "1", "--prior-std", "1e-30"]
    with pytest.raises(FloatingPointError, match=r"sbnn seed 0, epoch 0: .*KL term"):
        deep.main(args)


def test_trace_count_counts_the_instructions_dynamo_traces():
    """``trace_count.py`` (the compile-time figure of the Performance page) counts the
    bytecode instructions of a compiled step and puts Dynamo's own method back."""
    import torch._dynamo.symbolic_convert as symbolic_convert

    trace_count = _script("trace_count")
    step = symbolic_convert.InstructionTranslatorBase.step
    counts = trace_count.count(False, 1)
    assert sum(counts.values()) > 100 and any("leaky.py" in k for k in counts)
    assert symbolic_convert.InstructionTranslatorBase.step is step


def test_draw_bound_draws_from_its_preset_noise_in_a_compiled_graph(monkeypatch):
    """``bench_compile.py --draw-bound``: inside ``PresetNoiseDraw`` a compiled spike is
    ``1[u + sigma eps > 0]`` with the preset ``eps``, it has a gradient, and the block puts
    the spike operator back; too little preset noise for a drive is named."""
    import torch

    import sbnn_addons as sb

    if not sb.kernels.available():
        pytest.skip("the variant replaces the compiled spike operator, which needs the kernel")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _script("bench_compile")
    spike = sb.IWSTSpike("st", std=0.5)
    torch.manual_seed(0)
    u = torch.randn(8, 16, requires_grad=True)
    step = torch.compile(lambda u: spike(u), fullgraph=True)
    draw = bench.PresetNoiseDraw(1024, "cpu")
    operator = sb.kernels.compiled_spike
    for _ in range(2):  # the context serves every step
        with draw:
            spikes = step(u)
        assert sb.kernels.compiled_spike is operator
        expected = (u + 0.5 * draw.eps[:128].view(8, 16) > 0).float()
        assert torch.equal(spikes, expected)
        (grad,) = torch.autograd.grad(spikes.sum(), u)
        assert torch.isfinite(grad).all() and (grad != 0).all()
    torch._dynamo.reset()
    with bench.PresetNoiseDraw(100, "cpu"), pytest.raises(
            torch._dynamo.exc.UserError, match=r"^PresetNoiseDraw\(numel=100\) .* 128 elements"):
        step(u)  # 128 elements


def test_bench_adapters_checks_that_every_model_learns(monkeypatch):
    """``bench_adapters.py`` quotes a step time only next to the loss before and after
    Adam steps on one batch (``bench_core.learns``), here in SpikingJelly's single-step
    mode (``--sj-step-mode s``)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # it imports bench_core
    adapters = _script("bench_adapters")
    rows = adapters.run(reps=1, threads=1, hosts=("spikingjelly",), sj_step_mode="s",
                        train_steps=40)
    assert [r["config"] for r in rows] == [
        "sbnn ST, per-layer std", "sbnn AGR, per-layer std",
        "sbnn ST, aux_pull=0, per-layer std"]
    assert all(r["host"] == "spikingjelly (lif, single-step)" for r in rows)
    assert all(r["learns"] and r["host_learns"] for r in rows), rows
    assert all(r["loss_last"] < r["loss_first"] for r in rows)

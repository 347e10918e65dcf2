"""The example scripts: their command lines name bad values, and the SHD example refuses a
``--data-dir`` without the data instead of training on synthetic data unasked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script, args, word", [
    ("snntorch_rleaky_shd.py", ("--data-dir", "/nonexistent/typo"), "SHD/shd_train.h5"),
    ("snntorch_rleaky_shd.py", ("--epochs", "0"), "--epochs must be >= 1"),
    ("snntorch_port_digits.py", ("--epochs", "0"), "--epochs must be >= 1"),
    ("spikingjelly_sew_resnet.py", ("--steps", "0"), "--steps must be >= 1"),
    ("spikingjelly_dvs_gesture.py", ("--data-dir", "x", "--steps", "0"), "--steps must be >= 1"),
])
def test_examples_name_bad_arguments(script, args, word):
    out = _run(script, *args)
    assert out.returncode == 2 and word in out.stderr, out.stderr[-1500:]


def test_cli_refuses_zero_for_counts(tmp_path):
    """0 for a count would silently mean "the default" (--width 0 built width 128)."""
    from sbnn_addons.bench import cli

    for flag in ("--width", "--max-test-samples", "--num-steps", "--mc-samples"):
        with pytest.raises(SystemExit):
            cli.run(["--task", "digits", flag, "0", "--out-dir", str(tmp_path)])


def test_cli_repeated_list_flags_add_up():
    """`--seeds 0 --seeds 1` runs both seeds (argparse kept only the last flag)."""
    from sbnn_addons.bench import cli

    args = cli.build_parser().parse_args(["--seeds", "0", "--seeds", "1", "--task", "digits",
                                          "--task", "randman"])
    assert args.seeds == [0, 1] and args.task == ["digits", "randman"]
    assert cli.build_parser().parse_args([]).seeds is None  # the run uses [0]


@pytest.mark.parametrize("flag", ["--networks", "--batch", "--width", "--lif-width"])
def test_diagnostics_cli_refuses_zero_counts(flag):
    """0 networks gave an empty table with exit code 0; 0 units a ZeroDivisionError."""
    from sbnn_addons import diagnostics

    with pytest.raises(SystemExit):
        diagnostics.main([flag, "0", "--no-plots"])

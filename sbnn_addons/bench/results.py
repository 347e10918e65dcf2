"""Results of a comparison: the table, the notes, CSV / JSON / predictions and the report.

One row per (task, method, seed). Every row has the same accuracy columns:

.. code-block:: text

    accuracy_mean    deterministic pass, every method (SBNN: posterior-mean weights, 1[mu > theta])
    accuracy_sample  one stochastic pass (SBNN only; empty for deterministic models)
    accuracy_mc      mean of K softmax outputs, mc(K) (SBNN only)

and ``nll_*``, ``ece_*``, ``brier_*`` for ``mean`` and ``mc``. Times: ``train_s_per_epoch``
(mean over epochs, with ``train_s_per_epoch_std``), ``train_s`` (total), ``eval_s`` (one
``mean``-mode pass over the test set) and ``eval_mc_s`` (the ``mc(K)`` pass).
"""

from __future__ import annotations

import csv
import itertools
import json
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["BenchResults", "COLUMNS", "TABLE_COLUMNS", "write_results", "summarise"]

COLUMNS = ["task", "method", "kind", "spike_fn", "seed", "epochs", "num_steps", "batch_size",
           "train_samples", "test_samples", "accuracy_mean", "accuracy_sample", "accuracy_mc",
           "nll_mean", "nll_mc", "ece_mean", "ece_mc", "brier_mean", "brier_mc", "mc_samples",
           "train_s_per_epoch", "train_s_per_epoch_std", "train_s", "eval_s", "eval_mc_s",
           "world_size"]
#: columns of the Markdown table (named as in results.csv; accuracies shown in %)
TABLE_COLUMNS = ["task", "method", "seeds", "epochs", "accuracy_mean", "accuracy_sample",
                 "accuracy_mc", "ece_mean", "ece_mc", "nll_mean", "nll_mc",
                 "train_s_per_epoch", "eval_s"]
_PCT = {"accuracy_mean", "accuracy_sample", "accuracy_mc"}


def _stats(vals: list) -> tuple[float, float] | None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _fmt(st: tuple[float, float] | None, scale: float, digits: int, spread: bool) -> str:
    if st is None:
        return "–"
    m, s = st
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}" if spread else \
        f"{m * scale:.{digits}f}"


@dataclass
class BenchResults:
    """What :func:`sbnn_addons.bench.compare` (and ``sbnn-bench``) returns.

    Attributes:
        rows: one dict per (task, method, seed) with :data:`COLUMNS`, ``curve`` (per
            epoch: ``epoch``, ``train_loss`` (the task loss ``loss_fn``, the same for
            every method), ``train_objective`` (what the method minimises: the task loss
            plus the KL / auxiliary terms of the ``-kl`` / ``-aux`` methods),
            ``test_accuracy`` in ``mean`` mode),
            ``epoch_train_s`` / ``epoch_eval_s`` (seconds per epoch), ``_probs`` (``{"mean":
            [N, C], "sample": ..., "mc": ...}``) and ``_targets`` ``[N]``.
        meta: the run's settings (task, epochs, seeds, subset sizes, device, command, ...).
    """

    rows: list[dict]
    meta: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- views
    def groups(self) -> dict[tuple[str, str], list[dict]]:
        """Rows grouped by ``(task, method)`` in first-seen order."""
        out: dict[tuple[str, str], list[dict]] = {}
        for r in self.rows:
            out.setdefault((r["task"], r["method"]), []).append(r)
        return out

    def summary(self) -> list[dict]:
        """Mean and std over seeds per (task, method) of every numeric column.

        Time per epoch: mean and std over all epochs of all seeds.
        """
        out = []
        for (task, method), rs in self.groups().items():
            s = {"task": task, "method": method, "kind": rs[0]["kind"], "seeds": len(rs),
                 "epochs": rs[0]["epochs"]}
            for col in ("accuracy_mean", "accuracy_sample", "accuracy_mc", "nll_mean", "nll_mc",
                        "ece_mean", "ece_mc", "brier_mean", "brier_mc", "eval_s", "eval_mc_s",
                        "train_s"):
                st = _stats([r.get(col) for r in rs])
                s[col], s[col + "_std"] = (None, None) if st is None else st
            ts = [t for r in rs for t in r.get("epoch_train_s", [r["train_s_per_epoch"]])]
            s["train_s_per_epoch"], s["train_s_per_epoch_std"] = _stats(ts)
            s["timed_epochs"] = len(ts)
            out.append(s)
        return out

    def table(self) -> str:
        """Markdown table, mean ± std over seeds; headers are the CSV column names."""
        head = [f"{c} (%)" if c in _PCT else c for c in TABLE_COLUMNS]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in self.summary():
            multi = s["seeds"] > 1
            cells = []
            for c in TABLE_COLUMNS:
                if c in ("task", "method", "seeds", "epochs"):
                    cells.append(str(s[c]))
                elif c == "train_s_per_epoch":
                    cells.append(_fmt((s[c], s[c + "_std"]), 1, 3, s["timed_epochs"] > 1))
                elif c in _PCT:
                    cells.append(_fmt(None if s[c] is None else (s[c], s[c + "_std"]), 100, 1,
                                      multi))
                else:
                    cells.append(_fmt(None if s[c] is None else (s[c], s[c + "_std"]), 1, 3,
                                      multi))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def notes(self) -> list[str]:
        """Plain-language warnings: seed spread, differences within it, timing, chance."""
        out = [f"{self.meta.get('task', 'data')}: {w}"
               for w in self.meta.get("data_warnings", [])]
        summ = self.summary()
        by_task: dict[str, list[dict]] = {}
        for s in summ:
            by_task.setdefault(s["task"], []).append(s)
        for task, ss in by_task.items():
            seeds = min(s["seeds"] for s in ss)
            if seeds > 1 and self.meta.get("init", "").startswith("the weights of"):
                out.append(f"{task}: every seed starts from the weights of the module you "
                           "passed, so the spread over seeds leaves out the initialisation; "
                           "pass a factory (or reinit=True) to vary it.")
            if seeds < 2:
                out.append(f"{task}: one seed per method, so the spread over seeds is unknown "
                           "and accuracy differences cannot be told from seed noise; run "
                           "several seeds (seeds=[0, 1, 2] / --seeds 0 1 2).")
            else:
                for a, b in itertools.combinations(ss, 2):
                    for col in ("accuracy_mean", "accuracy_mc"):
                        if a[col] is None or b[col] is None:
                            continue
                        diff, spread = abs(a[col] - b[col]), max(a[col + "_std"],
                                                                 b[col + "_std"])
                        if diff <= spread:
                            out.append(
                                f"{task}: {a['method']} vs {b['method']}: {col} differs by "
                                f"{100 * diff:.1f} points, within the spread over seeds "
                                f"(± {100 * spread:.1f}): not a measured difference.")
            for a, b in itertools.combinations(ss, 2):
                diff = abs(a["train_s_per_epoch"] - b["train_s_per_epoch"])
                spread = max(a["train_s_per_epoch_std"], b["train_s_per_epoch_std"])
                if diff <= spread:
                    out.append(f"{task}: {a['method']} vs {b['method']}: train_s_per_epoch "
                               f"differs by {diff:.3f} s, within the spread over epochs "
                               f"(± {spread:.3f} s).")
            rows = [r for r in self.rows if r["task"] == task]
            for r in rows:
                who = f"{task}: {r['method']} (seed {r['seed']})"
                curve = r.get("curve") or []
                if r.get("params_changed") is False:
                    out.append(f"{who}: no parameter changed in training (a learning rate "
                               "of 0, or gradients that never reach the parameters): its "
                               "accuracies are those of the initial network and its times "
                               "are not those of training.")
                if len(curve) >= 2:
                    first, last = curve[0]["train_loss"], curve[-1]["train_loss"]
                    if not last < first - 1e-3 * abs(first):
                        out.append(f"{who}: train_loss did not fall over the epochs "
                                   f"({first:.4f} -> {last:.4f}): it has not trained (check "
                                   "the learning rate and that the gradients reach the "
                                   "parameters); read its accuracies and times with care.")
            targets = rows[0]["_targets"] if rows and "_targets" in rows[0] else None
            if targets is not None and len(targets):
                share = float(torch.bincount(targets).max()) / len(targets)
                out.append(f"{task}: the largest class is {100 * share:.1f} % of the test set "
                           "(accuracy of always answering it).")
                for s in ss:
                    if s["accuracy_mean"] is not None and s["accuracy_mean"] <= share + 0.01:
                        out.append(f"{task}: {s['method']} is at or below that share "
                                   f"({100 * s['accuracy_mean']:.1f} %): it has not learned "
                                   "the task (too few epochs or samples, or a bad recipe).")
        return out

    def curves(self) -> dict[tuple[str, str, int], list[dict]]:
        """``{(task, method, seed): curve}``; each curve entry has ``epoch``,
        ``train_loss`` (task loss), ``train_objective`` (task loss plus the method's KL /
        auxiliary terms) and ``test_accuracy`` (``mean`` mode)."""
        return {(r["task"], r["method"], r["seed"]): r["curve"] for r in self.rows}

    def predictions(self, method: str, seed: int | None = None, mode: str = "mean",
                    task: str | None = None) -> dict:
        """Per-sample test predictions of one run.

        Args:
            method: method name.
            seed: seed (default: the first run of the method).
            mode: ``"mean"`` (every method), ``"sample"`` or ``"mc"`` (SBNN methods).
            task: task name (default: the first with this method).

        Returns:
            ``{"targets": [N], "probs": [N, C], "pred": [N], "confidence": [N]}``.
        """
        for r in self.rows:
            if r["method"] == method and (seed is None or r["seed"] == seed) and (
                    task is None or r["task"] == task):
                if mode not in r["_probs"]:
                    raise ValueError(f"{method!r} has no {mode!r} predictions (modes: "
                                     f"{sorted(r['_probs'])})")
                p = r["_probs"][mode]
                conf, pred = p.max(-1)
                return {"targets": r["_targets"], "probs": p, "pred": pred, "confidence": conf}
        raise KeyError(f"no run of method {method!r} (seed {seed}, task {task})")

    # ---------------------------------------------------------------- files
    def save(self, out_dir: str | Path, plots: bool = True, report: bool = True) -> list[Path]:
        """Write ``results.csv``, ``results.json``, ``predictions.csv``, the PNG plots and
        ``report.md`` to ``out_dir``; returns the paths."""
        out_dir = Path(out_dir)
        paths = write_results(self, out_dir)
        figs: list[Path] = []
        if plots:
            from .plots import save_plots

            figs = save_plots(self, out_dir)
            paths += figs
        if report:
            paths.append(write_report(self, out_dir, figs))
        return paths


def _env_meta() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor(),
            "threads": torch.get_num_threads()}


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def write_results(res: BenchResults, out_dir: Path) -> list[Path]:
    """``results.csv`` (:data:`COLUMNS`), ``results.json`` (rows with curves, summary,
    notes, meta) and ``predictions.csv`` (per test sample)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(res.rows)
    meta = {**_env_meta(), **res.meta}
    with open(out_dir / "results.json", "w") as fh:
        json.dump({"meta": meta, "columns": COLUMNS, "runs": [_public(r) for r in res.rows],
                   "summary": res.summary(), "notes": res.notes()}, fh, indent=2)
    with open(out_dir / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "method", "seed", "sample", "target", "pred_mean", "conf_mean",
                    "pred_mc", "conf_mc"])
        for r in res.rows:
            probs = r.get("_probs")
            if not isinstance(probs, dict):
                continue
            cm, pm = probs["mean"].max(-1)
            mc = probs.get("mc")
            cc, pc = mc.max(-1) if mc is not None else (None, None)
            for i, t in enumerate(r["_targets"].tolist()):
                w.writerow([r["task"], r["method"], r["seed"], i, t, int(pm[i]),
                            f"{float(cm[i]):.4f}", "" if pc is None else int(pc[i]),
                            "" if cc is None else f"{float(cc[i]):.4f}"])
    return [out_dir / "results.csv", out_dir / "results.json", out_dir / "predictions.csv"]


def summarise(rows: list[dict]) -> str:
    """The Markdown table of ``rows`` (see :meth:`BenchResults.table`)."""
    return BenchResults(rows).table()


PROTOCOL = """\
- Same initial weights for every method of a seed (the SBNN methods convert that network);
  same training batches in the same order and the same encoded inputs (generators seeded
  by seed and epoch only; order checked identical); same optimiser recipe.
- Accuracy columns: `accuracy_mean` is the deterministic pass for every method (SBNN:
  posterior-mean weights, spikes `1[mu > theta]`); `accuracy_sample` one stochastic pass
  and `accuracy_mc` the mean of K softmax outputs, for SBNN methods only (– otherwise).
  ECE uses 15 equal-width bins.
- Timing: two untimed warm-up steps per method (state restored), then the methods
  {order}; `train_s_per_epoch` is the mean ± std over epochs (and seeds), `eval_s` one
  `mean`-mode pass over the test set, `eval_mc_s` the `mc(K)` pass; the learning curves'
  evaluations are not in the training time.
- Training loss: `train_loss` (curves) is the task loss for every method; the KL and
  auxiliary terms that the `-kl` / `-aux` methods add to their objective are in
  `train_objective` (`results.json`), not in `train_loss`.
"""


def write_report(res: BenchResults, out_dir: Path, figures: list[Path]) -> Path:
    """``report.md``: command, setup, table, notes, protocol and the figures."""
    m = res.meta
    tasks = list(dict.fromkeys(r["task"] for r in res.rows))
    env = _env_meta()
    lines = [f"# Benchmark: {', '.join(tasks)}", ""]
    if m.get("command"):
        lines += ["Command:", "", "```bash", m["command"], "```", ""]
    subset = ""
    if m.get("max_train_samples") or m.get("max_test_samples"):
        subset = (f" (stratified seeded subsets: train {m.get('max_train_samples')}, test "
                  f"{m.get('max_test_samples')}, subset seed {m.get('subset_seed', 0)})")
    lines += [
        f"- epochs: {m.get('epochs')}, seeds: {m.get('seeds')}, batch size: "
        f"{m.get('batch_size') or 'set by the DataLoader'}, time steps T: "
        f"{m.get('num_steps')}, mc(K): K = {m.get('mc_samples')}",
        f"- samples: train {m.get('train_samples')}, test {m.get('test_samples')}{subset}",
        f"- device: {m.get('device')}, processes: {m.get('world_size', 1)}, torch "
        f"{env['torch']}, {env['threads']} CPU threads, {env['machine']}",
        "",
        "## Results",
        "",
        "Mean ± std over seeds; accuracies in %. Column names as in `results.csv`.",
        "",
        res.table(),
        "",
    ]
    spike = {(r["task"], r["method"]): r.get("spike_fn") for r in res.rows}
    lines += ["Spike functions: " + "; ".join(f"`{k[1]}`: {v}" for k, v in spike.items()), ""]
    notes = res.notes()
    if notes:
        lines += ["### Read before comparing", ""] + [f"- {n}" for n in notes] + [""]
    order = ("were interleaved epoch by epoch (the first method rotating)"
             if m.get("interleaved", True) else "ran one after the other")
    lines += ["## Protocol", "", PROTOCOL.format(order=order), ""]
    titles = {"curves": "Learning curves", "accuracy_ece": "Accuracy and calibration",
              "reliability": "Reliability diagrams"}
    for f in figures:
        key = f.stem.split("-")[0]
        lines += [f"## {titles.get(key, f.stem)}" + (f" ({f.stem.split('-', 1)[1]})"
                                                      if "-" in f.stem else ""),
                  "", f"![{f.stem}]({f.name})", ""]
    lines += ["Files: `results.csv` (one row per run), `results.json` (curves, summary, "
              "notes), `predictions.csv` (per test sample).", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path

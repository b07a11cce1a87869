"""PNG plots of a run's metrics: what a person looks at first after a run."""

from __future__ import annotations

from pathlib import Path

from k1rl.metrics.jsonl import read_metrics

# (file name, title, y label, flat metric keys drawn on the same axes; a key's per-level
# variants, key@family:level, are drawn too)
PLOTS = (
    ("reward.png", "Training reward", "mean reward", ("reward_mean", "accuracy")),
    ("heldout_accuracy.png", "Held-out accuracy", "pass@1", ("eval_accuracy", "eval_greedy")),
    ("response_length.png", "Mean response length", "tokens", ("response_tokens_mean",)),
    ("switch_times.png", "Phase switch times", "seconds", ("switch_to_rollout_s", "switch_to_train_s")),
)


def plot_run(run_dir: Path) -> list[Path]:
    """Write one PNG per plot whose metrics the run has; returns the files written."""
    run_dir = Path(run_dir)
    # the records' rows: the names every sink shows, so a plot reads as TensorBoard does
    rows = [record.row() for record in read_metrics(run_dir)]
    written = []
    for name, title, ylabel, keys in PLOTS:
        present = [k for k in keys if any(k in r for r in rows)]
        present += sorted({k for r in rows for k in r if k.split("@")[0] in keys and "@" in k})
        if present:
            series = {key: [(r["iteration"], r[key]) for r in rows if key in r]
                      for key in present}
            written.append(line_plot(run_dir / name, title, "iteration", ylabel, series))
    return written


def line_plot(out: Path, title: str, xlabel: str, ylabel: str,
              series: dict[str, list[tuple[float, float]]]) -> Path:
    """One PNG of named (x, y) series on shared axes (integer x ticks)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, points in series.items():
        ax.plot(*zip(*points), marker="o" if len(points) < 100 else None, label=key)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

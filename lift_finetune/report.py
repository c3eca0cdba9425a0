"""What a run leaves behind: metrics JSONL, the loss-curve PNG, summary.json, peak memory."""
from __future__ import annotations

import json
import resource
import sys

import torch

from lift_kernels._atomic import atomic_path, write_text_atomic


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): allocator peak on an accelerator, the process's RSS high-water mark on CPU."""
    if device.type != "cpu":
        return int(torch.get_device_module(device).max_memory_allocated(device)), "max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "RSS high-water mark"  # Linux reports KiB


def rss_high_water_mib() -> float:
    """This process's RSS high-water mark in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round((rss if sys.platform == "darwin" else rss * 1024) / 2**20, 1)


def write_metrics(path: str, history: list[dict], evals: list[dict]) -> None:
    """One JSON object per line: each training step, then each evaluation."""
    lines = [json.dumps({"event": "train", **h}) for h in history]
    lines += [json.dumps({"event": "eval", **e}) for e in evals]
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_json(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _smooth(values: list[float], span: int) -> list[float]:
    """Trailing mean over ``span`` steps: the raw per-step loss is noisy at small batch sizes."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - span] if i >= span else 0.0)
        out.append(acc / min(i + 1, span))
    return out


def loss_figure(history: list[dict], title: str):
    """The loss curve (per step, and a trailing mean once the run is long enough) with the LR beside it."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [h["step"] for h in history]
    loss = [h["loss"] for h in history]
    span = len(loss) // 10
    fig, ax = plt.subplots(figsize=(7, 4))
    if span >= 2:  # a mean over one step is the per-step line itself, drawn over it
        ax.plot(steps, loss, color="tab:blue", alpha=0.35, label="loss per step")
        ax.plot(steps, _smooth(loss, span), color="tab:blue", label=f"loss (trailing mean of {span} steps)")
    else:  # a short run: every step is worth seeing
        ax.plot(steps, loss, color="tab:blue", marker="o", markersize=3, label="loss per step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers: no 1.5 ticks on short runs
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("response-token cross-entropy")
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [h["lr"] for h in history], color="tab:gray", linestyle="--", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    # the loss in front: a twin axes draws over its host, and on a short run with a linear schedule the
    # LR line, scaled to its own axis, can lie exactly on the loss line
    ax.set_zorder(lr_ax.get_zorder() + 1)
    ax.patch.set_visible(False)  # else the host's background would hide the LR line instead
    handles = ax.get_legend_handles_labels()
    lr_handles = lr_ax.get_legend_handles_labels()
    ax.legend(handles[0] + lr_handles[0], handles[1] + lr_handles[1], loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_loss(path: str, history: list[dict], title: str) -> None:
    fig = loss_figure(history, title)
    import matplotlib.pyplot as plt  # after loss_figure chose the Agg backend

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def human_seconds(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"

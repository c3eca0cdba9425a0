"""The loss plot (issue 19, item 7): whole-step ticks, and the per-step loss visible on a short run.

Read from matplotlib's objects (lines, ticks), not from pixels."""
import pytest

from lift_finetune import report

pytest.importorskip("matplotlib")


def _history(steps: int) -> list[dict]:
    return [{"step": s, "loss": 2.0 / s + 0.1 * (s % 3), "lr": 1e-4 * (1 - s / (steps + 1))}
            for s in range(1, steps + 1)]


def _loss_lines(fig):
    ax = fig.axes[0]  # the loss axes; fig.axes[1] is the learning rate's twin
    return {line.get_label(): line for line in ax.get_lines()}, ax


def _close(fig):
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.parametrize("steps", [2, 3, 7, 40])
def test_step_ticks_are_whole_numbers(steps):
    fig = report.loss_figure(_history(steps), "t")
    try:
        fig.canvas.draw()  # the locator places the ticks now
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    finally:
        _close(fig)


def test_short_run_draws_each_step_opaque_and_no_trailing_mean_over_it():
    fig = report.loss_figure(_history(3), "t")
    try:
        lines, _ = _loss_lines(fig)
        assert list(lines) == ["loss per step"]
        per_step = lines["loss per step"]
        assert per_step.get_alpha() in (None, 1.0) and per_step.get_marker() not in (None, "None", "")
        assert list(per_step.get_xdata()) == [1, 2, 3]
        loss_ax, lr_ax = fig.axes
        assert loss_ax.get_zorder() > lr_ax.get_zorder()  # drawn over the LR line, which may lie on it
        assert not loss_ax.patch.get_visible()  # and its background does not hide the LR line
    finally:
        _close(fig)


def test_long_run_draws_the_trailing_mean_over_a_visible_per_step_line():
    history = _history(40)
    fig = report.loss_figure(history, "t")
    try:
        lines, ax = _loss_lines(fig)
        per_step, mean = lines["loss per step"], lines["loss (trailing mean of 4 steps)"]
        assert 0 < per_step.get_alpha() < 1
        assert list(per_step.get_ydata()) == [h["loss"] for h in history]
        assert list(mean.get_ydata()) != list(per_step.get_ydata())  # a real mean, not the same line again
        order = ax.get_lines()
        assert order.index(per_step) < order.index(mean)  # drawn first, under the mean
    finally:
        _close(fig)

"""The feature-matching-vs-completion-length figure, rendered to PNG bytes.

Uses matplotlib's object API with the Agg canvas directly, so nothing touches pyplot's global
backend or state (safe in a training process and on machines without a display).
"""

from __future__ import annotations

import io


def curve_png(curve, label: str, other=None, other_label: str = "before") -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, reward_axes = figure.subplots(1, 2)
    drawn = [(other, other_label, "--")] if other is not None else []
    drawn.append((curve, label, "-"))
    for shown, name, style in drawn:
        loss_axes.plot(shown.lengths, shown.cfm, style, marker="o", label=name)
        reward_axes.plot(shown.lengths, shown.alignment, style, marker="o", color="tab:green",
                         label=f"alignment 2a ({name})")
        reward_axes.plot(shown.lengths, shown.diversity, style, marker="s", color="tab:red",
                         label=f"diversity 2d ({name})")
    loss_axes.set_xlabel("completion length (tokens)")
    loss_axes.set_ylabel("conditional feature-matching loss")
    loss_axes.set_title(f"CFM loss vs completion length ({curve.groups} groups)")
    reward_axes.set_xlabel("completion length (tokens)")
    reward_axes.set_title("alignment and diversity (no whitening)")
    for axes in (loss_axes, reward_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()

"""The usage chart of the customer page: a server-rendered SVG, one stacked series per model.

Pure: it takes the daily costs and the days to show, and returns markup and the same figures as
a table (the chart's text alternative). Costs stay exact nano-dollars; only the bar geometry is
scaled, in integer pixels.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

from billing.core.money import Nanos, format_dollars
from billing.payments.spend import DailyCost

# Okabe-Ito: told apart by readers with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 8, 12, 28


@dataclass(frozen=True)
class UsageTable:
    """The chart's figures: one row per day with usage, one column per model."""

    models: list[str]
    rows: list[tuple[dt.date, list[Nanos], Nanos]]
    total_nanos: Nanos


@dataclass(frozen=True)
class UsageChart:
    """The SVG and its text alternative."""

    svg: Markup
    table: UsageTable


def usage_chart(costs: Sequence[DailyCost], *, first_day: dt.date, days: int) -> UsageChart:
    """A stacked bar per day from ``first_day`` for ``days`` days, one series per model."""
    models = sorted({cost.model for cost in costs})
    cells: dict[tuple[dt.date, str], Nanos] = {}
    for cost in costs:
        cells[(cost.day, cost.model)] = cells.get((cost.day, cost.model), 0) + cost.cost_nanos
    all_days = [first_day + dt.timedelta(days=n) for n in range(days)]
    totals = {day: sum(cells.get((day, model), 0) for model in models) for day in all_days}
    table = UsageTable(
        models=models,
        rows=[
            (day, [cells.get((day, model), 0) for model in models], totals[day])
            for day in all_days
            if totals[day]
        ],
        total_nanos=sum(totals.values()),
    )
    return UsageChart(svg=_svg(models, cells, all_days, totals), table=table)


def _svg(
    models: list[str],
    cells: dict[tuple[dt.date, str], Nanos],
    all_days: list[dt.date],
    totals: dict[dt.date, Nanos],
) -> Markup:
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    top = axis_top(max(totals.values(), default=0))
    slot = plot_width // max(len(all_days), 1)
    bar = max(slot - 4, 2)
    first, last = all_days[0], all_days[-1]
    description = (
        f"Daily usage from {first} to {last} by model;"
        f" total {format_dollars(sum(totals.values()))}."
        " The table below lists the same figures."
    )
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img"'
        ' aria-labelledby="chart-title chart-desc" preserveAspectRatio="xMidYMid meet">',
        '<title id="chart-title">Usage over the last 30 days, by model</title>',
        f'<desc id="chart-desc">{escape(description)}</desc>',
        f'<g class="axis"><line x1="{LEFT}" y1="{TOP + plot_height}" x2="{WIDTH - RIGHT}"'
        f' y2="{TOP + plot_height}"/>',
        f'<text x="{LEFT - 6}" y="{TOP + plot_height}" text-anchor="end">$0</text>',
        f'<text x="{LEFT - 6}" y="{TOP + 10}" text-anchor="end">'
        f"{escape(format_dollars(top))}</text>",
    ]
    for index, day in enumerate(all_days):
        if (len(all_days) - 1 - index) % 7 == 0:  # weekly, ending on the last day
            x = LEFT + index * slot + slot // 2
            parts.append(f'<text x="{x}" y="{HEIGHT - 8}" text-anchor="middle">{day:%b %d}</text>')
    parts.append("</g>")
    stacked = dict.fromkeys(all_days, 0)
    for number, model in enumerate(models):
        colour = PALETTE[number % len(PALETTE)]
        parts.append(f'<g class="series" data-model="{escape(model)}" fill="{colour}">')
        for index, day in enumerate(all_days):
            cost = cells.get((day, model), 0)
            if not cost:
                continue
            below = stacked[day] * plot_height // top
            stacked[day] += cost
            height = max(stacked[day] * plot_height // top - below, 1)
            x = LEFT + index * slot + (slot - bar) // 2
            y = TOP + plot_height - below - height
            label = f"{day}: {model}, {format_dollars(cost)}"
            parts.append(
                f'<rect x="{x}" y="{y}" width="{bar}" height="{height}">'
                f"<title>{escape(label)}</title></rect>"
            )
        parts.append("</g>")
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every interpolated text is escaped above


def axis_top(largest: Nanos) -> Nanos:
    """The top of the y axis: the smallest 1, 2 or 5 times a power of ten nano-dollars that is
    at least ``largest`` (so its label is short and exact)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= largest:
                return step * factor
        step *= 10


def legend_colour(models: list[str], model: str) -> str:
    """The colour of ``model``'s series."""
    return PALETTE[models.index(model) % len(PALETTE)]

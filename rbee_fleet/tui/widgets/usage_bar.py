"""A one-line usage bar: label, bar, used/total and percent (VRAM of a GPU, RAM of a CPU host)."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget


class UsageBar(Widget):
    DEFAULT_CSS = """
    UsageBar {
        height: 1;
        width: 1fr;
    }
    """

    def __init__(self, label: str, used: float, total: float, unit: str = "GiB", **kwargs) -> None:
        super().__init__(**kwargs)
        self.label, self.used, self.total, self.unit = label, used, total, unit

    def set_usage(self, used: float, total: float) -> None:
        self.used, self.total = used, total
        self.refresh()

    def render(self) -> Text:
        frac = self.used / self.total if self.total > 0 else 0.0
        figures = f" {self.used:.1f}/{self.total:.1f} {self.unit} {frac * 100:3.0f}%"
        label = f"{self.label[:24]:<24} "
        width = max(4, self.size.width - len(label) - len(figures))
        filled = round(frac * width)
        style = "red" if frac > 0.9 else "yellow" if frac > 0.7 else "green"
        text = Text(label, style="bold")
        text.append("█" * filled, style=style)
        text.append("░" * (width - filled), style="dim")
        text.append(figures)
        return text

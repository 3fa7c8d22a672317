"""The app's modal screens: the keys (built from the app's own bindings) and a picker."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

KEY_NAMES = {
    "question_mark": "?",
    "enter": "enter",
    "right,down": "→ ↓",
    "left,up": "← ↑",
}

LEGEND = """
Charts draw each terminal column's min and max from the full series: no spike is hidden.
Grey dots are that raw min-max envelope under the smoothed line.
Red x marks and lines are NaN/Inf steps, yellow ▼ marks alert steps, a red line the clipping threshold.
▲ on the bottom edge marks the run's events (evaluations, checkpoints, event()): i lists them."""


def help_text(bindings: Iterable[BindingType]) -> str:
    """One line per key, from the bindings themselves: the help cannot drift from the keys."""
    lines = []
    for binding in bindings:
        if not isinstance(binding, Binding):
            continue
        key = KEY_NAMES.get(binding.key, binding.key)
        lines.append(f"{key:<10} {binding.tooltip or binding.description}")
    return "\n".join(lines) + "\n" + LEGEND


class HelpScreen(ModalScreen[None]):
    """The keys."""

    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "close")]
    DEFAULT_CSS = "HelpScreen { align: center middle; } #help { width: auto; max-width: 110; border: round $accent; padding: 1 2; background: $surface; }"

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        yield Static(Text(self.text), id="help")

    def action_dismiss(self, result: None = None) -> None:  # type: ignore[override]
        self.dismiss(None)


class PickScreen(ModalScreen[str | None]):
    """A list to pick from: a metric for a chart, a run, an alert; the cursor on ``current``."""

    BINDINGS = [Binding("escape,q", "cancel", "cancel")]
    DEFAULT_CSS = "PickScreen { align: center middle; } PickScreen OptionList { width: 70; max-height: 80%; border: round $accent; }"

    def __init__(
        self, title: str, choices: list[tuple[str, str]], current: str | None = None
    ) -> None:
        super().__init__()
        self.title_text = title
        self.choices = choices
        self.current = current

    def compose(self) -> ComposeResult:
        options = OptionList(*(Option(Text(label), id=key) for key, label in self.choices))
        options.border_title = self.title_text
        keys = [key for key, _ in self.choices]
        if self.current in keys:
            options.highlighted = keys.index(self.current)
        yield options

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


class RunPickScreen(PickScreen):
    """The run picker: enter shows a run; space marks runs to overlay (``o``), ● before each."""

    BINDINGS = [Binding("space", "mark", "overlay", show=False)]

    def __init__(
        self,
        choices: list[tuple[str, str]],
        current: str | None,
        marked: set[str],
        on_mark: Callable[[str], None],
    ) -> None:
        super().__init__(
            "runs · enter: show · space: overlay (o)",
            [(key, _marked(label, key in marked)) for key, label in choices],
            current,
        )
        self.labels = dict(choices)
        self.marked = marked
        self.on_mark = on_mark

    def action_mark(self) -> None:
        options = self.query_one(OptionList)
        index = options.highlighted
        if index is None:
            return
        key = self.choices[index][0]
        self.on_mark(key)  # the app changes the set it shares with this screen
        options.replace_option_prompt_at_index(
            index, Text(_marked(self.labels[key], key in self.marked))
        )


def _marked(label: str, marked: bool) -> str:
    return f"{'●' if marked else ' '} {label}"


class TextScreen(ModalScreen[None]):
    """One thing in full (an alert, a run's config and events): text that a table row or a
    chart title cuts. It scrolls (arrows, page keys) when longer than the screen."""

    BINDINGS = [Binding("escape,q,enter", "close", "close")]
    DEFAULT_CSS = """
    TextScreen { align: center middle; }
    TextScreen VerticalScroll { width: auto; max-width: 110; height: auto; max-height: 90%; border: round $accent; background: $surface; }
    TextScreen Static { width: auto; padding: 0 2; }
    TextScreen Static:first-child { padding-top: 1; }
    TextScreen Static:last-child { padding-bottom: 1; }
    """

    def __init__(self, title: str, *texts: Text) -> None:
        super().__init__()
        self.title_text, self.texts = title, texts

    def compose(self) -> ComposeResult:
        with VerticalScroll() as body:
            body.border_title = self.title_text
            for text in self.texts:
                yield Static(text)

    def action_close(self) -> None:
        self.dismiss(None)

"""Read ``data-field`` values out of a page, the way a user reads the labelled fields."""

from __future__ import annotations

from html.parser import HTMLParser

VOID_ELEMENTS = {"input", "br", "img", "meta", "link", "hr"}


class FieldReader(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, list[str]] = {}
        self.open: list[tuple[str, str | None, list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in VOID_ELEMENTS:
            return
        self.open.append((tag, dict(attrs).get("data-field"), []))

    def handle_endtag(self, tag: str) -> None:
        if not self.open:
            return
        _, field, texts = self.open.pop()
        text = " ".join("".join(texts).split())
        if field:
            self.fields.setdefault(field, []).append(text)
        if self.open:
            self.open[-1][2].append("".join(texts))

    def handle_data(self, data: str) -> None:
        if self.open:
            self.open[-1][2].append(data)


def read_fields(html: str) -> dict[str, str]:
    """The first value of each ``data-field`` (the General tab's own fields come first)."""
    return {name: values[0] for name, values in read_all_fields(html).items()}


def read_all_fields(html: str) -> dict[str, list[str]]:
    reader = FieldReader()
    reader.feed(html)
    return reader.fields

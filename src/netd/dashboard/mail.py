"""
A captured message as the dashboard shows it: headers, the text and HTML
parts, attachments, and the links and codes a test usually looks for.

Everything is parsed with Python's C{email} package and returned as plain
data; the page puts it into the document as text, never as markup.
"""

from __future__ import annotations

import email.policy
import re
import urllib.parse
from email.message import EmailMessage, Message
from typing import Any

__all__ = ["attachment_disposition", "describe", "html_part", "part"]

# How much of a text part the page gets: a reader wants the start of a long one.
MAX_TEXT = 256 * 1024
_LINK = re.compile(r"""https?://[^\s<>"'()\[\]{}]+""", re.IGNORECASE)
_HREF = re.compile(r"""href\s*=\s*["']?(https?://[^"'\s>]+)""", re.IGNORECASE)
# A one-time code: 4 to 8 digits standing alone (not a date, a time or a price).
_CODE = re.compile(r"(?<![\w.,:/+-])\d{4,8}(?![\w.,:/%-])")


def _parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def _content(part: Message) -> str:
    """A text part's text, whatever its declared charset claims."""
    try:
        content = part.get_content()  # type: ignore[attr-defined]
        if isinstance(content, str):
            return content
    except (LookupError, UnicodeError, ValueError, AssertionError):
        pass
    payload = part.get_payload(decode=True)
    return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""


def _header_text(value: Any) -> str:
    try:
        return str(value)
    except (ValueError, LookupError, UnicodeError):
        return repr(value)


def _leaves(message: EmailMessage) -> list[Message]:
    return [p for p in message.walk() if not p.is_multipart()]


def _bodies(message: EmailMessage) -> tuple[Message | None, Message | None]:
    try:
        text = message.get_body(preferencelist=("plain",))
        html = message.get_body(preferencelist=("html",))
    except (ValueError, LookupError):
        return None, None
    return text, html


def describe(raw: bytes) -> dict[str, Any]:
    """What the message view shows, as JSON."""
    message = _parse(raw)
    text_part, html_part = _bodies(message)
    text = _content(text_part) if text_part is not None else ""
    html = _content(html_part) if html_part is not None else ""
    attachments = []
    for index, leaf in enumerate(_leaves(message)):
        if leaf is text_part or leaf is html_part:
            continue
        payload = leaf.get_payload(decode=True)
        attachments.append(
            {
                "index": index,
                "filename": leaf.get_filename() or f"part-{index}",
                "content_type": leaf.get_content_type(),
                "size": len(payload) if isinstance(payload, bytes) else 0,
            }
        )
    headers = [[name, _header_text(value)] for name, value in message.items()]
    links = list(dict.fromkeys([*_LINK.findall(text), *_HREF.findall(html)]))
    subject = _header_text(message.get("subject", ""))
    codes = list(dict.fromkeys(_CODE.findall(subject + "\n" + text)))
    return {
        "subject": subject,
        "from": _header_text(message.get("from", "")),
        "to": _header_text(message.get("to", "")),
        "date": _header_text(message.get("date", "")),
        "headers": headers,
        "text": text[:MAX_TEXT],
        "text_truncated": len(text) > MAX_TEXT,
        "has_html": html_part is not None,
        "attachments": attachments,
        "links": links[:100],
        "codes": codes[:20],
        "size": len(raw),
    }


def html_part(raw: bytes) -> str | None:
    """The message's HTML body, or L{None}."""
    html = _bodies(_parse(raw))[1]
    return _content(html) if html is not None else None


def part(raw: bytes, index: int) -> tuple[str, bytes] | None:
    """The C{index}th leaf part's file name and decoded bytes, or L{None}."""
    leaves = _leaves(_parse(raw))
    if not 0 <= index < len(leaves):
        return None
    leaf = leaves[index]
    payload = leaf.get_payload(decode=True)
    return leaf.get_filename() or f"part-{index}", payload if isinstance(payload, bytes) else b""


def attachment_disposition(filename: str) -> str:
    """A Content-Disposition that names the file safely (RFC 6266, RFC 5987)."""
    plain = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename
    )
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{urllib.parse.quote(filename)}"

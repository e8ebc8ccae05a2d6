"""The one conversation type every input format is converted into."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Message:
    """One turn of a conversation."""

    role: str
    """system, user, assistant or tool."""
    content: str
    """The text of the turn."""


@dataclass
class Conversation:
    """A training or inference sample: an ordered list of messages."""

    messages: list[Message]
    """The turns, system first when there is one."""
    origin: str = ""
    """Where the record came from (``file:line``), for error messages and previews."""
    tags: dict[str, str] = field(default_factory=dict)
    """Free-form labels (e.g. ``lang``) carried through for statistics."""

    @property
    def system(self) -> str | None:
        """The record's own system prompt, if it has one."""
        if self.messages and self.messages[0].role == "system":
            return self.messages[0].content
        return None

    def with_system(self, system: str | None) -> Conversation:
        """This conversation with ``system`` as its system prompt unless it has its own."""
        if system is None or self.system is not None:
            return self
        return Conversation([Message("system", system), *self.messages], self.origin, self.tags)

    def as_dicts(self) -> list[dict[str, str]]:
        """The messages as ``{"role", "content"}`` dicts, the chat-template input."""
        return [{"role": m.role, "content": m.content} for m in self.messages]

"""Which configured model serves a requested name: its own entry, else the
longest wildcard entry whose prefix the name starts with, as LiteLLM's wildcard
routing does. ``{name: "openai/*", upstream: openai}`` serves ``openai/gpt-4o``
as the upstream's ``gpt-4o`` (``upstream_model`` may place the ``*`` elsewhere,
``"*-latest"``, or name one model for them all); ``{name: "*", ...}`` serves
every name no other entry does.

A resolved name is a model of its own downstream: limits, budgets, prices, the
ledger and cache keys see ``openai/gpt-4o``. Only metric labels keep the entry's
name, since clients choose what follows the prefix.
"""

from __future__ import annotations

from collections.abc import Iterable

from serve_app.settings import ModelSettings, wildcard_match

WILDCARD = "*"


def is_pattern(name: str) -> bool:
    return name.endswith(WILDCARD)


class ModelRoutes:
    def __init__(self, models: Iterable[ModelSettings], remembered: int = 4096) -> None:
        models = list(models)
        self.exact: dict[str, ModelSettings] = {m.name: m for m in models if not is_pattern(m.name)}
        # Longest prefix first: "openai/gpt-4*" wins over "openai/*", which wins over "*".
        self.patterns = sorted(
            (m for m in models if is_pattern(m.name)), key=lambda m: len(m.name), reverse=True
        )
        self._remembered = remembered
        # name -> (the model it resolves to, the wildcard entry's name), or None: no model
        self._resolved: dict[str, tuple[ModelSettings, str] | None] = {}

    def get(self, name: str) -> ModelSettings | None:
        found = self.exact.get(name)
        if found is not None or not self.patterns:
            return found
        if name not in self._resolved:
            if len(self._resolved) >= self._remembered:
                self._resolved.clear()  # names are the client's to choose: the memo stays bounded
            self._resolved[name] = self._match(name)
        resolved = self._resolved[name]
        return None if resolved is None else resolved[0]

    def entry(self, name: str) -> str:
        """The configured entry that serves model ``name`` (got from ``get``): its own, or
        the wildcard's that matched it."""
        if not self.patterns or name in self.exact:
            return name
        resolved = self._resolved.get(name) or self._match(name)  # forgotten since ``get``
        return name if resolved is None else resolved[1]

    def _match(self, name: str) -> tuple[ModelSettings, str] | None:
        for entry in self.patterns:
            suffix = wildcard_match(entry.name, name)
            if suffix is not None:
                target = (entry.upstream_model or WILDCARD).replace(WILDCARD, suffix, 1)
                model = entry.model_copy(update={"name": name, "upstream_model": target})
                return model, entry.name
        return None

    def listed(self) -> list[ModelSettings]:
        """The models ``/v1/models`` lists: a wildcard entry names none of its own."""
        return list(self.exact.values())


__all__ = ["WILDCARD", "ModelRoutes", "is_pattern"]

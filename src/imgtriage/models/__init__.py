"""Registry and factory: every architecture imgtriage can train, by name."""

from imgtriage.models.registry import (
    ModelEntry,
    create_model,
    get_entry,
    list_models,
    register_model,
)

__all__ = ["ModelEntry", "create_model", "get_entry", "list_models", "register_model"]

"""Registry and factory: every architecture imgtriage can train, by name."""

from imgtriage.models.penultimate import WithFeatures, head_of
from imgtriage.models.registry import (
    ModelEntry,
    create_model,
    get_entry,
    list_models,
    register_model,
)

__all__ = ["ModelEntry", "WithFeatures", "create_model", "get_entry", "head_of", "list_models",
           "register_model"]

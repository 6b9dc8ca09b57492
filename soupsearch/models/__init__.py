"""Model family adapters: one factory spec (``builtin:``, ``torchvision:``, ``timm:``,
``open_clip:``, ``pkg.module:fn``) builds the architecture an ingredient's weights load into
(:mod:`.factory`)."""

from soupsearch.models.factory import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]

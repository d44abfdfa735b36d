"""Recommender losses, one module each, all with the signature ``fn(hidden, item_table, targets, **params)``."""
from scalerec.losses.registry import available_losses, get_loss, loss_defaults, register_loss

__all__ = ["available_losses", "get_loss", "loss_defaults", "register_loss"]

"""Where images come from (image folders, the generated quickstart set) and how they are loaded."""
from usi.data.folder import ImageFolder
from usi.data.loader import TrainLoader, eval_loader, eval_transform, train_transform

__all__ = ["ImageFolder", "TrainLoader", "eval_loader", "eval_transform", "train_transform"]

"""surgeon: offline weight surgery on TensorFlow/Keras checkpoints, optimizer state included."""
from .errors import SurgeonError
from .formats import open_checkpoint, open_writer, detect
from .tree import Entry, OptimizerInfo

__version__ = "0.1.0"
__all__ = ["open_checkpoint", "open_writer", "detect", "Entry", "OptimizerInfo", "SurgeonError"]

"""Errors raised by surgeon. The CLI turns each into one line and exit code 2."""


class SurgeonError(Exception):
    """Base class: a problem the user can act on (bad input, unsupported file, ...)."""


class FormatError(SurgeonError):
    """The file is not a checkpoint surgeon can read, or it is damaged."""


class BindingError(SurgeonError):
    """Optimizer state cannot be tied to the model's weights."""


class RecipeError(SurgeonError):
    """A recipe is invalid; the message names the file, line and op."""


class WriteError(SurgeonError):
    """The output could not be written; the target is left untouched."""

"""The package's single exception type."""


class VarstudyError(ValueError):
    """Raised for bad input or a failed precondition.

    Messages start with what was wrong and list the valid choices where there are any.
    """

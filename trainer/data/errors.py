"""The data layer's error type."""


class DataError(ValueError):
    """Bad input data; the message names the file, the column and the first bad row."""
